"""Small HTML pieces of the report: numbers, links, badges, gene lists, embedded figures and the style sheet."""
from __future__ import annotations

import base64
import io
import math
import re
from html import escape

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from PIL import Image

from .. import plot

#: figures are embedded at this resolution (small files, sharp enough on screen)
DPI = 100
#: a link to the MSigDB card of a gene set named like HALLMARK_..., REACTOME_... (MSigDB's collections)
MSIGDB_CARD = "https://www.gsea-msigdb.org/gsea/msigdb/cards/{}"
_MSIGDB_NAME = re.compile(r"^(HALLMARK|REACTOME|KEGG|BIOCARTA|PID|WP|GOBP|GOCC|GOMF|HP|NABA)_[A-Z0-9_]+$")
_MAX_LISTED = 12

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1200px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.8em; }
h3 { margin: 1.4em 0 0.3em; }
a { color: #1f5fa0; } a.ext { text-decoration: none; font-size: 0.85em; margin-left: 0.25em; }
.meta { color: #555; } .meta b { color: #222; }
nav { font-size: 0.95em; margin: 0.6em 0; } nav a { margin-right: 1em; }
.figs { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.55em; text-align: left; vertical-align: top; }
th { background: #f5f5f5; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.name { overflow-wrap: anywhere; max-width: 30em; }
table.overview tr.inactive td { color: #888; }
table.overview thead th { position: sticky; top: 0; }
.bar { display: inline-block; height: 0.7em; margin-left: 0.4em; vertical-align: middle; border-radius: 2px; }
.kind { display: inline-block; padding: 0 0.5em; border-radius: 0.6em; color: white; font-size: 0.8em;
        vertical-align: middle; }
.gained { color: #d9531e; font-weight: bold; }
.one-gene { display: inline-block; padding: 0 0.4em; border: 1px solid #b8860b; border-radius: 0.6em; color: #8a6508;
            font-size: 0.8em; vertical-align: middle; white-space: nowrap; }
.note { background: #f7f9fc; border-left: 4px solid #3b75af; padding: 0.4em 1em; }
.facts { color: #444; margin: 0.2em 0 0.6em; }
details.factor { border: 1px solid #ddd; border-radius: 4px; padding: 0.3em 0.8em; margin: 0.5em 0; }
details.factor > summary { cursor: pointer; font-weight: bold; }
details.factor > summary .brief { font-weight: normal; color: #555; font-size: 0.9em; margin-left: 0.5em; }
.methods p { max-width: 60em; } sub, sup { line-height: 0; }
code { background: #f3f3f3; padding: 0 0.2em; border-radius: 2px; }
"""


def significant(x, digits: int = 2) -> str:
    """``x`` to ``digits`` significant digits, plainly when it reads well (0.0014, 12, 3,400), else 1.4e-05."""
    x = float(x)
    if not math.isfinite(x):
        return "n/a"
    if x == 0:
        return "0"
    if abs(x) >= 10 ** digits:
        return f"{x:,.0f}"
    text = f"{x:.{digits}g}"
    if "e" in text and abs(x) >= 1e-3:  # 99.6 rounds to 1e+02
        return f"{x:,.0f}"
    return text if "e" not in text else f"{x:.{digits - 1}e}"


def relevance_text(value, is_r2: bool) -> str:
    """An R² as a percentage of variance ("0.14 %", never "0.0 %"); another measure as a plain number."""
    return f"{significant(100 * float(value))} %" if is_r2 else significant(value, 3)


def count(value) -> str:
    """A count, or an em dash when it does not apply (NaN)."""
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{int(value):,}"


def gene_set_url(name: str, urls: dict) -> str | None:
    """The web page of gene set ``name``: from ``urls`` (http(s) only), else MSigDB's card for MSigDB-style names."""
    url = urls.get(name)
    if url and re.match(r"^https?://", url.strip(), flags=re.IGNORECASE):
        return url.strip()
    if _MSIGDB_NAME.match(name):
        return MSIGDB_CARD.format(name)
    return None


def external_link(name: str, urls: dict, text: str = "↗") -> str:
    """A small link to the gene set's page ("" when it has none)."""
    url = gene_set_url(name, urls)
    if url is None:
        return ""
    return (f'<a class="ext" href="{escape(url, quote=True)}" title="gene set {escape(name)}" target="_blank" '
            f'rel="noopener">{text}</a>')


def anchor(name: str) -> str:
    """The HTML id of a factor's section."""
    return "factor-" + re.sub(r"[^A-Za-z0-9_-]+", "-", name)


def kind_badge(kind: str) -> str:
    color = plot.KIND_COLORS.get(kind, "#999")
    return f'<span class="kind" style="background:{color}">{escape(kind)}</span>'


def genes(names, limit: int = _MAX_LISTED) -> str:
    """Up to ``limit`` gene names, comma-separated, with how many more there are."""
    names = list(names)
    shown = ", ".join(escape(str(g)) for g in names[:limit])
    more = f" … (+{len(names) - limit} more)" if len(names) > limit else ""
    return (shown + more) or "—"


def figure_uri(fig) -> str:
    """``fig`` as a PNG data URI (the report is one self-contained file), reduced to 256 colours: a third of
    the bytes, no visible change on plots."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    image = Image.open(buffer).convert("RGB").quantize(colors=256)
    buffer = io.BytesIO()
    image.save(buffer, format="png", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def figure(draw, *args, alt: str, **kwargs) -> str:
    """An ``<img>`` of what ``draw(*args, **kwargs)`` (a plot function returning Axes or a Figure) draws; every
    figure it opened is closed."""
    before = set(plt.get_fignums())
    try:
        drawn = draw(*args, **kwargs)
        uri = figure_uri(drawn if isinstance(drawn, Figure) else drawn.figure)
    finally:
        for num in set(plt.get_fignums()) - before:
            plt.close(num)
    return f'<img src="{uri}" alt="{escape(alt, quote=True)}">'
