"""A one-file HTML report of a fitted model's results, for reading by a biologist.

:func:`write_report` reads the results a model's ``write(adata)`` (or ``pathfactor fit``) leaves in an AnnData
(see :mod:`.results`) and writes ``report.html``: an overview table of every factor, a UMAP coloured by the top
factors (when ``obsm["X_umap"]`` exists), a heatmap of their top genes by group, a section per active factor,
the interventions' effects on the factors (when the model had interventions), covariate effects and a methods
paragraph. Figures are embedded as PNG data URIs, so the file stands alone.

A multi-view result (a MuData, as a multi-view Spex's ``write(mdata)`` leaves it) gets a "Factors × views" heatmap
of the share of each view's variance each factor explains, and each factor's top features per view; the per-group
heatmap of top genes is left out (one line says so).
"""
from __future__ import annotations

from html import escape
from pathlib import Path

from .. import plot
from . import sections
from .html import CSS
from ..data.views import is_mudata
from .results import load, overview, refined, report_groups

__all__ = ["write_report"]

#: factors shown in the UMAP panels and the heatmap
N_SUMMARY_FACTORS = 6


def _page(title: str, parts: list[str]) -> str:
    body = "\n".join(p for p in parts if p)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>
<style>{CSS}</style></head>
<body>
{body}
</body></html>
"""


def _nav(adata, res, names, has_heatmap: bool, has_scatter: bool) -> list[tuple[str, str]]:
    links = [("overview", "All factors")]
    if res.views is not None:
        links.append(("views", "Factors × views"))
    if "X_umap" in adata.obsm and names:
        links.append(("umap", "UMAP"))
    if has_heatmap:
        links.append(("heatmap", "Top genes by group"))
    if has_scatter:
        links.append(("scatter", "Top two factors"))
    links.append(("factors", "Factors"))
    if res.interventions is not None:
        links.append(("interventions", "Interventions"))
    if res.covariates is not None and res.covariates.shape[1]:
        links.append(("covariates", "Covariates"))
    return links + [("methods", "Methods")]


def _no_heatmap(groups) -> str:
    return (f'<p class="note" id="heatmap">The heatmap of top genes by {escape(str(groups.name))} is left out for '
            "several views: their features and loadings are on different scales.</p>")


def write_report(adata, out_dir, key: str = "spex", color_by: str | None = None, top_factors: int | None = None,
                 top_genes: int = 15, title: str | None = None, gene_set_urls=None,
                 open_factors: int = 10) -> Path:
    """Write ``out_dir/report.html``, one self-contained page about the results stored under ``key``.

    ``color_by``: an obs column to group cells by (violins, heatmap, UMAP; many-valued numbers become quintiles).
    ``top_factors``: at most this many factor sections (default: every active factor), the first
    ``open_factors`` open and the rest collapsed. ``gene_set_urls``: gene set name -> web page (or the
    :class:`~pathfactor.GeneSets` read from a GMT whose descriptions are URLs), added to
    ``uns[key]["gene_set_urls"]``; MSigDB names (HALLMARK_*, REACTOME_*, ...) link to their MSigDB card anyway.
    ``adata`` may be a MuData holding a multi-view result (``color_by`` then names a column of ``mdata.obs``).
    Returns the path of the HTML file.
    """
    res = load(adata, key, gene_set_urls)
    groups = report_groups(adata, color_by)
    order = plot.group_order(groups) if groups is not None else None
    colors = plot.group_colors(order) if order is not None else None
    refined_table = refined(res)
    table = overview(res, refined_table)
    active = table.index[table["active"]].tolist()
    chosen = active if top_factors is None else active[:top_factors]
    summary = active[:N_SUMMARY_FACTORS]
    title = title or f"pathfactor report: {res.model}"

    multiview = is_mudata(adata)
    heatmap = "" if multiview else sections.heatmap(adata, res, summary, groups, order)
    pair = (chosen if len(chosen) >= 2 else table.index.tolist())[:2]
    links = _nav(adata, res, summary, bool(heatmap), len(pair) == 2)
    parts = [sections.header(res, adata, title, groups, links),
             sections.how_to_read(res), sections.overview(table, res, set(chosen))]
    if res.views is not None:
        parts.append(sections.views(res))
    if "X_umap" in adata.obsm and summary:
        parts.append(sections.umap(adata, res, summary, groups, order))
    parts.append(_no_heatmap(groups) if multiview and groups is not None and summary else heatmap)
    if len(pair) == 2:
        parts.append(sections.scatter(res, pair, adata.obs[color_by] if color_by else None, order))
    parts.append(sections.factors(chosen, table, res, refined_table, groups, order, colors, top_genes, open_factors))
    if res.interventions is not None:
        parts.append(sections.interventions(res.interventions, set(chosen), res.loadings, table["one_gene"]))
    if res.covariates is not None and res.covariates.shape[1]:
        parts.append(sections.covariates(res.covariates, min(top_genes, 10)))
    parts.append(sections.methods(res, adata))

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.html"
    path.write_text(_page(title, parts), encoding="utf-8")
    return path
