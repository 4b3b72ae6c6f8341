"""Spex on the Kang et al. 2018 IFN-beta PBMC data with the Hallmark sets: does an interferon factor separate
stimulated from control cells? Prints one JSON line.

    python experiments/kang_spex.py [--data ../shared/data] [--n-top-genes 2000] [--likelihood normal|nb]
                                    [--batch-size CELLS] [--max-epochs 300]

``--likelihood nb`` fits the raw counts of the same genes under the negative binomial (library size offset).
"""
from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

import pathfactor as pf

from kang import SHARED_DATA, load_kang_counts, load_kang_log
from pathfactor.evaluate import auroc


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", type=Path, default=SHARED_DATA)
    p.add_argument("--n-top-genes", type=int, default=2000)
    p.add_argument("--n-sparse", type=int, default=2)
    p.add_argument("--n-dense", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--likelihood", choices=["normal", "nb"], default="normal")
    p.add_argument("--batch-size", type=int, default=None, help="cells a block / minibatch (default: all at once)")
    p.add_argument("--max-epochs", type=int, default=300)
    args = p.parse_args()
    torch.set_num_threads(int(__import__('os').environ.get('OMP_NUM_THREADS', 2)))
    load = load_kang_counts if args.likelihood == "nb" else load_kang_log
    adata = load(args.data, args.n_top_genes)
    start = time.perf_counter()
    model = pf.models.Spex(n_sparse=args.n_sparse, n_dense=args.n_dense, likelihood=args.likelihood,
                           batch_size=args.batch_size, max_epochs=args.max_epochs, progress=False)
    model.fit(adata, annotations=pf.datasets.gene_sets("hallmark"), seed=args.seed)
    seconds = time.perf_counter() - start
    interferon = [f for f in model.loadings_.columns if "INTERFERON" in f]
    scores = {f: round(auroc(model.factor_scores_[f], adata.obs["stim"], "STIM"), 4) for f in interferon}
    top = model.relevance().head(10)
    print(json.dumps({
        "data": "kang2018_ifnb_sub2000 (%s, %d HVGs)" % (
            "raw counts, NB" if args.likelihood == "nb" else "log1p CP10k", args.n_top_genes), "cells": adata.n_obs,
        "genes": adata.n_vars, "factors": model.loadings_.shape[1], "seconds": round(seconds, 1),
        "batch_size": args.batch_size, "epochs": len(model.history_), "elbo": model.elbo_,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "auroc_stim_vs_ctrl": scores,
        "top10_relevance": {k: round(float(v), 4) for k, v in top.items()},
        "interferon_rank": {f: int(list(model.relevance().index).index(f)) for f in interferon},
        "annotated_factors_above_1e-3": int((model.relevance_[model.factor_kinds_ == "annotated"] > 1e-3).sum()),
        "annotated_factors": int((model.factor_kinds_ == "annotated").sum()),
    }, indent=1))


if __name__ == "__main__":
    main()
