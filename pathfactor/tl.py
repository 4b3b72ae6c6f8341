"""Scanpy-style tools: ``pf.tl.<model>(adata, gene_sets=..., key_added=..., copy=...)`` fits a model and writes
its results into the AnnData, as ``sc.pp.pca`` / ``sc.tl.umap`` do.

Every model of ``pathfactor fit --model`` has a tool here, generated from :data:`TOOLS` (tool name -> CLI model
name, whose :data:`pathfactor.catalog.MODELS` entry gives the class and whether it takes gene sets)::

    import pathfactor as pf, scanpy as sc
    adata = pf.datasets.mesc()
    model = pf.tl.spex(adata, gene_sets="hallmark")               # adata modified in place; the model returned
    sc.pl.umap(adata, color="spex_HALLMARK_G2M_CHECKPOINT")       # after sc.pp.neighbors(adata); sc.tl.umap(adata)
    scores = pf.tl.scores(adata, "spex")                          # every factor as an AnnData, for sc.pl.*

Return values (the scanpy way with one addition): ``copy=False`` modifies ``adata`` in place and returns the
fitted model (scanpy returns None; the model gives ``transform`` for new cells, ``save`` and the DataFrames);
``copy=True`` leaves ``adata`` untouched and returns the modified copy, as scanpy does (the model is then kept
nowhere: use ``copy=False`` on ``adata.copy()`` if you need both).

What goes where (``key`` = ``key_added``, default the model's key: spex, supervised, slalom, autoencoder, nmf,
pf_pca, ppca, fa, vae, gmvae; none is one of scanpy's): see :meth:`pathfactor.models.LatentModel.write`. In short
``obsm["X_<key>"]`` (all factors, model order), ``obs["<key>_<factor>"]`` (the 10 most relevant active factors),
``varm["<key>_loadings"]``, ``uns[key]``. A key another tool wrote is refused (``ValueError``) before fitting.

``obsm["X_<key>"]`` keeps the model's factor order (the order of ``uns[key]["factor_names"]``), so
``sc.pl.embedding(adata, basis=key)`` shows the first two factors, not the most relevant ones; for those pass
``components=pf.tl.top_components(adata, key)``.
"""
from __future__ import annotations

import inspect
import logging

import numpy as np
import pandas as pd

from .catalog import MODELS
from .models.anndata_io import Results, read_results

log = logging.getLogger("pathfactor.tl")

#: tool name -> ``pathfactor fit --model`` name (its :data:`pathfactor.catalog.MODELS` entry builds the model)
TOOLS = {"spex": "spex", "supervised": "supervised", "slalom": "slalom", "autoencoder": "autoencoder", "nmf": "nmf",
         "pca": "pca", "ppca": "ppca", "factor_analysis": "fa", "vae": "vae", "gmvae": "gmvae"}

#: ``fit`` arguments a tool sets itself (the rest of ``fit``'s keywords may be passed in ``**params``)
_OWN = ("self", "data", "annotations", "layer", "covariates", "seed", "interventions", "reference")

__all__ = [*TOOLS, "TOOLS", "scores", "top_components", "results"]


def _split_params(cls, tool: str, params: dict) -> tuple[dict, dict]:
    """``params`` as (constructor keywords, fit keywords); an unknown name is a TypeError listing the known."""
    ctor = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]
    fit = [p for p in inspect.signature(cls.fit).parameters if p not in _OWN]
    unknown = sorted(set(params) - set(ctor) - set(fit))
    if unknown:
        raise TypeError(f"pf.tl.{tool}() got unexpected parameter(s) {unknown}; {cls.__name__} takes "
                        f"{', '.join(ctor)} (constructor) and {', '.join(fit) or 'nothing more'} (fit)")
    return ({k: v for k, v in params.items() if k in ctor}, {k: v for k, v in params.items() if k not in ctor})


def _run(tool: str, adata, gene_sets, key_added, copy, layer, covariates, seed, params):
    from anndata import AnnData

    from .models.anndata_io import check_key

    spec = MODELS[TOOLS[tool]]
    cls = spec.load()
    if not isinstance(adata, AnnData):
        raise TypeError(f"pf.tl.{tool} needs an AnnData, got {type(adata).__name__}; use "
                        f"pathfactor.models.{cls.__name__} for arrays and DataFrames")
    if gene_sets is not None and spec.gene_sets == "unused":
        raise ValueError(f"pf.tl.{tool} ({cls.__name__}) does not use gene sets; drop gene_sets=")
    fit_params = inspect.signature(cls.fit).parameters
    params = dict(params)  # interventions= / reference= come in **params (the tools' signature is fixed)
    interventions, reference = params.pop("interventions", None), params.pop("reference", None)
    for name, value in (("covariates", covariates), ("interventions", interventions), ("reference", reference)):
        if value is not None and name not in fit_params:
            raise ValueError(f"pf.tl.{tool} ({cls.__name__}) does not take {name}")
    ctor_kwargs, fit_kwargs = _split_params(cls, tool, params)
    key = key_added or cls.key
    check_key(adata, key)  # a key another tool wrote: refused before the fit, not after
    model = cls(**ctor_kwargs)
    if gene_sets is not None:
        fit_kwargs["annotations"] = gene_sets
    if covariates is not None:
        fit_kwargs["covariates"] = covariates
    if interventions is not None:
        fit_kwargs["interventions"] = interventions
    if reference is not None:
        fit_kwargs["reference"] = reference
    if "seed" in fit_params:
        fit_kwargs["seed"] = seed
    target = adata.copy() if copy else adata
    model.fit(target, layer=layer, **fit_kwargs)
    model.write(target, key=key)
    log.info("pf.tl.%s: added obsm['X_%s'], varm['%s_loadings'], uns['%s'] and %d obs columns %s_<factor>",
             tool, key, key, key, len(target.uns[key]["obs_columns"]), key)
    return target if copy else model


def _make_tool(tool: str):
    cli_name = TOOLS[tool]
    spec = MODELS[cli_name]

    def run(adata, gene_sets=None, key_added: str | None = None, copy: bool = False, layer: str | None = None,
            covariates=None, seed: int = 0, **params):
        return _run(tool, adata, gene_sets, key_added, copy, layer, covariates, seed, params)

    takes_sets = {"required": "gene sets (required unless the model is asked for unannotated factors)",
                  "optional": "gene sets (optional)", "unused": "no gene sets (giving gene_sets= is a ValueError)"}
    cls_name = spec.load().__name__
    run.__name__ = run.__qualname__ = tool
    run.__module__ = __name__
    run.__doc__ = f"""Fit :class:`pathfactor.models.{cls_name}` ({spec.help}) to ``adata`` and write its results.

    Takes {takes_sets[spec.gene_sets]}.

    Parameters
    ----------
    adata : AnnData, cells x genes
    gene_sets : GeneSets, ``{{name: genes}}``, a genes x terms boolean DataFrame, a GMT/JSON path or a bundled
        collection name ("hallmark", "reactome_mouse"); passed to ``fit`` as ``annotations=``
    key_added : where to write (default: the model's key); see :meth:`LatentModel.write`
    copy : return a modified copy of ``adata`` (``adata`` untouched) instead of modifying it in place
    layer : ``adata.layers`` entry to fit (default ``adata.X``)
    covariates : obs column(s) (or a cells x C array) to regress out, for models whose ``fit`` takes them
    seed : random seed of the fit
    interventions : (keyword) obs column (or one label per cell) of perturbations whose effects on the factors are
        estimated, for models whose ``fit`` takes them (spex, supervised): ``uns[key]["intervention_effects"]``
        (and ``_sd``, ``_lfsr``)
    reference : (keyword) reference level of ``interventions``, or ``{{column: level}}`` for them and categorical
        covariates (spex, supervised; default: each column's most frequent level)
    **params : the model's constructor arguments (e.g. ``max_epochs=``, ``progress=False``), or further ``fit``
        arguments (e.g. ``device=``)

    Returns
    -------
    The fitted model when ``copy=False`` (``adata`` modified in place); the modified copy of ``adata`` when
    ``copy=True``.
    """
    return run


for _tool in TOOLS:
    globals()[_tool] = _make_tool(_tool)
del _tool


# ============================================================================ reading results back
def results(adata, key: str | None = None) -> Results:
    """The result under ``key`` (``None``: the only pathfactor result in ``adata``) as pandas objects:
    ``.scores`` (cells x factors), ``.loadings`` (genes x factors), ``.annotation``, ``.info`` (kind, relevance,
    active, obs_column per factor), ``.top(n)`` (the most relevant active factors)."""
    return read_results(adata, key)


def scores(adata, key: str | None = None):
    """Every factor's scores as an AnnData (cells x factors), as decoupler's ``get_obsm`` does: ``X`` the scores,
    ``var`` the factors (kind, relevance, active, obs_column), and copies of ``adata``'s ``obs``, ``obsm``, ``obsp``
    and ``uns``, so scanpy plots any factor by its plain name::

        sc.pl.umap(pf.tl.scores(adata, "spex"), color="HALLMARK_G2M_CHECKPOINT")
        sc.pl.matrixplot(pf.tl.scores(adata, "spex"), var_names=[...], groupby="cell_type")
    """
    from anndata import AnnData

    res = read_results(adata, key)
    var = res.info.copy()
    var.index = var.index.astype(str)
    var.index.name = None
    out = AnnData(X=res.scores.to_numpy(dtype=np.float32), obs=adata.obs.copy(), var=var,
                  uns={k: v for k, v in adata.uns.items()}, obsm={k: v for k, v in adata.obsm.items()},
                  obsp={k: v for k, v in adata.obsp.items()})
    return out.copy()  # no array shared with adata


def top_components(adata, key: str | None = None, n: int = 2) -> str:
    """The positions (1-based, comma-separated) of the ``n`` most relevant active factors in ``obsm["X_<key>"]``,
    for ``sc.pl.embedding(adata, basis=key, components=pf.tl.top_components(adata, key))``: the two most relevant
    factors instead of the first two. (0-based for ``dimensions=``: ``[int(c) - 1 for c in ....split(",")]``.)"""
    res = read_results(adata, key)
    top = res.top(n)
    if len(top) < n:
        top += [f for f in res.top(None, active_only=False) if f not in top][: n - len(top)]
    if len(top) < n:
        raise ValueError(f"the result under key {res.key!r} has {len(top)} factors, fewer than n={n}")
    position = pd.Series(np.arange(1, len(res.info) + 1), index=res.info.index)
    return ",".join(str(int(position[f])) for f in top)
