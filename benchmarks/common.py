"""Shared pieces of the benchmark scripts: sizes, threads, timing, peak memory, JSON lines, and the scores of a
fit against the truth of ``pathfactor.data.simulate.noisy_annotations`` (mask F1, factor correlation, R^2).

Memory is measured with the standard library only: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (the process's
peak resident set, Linux reports KiB) and ``/proc/self/statm`` for the current resident set. A peak is a
property of a whole process, so a per-method peak needs one fresh process per method (see ``peers.py``).
"""
from __future__ import annotations

import json
import os
import re
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pathfactor.evaluate import mask_f1, match_factors

RESULTS = Path(__file__).resolve().parent / "results"
_SIZE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*[xX]\s*(\d+)\s*$")
#: cells per block when R^2 is summed over the data, so no N x G float64 copy is made
_BLOCK = 2048


def parse_size(text: str) -> tuple[int, int, int]:
    """``"1000x2000x20"`` -> (cells, genes, factors)."""
    m = _SIZE.match(str(text))
    if m is None:
        raise ValueError(f"a size is CELLSxGENESxFACTORS such as 1000x2000x20, got {text!r}")
    n, g, k = (int(v) for v in m.groups())
    if min(n, g, k) < 1 or k >= g:
        raise ValueError(f"size {text!r} needs cells, genes, factors >= 1 and factors < genes")
    return n, g, k


def thread_env(threads: int) -> dict[str, str]:
    """Environment of a child process that may use ``threads`` threads in every thread pool."""
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(threads)
    return env


def limit_threads(threads: int) -> None:
    """Give torch and numpy's BLAS (scikit-learn) the same number of threads."""
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    threadpool_limits(threads)


class Timer:
    """``with Timer() as t: ...``; then ``t.seconds`` (wall clock, ``time.perf_counter``)."""

    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        self.seconds = float("nan")
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start


def reset_peak_rss() -> None:
    """Start :func:`peak_rss_mb` afresh (Linux: ``/proc/self/clear_refs``), e.g. after simulating the data, so
    that it measures what a fit needs; a no-op where that is absent."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """Peak resident set of this process in MiB: ``VmHWM`` of ``/proc/self/status`` (reset by
    :func:`reset_peak_rss`), else ``ru_maxrss`` (the peak since the process started)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    """Current resident set of this process in MiB (``/proc/self/statm``; the peak where that is absent)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return peak_rss_mb()
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def emit(record: dict, out: str | Path | None = None) -> dict:
    """Print ``record`` as one JSON line and, with ``out``, append it to that file (folders are made)."""
    line = json.dumps(record, default=_plain)
    print(line, flush=True)
    if out:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as handle:
            handle.write(line + "\n")
    return record


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def rounded(value, digits: int = 4):
    return None if value is None or not np.isfinite(value) else round(float(value), digits)


# ---------------------------------------------------------------------------------------------- scores
@dataclass
class Fit:
    """What a method learned, in the data's units: ``Y ≈ offset + X W^T``.

    ``X`` cells x factors, ``W`` genes x factors, ``offset`` a length-G vector (the gene means for centred
    models, the shift that made the data non-negative for NMF). ``aligned``: column k belongs to annotated
    term k (gene-set models); otherwise the columns are matched to the true factors first.
    """

    seconds: float
    X: np.ndarray
    W: np.ndarray
    offset: np.ndarray
    aligned: bool
    extra: dict = field(default_factory=dict)


def r2(Y, X, W, offset) -> float:
    """``1 - ||Y - offset - X W^T||^2 / ||Y - mean(Y)||^2`` over all entries (summed over blocks of cells)."""
    Y = np.asarray(Y)
    X, W = np.asarray(X, dtype=np.float64), np.asarray(W, dtype=np.float64)
    offset = np.asarray(offset, dtype=np.float64)
    mean = Y.mean(axis=0, dtype=np.float64)
    sse = sst = 0.0
    for start in range(0, Y.shape[0], _BLOCK):
        block = np.asarray(Y[start:start + _BLOCK], dtype=np.float64)
        resid = block - offset - X[start:start + _BLOCK] @ W.T
        centred = block - mean
        sse += float(np.einsum("ij,ij->", resid, resid))
        sst += float(np.einsum("ij,ij->", centred, centred))
    return 1.0 - sse / max(sst, 1e-300)


def column_correlation(A, B) -> np.ndarray:
    """|Pearson correlation| of column k of ``A`` with column k of ``B`` (0 for a constant column)."""
    A, B = np.asarray(A, dtype=np.float64), np.asarray(B, dtype=np.float64)
    A = (A - A.mean(0)) / (A.std(0) + 1e-12)
    B = (B - B.mean(0)) / (B.std(0) + 1e-12)
    return np.abs((A * B).mean(0))


def score(fit: Fit, Y, X_true, mask_true) -> dict:
    """Mask F1, mean factor correlation and R^2 of ``fit`` against the truth.

    Aligned fits are scored column by column (factor k against true factor k). Other fits are first matched
    to the true factors by maximal total |correlation| of the factor scores (Hungarian,
    ``evaluate.match_factors``); their loadings are reordered by that matching before the F1. The F1 is
    ``evaluate.mask_f1``: a gene is active when ``|w| > 0.1 max |w|`` of its factor, against ``W_true != 0``.
    """
    K = mask_true.shape[1]
    if fit.aligned:
        if fit.W.shape[1] != K:
            raise ValueError(f"an aligned fit needs {K} columns, got {fit.W.shape[1]}")
        corr = column_correlation(X_true[:, :K], fit.X)
        W = fit.W
    else:
        rows, cols, corr = match_factors(X_true[:, :K], fit.X)
        W = np.zeros((fit.W.shape[0], K))
        W[:, rows] = fit.W[:, cols]
        corr = np.concatenate([corr, np.zeros(K - len(rows))])  # unmatched true factors count as 0
    return {
        "f1": rounded(mask_f1(mask_true, W)),
        "factor_correlation": rounded(float(np.mean(corr))),
        "r2": rounded(r2(Y, fit.X, fit.W, fit.offset)),
        "matching": "annotation" if fit.aligned else "hungarian on factor scores",
    }


def reference_scores(Y, X_true, W_true, mask_true, annotation) -> dict:
    """The same scores for the truth itself and the F1 of the (noisy) annotation given to the methods."""
    K = mask_true.shape[1]
    return {
        "f1_truth": rounded(mask_f1(mask_true, W_true[:, :K])),
        "f1_annotation": rounded(mask_f1(mask_true, np.asarray(annotation, dtype=float)[:, :K])),
        "r2_truth": rounded(r2(Y, X_true, W_true, np.zeros(W_true.shape[0]))),
    }
