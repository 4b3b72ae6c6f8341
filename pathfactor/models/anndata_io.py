"""Where a model's results live in an AnnData, read back robustly, and the checks that keep ``write`` from
overwriting what another tool (scanpy, scvi-tools, decoupler, ...) wrote.

Layout under ``key`` (see :meth:`LatentModel.write`): ``obsm["X_<key>"]`` (all factors, in the model's order),
``varm["<key>_loadings"]`` (and ``_loadings_sd``, ``_annotation``, ``_covariate_effects``,
``_covariate_effects_sd``), ``obs["<key>_<factor>"]`` for the :data:`N_OBS_FACTORS` most relevant active factors,
and ``uns[key]`` (a dict; its ``"model"`` entry names the pathfactor model class, which is how a pathfactor result
is told from another tool's). After an h5ad round trip lists in ``uns`` come back as numpy arrays (an empty list as
an empty float array) and scalars may come back as 0-d arrays: :func:`names` and :func:`scalar` unwrap them.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .registry import is_model_name

__all__ = ["N_OBS_FACTORS", "SCANPY_KEYS", "VARM_SUFFIXES", "names", "scalar", "is_result", "result_keys",
           "resolve_key", "check_key", "obs_columns", "clear_previous", "Results", "read_results"]

log = logging.getLogger("pathfactor.models")

#: how many of the most relevant active factors ``write`` copies into named ``obs`` columns
N_OBS_FACTORS = 10

#: keys scanpy's own tools write (``obsm["X_<key>"]``, ``uns[key]``, ``varm["PCs"]``); no model's default key
#: may be one of them (a test checks), and ``write`` refuses any key whose entries another tool wrote
SCANPY_KEYS = frozenset({"pca", "umap", "tsne", "diffmap", "draw_graph", "draw_graph_fr", "draw_graph_fa",
                         "draw_graph_kk", "neighbors", "louvain", "leiden", "paga", "phate", "mde", "dendrogram",
                         "rank_genes_groups", "spatial", "PCs"})

#: ``varm["<key>_<suffix>"]`` entries a pathfactor result may hold (base class and subclasses)
VARM_SUFFIXES = ("loadings", "loadings_sd", "annotation", "covariate_effects", "covariate_effects_sd", "inclusion",
                 "gene_effects", "gene_effects_sd")

#: entries a model's own ``write`` adds after the base class's, removed when the result is overwritten
_MODEL_EXTRAS = {"GMVAE": (("obs", "{key}_cluster"), ("obsm", "{key}_cluster_probs"))}


# ============================================================================ reading h5ad-round-tripped values
def scalar(value):
    """A plain Python value from what h5ad gives back (0-d / 1-element arrays, numpy scalars, bytes)."""
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(()).item()
    elif isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return value


def names(value) -> list[str]:
    """A list of str from a list, tuple, numpy array (object, bytes or str; an empty list comes back from h5ad as
    an empty float array), a single str, or None (-> [])."""
    if value is None:
        return []
    if isinstance(value, (str, bytes)):
        return [str(scalar(value))]
    out = []
    for item in np.ravel(np.asarray(value, dtype=object)):
        item = scalar(item)
        out.append(item if isinstance(item, str) else str(item))
    return out


def is_result(entry) -> bool:
    """Whether ``uns`` entry ``entry`` is a pathfactor result: a mapping whose ``"model"`` names a registered model
    class and that lists ``"factor_names"``."""
    if not isinstance(entry, Mapping) or "factor_names" not in entry:
        return False
    model = scalar(entry.get("model"))
    return is_model_name(model)


def result_keys(adata) -> list[str]:
    """The ``uns`` keys holding pathfactor results."""
    return [str(k) for k, v in adata.uns.items() if is_result(v)]


def resolve_key(adata, key: str | None) -> str:
    """``key`` checked to hold a pathfactor result; ``None`` means the only one in ``adata``."""
    found = result_keys(adata)
    if key is None:
        if len(found) == 1:
            return found[0]
        if not found:
            raise ValueError("adata holds no pathfactor results (no uns entry written by a model's write); fit one "
                             "with pf.tl.<model>(adata, ...) or `pathfactor fit` first")
        raise ValueError(f"adata holds several pathfactor results ({', '.join(found)}); pass key=")
    if key not in adata.uns:
        hint = f" (pathfactor results: {', '.join(found)})" if found else ""
        raise KeyError(f"adata.uns[{key!r}] is missing: no pathfactor result under key {key!r}{hint}")
    if not is_result(adata.uns[key]):
        raise ValueError(f"adata.uns[{key!r}] is not a pathfactor result (another tool wrote it)")
    return key


# ============================================================================ writing: never over another tool's keys
def _refuse(what: str, key: str) -> ValueError:
    return ValueError(f"{what}: another tool wrote it, and pathfactor does not overwrite other tools' results. "
                      f"Write under another key (key='pf_{key}' in model.write, key_added= in pf.tl, --key on the "
                      f"command line), or delete the entry first")


def check_key(adata, key: str) -> Mapping | None:
    """The previous pathfactor result under ``key`` (``None`` if there is none), or a ``ValueError`` when
    ``uns[key]``, ``obsm["X_<key>"]`` or a ``varm["<key>_..."]`` entry exists but is not a pathfactor result's."""
    if not isinstance(key, str) or not key.strip():
        raise ValueError(f"key must be a non-empty str, got {key!r}")
    if "/" in key:
        raise ValueError(f"key must not contain '/' (h5ad paths use it), got {key!r}")
    if key in adata.uns:
        if is_result(adata.uns[key]):
            return adata.uns[key]
        raise _refuse(f"adata.uns[{key!r}] exists and is not a pathfactor result", key)
    taken = [f"obsm['X_{key}']"] if f"X_{key}" in adata.obsm else []
    taken += [f"varm['{key}_{s}']" for s in VARM_SUFFIXES if f"{key}_{s}" in adata.varm]
    if taken:
        raise _refuse(f"adata.{taken[0]} exists but adata.uns[{key!r}] holds no pathfactor result", key)
    return None


def _column(key: str, factor: str) -> str:
    return f"{key}_{factor}".replace("/", "_")  # '/' is a path separator in h5ad


def obs_columns(adata, key: str, factors, previous: Mapping | None) -> list[str]:
    """The obs column names ``<key>_<factor>`` for ``factors``; a ``ValueError`` if one exists and was not written
    by the previous pathfactor result under ``key``."""
    ours = set(names(previous.get("obs_columns"))) if previous is not None else set()
    columns: list[str] = []
    for factor in factors:
        col = _column(key, str(factor))
        while col in columns:  # two factor names that differ only by '/'
            col += "_"
        columns.append(col)
    clash = [c for c in columns if c in adata.obs.columns and c not in ours]
    if clash:
        raise _refuse(f"adata.obs already has the column(s) {clash[:3]} that a pathfactor result under key {key!r} "
                      f"would write (<key>_<factor>)", key)
    return columns


def clear_previous(adata, key: str, previous: Mapping) -> None:
    """Remove the entries of the pathfactor result ``previous`` under ``key`` (so that none is left stale)."""
    log.info("overwriting the previous pathfactor result under key %r (%s)", key, scalar(previous.get("model")))
    drop = [c for c in names(previous.get("obs_columns")) if c in adata.obs.columns]
    for where, pattern in _MODEL_EXTRAS.get(scalar(previous.get("model")), ()):
        name = pattern.format(key=key)
        if where == "obs" and name in adata.obs.columns:
            drop.append(name)
        elif where != "obs" and name in getattr(adata, where):
            del getattr(adata, where)[name]
    if drop:
        adata.obs = adata.obs.drop(columns=drop)
    for suffix in VARM_SUFFIXES:
        adata.varm.pop(f"{key}_{suffix}", None)
    adata.obsm.pop(f"X_{key}", None)


# ============================================================================ reading a result back
@dataclass
class Results:
    """A pathfactor result read from an AnnData (``pf.tl`` and ``pf.pl`` use it)."""

    key: str
    model: str
    scores: pd.DataFrame  # cells x factors (obsm, model order)
    loadings: pd.DataFrame  # genes x factors
    annotation: pd.DataFrame | None  # genes x factors, bool
    info: pd.DataFrame  # factor -> kind, relevance, active, obs_column ("" when none)
    measure: str

    def top(self, n: int | None = None, active_only: bool = True) -> list[str]:
        """The ``n`` (all if None) most relevant factors, most relevant first."""
        info = self.info[self.info["active"]] if active_only else self.info
        ordered = info["relevance"].sort_values(ascending=False, kind="stable").index.tolist()
        return ordered if n is None else ordered[:n]

    def factor(self, name) -> str:
        """The factor named ``name``, also given as its obs column ``<key>_<factor>`` or its position (int)."""
        if isinstance(name, (int, np.integer)) and not isinstance(name, bool):
            return self.info.index[int(name)]
        if name in self.info.index:
            return name
        by_column = self.info.index[self.info["obs_column"] == name]
        if len(by_column):
            return by_column[0]
        prefix = f"{self.key}_"
        if isinstance(name, str) and name.startswith(prefix) and name[len(prefix):] in self.info.index:
            return name[len(prefix):]
        raise KeyError(f"{name!r} is not a factor of the pathfactor result under key {self.key!r} (factors: "
                       f"{', '.join(self.info.index[:8])}{', ...' if len(self.info) > 8 else ''})")


def read_results(adata, key: str | None = None) -> Results:
    """The pathfactor result under ``key`` (``None``: the only one) as pandas objects, checked for shape."""
    key = resolve_key(adata, key)
    meta = adata.uns[key]
    factors = names(meta["factor_names"])
    k = len(factors)
    if f"X_{key}" not in adata.obsm or f"{key}_loadings" not in adata.varm:
        raise ValueError(f"adata.uns[{key!r}] is a pathfactor result but adata.obsm['X_{key}'] or "
                         f"adata.varm['{key}_loadings'] is missing")

    def table(matrix, index, what):
        values = np.asarray(matrix.toarray() if hasattr(matrix, "toarray") else matrix)
        if values.shape != (len(index), k):
            raise ValueError(f"{what} has shape {values.shape}, expected {(len(index), k)}")
        return pd.DataFrame(values, index=pd.Index(index), columns=pd.Index(factors, name="factor"))

    scores = table(adata.obsm[f"X_{key}"], adata.obs_names, f"adata.obsm['X_{key}']").astype(float)
    loadings = table(adata.varm[f"{key}_loadings"], adata.var_names, f"adata.varm['{key}_loadings']").astype(float)
    annotation = None
    if f"{key}_annotation" in adata.varm:
        annotation = table(adata.varm[f"{key}_annotation"], adata.var_names,
                           f"adata.varm['{key}_annotation']").astype(bool)
    kinds = names(meta.get("factor_kinds")) or ["factor"] * k
    relevance = np.ravel(np.asarray(meta["relevance"], dtype=float))
    active = np.ravel(np.asarray(meta["active"], dtype=bool)) if "active" in meta else np.isfinite(relevance)
    if not (len(kinds) == len(relevance) == len(active) == k):
        raise ValueError(f"adata.uns[{key!r}]: factor_kinds, relevance and active must each have one entry per "
                         f"factor ({k} factor_names)")
    column = dict(zip(names(meta.get("obs_factors")), names(meta.get("obs_columns"))))
    info = pd.DataFrame({"kind": kinds, "relevance": relevance, "active": active,
                         "obs_column": [column.get(f, "") for f in factors]}, index=pd.Index(factors, name="factor"))
    return Results(key=key, model=str(scalar(meta.get("model"))), scores=scores, loadings=loadings,
                   annotation=annotation, info=info, measure=str(scalar(meta.get("relevance_measure", "R^2"))))
