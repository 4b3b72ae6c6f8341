"""Slalom (f-scLVM) against the interpretable autoencoder on Kang et al. 2018 IFN-beta PBMCs with Reactome sets
(seed 001's comparison): correlation of the two models' loadings for Slalom's most relevant factors, the top
factors of each, and whether an interferon term is among the top 5 of both. Prints one JSON object.

    python experiments/kang_slalom_vs_autoencoder.py [--data ../shared/data] [--n-top-genes 2000]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import pathfactor as pf

from kang import SHARED_DATA, load_kang_log
from pathfactor.models.autoencoder import Autoencoder



def compare(adata, sets, n_dense: int, seed: int) -> dict:
    out = {"n_dense": n_dense}
    models = {}
    start = time.perf_counter()
    ae = Autoencoder(n_dense=n_dense, progress=False).fit(adata, annotations=sets, seed=seed)
    out["autoencoder"] = {"seconds": round(time.perf_counter() - start, 1), "epochs": len(ae.history_),
                          "factors": ae.loadings_.shape[1], "converged": ae.converged_}
    models["autoencoder"] = ae
    try:
        from pathfactor.models.slalom import Slalom
    except ImportError as err:  # another helper is finishing it
        out["slalom"] = f"not importable: {err}"
    else:
        start = time.perf_counter()
        sl = Slalom(n_dense=n_dense, progress=False).fit(adata, annotations=sets, seed=seed)
        out["slalom"] = {"seconds": round(time.perf_counter() - start, 1), "epochs": len(sl.history_),
                         "factors": sl.loadings_.shape[1]}
        models["slalom"] = sl

    top5 = {}
    for name, m in models.items():
        rel = m.relevance()
        top5[name] = list(rel.index[:5])
        out[name]["top5_relevance"] = {k: float(f"{v:.4g}") for k, v in rel.head(5).items()}
        r2 = getattr(m, "r2_", m.relevance_)
        out[name]["top5_r2"] = {k: round(float(r2[k]), 4) for k in top5[name]}
        out[name]["interferon_in_top5"] = [f for f in top5[name] if "INTERFERON" in f]
        ifn = [f for f in rel.index if "INTERFERON" in f]
        out[name]["interferon_rank"] = {f: int(list(rel.index).index(f)) + 1 for f in ifn}
        if "stim" in adata.obs:
            out[name]["interferon_auroc_stim"] = {
                f: round(pf.evaluate.auroc(m.factor_scores_[f], adata.obs["stim"], "STIM"), 4) for f in ifn}
    if "slalom" in models:
        sl = models["slalom"]
        top10 = [f for f in sl.relevance().index if f in ae.loadings_.columns][:10]
        def pearson(a, b):  # None where a factor was switched off (all loadings zero)
            return round(float(np.corrcoef(a, b)[0, 1]), 4) if a.std() > 0 and b.std() > 0 else None

        corr = {f: pearson(sl.loadings_[f], ae.loadings_[f]) for f in top10}
        out["loading_correlation_top10_slalom"] = corr
        values = [v for v in corr.values() if v is not None]
        out["loading_correlation_median"] = round(float(np.median(values)), 4) if values else None
        out["interferon_in_top5_of_both"] = bool(out["slalom"]["interferon_in_top5"]
                                                 and out["autoencoder"]["interferon_in_top5"])
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", type=Path, default=SHARED_DATA)
    p.add_argument("--n-top-genes", type=int, default=2000)
    p.add_argument("--n-dense", type=int, nargs="+", default=[0, 3],
                   help="unannotated dense factors of both models; one comparison per value")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(2)
    adata = load_kang_log(args.data, args.n_top_genes)
    sets = pf.GeneSets.read(args.data / "genesets" / "msigdb_c2.cp.reactome.v4.0.symbols.gmt.gz")

    out = {"data": f"kang2018_ifnb_sub2000 (log1p CP10k, {args.n_top_genes} HVGs)", "cells": adata.n_obs,
           "genes": adata.n_vars, "gene_sets": "Reactome (MSigDB c2.cp v4.0)", "seed": args.seed}
    out["comparisons"] = [compare(adata, sets, n_dense, args.seed) for n_dense in args.n_dense]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
