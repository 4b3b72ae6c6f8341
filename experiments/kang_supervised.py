"""The supervised model (seed 000) on the Kang et al. 2018 PBMC data with ``stim`` as covariate: are the genes
with the largest STIM effect interferon genes, and is the STIM signal gone from the residual factors?
Prints one JSON line.

    python experiments/kang_supervised.py [--data ../shared/data] [--n-factors 10]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import pathfactor as pf

from kang import SHARED_DATA, load_kang_log
from pathfactor.evaluate import auroc

INTERFERON = ("HALLMARK_INTERFERON_ALPHA_RESPONSE", "HALLMARK_INTERFERON_GAMMA_RESPONSE")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", type=Path, default=SHARED_DATA)
    p.add_argument("--n-top-genes", type=int, default=2000)
    p.add_argument("--n-factors", type=int, default=10)
    p.add_argument("--posterior", default="blocked")
    p.add_argument("--two-step", action="store_true")
    p.add_argument("--global-scale", type=lambda v: None if v == "learned" else float(v), default=None,
                   help="the horseshoe's global scale: 'learned' (default) or a fixed value in data sd")
    args = p.parse_args()
    torch.set_num_threads(2)
    adata = load_kang_log(args.data, args.n_top_genes)
    start = time.perf_counter()
    model = pf.models.Supervised(n_factors=args.n_factors, posterior=args.posterior, two_step=args.two_step,
                                 global_scale=args.global_scale,
                                 progress=False).fit(adata, covariates="stim")
    seconds = time.perf_counter() - start
    effect = model.covariate_effects_["stim=STIM"]
    top = effect.abs().sort_values(ascending=False).head(10).index
    hallmark = pf.datasets.gene_sets("hallmark")
    ifn = {g.upper() for name in INTERFERON for g in hallmark[name]}
    residual_auroc = {f: round(max(a, 1 - a), 4) for f in model.factor_scores_.columns
                      for a in [auroc(model.factor_scores_[f], adata.obs["stim"], "STIM")]}
    print(json.dumps({
        "model": f"Supervised(n_factors={args.n_factors}, posterior={args.posterior}, two_step={args.two_step})",
        "cells": adata.n_obs, "genes": adata.n_vars, "seconds": round(seconds, 1),
        "top10_stim_effect": {g: round(float(effect[g]), 3) for g in top},
        "top10_in_interferon_sets": int(sum(g.upper() in ifn for g in top)),
        "max_residual_factor_auroc": max(residual_auroc.values()), "residual_factor_auroc": residual_auroc,
    }, indent=1))


if __name__ == "__main__":
    main()
