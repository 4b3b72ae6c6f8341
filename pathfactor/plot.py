"""Matplotlib figures of a fitted model's results: relevance, loadings and factor scores.

Every function takes plain pandas objects (no AnnData), draws on ``ax`` (or on a new figure sized to its
content) and returns the Axes. Nothing here selects a backend: without a display matplotlib falls back to Agg.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from .evaluate import ACTIVE_FRACTION, active_mask

__all__ = ["relevance", "top_loadings", "factor_scores", "scores_scatter", "embedding_panels", "group_heatmap",
           "intervention_heatmap", "views_heatmap", "group_order", "group_colors", "KIND_COLORS"]

#: Colour of each factor kind; other kinds get grey.
KIND_COLORS = {"annotated": "#3b75af", "sparse": "#ef8636", "dense": "#8c8c8c"}
_OTHER = "#b5b5b5"
# top_loadings marks
_KEPT, _GAINED, _PLAIN = "#3b75af", "#d9531e", "#c4c4c4"


def _axes(ax, width: float, height: float):
    if ax is None:
        _, ax = plt.subplots(figsize=(width, height), layout="constrained")
    return ax


def _bar_height(n: int) -> float:
    return min(1.2 + 0.28 * n, 12.0)


def relevance(relevance: pd.Series, kinds: pd.Series | None = None, top: int = 20, ax=None,
              measure: str = "R²"):
    """Horizontal bars of the ``top`` most relevant factors (R^2, indexed by factor name), most relevant on
    top, coloured by factor kind (``kinds``: factor name -> "annotated" | "sparse" | "dense")."""
    values = pd.Series(relevance, dtype=float).dropna().sort_values(ascending=False).head(top)
    ax = _axes(ax, 6.5, _bar_height(len(values)))
    y = np.arange(len(values))
    if kinds is not None:
        kind = pd.Series(kinds).reindex(values.index).astype(str)
        colors = [KIND_COLORS.get(k, _OTHER) for k in kind]
    else:
        colors = [KIND_COLORS["annotated"]] * len(values)
    ax.barh(y, values.to_numpy(), color=colors)
    ax.set_yticks(y, [str(name) for name in values.index])
    ax.invert_yaxis()
    ax.set_xlabel("relevance (R², fraction of variance explained)" if measure in ("R²", "R^2") else
                  f"relevance ({measure})")
    ax.set_title("Factor relevance")
    ax.spines[["top", "right"]].set_visible(False)
    if kinds is not None and len(values):
        present = list(dict.fromkeys(kind))
        ax.legend(handles=[Patch(color=KIND_COLORS.get(k, _OTHER), label=k) for k in present],
                  title="kind", loc="lower right", frameon=False)
    return ax


def top_loadings(loadings: pd.Series, annotated: pd.Series | None = None, top: int = 15, ax=None,
                 n_lost: int = 3, fraction: float = ACTIVE_FRACTION):
    """The ``top`` genes with the largest |loading| of one factor as horizontal bars.

    With ``annotated`` (gene -> bool, the factor's prior gene set) the bars are coloured as annotated-and-active,
    *gained* (active but not annotated) or neither, and the ``n_lost`` strongest *lost* genes (annotated but not
    active) are appended as hollow hatched bars with an open circle. Active: ``|w| > fraction * max |w|``.
    """
    w = pd.Series(loadings, dtype=float).fillna(0.0)
    active = pd.Series(active_mask(w.to_numpy()[:, None], fraction)[:, 0], index=w.index)
    ann = (pd.Series(False, index=w.index) if annotated is None
           else pd.Series(annotated).reindex(w.index, fill_value=False).astype(bool))
    strength = w.abs()
    genes = strength.sort_values(ascending=False, kind="stable").head(top).index.tolist()
    lost = strength[ann & ~active].drop(genes, errors="ignore").sort_values(ascending=False).head(n_lost)
    genes += lost.index.tolist()

    ax = _axes(ax, 6.0, _bar_height(len(genes)))
    y = np.arange(len(genes))
    handles = {}
    for yi, gene in zip(y, genes):
        value, is_ann, is_active = w[gene], ann[gene], active[gene]
        if is_ann and not is_active:
            ax.barh(yi, value, facecolor="none", edgecolor=_KEPT, hatch="///")
            ax.plot(value, yi, "o", mfc="white", mec=_KEPT, ms=6)
            handles["lost"] = (Line2D([], [], marker="o", ls="", mfc="white", mec=_KEPT),
                               "lost: annotated, not active")
            continue
        if is_ann:
            color, label, text = _KEPT, "kept", "annotated and active"
        elif is_active and annotated is not None:
            color, label, text = _GAINED, "gained", "gained: active, not annotated"
        elif is_active:
            color, label, text = _KEPT, "active", "active"
        else:
            color, label = _PLAIN, "plain"
            text = "not active" if annotated is None else "not annotated, not active"
        ax.barh(yi, value, color=color)
        handles[label] = (Patch(color=color), text)
    ax.set_yticks(y, [str(g) for g in genes])
    if annotated is not None:
        for tick, gene in zip(ax.get_yticklabels(), genes):
            if active[gene] and not ann[gene]:
                tick.set_color(_GAINED)
                tick.set_fontweight("bold")
    ax.invert_yaxis()
    threshold = fraction * strength.max()
    if threshold > 0:
        for x in (-threshold, threshold):
            ax.axvline(x, color="0.4", ls="--", lw=0.8)
        handles["threshold"] = (Line2D([], [], color="0.4", ls="--", lw=0.8),
                                f"active threshold ({fraction:g} × max |w|)")
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("loading")
    ax.set_title(f"Top genes of {w.name}" if w.name is not None else "Top genes")
    ax.spines[["top", "right"]].set_visible(False)
    if handles:
        order = ["kept", "active", "gained", "lost", "plain", "threshold"]
        marks = [handles[k] for k in order if k in handles]
        ax.legend([h for h, _ in marks], [t for _, t in marks], loc="upper center",
                  bbox_to_anchor=(0.5, -0.12 - 0.4 / max(len(genes), 1)), ncol=2, frameon=False, fontsize="small")
    return ax


def _as_groups(groups, index: pd.Index) -> pd.Series:
    """``groups`` as a Series on ``index``, matched by position (as obs columns and obsm rows are)."""
    g = groups.reset_index(drop=True) if isinstance(groups, pd.Series) else pd.Series(groups)
    if len(g) != len(index):
        raise ValueError(f"groups has {len(g)} values but there are {len(index)} cells")
    g.index = index
    return g


def group_order(groups) -> list:
    """The one order of groups for every figure: a categorical's categories (those present, in their order),
    otherwise the sorted distinct values (numbers numerically, anything else as text)."""
    g = pd.Series(groups)
    if isinstance(g.dtype, pd.CategoricalDtype):
        present = set(g.dropna().unique())
        return [c for c in g.cat.categories if c in present]
    values = g.dropna().unique().tolist()
    numeric = pd.api.types.is_numeric_dtype(g.dtype) and not pd.api.types.is_bool_dtype(g.dtype)
    return sorted(values) if numeric else sorted(values, key=str)


def group_colors(order) -> dict:
    """A colour per group, by position in ``order`` (tab10, tab20 beyond ten groups)."""
    cmap = plt.get_cmap("tab10" if len(order) <= 10 else "tab20")
    return {group: cmap(i % cmap.N) for i, group in enumerate(order)}


def _group_order(values: pd.Series, groups: pd.Series, sort: str) -> list:
    ordered = isinstance(groups.dtype, pd.CategoricalDtype) and groups.cat.ordered
    if sort == "median" and not ordered:
        return values.groupby(groups, observed=True).median().sort_values(ascending=False).index.tolist()
    return group_order(groups)


def factor_scores(scores: pd.Series, groups: pd.Series | None = None, ax=None, sort: str = "median",
                  max_points: int = 1500, seed: int = 0, order=None, colors: dict | None = None):
    """Factor scores per cell: violins with jittered points, one per group (``sort="median"``: highest median
    first; ``"label"``: category / alphabetical order; ordered categoricals keep their order; ``order``, a list
    of groups, overrides ``sort``). ``colors`` (group -> colour) colours the violins. Without ``groups``, a
    histogram."""
    s = pd.Series(scores, dtype=float)
    name = s.name if s.name is not None else "score"
    if groups is None:
        ax = _axes(ax, 5.0, 3.2)
        ax.hist(s.dropna().to_numpy(), bins=40, color=KIND_COLORS["annotated"])
        ax.set_xlabel(f"{name} score")
        ax.set_ylabel("cells")
        ax.spines[["top", "right"]].set_visible(False)
        return ax
    g = _as_groups(groups, s.index)
    keep = g.notna() & s.notna()
    s, g = s[keep], g[keep]
    order = _group_order(s, g, sort) if order is None else [o for o in order if (g == o).any()]
    ax = _axes(ax, max(4.0, 1.0 + 0.55 * len(order)), 3.6)
    low, high = _robust_limits(s.to_numpy())
    rng = np.random.default_rng(seed)
    alpha = float(np.clip(400 / max(len(s) / max(len(order), 1), 1), 0.15, 0.5))
    for i, group in enumerate(order):
        v = s[(g == group).to_numpy()].to_numpy()
        inside = v[(v >= low) & (v <= high)]
        if len(inside) > 1 and np.ptp(inside) > 0:
            parts = ax.violinplot(inside, positions=[i], widths=0.8, showextrema=False)
            for body in parts["bodies"]:
                color = (colors or {}).get(group, KIND_COLORS["annotated"])
                body.set(facecolor=color, edgecolor="none", alpha=0.45 if colors else 0.35)
        shown = v if len(v) <= max_points else rng.choice(v, max_points, replace=False)
        ax.scatter(i + rng.uniform(-0.18, 0.18, len(shown)), np.clip(shown, low, high), s=4, color="0.15",
                   alpha=alpha, lw=0)
        for edge, marker in ((low, "v"), (high, "^")):
            off = (v < low) if marker == "v" else (v > high)
            if off.any():
                ax.plot(i, edge, marker, color="0.15", ms=5)
        ax.hlines(np.median(v), i - 0.3, i + 0.3, color="black", lw=1.5)
    off_scale = int(((s < low) | (s > high)).sum())
    if off_scale:
        ax.set_ylim(low - 0.04 * (high - low), high + 0.04 * (high - low))
        ax.text(0.0, 1.0, f"▲▼ {off_scale} cell{'s' if off_scale > 1 else ''} off scale, drawn at the edge",
                transform=ax.transAxes, va="bottom", fontsize=7, color="0.3")
    ax.set_xticks(np.arange(len(order)), [str(o) for o in order], rotation=45 if len(order) > 4 else 0,
                  ha="right" if len(order) > 4 else "center")
    ax.set_ylabel(_wrap(f"{name} score", 30))
    if g.name is not None:
        ax.set_xlabel(str(g.name))
    ax.spines[["top", "right"]].set_visible(False)
    return ax


def _robust_limits(values: np.ndarray, tail: float = 0.005, pad: float = 0.3) -> tuple[float, float]:
    """Axis limits that keep all but far outliers: the central 99 % of ``values`` (at least all but the most
    extreme value on each side) widened by ``pad`` of its range on each side, never beyond the data."""
    values = values[np.isfinite(values)]
    if not len(values):
        return -1.0, 1.0
    lo, hi = np.quantile(values, tail, method="higher"), np.quantile(values, 1 - tail, method="lower")
    span = (hi - lo) or 1.0
    return max(lo - pad * span, values.min()), min(hi + pad * span, values.max())


def scores_scatter(x: pd.Series, y: pd.Series, groups=None, ax=None, s: float | None = None, order=None):
    """Two factors' scores against each other, coloured by ``groups``: categorical groups get a palette and a
    legend (in ``order``, by default :func:`group_order`), numeric groups a colourbar. Far outliers are drawn at
    the edge (see :func:`factor_scores`)."""
    x, y = pd.Series(x, dtype=float), pd.Series(y, dtype=float)
    (x_lo, x_hi), (y_lo, y_hi) = _robust_limits(x.to_numpy()), _robust_limits(y.to_numpy())
    off_scale = int(((x < x_lo) | (x > x_hi) | (y < y_lo) | (y > y_hi)).sum())
    x, y = x.clip(x_lo, x_hi), y.clip(y_lo, y_hi)
    ax = _axes(ax, 6.2, 4.6)
    size = s if s is not None else float(np.clip(3000 / max(len(x), 1), 2, 30))
    if groups is None:
        ax.scatter(x, y, s=size, color=KIND_COLORS["annotated"], lw=0, alpha=0.7)
    else:
        x, y = x.reset_index(drop=True), y.reset_index(drop=True)
        g = _as_groups(groups, x.index)
        numeric = pd.api.types.is_numeric_dtype(g.dtype) and not pd.api.types.is_bool_dtype(g.dtype)
        if numeric:
            points = ax.scatter(x, y, c=g.to_numpy(dtype=float), s=size, cmap="viridis", lw=0)
            ax.figure.colorbar(points, ax=ax, label=str(g.name) if g.name is not None else None)
        else:
            order = group_order(g) if order is None else list(order)
            for group, color in group_colors(order).items():
                idx = (g == group).to_numpy()
                if idx.any():
                    ax.scatter(x.to_numpy()[idx], y.to_numpy()[idx], s=size, color=color, lw=0, alpha=0.8,
                               label=str(group))
            ax.legend(title=str(g.name) if g.name is not None else None, loc="upper left", bbox_to_anchor=(1.01, 1),
                      frameon=False, markerscale=max(1.0, 30 / size) ** 0.5, fontsize="small")
    if off_scale:
        ax.text(0.0, 1.0, f"{off_scale} cell{'s' if off_scale > 1 else ''} off scale, drawn at the edge",
                transform=ax.transAxes, va="bottom", fontsize=7, color="0.3")
    ax.set_xlabel(str(x.name) if x.name is not None else "factor 1")
    ax.set_ylabel(str(y.name) if y.name is not None else "factor 2")
    ax.spines[["top", "right"]].set_visible(False)
    return ax


def _wrap(name: str, width: int = 26) -> str:
    """``name`` broken into lines of at most ``width`` characters at underscores (long gene-set names)."""
    lines, line = [], ""
    for part in str(name).split("_"):
        piece = part if not line else f"{line}_{part}"
        if line and len(piece) > width:
            lines.append(line + "_")
            line = part
        else:
            line = piece
    return "\n".join([*lines, line])


def _subsample(n: int, max_points: int, seed: int) -> np.ndarray:
    if n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))


def _colorbar(ax, points) -> None:
    """A slim colour bar just right of ``ax`` that leaves every panel the same size."""
    bar = ax.figure.colorbar(points, cax=ax.inset_axes([1.03, 0.12, 0.045, 0.76]))
    bar.ax.tick_params(labelsize=7)


def _score_panel(ax, xy: np.ndarray, values: np.ndarray, size: float, title: str) -> None:
    """One embedding coloured by a factor's scores: diverging around 0 when the scores take both signs."""
    order = np.argsort(np.abs(values))  # strongest cells on top
    lo, hi = np.nanpercentile(values, [1, 99])
    if lo < 0 < hi:
        limit = max(-lo, hi)
        style = dict(cmap="RdBu_r", vmin=-limit, vmax=limit)
    else:
        style = dict(cmap="viridis", vmin=lo, vmax=hi)
    points = ax.scatter(xy[order, 0], xy[order, 1], c=values[order], s=size, lw=0, rasterized=True, **style)
    _colorbar(ax, points)
    ax.set_title(_wrap(title), fontsize=8.5)


def _group_panel(ax, xy: np.ndarray, groups: pd.Series, order, size: float) -> None:
    """One embedding coloured by the cells' groups (same colours and order as every other figure); the legend
    goes right of the whole figure."""
    name = str(groups.name) if groups.name is not None else "group"
    numeric = pd.api.types.is_numeric_dtype(groups.dtype) and not pd.api.types.is_bool_dtype(groups.dtype)
    if numeric and not isinstance(groups.dtype, pd.CategoricalDtype):
        points = ax.scatter(xy[:, 0], xy[:, 1], c=groups.to_numpy(dtype=float), s=size, lw=0, cmap="viridis",
                            rasterized=True)
        _colorbar(ax, points)
    else:
        values = groups.to_numpy()
        for group, color in group_colors(order).items():
            idx = values == group
            ax.scatter(xy[idx, 0], xy[idx, 1], s=size, color=color, lw=0, label=str(group), rasterized=True)
        ax.figure.legend(*ax.get_legend_handles_labels(), title=name, loc="upper left", bbox_to_anchor=(0.985, 0.93),
                         frameon=False, fontsize=8, title_fontsize=8.5, markerscale=max(1.0, 36 / size) ** 0.5,
                         ncol=1 if len(order) <= 16 else 2)
    ax.set_title(_wrap(name), fontsize=8.5)


def embedding_panels(embedding, scores: pd.DataFrame, groups=None, order=None, ncols: int = 4,
                     basis: str = "UMAP", max_points: int = 20000, seed: int = 0):
    """Small multiples of a 2-D embedding (cells x 2, e.g. ``obsm["X_umap"]``): one panel coloured by ``groups``
    (if given, groups in ``order``) and one per column of ``scores`` (cells x factors). Returns the Figure."""
    xy = np.asarray(embedding, dtype=float)[:, :2]
    scores = pd.DataFrame(scores)
    if len(scores) != len(xy):
        raise ValueError(f"embedding has {len(xy)} cells but scores have {len(scores)}")
    keep = _subsample(len(xy), max_points, seed)
    n_panels = scores.shape[1] + (groups is not None)
    ncols = max(1, min(ncols, n_panels))
    nrows = int(np.ceil(n_panels / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.9 * ncols, 2.8 * nrows), squeeze=False,
                             gridspec_kw=dict(wspace=0.32, hspace=0.32, left=0.03, right=0.9, top=0.93, bottom=0.05))
    size = float(np.clip(6000 / max(len(keep), 1), 0.5, 20))
    flat = list(axes.ravel())
    if groups is not None:
        g = _as_groups(groups, pd.RangeIndex(len(xy))).iloc[keep]
        _group_panel(flat.pop(0), xy[keep], g, group_order(g) if order is None else list(order), size)
    for name in scores.columns:
        _score_panel(flat.pop(0), xy[keep], scores[name].to_numpy(dtype=float)[keep], size, str(name))
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_aspect("equal", adjustable="datalim")
    for ax in flat:
        ax.set_visible(False)
    axes[-1, 0].set_xlabel(f"{basis} 1", fontsize=8)
    axes[-1, 0].set_ylabel(f"{basis} 2", fontsize=8)
    return fig


def group_heatmap(expression: pd.DataFrame, groups, order=None, blocks: pd.Series | None = None, ax=None):
    """Each gene's (columns of ``expression``, cells x genes) mean per group of its expression z-scored across all
    cells, so that 0 is the gene's mean and ±1 one standard deviation over cells; groups as columns in ``order``
    (default :func:`group_order`). ``blocks`` (gene -> label, e.g. the factor a gene was picked for) labels
    consecutive runs of genes on the right."""
    expression = pd.DataFrame(expression)
    g = _as_groups(groups, expression.index)
    order = group_order(g) if order is None else [o for o in order if (g == o).any()]
    sd = expression.std(axis=0, ddof=0).replace(0, np.nan)
    scaled = expression.sub(expression.mean(axis=0), axis=1).div(sd, axis=1).fillna(0.0)
    z = scaled.groupby(g.to_numpy(), sort=False).mean().reindex(order).T  # genes x groups
    n_genes, n_groups = z.shape
    ax = _axes(ax, 2.4 + 0.42 * n_groups + (2.2 if blocks is not None else 0), 1.4 + 0.2 * n_genes)
    limit = max(0.5, float(np.abs(z.to_numpy()).max()))
    image = ax.imshow(z.to_numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto", interpolation="nearest")
    rotate = n_groups > 4 or max((len(str(o)) for o in order), default=0) > 8
    ax.set_xticks(np.arange(n_groups), [str(o) for o in order], rotation=45 if rotate else 0,
                  ha="right" if rotate else "center", fontsize=8)
    ax.set_yticks(np.arange(n_genes), [str(gene) for gene in z.index], fontsize=7.5)
    ax.tick_params(length=0)
    strip = ax.inset_axes([0, 1.01, 1, 0.025 * 30 / max(n_genes, 10)])
    colors = group_colors(order)
    strip.imshow([[colors[o] for o in order]], aspect="auto")
    strip.set_axis_off()
    if blocks is not None:
        _label_blocks(ax, pd.Series(blocks).reindex(z.index).astype(str).to_numpy())
    ax.figure.colorbar(image, ax=ax, location="bottom", shrink=0.6, aspect=25, pad=0.02,
                       label="mean z-score of expression")
    if g.name is not None:
        ax.set_title(str(g.name), fontsize=9, pad=12)
    return ax


def _label_blocks(ax, labels: np.ndarray) -> None:
    """Separator lines between runs of equal ``labels`` (rows) and each run's label at its middle, on the right."""
    starts = [0] + [i for i in range(1, len(labels)) if labels[i] != labels[i - 1]]
    ends = starts[1:] + [len(labels)]
    for start in starts[1:]:
        ax.axhline(start - 0.5, color="white", lw=2)
    right = ax.secondary_yaxis("right")
    right.set_yticks([(s + e - 1) / 2 for s, e in zip(starts, ends)], [_wrap(labels[s], 30) for s in starts],
                     fontsize=7.5)
    right.tick_params(length=0)
    right.spines["right"].set_visible(False)


def intervention_heatmap(effects: pd.DataFrame, lfsr: pd.DataFrame | None = None, threshold: float = 0.05,
                         reference: str | None = None, ax=None):
    """Effects of interventions on factors (``effects``: factors x levels, e.g. a model's
    ``intervention_effects_``) as a heatmap with a diverging colour map centred at 0, rows and columns in the
    given order; a dot marks each effect whose local false sign rate (``lfsr``, same shape) is below
    ``threshold``. ``reference``: the level the effects are measured against, named in the title."""
    effects = pd.DataFrame(effects).astype(float)
    values = effects.to_numpy()
    n_factors, n_levels = values.shape
    longest = max((len(str(lv)) for lv in effects.columns), default=0)
    ax = _axes(ax, 2.6 + 0.38 * n_levels, 1.6 + 0.24 * n_factors + 0.06 * min(longest, 30))
    finite = np.abs(values[np.isfinite(values)])
    limit = max(float(finite.max()) if finite.size else 0.0, 1e-6)
    image = ax.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto", interpolation="nearest")
    rotate = n_levels > 4 or longest > 8
    ax.set_xticks(np.arange(n_levels), [str(lv) for lv in effects.columns], rotation=45 if rotate else 0,
                  ha="right" if rotate else "center", fontsize=8)
    ax.set_yticks(np.arange(n_factors), [str(f) for f in effects.index], fontsize=8)
    ax.tick_params(length=0)
    if lfsr is not None:
        called = pd.DataFrame(lfsr).reindex(index=effects.index, columns=effects.columns).astype(float).to_numpy()
        rows, cols = np.nonzero(called < threshold)
        if len(rows):  # white on strong colours, black on pale ones
            dark = np.abs(values[rows, cols]) > 0.6 * limit
            ax.scatter(cols, rows, s=14, c=np.where(dark, "white", "black"), marker="o", linewidths=0)
            ax.scatter([], [], s=14, c="black", marker="o", label=f"lfsr < {threshold:g}")
            ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), frameon=False, fontsize=8, handletextpad=0.2,
                      borderaxespad=0.2)
    ax.figure.colorbar(image, ax=ax, location="right", shrink=0.9 if n_factors < 8 else 0.6, aspect=20, pad=0.02,
                       label="effect on the factor")
    ax.set_xlabel("intervention" + (f" (vs {reference})" if reference is not None else ""), fontsize=9)
    ax.set_title("Effects of interventions on the factors", fontsize=10, pad=22 if lfsr is not None else 6)
    return ax


def views_heatmap(relevance_views: pd.DataFrame, top: int = 20, ax=None):
    """The share of each view's variance each factor explains (``relevance_views``: factors x views, e.g. a
    multi-view Spex's ``relevance_views_``), as MOFA shows it: the ``top`` factors with the largest share in any
    view as rows (most relevant on top), views as columns, each cell annotated with its percentage."""
    table = pd.DataFrame(relevance_views).astype(float)
    order = table.max(axis=1).fillna(-1.0).sort_values(ascending=False, kind="stable").index[:top]
    table = table.loc[order]
    values = 100 * table.to_numpy()
    n_factors, n_views = values.shape
    longest = max((len(str(f)) for f in table.index), default=0)
    ax = _axes(ax, 2.4 + 0.06 * min(longest, 40) + 0.9 * n_views, 1.3 + 0.3 * n_factors)
    finite = values[np.isfinite(values)]
    top_value = max(float(finite.max()) if finite.size else 0.0, 1e-6)
    image = ax.imshow(values, cmap="Blues", vmin=0, vmax=top_value, aspect="auto", interpolation="nearest")
    for i in range(n_factors):
        for j in range(n_views):
            value = values[i, j]
            text = "n/a" if not np.isfinite(value) else (f"{value:.1f}" if value >= 0.05 or value == 0 else "<0.1")
            dark = np.isfinite(value) and value > 0.55 * top_value
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")
    ax.set_xticks(np.arange(n_views), [str(v) for v in table.columns], fontsize=9)
    ax.xaxis.tick_top()
    ax.set_yticks(np.arange(n_factors), [str(f) for f in table.index], fontsize=8)
    ax.tick_params(length=0)
    ax.figure.colorbar(image, ax=ax, location="right", shrink=0.9 if n_factors < 8 else 0.6, aspect=20, pad=0.02,
                       label="% of the view's variance")
    ax.set_title("Variance explained per view (%)", fontsize=10)
    return ax
