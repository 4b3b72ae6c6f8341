"""Spex with more factors than cells: mESC (182 cells) with MSigDB Hallmark + Reactome v4.0 from ../shared/data.

    python experiments/mesc_spex_reactome.py [--n-sparse 2 --n-dense 0]   (the defaults)
        # prints JSON (factors, seconds, epochs, G2M AUROCs as oriented, relevance, ELBO monotone) and writes
        # experiments/results/mesc_spex_reactome.json (with --min-set-size M other than 15:
        # mesc_spex_reactome_min{M}.json)
    python experiments/mesc_spex_reactome.py --min-set-size 35 --repeat 7
        # the same fit 7 times in one process: "seconds" is their median, "seconds_each" lists them
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np

import pathfactor as pf
from pathfactor import evaluate

SETS = Path(__file__).resolve().parents[2] / "shared" / "data" / "genesets"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n-sparse", type=int, default=2)
    p.add_argument("--n-dense", type=int, default=0)
    p.add_argument("--min-set-size", type=int, default=15)
    p.add_argument("--repeat", type=int, default=1, help="fit this many times; report the median time")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if args.out is None:
        suffix = "" if args.min_set_size == 15 else f"_min{args.min_set_size}"
        args.out = Path(__file__).resolve().parent / "results" / f"mesc_spex_reactome{suffix}.json"
    warnings.simplefilter("ignore")
    adata = pf.datasets.mesc()
    sets = (pf.GeneSets.read(SETS / "msigdb_h.all.v7.5.1.symbols.gmt")
            + pf.GeneSets.read(SETS / "msigdb_c2.cp.reactome.v4.0.symbols.gmt.gz"))
    seconds = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        model = pf.models.Spex(n_sparse=args.n_sparse, n_dense=args.n_dense, min_set_size=args.min_set_size,
                               progress=False).fit(adata, annotations=sets)
        seconds.append(round(time.perf_counter() - start, 2))
    out = {"cells": adata.n_obs, "factors": model.loadings_.shape[1], "seconds": round(float(np.median(seconds)), 1),
           "seconds_each": seconds,
           "epochs": len(model.history_), "converged": bool(model.converged_), "elbo": round(float(model.elbo_), 1),
           "elbo_monotone": bool(np.diff(model.history_).min() >= 0),
           "auroc_g2m": {t: round(evaluate.auroc(model.factor_scores_[t], adata.obs["cell_cycle_stage"], "G2M"), 4)
                         for t in ("HALLMARK_G2M_CHECKPOINT", "REACTOME_CELL_CYCLE") if t in model.factor_scores_},
           "n_sparse": args.n_sparse, "n_dense": args.n_dense, "min_set_size": args.min_set_size,
           "top10_relevance": {k: round(float(v), 4) for k, v in model.relevance().head(10).items()}}
    print(json.dumps(out, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
