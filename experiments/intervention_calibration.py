"""Perturbation -> program effects on a simulated CRISPR screen: are the lfsr calls calibrated, how much power do
they have against a t-test on factor scores, and what does the blocked posterior buy over the mean-field one?

Design (per seed): N cells, each with one guide target (60 targets + a non-targeting reference holding 20 % of
the cells), K programs of 60 genes with loadings of different strength (strong 0.6 and weak 0.2, noise sd 1),
gene sets given to Spex with 10 % of their genes swapped for random ones. A third of the targets do nothing;
the others move 1-2 programs by +-U(0.15, 0.6) factor sd.

* Spex, blocked and mean-field: calls at lfsr < 0.05 -> false sign rate (a call on a true zero, or with the wrong
  sign, is false) and power (true non-zero effects called with the right sign); 90 % interval coverage of beta.
* t-test: Spex without interventions, then Welch's t-test of each target's cells against the reference cells on
  each factor's scores (what a user would otherwise do). Power compared at the same false sign rate: for every
  method, the most calls (ranked by lfsr, or by p-value) whose false sign rate stays <= 5 %.

    python experiments/intervention_calibration.py [--seeds 0 1 2] [--cells 12000]

Prints one JSON line per seed and a summary line; writes experiments/intervention_calibration.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch
from scipy import stats

from pathfactor.models import Spex

OUT = Path(__file__).with_suffix(".json")


def simulate(seed: int, n_cells: int, n_genes: int = 1200, n_programs: int = 10, n_targets: int = 60):
    rng = np.random.default_rng(seed)
    targets = [f"T{i:02d}" for i in range(n_targets)]
    p = np.r_[0.2, np.full(n_targets, 0.8 / n_targets)]
    labels = rng.choice(["NT"] + targets, size=n_cells, p=p)
    beta = np.zeros((n_targets, n_programs))
    for i in range(n_targets):
        if i % 3 == 0:
            continue  # a third of the targets do nothing
        hit = rng.choice(n_programs, size=1 + (i % 3 == 2), replace=False)
        beta[i, hit] = rng.choice([-1, 1], size=hit.size) * rng.uniform(0.15, 0.6, size=hit.size)
    code = pd.Categorical(labels, categories=["NT"] + targets).codes
    shift = np.vstack([np.zeros(n_programs), beta])[code]
    X = rng.normal(size=(n_cells, n_programs)) + shift
    strength = np.where(np.arange(n_programs) % 2 == 0, 0.6, 0.2)  # strong and weak programs
    W = np.zeros((n_genes, n_programs))
    sets = {}
    genes = np.array([f"g{i}" for i in range(n_genes)])
    for k in range(n_programs):
        members = np.arange(k * 60, (k + 1) * 60)
        W[members, k] = strength[k] * rng.uniform(0.5, 1.5, size=members.size)
        given = members.copy()
        swap = rng.choice(members.size, size=6, replace=False)  # 10 % of each set is wrong
        given[swap] = rng.choice(np.setdiff1d(np.arange(n_genes), members), size=6, replace=False)
        sets[f"P{k}"] = list(genes[given])
    Y = X @ W.T + rng.normal(size=(n_cells, n_genes))
    adata = ad.AnnData(Y.astype(np.float32), obs=pd.DataFrame({"target": labels}, index=[f"c{i}" for i in
                                                                                          range(n_cells)]))
    adata.var_names = genes
    truth = pd.DataFrame(beta.T, index=[f"P{k}" for k in range(n_programs)], columns=targets)
    return adata, sets, truth, strength


def calls(score: np.ndarray, sign: np.ndarray, truth: np.ndarray, threshold: float) -> dict:
    """False sign rate and power of the calls ``score < threshold`` (each with its estimated sign)."""
    called = score < threshold
    right = called & (np.sign(truth) == sign) & (truth != 0)
    n_calls, n_true = int(called.sum()), int((truth != 0).sum())
    return {"calls": n_calls, "false_sign_rate": round((n_calls - int(right.sum())) / max(n_calls, 1), 4),
            "power": round(int(right.sum()) / max(n_true, 1), 4)}


def power_at_fsr(score: np.ndarray, sign: np.ndarray, truth: np.ndarray, fsr: float = 0.05) -> dict:
    """The most calls, ranked by ``score``, whose false sign rate stays <= ``fsr``, and their power."""
    order = np.argsort(score, kind="stable")
    right = ((np.sign(truth) == sign) & (truth != 0))[order]
    n = np.arange(1, order.size + 1)
    ok = np.nonzero((n - np.cumsum(right)) / n <= fsr)[0]
    best = int(ok.max()) + 1 if ok.size else 0
    return {"calls": best, "power": round(float(right[:best].sum()) / int((truth != 0).sum()), 4)}


def coverage(mean, sd, truth, level=0.9):
    z = stats.norm.ppf(0.5 + level / 2)
    inside = np.abs(mean - truth) <= z * sd
    return round(float(inside.mean()), 4)


def run(seed: int, n_cells: int) -> dict:
    adata, sets, truth, strength = simulate(seed, n_cells)
    out = {"seed": seed, "cells": n_cells, "genes": adata.n_vars, "programs": truth.shape[0],
           "targets": truth.shape[1], "true_effects": int((truth.to_numpy() != 0).sum())}
    t_ = truth.to_numpy()
    weak = np.repeat((strength < 0.5)[:, None], t_.shape[1], axis=1)
    for posterior in ("blocked", "mean-field"):
        start = time.perf_counter()
        m = Spex(n_sparse=0, min_set_size=5, posterior=posterior, progress=False)
        m.fit(adata, annotations=sets, interventions="target", reference="NT", seed=seed)
        eff = m.intervention_effects_.loc[truth.index, truth.columns].to_numpy()
        sd = m.intervention_effects_sd_.loc[truth.index, truth.columns].to_numpy()
        lfsr = m.intervention_effects_lfsr_.loc[truth.index, truth.columns].to_numpy()
        raw = m.intervention_estimates_.loc[truth.index, truth.columns].to_numpy()
        raw_sd = m.intervention_estimates_sd_.loc[truth.index, truth.columns].to_numpy()
        out.setdefault("_pool", {})[posterior] = (lfsr.ravel(), np.sign(eff).ravel(), t_.ravel())
        out[posterior] = {"seconds": round(time.perf_counter() - start, 1),
                          "lfsr_below_0.05": calls(lfsr.ravel(), np.sign(eff).ravel(), t_.ravel(), 0.05),
                          "at_fsr_0.05": power_at_fsr(lfsr.ravel(), np.sign(eff).ravel(), t_.ravel()),
                          "coverage90_all": coverage(eff, sd, t_),
                          "coverage90_nonzero": coverage(eff[t_ != 0], sd[t_ != 0], t_[t_ != 0]),
                          "coverage90_weak_programs": coverage(eff[weak], sd[weak], t_[weak]),
                          "coverage90_strong_programs": coverage(eff[~weak], sd[~weak], t_[~weak]),
                          "median_sd_weak_programs": round(float(np.median(sd[weak])), 4),
                          # before shrinkage: the posterior under the model's weak N(0, 1) prior (Finding 3's view)
                          "unshrunk_coverage90_weak_programs": coverage(raw[weak], raw_sd[weak], t_[weak]),
                          "unshrunk_coverage90_strong_programs": coverage(raw[~weak], raw_sd[~weak], t_[~weak]),
                          "unshrunk_median_sd_weak_programs": round(float(np.median(raw_sd[weak])), 4)}
    # the t-test on the factor scores of a fit without interventions
    plain = Spex(n_sparse=0, min_set_size=5, progress=False).fit(adata, annotations=sets, seed=seed)
    scores = plain.factor_scores_[truth.index]
    ref = scores[adata.obs["target"].to_numpy() == "NT"].to_numpy()
    pvals, diffs = np.ones(t_.shape), np.zeros(t_.shape)
    for j, target in enumerate(truth.columns):
        grp = scores[adata.obs["target"].to_numpy() == target].to_numpy()
        res = stats.ttest_ind(grp, ref, axis=0, equal_var=False)
        pvals[:, j], diffs[:, j] = res.pvalue, grp.mean(0) - ref.mean(0)
    out["_pool"]["t_test"] = (pvals.ravel(), np.sign(diffs).ravel(), t_.ravel())
    out["t_test"] = {"p_below_0.05": calls(pvals.ravel(), np.sign(diffs).ravel(), t_.ravel(), 0.05),
                     "at_fsr_0.05": power_at_fsr(pvals.ravel(), np.sign(diffs).ravel(), t_.ravel())}
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--cells", type=int, default=12000)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    pools = []
    for seed in args.seeds:
        rows.append(run(seed, args.cells))
        pools.append(rows[-1].pop("_pool"))
        print(json.dumps(rows[-1]), flush=True)
    summary = {"seeds": args.seeds}
    for method in ("blocked", "mean-field", "t_test"):  # all seeds' effects ranked together
        score, sign, truth = (np.concatenate([p[method][i] for p in pools]) for i in range(3))
        summary[f"{method}_pooled_at_fsr_0.05"] = power_at_fsr(score, sign, truth)
        summary[f"{method}_pooled_at_fsr_0.01"] = power_at_fsr(score, sign, truth, 0.01)
    for method, key in (("blocked", "lfsr_below_0.05"), ("mean-field", "lfsr_below_0.05"), ("t_test", "p_below_0.05")):
        calls_ = sum(r[method][key]["calls"] for r in rows)
        false = sum(round(r[method][key]["calls"] * r[method][key]["false_sign_rate"]) for r in rows)
        summary[f"{method}_{key}_pooled_false_sign_rate"] = round(false / max(calls_, 1), 4)
        summary[f"{method}_{key}_mean_power"] = round(float(np.mean([r[method][key]["power"] for r in rows])), 4)
        summary[f"{method}_power_at_fsr_0.05"] = [r[method]["at_fsr_0.05"]["power"] for r in rows]
    for method in ("blocked", "mean-field"):
        for what in ("coverage90_all", "coverage90_weak_programs", "coverage90_strong_programs",
                     "unshrunk_coverage90_weak_programs", "unshrunk_coverage90_strong_programs"):
            summary[f"{method}_{what}"] = [r[method][what] for r in rows]
    print(json.dumps(summary))
    OUT.write_text(json.dumps({"runs": rows, "summary": summary}, indent=1) + "\n")


if __name__ == "__main__":
    main()
