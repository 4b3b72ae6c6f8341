"""Spex on spex-LVM's noisy-annotation simulation: mask F1 and seconds, one JSON line per run.

    python benchmarks/spex_simulation.py                       # the acceptance size: 1000 x 2000 x 50, noise 0.2
    python benchmarks/spex_simulation.py --cells 300 --genes 400 --factors 8 --noise 0.1 0.2
"""
from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

import pathfactor as pf
from pathfactor.data.simulate import annotation_sets, noisy_annotations
from pathfactor.evaluate import mask_f1

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Timer, column_correlation, emit, limit_threads, peak_rss_mb, r2, reset_peak_rss  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=1000)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--factors", type=int, default=50)
    p.add_argument("--noise", type=float, nargs="+", default=[0.2])
    p.add_argument("--sigma2", type=float, default=1.0)
    p.add_argument("--redundant", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--param", action="append", default=[], help="Spex parameter as NAME=VALUE (Python literal)")
    args = p.parse_args()
    limit_threads(args.threads)
    params = {k: ast.literal_eval(v) for k, v in (kv.split("=", 1) for kv in args.param)}
    for noise in args.noise:
        for seed in args.seeds:
            sim = noisy_annotations(n_cells=args.cells, n_genes=args.genes, n_factors=args.factors, noise=noise,
                                    sigma2=args.sigma2, n_redundant=args.redundant, seed=seed)
            sets = annotation_sets(sim)
            rss_data = peak_rss_mb()
            reset_peak_rss()  # the fit's own peak: the data (and the interpreter) stay resident
            with Timer() as t:
                model = pf.models.Spex(progress=False, min_set_size=1, max_set_size=10**9, **params)
                model.fit(sim, annotations=sets, seed=seed)
            peak = peak_rss_mb()
            K = args.factors + args.redundant
            truth = sim.varm["mask_true"][:, :K]
            X, W = model.factor_scores_.to_numpy(), model.loadings_.to_numpy()
            # factor correlation over the factors that generate data (redundant ones have X_true = 0)
            corr = column_correlation(sim.obsm["X_true"][:, :args.factors], X[:, :args.factors]).mean()
            emit({
                "method": "pathfactor.Spex", "n_cells": args.cells, "n_genes": args.genes, "n_factors": args.factors,
                "noise": noise, "sigma2": args.sigma2, "seed": seed, "params": params,
                "seconds": round(t.seconds, 2), "epochs": len(model.history_), "converged": bool(model.converged_),
                "f1": round(mask_f1(truth, W[:, :K]), 4),
                "f1_annotation": round(mask_f1(truth, sim.varm["annotation"].astype(float)), 4),
                "f1_truth": round(mask_f1(truth, sim.varm["W_true"][:, :K]), 4),
                "factor_correlation": round(float(corr), 4), "r2": round(r2(sim.X, X, W, sim.X.mean(0)), 4),
                "peak_rss_mb": round(peak, 1), "data_mb": round(sim.X.nbytes / 2**20, 1),
                "peak_rss_mb_before_fit": round(rss_data, 1),
            })


if __name__ == "__main__":
    main()
