"""The common face of every pathfactor model: results as DataFrames, AnnData out, save/load without pickle.

A model's constructor only stores hyper-parameters; ``fit`` validates at the door, learns, and fills the
attributes that end in ``_``. Subclasses implement ``fit`` and ``transform`` and call ``_set_results``.
"""
from __future__ import annotations

import glob
import inspect
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .. import __version__
from ..evaluate import ACTIVE_FRACTION, membership_probability, refined_annotations
from ..data.inputs import as_matrix, looks_like_counts
from ..train import keeps_global_random_state, resolve_device, seed_everything
from . import anndata_io
from .registry import REGISTRY, model_class, model_names
from .persist import (ARRAY_FILE, FORMAT, FORMAT_VERSION, MODEL_FILE, array_record, corrupted, read_arrays, read_meta,
                      write_model)

__all__ = ["LatentModel", "REGISTRY", "load", "factor_layout"]


#: a factor is flagged inactive when it explains less than this fraction of the variance (R^2)
MIN_RELEVANCE = 1e-4


def factor_layout(term_names, n_sparse: int, n_dense: int, dense_name: str = "dense") -> tuple[list[str], list[str]]:
    """Names and kinds of a model's factors, in their order: one per gene set (named after it), then
    ``sparse_i``, then ``{dense_name}_i``, numbered from 1 as every model's unannotated factors (PC1, z1, nmf_1)."""
    names = [*term_names, *(f"sparse_{i}" for i in range(1, n_sparse + 1)),
             *(f"{dense_name}_{i}" for i in range(1, n_dense + 1))]
    kinds = ["annotated"] * len(term_names) + ["sparse"] * n_sparse + ["dense"] * n_dense
    return names, kinds


class LatentModel:
    """Base class: ``Y ≈ X W^T (+ Z B^T)`` with named factors.

    Attributes (after ``fit``)
    --------------------------
    factor_scores_ : DataFrame, cells x factors (X)
    loadings_ : DataFrame, genes x factors (W, posterior mean where the model is Bayesian)
    loadings_sd_ : DataFrame or None, posterior sd of W
    annotation_ : DataFrame or None, genes x factors prior gene-set membership (False for unannotated factors)
    covariate_effects_, covariate_effects_sd_ : DataFrame or None, genes x covariate levels (B)
    covariate_levels_ : dict or None, each categorical covariate's levels at fit time (reference first), with
        which ``transform`` encodes new cells
    factor_kinds_ : Series, "annotated" | "sparse" | "dense" | "latent" per factor
    relevance_ : Series, R^2 of each factor on the training data (see ``evaluate.factor_r2``)
    active_ : Series of bool, relevance above ``MIN_RELEVANCE``
    history_ : list of float, the training objective per epoch
    """

    key = "model"
    #: what ``relevance_`` measures (reports and the CLI print it)
    relevance_measure = "R^2"

    def __init_subclass__(cls, **kwargs):
        """Register the model for :func:`load`; its own ``fit`` and ``transform`` leave the caller's global random
        generators as they found them (a fit seeds and draws from them internally)."""
        super().__init_subclass__(**kwargs)
        REGISTRY[cls.__name__] = cls
        for name in ("fit", "transform"):
            if name in vars(cls):
                setattr(cls, name, keeps_global_random_state(vars(cls)[name]))

    # ------------------------------------------------------------------ parameters
    @classmethod
    def _param_names(cls) -> list[str]:
        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]

    def get_params(self, deep: bool = True) -> dict:
        """The constructor's parameters (scikit-learn's estimator contract: ``clone``, grid search). ``deep`` is
        accepted for that contract; no parameter is itself an estimator."""
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params) -> "LatentModel":
        """Set constructor parameters (checked when ``fit`` runs); returns the model."""
        unknown = sorted(set(params) - set(self._param_names()))
        if unknown:
            raise ValueError(f"{type(self).__name__} has no parameters {unknown}; it takes {self._param_names()}")
        for name, value in params.items():
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    def _begin_fit(self, data, layer, *, seed: int, device="auto", use_highly_variable=None, gaussian: bool = True,
                   read=as_matrix):
        """The first steps every fit shares, after checking its parameters: seed the generators (inside the
        caller's kept random state), resolve the device and dtype, read and check the data (``read``:
        :func:`~pathfactor.data.inputs.as_matrix` or a model's wrapper of it), note the inputs. Returns
        ``(matrix, generator, device, dtype)``."""
        generator = seed_everything(seed)
        dev, dt = resolve_device(device), getattr(torch, self.dtype)
        matrix = read(data, layer, use_highly_variable=use_highly_variable)
        self._note_inputs(matrix, gaussian=gaussian, seed=seed)
        return matrix, generator, dev, dt

    def _note_inputs(self, matrix, gaussian: bool = True, seed: int | None = None) -> None:
        """Record what a fit reads (``genes_left_out_``: genes outside ``var["highly_variable"]``, which get zero
        loadings in :meth:`write`; ``seed_``) and warn when a Gaussian model is given raw counts."""
        self.genes_left_out_, self.seed_ = list(matrix.genes_left_out), seed
        if gaussian and looks_like_counts(matrix):
            warnings.warn(f"{type(self).__name__} models log-normalised data with Gaussian noise, but these look like "
                          "raw counts (non-negative integers); normalise and log-transform them first "
                          "(sc.pp.normalize_total, sc.pp.log1p), or use a count model (Spex(likelihood='nb'), VAE, "
                          "NMF(loss='kl'))", UserWarning, stacklevel=3)

    def _check_fitted(self) -> None:
        if not hasattr(self, "loadings_"):
            raise RuntimeError(f"this {type(self).__name__} is not fitted yet; call .fit(adata, ...) first")

    # ------------------------------------------------------------------ results
    def _set_results(self, *, scores, loadings, obs_names, var_names, factor_names, factor_kinds, relevance,
                     loadings_sd=None, annotation=None, covariate_effects=None, covariate_effects_sd=None,
                     covariate_names=(), history=()) -> None:
        names = pd.Index(factor_names, name="factor")
        self.factor_scores_ = pd.DataFrame(np.asarray(scores), index=pd.Index(obs_names), columns=names)
        self.loadings_ = pd.DataFrame(np.asarray(loadings), index=pd.Index(var_names), columns=names)
        frame = lambda a, cols: None if a is None else pd.DataFrame(np.asarray(a), index=self.loadings_.index, columns=cols)
        self.loadings_sd_ = frame(loadings_sd, names)
        self.annotation_ = None if annotation is None else frame(np.asarray(annotation, dtype=bool), names)
        cov = pd.Index(list(covariate_names), name="covariate")
        self.covariate_effects_ = frame(covariate_effects, cov) if len(cov) else None
        self.covariate_effects_sd_ = frame(covariate_effects_sd, cov) if len(cov) else None
        levels = getattr(covariate_names, "levels", None)  # inputs.CovariateNames from covariate_design
        self.covariate_levels_ = None if levels is None else {str(k): [str(v) for v in vs] for k, vs in levels.items()}
        self.factor_kinds_ = pd.Series(list(factor_kinds), index=names, name="kind")
        self.relevance_ = pd.Series(np.asarray(relevance, dtype=float), index=names, name="relevance")
        self.active_ = (self.relevance_ > MIN_RELEVANCE).rename("active")
        self.history_ = [float(v) for v in history]

    def relevance(self, active_only: bool = False) -> pd.Series:
        """R^2 of each factor on the training data, most relevant first."""
        self._check_fitted()
        rel = self.relevance_[self.active_] if active_only else self.relevance_
        return rel.sort_values(ascending=False)

    def refined_annotations(self, fraction: float = ACTIVE_FRACTION) -> pd.DataFrame:
        """Genes the data add to (``gained``) and remove from (``lost``) each annotated term; a gene is active
        in a factor when ``|w_gk| > fraction * max_g |w_gk|``. Models with posterior sds also report each listed
        gene's membership probability (``p_gained``, ``p_lost``; :meth:`membership_probability`)."""
        self._check_fitted()
        if self.annotation_ is None:
            raise ValueError(f"this {type(self).__name__} was fitted without gene-set annotations")
        return refined_annotations(self.loadings_, self.annotation_, fraction, loadings_sd=self.loadings_sd_)

    def membership_probability(self, fraction: float = ACTIVE_FRACTION) -> pd.DataFrame:
        """Genes x factors posterior probability that a gene is active in a factor, P(|w_gk| > fraction * max_g
        |E w_gk|) under the Gaussian marginal of q(w_gk) (:func:`pathfactor.evaluate.membership_probability`)."""
        self._check_fitted()
        if self.loadings_sd_ is None:
            raise ValueError(f"{type(self).__name__} has no posterior sds of its loadings, so no membership "
                             "probability; use a Bayesian model (e.g. Spex, Supervised, PPCA(method='vi'))")
        return membership_probability(self.loadings_, self.loadings_sd_, fraction)

    # ------------------------------------------------------------------ AnnData out
    def write(self, adata, key: str | None = None) -> None:
        """Write results into ``adata`` (modified in place) under ``key`` (default: the model's ``key``).

        - ``obsm["X_<key>"]``: all factor scores, in the model's factor order (``uns[key]["factor_names"]``)
        - ``obs["<key>_<factor>"]``: the scores of the 10 most relevant active factors (all active ones if fewer),
          e.g. ``obs["spex_HALLMARK_INTERFERON_GAMMA_RESPONSE"]``, so ``sc.pl.umap(adata, color=...)`` finds them
          by name (``pf.tl.scores(adata, key)`` gives every factor as an AnnData)
        - ``varm["<key>_loadings"]`` (and ``_loadings_sd``, ``_annotation``, ``_covariate_effects``,
          ``_covariate_effects_sd``)
        - ``uns[key]``: model, version, factor_names, factor_kinds, relevance, relevance_measure, active,
          covariate_names, params, obs_columns / obs_factors (the obs columns and their factors), n_epochs,
          converged (when the model reports it), seed (when the model records it), genes_left_out (genes outside
          ``var["highly_variable"]`` that the fit left out: their loadings are 0). Lists come back from an h5ad
          file as numpy arrays.

        A key another tool wrote (``uns[key]`` that is not a pathfactor result, or ``obsm["X_<key>"]`` /
        ``varm["<key>_loadings"]`` / an obs column ``<key>_<factor>`` without a pathfactor ``uns[key]``) is a
        ``ValueError``: pass another ``key=``. A previous pathfactor result under ``key`` is replaced entirely
        (logged at INFO)."""

        self._check_fitted()
        key = key or self.key
        if list(adata.obs_names) != list(self.factor_scores_.index):
            raise ValueError("adata's cells differ from the cells the model was fitted on; write to the AnnData "
                             "given to fit, or use .transform(new_adata) for new cells")
        missing = self.loadings_.index.difference(adata.var_names)
        if len(missing):
            raise ValueError(f"{len(missing)} genes of the model are not in adata.var_names (e.g. {list(missing[:3])})")
        previous = anndata_io.check_key(adata, key)
        ranked = self.relevance_[self.active_].sort_values(ascending=False, kind="stable")
        top = [str(f) for f in ranked.index[:anndata_io.N_OBS_FACTORS]]
        columns = anndata_io.obs_columns(adata, key, top, previous)
        if previous is not None:
            anndata_io.clear_previous(adata, key, previous)

        adata.obsm[f"X_{key}"] = self.factor_scores_.to_numpy(dtype=np.float32)
        for column, factor in zip(columns, top):
            adata.obs[column] = self.factor_scores_[factor].to_numpy(dtype=np.float32)

        def per_gene(frame, fill):
            out = frame.reindex(adata.var_names, fill_value=fill).to_numpy()
            return out if out.dtype == bool else out.astype(np.float32)

        adata.varm[f"{key}_loadings"] = per_gene(self.loadings_, 0.0)
        for suffix, frame, fill in [("loadings_sd", self.loadings_sd_, 0.0), ("annotation", self.annotation_, False),
                                    ("covariate_effects", self.covariate_effects_, 0.0),
                                    ("covariate_effects_sd", self.covariate_effects_sd_, 0.0)]:
            if frame is not None:
                adata.varm[f"{key}_{suffix}"] = per_gene(frame, fill)
        uns = {
            "model": type(self).__name__,
            "version": __version__,
            "factor_names": [str(n) for n in self.loadings_.columns],
            "factor_kinds": [str(k) for k in self.factor_kinds_],
            "relevance": self.relevance_.to_numpy(dtype=float),
            "relevance_measure": self.relevance_measure,
            "active": self.active_.to_numpy(dtype=bool),
            "covariate_names": [] if self.covariate_effects_ is None else [str(c) for c in self.covariate_effects_.columns],
            "params": {k: v for k, v in self.get_params().items() if isinstance(v, (int, float, str, bool))},
            "obs_columns": columns,
            "obs_factors": top,
            "n_epochs": len(self.history_),
        }
        if getattr(self, "converged_", None) is not None:
            uns["converged"] = bool(self.converged_)
        if getattr(self, "seed_", None) is not None:
            uns["seed"] = int(self.seed_)
        if getattr(self, "genes_left_out_", None):  # not var["highly_variable"]: zero loadings above
            uns["genes_left_out"] = [str(g) for g in self.genes_left_out_]
        adata.uns[key] = uns

    # ------------------------------------------------------------------ save / load (JSON + npz, never pickle)
    def _extra_state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """Model-specific (json, arrays) needed by ``transform``; subclasses extend."""
        return {}, {}

    def _load_extra_state(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        pass

    def save(self, path) -> Path:
        """Save to directory ``path`` as ``model.json`` + ``arrays.npz`` (format v2, no pickle); returns the path.

        Atomic (see :func:`persist.write_model`): a crash leaves the previous or the new complete model. The JSON
        records the arrays file's size and sha256 and each array's dtype and shape, which :func:`load` verifies.
        ``path`` may be missing, an empty directory or a saved model (replaced); anything else is refused."""
        self._check_fitted()
        extra_meta, extra_arrays = self._extra_state()
        meta = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "pathfactor_version": __version__,
            "model": type(self).__name__, "params": self.get_params(),
            "obs_names": [str(n) for n in self.factor_scores_.index], "var_names": [str(n) for n in self.loadings_.index],
            "factor_names": [str(n) for n in self.loadings_.columns], "factor_kinds": list(map(str, self.factor_kinds_)),
            "covariate_names": [] if self.covariate_effects_ is None else [str(c) for c in self.covariate_effects_.columns],
            "covariate_levels": getattr(self, "covariate_levels_", None),
            "history": self.history_, "extra": extra_meta,
        }
        arrays = {"scores": self.factor_scores_.to_numpy(), "loadings": self.loadings_.to_numpy(),
                  "relevance": self.relevance_.to_numpy()}
        for name, frame in [("loadings_sd", self.loadings_sd_), ("annotation", self.annotation_),
                            ("covariate_effects", self.covariate_effects_), ("covariate_effects_sd", self.covariate_effects_sd_)]:
            if frame is not None:
                arrays[name] = frame.to_numpy()
        arrays.update({f"extra_{k}": np.asarray(v) for k, v in extra_arrays.items()})
        write_model(path, meta, arrays)
        return Path(path)


def load(path) -> LatentModel:
    """Load a model saved with ``model.save(path)``. Only JSON and numeric arrays are read; nothing is unpickled.

    Everything is verified before it is used (see :mod:`pathfactor.models.persist`): the JSON's size and depth, the
    arrays file's size and sha256, each array's shape, header and finiteness, and the model's own state against its
    parameters. Any defect is a ``ValueError`` naming the file and the fault. Directories of format v1 (written
    before checksums) are refused: fit and save the model again."""
    path = Path(path)
    if not (path / MODEL_FILE).is_file() or not (path / ARRAY_FILE).is_file():
        aside = sorted(path.parent.glob(f".{glob.escape(path.name)}.old-*")) if path.name else []
        hint = f"; an interrupted save left the previous model in {aside[-1]}: rename it back" if aside else ""
        raise ValueError(f"{path} is not a saved pathfactor model (needs {MODEL_FILE} and {ARRAY_FILE}){hint}")
    meta = read_meta(path)
    meta_file = path / MODEL_FILE
    cls = model_class(meta["model"]) if isinstance(meta["model"], str) else None
    if cls is None:
        raise ValueError(f"{path} holds an unknown model {meta['model']!r}; known: {model_names()}")
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(meta["params"]) - set(accepted))
    if unknown:
        raise corrupted(meta_file, f"gives {cls.__name__} the unknown parameters {unknown} (it takes {accepted})")
    arrays = read_arrays(path, array_record(meta, path))
    try:
        model = cls(**meta["params"])
        get = arrays.get
        model._set_results(scores=arrays["scores"], loadings=arrays["loadings"], obs_names=meta["obs_names"],
                           var_names=meta["var_names"], factor_names=meta["factor_names"],
                           factor_kinds=meta["factor_kinds"], relevance=arrays["relevance"],
                           loadings_sd=get("loadings_sd"), annotation=get("annotation"),
                           covariate_effects=get("covariate_effects"), covariate_effects_sd=get("covariate_effects_sd"),
                           covariate_names=meta["covariate_names"], history=meta["history"])
        model.covariate_levels_ = meta.get("covariate_levels")
        model._load_extra_state(meta["extra"], {k[6:]: v for k, v in arrays.items() if k.startswith("extra_")})
    except KeyError as err:
        raise corrupted(path, f"lacks {cls.__name__}'s entry {err.args[0]!r} (model.json 'extra' or "
                              f"arrays.npz 'extra_{err.args[0]}')") from err
    except (TypeError, ValueError, AttributeError, IndexError, OverflowError, RuntimeError) as err:  # + RecursionError
        raise corrupted(path, f"does not hold a valid {cls.__name__} ({type(err).__name__}: {str(err)[:300]})") from err
    return model
