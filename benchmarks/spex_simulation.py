"""Spex on spex-LVM's noisy-annotation simulation: mask F1 and seconds, one JSON line per run.

    python benchmarks/spex_simulation.py                       # the acceptance size: 1000 x 2000 x 50, noise 0.2
    python benchmarks/spex_simulation.py --cells 300 --genes 400 --factors 8 --noise 0.1 0.2
"""
from __future__ import annotations

import argparse
import json
import resource
import time

import torch

import pathfactor as pf
from pathfactor.data.simulate import annotation_sets, noisy_annotations
from pathfactor.evaluate import mask_f1


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
    torch.set_num_threads(args.threads)
    params = {k: eval(v) for k, v in (kv.split("=", 1) for kv in args.param)}
    for noise in args.noise:
        for seed in args.seeds:
            sim = noisy_annotations(n_cells=args.cells, n_genes=args.genes, n_factors=args.factors, noise=noise,
                                    sigma2=args.sigma2, n_redundant=args.redundant, seed=seed)
            start = time.perf_counter()
            model = pf.models.Spex(progress=False, min_set_size=1, max_set_size=10**9, **params)
            model.fit(sim, annotations=annotation_sets(sim), seed=seed)
            seconds = time.perf_counter() - start
            truth = sim.varm["mask_true"][:, : args.factors + args.redundant]
            print(json.dumps({
                "method": "pathfactor.Spex", "n_cells": args.cells, "n_genes": args.genes, "n_factors": args.factors,
                "noise": noise, "sigma2": args.sigma2, "seed": seed, "params": params,
                "seconds": round(seconds, 2), "epochs": len(model.history_), "converged": bool(model.converged_),
                "f1": round(mask_f1(truth, model.loadings_.to_numpy()), 4),
                "f1_annotation": round(mask_f1(truth, sim.varm["annotation"].astype(float)), 4),
                "f1_truth": round(mask_f1(truth, sim.varm["W_true"][:, : args.factors + args.redundant]), 4),
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            }), flush=True)


if __name__ == "__main__":
    main()
