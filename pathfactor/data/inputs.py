"""Turn what a user hands us (AnnData, numpy, pandas, scipy sparse) into a checked matrix.

Every check raises a ``ValueError`` that names the problem and the fix. Nothing of the caller's
object is modified.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = ["Matrix", "CovariateNames", "as_matrix", "aligned_centred", "check_counts", "check_variance",
           "covariate_design", "new_covariates", "intervention_groups", "levels_explained_by", "ordered_levels",
           "input_file", "read_h5ad", "working_dtype", "looks_like_counts", "highly_variable_mask"]

log = logging.getLogger(__name__)


#: values per block (32 MiB in float64) when data are centred or summed block by block
BLOCK_VALUES = 2**22


@dataclass(frozen=True)
class Matrix:
    """A cells x genes matrix with its names. ``Y`` is a float numpy array or a scipy CSR matrix."""

    Y: np.ndarray | sp.csr_matrix
    obs_names: pd.Index
    var_names: pd.Index
    #: genes of the data left out of the fit (those not ``var["highly_variable"]``; see :func:`as_matrix`)
    genes_left_out: tuple = ()

    @property
    def shape(self) -> tuple[int, int]:
        return self.Y.shape

    def dense(self, dtype=np.float32) -> np.ndarray:
        Y = self.Y.toarray() if sp.issparse(self.Y) else self.Y
        return np.asarray(Y, dtype=dtype)

    def row_blocks(self, rows: int | None = None):
        """The rows ``rows`` at a time (default: about :data:`BLOCK_VALUES` values), dense float64 (a sparse
        matrix is densified one block at a time)."""
        rows = rows or max(1, BLOCK_VALUES // max(self.Y.shape[1], 1))
        for start in range(0, self.Y.shape[0], rows):
            block = self.Y[start:start + rows]
            yield np.asarray(block.toarray() if sp.issparse(block) else block, dtype=np.float64)

    def moments(self) -> tuple[np.ndarray, np.ndarray]:
        """Each gene's mean and (unbiased) variance, float64, in two passes over blocks of rows (no float64 copy)."""
        n = self.Y.shape[0]
        if n == 0:
            return np.zeros(self.Y.shape[1]), np.zeros(self.Y.shape[1])
        mean = sum(b.sum(0) for b in self.row_blocks()) / n
        var = sum(((b - mean) ** 2).sum(0) for b in self.row_blocks()) / max(n - 1, 1)
        return mean, var

    def centred(self, device, dtype, mean=None, scale: float = 1.0):
        """((Y - gene means) / scale, gene means) as torch tensors on ``device``: the means in float64, Y in
        ``dtype``, built block by block (the data are never held in float64 whole)."""
        import torch

        if mean is None:
            mean = self.moments()[0]
        out = torch.empty(self.Y.shape, dtype=dtype, device=device)
        start = 0
        for block in self.row_blocks():
            out[start:start + len(block)] = torch.as_tensor((block - mean) / scale, device=device).to(dtype)
            start += len(block)
        return out, torch.as_tensor(np.asarray(mean, dtype=np.float64), device=device)

    def astype(self, dtype) -> "Matrix":
        """The same matrix with values of ``dtype`` (itself when they already are)."""
        if self.Y.dtype == np.dtype(dtype):
            return self
        return Matrix(self.Y.astype(dtype), self.obs_names, self.var_names, self.genes_left_out)


#: sums of squares of the data must stay this factor below the dtype's largest number (see check_magnitude)
SQUARES_HEADROOM = 1e8
#: data whose largest |value| is below this are too small for float32 arithmetic: their squares come within
#: ``SQUARES_HEADROOM`` of float32's smallest normal number (1.2e-38), below which products lose their digits or
#: flush to zero (e.g. at 1e-25 every square is 0). See :func:`working_dtype`.
SMALL_LIMIT = float(np.sqrt(np.finfo(np.float32).tiny * SQUARES_HEADROOM))


def working_dtype(matrix: Matrix, dtype):
    """The dtype to compute with on ``matrix``: ``dtype``, or float64 when ``dtype`` is float32 and the data are
    too small for float32 arithmetic (largest |value| below :data:`SMALL_LIMIT`, ~1e-15) -- so that a model fits
    data at any scale that float32 can store. ``dtype`` may be a name, a numpy or a torch dtype; the answer is of
    the same kind. (Large values are refused by :func:`as_matrix` instead.)"""
    is_torch = type(dtype).__module__.startswith("torch")
    name = str(dtype).replace("torch.", "") if is_torch else np.dtype(dtype).name
    if name != "float32":
        return dtype
    vals = _values(matrix.Y)
    top = float(np.abs(vals).max()) if vals.size else 0.0
    if top == 0.0 or top >= SMALL_LIMIT:
        return dtype
    log.info("the data's values are at most %.3g, too small for float32 arithmetic: computing in float64", top)
    if is_torch:
        import torch

        return torch.float64
    return "float64" if isinstance(dtype, str) else np.dtype(np.float64)


def _values(Y):
    return Y.data if sp.issparse(Y) else np.asarray(Y)


def _flat_blocks(vals: np.ndarray):
    """``vals`` flattened, in blocks of :data:`BLOCK_VALUES` (views where the array is contiguous)."""
    flat = vals.reshape(-1)
    for start in range(0, flat.size, BLOCK_VALUES):
        yield flat[start:start + BLOCK_VALUES]


def _all_finite(vals: np.ndarray) -> bool:
    return all(np.isfinite(block).all() for block in _flat_blocks(vals))


def _max_abs(vals: np.ndarray) -> float:
    return max((float(np.abs(block).max()) for block in _flat_blocks(vals) if block.size), default=0.0)


def as_matrix(data, layer: str | None = None, dtype=np.float32, new_cells: bool = False,
              use_highly_variable: bool | None = False, copy: bool = True, allow_nan: bool = False) -> Matrix:
    """Extract and validate the expression matrix of ``data``.

    ``data`` is an AnnData (``layer=None`` takes ``.X``), a pandas DataFrame (cells x genes), a numpy
    array or any scipy sparse matrix (names are then generated). ``new_cells=True``: the cells are for a
    fitted model's ``transform``, where a single cell is enough (a fit needs 2). ``use_highly_variable``: keep only
    the genes of an AnnData's boolean ``var["highly_variable"]`` (as ``sc.pp.pca``): ``None`` when the column
    exists, ``True`` requires it, ``False`` keeps every gene; the others are named in ``genes_left_out``.
    ``copy=False``: the matrix may share the caller's memory (when it already has ``dtype``), for a model that
    only reads it; the default copies, so that nothing a model does reaches the caller's data.
    ``allow_nan=True``: NaN marks a missing entry and passes (infinite values never do).
    """
    if hasattr(data, "obs_names") and hasattr(data, "var_names"):
        if layer is None:
            Y = data.X
        elif layer not in data.layers:
            raise ValueError(
                f"layer {layer!r} is not in adata.layers (it has {sorted(data.layers.keys())}); "
                "pass one of those or layer=None for adata.X"
            )
        else:
            Y = data.layers[layer]
        if Y is None:
            raise ValueError("adata.X is empty (None); pass layer= naming the layer that holds the expression data")
        obs, var = pd.Index(data.obs_names), pd.Index(data.var_names)
    elif layer is not None:
        raise ValueError("layer= only applies to AnnData input; pass the matrix itself instead")
    elif isinstance(data, pd.DataFrame):
        Y, obs, var = data.to_numpy(), pd.Index(data.index.astype(str)), pd.Index(data.columns.astype(str))
    else:
        Y = data
        if not (sp.issparse(Y) or isinstance(Y, np.ndarray)):
            try:
                Y = np.asarray(Y)
            except Exception as err:  # pragma: no cover - exotic inputs
                raise ValueError(f"cannot read expression data of type {type(data).__name__}; pass AnnData, "
                                 "a DataFrame, a numpy array or a scipy sparse matrix") from err
        obs = pd.Index([f"cell_{i}" for i in range(Y.shape[0])]) if Y.ndim == 2 else None
        var = pd.Index([f"gene_{j}" for j in range(Y.shape[1])]) if Y.ndim == 2 else None

    if getattr(Y, "ndim", 2) != 2:
        raise ValueError(f"expression data must be 2-D (cells x genes), got shape {np.shape(Y)}")
    if hasattr(Y, "to_memory"):  # backed AnnData datasets
        Y = Y.to_memory()
    left_out = ()
    keep = highly_variable_mask(data, use_highly_variable)
    if keep is not None:
        Y, left_out, var = Y[:, keep], tuple(var[~keep]), var[keep]
    if sp.issparse(Y):
        Y = sp.csr_matrix(Y)
    else:
        Y = np.asarray(Y)
    if Y.dtype == object or np.issubdtype(Y.dtype, np.complexfloating) or not (
            np.issubdtype(Y.dtype, np.number) or Y.dtype == bool):
        raise ValueError(f"expression data must be numeric, got dtype {Y.dtype}; convert it with .astype(float)")
    n, g = Y.shape
    if n == 0 or g == 0:
        raise ValueError(f"expression data is empty ({n} cells x {g} genes); filter less strictly")
    if n < 2 and not new_cells:
        raise ValueError("need at least 2 cells to fit a latent variable model, got 1")
    if var.has_duplicates:
        dup = var[var.duplicated()].unique()[:5].tolist()
        raise ValueError(
            f"duplicate gene names in var_names (e.g. {dup}); make them unique first, "
            "e.g. adata.var_names_make_unique()"
        )
    Y = Y.astype(dtype, copy=copy and keep is None)  # not aliased unless asked (a gene subset is a copy already)
    vals = _values(Y)
    if not _all_finite(vals):
        if allow_nan and not any(np.isinf(block).any() for block in _flat_blocks(vals)):
            check_magnitude(vals[np.isfinite(vals)], n, g, Y.dtype)
            return Matrix(Y, obs, var, left_out)
        bad = int((~np.isfinite(vals)).sum())
        raise ValueError(
            f"expression data contains {bad} NaN or infinite values; remove or impute them "
            f"(e.g. np.nan_to_num) before {'transforming' if new_cells else 'fitting'}, or let Spex treat NaN as "
            "missing entries (fit(..., allow_missing=True))"
        )
    check_magnitude(vals, n, g, Y.dtype)
    return Matrix(Y, obs, var, left_out)


def highly_variable_mask(data, use: bool | None) -> np.ndarray | None:
    """The boolean gene mask of ``var["highly_variable"]`` to fit on, or None for every gene."""
    var = getattr(data, "var", None)
    has = isinstance(var, pd.DataFrame) and "highly_variable" in var.columns
    if use is False or (use is None and not has):
        return None
    if not has:
        raise ValueError("use_highly_variable=True but adata.var has no 'highly_variable' column; run "
                         "sc.pp.highly_variable_genes first, or pass use_highly_variable=False")
    keep = var["highly_variable"].to_numpy()
    if keep.dtype != bool:
        raise ValueError(f"adata.var['highly_variable'] must be boolean, got dtype {keep.dtype}")
    if not keep.any():
        raise ValueError("adata.var['highly_variable'] marks no gene; recompute it or pass use_highly_variable=False")
    if keep.all():
        return None
    log.info("fitting the %d of %d genes marked highly_variable (use_highly_variable=False fits every gene)",
             int(keep.sum()), len(keep))
    return keep


def looks_like_counts(matrix: Matrix) -> bool:
    """Whether the data look like raw counts: non-negative integers with some values of 10 or more (log-normalised
    data are not integers; a binary matrix is not counts)."""
    vals = _values(matrix.Y)
    sample = vals[:: max(1, vals.size // 200_000)]  # a strided sample decides: whole-matrix checks cost a pass
    return bool(sample.size and sample.min() >= 0 and sample.max() >= 10 and np.all(sample == np.round(sample)))


def check_magnitude(vals: np.ndarray, n: int, g: int, dtype) -> None:
    """Refuse values so large that their squares, summed over the ``n x g`` entries, come within a factor
    ``SQUARES_HEADROOM`` of the largest ``dtype`` number: the models form such sums and products of them (Gram
    matrices, residual norms, NMF's ``X W^T W``), which would overflow to Inf/NaN mid-way."""
    if not vals.size:
        return
    top = _max_abs(vals)
    limit = float(np.sqrt(np.finfo(dtype).max / SQUARES_HEADROOM / (float(n) * float(g))))
    if top > limit:
        raise ValueError(
            f"expression data hold values up to {top:.3g}, too large for {np.dtype(dtype).name} arithmetic (at most "
            f"{limit:.3g} for {n} cells x {g} genes: the models sum their squares); log-transform "
            "(e.g. sc.pp.normalize_total + sc.pp.log1p) or scale the data first"
        )


def check_variance(matrix: Matrix, model: str) -> None:
    """Raise if every gene of ``matrix`` is constant: the centred data are then all zero and a model of their
    covariance (PCA, PPCA) has nothing to fit."""
    Y = matrix.Y
    if Y.shape[0] < 2:
        return
    if sp.issparse(Y):  # column max and min count the implicit zeros
        spread = np.asarray(Y.max(axis=0).toarray() - Y.min(axis=0).toarray())
    else:
        spread = Y.max(axis=0) - Y.min(axis=0)
    if not (spread > 0).any():
        raise ValueError(
            f"{model}: the expression data have zero variance (every gene is constant across the cells); "
            "remove constant genes (all-zero ones with sc.pp.filter_genes(adata, min_cells=1)) or check that the "
            "right layer was passed"
        )


def aligned_centred(data, layer, var_names, mean) -> tuple[np.ndarray, pd.Index]:
    """``Y - mean`` (float64) of new ``data`` with its genes put in a fitted model's order (extra genes are
    ignored, missing ones are an error), and the new cells' names."""
    matrix = as_matrix(data, layer, new_cells=True)
    missing = pd.Index(var_names).difference(matrix.var_names)
    if len(missing):
        raise ValueError(f"{len(missing)} of the model's {len(var_names)} genes are missing from the new data "
                         f"(e.g. {list(missing[:3])}); pass data with the genes the model was fitted on")
    Y = matrix.Y[:, matrix.var_names.get_indexer(var_names)]
    Y = Y.toarray() if sp.issparse(Y) else np.asarray(Y)
    return Y.astype(np.float64) - np.asarray(mean, dtype=np.float64), matrix.obs_names


def check_counts(matrix: Matrix, likelihood: str) -> None:
    """Raise if ``matrix`` cannot be counts, as a count ``likelihood`` requires."""
    vals = _values(matrix.Y)
    if (vals < 0).any():
        raise ValueError(
            f"the {likelihood} likelihood needs non-negative counts but the data have negative values; "
            "pass raw counts (e.g. layer='counts') or use likelihood='normal' for log-normalised data"
        )
    if vals.size and np.abs(vals - np.round(vals)).max() > 1e-4:  # absolute: 100000.5 is not a count
        raise ValueError(
            f"the {likelihood} likelihood needs integer counts but the data have non-integer values "
            "(log-normalised?); pass raw counts (e.g. layer='counts') or use likelihood='normal'"
        )


class CovariateNames(list):
    """The names of a covariate design's columns (a plain list to every caller), carrying ``levels``: for each
    categorical covariate, its levels at fit time as strings, the reference first. A model keeps them
    (``covariate_levels_``) so that :func:`new_covariates` encodes new cells exactly as the training cells."""

    def __init__(self, names=(), levels: dict | None = None):
        super().__init__(names)
        self.levels = dict(levels or {})


def _covariate_frame(obs, columns, n_cells) -> tuple[pd.DataFrame | None, list]:
    """(frame holding the covariates, their column names): arrays and DataFrames become the frame."""
    if isinstance(columns, str):
        columns = [columns]
    if isinstance(columns, (np.ndarray, pd.DataFrame, pd.Series)):
        frame = pd.DataFrame(columns)
        if frame.shape[0] != n_cells:
            raise ValueError(f"covariates have {frame.shape[0]} rows but the data have {n_cells} cells; "
                             "pass one row per cell, in the order of obs_names")
        columns, obs = [str(c) for c in frame.columns], frame.set_axis([str(c) for c in frame.columns], axis=1)
    if obs is None:
        raise ValueError("covariates given by column name need AnnData input with those columns in .obs")
    return obs, list(columns)


def _covariate_values(obs: pd.DataFrame, col, n_cells: int, what: str = "covariate") -> pd.Series:
    """The obs column ``col`` (a ``what``: covariate, interventions), refused when absent, repeated, of the wrong
    length or with missing values."""
    if col not in obs.columns:
        raise ValueError(f"{what} {col!r} is not a column of obs (columns: {list(obs.columns)[:10]}...)")
    return _checked_values(obs[col], col, n_cells, what)


def _checked_values(values, col, n_cells: int, what: str) -> pd.Series:
    if isinstance(values, pd.DataFrame):
        raise ValueError(f"obs has {values.shape[1]} columns named {col!r}; make the column names unique")
    if len(values) != n_cells:
        raise ValueError(f"{what} {col!r} has {len(values)} values but the data have {n_cells} cells")
    if values.isna().any():
        raise ValueError(f"{what} {col!r} has {int(values.isna().sum())} missing values; "
                         "fill them or drop those cells first")
    return values


def _is_numeric(values: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)


def _numeric(values: pd.Series, col) -> np.ndarray:
    """A numeric covariate's values (float64), refused when infinite or too large for the models' float32
    arithmetic: like the data (:func:`check_magnitude`), the sum of their squares over the cells must stay a
    factor ``SQUARES_HEADROOM`` below the largest float32."""
    v = values.to_numpy(dtype=np.float64)
    if not np.isfinite(v).all():
        raise ValueError(f"covariate {col!r} has infinite values; remove them first")
    top = float(np.abs(v).max()) if v.size else 0.0
    limit = float(np.sqrt(np.finfo(np.float32).max / SQUARES_HEADROOM / max(v.size, 1)))
    if top > limit:
        raise ValueError(f"covariate {col!r} has values up to {top:.3g}, too large for float32 arithmetic (at most "
                         f"{limit:.3g} for {v.size} cells); rescale it first, e.g. divide it by its standard deviation "
                         "or log-transform it")
    return v


def _check_numeric_spread(v: np.ndarray, col) -> None:
    """Refuse a numeric covariate whose variation float32 cannot hold: every value the same after rounding to
    float32 (e.g. 1e10 + small differences), or a spread so small (standard deviation below ``SMALL_LIMIT``) that
    its squares underflow."""
    v32 = v.astype(np.float32)
    sd = float(np.std(v))
    if np.all(v32 == v32[0]) or sd < SMALL_LIMIT:
        raise ValueError(f"covariate {col!r} varies too little for float32 arithmetic (standard deviation {sd:.3g} "
                         f"around {float(np.mean(v)):.6g}); rescale it first, e.g. subtract its mean and divide by its "
                         "standard deviation")


def _as_strings(values: pd.Series) -> np.ndarray:
    return np.asarray(values.astype(str), dtype=object)


def _reference_for(col, reference) -> str | None:
    """The reference level asked for column ``col``: ``reference`` is None, one level (str) or {column: level}."""
    if reference is None:
        return None
    if isinstance(reference, dict):
        return None if reference.get(col) is None else str(reference[col])
    return str(reference)


def ordered_levels(values: pd.Series, col, reference=None, strict: bool = True) -> list[str]:
    """A categorical column's levels present in the cells, as strings, the reference first: the level asked
    for (``reference``: a level, or {column: level}), else the most frequent one (ties: the first in sorted
    order); the others in sorted order (a pandas categorical: in its own order). A reference that is not a
    level of the column is refused (``strict=False``: a single level given for several columns applies to the
    columns that have it)."""
    strings = pd.Series(_as_strings(values))
    counts = strings.value_counts()
    found = sorted(counts.index.tolist())
    if isinstance(values.dtype, pd.CategoricalDtype):  # a categorical's own order (among the levels present)
        found = [str(lv) for lv in values.cat.categories if str(lv) in counts.index]
    asked = _reference_for(col, reference)
    if isinstance(reference, str) and not strict and asked not in counts.index:
        asked = None  # one level named for several columns: it applies to those that have it
    if asked is not None and asked not in counts.index:
        raise ValueError(f"reference level {asked!r} is not a level of {col!r} (levels: {found[:10]}); "
                         f"pass one of them")
    ref = asked if asked is not None else max(found, key=lambda v: (counts[v], -found.index(v)))
    return [ref] + [lv for lv in found if lv != ref]


def covariate_design(obs: pd.DataFrame | None, columns, n_cells: int,
                     reference=None) -> tuple[np.ndarray, CovariateNames]:
    """One-hot/numeric design matrix Z (cells x levels) for ``columns`` of ``obs``.

    Categorical columns give one column per level except the reference (absorbed in the gene means; the level
    ``reference`` names — a level, or {column: level} — else the most frequent, :func:`ordered_levels`), named
    ``COL=level``; numeric columns keep their name. Models centre Z themselves. A covariate that
    is constant (one level, or one numeric value) or listed twice explains nothing and is refused. The names
    come as :class:`CovariateNames`, whose ``levels`` encode new cells the same way (:func:`new_covariates`).
    """
    if columns is None or len(columns) == 0:
        return np.zeros((n_cells, 0), dtype=np.float32), CovariateNames()
    obs, columns = _covariate_frame(obs, columns, n_cells)
    repeated = pd.Index(columns)[pd.Index(columns).duplicated()].unique().tolist()
    if repeated:
        raise ValueError(f"covariate(s) {repeated} are listed twice; their columns would be identical "
                         "(collinear): list each covariate once")
    blocks, names, levels = [], [], {}
    for col in columns:
        values = _covariate_values(obs, col, n_cells)
        if _is_numeric(values):
            v = _numeric(values, col)
            if n_cells > 1 and np.all(v == v[0]):
                raise ValueError(f"covariate {col!r} has a single level [{v[0]:g}] (it is constant); it explains "
                                 "nothing, drop it")
            if n_cells > 1:
                _check_numeric_spread(v, col)
            blocks.append(v[:, None])
            names.append(str(col))
        else:
            found = ordered_levels(values, col, reference, strict=not isinstance(reference, str))
            if len(found) < 2:
                raise ValueError(f"covariate {col!r} has a single level {found}; it explains nothing, drop it")
            levels[str(col)] = found
            strings = _as_strings(values)
            for lv in found[1:]:
                blocks.append((strings == lv).astype(np.float64)[:, None])
                names.append(f"{col}={lv}")
    if isinstance(reference, str) and not any(v[0] == reference for v in levels.values()):
        raise ValueError(f"reference level {reference!r} is not a level of any categorical covariate "
                         f"({ {k: v[:5] for k, v in levels.items()} }); pass one of their levels or {{column: level}}")
    return np.hstack(blocks).astype(np.float32), CovariateNames(names, levels)


def intervention_groups(obs: pd.DataFrame | None, column, n_cells: int,
                        reference: str | None = None) -> tuple[np.ndarray, list[str]]:
    """Each cell's intervention level as a code (0: the reference) and the levels, reference first
    (:func:`ordered_levels`). ``column``: an obs column name, or one label per cell (array or Series)."""
    if isinstance(column, str):
        if obs is None:
            raise ValueError("interventions given by column name need AnnData input with that column in .obs")
        values, name = _covariate_values(obs, column, n_cells, "interventions"), column
    else:
        name = "interventions"
        values = _checked_values(pd.Series(np.asarray(column).ravel()), name, n_cells, "interventions")
    levels = ordered_levels(values, name, reference)
    if len(levels) < 2:
        raise ValueError(f"interventions {name!r} have a single level {levels}; there is nothing to compare")
    codes = pd.Categorical(_as_strings(values), categories=levels).codes.astype(np.int64)
    return codes, levels


def levels_explained_by(codes: np.ndarray, levels: list[str], Z: np.ndarray, tol: float = 1e-6) -> list[str]:
    """The intervention levels (``codes`` as :func:`intervention_groups` gives them) whose indicators t_l, alone or
    in combination, are linear combinations of an intercept and the covariate design ``Z``: their effects on the
    programs and the covariates' effects on the genes cannot be told apart. With Q an orthonormal basis of the
    span of [1, Z], the residuals' Gram matrix is diag(n) - S S^T (S: each level's sum of Q's rows); a level is
    explained when it takes part in an eigenvector of the normalised Gram with eigenvalue <= ``tol``."""
    if Z.shape[1] == 0:
        return []
    U, sv, _ = np.linalg.svd(np.hstack([np.ones((len(Z), 1)), np.asarray(Z, dtype=np.float64)]),
                             full_matrices=False)
    Q = U[:, sv > 1e-10 * sv[0]]  # an orthonormal basis of the span, also when Z's columns are dependent
    sums = np.zeros((len(levels), Q.shape[1]))
    np.add.at(sums, codes, Q)
    n = np.bincount(codes, minlength=len(levels)).astype(np.float64)[1:]
    scale = 1.0 / np.sqrt(n)
    gram = np.eye(len(n)) - (scale[:, None] * sums[1:]) @ (scale[:, None] * sums[1:]).T
    values, vectors = np.linalg.eigh(gram)
    null = vectors[:, values <= tol]
    return [lv for lv, weight in zip(levels[1:], np.abs(null).max(1, initial=0.0)) if weight > 1e-3]


def _encode(obs, columns, n_cells: int, levels: dict) -> tuple[np.ndarray, list[str]]:
    """The design of new cells against a fitted model's categorical ``levels`` (reference first): any subset of
    the levels is fine (one cell, one group); a level the model never saw is refused."""
    if columns is None or len(columns) == 0:
        return np.zeros((n_cells, 0), dtype=np.float32), []
    obs, columns = _covariate_frame(obs, columns, n_cells)
    blocks, names = [], []
    for col in columns:
        values = _covariate_values(obs, col, n_cells)
        known = levels.get(str(col))
        if known is None:
            if not _is_numeric(values):
                raise ValueError(f"covariate {col!r} was numeric when the model was fitted, but the new cells' "
                                 f"values are {values.dtype}; pass numbers")
            blocks.append(_numeric(values, col)[:, None])
            names.append(str(col))
            continue
        strings = _as_strings(values)
        unseen = sorted(set(strings) - set(known))
        if unseen:
            raise ValueError(f"covariate {col!r} of the new cells has levels {unseen[:5]} the model was not "
                             f"fitted with (it knows {known}); drop those cells or refit with them")
        for lv in known[1:]:
            blocks.append((strings == lv).astype(np.float64)[:, None])
            names.append(f"{col}={lv}")
    if not blocks:
        return np.zeros((n_cells, 0), dtype=np.float32), names
    return np.hstack(blocks).astype(np.float32), names


def new_covariates(data, spec, n_cells: int, names: list[str], mean, levels: dict | None = None) -> np.ndarray:
    """Centred covariates of new cells for a model fitted with covariate columns ``names``, means ``mean`` and
    categorical ``levels`` (the model's ``covariate_levels_``): new cells are one-hot encoded against the
    training levels, so a batch of one group, or a single cell, is fine. ``levels=None`` (models saved without
    them) re-derives the levels from the new cells, which then need every level of the training cells."""
    if spec is None:
        raise ValueError("the model was fitted with covariates; pass covariates= for the new cells")
    obs = getattr(data, "obs", None)
    if levels is None:
        Z, new_names = covariate_design(obs, spec, n_cells)
    else:
        Z, new_names = _encode(obs, spec, n_cells, levels)
    if list(new_names) != list(names):
        raise ValueError(f"covariate levels of the new cells {list(new_names)} differ from the model's {list(names)}; "
                         "pass the covariates the model was fitted with")
    return Z - np.asarray(mean)


def unit_scale(Y) -> float:
    """The root mean square of the data's non-zero values (1.0 for all-zero data).

    Models whose numerics hold absolute constants (floors such as float32's eps, thresholds) divide the data by
    it and scale their results back, so that the constants act at the same place relative to the data: data in
    other units then differ by one rounding of each value (and not at all for units a power of two apart)."""
    values = np.asarray(_values(Y), dtype=np.float64)
    values = values[values != 0]
    if not values.size:
        return 1.0
    top = float(np.abs(values).max())  # squares of the values divided by the largest cannot overflow
    return float(np.sqrt(np.mean((values / top) ** 2))) * top


#: what anndata raises on an HDF5 file that looks like AnnData but whose parts are not (it re-raises the error of
#: the part it could not decode, e.g. a TypeError from AnnData(...) or a KeyError for a missing element)
_ANNDATA_READ_ERRORS = (OSError, KeyError, TypeError, ValueError, AttributeError, IndexError)


def input_file(path, wanted: str, what: str = "input file", advice: str = "") -> Path:
    """``path`` as a Path after checking it is a file: missing is a ``FileNotFoundError`` ("<what> '<path>' does not
    exist<advice>"), a directory a ``ValueError`` asking for ``wanted`` (e.g. "an .h5ad file")."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} {str(p)!r} does not exist{advice}")
    if p.is_dir():
        raise ValueError(f"{str(p)!r} is a directory; pass {wanted}")
    return p


def read_h5ad(path):
    """Read an AnnData ``.h5ad`` file. A missing path is a ``FileNotFoundError``; a directory, a file that is not
    HDF5, an HDF5 file that is not AnnData (no ``obs`` / ``var``) or one anndata cannot decode is a ``ValueError``
    naming the file and the fix."""
    import anndata as ad
    import h5py

    p = input_file(path, "an .h5ad file")
    try:
        with h5py.File(p, "r") as f:
            keys, encoding = sorted(f.keys()), f.attrs.get("encoding-type")
    except OSError as err:
        raise ValueError(f"cannot read {str(p)!r} as h5ad ({err})") from None
    if isinstance(encoding, bytes):
        encoding = encoding.decode(errors="replace")
    if encoding != "anndata" and not {"obs", "var"} <= set(keys):
        shown = ", ".join(keys[:8]) + (", ..." if len(keys) > 8 else "") if keys else "none"
        raise ValueError(f"{str(p)!r} is an HDF5 file but not AnnData (.h5ad): it has no obs/var groups (top-level "
                         f"keys: {shown}); build an AnnData from the data and save it with adata.write_h5ad(path)")
    try:
        return ad.read_h5ad(p)
    except _ANNDATA_READ_ERRORS as err:
        raise ValueError(f"cannot read {str(p)!r} as AnnData ({type(err).__name__}: {err}); is it an .h5ad "
                         "written by anndata? Rewrite it with adata.write_h5ad(path)") from None
