"""Learned against fixed global scale tau: mask F1 on noisy-annotation simulations, and its invariance to units.

spex-LVM's synthetic benchmark (``pathfactor.data.simulate.noisy_annotations``: 20 % of each gene set's members
false, as many true members missing) at three noise levels sigma2 (weaker programs as it grows). For each, Spex
with ``global_scale=1`` (tau fixed at the data's sd) and ``global_scale=None`` (tau_k ~ C+(0, sd) learned per
factor), on the data as simulated and multiplied by 1000 and by 0.001. Prints one JSON line per fit and a summary.

    python benchmarks/global_scale.py [--seeds 0 1 2] [--out benchmarks/results/global_scale.jsonl]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import pathfactor as pf
from pathfactor.data.simulate import annotation_sets, noisy_annotations
from pathfactor.evaluate import mask_f1

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--sigma2", type=float, nargs="+", default=[1.0, 4.0, 16.0, 64.0])
    p.add_argument("--cells", type=int, default=500)
    p.add_argument("--genes", type=int, default=1000)
    p.add_argument("--factors", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS / "global_scale.jsonl")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for sigma2 in args.sigma2:
        for seed in args.seeds:
            sim = noisy_annotations(n_cells=args.cells, n_genes=args.genes, n_factors=args.factors, noise=0.2,
                                    sigma2=sigma2, seed=seed)
            truth, sets = sim.varm["mask_true"], annotation_sets(sim)
            for tau in (1.0, None):
                for scale in (1.0, 1e3, 1e-3):
                    data = sim.copy()
                    data.X = data.X * np.float32(scale)
                    start = time.perf_counter()
                    model = pf.models.Spex(global_scale=tau, min_set_size=1, progress=False).fit(data, annotations=sets)
                    W = model.loadings_.to_numpy()
                    rows.append({"sigma2": sigma2, "seed": seed, "global_scale": "learned" if tau is None else tau,
                                 "data_scale": scale, "f1": round(mask_f1(truth, W), 4),
                                 "f1_annotation": round(mask_f1(truth, sim.varm["annotation"].astype(float)), 4),
                                 "epochs": len(model.history_), "seconds": round(time.perf_counter() - start, 2)})
                    print(json.dumps(rows[-1]), flush=True)
    summary = {}
    for sigma2 in args.sigma2:
        for tau in (1.0, "learned"):
            for scale in (1.0, 1e3, 1e-3):
                f1 = [r["f1"] for r in rows if r["sigma2"] == sigma2 and r["global_scale"] == tau
                      and r["data_scale"] == scale]
                summary[f"sigma2={sigma2} tau={tau} x{scale:g}"] = round(float(np.mean(f1)), 4)
    print(json.dumps({"mean_f1": summary}, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as fh:
        for row in rows + [{"mean_f1": summary}]:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
