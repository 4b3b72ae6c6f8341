"""A one-page HTML report of a fitted model's results, for reading by a biologist.

Reads the results convention a model's ``write(adata)`` (or ``pathfactor fit``) leaves in an AnnData:
``obsm["X_<key>"]``, ``varm["<key>_loadings"]``, optional ``varm["<key>_annotation"]`` and
``varm["<key>_covariate_effects"]``, and ``uns[<key>]`` (factor names, kinds, relevance, active).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from . import plot
from .evaluate import ACTIVE_FRACTION, active_mask, refined_annotations

__all__ = ["write_report"]

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1150px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.8em; }
.meta { color: #555; } .meta b { color: #222; }
.figs { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
.figs img { max-width: 100%; height: auto; border: 1px solid #eee; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f5f5f5; }
.kind { display: inline-block; padding: 0 0.5em; border-radius: 0.6em; color: white; font-size: 0.8em; }
.gained { color: #d9531e; font-weight: bold; }
.note { background: #f7f9fc; border-left: 4px solid #3b75af; padding: 0.6em 1em; }
"""

_MAX_LISTED = 12


@dataclass
class _Results:
    model: str
    info: pd.DataFrame  # index: factor names; columns: kind, relevance, active
    scores: pd.DataFrame  # cells x factors
    loadings: pd.DataFrame  # genes x factors
    annotation: pd.DataFrame | None  # genes x factors, bool
    covariates: pd.DataFrame | None  # genes x covariates
    params: dict = field(default_factory=dict)
    measure: str = "R^2"  # what relevance measures

    @property
    def is_r2(self) -> bool:
        return self.measure in ("R^2", "R²")


def _missing(what: str) -> ValueError:
    return ValueError(f"{what} is missing: it holds the fitted model's results, which the model's write(adata) "
                      f"or `pathfactor fit` creates")


def _load(adata, key: str) -> _Results:
    """The results under ``key``, checked and as pandas objects (h5ad round trips turn lists into arrays)."""
    if key not in adata.uns:
        raise _missing(f"adata.uns[{key!r}]")
    meta = adata.uns[key]
    for name in ("factor_names", "relevance"):
        if name not in meta:
            raise _missing(f"adata.uns[{key!r}][{name!r}]")
    if f"X_{key}" not in adata.obsm:
        raise _missing(f"adata.obsm['X_{key}']")
    if f"{key}_loadings" not in adata.varm:
        raise _missing(f"adata.varm['{key}_loadings']")
    names = [str(n) for n in np.ravel(meta["factor_names"])]
    if len(set(names)) != len(names):
        raise ValueError(f"adata.uns[{key!r}]['factor_names'] has duplicates: {names}")
    k = len(names)
    kinds = [str(x) for x in np.ravel(meta.get("factor_kinds", ["factor"] * k))]
    relevance = np.ravel(np.asarray(meta["relevance"], dtype=float))
    active = np.ravel(np.asarray(meta.get("active", [True] * k), dtype=bool))
    if not len(kinds) == len(relevance) == len(active) == k:
        raise ValueError(f"adata.uns[{key!r}]: factor_kinds, relevance and active must each have one entry per "
                         f"factor ({k} factor_names)")
    info = pd.DataFrame({"kind": kinds, "relevance": relevance, "active": active}, index=names)

    def table(matrix, index, columns, what):
        values = np.asarray(matrix)
        if values.shape != (len(index), len(columns)):
            raise ValueError(f"{what} has shape {values.shape}, expected {(len(index), len(columns))}")
        return pd.DataFrame(values, index=index, columns=columns)

    genes = adata.var_names.astype(str)
    scores = table(adata.obsm[f"X_{key}"], adata.obs_names.astype(str), names, f"adata.obsm['X_{key}']").astype(float)
    loadings = table(adata.varm[f"{key}_loadings"], genes, names, f"adata.varm['{key}_loadings']").astype(float)
    annotation = covariates = None
    if f"{key}_annotation" in adata.varm:
        annotation = table(adata.varm[f"{key}_annotation"], genes, names, f"adata.varm['{key}_annotation']")
        annotation = annotation.astype(bool)
    if f"{key}_covariate_effects" in adata.varm:
        effects = np.asarray(adata.varm[f"{key}_covariate_effects"], dtype=float)
        effects = effects.reshape(len(genes), -1)
        cov_names = [str(c) for c in np.ravel(meta.get("covariate_names", [f"covariate_{i}" for i in
                                                                            range(effects.shape[1])]))]
        covariates = table(effects, genes, cov_names, f"adata.varm['{key}_covariate_effects']")
    params = dict(meta.get("params", {}) or {})
    measure = str(meta.get("relevance_measure", "R^2"))
    return _Results(str(meta.get("model", key)), info, scores, loadings, annotation, covariates, params, measure)


def _save(fig_dir: Path, filename: str, draw, *args, **kwargs) -> str:
    """Draw with a :mod:`pathfactor.plot` function, save it as a PNG and close every figure it opened;
    returns the path relative to the report."""
    before = set(plt.get_fignums())
    try:
        ax = draw(*args, **kwargs)
        ax.figure.savefig(fig_dir / filename, dpi=110, bbox_inches="tight")
    finally:
        for num in set(plt.get_fignums()) - before:
            plt.close(num)
    return f"figures/{filename}"


def _img(src: str, alt: str) -> str:
    return f'<img src="{escape(src)}" alt="{escape(alt)}">'


def _genes(genes, limit: int = _MAX_LISTED) -> str:
    genes = list(genes)
    shown = ", ".join(escape(str(g)) for g in genes[:limit])
    more = f" … (+{len(genes) - limit} more)" if len(genes) > limit else ""
    return (shown + more) or "—"


def _kind_badge(kind: str) -> str:
    color = plot.KIND_COLORS.get(kind, "#999")
    return f'<span class="kind" style="background:{color}">{escape(kind)}</span>'


def _header(res: _Results, adata, title: str, color_by: str | None) -> str:
    counts = res.info["kind"].value_counts()
    kinds = ", ".join(f"{n} {escape(kind)}" for kind, n in counts.items())
    lines = [f"<b>Model:</b> {escape(res.model)}",
             f"<b>Data:</b> {adata.n_obs:,} cells × {adata.n_vars:,} genes",
             f"<b>Factors:</b> {len(res.info)} ({kinds}); <b>active:</b> {int(res.info['active'].sum())}"]
    if res.covariates is not None:
        lines.append(f"<b>Covariates:</b> {_genes(res.covariates.columns, 50)}")
    if color_by is not None:
        lines.append(f"<b>Cells grouped by:</b> {escape(color_by)}")
    params = ""
    if res.params:
        rows = "".join(f"<tr><th>{escape(str(k))}</th><td>{escape(str(v))}</td></tr>" for k, v in res.params.items())
        params = f"<details><summary>Fit parameters</summary><table>{rows}</table></details>"
    return f"<h1>{escape(title)}</h1>\n<p class='meta'>{'<br>'.join(lines)}</p>\n{params}"


def _how_to_read(res: _Results) -> str:
    relevance = ("the fraction of the expression variance the factor explains (R²)" if res.is_r2
                 else f"the model's own measure, {escape(res.measure)}")
    return f"""<h2>How to read this report</h2>
<div class="note"><p>Each factor is a gene program: a score per cell and a loading per gene. Annotated factors start
from a gene set and carry its name; <i>sparse</i> and <i>dense</i> factors are unannotated programs the data needed.
<b>Relevance</b> is {relevance}; only active factors get a section.</p>
<p>A gene is <b>active</b> in a factor when |w| &gt; {ACTIVE_FRACTION:g} × the factor's largest |w|. <b>Gained</b>
genes are active but not in the gene set (the data add them to the program); <b>lost</b> genes are in the gene set
but not active (the data do not support them). The sign of a factor is arbitrary: a positive loading means the gene
rises with the factor's score.</p></div>"""


def _gained_lost(name: str, res: _Results, refined: pd.DataFrame, top_genes: int) -> str:
    if name in refined.index:
        row = refined.loc[name]
        gained, lost = list(row["gained"]), list(row["lost"])
        return f"""<table>
<tr><th></th><th>genes</th><th>count</th></tr>
<tr><th>in gene set / active</th><td></td><td>{row['n_annotated']} / {row['n_active']}</td></tr>
<tr><th>gained (active, not in set; strongest first)</th><td class="gained">{_genes(gained)}</td><td>{len(gained)}</td></tr>
<tr><th>lost (in set, not active; weakest first)</th><td>{_genes(lost)}</td><td>{len(lost)}</td></tr>
</table>"""
    w = res.loadings[name]
    strength = w.abs()[active_mask(w.to_numpy()[:, None])[:, 0]].sort_values(ascending=False)
    signed = [f"{escape(g)} ({w[g]:+.2f})" for g in strength.index[:top_genes]]
    more = f" … (+{len(strength) - top_genes} more)" if len(strength) > top_genes else ""
    return f"<p>Unannotated factor; its {len(strength)} active genes, strongest first: {', '.join(signed)}{more}.</p>"


def _factor_section(rank: int, name: str, res: _Results, refined: pd.DataFrame, fig_dir: Path,
                    groups: pd.Series | None, top_genes: int) -> str:
    info = res.info.loc[name]
    stem = f"factor{rank:02d}_{re.sub(r'[^A-Za-z0-9_-]+', '_', name)[:60]}"
    annotated = res.annotation[name] if res.annotation is not None and res.annotation[name].any() else None
    figs = [_img(_save(fig_dir, f"{stem}_loadings.png", plot.top_loadings, res.loadings[name], annotated,
                       top=top_genes), f"top loadings of {name}"),
            _img(_save(fig_dir, f"{stem}_scores.png", plot.factor_scores, res.scores[name], groups),
                 f"scores of {name}")]
    return f"""<h2>{rank}. {escape(name)} {_kind_badge(info['kind'])}</h2>
<p>{_relevance_text(res, info['relevance'])}</p>
<div class="figs">{''.join(figs)}</div>
{_gained_lost(name, res, refined, top_genes)}"""


def _relevance_text(res: _Results, value: float) -> str:
    if res.is_r2:
        return f"Relevance R² = {value:.3g} ({100 * value:.1f}% of variance)."
    return f"Relevance ({escape(res.measure)}) = {value:.3g}."


def _covariate_section(effects: pd.DataFrame, top_genes: int) -> str:
    rows = []
    for cov in effects.columns:
        e = effects[cov].sort_values()
        up = [f"{escape(g)} ({v:+.2f})" for g, v in e[::-1].head(top_genes).items() if v > 0]
        down = [f"{escape(g)} ({v:+.2f})" for g, v in e.head(top_genes).items() if v < 0]
        cells = "".join(f"<td>{', '.join(genes) or '—'}</td>" for genes in (up, down))
        rows.append(f"<tr><th>{escape(cov)}</th>{cells}</tr>")
    return f"""<h2>Covariate effects</h2>
<p>Genes most shifted by each covariate (effect on expression, largest first); these are explained by the covariates,
not by the factors.</p>
<table><tr><th>covariate</th><th>up</th><th>down</th></tr>{''.join(rows)}</table>"""


def _violin_groups(groups: pd.Series) -> pd.Series:
    """Many-valued numeric groups become quintiles (an ordered categorical) for the violins."""
    if not pd.api.types.is_numeric_dtype(groups) or pd.api.types.is_bool_dtype(groups) or groups.nunique() <= 12:
        return groups
    bins = pd.qcut(groups, 5, duplicates="drop")
    labels = [f"Q{i + 1}: {b.left:.3g}–{b.right:.3g}" for i, b in enumerate(bins.cat.categories)]
    return bins.cat.rename_categories(labels).rename(f"{groups.name} (quintile)")


def write_report(adata, out_dir, key: str = "spex", color_by: str | None = None, top_factors: int = 8,
                 top_genes: int = 15, title: str | None = None) -> Path:
    """Write ``out_dir/report.html`` (PNG figures in ``out_dir/figures/``) about the results stored under ``key``.

    The page shows the factors' relevance, a section for each of the ``top_factors`` most relevant active factors
    (top loadings, scores by ``color_by``, gained/lost genes), a scatter of the two most relevant factors, and the
    covariate effects when present. Returns the path of the HTML file.
    """
    res = _load(adata, key)
    if color_by is not None and color_by not in adata.obs.columns:
        available = ", ".join(map(str, adata.obs.columns)) or "(none)"
        raise ValueError(f"color_by={color_by!r} is not a column of adata.obs; available columns: {available}")
    out_dir = Path(out_dir)
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    groups = adata.obs[color_by] if color_by is not None else None
    refined = (refined_annotations(res.loadings, res.annotation).set_index("term") if res.annotation is not None
               else pd.DataFrame(columns=["n_annotated", "n_active", "gained", "lost"]))

    ranked = res.info.sort_values("relevance", ascending=False)
    chosen = ranked.index[ranked["active"]][:top_factors].tolist()
    relevance_png = _save(fig_dir, "relevance.png", plot.relevance, ranked["relevance"], ranked["kind"],
                          measure=res.measure)
    sections = [_header(res, adata, title or f"pathfactor report: {res.model}", color_by), _how_to_read(res),
                f"<h2>Factor relevance</h2>\n<div class='figs'>{_img(relevance_png, 'factor relevance')}</div>"]
    violin_groups = _violin_groups(groups) if groups is not None else None
    sections += [_factor_section(i + 1, name, res, refined, fig_dir, violin_groups, top_genes)
                 for i, name in enumerate(chosen)]
    if not chosen:
        sections.append("<p>No factor is active, so there are no factor sections.</p>")
    pair = (chosen if len(chosen) >= 2 else ranked.index.tolist())[:2]
    if len(pair) == 2:
        png = _save(fig_dir, "scatter.png", plot.scores_scatter, res.scores[pair[0]], res.scores[pair[1]], groups)
        sections.append(f"<h2>The two most relevant factors</h2>\n"
                        f"<div class='figs'>{_img(png, 'factor scatter')}</div>")
    if res.covariates is not None and res.covariates.shape[1]:
        sections.append(_covariate_section(res.covariates, min(top_genes, 10)))

    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{escape(title or f"pathfactor report: {res.model}")}</title>
<style>{_CSS}</style></head>
<body>
{chr(10).join(sections)}
</body></html>
"""
    path = out_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
