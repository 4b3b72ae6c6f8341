"""Out-of-core Spex: fit a simulated .h5ad larger than a memory budget, streamed from disk; one JSON line per run.

    python benchmarks/out_of_core.py                                   # 200000 x 2000 x 10: a 1.6 GB file, 600 MB
    python benchmarks/out_of_core.py --cells 20000 --genes 500 --budget-mb 500 --keep /tmp/sim.h5ad
    python benchmarks/out_of_core.py --in-memory                       # also the same fit from memory, for contrast

The data follow spex-LVM's noisy-annotation simulation (``pathfactor.data.simulate.noisy_annotations``): its
loadings W, true mask and noisy annotation are drawn once, then the cells are drawn in chunks, ``x_n ~ N(0, I)``,
``y_n = W x_n + N(0, sigma2)``, and written straight into the file's X (a dense float32 HDF5 dataset), so the
writer never holds the matrix either. The fit runs in a fresh process (``ru_maxrss`` is the peak resident set of a
whole process) on ``anndata.read_h5ad(path, backed="r")`` with ``Spex(batch_size=...)``; ``peak_rss_mb`` includes
the ~350 MB of the Python, torch, scipy and anndata imports. (Reads go through the operating system's page cache,
which is not part of a process's resident set.)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, Timer, column_correlation, emit, limit_threads, peak_rss_mb, thread_env  # noqa: E402

CHUNK_CELLS = 10_000


def write_simulation(path: Path, n_cells: int, n_genes: int, n_factors: int, noise: float, sigma2: float,
                     seed: int) -> None:
    """The noisy-annotation simulation written chunk by chunk into ``path`` (truth in varm / obsm / uns)."""
    import anndata as ad
    import h5py
    import pandas as pd

    from pathfactor.data.simulate import noisy_annotations

    truth = noisy_annotations(n_cells=2, n_genes=n_genes, n_factors=n_factors, noise=noise, sigma2=sigma2, seed=seed)
    W = truth.varm["W_true"].astype(np.float32)
    skeleton = ad.AnnData(obs=pd.DataFrame(index=pd.Index([f"cell_{i}" for i in range(n_cells)])), var=truth.var)
    for key in ("W_true", "mask_true", "annotation"):
        skeleton.varm[key] = truth.varm[key]
    skeleton.uns["simulation"] = dict(truth.uns["simulation"], n_cells=n_cells)
    X_true = np.empty((n_cells, n_factors), dtype=np.float32)
    skeleton.write_h5ad(path)
    with h5py.File(path, "r+") as f:
        X = f.create_dataset("X", shape=(n_cells, n_genes), dtype="float32")
        X.attrs["encoding-type"], X.attrs["encoding-version"] = "array", "0.2.0"
        for i, start in enumerate(range(0, n_cells, CHUNK_CELLS)):
            stop = min(start + CHUNK_CELLS, n_cells)
            rng = np.random.default_rng([seed, i])
            x = rng.standard_normal((stop - start, n_factors), dtype=np.float32)
            y = x @ W.T
            y += rng.standard_normal(y.shape, dtype=np.float32) * np.float32(np.sqrt(sigma2))
            X[start:stop] = y
            X_true[start:stop] = x
        obsm = f.require_group("obsm").create_dataset("X_true", data=X_true)
        obsm.attrs["encoding-type"], obsm.attrs["encoding-version"] = "array", "0.2.0"


def fit(path: str, batch_size: int, max_epochs: int, tol: float, seed: int, threads: int, in_memory: bool,
        start: str = "wide") -> dict:
    """Fit Spex to ``path`` (streamed from disk, or read into memory) and score it against the truth."""
    limit_threads(threads)
    import anndata as ad

    import pathfactor as pf
    import pathfactor.models.spex as spex_module
    from pathfactor.data.simulate import annotation_sets
    from pathfactor.evaluate import mask_f1

    engine, started = spex_module.train, []

    def timed_train(*args, **kwargs):  # when the epochs begin: what comes before is reading, moments and the start
        started.append(time.perf_counter())
        return engine(*args, **kwargs)

    spex_module.train = timed_train
    with Timer() as t:
        adata = ad.read_h5ad(path, backed=None if in_memory else "r")
        sets = annotation_sets(adata)
        model = pf.models.Spex(batch_size=batch_size, max_epochs=max_epochs, tol=tol, progress=False,
                               min_set_size=1, max_set_size=10**9, start=start)
        model.fit(adata, annotations=sets, seed=seed)
    peak = peak_rss_mb()
    fit_end = time.perf_counter()
    K = len(sets)
    truth = np.asarray(adata.varm["mask_true"])[:, :K]
    names = list(sets)  # the annotated factors, in the truth's order (the default sparse factors come after)
    W = model.loadings_[names].to_numpy()
    corr = column_correlation(np.asarray(adata.obsm["X_true"]), model.factor_scores_[names].to_numpy()).mean()
    N, G, D = adata.n_obs, adata.n_vars, model.loadings_.shape[1]
    epochs = len(model.history_)
    epoch_seconds = (fit_end - started[0]) / max(epochs, 1) if started else None
    # an epoch's matrix products: every cell's factor means (Y W: N G D) and the statistics (mu^T Y: N G D), 2 flops a
    # multiply-add; the per-gene and per-batch algebra is O(G D^2) and left out
    epoch_flop = 4.0 * N * G * D
    return {"mode": "in-memory" if in_memory else "streamed", "start": start, "seconds": round(t.seconds, 2),
            "start_seconds": None if not started else round(started[0] - t.start, 2),
            "epoch_seconds": None if epoch_seconds is None else round(epoch_seconds, 2),
            "epoch_tflop": round(epoch_flop / 1e12, 3),
            "achieved_gflops": None if not epoch_seconds else round(epoch_flop / epoch_seconds / 1e9, 1),
            "peak_rss_mb": round(peak, 1), "epochs": len(model.history_), "converged": bool(model.converged_),
            "f1": round(mask_f1(truth, W[:, :K]), 4),
            "f1_annotation": round(mask_f1(truth, np.asarray(adata.varm["annotation"]).astype(float)), 4),
            "f1_truth": round(mask_f1(truth, np.asarray(adata.varm["W_true"])[:, :K]), 4),
            "factor_correlation": round(float(corr), 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=200_000)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--factors", type=int, default=10)
    p.add_argument("--noise", type=float, default=0.2)
    p.add_argument("--sigma2", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-mb", type=float, default=600.0, help="memory budget the streamed fit must stay under")
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--max-epochs", type=int, default=6)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--start", default="wide", choices=["wide", "informed", "prior"], help="Spex's start")
    p.add_argument("--keep", default=None, metavar="PATH", help="write the file here, keep it (default: temp)")
    p.add_argument("--reuse", action="store_true", help="with --keep: fit the file already there (same arguments)")
    p.add_argument("--in-memory", action="store_true", help="also fit the same file read into memory")
    p.add_argument("--out", default=str(RESULTS / "out_of_core.jsonl"), help="append the JSON lines here ('' = don't)")
    p.add_argument("--fit", default=None, help=argparse.SUPPRESS)  # the child process: fit this file
    p.add_argument("--mode", default="streamed", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.fit:
        print(json.dumps(fit(args.fit, args.batch_size, args.max_epochs, args.tol, args.seed, args.threads,
                             args.mode == "in-memory", args.start)), flush=True)
        return

    tmp = None if args.keep else tempfile.TemporaryDirectory(prefix="pathfactor-ooc-")
    path = Path(args.keep) if args.keep else Path(tmp.name) / "sim.h5ad"
    try:
        with Timer() as w:
            if not (args.reuse and path.exists()):
                write_simulation(path, args.cells, args.genes, args.factors, args.noise, args.sigma2, args.seed)
        size_mb = os.path.getsize(path) / 2**20
        for mode in ["streamed"] + (["in-memory"] if args.in_memory else []):
            cmd = [sys.executable, __file__, "--fit", str(path), "--mode", mode, "--batch-size", str(args.batch_size),
                   "--max-epochs", str(args.max_epochs), "--tol", str(args.tol), "--seed", str(args.seed),
                   "--threads", str(args.threads), "--start", args.start]
            done = subprocess.run(cmd, env=thread_env(args.threads), capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"the {mode} fit failed:\n{done.stderr[-3000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            emit({"method": "pathfactor.Spex", **result, "n_cells": args.cells, "n_genes": args.genes,
                  "n_factors": args.factors, "noise": args.noise, "batch_size": args.batch_size,
                  "threads": args.threads, "file_mb": round(size_mb, 1), "budget_mb": args.budget_mb,
                  "within_budget": result["peak_rss_mb"] <= args.budget_mb, "write_seconds": round(w.seconds, 2)},
                 out=args.out or None)
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
