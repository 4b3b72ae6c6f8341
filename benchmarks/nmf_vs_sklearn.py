"""pathfactor NMF vs scikit-learn NMF on the same data, K, start (NNDSVDa) and number of iterations; both losses.

One JSON line per run: method, data, n_cells, n_genes, K, loss, iterations, seconds, objective (the final loss:
1/2 ||Y - XW^T||^2 or the generalised KL divergence, as scikit-learn defines them), reconstruction_err.
Both run exactly ``--iterations`` multiplicative updates (``tol=0``); scikit-learn's coordinate-descent solver (its
default for the Frobenius loss, a different algorithm) is shown for reference. Data: simulated Poisson counts from
a non-negative low-rank mean (dense), and the Kang et al. 2018 PBMC counts (2000 cells, sparse) when
``../shared/data/kang2018_ifnb_sub2000_counts.h5ad`` exists.

    python benchmarks/nmf_vs_sklearn.py                              # simulated 2000 x 1000 and Kang, K = 10
    python benchmarks/nmf_vs_sklearn.py --cells 500 --genes 300 --iterations 50 --no-kang
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from threadpoolctl import threadpool_limits

from pathfactor.models.nmf import NMF

KANG = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "kang2018_ifnb_sub2000_counts.h5ad"
SK_LOSS = {"frobenius": "frobenius", "kl": "kullback-leibler"}


def simulate(n_cells: int, n_genes: int, k: int, seed: int = 0) -> np.ndarray:
    """Poisson counts whose mean is a non-negative rank-k product (sparse-ish programs) plus a background."""
    rng = np.random.default_rng(seed)
    X = rng.gamma(0.5, 2.0, (n_cells, k))
    W = rng.gamma(0.3, 1.0, (n_genes, k)) * (rng.random((n_genes, k)) < 0.3)
    background = rng.gamma(1.0, 0.2, n_genes)[None, :]
    return rng.poisson(X @ W.T + background).astype(np.float32)


def run_pathfactor(Y, k: int, loss: str, iterations: int, device: str, seed: int) -> dict:
    start = time.perf_counter()
    model = NMF(n_factors=k, loss=loss, max_epochs=iterations, tol=0, progress=False).fit(Y, seed=seed, device=device)
    seconds = time.perf_counter() - start
    return {"method": "pathfactor.NMF (mu)", "seconds": seconds, "objective": model.loss_,
            "reconstruction_err": model.reconstruction_err_, "iterations": model.n_iter_}


def run_sklearn(Y, k: int, loss: str, iterations: int, solver: str, seed: int) -> dict:
    from sklearn.decomposition import NMF as SkNMF

    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning: tol=0 runs every iteration on purpose
        model = SkNMF(n_components=k, init="nndsvda", solver=solver, beta_loss=SK_LOSS[loss], max_iter=iterations,
                      tol=0, random_state=seed).fit(Y)
    seconds = time.perf_counter() - start
    err = float(model.reconstruction_err_)
    return {"method": f"sklearn.NMF ({solver})", "seconds": seconds, "objective": err ** 2 / 2,
            "reconstruction_err": err, "iterations": int(model.n_iter_)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=2000)
    p.add_argument("--genes", type=int, default=1000)
    p.add_argument("--factors", type=int, default=10)
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--losses", nargs="+", default=["frobenius", "kl"], choices=["frobenius", "kl"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="pathfactor's device (auto, cpu, cuda); scikit-learn is CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-kang", action="store_true", help="skip the Kang counts")
    p.add_argument("--no-cd", action="store_true", help="skip scikit-learn's coordinate-descent solver")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)  # numpy's BLAS (scikit-learn) gets the same number of threads as torch

    # warm-up (imports, thread pools, first-call dispatch) so that the timings below measure the fits
    tiny = simulate(60, 40, 3, args.seed)
    run_pathfactor(tiny, 3, "kl", 2, args.device, args.seed)
    run_sklearn(tiny, 3, "kl", 2, "mu", args.seed)

    datasets = [("simulated", simulate(args.cells, args.genes, args.factors, args.seed))]
    if not args.no_kang and KANG.is_file():
        import anndata as ad

        datasets.append(("kang2018_counts", sp.csr_matrix(ad.read_h5ad(KANG).X, dtype=np.float32)))
    for name, Y in datasets:
        for loss in args.losses:
            runs = [lambda: run_pathfactor(Y, args.factors, loss, args.iterations, args.device, args.seed),
                    lambda: run_sklearn(Y, args.factors, loss, args.iterations, "mu", args.seed)]
            if loss == "frobenius" and not args.no_cd:
                runs.append(lambda: run_sklearn(Y, args.factors, loss, args.iterations, "cd", args.seed))
            for run in runs:
                out = run()
                print(json.dumps({
                    "method": out["method"], "data": name, "n_cells": Y.shape[0], "n_genes": Y.shape[1],
                    "sparse": sp.issparse(Y), "K": args.factors, "loss": loss, "iterations": out["iterations"],
                    "seconds": round(out["seconds"], 3), "objective": float(f"{out['objective']:.8g}"),
                    "reconstruction_err": float(f"{out['reconstruction_err']:.8g}"), "threads": args.threads,
                    "device": args.device if out["method"].startswith("pathfactor") else "cpu",
                }), flush=True)


if __name__ == "__main__":
    main()
