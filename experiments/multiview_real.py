"""Spex on real multi-view data (``../shared/data/multiview``). Prints one JSON object.

* ECCITE-seq PBMC: RNA (NB, 2000 highly variable genes) + 49 surface proteins (NB), 10 sparse factors. Which factor
  separates the ADT-gated CD4 from the CD8 T cells (AUROC), and are CD4 / CD8 at the top of its protein loadings
  and CD8A / CD8B among its top RNA loadings? Fitted twice: the joint likelihood (``view_weights=None``) and
  balanced views (``view_weights="balanced"``: the 49 proteins count as much as the 2000 genes).
* TCGA breast cancer: mRNA + miRNA + protein (Gaussian), the protein view missing for the 70 test tumours. Basal vs
  rest AUROC of the best factor, and the missing protein values (known for none of them here, so: hide the protein
  view of 30 random train tumours as well, and compare imputation with the view mean there).

    python experiments/multiview_real.py [--data ../shared/data/multiview]
"""
from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path

import mudata as md
import numpy as np
import scanpy as sc
import torch

import pathfactor as pf
from pathfactor.evaluate import auroc

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "multiview"


def _rank(loadings, factor, names) -> dict:
    order = list(loadings[factor].sort_values(ascending=False).index)
    return {n: order.index(n) + 1 for n in names}


def eccite(data: Path, seed: int, weights=None) -> dict:
    mdata = md.read_h5mu(data / "eccite2019_pbmc_ctrl500.h5mu")
    rna = mdata["rna"].copy()
    logged = rna.copy()
    sc.pp.normalize_total(logged, target_sum=1e4)
    sc.pp.log1p(logged)
    sc.pp.highly_variable_genes(logged, n_top_genes=2000)
    views = {"rna": rna[:, logged.var.highly_variable].copy(), "adt": mdata["adt"].copy()}
    labels = mdata.obs["adt_gate_label"].astype(str)
    start = time.perf_counter()
    model = pf.models.Spex(n_sparse=10, n_dense=0, likelihood={"rna": "nb", "adt": "nb"}, view_weights=weights,
                           progress=False)
    model.fit(md.MuData(views), seed=seed)
    seconds = time.perf_counter() - start
    t = labels.isin(["CD4_T", "CD8_T"]).to_numpy()
    scores = model.factor_scores_[t]
    aucs = {f: auroc(scores[f], labels[t], "CD8_T") for f in scores.columns}
    best = max(aucs, key=lambda f: abs(aucs[f] - 0.5))
    sign = 1.0 if aucs[best] >= 0.5 else -1.0      # the CD8 side up
    adt = model.view_loadings("adt") * sign
    rna_l = model.view_loadings("rna") * sign
    return {"view_weights": {k: round(v, 4) for k, v in model.view_weights_.items()},
            "cells": int(mdata.n_obs), "rna_genes": views["rna"].n_vars, "proteins": views["adt"].n_vars,
            "seconds": round(seconds, 1), "epochs": len(model.history_), "converged": bool(model.converged_),
            "cd4_cd8_factor": best, "auroc_cd8_vs_cd4": round(max(aucs[best], 1 - aucs[best]), 4),
            "protein_top5_cd8_side": list(adt[best].sort_values(ascending=False).index[:5]),
            "protein_top5_cd4_side": list(adt[best].sort_values().index[:5]),
            "rank_CD8_protein_cd8_side": _rank(adt, best, ["CD8"])["CD8"],
            "rank_CD4_protein_cd4_side": _rank(-adt, best, ["CD4"])["CD4"],
            "rna_top10_cd8_side": list(rna_l[best].sort_values(ascending=False).index[:10]),
            "rank_CD8A_CD8B_rna": _rank(rna_l, best, [g for g in ("CD8A", "CD8B") if g in rna_l.index]),
            "relevance_views": model.relevance_views_.loc[best].round(4).to_dict()}


def tcga(data: Path, seed: int) -> dict:
    mdata = md.read_h5mu(data / "tcga_brca_diablo.h5mu")
    views = {k: mdata[k].copy() for k in ("mrna", "mirna", "protein")}
    truth = np.asarray(views["protein"].X, dtype=np.float64).copy()
    rng = np.random.default_rng(seed)
    train = np.flatnonzero(mdata.obs["has_protein"].to_numpy())
    hidden = rng.choice(train, 30, replace=False)
    prot = truth.copy()
    prot[hidden] = np.nan
    views["protein"].X = prot.astype(np.float32)
    start = time.perf_counter()
    model = pf.models.Spex(n_sparse=10, n_dense=0, progress=False)
    model.fit(md.MuData(views), allow_missing=True, seed=seed)
    seconds = time.perf_counter() - start
    subtype = mdata.obs["subtype"].astype(str)
    aucs = {f: auroc(model.factor_scores_[f], subtype, "Basal") for f in model.factor_scores_.columns}
    best = max(aucs, key=lambda f: abs(aucs[f] - 0.5))
    missing_rows = np.flatnonzero(~mdata.obs["has_protein"].to_numpy())
    imputed = model.impute()["protein"]
    view_mean = np.nanmean(prot, 0)
    rmse = lambda a: float(np.sqrt(np.mean((a[hidden] - truth[hidden]) ** 2)))
    # a reference the factor model does not claim to beat: ridge regression of protein on mRNA + miRNA, fitted on
    # the tumours with protein, penalty by leave-one-out (scikit-learn's RidgeCV)
    from sklearn.linear_model import RidgeCV

    known = np.setdiff1d(train, hidden)
    other = np.concatenate([np.asarray(mdata[k].X, dtype=np.float64) for k in ("mrna", "mirna")], 1)
    ridge = RidgeCV(alphas=np.logspace(-1, 4, 20)).fit(other[known], truth[known])
    ridge_pred = np.zeros_like(truth)
    ridge_pred[hidden] = ridge.predict(other[hidden])
    aucs_missing = auroc(model.factor_scores_[best].iloc[missing_rows], subtype.iloc[missing_rows], "Basal")
    return {"samples": int(mdata.n_obs), "protein_missing_samples": int(len(missing_rows)),
            "hidden_train_samples": 30, "seconds": round(seconds, 1), "epochs": len(model.history_),
            "basal_factor": best, "auroc_basal_vs_rest": round(max(aucs[best], 1 - aucs[best]), 4),
            "auroc_basal_vs_rest_on_samples_without_protein": round(max(aucs_missing, 1 - aucs_missing), 4),
            "protein_rmse_hidden_spex": round(rmse(imputed), 4),
            "protein_rmse_hidden_view_mean": round(rmse(np.broadcast_to(view_mean, truth.shape)), 4),
            "protein_rmse_hidden_ridge_from_mrna_mirna": round(rmse(ridge_pred), 4),
            "relevance_views": model.relevance_views_.loc[best].round(4).to_dict()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))
    warnings.simplefilter("ignore")
    print(json.dumps({"eccite_joint": eccite(args.data, args.seed),
                      "eccite_balanced_views": eccite(args.data, args.seed, "balanced"),
                      "tcga_brca": tcga(args.data, args.seed)}, indent=1))


if __name__ == "__main__":
    main()
