"""Rows of a cells x genes matrix, centred, as torch tensors: the data access of streamed and data-parallel fits.

A *row source* holds some cells (all of them, or one process's shard) and hands out their rows, centred by the
gene means, in blocks small enough for memory. Both kinds share one face: ``N`` (cells held), ``G``, ``offset``
(index of the first cell held), ``Z`` (their rows of the centred covariates), ``dtype``, ``device``,
``blocks(cells)`` (``(Y_b, Z_b)`` pairs covering ``cells`` -- ``slice(None)`` or a tensor of indices -- in their
order) and ``sum_squares()`` (``sum_n y_ng^2`` over the cells held).

* :class:`TensorRows`: centred data already in memory (the ordinary fit): one block, no copy.
* :class:`BackedRows`: a backed ``.h5ad``'s X (an h5py dataset or anndata's CSR dataset; numpy and scipy CSR
  matrices work too) read ``block_rows`` rows at a time, so memory holds one block of the data, never all of it.

:func:`prepare` builds a source for the streamed path of ``Spex.fit`` with one streaming pass for the gene means and
the data's sd, and :func:`initial_factors` computes the fit's starting factors from the source (the streamed twin of
``models.spex._initial_factors``: same algorithm, same random draws). ``reduce`` arguments are the all-reduce
(sum) of a data-parallel fit (``pathfactor.distributed.Communicator.reduce``), ``None`` in one process.
"""
from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from .inputs import BLOCK_VALUES, check_magnitude

__all__ = ["TensorRows", "BackedRows", "BackedMatrix", "is_backed", "backed_matrix", "prepare", "initial_factors",
           "factor_r2", "DEFAULT_BLOCK_ELEMENTS"]

log = logging.getLogger(__name__)

#: a block read from disk holds about this many matrix entries (2**21: 16 MiB as float64) unless told otherwise
DEFAULT_BLOCK_ELEMENTS = 2**21


#: glibc's mallopt parameter M_MMAP_THRESHOLD
_M_MMAP_THRESHOLD = -3
_heap_bounded = False


def _identity(stats):
    return stats


def _bound_heap() -> None:
    """Serve allocations of 1 MiB or more by mmap, so that a freed block goes back to the system at once.

    By default glibc raises its mmap threshold to the size of the largest block freed, after which block-sized
    buffers come from the heap; the small results allocated between them pin the heap, and the resident set grows
    by about a block per block read (measured: 1.6 GB after one pass over a 1.6 GB file, 0.43 GB with this).
    Process-wide and idempotent; a no-op where the C library has no ``mallopt`` (not glibc)."""
    global _heap_bounded
    if _heap_bounded:
        return
    _heap_bounded = True
    try:
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    except (AttributeError, OSError):  # pragma: no cover - not glibc
        pass


class TensorRows:
    """Centred rows already in memory: ``Y`` (N x G) and ``Z`` (N x C) tensors on one device."""

    def __init__(self, Y: torch.Tensor, Z: torch.Tensor, offset: int = 0):
        self.Y, self.Z, self.offset = Y, Z, int(offset)
        self.N, self.G = Y.shape
        self.dtype, self.device = Y.dtype, Y.device

    def blocks(self, cells):
        """The rows ``cells``; all rows (``slice(None)``) come as views of about ``BLOCK_VALUES`` values each, so
        that a pass over them makes no N x G temporary."""
        if isinstance(cells, slice) and cells == slice(None):
            rows = max(256, BLOCK_VALUES // max(self.G, 1))
            for start in range(0, self.N, rows):
                yield self.Y[start:start + rows], self.Z[start:start + rows]
            return
        yield self.Y[cells], self.Z[cells]

    def sum_squares(self) -> torch.Tensor:
        """sum_n y_ng^2, over the blocks of :meth:`blocks` (a temporary of one block, about ``BLOCK_VALUES``
        values, not thousands of rows)."""
        total = torch.zeros(self.G, dtype=self.dtype, device=self.device)
        for block, _ in self.blocks(slice(None)):
            total += (block * block).sum(0)
        return total


class BackedRows:
    """Rows ``rows = (start, stop)`` of a matrix ``X`` kept where it is (a backed .h5ad's X), read ``block_rows``
    rows at a time and centred by ``mean`` (float64, length G). ``Z`` holds the centred covariates of these rows,
    ``sum_squares`` their precomputed ``sum_n (y_ng - mean_g)^2``.

    Random batches are read in increasing row order (as HDF5 wants) and put back in the batch's order, so a fit
    sees the same rows in the same order as from memory. Values pass through float32 on the way, as
    ``inputs.as_matrix`` does for in-memory data; float32 fits centre in float32 (no float64 copy of a block)."""

    def __init__(self, X, mean, Z: torch.Tensor, dtype: torch.dtype, device, rows: tuple[int, int] | None = None,
                 block_rows: int | None = None, sum_squares: torch.Tensor | None = None):
        start, stop = rows if rows is not None else (0, X.shape[0])
        self.X, self.offset, self.N, self.G = X, int(start), int(stop - start), int(X.shape[1])
        self.Z, self.dtype, self.device = Z, dtype, torch.device(device)
        self._np_dtype = np.float64 if dtype == torch.float64 else np.float32
        self.mean = np.asarray(mean, dtype=np.float64).astype(self._np_dtype)
        self.block_rows = int(block_rows) if block_rows else default_block_rows(self.G)
        self._sum_squares = sum_squares
        _bound_heap()

    def _centred(self, index) -> torch.Tensor:
        raw = _read(self.X, index, self.G, self._np_dtype)
        raw -= self.mean
        return torch.from_numpy(raw).to(device=self.device, dtype=self.dtype)

    def blocks(self, cells):
        if isinstance(cells, slice):
            start, stop, step = cells.indices(self.N)
            if step != 1:
                raise ValueError("BackedRows reads contiguous slices only (step 1)")
            for lo in range(start, stop, self.block_rows):
                hi = min(lo + self.block_rows, stop)
                yield self._centred(slice(self.offset + lo, self.offset + hi)), self.Z[lo:hi]
            return
        index = torch.as_tensor(cells).cpu().numpy().astype(np.int64)
        for lo in range(0, len(index), self.block_rows):
            chunk = index[lo:lo + self.block_rows]
            order = np.argsort(chunk, kind="stable")
            rows = self._centred(self.offset + chunk[order])
            back = torch.from_numpy(np.argsort(order)).to(self.device)
            yield rows[back], self.Z[torch.from_numpy(chunk).to(self.Z.device)]

    def sum_squares(self) -> torch.Tensor:
        if self._sum_squares is None:
            total = torch.zeros(self.G, dtype=torch.float64, device=self.device)
            for Y, _ in self.blocks(slice(None)):
                total += (Y.double() ** 2).sum(0)
            self._sum_squares = total.to(self.dtype)
        return self._sum_squares


def default_block_rows(n_genes: int) -> int:
    return max(16, DEFAULT_BLOCK_ELEMENTS // max(int(n_genes), 1))


def _runs(index, min_run: int = 32) -> list[tuple[int, int]] | None:
    """``index`` (increasing integers) as (start, stop) slices of neighbouring rows when they average at least
    ``min_run`` rows, else None (a slice is given back as one run)."""
    if isinstance(index, slice):
        return None
    index = np.asarray(index)
    breaks = np.flatnonzero(np.diff(index) != 1) + 1
    if len(index) < min_run * (len(breaks) + 1):
        return None
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(index)]])
    return [(int(index[a]), int(index[b - 1]) + 1) for a, b in zip(starts, stops)]


def _read(X, index, n_genes: int, dtype=np.float64) -> np.ndarray:
    """Rows ``index`` (a slice, or increasing integers) of ``X`` as a dense, writable array of ``dtype`` (float32 or
    float64, via float32)."""
    if not isinstance(index, slice) and len(index) == 0:
        return np.zeros((0, n_genes), dtype=dtype)
    runs = _runs(index)
    if runs is not None:  # long runs of neighbouring rows: one slice each (HDF5 reads scattered rows slowly)
        parts = [X[start:stop] for start, stop in runs]
        parts = [p.toarray() if sp.issparse(p) else np.asarray(p) for p in parts]
        block = parts[0] if len(parts) == 1 else np.concatenate(parts)
    else:
        block = X[index]
    if sp.issparse(block):
        block = block.toarray()
    block = np.asarray(block, dtype=np.float32)
    if dtype == np.float64 or not block.flags.writeable or not block.flags.owndata:
        block = block.astype(dtype)
    return block


# --------------------------------------------------------------------------------------------- backed AnnData
def is_backed(data, layer=None) -> bool:
    """Whether ``data`` is an AnnData opened with ``backed="r"`` whose X (``layer=None``) stays on disk. (A backed
    AnnData's layers are read into memory, so ``layer=...`` takes the in-memory path.)"""
    return bool(getattr(data, "isbacked", False)) and layer is None


@dataclass(frozen=True)
class BackedMatrix:
    """The names and shape of a backed AnnData's X, and X itself as ``Y`` (left on disk)."""

    Y: object
    obs_names: pd.Index
    var_names: pd.Index

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(int(v) for v in self.Y.shape)


def backed_matrix(data) -> BackedMatrix:
    """Check a backed AnnData's X the way ``inputs.as_matrix`` checks in-memory data, without reading it (values
    are checked during :func:`prepare`'s pass)."""
    X = data.X
    if X is None:
        raise ValueError("adata.X is empty (None); pass layer= naming the layer that holds the expression data")
    if getattr(X, "format", "csr") != "csr":
        raise ValueError(f"the backed X is stored as {X.format}; streaming reads rows, which needs CSR or dense "
                         "storage: convert it once (adata.X = adata.X.tocsr() in memory, then write_h5ad)")
    if len(X.shape) != 2:
        raise ValueError(f"expression data must be 2-D (cells x genes), got shape {X.shape}")
    dtype = np.dtype(X.dtype)
    if not (np.issubdtype(dtype, np.number) or dtype == bool) or np.issubdtype(dtype, np.complexfloating):
        raise ValueError(f"expression data must be numeric, got dtype {dtype}; convert it with .astype(float)")
    n, g = (int(v) for v in X.shape)
    if n == 0 or g == 0:
        raise ValueError(f"expression data is empty ({n} cells x {g} genes); filter less strictly")
    if n < 2:
        raise ValueError("need at least 2 cells to fit a latent variable model, got 1")
    obs, var = pd.Index(data.obs_names), pd.Index(data.var_names)
    if var.has_duplicates:
        dup = var[var.duplicated()].unique()[:5].tolist()
        raise ValueError(f"duplicate gene names in var_names (e.g. {dup}); make them unique first, "
                         "e.g. adata.var_names_make_unique()")
    return BackedMatrix(X, obs, var)


# --------------------------------------------------------------------------------------------- one pass: moments
def _moments(X, rows: tuple[int, int], block_rows: int, n_genes: int):
    """Count, mean, sum of squared deviations (float64, Chan et al.'s pairwise merge of blocks), largest |value|
    and number of non-finite values of rows ``rows`` of ``X``."""
    n, mean, m2 = 0, np.zeros(n_genes), np.zeros(n_genes)
    top, bad = 0.0, 0
    for lo in range(rows[0], rows[1], block_rows):
        block = _read(X, slice(lo, min(lo + block_rows, rows[1])), n_genes)
        finite = np.isfinite(block)
        if not finite.all():
            bad += int((~finite).sum())
            block = np.where(finite, block, 0.0)
        top = max(top, float(np.abs(block).max(initial=0.0)))
        nb = block.shape[0]
        mb = block.mean(0)
        m2b = ((block - mb) ** 2).sum(0)
        delta, total = mb - mean, n + nb
        mean = mean + delta * (nb / total)
        m2 = m2 + m2b + delta**2 * (n * nb / total)
        n = total
    return n, mean, m2, top, bad


def _raise_together(error: Exception | None, reduce) -> None:
    """Raise ``error`` in every process if any process has one (so none waits forever in a collective)."""
    if reduce is not None:
        flags = reduce({"bad": torch.tensor([0.0 if error is None else 1.0], dtype=torch.float64)})["bad"]
        if error is None and float(flags.sum()) > 0:
            error = ValueError("another process of this data-parallel fit refused its data (see its message)")
    if error is not None:
        raise error


def _global_moments(n, mean, m2, reduce):
    """Combine per-process (count, mean, M2) into the global ones; also this process's sum of squares about the
    global mean, sum_n (y_ng - mean_g)^2."""
    if reduce is None:
        return n, mean, m2, m2
    s = reduce({"n": torch.tensor([float(n)], dtype=torch.float64), "sum": torch.from_numpy(mean * n)})
    N = int(s["n"].item())
    gmean = s["sum"].numpy() / N
    local = m2 + n * (mean - gmean) ** 2
    return N, gmean, reduce({"m2": torch.from_numpy(local)})["m2"].numpy(), local


@dataclass
class Prepared:
    """What the streamed path of ``Spex.fit`` starts from."""

    source: object
    gene_mean: torch.Tensor
    data_sd: float
    X0: torch.Tensor


def prepare(X, Z: torch.Tensor, mask: torch.Tensor, n_free: int, device, dtype, reduce=None,
            rows: tuple[int, int] | None = None, block_rows: int | None = None) -> Prepared:
    """Row source, gene means, data sd and starting factors for a streamed (or data-parallel) Spex fit.

    ``X``: a backed AnnData's X (streamed from disk) or an in-memory numpy / CSR matrix (then this process's rows
    are centred into memory: the data-parallel path). ``Z``: centred covariates of all cells (N x C tensor).
    ``rows``: the cells this process holds (default all). One pass gives the gene means and the data's sd (the
    mean over genes of the unbiased variance, as the in-memory fit's ``Y.var(0)``), and checks the values."""
    N, G = (int(v) for v in X.shape)
    rows = rows or (0, N)
    block_rows = int(block_rows) if block_rows else default_block_rows(G)
    in_memory = isinstance(X, np.ndarray) or sp.issparse(X)
    if not in_memory:
        _bound_heap()
    error = None
    try:
        if rows[1] <= rows[0]:
            raise ValueError(f"{N} cells cannot be shared among more processes than cells; use fewer processes")
        if in_memory:
            local = X[rows[0]:rows[1]]
            local = np.asarray(local.toarray() if sp.issparse(local) else local, dtype=np.float64)
            n, mean, m2, top, bad = _moments(local, (0, local.shape[0]), max(local.shape[0], 1), G)
        else:
            n, mean, m2, top, bad = _moments(X, rows, block_rows, G)
        if bad:
            raise ValueError(f"expression data contains {bad} NaN or infinite values; remove or impute them "
                             "(e.g. np.nan_to_num) before fitting")
        check_magnitude(np.array([top]), N, G, np.float32)
    except ValueError as err:
        error = err
    _raise_together(error, reduce)
    _, mean, m2, local_ss = _global_moments(n, mean, m2, reduce)
    data_sd = max(float(np.sqrt((m2 / (N - 1)).mean())), 1e-12)
    gene_mean = torch.as_tensor(mean, dtype=torch.float64, device=device)
    Z_local = Z[rows[0]:rows[1]]
    if in_memory:
        Y = (torch.as_tensor(local, device=device) - gene_mean).to(dtype)
        source = TensorRows(Y, Z_local, offset=rows[0])
    else:
        source = BackedRows(X, mean, Z_local, dtype, device, rows=rows, block_rows=block_rows,
                            sum_squares=torch.as_tensor(local_ss, device=device).to(dtype))
    log.info("streamed fit: %d of %d cells here, %d genes, blocks of %d cells", source.N, N, G, block_rows)
    X0 = initial_factors(source, mask.to(dtype), n_free, N, reduce)
    return Prepared(source, gene_mean, data_sd, X0)


# --------------------------------------------------------------------------------------------- starting factors
class _Residual:
    """The rows of ``R = Y - sum_i L_i C_i`` (low-rank parts regressed out: L_i this process's rows, C_i r x G),
    multiplied from the right (``mm``) or the left (``tmm``, summed over processes). R is never formed:
    ``R V = Y V - sum_i L_i (C_i V)`` and ``R^T X = Y^T X - sum_i C_i^T (L_i^T X)``, so a pass costs the data's
    products and not the N x r x G of subtracting the low-rank parts block by block."""

    def __init__(self, source, reduce):
        self.source, self.reduce, self.terms = source, reduce or _identity, []

    def _blocks_times(self, V: torch.Tensor):
        """(start, stop, Y_b, R_b V) for each block of this process's rows."""
        CV = [C @ V for _, C in self.terms]
        start = 0
        for Y, _ in self.source.blocks(slice(None)):
            stop = start + Y.shape[0]
            X = Y @ V
            for (L, _), cv in zip(self.terms, CV):
                X = X - L[start:stop] @ cv
            yield start, stop, Y, X
            start = stop

    def _left(self, s: dict) -> torch.Tensor:
        """``R^T X`` from the reduced ``s["t"] = Y^T X`` and ``s["l<i>"] = L_i^T X``."""
        out = s["t"]
        for i, (_, C) in enumerate(self.terms):
            out = out - C.T @ s[f"l{i}"]
        return out

    def mm(self, V: torch.Tensor) -> torch.Tensor:
        parts = [X for _, _, _, X in self._blocks_times(V)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def tmm(self, X: torch.Tensor) -> torch.Tensor:
        YtX, start = None, 0
        for Y, _ in self.source.blocks(slice(None)):
            stop = start + Y.shape[0]
            part = Y.T @ X[start:stop]
            YtX, start = (part if YtX is None else YtX + part), stop
        return self._left(self.reduce({"t": YtX, **{f"l{i}": L.T @ X for i, (L, _) in enumerate(self.terms)}}))

    def gram(self, V: torch.Tensor):
        """R^T (R V) and the column norms of R V, in one pass."""
        YtX, LtX, ss = None, [0] * len(self.terms), None
        for start, stop, Y, X in self._blocks_times(V):
            part, sq = Y.T @ X, (X * X).sum(0)
            YtX, ss = (part, sq) if YtX is None else (YtX + part, ss + sq)
            LtX = [acc + L[start:stop].T @ X for acc, (L, _) in zip(LtX, self.terms)]
        s = self.reduce({"t": YtX, "ss": ss, **{f"l{i}": v for i, v in enumerate(LtX)}})
        return self._left(s), s["ss"].sqrt()

    def regress_out(self, L: torch.Tensor) -> None:
        """Add the least-squares fit of the current residual on L (this process's rows) to the terms."""
        RtL = self.tmm(L)
        LtL = self.reduce({"g": L.double().T @ L.double()})["g"]
        # least squares on the small Gram system: a rank-deficient L (e.g. constant data) keeps its minimum-norm fit
        C = torch.linalg.lstsq(LtL.cpu(), RtL.double().T.cpu(), driver="gelsd").solution
        self.terms.append((L, C.to(dtype=L.dtype, device=L.device)))


def _orth_rows(X: torch.Tensor, reduce) -> torch.Tensor:
    """Orthonormal basis of the columns of a matrix whose rows are spread over processes: Householder QR in one
    process (as ``torch.svd_lowrank``), Cholesky QR twice (CholeskyQR2) across processes (columns may differ in
    sign, which the fit's orientation step absorbs)."""
    if reduce is None:
        return torch.linalg.qr(X).Q
    Q = X.double()
    for _ in range(2):
        gram = reduce({"g": Q.T @ Q})["g"]
        L, info = torch.linalg.cholesky_ex(gram)
        if int(info) > 0:
            eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
            L = torch.linalg.cholesky(gram + 1e-12 * gram.diagonal().mean().clamp_min(1e-300) * eye)
        Q = torch.linalg.solve_triangular(L, Q.T, upper=False).T
    return Q.to(X.dtype)


def _left_singular(C: torch.Tensor, reduce):
    """Left singular vectors and singular values of a tall matrix whose rows are spread over processes."""
    if reduce is None:  # as torch.svd_lowrank computes them: from the SVD of the transpose
        _, S, Vh = torch.linalg.svd(C.T, full_matrices=False)
        return Vh.mH, S
    gram = reduce({"g": C.double().T @ C.double()})["g"]
    evals, V = torch.linalg.eigh(gram)
    evals, V = evals.flip(0), V.flip(1)
    S = evals.clamp_min(0).sqrt()
    return (C.double() @ V / S.clamp_min(1e-300)).to(C.dtype), S.to(C.dtype)


def _free_factors(R: _Residual, n_free: int, N: int, G: int, reduce) -> torch.Tensor:
    """``U[:, :n_free] * S[:n_free]`` of ``torch.svd_lowrank(R, q=min(n_free + 10, N, G), niter=4)`` with R's
    rows streamed: the same randomised range finder (Halko et al. 2011, Algorithms 4.4 and 5.1) and the same
    draws from torch's global generator, so one process reproduces the in-memory fit's start."""
    q, niter = min(n_free + 10, N, G), 4
    src = R.source
    dt, dev = src.dtype, src.device
    if N < G:  # torch works on R^T
        omega = torch.randn(N, q, dtype=dt, device=dev)[src.offset:src.offset + src.N]
        Q = torch.linalg.qr(R.tmm(omega)).Q
        for _ in range(niter):
            Q = _orth_rows(R.mm(Q), reduce)
            Q = torch.linalg.qr(R.tmm(Q)).Q
        U, S = _left_singular(R.mm(Q), reduce)
    else:
        omega = torch.randn(G, q, dtype=dt, device=dev)
        Q = _orth_rows(R.mm(omega), reduce)
        for _ in range(niter):
            Q = torch.linalg.qr(R.tmm(Q)).Q
            Q = _orth_rows(R.mm(Q), reduce)
        Ub, S, _ = torch.linalg.svd(R.tmm(Q).T, full_matrices=False)
        U = Q @ Ub
    return U[:, :n_free] * S[:n_free]


def initial_factors(source, mask: torch.Tensor, n_free: int, N: int | None = None, reduce=None,
                    n_iter: int = 10) -> torch.Tensor:
    """Starting scores of this process's cells, computed from the rows of ``source`` (``models.spex``'s
    ``_initial_factors`` applied to ``Y - Z lstsq(Z, Y)``, streamed): per gene set the leading principal
    component of its genes by a masked power iteration (one pass per iteration), then ``n_free`` leading
    components of what the sets and covariates leave unexplained, standardised over all ``N`` cells."""
    N = source.N if N is None else int(N)
    R = _Residual(source, reduce)
    if source.Z.shape[1]:
        R.regress_out(source.Z)
    parts = []
    if mask.shape[1]:
        V = mask / mask.sum(0).clamp_min(1)
        for _ in range(n_iter):
            RtX, norms = R.gram(V)                         # X = R V / |R V|,  V = mask * R^T X / |.|
            V = mask * (RtX / norms.clamp_min(1e-12))
            V = V / V.norm(dim=0).clamp_min(1e-12)
        parts.append(R.mm(V))
        if n_free:
            R.regress_out(parts[0])
    if n_free:
        parts.append(_free_factors(R, n_free, N, source.G, reduce))
        if parts[-1].shape[1] < n_free:  # more free factors than the data's rank (e.g. more factors than cells)
            fill = torch.randn(source.N, n_free - parts[-1].shape[1], generator=torch.Generator().manual_seed(0),
                               dtype=torch.float64).to(parts[-1])
            parts.append(fill)
    X = torch.cat(parts, dim=1)
    if N < 2:
        return X
    red = reduce or _identity
    mean = red({"s": X.double().sum(0)})["s"] / N
    sd = (red({"ss": ((X.double() - mean) ** 2).sum(0)})["ss"] / (N - 1)).sqrt()
    return ((X - mean.to(X.dtype)) / sd.to(X.dtype).clamp_min(1e-12))


def factor_r2(source, X: torch.Tensor, W: torch.Tensor, reduce=None) -> np.ndarray:
    """``evaluate.factor_r2`` (each factor's centred R^2 alone) with the data streamed from ``source``: ``X`` holds
    this process's rows of the scores (N x K), ``W`` the loadings (G x K)."""
    red = reduce or _identity
    W = W.to(source.dtype)
    cross, start = torch.zeros(W.shape[1], dtype=torch.float64, device=W.device), 0
    for Y, _ in source.blocks(slice(None)):
        stop = start + Y.shape[0]
        cross += (X[start:stop].double() * (Y @ W).double()).sum(0)
        start = stop
    s = red({"cross": cross, "xx": (X.double() ** 2).sum(0), "total": source.sum_squares().double().sum()[None]})
    W64 = W.double()
    explained = 2 * s["cross"] - s["xx"] * (W64 * W64).sum(0)
    return (explained / s["total"].clamp_min(1e-300)).cpu().numpy()
