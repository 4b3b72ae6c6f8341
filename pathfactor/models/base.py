"""The common face of every pathfactor model: results as DataFrames, AnnData out, save/load without pickle.

A model's constructor only stores hyper-parameters; ``fit`` validates at the door, learns, and fills the
attributes that end in ``_``. Subclasses implement ``fit`` and ``transform`` and call ``_set_results``.
"""
from __future__ import annotations

import inspect
import json
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from .. import __version__
from ..evaluate import ACTIVE_FRACTION, refined_annotations

__all__ = ["LatentModel", "REGISTRY", "load", "factor_layout"]

#: model class name -> class, filled by ``LatentModel.__init_subclass__`` (used by :func:`load`)
REGISTRY: dict[str, type] = {}

#: a factor is flagged inactive when it explains less than this fraction of the variance (R^2)
MIN_RELEVANCE = 1e-4

_FORMAT = "pathfactor-model"
_FORMAT_VERSION = 1


def factor_layout(term_names, n_sparse: int, n_dense: int, dense_name: str = "dense") -> tuple[list[str], list[str]]:
    """Names and kinds of a model's factors, in their order: one per gene set (named after it), then
    ``sparse_i``, then ``{dense_name}_i``."""
    names = [*term_names, *(f"sparse_{i}" for i in range(n_sparse)), *(f"{dense_name}_{i}" for i in range(n_dense))]
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
        super().__init_subclass__(**kwargs)
        REGISTRY[cls.__name__] = cls

    # ------------------------------------------------------------------ parameters
    def get_params(self) -> dict:
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {name: getattr(self, name) for name in names}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

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
        in a factor when ``|w_gk| > fraction * max_g |w_gk|``."""
        self._check_fitted()
        if self.annotation_ is None:
            raise ValueError(f"this {type(self).__name__} was fitted without gene-set annotations")
        return refined_annotations(self.loadings_, self.annotation_, fraction)

    # ------------------------------------------------------------------ AnnData out
    def write(self, adata, key: str | None = None) -> None:
        """Write results into ``adata`` (modified in place): ``obsm["X_<key>"]``, ``varm["<key>_loadings"]``
        (and ``_loadings_sd``, ``_annotation``, ``_covariate_effects``, ``_covariate_effects_sd``), ``uns[key]``."""
        self._check_fitted()
        key = key or self.key
        if list(adata.obs_names) != list(self.factor_scores_.index):
            raise ValueError("adata's cells differ from the cells the model was fitted on; write to the AnnData "
                             "given to fit, or use .transform(new_adata) for new cells")
        missing = self.loadings_.index.difference(adata.var_names)
        if len(missing):
            raise ValueError(f"{len(missing)} genes of the model are not in adata.var_names (e.g. {list(missing[:3])})")
        adata.obsm[f"X_{key}"] = self.factor_scores_.to_numpy(dtype=np.float32)

        def per_gene(frame, fill):
            out = frame.reindex(adata.var_names, fill_value=fill).to_numpy()
            return out if out.dtype == bool else out.astype(np.float32)

        adata.varm[f"{key}_loadings"] = per_gene(self.loadings_, 0.0)
        for suffix, frame, fill in [("loadings_sd", self.loadings_sd_, 0.0), ("annotation", self.annotation_, False),
                                    ("covariate_effects", self.covariate_effects_, 0.0),
                                    ("covariate_effects_sd", self.covariate_effects_sd_, 0.0)]:
            if frame is not None:
                adata.varm[f"{key}_{suffix}"] = per_gene(frame, fill)
        adata.uns[key] = {
            "model": type(self).__name__,
            "version": __version__,
            "factor_names": [str(n) for n in self.loadings_.columns],
            "factor_kinds": [str(k) for k in self.factor_kinds_],
            "relevance": self.relevance_.to_numpy(dtype=float),
            "relevance_measure": self.relevance_measure,
            "active": self.active_.to_numpy(dtype=bool),
            "covariate_names": [] if self.covariate_effects_ is None else [str(c) for c in self.covariate_effects_.columns],
            "params": {k: v for k, v in self.get_params().items() if isinstance(v, (int, float, str, bool))},
        }

    # ------------------------------------------------------------------ save / load (JSON + npz, never pickle)
    def _extra_state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """Model-specific (json, arrays) needed by ``transform``; subclasses extend."""
        return {}, {}

    def _load_extra_state(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        pass

    def save(self, path) -> Path:
        """Save to directory ``path`` as ``model.json`` + ``arrays.npz`` (no pickle). Returns the path."""
        self._check_fitted()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        extra_meta, extra_arrays = self._extra_state()
        meta = {
            "format": _FORMAT, "format_version": _FORMAT_VERSION, "pathfactor_version": __version__,
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
        (path / "model.json").write_text(json.dumps(meta, indent=1))
        np.savez(path / "arrays.npz", **arrays)
        return path


#: model.json's entries and their JSON types; arrays.npz's arrays
_META_KEYS = {"model": str, "params": dict, "obs_names": list, "var_names": list, "factor_names": list,
              "factor_kinds": list, "covariate_names": list, "history": list, "extra": dict}
_ARRAYS = ("scores", "loadings", "relevance")


def _corrupted(where, what: str) -> ValueError:
    return ValueError(f"{where} {what}; the saved model is corrupted or incomplete: save it again")


def _read_meta(meta_file: Path) -> dict:
    """model.json, checked: a JSON object of the pathfactor format and a readable version, with every entry."""
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{meta_file} is not valid JSON: {err}") from err
    if not isinstance(meta, dict):
        raise _corrupted(meta_file, f"holds a JSON {type(meta).__name__}, not the object pathfactor writes")
    path = meta_file.parent
    fmt, version = meta.get("format"), meta.get("format_version")
    if fmt != _FORMAT:
        raise ValueError(f"{path} holds format {fmt!r} v{version}, not a pathfactor model (format {_FORMAT!r}); "
                         "pf.load reads only directories written by model.save")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise _corrupted(meta_file, f"has format_version {version!r}, not an integer version (this pathfactor "
                                    f"writes {_FORMAT_VERSION})")
    if version > _FORMAT_VERSION:
        raise ValueError(f"{path} holds format {fmt!r} v{version}, which this pathfactor {__version__} cannot read; "
                         "upgrade pathfactor")
    missing = [k for k in _META_KEYS if k not in meta]
    if missing:
        raise _corrupted(meta_file, f"lacks the entries {missing}")
    wrong = [k for k, t in _META_KEYS.items() if not isinstance(meta[k], t)]
    if wrong:
        raise _corrupted(meta_file, "has entries of the wrong type: "
                                    + ", ".join(f"{k} is a {type(meta[k]).__name__}" for k in wrong))
    for key in ("obs_names", "var_names", "factor_names", "factor_kinds", "covariate_names"):
        if not all(isinstance(v, str) for v in meta[key]):
            raise _corrupted(meta_file, f"has non-string entries in {key}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in meta["history"]):
        raise _corrupted(meta_file, "has non-numeric entries in history")
    levels = meta.get("covariate_levels")
    if levels is not None and not (isinstance(levels, dict) and all(
            isinstance(v, list) and all(isinstance(x, str) for x in v) for v in levels.values())):
        raise _corrupted(meta_file, "has covariate_levels that are not {covariate: [levels]}")
    return meta


def _read_arrays(array_file: Path) -> dict[str, np.ndarray]:
    """arrays.npz, checked: a zip of plain numeric arrays (object arrays would need unpickling: refused)."""
    if not zipfile.is_zipfile(array_file):
        raise _corrupted(array_file, "is not an .npz archive (not a zip file; truncated or overwritten?)")
    try:
        with np.load(array_file, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as err:
        raise _corrupted(array_file, f"cannot be read ({type(err).__name__}: {err})") from err
    odd = [k for k, a in arrays.items() if a.dtype.kind not in "biuf"]
    if odd:
        raise _corrupted(array_file, f"holds non-numeric arrays {odd}")
    return arrays


def _check_shapes(meta: dict, arrays: dict, array_file: Path) -> None:
    missing = [k for k in _ARRAYS if k not in arrays]
    if missing:
        raise _corrupted(array_file, f"lacks the arrays {missing}")
    N, G = len(meta["obs_names"]), len(meta["var_names"])
    K, C = len(meta["factor_names"]), len(meta["covariate_names"])
    if len(meta["factor_kinds"]) != K:
        raise _corrupted(array_file.parent / "model.json", f"lists {K} factor names but {len(meta['factor_kinds'])} "
                                                           "factor kinds")
    expected = {"scores": (N, K), "loadings": (G, K), "relevance": (K,), "loadings_sd": (G, K),
                "annotation": (G, K), "covariate_effects": (G, C), "covariate_effects_sd": (G, C)}
    for name, shape in expected.items():
        if name in arrays and arrays[name].shape != shape:
            raise _corrupted(array_file, f"holds {name!r} of shape {arrays[name].shape}, but model.json describes "
                                         f"{N} cells, {G} genes, {K} factors and {C} covariate columns, so {shape}")


def load(path) -> LatentModel:
    """Load a model saved with ``model.save(path)``. Only JSON and numeric arrays are read; nothing is unpickled.
    Every entry and array is checked: a corrupted directory is a ``ValueError`` naming the file and the fault."""
    path = Path(path)
    meta_file, array_file = path / "model.json", path / "arrays.npz"
    if not meta_file.is_file() or not array_file.is_file():
        raise ValueError(f"{path} is not a saved pathfactor model (needs model.json and arrays.npz)")
    meta = _read_meta(meta_file)
    cls = REGISTRY.get(meta["model"])
    if cls is None:
        raise ValueError(f"{path} holds an unknown model {meta['model']!r}; known: {sorted(REGISTRY)}")
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(meta["params"]) - set(accepted))
    if unknown:
        raise _corrupted(meta_file, f"gives {cls.__name__} the unknown parameters {unknown} (it takes {accepted})")
    arrays = _read_arrays(array_file)
    _check_shapes(meta, arrays, array_file)
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
        raise _corrupted(path, f"lacks {cls.__name__}'s entry {err.args[0]!r} (model.json 'extra' or "
                               f"arrays.npz 'extra_{err.args[0]}')") from err
    except (TypeError, ValueError, AttributeError, IndexError) as err:
        raise _corrupted(path, f"does not hold a valid {cls.__name__} ({type(err).__name__}: {err})") from err
    return model
