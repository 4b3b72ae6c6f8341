"""The results a report reads from an AnnData, as pandas objects, and the per-factor overview numbers.

Reads the convention a model's ``write(adata)`` (or ``pathfactor fit``) leaves: ``obsm["X_<key>"]``,
``varm["<key>_loadings"]``, optional ``varm["<key>_annotation"]`` and ``varm["<key>_covariate_effects"]``, and
``uns[<key>]`` (factor names, kinds, relevance, active, params; optionally version, seed, converged, n_epochs,
gene_set_urls, and the intervention effects of Spex / Supervised: intervention_effects, _sd, _lfsr,
intervention_reference, intervention_levels). h5ad round trips turn lists into arrays and scalars into 0-d arrays: everything is unwrapped here.

A multi-view result (a MuData, as ``Spex.write(mdata)`` leaves it) keeps the scores in ``mdata.obsm["X_<key>"]``,
each view's loadings in ``mdata[view].varm["<key>_loadings"]`` (and ``_loadings_sd``) and in ``mdata.uns[key]``
also views, likelihoods and relevance_views (factors x views: the share of each view's variance a factor explains).
:func:`load` reads it into :attr:`Results.views`; its ``loadings`` then hold every view's features, named
``view:feature``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..data.genesets import GeneSets
from ..data.views import is_mudata
from ..evaluate import active_mask, one_gene_factors, refined_annotations
from ..models.anndata_io import scalar


@dataclass
class Interventions:
    """Effects of the interventions on the factors, each factors x levels (the reference level left out)."""

    effects: pd.DataFrame
    sd: pd.DataFrame
    lfsr: pd.DataFrame
    reference: str


@dataclass
class Views:
    """A multi-view result: per view its loadings (features x factors), likelihood and number of cells measured,
    and the share of each view's variance each factor explains (factors x views)."""

    loadings: dict[str, pd.DataFrame]
    likelihoods: dict[str, str]
    relevance: pd.DataFrame  # factors x views
    n_obs: dict[str, int]

    @property
    def names(self) -> list[str]:
        return list(self.loadings)


@dataclass
class Results:
    model: str
    info: pd.DataFrame  # index: factor names; columns: kind, relevance, active
    scores: pd.DataFrame  # cells x factors
    loadings: pd.DataFrame  # genes x factors
    annotation: pd.DataFrame | None  # genes x factors, bool
    covariates: pd.DataFrame | None  # genes x covariates
    params: dict = field(default_factory=dict)
    measure: str = "R^2"  # what relevance measures
    fit: dict = field(default_factory=dict)  # version, seed, converged, n_epochs (None: not recorded), genes_left_out
    urls: dict = field(default_factory=dict)  # gene set name -> URL
    loadings_sd: pd.DataFrame | None = None  # genes x factors posterior sds, where the model has them
    interventions: Interventions | None = None  # effects of interventions on the factors (Spex, Supervised)
    views: Views | None = None  # a multi-view result's views (None for one AnnData)

    @property
    def is_r2(self) -> bool:
        return self.measure in ("R^2", "R²") or self.views is not None  # several views: shares of variance


def _missing(what: str) -> ValueError:
    return ValueError(f"{what} is missing: it holds the fitted model's results, which the model's write(adata) "
                      f"or `pathfactor fit` creates")


def _table(matrix, index, columns, what: str) -> pd.DataFrame:
    values = np.asarray(matrix)
    if values.shape != (len(index), len(columns)):
        raise ValueError(f"{what} has shape {values.shape}, expected {(len(index), len(columns))}")
    return pd.DataFrame(values, index=index, columns=columns)


def _check_meta(data, key: str, label: str) -> dict:
    """``data.uns[key]`` with its factor names and relevance, and the scores ``data.obsm["X_<key>"]`` (``label``:
    how the errors name ``data``)."""
    if key not in data.uns:
        raise _missing(f"{label}.uns[{key!r}]")
    meta = data.uns[key]
    for name in ("factor_names", "relevance"):
        if name not in meta:
            raise _missing(f"{label}.uns[{key!r}][{name!r}]")
    if f"X_{key}" not in data.obsm:
        raise _missing(f"{label}.obsm['X_{key}']")
    return meta


def _check_present(adata, key: str) -> dict:
    meta = _check_meta(adata, key, "adata")
    if f"{key}_loadings" not in adata.varm:
        raise _missing(f"adata.varm['{key}_loadings']")
    return meta


def _info(meta, key: str) -> pd.DataFrame:
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
    return pd.DataFrame({"kind": kinds, "relevance": relevance, "active": active}, index=names)


def _urls(meta, given) -> dict:
    """Gene set name -> URL from ``uns[key]["gene_set_urls"]``, overridden by ``given`` (a mapping, or a
    :class:`GeneSets` whose descriptions are URLs, as in MSigDB's GMT files)."""
    if isinstance(given, GeneSets):
        given = given.descriptions
    stored = meta.get("gene_set_urls", None)
    out = {str(k): str(scalar(v)) for k, v in dict(stored or {}).items()}
    out.update({str(k): str(v) for k, v in dict(given or {}).items()})
    return out


def _effect_table(value, factors: list[str], levels: list[str] | None, what: str) -> pd.DataFrame:
    """A factors x levels table from ``uns``: a DataFrame (labels kept, as an h5ad round trip gives it back) or
    an array labelled by the factor names and ``levels``."""
    if isinstance(value, pd.DataFrame):
        table = value.copy()
        table.index, table.columns = table.index.astype(str), table.columns.astype(str)
    else:
        values = np.asarray(value, dtype=float)
        if values.ndim != 2 or levels is None:
            raise ValueError(f"{what} is not a factors x levels table")
        table = _table(values, factors, levels, what)
    table.index.name = table.columns.name = None
    return table.astype(float)


def interventions(meta, key: str, factors: list[str]) -> Interventions | None:
    """The intervention effects in ``uns[key]`` (None when the model had no interventions). A missing lfsr is
    computed from the effects and sds (Gaussian marginals)."""
    if "intervention_effects" not in meta:
        return None
    stored = meta.get("intervention_levels", None)
    levels = None if stored is None else [str(v) for v in np.ravel(stored)]
    what = f"adata.uns[{key!r}]"
    effects = _effect_table(meta["intervention_effects"], factors, levels, f"{what}['intervention_effects']")
    if "intervention_effects_sd" in meta:
        sd = _effect_table(meta["intervention_effects_sd"], factors, levels, f"{what}['intervention_effects_sd']")
        sd = sd.reindex(index=effects.index, columns=effects.columns)
    else:
        sd = pd.DataFrame(np.nan, index=effects.index, columns=effects.columns)
    if "intervention_effects_lfsr" in meta:
        lfsr = _effect_table(meta["intervention_effects_lfsr"], factors, levels,
                             f"{what}['intervention_effects_lfsr']").reindex(index=effects.index,
                                                                            columns=effects.columns)
    else:
        from scipy.special import erfc

        lfsr = 0.5 * erfc(effects.abs() / sd / np.sqrt(2.0))
    reference = scalar(meta.get("intervention_reference", None))
    return Interventions(effects, sd, lfsr, "the reference level" if reference is None else str(reference))


def _measured(ad) -> int:
    """The cells a view measured: its rows with any value that is not NaN (a view's unmeasured cells are often
    NaN-padded rows); every row of a sparse or absent X."""
    X = ad.X
    if X is None or sp.issparse(X):
        return int(ad.n_obs)
    return int(np.isfinite(np.asarray(X, dtype=float)).any(axis=1).sum())


def _load_views(mdata, key: str, gene_set_urls=None) -> Results:
    """A multi-view result (MuData): scores from ``mdata.obsm``, factors from ``mdata.uns[key]``, loadings per view."""
    meta = _check_meta(mdata, key, "mdata")
    info = _info(meta, key)
    names = info.index.tolist()
    views = [str(v) for v in np.ravel(meta.get("views", list(mdata.mod)))]
    missing = [v for v in views if v not in mdata.mod]
    if missing:
        raise ValueError(f"mdata.uns[{key!r}]['views'] names {missing}, which the MuData lacks (it has "
                         f"{list(mdata.mod)})")
    liks = [str(x) for x in np.ravel(meta.get("likelihoods", ["normal"] * len(views)))]
    per_view, per_view_sd, n_obs = {}, {}, {}
    for view in views:
        ad = mdata.mod[view]
        if f"{key}_loadings" not in ad.varm:
            raise _missing(f"mdata[{view!r}].varm['{key}_loadings']")
        feats = ad.var_names.astype(str)
        per_view[view] = _table(ad.varm[f"{key}_loadings"], feats, names,
                                f"mdata[{view!r}].varm['{key}_loadings']").astype(float)
        if f"{key}_loadings_sd" in ad.varm:
            per_view_sd[view] = _table(ad.varm[f"{key}_loadings_sd"], feats, names,
                                       f"mdata[{view!r}].varm['{key}_loadings_sd']").astype(float)
        n_obs[view] = _measured(ad)
    if "relevance_views" in meta:
        rel = _table(meta["relevance_views"], names, views, f"mdata.uns[{key!r}]['relevance_views']").astype(float)
    else:
        rel = pd.DataFrame(np.nan, index=names, columns=views)

    def joined(frames: dict) -> pd.DataFrame:
        return pd.concat([f.set_axis([f"{v}:{g}" for g in f.index], axis=0) for v, f in frames.items()])

    scores = _table(mdata.obsm[f"X_{key}"], mdata.obs_names.astype(str), names, f"mdata.obsm['X_{key}']")
    params = {str(k): scalar(v) for k, v in dict(meta.get("params", {}) or {}).items()}
    fit = {name: scalar(meta.get(name, None)) for name in ("version", "seed", "converged", "n_epochs")}
    sd = joined(per_view_sd) if len(per_view_sd) == len(views) else None
    return Results(str(scalar(meta.get("model", key))), info, scores.astype(float), joined(per_view), None, None,
                   params, str(scalar(meta.get("relevance_measure", "R^2"))), fit, _urls(meta, gene_set_urls), sd,
                   interventions(meta, key, names),
                   Views(per_view, dict(zip(views, liks)) if len(liks) == len(views) else {}, rel, n_obs))


def load(adata, key: str, gene_set_urls=None) -> Results:
    """The results under ``key``, checked, as pandas objects (an AnnData, or a MuData of several views)."""
    if is_mudata(adata):
        return _load_views(adata, key, gene_set_urls)
    meta = _check_present(adata, key)
    info = _info(meta, key)
    names = info.index.tolist()
    genes = adata.var_names.astype(str)
    scores = _table(adata.obsm[f"X_{key}"], adata.obs_names.astype(str), names, f"adata.obsm['X_{key}']")
    loadings = _table(adata.varm[f"{key}_loadings"], genes, names, f"adata.varm['{key}_loadings']")
    annotation = covariates = None
    if f"{key}_annotation" in adata.varm:
        annotation = _table(adata.varm[f"{key}_annotation"], genes, names,
                            f"adata.varm['{key}_annotation']").astype(bool)
    if f"{key}_covariate_effects" in adata.varm:
        effects = np.asarray(adata.varm[f"{key}_covariate_effects"], dtype=float).reshape(len(genes), -1)
        default = [f"covariate_{i}" for i in range(effects.shape[1])]
        cov_names = [str(c) for c in np.ravel(meta.get("covariate_names", default))]
        covariates = _table(effects, genes, cov_names, f"adata.varm['{key}_covariate_effects']")
    params = {str(k): scalar(v) for k, v in dict(meta.get("params", {}) or {}).items()}
    fit = {name: scalar(meta.get(name, None)) for name in ("version", "seed", "converged", "n_epochs")}
    fit["genes_left_out"] = int(np.size(meta.get("genes_left_out", [])))  # outside var["highly_variable"]
    sd = None
    if f"{key}_loadings_sd" in adata.varm:
        sd = _table(adata.varm[f"{key}_loadings_sd"], genes, names, f"adata.varm['{key}_loadings_sd']").astype(float)
    return Results(str(scalar(meta.get("model", key))), info, scores.astype(float), loadings.astype(float),
                   annotation, covariates, params, str(scalar(meta.get("relevance_measure", "R^2"))), fit,
                   _urls(meta, gene_set_urls), sd, interventions(meta, key, names))


def refined(res: Results) -> pd.DataFrame:
    """:func:`evaluate.refined_annotations` indexed by term (empty without an annotation)."""
    if res.annotation is None:
        return pd.DataFrame(columns=["n_annotated", "n_active", "gained", "lost"])
    return refined_annotations(res.loadings, res.annotation, loadings_sd=res.loadings_sd).set_index("term")


def overview(res: Results, refined_table: pd.DataFrame) -> pd.DataFrame:
    """One row per factor, most relevant first: kind, relevance, active, set_size (genes of the gene set in the
    data; NaN when unannotated), n_active (active genes), n_gained, n_lost (NaN when unannotated), one_gene (the
    gene of a one-gene factor, else "")."""
    table = res.info.copy()
    table["n_active"] = (view_active(res).sum(axis=0) if res.views is not None
                         else active_mask(res.loadings.to_numpy()).sum(axis=0))
    ann = res.annotation
    table["set_size"] = ann.sum(axis=0).where(ann.any(axis=0)) if ann is not None else np.nan
    table["n_gained"] = refined_table["gained"].map(len).reindex(table.index)
    table["n_lost"] = refined_table["lost"].map(len).reindex(table.index)
    # one view only: the features of several views are in different units
    one_gene = one_gene_factors(res.loadings) if res.views is None else pd.Series(dtype=object)
    table["one_gene"] = one_gene.reindex(table.index).fillna("")
    return table.sort_values("relevance", ascending=False, kind="stable")


#: a factor counts in a view (its active features are listed and counted) when it explains at least this share
#: of the view's variance (the models' own threshold for an active factor)
VIEW_SHARE = 1e-4


def view_active(res: Results) -> pd.DataFrame:
    """Features (``view:feature``) x factors: active in its view (|w| above the fraction of the factor's largest
    |w| in that view), counted only in the views where the factor explains at least VIEW_SHARE of the variance
    (elsewhere its loadings are noise, and the threshold relative to their maximum would pick noise)."""
    parts = []
    for view, w in res.views.loadings.items():
        mask = active_mask(w.to_numpy())
        share = res.views.relevance[view].reindex(w.columns).to_numpy()
        mask &= ~(share < VIEW_SHARE)[None, :]  # NaN share (not recorded): keep
        parts.append(pd.DataFrame(mask, index=[f"{view}:{g}" for g in w.index], columns=w.columns))
    return pd.concat(parts)


def report_groups(adata, color_by: str | None) -> pd.Series | None:
    """The obs column the cells are grouped by; many-valued numbers become quintiles (an ordered categorical)."""
    if color_by is None:
        return None
    if color_by not in adata.obs.columns:
        available = ", ".join(map(str, adata.obs.columns)) or "(none)"
        raise ValueError(f"color_by={color_by!r} is not a column of adata.obs; available columns: {available}")
    groups = adata.obs[color_by]
    if not pd.api.types.is_numeric_dtype(groups) or pd.api.types.is_bool_dtype(groups) or groups.nunique() <= 12:
        return groups
    bins = pd.qcut(groups, 5, duplicates="drop")
    labels = [f"Q{i + 1}: {b.left:.3g}–{b.right:.3g}" for i, b in enumerate(bins.cat.categories)]
    return bins.cat.rename_categories(labels).rename(f"{color_by} (quintile)")


def _looks_like_counts(X) -> bool:
    values = (X.data if sp.issparse(X) else np.asarray(X).ravel())[:20000]
    values = values[values != 0]
    return bool(len(values)) and bool(np.all(values >= 0)) and bool(np.all(values == np.round(values)))


def expression(adata, genes) -> tuple[pd.DataFrame | None, str]:
    """Cells x ``genes`` expression for group means and how it was derived: ``adata.X`` as stored, or
    ``log1p`` of counts per 10,000 when X holds counts. (None, "") when there is no X."""
    X = adata.X
    if X is None:
        return None, ""
    sub = X[:, adata.var_names.get_indexer(list(genes))]
    values = sub.toarray() if sp.issparse(sub) else np.asarray(sub, dtype=float)
    how = "adata.X as stored"
    if _looks_like_counts(X):
        totals = np.asarray(X.sum(axis=1), dtype=float).ravel()
        values = np.log1p(values / np.maximum(totals, 1e-12)[:, None] * 1e4)
        how = "log1p of counts per 10,000 (adata.X holds counts)"
    return pd.DataFrame(values, index=adata.obs_names.astype(str), columns=list(genes)), how
