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

__all__ = ["relevance", "top_loadings", "factor_scores", "scores_scatter", "KIND_COLORS"]

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


def _group_order(values: pd.Series, groups: pd.Series, sort: str) -> list:
    ordered = isinstance(groups.dtype, pd.CategoricalDtype) and groups.cat.ordered
    if sort == "median" and not ordered:
        return values.groupby(groups, observed=True).median().sort_values(ascending=False).index.tolist()
    if isinstance(groups.dtype, pd.CategoricalDtype):
        return [c for c in groups.cat.categories if (groups == c).any()]
    return sorted(groups.dropna().unique(), key=str)


def factor_scores(scores: pd.Series, groups: pd.Series | None = None, ax=None, sort: str = "median",
                  max_points: int = 1500, seed: int = 0):
    """Factor scores per cell: violins with jittered points, one per group (``sort="median"``: highest median
    first; ``"label"``: category / alphabetical order; ordered categoricals keep their order). Without ``groups``,
    a histogram."""
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
    order = _group_order(s, g, sort)
    ax = _axes(ax, max(4.0, 1.0 + 0.55 * len(order)), 3.6)
    rng = np.random.default_rng(seed)
    for i, group in enumerate(order):
        v = s[(g == group).to_numpy()].to_numpy()
        if len(v) > 1 and np.ptp(v) > 0:
            parts = ax.violinplot(v, positions=[i], widths=0.8, showextrema=False)
            for body in parts["bodies"]:
                body.set(facecolor=KIND_COLORS["annotated"], edgecolor="none", alpha=0.35)
        shown = v if len(v) <= max_points else rng.choice(v, max_points, replace=False)
        ax.scatter(i + rng.uniform(-0.18, 0.18, len(shown)), shown, s=4, color="0.15", alpha=0.5, lw=0)
        ax.hlines(np.median(v), i - 0.3, i + 0.3, color="black", lw=1.5)
    ax.set_xticks(np.arange(len(order)), [str(o) for o in order], rotation=45 if len(order) > 4 else 0,
                  ha="right" if len(order) > 4 else "center")
    ax.set_ylabel(f"{name} score")
    if g.name is not None:
        ax.set_xlabel(str(g.name))
    ax.spines[["top", "right"]].set_visible(False)
    return ax


def scores_scatter(x: pd.Series, y: pd.Series, groups=None, ax=None, s: float | None = None):
    """Two factors' scores against each other, coloured by ``groups``: categorical groups get a palette and a
    legend, numeric groups a colourbar."""
    x, y = pd.Series(x, dtype=float), pd.Series(y, dtype=float)
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
            order = _group_order(x, g, "label")
            cmap = plt.get_cmap("tab10" if len(order) <= 10 else "tab20")
            for i, group in enumerate(order):
                idx = (g == group).to_numpy()
                ax.scatter(x.to_numpy()[idx], y.to_numpy()[idx], s=size, color=cmap(i % cmap.N), lw=0, alpha=0.8,
                           label=str(group))
            ax.legend(title=str(g.name) if g.name is not None else None, loc="upper left", bbox_to_anchor=(1.01, 1),
                      frameon=False, markerscale=max(1.0, 30 / size) ** 0.5, fontsize="small")
    ax.set_xlabel(str(x.name) if x.name is not None else "factor 1")
    ax.set_ylabel(str(y.name) if y.name is not None else "factor 2")
    ax.spines[["top", "right"]].set_visible(False)
    return ax
