"""The report's sections, each an HTML string built from :class:`results.Results`."""
from __future__ import annotations

from html import escape

import numpy as np
import pandas as pd

from .. import __version__, plot
from ..evaluate import ACTIVE_FRACTION, ONE_GENE_SHARE, active_mask
from . import html as h
from .results import VIEW_SHARE, Interventions, Results, expression, view_active

#: an intervention's effect on a factor is a call when its local false sign rate is below this
LFSR_CALL = 0.05
#: at most this many factors (rows) and levels (columns) in the interventions heatmap, and calls in its table
MAX_EFFECT_FACTORS, MAX_EFFECT_LEVELS, MAX_EFFECT_CALLS = 30, 40, 25
#: factors (rows) in the factors x views heatmap
MAX_VIEW_FACTORS = 20


def data_text(res: Results, adata) -> str:
    """What the model was fitted on: cells x genes, or the cells and each view's features and likelihood."""
    if res.views is None:
        left_out = int(res.fit.get("genes_left_out") or 0)
        if left_out:
            return (f"{adata.n_obs:,} cells × {adata.n_vars - left_out:,} genes fitted (those marked "
                    f"highly_variable of {adata.n_vars:,}; the others have zero loadings)")
        return f"{adata.n_obs:,} cells × {adata.n_vars:,} genes"
    parts = []
    for view, w in res.views.loadings.items():
        lik = res.views.likelihoods.get(view)
        measured = res.views.n_obs.get(view, adata.n_obs)
        extra = [lik] if lik else []
        if measured < adata.n_obs:
            extra.append(f"{measured:,} cells")
        more = "".join(f", {escape(e)}" for e in extra)
        parts.append(f"{escape(view)} ({len(w):,} features{more})")
    return f"{adata.n_obs:,} cells; {len(parts)} views: " + ", ".join(parts)


def header(res: Results, adata, title: str, groups: pd.Series | None, links: list[tuple[str, str]]) -> str:
    counts = res.info["kind"].value_counts()
    kinds = ", ".join(f"{n} {escape(kind)}" for kind, n in counts.items())
    lines = [f"<b>Model:</b> {escape(res.model)}",
             f"<b>Data:</b> {data_text(res, adata)}",
             f"<b>Factors:</b> {len(res.info)} ({kinds}); <b>active:</b> {int(res.info['active'].sum())}"]
    if res.covariates is not None:
        lines.append(f"<b>Covariates:</b> {h.genes(res.covariates.columns, 50)}")
    if res.interventions is not None:
        eff = res.interventions
        n = eff.effects.shape[1]
        lines.append(f"<b>Interventions:</b> {n} level{'s' * (n != 1)} against the reference "
                     f"<b>{escape(eff.reference)}</b>: {h.genes(eff.effects.columns, 8)}")
    if groups is not None:
        lines.append(f"<b>Cells grouped by:</b> {escape(str(groups.name))}")
    nav = " ".join(f'<a href="#{target}">{escape(text)}</a>' for target, text in links)
    return f"<h1>{escape(title)}</h1>\n<p class='meta'>{'<br>'.join(lines)}</p>\n<nav>{nav}</nav>"


def how_to_read(res: Results) -> str:
    relevance = ("the fraction of the expression variance the factor explains (R², shown in %)" if res.is_r2
                 else f"the model's own measure, {escape(res.measure)}")
    if res.views is not None:
        return f"""<div class="note"><p>The model has several views (modalities) of the same cells. Each factor is a
program shared across them: one score per cell and a loading per feature of every view. A factor may act in all
views or in some only: the <b>Factors × views</b> heatmap shows the share of each view's variance it explains.
<b>Relevance</b> is {relevance}; for several views, the largest share over the views.</p>
<p>A feature is <b>active</b> in a factor when |w| &gt; {ACTIVE_FRACTION:g} × the factor's largest |w| in the same
view (loadings of different views are on different scales), counted only in views where the factor explains at least
{100 * VIEW_SHARE:g} % of the variance. The sign of a factor is arbitrary: a positive loading means the feature rises
with the factor's score.</p></div>"""
    return f"""<div class="note"><p>Each factor is a gene program: a score per cell and a loading per gene. Annotated
factors start from a gene set and carry its name (↗ opens the gene set's page); <i>sparse</i> and <i>dense</i> factors
are unannotated programs the data needed. <b>Relevance</b> is {relevance}.</p>
<p>A gene is <b>active</b> in a factor when |w| &gt; {ACTIVE_FRACTION:g} × the factor's largest |w|. <b>Gained</b>
genes are active but not in the gene set (the data add them to the program); <b>lost</b> genes are in the gene set
but not active (the data do not support them). The sign of a factor is arbitrary: a positive loading means the gene
rises with the factor's score.</p></div>"""


# ---------------------------------------------------------------------------------------------- overview
def _bar(value: float, top: float, kind: str) -> str:
    width = 0.0 if top <= 0 or not np.isfinite(value) else max(0.0, value / top) * 6
    color = plot.KIND_COLORS.get(kind, "#999")
    return f'<span class="bar" style="width:{width:.2f}em;background:{color}"></span>'


def _one_gene_tag(gene: str) -> str:
    return (f' <span class="one-gene" title="more than {ONE_GENE_SHARE:.0%} of the factor\'s squared loadings are '
            f'on one gene: its score is mostly that gene\'s expression, not a program">one gene: {escape(gene)}</span>')


def _overview_row(rank: int, name: str, row, res: Results, sectioned: set, top: float) -> str:
    label = (f'<a href="#{h.anchor(name)}">{escape(name)}</a>' if name in sectioned else escape(name))
    if row.get("one_gene"):
        label += _one_gene_tag(row["one_gene"])
    cells = [f'<td class="num">{rank}</td>', f'<td class="name">{label}{h.external_link(name, res.urls)}</td>',
             f"<td>{h.kind_badge(row['kind'])}</td>", f'<td class="num">{h.count(row["set_size"])}</td>',
             f'<td class="num" title="{escape(res.measure)} = {row["relevance"]:.4g}">'
             f'{h.relevance_text(row["relevance"], res.is_r2)}{_bar(row["relevance"], top, row["kind"])}</td>',
             f'<td class="num">{h.count(row["n_active"])}</td>', f'<td class="num">{h.count(row["n_gained"])}</td>',
             f'<td class="num">{h.count(row["n_lost"])}</td>', f"<td>{'yes' if row['active'] else 'no'}</td>"]
    return f"<tr{'' if row['active'] else ' class=inactive'}>{''.join(cells)}</tr>"


def _views_overview_note(res: Results) -> str:
    if res.views is None:
        return ""
    return ("<p>Several views: <i>variance explained</i> is the factor's largest share of a view's variance; "
            "<i>active features</i> are counted in each view the factor acts in, then summed over the views.</p>\n")


def overview(table: pd.DataFrame, res: Results, sectioned: set) -> str:
    """Every factor, most relevant first."""
    top = float(np.nanmax(table["relevance"])) if len(table) else 0.0
    rows = "\n".join(_overview_row(i + 1, name, row, res, sectioned, top) for i, (name, row) in
                     enumerate(table.iterrows()))
    measure = "variance explained" if res.is_r2 else f"relevance ({escape(res.measure)})"
    if res.views is not None:
        measure = "variance explained (largest over views)"
    heads = ["#", "factor", "kind", "gene set (genes in data)", measure, "active genes", "gained", "lost", "active"]
    if res.views is not None:
        heads[5] = "active features (all views)"
    return f"""<h2 id="overview">All factors</h2>
<p>Every factor of the model, most relevant first. <i>Gene set</i>: genes of the factor's gene set present in the
data; <i>active genes</i>: genes with |w| &gt; {ACTIVE_FRACTION:g} × max |w|; <i>gained</i> / <i>lost</i>: active
genes outside the set / set genes that are not active; <i>one gene</i>: a factor with more than
{ONE_GENE_SHARE:.0%} of its squared loadings on one gene, whose score is mostly that gene's expression, not a
program. Inactive factors (greyed) explain almost nothing and get no section. Hover a relevance for its exact
value.</p>
{_views_overview_note(res)}<table class="overview"><thead><tr>{''.join(f'<th>{t}</th>' for t in heads)}</tr></thead>
<tbody>
{rows}
</tbody></table>"""


# ---------------------------------------------------------------------------------------------- factors
def _gained_lost(name: str, res: Results, refined: pd.DataFrame, top_genes: int) -> str:
    if name in refined.index:
        row = refined.loc[name]
        gained, lost = list(row["gained"]), list(row["lost"])
        note = ""
        if "p_gained" in row.index:  # each gene's posterior probability of membership beside it
            gained = [f"{g} ({p:.2f})" for g, p in zip(gained, row["p_gained"])]
            lost = [f"{g} ({p:.2f})" for g, p in zip(lost, row["p_lost"])]
            note = "<p class=\"note\">In brackets: the posterior probability that the gene is active in the factor.</p>"
        return f"""{note}<table>
<tr><th></th><th>genes</th><th>count</th></tr>
<tr><th>gained (active, not in set; strongest first)</th><td class="gained">{h.genes(gained)}</td>
<td>{len(gained)}</td></tr>
<tr><th>lost (in set, not active; weakest first)</th><td>{h.genes(lost)}</td><td>{len(lost)}</td></tr>
</table>"""
    w = res.loadings[name]
    strength = w.abs()[active_mask(w.to_numpy()[:, None])[:, 0]].sort_values(ascending=False)
    signed = [f"{escape(g)} ({w[g]:+.2f})" for g in strength.index[:top_genes]]
    more = f" … (+{len(strength) - top_genes} more)" if len(strength) > top_genes else ""
    return f"<p>Unannotated factor; its {len(strength)} active genes, strongest first: {', '.join(signed)}{more}.</p>"


def _facts(row, res: Results) -> str:
    facts = [f"relevance {h.relevance_text(row['relevance'], res.is_r2)}"
             + (" of a view's variance (the largest)" if res.views is not None
                else " of variance" if res.is_r2 else f" ({escape(res.measure)})")]
    if not np.isnan(row["set_size"]):
        facts.append(f"gene set: {h.count(row['set_size'])} genes in the data")
    facts.append(f"{h.count(row['n_active'])} active {'features' if res.views is not None else 'genes'}")
    if not np.isnan(row["n_gained"]):
        facts.append(f"{h.count(row['n_gained'])} gained, {h.count(row['n_lost'])} lost")
    return " · ".join(facts)


def _view_loadings(w: pd.Series, view: str, name: str, top: int):
    """A view's top loadings of a factor, narrower than a single view's (several sit side by side)."""
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=(4.6, plot._bar_height(min(top, len(w)))), layout="constrained")
    plot.top_loadings(w, None, top=top, ax=ax)
    ax.set_title(f"{view}: top features of {name}")
    return ax


def _views_shown(name: str, res: Results) -> list[str]:
    """The views a factor acts in (share at least VIEW_SHARE; NaN counts), largest share first."""
    share = res.views.relevance.loc[name]
    order = share.fillna(np.inf).sort_values(ascending=False, kind="stable")
    return [v for v in order.index if not share[v] < VIEW_SHARE]


def _view_active_lists(name: str, res: Results, active: pd.DataFrame, top_genes: int) -> str:
    """Per view, the factor's active features, strongest first (views it does not act in: one line)."""
    shown = _views_shown(name, res)
    rows = []
    for view in shown:
        w = res.views.loadings[view][name]
        keys = [f"{view}:{g}" for g in w.index]
        mask = active[name].reindex(keys).to_numpy(dtype=bool)
        strength = w.abs()[mask].sort_values(ascending=False)
        listed = [f"{escape(str(g))} ({w[g]:+.2f})" for g in strength.index[:top_genes]]
        more = f" … (+{len(strength) - top_genes} more)" if len(strength) > top_genes else ""
        rows.append(f"<tr><th>{escape(view)}</th><td>{', '.join(listed) or '—'}{more}</td>"
                    f'<td class="num">{len(strength):,}</td></tr>')
    quiet = [v for v in res.views.names if v not in shown]
    note = (f"<p>Not active in {', '.join(escape(v) for v in quiet)} (explains &lt; {100 * VIEW_SHARE:g} % of "
            f"the variance there).</p>" if quiet else "")
    table = ("<table><tr><th>view</th><th>active features, strongest first (loading)</th><th>count</th></tr>"
             + "".join(rows) + "</table>") if rows else ""
    return table + note


def _view_facts(name: str, res: Results) -> str:
    share = res.views.relevance.loc[name]
    return "share of each view's variance: " + ", ".join(
        f"{escape(v)} {h.relevance_text(share[v], True) if np.isfinite(share[v]) else 'n/a'}" for v in share.index)


def factor_section(rank: int, name: str, row, res: Results, refined: pd.DataFrame, groups, order, colors,
                   top_genes: int, collapsed: bool, active: pd.DataFrame | None = None) -> str:
    """A factor's top loadings, scores by group and gained/lost genes; ``collapsed`` wraps it in ``<details>``.
    A multi-view result gets the top loadings and active features of each view the factor acts in (``active``:
    :func:`view_active`)."""
    scores = h.figure(plot.factor_scores, res.scores[name], groups, order=order, colors=colors,
                      alt=f"scores of {name}")
    title = (f"{rank}. {escape(name)}{h.external_link(name, res.urls)} {h.kind_badge(row['kind'])}")
    if res.views is not None:
        per_view = max(5, min(top_genes, 10))
        figs = [h.figure(_view_loadings, res.views.loadings[v][name], v, name, per_view,
                         alt=f"top loadings of {name} in {v}") for v in _views_shown(name, res)]
        body = f"""<p class="facts">{_facts(row, res)}<br>{_view_facts(name, res)}</p>
<div class="figs">{''.join(figs)}{scores}</div>
{_view_active_lists(name, res, active if active is not None else view_active(res), top_genes)}"""
    else:
        annotated = res.annotation[name] if res.annotation is not None and res.annotation[name].any() else None
        figs = [h.figure(plot.top_loadings, res.loadings[name], annotated, top=top_genes,
                         alt=f"top loadings of {name}"), scores]
        body = f"""<p class="facts">{_facts(row, res)}</p>
<div class="figs">{''.join(figs)}</div>
{_gained_lost(name, res, refined, top_genes)}"""
    if collapsed:
        return (f'<details class="factor" id="{h.anchor(name)}"><summary>{title} '
                f'<span class="brief">{_facts(row, res)}</span></summary>\n{body}\n</details>')
    return f'<h3 id="{h.anchor(name)}">{title}</h3>\n{body}'


def factors(names: list[str], table: pd.DataFrame, res: Results, refined: pd.DataFrame, groups, order, colors,
            top_genes: int, n_open: int) -> str:
    """A section per factor in ``names``: the first ``n_open`` open, the rest collapsed."""
    if not names:
        return '<h2 id="factors">Factors</h2>\n<p>No factor is active, so there are no factor sections.</p>'
    active = view_active(res) if res.views is not None else None
    parts = [factor_section(i + 1, name, table.loc[name], res, refined, groups, order, colors, top_genes,
                            collapsed=i >= n_open, active=active) for i, name in enumerate(names)]
    if len(names) > n_open:
        parts.insert(n_open, f"<p>The other {len(names) - n_open} factors, by relevance (click to open):</p>")
    strongest = ("its strongest features in each view it acts in" if res.views is not None
                 else "its strongest genes (coloured by gene-set membership)")
    intro = (f"<p>Each active factor, most relevant first: {strongest} and "
             "its scores per cell" + (f" by {escape(str(groups.name))}" if groups is not None else "") + ".</p>")
    return '<h2 id="factors">Factors</h2>\n' + intro + "\n" + "\n".join(parts)


# ---------------------------------------------------------------------------------------------- cells
def umap(adata, res: Results, names: list[str], groups, order) -> str:
    img = h.figure(plot.embedding_panels, adata.obsm["X_umap"], res.scores[names], groups, order=order,
                   alt="UMAP coloured by the top factors")
    by = f" and by {escape(str(groups.name))}" if groups is not None else ""
    return f"""<h2 id="umap">UMAP</h2>
<p>The cells' UMAP (<code>obsm["X_umap"]</code>) coloured by the scores of the {len(names)} most relevant active
factors{by}. Red and blue are the two ends of a factor (its sign is arbitrary).</p>
<div class="figs">{img}</div>"""


def _heatmap_genes(res: Results, names: list[str], per_factor: int) -> pd.Series:
    """gene -> factor: the ``per_factor`` genes with the largest |loading| of each factor, each gene once."""
    picked: dict[str, str] = {}
    for name in names:
        top = res.loadings[name].abs().sort_values(ascending=False, kind="stable")
        for gene in [g for g in top.index if g not in picked][:per_factor]:
            picked[gene] = name
    return pd.Series(picked, dtype=object)


def heatmap(adata, res: Results, names: list[str], groups, order, per_factor: int = 5) -> str:
    """Mean expression per group of the top genes of the top factors (empty when it cannot be drawn)."""
    if groups is None or len(order) < 2 or not names:
        return ""
    genes = _heatmap_genes(res, names, per_factor)
    values, how = expression(adata, genes.index)
    if values is None:
        return ""
    img = h.figure(plot.group_heatmap, values, groups, order=order, blocks=genes, alt="heatmap of the top genes")
    return f"""<h2 id="heatmap">Top genes by {escape(str(groups.name))}</h2>
<p>The {per_factor} genes with the largest |loading| of each of the {len(names)} most relevant active factors
(labelled on the right). Each gene's expression ({escape(how)}) is z-scored across all cells; a cell shows the mean
z-score of each group, so red means higher than the gene's average over all cells, in standard deviations.</p>
<div class="figs">{img}</div>"""


def scatter(res: Results, pair: list[str], groups, order) -> str:
    img = h.figure(plot.scores_scatter, res.scores[pair[0]], res.scores[pair[1]], groups, order=order,
                   alt="factor scatter")
    return f'<h2 id="scatter">The two most relevant factors</h2>\n<div class="figs">{img}</div>'


def views(res: Results) -> str:
    """Heatmap of the share of each view's variance the most relevant factors explain (factors x views)."""
    rel = res.views.relevance
    n = min(len(rel), MAX_VIEW_FACTORS)
    img = h.figure(plot.views_heatmap, rel, top=MAX_VIEW_FACTORS, alt="share of each view's variance per factor")
    total = rel.sum(axis=0)
    totals = ", ".join(f"{escape(v)} {h.relevance_text(total[v], True)}" for v in rel.columns if np.isfinite(total[v]))
    shown = f"the {n} factors with the largest share in any view" if n < len(rel) else f"all {n} factors"
    return f"""<h2 id="views">Factors × views</h2>
<p>The share of each view's variance that each factor explains (in %, as MOFA reports it): for a view,
1 − ‖Y − x<sub>k</sub> w<sub>k</sub><sup>T</sup>‖² / ‖Y‖² over its measured entries (centred; for count and binary
views, of the fitted log-mean or logit). A factor with a large share in several views is a program the views share;
one with a share in a single view is specific to it. Rows: {shown}, most relevant first; columns: the views.
Summed over all factors: {totals or 'n/a'} (shares of different factors overlap when the factors are correlated, so the
sum is a guide only).</p>
<div class="figs">{img}</div>"""


def covariates(effects: pd.DataFrame, top_genes: int) -> str:
    rows = []
    for cov in effects.columns:
        e = effects[cov].sort_values()
        up = [f"{escape(g)} ({v:+.2f})" for g, v in e[::-1].head(top_genes).items() if v > 0]
        down = [f"{escape(g)} ({v:+.2f})" for g, v in e.head(top_genes).items() if v < 0]
        cells = "".join(f"<td>{', '.join(genes) or '—'}</td>" for genes in (up, down))
        rows.append(f"<tr><th>{escape(cov)}</th>{cells}</tr>")
    return f"""<h2 id="covariates">Covariate effects</h2>
<p>Genes most shifted by each covariate (effect on expression, largest first); these are explained by the covariates,
not by the factors.</p>
<table><tr><th>covariate</th><th>up</th><th>down</th></tr>{''.join(rows)}</table>"""


def _signed(value: float) -> str:
    """An effect with its sign: two decimals, or two significant digits when it is smaller than 0.1."""
    return f"{value:+.2f}" if not np.isfinite(value) or abs(value) >= 0.095 else f"{value:+.2g}"


def _lfsr_text(value: float) -> str:
    return "≈ 0" if value == 0 else h.significant(value)


def _effect_rows(eff: Interventions) -> pd.DataFrame:
    """One row per (factor, level): effect, sd, lfsr; most confident first (smallest lfsr, then largest |effect|)."""
    rows = pd.DataFrame({"effect": eff.effects.stack(), "sd": eff.sd.stack(), "lfsr": eff.lfsr.stack()})
    rows.index.names = ["factor", "level"]
    rows = rows.reset_index()
    rows["size"] = rows["effect"].abs()
    rows = rows.sort_values(["lfsr", "size"], ascending=[True, False], kind="stable", na_position="last")
    return rows.drop(columns="size").reset_index(drop=True)


def _effects_shown(eff: Interventions) -> tuple[list, list, bool]:
    """The heatmap's factors and levels, and whether any effect is a call: the factors with a call (lfsr <
    LFSR_CALL), most confident first, at most MAX_EFFECT_FACTORS (without any call the 10 most confident); every
    level, or beyond MAX_EFFECT_LEVELS those with calls, most confident first."""
    lfsr = eff.lfsr.fillna(1.0)
    best = lfsr.min(axis=1)
    size = eff.effects.abs().max(axis=1)
    ranked = pd.DataFrame({"lfsr": best, "size": -size}).sort_values(["lfsr", "size"], kind="stable").index
    called = bool((lfsr < LFSR_CALL).to_numpy().any())
    factors = [f for f in ranked if best[f] < LFSR_CALL][:MAX_EFFECT_FACTORS] if called else list(ranked[:10])
    levels = list(eff.effects.columns)
    if len(levels) > MAX_EFFECT_LEVELS:
        sub = lfsr.loc[factors]
        level_best = sub.min(axis=0).sort_values(kind="stable")
        levels = [lv for lv in level_best.index if level_best[lv] < LFSR_CALL][:MAX_EFFECT_LEVELS]
        levels = levels or list(level_best.index[:MAX_EFFECT_LEVELS])
    return factors, levels, called


def _leading_genes(loadings: pd.DataFrame, factor: str, effect: float, one_gene: str = "", n: int = 3) -> str:
    """The ``n`` genes with the largest loadings on ``factor``, each with the way the effect moves it (the sign of
    w_gk beta_lk: its share of the level's shift of the gene, seed 000's W beta); a one-gene factor says so."""
    if factor not in loadings.columns:
        return ""
    w = loadings[factor]
    top = [g for g in w.abs().nlargest(n).index if w[g] != 0]
    tag = _one_gene_tag(one_gene) if one_gene else ""
    if not effect or not np.isfinite(effect):  # no shift: the genes, no direction
        return ", ".join(escape(str(g)) for g in top) + tag
    return ", ".join(f"{escape(str(g))} {'↑' if w[g] * effect > 0 else '↓'}" for g in top) + tag


def interventions(eff: Interventions, sectioned: set, loadings: pd.DataFrame, one_gene: pd.Series) -> str:
    """Heatmap of the interventions' effects on the factors with their calls, and a table of the strongest calls
    with each factor's leading genes (``one_gene``: the overview's column, a one-gene factor's gene or "")."""
    n_factors, n_levels = eff.effects.shape
    factors, levels, called = _effects_shown(eff)
    ref = escape(eff.reference)
    img = h.figure(plot.intervention_heatmap, eff.effects.loc[factors, levels], eff.lfsr.loc[factors, levels],
                   threshold=LFSR_CALL, reference=eff.reference, alt="effects of the interventions on the factors")
    rows = _effect_rows(eff)
    calls = rows[rows["lfsr"] < LFSR_CALL]
    n_calls = len(calls)
    shown = (calls if called else rows).head(MAX_EFFECT_CALLS if called else 10)
    if called:
        picked = (f"the {len(factors)} factors that some intervention moves with lfsr &lt; {LFSR_CALL:g}"
                  + (f" (the {MAX_EFFECT_FACTORS} most confident of {int((eff.lfsr.min(axis=1) < LFSR_CALL).sum())})"
                     if len(factors) == MAX_EFFECT_FACTORS else "") + ", most confident first")
    else:
        picked = (f"no intervention moves any factor with lfsr &lt; {LFSR_CALL:g}; shown are the "
                  f"{len(factors)} factors with the smallest lfsr")
    if len(levels) < n_levels:
        picked += (f"; {len(levels)} of the {n_levels} levels, "
                   + ("those with calls" if called else "those with the smallest lfsr") + ", most confident first")

    def label(name: str) -> str:
        return f'<a href="#{h.anchor(name)}">{escape(name)}</a>' if name in sectioned else escape(name)

    def genes(r) -> str:
        return _leading_genes(loadings, str(r.factor), r.effect, one_gene.get(r.factor, ""))

    body = "\n".join(
        f'<tr><td class="name">{label(str(r.factor))}</td><td>{escape(str(r.level))}</td>'
        f'<td class="num">{_signed(r.effect)}</td><td class="num">{h.significant(r.sd)}</td>'
        f'<td class="num">{_lfsr_text(r.lfsr)}</td><td>{genes(r)}</td></tr>' for r in shown.itertuples())
    caption = (f"The {len(shown)} strongest of {n_calls} calls (lfsr &lt; {LFSR_CALL:g}), most confident first:"
               if called else "The 10 effects with the smallest lfsr (none is a call):")
    return f"""<h2 id="interventions">Interventions</h2>
<p>How each intervention level moves the factors, against the reference level <b>{ref}</b>
({n_levels} level{'s' * (n_levels != 1)} × {n_factors} factors). An effect is the shift of a factor's mean in the level's cells, in units
of the factor's spread within a level (posterior mean after adaptive shrinkage, which keeps effects the data do
not support at 0), in the factor's own orientation: positive means the level raises the factor's score. The <b>lfsr</b> (local false sign
rate) is the posterior probability that the effect's sign is wrong; a dot marks the effects with
lfsr &lt; {LFSR_CALL:g} (<i>calls</i>). Shown: {picked}. <b>Leading genes</b>: the factor's three largest
loadings, with the way the effect moves each gene (↑ up, ↓ down); read an effect with its genes, since genes shared
by several gene sets can carry one response into several factors.</p>
<div class="figs">{img}</div>
<p>{caption}</p>
<table><tr><th>factor</th><th>level</th><th>effect</th><th>sd</th><th>lfsr</th><th>leading genes</th></tr>
{body}
</table>"""


# ---------------------------------------------------------------------------------------------- methods
def _param(name: str, value) -> str:
    return f"<code>{escape(name)}={escape(repr(value) if isinstance(value, str) else str(value))}</code>"


def _training(fit: dict) -> str:
    seed = "not recorded" if fit.get("seed") is None else escape(str(fit["seed"]))
    epochs = fit.get("n_epochs")
    converged = fit.get("converged")
    if converged is None:
        state = "convergence not recorded" + (f" ({epochs} epochs)" if epochs is not None else "")
    elif bool(converged):
        state = "converged" + (f" after {epochs} epochs" if epochs is not None else "")
    else:
        state = ("did not converge" + (f" within {epochs} epochs" if epochs is not None else "")
                 + ": read the results with care")
    return f"Random seed: {seed}. Training: {state}."


def _relevance_method(res: Results) -> str:
    if res.views is not None:
        return ("Relevance is the largest over the views of each factor's share of a view's variance, "
                "1 − ‖Y<sub>v</sub> − x<sub>k</sub> w<sub>vk</sub><sup>T</sup>‖² / ‖Y<sub>v</sub>‖² for the centred "
                "data Y<sub>v</sub> of view v over its measured entries (for count and binary views, the fitted "
                "log-mean or logit in place of Y<sub>v</sub>)")
    if res.is_r2:
        return ("Relevance is the R² of each factor alone, "
                "1 − ‖Y − x<sub>k</sub> w<sub>k</sub><sup>T</sup>‖² / ‖Y‖² "
                "for the centred data Y, i.e. the fraction of the variance it explains")
    return f"Relevance is the model's own measure, {escape(res.measure)}"


def methods(res: Results, adata) -> str:
    version = res.fit.get("version")
    version_text = (f"pathfactor {escape(str(version))}" if version is not None
                    else "pathfactor (version not recorded)")
    params = ", ".join(_param(k, v) for k, v in res.params.items()) or "parameters not recorded"
    kinds = res.info["kind"].value_counts()
    n_sets = int(kinds.get("annotated", 0))
    data = (f"{data_text(res, adata)}; {len(res.info)} factors"
            + (f", {n_sets} of them from gene sets" if n_sets else ""))
    return f"""<h2 id="methods">Methods</h2>
<div class="methods"><p>Gene programs were inferred with {version_text} using the {escape(res.model)} model
({params}). {_training(res.fit)} Data: {data}. {_relevance_method(res)}; a factor is flagged active by the model
(for pathfactor's models: R² above 10<sup>−4</sup>). {_active_method(res)}{_interventions_method(res)} Report written by pathfactor {escape(__version__)}.</p></div>"""


def _active_method(res: Results) -> str:
    if res.views is not None:
        return (f"A feature is active in a factor when |w| &gt; {ACTIVE_FRACTION:g} × the factor's largest |w| in "
                f"the feature's view, in the views where the factor explains at least {100 * VIEW_SHARE:g} % of the "
                "variance. The per-group heatmap of top genes is left out for several views (their loadings and "
                "data are on different scales).")
    return (f"A gene is active in a factor when |w| &gt; {ACTIVE_FRACTION:g} × the factor's largest |w|; gained and "
            "lost genes compare the active genes with the gene set.")


def _interventions_method(res: Results) -> str:
    if res.interventions is None:
        return ""
    return (" Interventions act on the factors: each cell's factors are centred on its intervention level's effect "
            f"against the reference level {escape(res.interventions.reference)}; the effects' estimates are shrunk "
            "by adaptive shrinkage (a point mass at zero and a mixture of normals learned from all the effects, "
            "Stephens 2017), which also gives their local false sign rates (lfsr).")
