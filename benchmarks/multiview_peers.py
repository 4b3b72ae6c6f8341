"""Several views with missing entries: Spex against MuVI (annotated, multi-view) and MOFA+ (mofapy2, unannotated)
on one simulation, in one run. Prints one JSON object (and writes it with --out).

Simulation: two Gaussian views (``--genes`` and ``--proteins`` features) sharing 10 factors. Each factor has a gene
set per view; factors 0-5 are active in both views, 6-7 in the first only, 8-9 in the second only (view-specific
activity). The annotation given to the models is noisy: ``--noise`` of each set's members are dropped and as many
non-members added. ``--missing`` of all entries are hidden at random (NaN).

Reported per method: seconds (fit only, one thread), mask F1 per view of the annotated factors (evaluate.mask_f1,
annotated methods), factor recovery (mean |correlation| of the Hungarian-matched factors), and the RMSE of the
hidden entries against the noise-free signal (imputation). MOFA+ and Spex(unannotated) fit 10 free factors.

Run in the peer environment (muvi, mofapy2 and pathfactor installed; benchmarks/requirements-peers.txt):

    /work/peer-venv/bin/python benchmarks/multiview_peers.py --out benchmarks/results/multiview_peers.json

Also on real data (``--real``, default ../shared/data/multiview): TCGA breast cancer with the protein view missing for
70 tumours, Spex against MOFA+ (time, Basal AUROC, protein imputation on 30 more hidden tumours).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
import warnings

import numpy as np


def simulate(n: int, genes: int, proteins: int, noise: float, missing: float, seed: int):
    rng = np.random.default_rng(seed)
    K, sizes = 10, (genes, proteins)
    active = [np.r_[np.ones(6), np.ones(2), np.zeros(2)], np.r_[np.ones(6), np.zeros(2), np.ones(2)]]
    X = rng.normal(size=(n, K))
    views, masks, noisy, signals = [], [], [], []
    for v, G in enumerate(sizes):
        member = np.zeros((G, K), dtype=bool)
        for k in range(K):
            member[rng.choice(G, max(8, G // 15), replace=False), k] = True
        W = rng.normal(size=(G, K)) * member * active[v][None, :]
        signal = X @ W.T
        Y = signal + rng.normal(size=(n, G))
        given = member.copy()
        for k in range(K):       # drop `noise` of the members and add as many non-members
            ins, outs = np.flatnonzero(member[:, k]), np.flatnonzero(~member[:, k])
            m = int(round(noise * len(ins)))
            given[rng.choice(ins, m, replace=False), k] = False
            given[rng.choice(outs, m, replace=False), k] = True
        hidden = rng.random(Y.shape) < missing
        views.append(np.where(hidden, np.nan, Y))
        masks.append(member & (active[v][None, :] > 0))
        noisy.append(given)
        signals.append(signal)
    return X, views, masks, noisy, signals


def _impute_rmse(views, signals, predictions):
    errs = [((p - s)[np.isnan(y)]) for y, s, p in zip(views, signals, predictions)]
    return float(np.sqrt(np.mean(np.concatenate(errs) ** 2)))


def _recovery(X, scores):
    from pathfactor.evaluate import match_factors

    _, _, corr = match_factors(X, scores)
    return float(np.mean(np.abs(corr)))


def _f1(masks, loadings):
    from pathfactor.evaluate import mask_f1

    return [round(float(mask_f1(m, W)), 4) for m, W in zip(masks, loadings)]


def run_spex(views, noisy, annotated: bool, seed: int):
    import anndata as ad
    import pandas as pd

    import pathfactor as pf

    names = ["rna", "adt"]
    data = {}
    for name, Y in zip(names, views):
        a = ad.AnnData(Y.astype(np.float32))
        a.obs_names = [f"c{i}" for i in range(Y.shape[0])]
        a.var_names = [f"{name}{j}" for j in range(Y.shape[1])]
        data[name] = a
    sets = None
    if annotated:
        sets = {name: pd.DataFrame(m, index=data[name].var_names, columns=[f"T{k}" for k in range(m.shape[1])])
                for name, m in zip(names, noisy)}
    model = pf.models.Spex(n_sparse=0 if annotated else 10, min_set_size=5, progress=False)
    start = time.perf_counter()
    model.fit(data, annotations=sets, allow_missing=True, seed=seed)
    seconds = time.perf_counter() - start
    imputed = model.impute()
    K = 10
    loadings = [model.view_loadings(n).to_numpy()[:, :K] for n in names]
    return {"seconds": round(seconds, 2), "epochs": len(model.history_),
            "scores": model.factor_scores_.to_numpy()[:, :K], "loadings": loadings,
            "imputed": [imputed[n] for n in names]}


def run_muvi(views, noisy, seed: int, epochs: int | None):
    import muvi
    import torch

    logging.getLogger("muvi").setLevel(logging.ERROR)
    obs = {"rna": views[0].astype(np.float32), "adt": views[1].astype(np.float32)}
    masks = {"rna": noisy[0].T.copy(), "adt": noisy[1].T.copy()}
    start = time.perf_counter()
    model = muvi.MuVI(observations=obs, prior_masks=masks, prior_confidence=0.99, device="cpu")
    model.fit(batch_size=min(1000, views[0].shape[0]), n_epochs=epochs or 0, seed=seed, verbose=False)
    seconds = time.perf_counter() - start
    X = np.asarray(model.get_factor_scores(), dtype=np.float64)
    Ws = model.get_factor_loadings()
    loadings = [np.asarray(Ws[n], dtype=np.float64).T for n in ("rna", "adt")]
    # MuVI centres each view and divides by a global sd: map the predictions back
    imputed = []
    for y, W in zip(views, loadings):
        mean, sd = np.nanmean(y, 0), float(np.nanstd(y - np.nanmean(y, 0)))
        imputed.append(X @ W.T * sd + mean)
    del torch
    return {"seconds": round(seconds, 2), "epochs": int(model._training_log.get("n_iter", 0)), "scores": X,
            "loadings": loadings, "imputed": imputed}


def run_mofa(views, seed: int, names=("rna", "adt")):
    from mofapy2.run.entry_point import entry_point

    means = [np.nanmean(y, 0) for y in views]
    data = [[(y - m)] for y, m in zip(views, means)]
    start = time.perf_counter()
    ent = entry_point()
    ent.set_data_options(scale_views=False)
    ent.set_data_matrix(data, likelihoods=["gaussian"] * len(views), views_names=list(names))
    ent.set_model_options(factors=10, spikeslab_weights=True, ard_weights=True)
    ent.set_train_options(iter=1000, convergence_mode="fast", seed=seed, verbose=False, quiet=True)
    ent.build()
    ent.run()
    seconds = time.perf_counter() - start
    Z = ent.model.nodes["Z"].getExpectation()
    Ws = ent.model.nodes["W"].getExpectation()
    imputed = [Z @ W.T + m for W, m in zip(Ws, means)]
    return {"seconds": round(seconds, 2), "scores": Z, "loadings": list(Ws), "imputed": imputed}


def real_tcga(data_dir: str, seed: int) -> dict:
    """TCGA breast cancer (mRNA, miRNA, protein; protein missing for 70 tumours, and hidden for 30 more with known
    values): Spex (10 sparse factors) and MOFA+ (10 factors) side by side: seconds, Basal-vs-rest AUROC of the best
    factor, RMSE of the hidden protein values (view mean as the baseline)."""
    import mudata as md

    import pathfactor as pf
    from pathfactor.evaluate import auroc

    mdata = md.read_h5mu(os.path.join(data_dir, "tcga_brca_diablo.h5mu"))
    names = ["mrna", "mirna", "protein"]
    mats = [np.asarray(mdata[n].X, dtype=np.float64).copy() for n in names]
    truth = mats[2].copy()
    rng = np.random.default_rng(seed)
    train = np.flatnonzero(mdata.obs["has_protein"].to_numpy())
    hidden = rng.choice(train, 30, replace=False)
    mats[2][hidden] = np.nan
    subtype = mdata.obs["subtype"].astype(str)

    def summary(seconds, scores, protein):
        aucs = [auroc(scores[:, k], subtype, "Basal") for k in range(scores.shape[1])]
        return {"seconds": round(seconds, 2), "auroc_basal": round(max(max(a, 1 - a) for a in aucs), 4),
                "protein_rmse_hidden": round(float(np.sqrt(np.mean((protein[hidden] - truth[hidden]) ** 2))), 4)}

    import anndata as ad

    views = {}
    for n, Y in zip(names, mats):
        a = ad.AnnData(Y.astype(np.float32))
        a.obs_names, a.var_names = list(mdata.obs_names), [str(v) for v in mdata[n].var_names]
        views[n] = a
    start = time.perf_counter()
    model = pf.models.Spex(n_sparse=10, progress=False).fit(views, allow_missing=True, seed=seed)
    spex = summary(time.perf_counter() - start, model.factor_scores_.to_numpy(), model.impute()["protein"])
    fit = run_mofa(mats, seed, names)
    mofa = summary(fit["seconds"], fit["scores"], fit["imputed"][2])
    mean = np.broadcast_to(np.nanmean(mats[2], 0), truth.shape)
    return {"data": "tcga_brca_diablo (220 tumours; protein missing for 70, hidden for 30 more)",
            "protein_rmse_hidden_view_mean": round(float(np.sqrt(np.mean((mean[hidden] - truth[hidden]) ** 2))), 4),
            "spex": spex, "mofa": mofa}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cells", type=int, default=1000)
    p.add_argument("--genes", type=int, default=800)
    p.add_argument("--proteins", type=int, default=200)
    p.add_argument("--noise", type=float, default=0.2)
    p.add_argument("--missing", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--muvi-epochs", type=int, default=None)
    p.add_argument("--methods", default="spex,muvi,spex-free,mofa")
    p.add_argument("--out", default="")
    p.add_argument("--real", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared",
                                                  "data", "multiview"),
                   help="folder of the real multi-view data ('' to skip the TCGA comparison)")
    args = p.parse_args()
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))
    warnings.simplefilter("ignore")
    X, views, masks, noisy, signals = simulate(args.cells, args.genes, args.proteins, args.noise, args.missing,
                                               args.seed)
    baseline = [np.broadcast_to(np.nanmean(y, 0), y.shape) for y in views]
    out = {"simulation": vars(args) | {"factors": 10, "views": {"rna": args.genes, "adt": args.proteins},
                                       "activity": "factors 0-5 both views, 6-7 rna only, 8-9 adt only"},
           "threads": torch.get_num_threads(), "rmse_hidden_view_mean": round(_impute_rmse(views, signals, baseline), 4),
           "methods": {}}
    runners = {"spex": lambda: run_spex(views, noisy, True, args.seed),
               "muvi": lambda: run_muvi(views, noisy, args.seed, args.muvi_epochs),
               "spex-free": lambda: run_spex(views, noisy, False, args.seed),
               "mofa": lambda: run_mofa(views, args.seed)}
    for name in args.methods.split(","):
        fit = runners[name]()
        row = {"seconds": fit["seconds"], "factor_recovery": round(_recovery(X, fit["scores"]), 4),
               "rmse_hidden": round(_impute_rmse(views, signals, fit["imputed"]), 4)}
        if name in ("spex", "muvi"):
            row["mask_f1_per_view"] = _f1(masks, fit["loadings"])
        if "epochs" in fit:
            row["epochs"] = fit["epochs"]
        out["methods"][name] = row
    if args.real and os.path.isdir(args.real):
        out["tcga_brca"] = real_tcga(args.real, args.seed)
    m = out["methods"]
    if "spex" in m and "muvi" in m:
        out["spex_speedup_vs_muvi"] = round(m["muvi"]["seconds"] / m["spex"]["seconds"], 1)
    if "spex-free" in m and "mofa" in m:
        out["spex_free_speedup_vs_mofa"] = round(m["mofa"]["seconds"] / m["spex-free"]["seconds"], 1)
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
