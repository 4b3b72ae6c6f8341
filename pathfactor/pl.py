"""Scanpy-style plots of a pathfactor result stored in an AnnData: ``pf.pl.<plot>(adata, ..., key=...)``.

Thin wrappers over :mod:`pathfactor.plot` that read the result under ``key`` (default: the only pathfactor result
in ``adata``) as :func:`pathfactor.tl.results` does. Single-panel plots draw on ``ax`` (or a new figure) and
return the Axes; :func:`umap` returns the Figure. Factors may be named by factor name (``"HALLMARK_G2M_CHECKPOINT"``),
by obs column (``"spex_HALLMARK_G2M_CHECKPOINT"``) or by position (int)::

    pf.pl.relevance(adata, key="spex")
    pf.pl.top_loadings(adata, "HALLMARK_G2M_CHECKPOINT")
    pf.pl.factor_scores(adata, "HALLMARK_G2M_CHECKPOINT", groupby="cell_cycle_stage")
    pf.pl.umap(adata, key="spex")                      # the 4 most relevant factors on obsm["X_umap"]
"""
from __future__ import annotations

from . import plot
from .models.anndata_io import read_results

__all__ = ["relevance", "top_loadings", "factor_scores", "umap", "embedding"]


def relevance(adata, key: str | None = None, top: int = 20, active_only: bool = False, ax=None):
    """Bars of the ``top`` most relevant factors, coloured by kind (:func:`pathfactor.plot.relevance`)."""
    res = read_results(adata, key)
    info = res.info[res.info["active"]] if active_only else res.info
    measure = "R²" if res.measure in ("R^2", "R²") else res.measure
    return plot.relevance(info["relevance"], kinds=info["kind"], top=top, ax=ax, measure=measure)


def top_loadings(adata, factor, key: str | None = None, top: int = 15, ax=None, **kwargs):
    """The genes with the largest |loading| of ``factor``; with gene-set annotations, kept / gained / lost genes
    are marked (:func:`pathfactor.plot.top_loadings`; ``**kwargs``: ``n_lost``, ``fraction``)."""
    res = read_results(adata, key)
    name = res.factor(factor)
    annotated = None if res.annotation is None or res.info.loc[name, "kind"] != "annotated" else res.annotation[name]
    return plot.top_loadings(res.loadings[name], annotated=annotated, top=top, ax=ax, **kwargs)


def factor_scores(adata, factor, key: str | None = None, groupby: str | None = None, ax=None, **kwargs):
    """Scores of ``factor`` per cell: violins per ``adata.obs[groupby]`` group, or a histogram without
    ``groupby`` (:func:`pathfactor.plot.factor_scores`; ``**kwargs``: ``sort``, ``max_points``, ``seed``)."""
    res = read_results(adata, key)
    name = res.factor(factor)
    groups = None
    if groupby is not None:
        if groupby not in adata.obs.columns:
            raise KeyError(f"groupby={groupby!r} is not a column of adata.obs")
        groups = adata.obs[groupby]
    return plot.factor_scores(res.scores[name], groups=groups, ax=ax, **kwargs)


def embedding(adata, basis: str, key: str | None = None, factors=None, n: int = 4, groupby: str | None = None,
              ncols: int = 4, **kwargs):
    """Panels of the existing embedding ``obsm["X_<basis>"]`` (or ``obsm[basis]``), one per factor coloured by its
    scores: ``factors`` (names, obs columns or positions), default the ``n`` most relevant active factors; with
    ``groupby`` a first panel coloured by that obs column. Returns the Figure
    (:func:`pathfactor.plot.embedding_panels`; ``**kwargs``: ``max_points``, ``seed``)."""
    res = read_results(adata, key)
    name = basis if basis in adata.obsm else f"X_{basis}"
    if name not in adata.obsm:
        raise KeyError(f"adata.obsm[{name!r}] is missing; compute the embedding first (for a UMAP: "
                       f"sc.pp.neighbors(adata, use_rep='X_{res.key}'); sc.tl.umap(adata))")
    chosen = res.top(n) if factors is None else [res.factor(f) for f in
                                                 ([factors] if isinstance(factors, (str, int)) else factors)]
    if not chosen:
        raise ValueError(f"the result under key {res.key!r} has no active factor; pass factors=")
    groups = None
    if groupby is not None:
        if groupby not in adata.obs.columns:
            raise KeyError(f"groupby={groupby!r} is not a column of adata.obs")
        groups = adata.obs[groupby]
    label = basis[2:] if basis.startswith("X_") else basis
    return plot.embedding_panels(adata.obsm[name], res.scores[chosen], groups=groups, ncols=ncols,
                                 basis=label.upper() if label.lower() in ("umap", "tsne", "pca") else label, **kwargs)


def umap(adata, key: str | None = None, factors=None, n: int = 4, groupby: str | None = None, ncols: int = 4,
         **kwargs):
    """The ``n`` most relevant active factors (or ``factors``) on the existing ``obsm["X_umap"]``, one panel each
    (see :func:`embedding`). Returns the Figure."""
    return embedding(adata, "umap", key=key, factors=factors, n=n, groupby=groupby, ncols=ncols, **kwargs)
