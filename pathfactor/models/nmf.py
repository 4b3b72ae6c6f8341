"""NMF: non-negative matrix factorisation by multiplicative updates, weighted and gene-set masked (seed 003).

``Y ≈ X W^T`` with scores ``X`` (N cells x K) >= 0 and loadings ``W`` (G genes x K) >= 0, fitted by the
multiplicative updates of Lee & Seung (2001) -- gradient descent with the per-entry step size that makes the
update a ratio (seed 003, "Multiplicative gradient descent"): a non-negative start stays non-negative and the loss
never increases. Two losses, each optionally weighted by an N x G matrix ``M >= 0`` of entry weights (seed 003,
weighted NMF: ``M_ng = 0`` marks a missing entry, small ``M_ng`` an uncertain one; Blondel, Ho & Van Dooren 2008):

* ``"frobenius"``: ``L = 1/2 sum_ng M_ng (Y_ng - [X W^T]_ng)^2``
  ``X <- X * ((M∘Y) W) / ((M∘XW^T) W)``,  ``W <- W * ((M∘Y)^T X) / ((M∘XW^T)^T X)``
  (unweighted: ``X <- X * (Y W) / (X W^T W)``, ``W <- W * (Y^T X) / (W X^T X)``, seed 003's last line).
* ``"kl"`` (generalised Kullback-Leibler, the Poisson log-likelihood up to a constant):
  ``L = sum_ng M_ng (Y log(Y / XW^T) - Y + XW^T)``
  ``X <- X * ((M∘Y/XW^T) W) / (M W)``,  ``W <- W * ((M∘Y/XW^T)^T X) / (M^T X)``.

Gene sets enter as a hard mask on ``W``: factor ``k`` starts (and, under multiplicative updates, stays) exactly
zero on genes outside set ``k``.

Every update is a whole-matrix operation. Sparse (scipy) input is never densified: the Frobenius updates only need
``Y W`` and ``Y^T X``; the KL updates only need ``Y / XW^T`` at the non-zeros of ``Y`` (a sampled dense-dense
product), because the zeros of ``Y`` contribute only ``sum XW^T = X.sum(0) . W.sum(0)``. Sparse weights likewise
restrict every product to the entries with a non-zero weight.
"""
from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from numbers import Integral

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from ..data.genesets import annotation_mask
from ..data.inputs import as_matrix, unit_scale
from ..train import Task, resolve_device, train
from .base import LatentModel

__all__ = ["NMF"]

log = logging.getLogger(__name__)

LOSSES = {"frobenius": "frobenius", "kl": "kl", "kullback-leibler": "kl"}
INITS = ("nndsvda", "random")
#: floor of denominators and of the KL model mean, as scikit-learn's NMF (float32 machine epsilon)
EPSILON = float(np.finfo(np.float32).eps)


# ============================================================================ sparsity patterns
@contextmanager
def _quiet_sparse():
    """torch's warnings that sparse CSR support is in beta are not the user's concern."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse (CSR tensor support|invariant checks).*")
        yield


class _DenseOp:
    """An N x G matrix for products: ``op.mm(W) = V W``, ``op.tmm(X) = V^T X``."""

    def __init__(self, V):
        self.V = V

    def mm(self, W):
        return self.V @ W

    def tmm(self, X):
        return self.V.T @ X


class _SparseOp:
    """An N x G matrix that lives on a sparse pattern: CSR for ``V W``, the CSR of its transpose (built when first
    needed, by permuting the values) for ``V^T X``."""

    def __init__(self, pattern, v):
        self.pattern, self.v = pattern, v
        self._csr = self._csr_t = None

    def mm(self, W):
        if self._csr is None:
            p = self.pattern
            self._csr = torch.sparse_csr_tensor(p.crow, p.col, self.v, p.shape, check_invariants=False)
        return self._csr @ W

    def tmm(self, X):
        if self._csr_t is None:
            p = self.pattern
            self._csr_t = torch.sparse_csr_tensor(p.crow_t, p.col_t, self.v[p.perm], p.shape[::-1],
                                                  check_invariants=False)
        return self._csr_t @ X


class _DensePattern:
    """All N x G entries: values are dense N x G tensors."""

    def __init__(self, shape):
        self.shape = shape

    def lam(self, X, W):
        """The model mean ``X W^T`` at every entry."""
        return X @ W.T

    def op(self, V):
        """The matrix with entry values ``V``, for products."""
        return _DenseOp(V)


class _SparsePattern:
    """A fixed set of entries (the non-zeros of a scipy CSR matrix): values are vectors in CSR order.

    Products with an N x G matrix that lives only on these entries are torch CSR products; the model mean at the
    entries is a sampled dense-dense product (SDDMM), so no N x G (or nnz x K) array is ever formed.
    """

    def __init__(self, csr: sp.csr_matrix, device):
        N, G = csr.shape
        self.shape = (N, G)
        nnz = csr.nnz
        # the transposed pattern and the permutation from CSR order to the transpose's CSR order
        order = sp.csr_matrix((np.arange(1, nnz + 1, dtype=np.int64), csr.indices, csr.indptr), shape=(N, G))
        t = order.T.tocsr()
        t.sort_indices()
        as_index = lambda a: torch.as_tensor(np.asarray(a, dtype=np.int64), device=device)
        self.crow, self.col = as_index(csr.indptr), as_index(csr.indices)
        self.crow_t, self.col_t, self.perm = as_index(t.indptr), as_index(t.indices), as_index(t.data - 1)
        self._zeros = {}

    def _csr(self, values):
        return torch.sparse_csr_tensor(self.crow, self.col, values, self.shape, check_invariants=False)

    def lam(self, X, W):
        zeros = self._zeros.get(X.dtype)
        if zeros is None:
            zeros = self._zeros[X.dtype] = self._csr(torch.zeros(len(self.col), dtype=X.dtype, device=X.device))
        return torch.sparse.sampled_addmm(zeros, X, W.T, beta=0.0).values()

    def op(self, v):
        return _SparseOp(self, v)


# ============================================================================ the updates
def _multiply(A, num, den):
    """``A <- A * num / den`` in place; a zero denominator becomes EPSILON (its numerator is then zero too)."""
    A.mul_(num / torch.where(den > 0, den, EPSILON))


class _MultiplicativeUpdates(Task):
    """One epoch = update X, then W (unless fixed), then the loss: Lee & Seung (2001) multiplicative updates,
    weighted as in seed 003. ``epoch()`` returns ``-loss`` for :func:`pathfactor.train.train` (which maximises).

    ``y`` (and ``m``, the weights, or None) are the data at the pattern's entries. Without weights, entries outside
    the pattern (the zeros of sparse data) are zeros with weight 1: they enter the updates and the loss only
    through ``sum XW^T = X.sum(0) . W.sum(0)`` and ``Y W``, ``Y^T X``.
    """

    state_exclude = ("P", "y", "m", "Y", "MY", "M", "yy", "const")  # the data and their fixed statistics

    def __init__(self, pattern, y, m, X, W, loss: str, update_W: bool = True):
        self.P, self.y, self.m, self.X, self.W = pattern, y, m, X, W
        self.loss, self.update_W = loss, update_W
        self._lam = None  # the model mean at the entries for the current (X, W), reused by the next X update
        f64 = torch.float64
        if loss == "frobenius":
            my = y if m is None else m * y
            self.yy = float(torch.sum(my * y, dtype=f64))
            self._YW = None
            if m is None:
                self.Y = pattern.op(y)
            else:
                self.MY = pattern.op(my)
        else:
            if m is not None:
                self.M = pattern.op(m)
            xlx = torch.xlogy(y, y) - y
            self.const = float(torch.sum(xlx if m is None else m * xlx, dtype=f64))

    # ---------------------------------------------------------------- Frobenius
    def _frobenius_epoch(self) -> float:
        P, X, W, m = self.P, self.X, self.W, self.m
        if m is None:
            if self._YW is None or self.update_W:
                self._YW = self.Y.mm(W)
            _multiply(X, self._YW, X @ (W.T @ W))
            if self.update_W:
                YtX = self.Y.tmm(X)
                _multiply(W, YtX, W @ (X.T @ X))
                cross = torch.sum(W * YtX, dtype=torch.float64)
            else:
                cross = torch.sum(X * self._YW, dtype=torch.float64)
            gram = torch.sum((X.T @ X).double() * (W.T @ W).double())
            return -0.5 * float(self.yy - 2 * cross + gram)
        lam = self._lam if self._lam is not None else P.lam(X, W)
        _multiply(X, self.MY.mm(W), P.op(m * lam).mm(W))
        if self.update_W:
            lam = P.lam(X, W)
            _multiply(W, self.MY.tmm(X), P.op(m * lam).tmm(X))
        self._lam = lam = P.lam(X, W)
        r = self.y - lam
        # terms >= 0, so torch's cascade summation in the working dtype is accurate (and 5x faster than float64)
        return -0.5 * float(r.mul_(r).mul_(m).sum())

    # ---------------------------------------------------------------- KL
    def _mean(self):
        """The model mean at the entries, floored at EPSILON (as scikit-learn) so that ``Y / XW^T`` is finite."""
        return self.P.lam(self.X, self.W).clamp_min_(EPSILON)

    def _ratio(self, lam):
        r = self.y / lam
        return r if self.m is None else r.mul_(self.m)

    def _kl_epoch(self) -> float:
        P, X, W, m = self.P, self.X, self.W, self.m
        lam = self._lam if self._lam is not None else self._mean()
        _multiply(X, P.op(self._ratio(lam)).mm(W), W.sum(0) if m is None else self.M.mm(W))
        if self.update_W:
            lam = self._mean()
            _multiply(W, P.op(self._ratio(lam)).tmm(X), X.sum(0) if m is None else self.M.tmm(X))
        self._lam = lam = self._mean()
        return -self.kl(lam)

    def kl(self, lam) -> float:
        """``sum M (Y log Y - Y) + sum M (XW^T - Y log XW^T)``; unweighted, ``sum XW^T`` over all entries (the zeros
        of sparse data included) is ``X.sum(0) . W.sum(0)`` and ``Y log XW^T`` is needed at the entries only."""
        f64 = torch.float64
        ylogl = self.y * lam.log()  # lam >= EPSILON > 0, so Y = 0 gives 0 (and this is much faster than xlogy)
        if self.m is None:
            return (self.const + float(self.X.sum(0).to(f64) @ self.W.sum(0).to(f64))
                    - float(torch.sum(ylogl, dtype=f64)))
        return self.const + float(torch.sum(self.m * (lam - ylogl), dtype=f64))

    def epoch(self) -> float:
        return self._frobenius_epoch() if self.loss == "frobenius" else self._kl_epoch()


# ============================================================================ initialisation
def _nndsvda(Y, K: int, seed: int):
    """NNDSVDa (Boutsidis & Gallopoulos 2008) as scikit-learn computes it: the non-negative parts of the leading
    singular triplets, zeros filled with the data's mean so that multiplicative updates can move them."""
    from sklearn.utils.extmath import randomized_svd

    U, S, V = randomized_svd(Y, K, random_state=seed)
    X, W = np.zeros_like(U), np.zeros_like(V.T)
    X[:, 0], W[:, 0] = np.sqrt(S[0]) * np.abs(U[:, 0]), np.sqrt(S[0]) * np.abs(V[0])
    for j in range(1, K):
        u, v = U[:, j], V[j]
        up, vp, un, vn = np.maximum(u, 0), np.maximum(v, 0), np.maximum(-u, 0), np.maximum(-v, 0)
        mp, mn = np.linalg.norm(up) * np.linalg.norm(vp), np.linalg.norm(un) * np.linalg.norm(vn)
        a, b, sigma = (up, vp, mp) if mp > mn else (un, vn, mn)
        scale = np.sqrt(S[j] * sigma)
        # a zero part (rank below K) stays zero and is filled below; no 0 / 0 (1e-300 is 0 in float32)
        norm_a, norm_b = np.linalg.norm(a), np.linalg.norm(b)
        X[:, j] = scale * a / norm_a if norm_a > 0 else 0
        W[:, j] = scale * b / norm_b if norm_b > 0 else 0
    X[X < 1e-6], W[W < 1e-6] = 0, 0
    avg = Y.mean()
    X[X == 0], W[W == 0] = avg, avg
    return X, W


def _random_init(Y, K: int, seed: int):
    """scikit-learn's ``init="random"``: |N(0, 1)| scaled by sqrt(mean(Y) / K)."""
    avg = np.sqrt(Y.mean() / K)
    rng = np.random.RandomState(seed)
    W = np.abs(avg * rng.standard_normal(size=(K, Y.shape[1]))).T
    X = np.abs(avg * rng.standard_normal(size=(Y.shape[0], K)))
    return X, W


def _masked_power(Y, mask: np.ndarray, n_iter: int = 10):
    """For each gene set, the leading (uncentred) singular pair of ``Y`` restricted to the set's genes -- all sets
    at once by a masked power iteration; non-negative because ``Y`` is."""
    V = mask / np.maximum(mask.sum(0), 1)
    for _ in range(n_iter):
        Xa = np.asarray(Y @ V)
        Xa /= np.maximum(np.linalg.norm(Xa, axis=0), 1e-300)
        V = mask * np.asarray(Y.T @ Xa)
        V /= np.maximum(np.linalg.norm(V, axis=0), 1e-300)
    Xa = np.asarray(Y @ V)
    # zeros would stay zero under multiplicative updates: lift them to a tenth of their factor's mean
    for A, allowed in ((Xa, np.ones_like(Xa, dtype=bool)), (V, mask > 0)):
        col_mean = np.where(A > 0, A, 0).sum(0) / np.maximum((A > 0).sum(0), 1)
        fill = np.broadcast_to(0.1 * np.maximum(col_mean, 1e-12), A.shape)
        lift = allowed & (A <= 0)
        A[lift] = fill[lift]
    return Xa, V


def _zero_missing(Y, weights):
    """``Y`` with its entries of weight 0 set to 0 (sparse Y stays sparse unless the weights are dense)."""
    if weights is None:
        return Y
    if sp.issparse(weights):
        return Y.multiply(weights > 0).tocsr() if sp.issparse(Y) else Y * (weights > 0).toarray()
    return (Y.toarray() if sp.issparse(Y) else Y) * (weights > 0)


def _at_weights(Y, X, W, weights):
    """``(Y, X W^T, M)`` where the weights live: dense N x G for dense weights, vectors at the non-zeros of sparse
    ones (whose zeros were eliminated, so all stored entries count)."""
    if sp.issparse(weights):
        coo = weights.tocoo()
        y = np.asarray(Y[coo.row, coo.col]).ravel()
        return y, np.einsum("ik,ik->i", X[coo.row], W[coo.col]), coo.data
    return Y, X @ W.T, weights


def _initial_factors(Y, K: int, mask: np.ndarray, init: str, seed: int, loss: str, weights=None):
    """Starting ``(X, W)`` as float64 numpy arrays (computed in the data's dtype, as scikit-learn).

    Annotated factors (one per column of ``mask``, genes x sets) start from a masked power iteration, exactly zero
    outside their set; the ``K - A`` free factors from NNDSVDa (or scikit-learn's random start) on the whole data.
    Missing entries (weight 0) count as zeros for the start. With annotations or weights the start is then
    rescaled by the one scalar that minimises the loss (scikit-learn's starts are already on the data's scale).
    """
    Y = _zero_missing(Y, weights)
    A = mask.shape[1]
    parts = []
    if A:
        parts.append(_masked_power(Y, mask.astype(np.float64)))
    if K > A:
        parts.append((_nndsvda if init == "nndsvda" else _random_init)(Y, K - A, seed))
    X = np.hstack([p[0] for p in parts]).astype(np.float64)
    W = np.hstack([p[1] for p in parts]).astype(np.float64)
    if A or weights is not None:
        if weights is None:
            if loss == "frobenius":
                alpha = float((X * np.asarray(Y @ W)).sum()) / max(float(((X.T @ X) * (W.T @ W)).sum()), 1e-300)
            else:
                alpha = float(Y.sum()) / max(float(X.sum(0) @ W.sum(0)), 1e-300)
        else:
            y, lam, m = _at_weights(Y, X, W, weights)
            if loss == "frobenius":
                alpha = float((m * y * lam).sum()) / max(float((m * lam * lam).sum()), 1e-300)
            else:
                alpha = float((m * y).sum()) / max(float((m * lam).sum()), 1e-300)
        if alpha > 0:
            X, W = X * np.sqrt(alpha), W * np.sqrt(alpha)
    return X, W


# ============================================================================ input checks
def _check_nonnegative(matrix) -> None:
    vals = matrix.Y.data if sp.issparse(matrix.Y) else matrix.Y
    n_neg = int((vals < 0).sum())
    if n_neg:
        raise ValueError(
            f"NMF needs non-negative data but the data have {n_neg} negative values (min {float(vals.min()):.3g}); "
            "use counts (e.g. layer='counts') or log-normalised data, not scaled or centred data (sc.pp.scale)")


def _read_matrix(data, layer, dtype, new_cells: bool = False, use_highly_variable: bool | None = False):
    try:
        return as_matrix(data, layer, dtype=dtype, new_cells=new_cells, use_highly_variable=use_highly_variable)
    except ValueError as err:
        if "NaN" in str(err):
            raise ValueError(f"{err}; or, to treat them as missing, set them to 0 and pass weights= with weight 0 "
                             "at those entries") from None
        raise


def _as_weights(weights, data, matrix, dtype):
    """Entry weights as None, a dense numpy array or a scipy CSR matrix of the data's shape, checked."""
    if weights is None:
        return None
    N, G = matrix.shape
    if isinstance(weights, str):
        layers = getattr(data, "layers", None)
        if layers is None:
            raise ValueError(f"weights={weights!r} names a layer, which needs AnnData input; pass an N x G array")
        if weights not in layers:
            raise ValueError(f"weights layer {weights!r} is not in adata.layers (it has {sorted(layers.keys())})")
        weights = layers[weights]
    if isinstance(weights, pd.DataFrame):
        if set(weights.index.astype(str)) == set(matrix.obs_names) and set(weights.columns.astype(str)) == set(
                matrix.var_names):
            weights = weights.set_axis(weights.index.astype(str), axis=0).set_axis(weights.columns.astype(str), axis=1)
            weights = weights.loc[matrix.obs_names, matrix.var_names]
        elif weights.shape != (N, G):
            raise ValueError(f"weights have shape {weights.shape} but the data have {N} cells x {G} genes")
        weights = weights.to_numpy()
    if hasattr(weights, "to_memory"):
        weights = weights.to_memory()
    if sp.issparse(weights):
        weights = sp.csr_matrix(weights, dtype=dtype, copy=True)
        weights.sum_duplicates()
        weights.eliminate_zeros()
        vals = weights.data
    else:
        try:
            weights = np.asarray(weights, dtype=dtype)
        except (TypeError, ValueError) as err:
            raise ValueError(f"weights must be numeric (an N x G array of entry weights): {err}") from None
        vals = weights
    if weights.shape != (N, G):
        raise ValueError(f"weights have shape {weights.shape} but the data have {N} cells x {G} genes; pass one "
                         "weight per entry (0 = missing)")
    if not np.isfinite(vals).all():
        raise ValueError("weights contain NaN or infinite values; use 0 for missing entries")
    if (vals < 0).any():
        raise ValueError(f"weights must be non-negative (0 = missing) but {int((vals < 0).sum())} are negative")
    if not (vals > 0).any():
        raise ValueError("all weights are zero: nothing is observed; give positive weights to observed entries")
    return weights


def _problem(Y, weights, dev, dt):
    """The entries the loss runs over: ``(pattern, y, m)``.

    dense Y, no or dense weights -> every entry; sparse Y without weights -> the non-zeros (the zeros implicit);
    sparse weights -> the entries with a non-zero weight; sparse Y with dense weights -> densified.
    """
    tensor = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=dt, device=dev)
    if sp.issparse(weights):
        pattern = weights.tocsr()
        pattern.sort_indices()
        coo = pattern.tocoo()  # CSR order; the zeros were eliminated, so every stored entry is observed
        y = np.asarray(Y[coo.row, coo.col]).ravel()
        return _SparsePattern(pattern, dev), tensor(y), tensor(pattern.data)
    if sp.issparse(Y) and weights is None:
        Y = Y.tocsr(copy=True)
        Y.sum_duplicates()
        return _SparsePattern(Y, dev), tensor(Y.data), None
    Y = Y.toarray() if sp.issparse(Y) else Y
    return _DensePattern(Y.shape), tensor(Y), None if weights is None else tensor(weights)


# ============================================================================ the model
class NMF(LatentModel):
    """Non-negative matrix factorisation ``Y ≈ X W^T`` by multiplicative updates (Lee & Seung; seed 003).

    Parameters
    ----------
    n_factors : int
        Number of factors K. With gene sets every kept set gets a factor, and ``n_factors - n_sets`` free factors
        (``nmf_1``, ``nmf_2``, ...) are added when that is positive; K = max(n_factors, n_sets).
    loss : "frobenius" or "kl"
        Weighted squared error ``1/2 sum M (Y - XW^T)^2`` (for log-normalised data) or the weighted generalised
        Kullback-Leibler divergence ``sum M (Y log(Y/XW^T) - Y + XW^T)`` (the Poisson likelihood, for counts).
    max_epochs, tol : stop after ``max_epochs`` sweeps (one update of X and of W each) or when the relative change
        of the loss stays below ``tol`` for two sweeps (``tol=0`` runs exactly ``max_epochs`` sweeps).
    progress : show a progress bar.
    dtype : "float32" (default) or "float64".
    min_set_size, max_set_size : gene-set filters applied against the data's genes (as :class:`Spex`).
    init : "nndsvda" (default; Boutsidis & Gallopoulos 2008, as scikit-learn) or "random" (scikit-learn's).
        Annotated factors always start from their set's leading singular pair.

    Attributes
    ----------
    factor_scores_ : X, cells x factors. loadings_ : W, genes x factors, each column scaled to sum to 1, so
        ``x_nk`` is the amount of expression (e.g. counts) cell ``n`` draws from program ``k``.
    relevance_ : each factor's share of the data, the *uncentred* R^2 of ``Y ≈ x_k w_k^T`` (weighted by M):
        ``1 - sum M (Y - x_k w_k^T)^2 / sum M Y^2``. Uncentred because NMF models the data themselves, not their
        deviations from the gene means: a factor carrying the mean expression profile has a large share.
    loss_ : the final loss; ``history_`` holds ``-loss`` per epoch (the training engine maximises).
    reconstruction_err_ : ``sqrt(2 * loss_)``, as scikit-learn (the Frobenius norm of the weighted residual).
    n_iter_, converged_ : epochs run and whether ``tol`` was reached.
    annotation_ : genes x factors gene-set mask (False for free factors). The mask is hard: loadings outside a
        set are exactly 0, so :meth:`refined_annotations` can report genes a set *loses*, never genes it gains.

    Notes
    -----
    Sparse input stays sparse: see the module docstring. ``weights`` may be dense or sparse; sparse weights
    restrict the loss to their non-zero entries (everything else counts as missing).

    References
    ----------
    Lee & Seung, Learning the parts of objects by non-negative matrix factorization, Nature 401 (1999);
    Lee & Seung, Algorithms for non-negative matrix factorization, NIPS 13 (2001);
    seed 003 (NMF by multiplicative gradient descent; weighted NMF for missing or uncertain entries);
    Blondel, Ho & Van Dooren, Weighted nonnegative matrix factorization and face feature extraction (2008);
    Boutsidis & Gallopoulos, SVD based initialization: a head start for NMF, Pattern Recognition 41 (2008).
    """

    key = "nmf"

    def __init__(self, *, n_factors: int = 10, loss: str = "frobenius", max_epochs: int = 500, tol: float = 1e-5,
                 progress: bool = True, dtype: str = "float32", min_set_size: int = 15, max_set_size: int = 500,
                 init: str = "nndsvda"):
        self.n_factors, self.loss = n_factors, loss
        self.max_epochs, self.tol, self.progress, self.dtype = max_epochs, tol, progress, dtype
        self.min_set_size, self.max_set_size, self.init = min_set_size, max_set_size, init

    def _check_params(self) -> None:
        if isinstance(self.n_factors, bool) or not isinstance(self.n_factors, Integral) or self.n_factors < 1:
            raise ValueError(f"n_factors must be an integer >= 1, got {self.n_factors!r}")
        if str(self.loss).lower() not in LOSSES:
            raise ValueError(f"loss must be 'frobenius' or 'kl' (Kullback-Leibler), got {self.loss!r}")
        if isinstance(self.max_epochs, bool) or not isinstance(self.max_epochs, Integral) or self.max_epochs < 1:
            raise ValueError(f"max_epochs must be an integer >= 1, got {self.max_epochs!r}")
        if not np.isfinite(self.tol) or self.tol < 0:
            raise ValueError(f"tol must be a number >= 0, got {self.tol!r}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")

    @property
    def _loss(self) -> str:
        return LOSSES[str(self.loss).lower()]

    # ------------------------------------------------------------------ fit
    def fit(self, data, annotations=None, layer: str | None = None, weights=None, seed: int = 0,
            device="auto", use_highly_variable: bool | None = None) -> "NMF":
        """Fit to ``data`` (AnnData, DataFrame, numpy or scipy sparse; cells x genes, non-negative: counts or
        log-normalised data).

        ``annotations``: GeneSets, ``{name: genes}``, a genes x terms boolean DataFrame or a GMT/JSON path (or a
        list of them); matched to the genes case-insensitively and filtered by size; each kept set becomes a
        factor that may load only on its genes.
        ``weights``: N x G non-negative entry weights (numpy, scipy sparse, DataFrame, or the name of a layer);
        0 marks a missing entry, whose value in ``data`` is then ignored. The caller's data are not modified.
        """
        self._check_params()
        read = lambda data, layer, **kw: _read_matrix(data, layer, getattr(np, self.dtype), **kw)  # noqa: E731
        matrix, _, dev, dt = self._begin_fit(data, layer, seed=seed, device=device, gaussian=False, read=read,
                                             use_highly_variable=use_highly_variable)
        _check_nonnegative(matrix)
        N, G = matrix.shape
        M = _as_weights(weights, data, matrix, getattr(np, self.dtype))
        mask, term_names = annotation_mask(annotations, matrix.var_names, self.min_set_size, self.max_set_size)
        A = mask.shape[1]
        K = max(self.n_factors, A)
        if K > min(N, G):
            what = f"{A} gene sets" if A > self.n_factors else f"n_factors={self.n_factors}"
            raise ValueError(f"{what} exceed(s) min(cells, genes) = {min(N, G)} of the data; use fewer factors"
                             + (" or fewer gene sets (raise min_set_size)" if A else ""))
        if A and K == A and not mask.any(1).all():
            log.warning("%d genes are in no gene set and there are no free factors, so they cannot be fitted; "
                        "set n_factors above the number of sets (%d) to add free factors", int((~mask.any(1)).sum()), A)
        if M is not None:
            if sp.issparse(M):  # zeros eliminated: every stored weight is positive
                per_cell, per_gene = M.getnnz(axis=1), M.getnnz(axis=0)
            else:
                per_cell, per_gene = (M > 0).sum(1), (M > 0).sum(0)
            empty_cells, empty_genes = int((per_cell == 0).sum()), int((per_gene == 0).sum())
            if empty_cells or empty_genes:
                log.warning("%d cells and %d genes have no entry with positive weight; their scores / loadings "
                            "are set to 0", empty_cells, empty_genes)

        log.info("NMF: %d cells x %d genes (%s), K=%d (%d gene sets), loss=%s, weights=%s", N, G,
                 "sparse" if sp.issparse(matrix.Y) else "dense", K, A, self._loss,
                 "none" if M is None else ("sparse" if sp.issparse(M) else "dense"))
        # the fit runs on Y / unit (a power of two: exact), so the floors and thresholds act the same in any units
        unit = unit_scale(matrix.Y)
        Y = matrix.Y / unit
        X0, W0 = _initial_factors(Y, K, mask, self.init, seed, self._loss, M)
        allowed = np.concatenate([mask, np.ones((G, K - A), dtype=bool)], axis=1)
        W0 = W0 * allowed
        pattern, y, m = _problem(Y, M, dev, dt)
        X = torch.as_tensor(X0, dtype=dt, device=dev)
        W = torch.as_tensor(W0, dtype=dt, device=dev)
        with _quiet_sparse():
            task = _MultiplicativeUpdates(pattern, y, m, X, W, self._loss)
            result = train(task, max_epochs=self.max_epochs, tol=self.tol, progress=self.progress, desc="NMF")
            relevance = _relevance(pattern, y, m, task.X, task.W)

        X, W = task.X.double().cpu().numpy() * unit, task.W.double().cpu().numpy()
        loss_unit = unit**2 if self._loss == "frobenius" else unit  # the loss in the data's units
        history = [v * loss_unit for v in result.history]
        # loadings as distributions over genes: columns of W sum to 1, the scale moves to X
        total = W.sum(0)
        scale = np.where(total > 0, total, 1.0)
        X, W = X * scale, W / scale
        # free factors ordered by relevance, named nmf_1, nmf_2, ...
        order = np.concatenate([np.arange(A), A + np.argsort(-relevance[A:], kind="stable")]).astype(int)
        X, W, relevance = X[:, order], W[:, order], relevance[order]
        names = term_names + [f"nmf_{i}" for i in range(1, K - A + 1)]
        kinds = ["annotated"] * A + ["latent"] * (K - A)
        annotation = np.concatenate([mask, np.zeros((G, K - A), dtype=bool)], axis=1)
        self._set_results(scores=X, loadings=W, obs_names=matrix.obs_names, var_names=matrix.var_names,
                          factor_names=names, factor_kinds=kinds, relevance=relevance,
                          annotation=annotation if A else None, history=history)
        self.loss_ = -history[-1]
        self.reconstruction_err_ = float(np.sqrt(2 * max(self.loss_, 0.0)))
        self.n_iter_, self.converged_ = result.n_epochs, result.converged
        return self

    # ------------------------------------------------------------------ out of sample
    def transform(self, data, layer: str | None = None, weights=None, device="auto") -> pd.DataFrame:
        """Scores ``X >= 0`` of new cells with the loadings ``W`` fixed: the same multiplicative updates (and loss
        and weights) on X alone, a convex problem, until ``tol`` or ``max_epochs``.

        ``data`` must hold every gene the model was fitted on (extra genes are ignored).
        """
        self._check_fitted()
        dev, dt = resolve_device(device), getattr(torch, self.dtype)
        matrix = _read_matrix(data, layer, getattr(np, self.dtype), new_cells=True)
        var = self.loadings_.index
        missing = var.difference(matrix.var_names)
        if len(missing):
            raise ValueError(f"{len(missing)} of the model's {len(var)} genes are missing from the new data "
                             f"(e.g. {list(missing[:3])}); transform needs the genes the model was fitted on")
        _check_nonnegative(matrix)
        M = _as_weights(weights, data, matrix, getattr(np, self.dtype))
        cols = matrix.var_names.get_indexer(var)
        Y = matrix.Y[:, cols]
        if M is not None:
            M = M[:, cols]
        W = self.loadings_.to_numpy(dtype=np.float64)
        unit = unit_scale(Y)  # as in fit: the updates run on Y / unit
        Y = Y / unit
        # start: every factor at the per-cell least-squares level c_n of y_n ≈ c_n * sum_k w_k
        s = W.sum(1)
        c = np.asarray(_zero_missing(Y, M) @ s).ravel() / max(float(s @ s), 1e-300)
        X0 = np.repeat(np.maximum(c, EPSILON * max(float(c.mean()), 1.0))[:, None], W.shape[1], axis=1)
        pattern, y, m = _problem(Y, M, dev, dt)
        with _quiet_sparse():
            task = _MultiplicativeUpdates(pattern, y, m, torch.as_tensor(X0, dtype=dt, device=dev),
                                          torch.as_tensor(W, dtype=dt, device=dev), self._loss, update_W=False)
            train(task, max_epochs=self.max_epochs, tol=self.tol, progress=self.progress, desc="NMF transform")
        return pd.DataFrame(task.X.double().cpu().numpy() * unit, index=matrix.obs_names,
                            columns=self.loadings_.columns)

    def reconstruct(self) -> np.ndarray:
        """``X W^T`` (cells x genes, dense): the model's fitted values, e.g. imputed values of missing entries."""
        self._check_fitted()
        return self.factor_scores_.to_numpy() @ self.loadings_.to_numpy().T

    # ------------------------------------------------------------------ save / load
    def _extra_state(self):
        meta = {"loss": self.loss_, "reconstruction_err": self.reconstruction_err_, "n_iter": self.n_iter_,
                "converged": self.converged_}
        return meta, {}

    def _load_extra_state(self, meta, arrays):
        self.loss_, self.reconstruction_err_ = meta["loss"], meta["reconstruction_err"]
        self.n_iter_, self.converged_ = meta["n_iter"], meta["converged"]


def _relevance(pattern, y, m, X, W) -> np.ndarray:
    """Uncentred, weighted R^2 of each factor alone: ``1 - sum M (Y - x_k w_k^T)^2 / sum M Y^2``, from whole-matrix
    products (no N x G residual): ``sum M (2 Y x_k w_k^T - (x_k w_k^T)^2) / sum M Y^2``."""
    f64 = torch.float64
    my = y if m is None else m * y
    total = float(torch.sum(my * y, dtype=f64))
    X64, W64 = X.to(f64), W.to(f64)
    cross = (X64 * pattern.op(my).mm(W).to(f64)).sum(0)
    if m is None:
        square = (X64 * X64).sum(0) * (W64 * W64).sum(0)
    else:
        square = ((X64 * X64) * pattern.op(m).mm(W * W).to(f64)).sum(0)
    return ((2 * cross - square) / max(total, 1e-300)).cpu().numpy()
