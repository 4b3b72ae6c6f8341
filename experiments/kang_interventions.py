"""Interventions on programs on real data: Kang et al. 2018 (IFN-beta stimulation as the intervention, control as
the reference) and, as a negative control, the ECCITE-seq PBMC hashtags (four hashtags of one control sample:
no hashtag should move a program).

    python experiments/kang_interventions.py [--data ../shared/data] [--sweep]

Both fit Spex with the Hallmark sets (defaults; Kang also with sets of 10+ genes, which keeps the interferon-alpha
set; 2000 HVGs of log1p CP10k) and interventions; prints one JSON
object and writes experiments/kang_interventions.json. For each program called on Kang, ``drivers`` lists its
largest loadings and the gene set's own STIM - CTRL score difference, so a call can be read against its genes.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import torch

import pathfactor as pf

from kang import SHARED_DATA, load_kang_log

OUT = Path(__file__).with_suffix(".json")


def summary(model, level: str, alpha: float = 0.01) -> dict:
    eff, lfsr = model.intervention_effects_[level], model.intervention_effects_lfsr_[level]
    called = lfsr[lfsr < alpha].index
    interferon = [f for f in eff.index if "INTERFERON" in f]
    return {"reference": model.intervention_reference_, "level": level,
            "interferon": {f: {"effect": round(float(eff[f]), 3), "lfsr": float(f"{lfsr[f]:.3g}")} for f in interferon},
            f"called_lfsr_below_{alpha}": {f: round(float(eff[f]), 3) for f in
                                           eff[called].abs().sort_values(ascending=False).index},
            "other_programs_called": int(sum(1 for f in called if f not in interferon)),
            "other_programs_called_with_abs_effect_above_1": int(sum(1 for f in called if f not in interferon
                                                                   and abs(eff[f]) > 1)),
            "other_programs_called_that_are_one_gene": {
                f: gene for f, gene in pf.evaluate.one_gene_factors(model.loadings_).items()
                if f in called and f not in interferon},
            "programs": int(len(eff))}


def drivers(model, adata, programs, n_genes: int = 3) -> dict:
    """What each called program is made of: its ``n_genes`` largest loadings (gene: [loading, in the set,
    STIM - CTRL mean of the gene's log expression]) and the standardised STIM - CTRL difference of the mean z-scored
    expression of the set's genes in the data (the gene-set score a t-test would use)."""
    X = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    stim = (adata.obs["stim"] == "STIM").to_numpy()
    shift = pd.Series(X[stim].mean(0) - X[~stim].mean(0), index=adata.var_names)
    z = (X - X.mean(0)) / X.std(0).clip(1e-8)
    members = pf.datasets.gene_sets("hallmark").to_dict()
    out = {}
    for program in programs:
        loadings = model.loadings_[program]
        top = loadings.abs().sort_values(ascending=False).index[:n_genes]
        entry = {"top_genes": {g: [round(float(loadings[g]), 3), g in members.get(program, ()),
                                   round(float(shift[g]), 2)] for g in top}}
        in_data = adata.var_names.isin(list(members.get(program, ())))
        if in_data.any():
            score = z[:, in_data].mean(1)
            spread = np.sqrt(0.5 * (score[stim].var() + score[~stim].var()))
            entry["set_score_difference_sd"] = round(float((score[stim].mean() - score[~stim].mean()) / spread), 2)
        out[program] = entry
    return out


def kang(data: Path, min_set_size: int) -> dict:
    adata = load_kang_log(data)
    start = time.perf_counter()
    model = pf.models.Spex(progress=False, min_set_size=min_set_size).fit(
        adata, annotations=pf.datasets.gene_sets("hallmark"), interventions="stim", reference="CTRL")
    out = {"data": "kang2018_ifnb_sub2000 (log1p CP10k, 2000 HVGs)", "cells": adata.n_obs,
           "min_set_size": min_set_size, "seconds": round(time.perf_counter() - start, 1), **summary(model, "STIM")}
    out["drivers"] = drivers(model, adata, list(out["called_lfsr_below_0.01"]))
    table = model.compare(adata, groupby="stim", reference="CTRL")
    out["compare_called_lfsr_below_0.01"] = int((table.lfsr < 0.01).sum())
    out["compare_top5"] = [[r.factor, round(float(r.effect), 3), float(f"{r.lfsr:.3g}")] for r in table.head(5).itertuples()]
    return out


def kang_settings(data: Path) -> list[dict]:
    """How many other programs STIM moves (lfsr < 0.01) under other settings than the defaults, beside the ELBO per
    observation (the criterion the defaults are chosen by) and the share of the programs' 3 largest loadings that
    lie in their own gene set."""
    adata = load_kang_log(data)
    rows = []
    for n_sparse, n_dense, confidence in ((0, 0, 2.0), (2, 0, 2.0), (5, 0, 2.0), (10, 0, 2.0), (2, 2, 2.0),
                                          (5, 5, 2.0), (2, 0, 0.5), (2, 0, 10.0), (2, 0, 100.0)):
        model = pf.models.Spex(progress=False, n_sparse=n_sparse, n_dense=n_dense, slab_confidence=confidence).fit(
            adata, annotations=pf.datasets.gene_sets("hallmark"), interventions="stim", reference="CTRL")
        called = summary(model, "STIM")
        annotated = [f for f in model.loadings_.columns if f.startswith("HALLMARK")]
        made_of = drivers(model, adata, annotated)
        in_set = np.mean([np.mean([v[1] for v in made_of[f]["top_genes"].values()]) for f in annotated])
        rows.append({"n_sparse": n_sparse, "n_dense": n_dense, "slab_confidence": confidence,
                     "elbo_per_observation": round(float(model.elbo_) / (adata.n_obs * adata.n_vars), 5),
                     "other_programs_called": called["other_programs_called"],
                     "other_programs_called_with_abs_effect_above_1":
                         called["other_programs_called_with_abs_effect_above_1"],
                     "other_programs_called_that_are_one_gene":
                         len(called["other_programs_called_that_are_one_gene"]),
                     "top3_loadings_in_own_set": round(float(in_set), 3)})
    return rows


def kang_replication(data: Path, seed: int = 0) -> dict:
    """Are the STIM calls real shifts of the data? Fit on a random half of the cells and test the called programs
    in the other half (``compare``: the held-out cells' factors under the first half's loadings), and read each
    call within the cell types of the full fit (mean STIM - CTRL factor score in every type of 80+ cells)."""
    adata = load_kang_log(data)
    hallmark = pf.datasets.gene_sets("hallmark")
    half = np.random.default_rng(seed).random(adata.n_obs) < 0.5
    first, second = adata[half].copy(), adata[~half].copy()
    model = pf.models.Spex(progress=False).fit(first, annotations=hallmark, interventions="stim", reference="CTRL")
    called = summary(model, "STIM")["called_lfsr_below_0.01"]
    held_out = model.compare(second, groupby="stim", reference="CTRL").set_index("factor")
    replicated = {f: {"first_half": e, "second_half": round(float(held_out.at[f, "effect"]), 3),
                      "second_half_lfsr": float(f"{held_out.at[f, 'lfsr']:.3g}")} for f, e in called.items()}
    full = pf.models.Spex(progress=False).fit(adata, annotations=hallmark, interventions="stim", reference="CTRL")
    calls = summary(full, "STIM")["called_lfsr_below_0.01"]
    scores = pd.DataFrame(np.asarray(full.factor_scores_), index=adata.obs_names, columns=full.loadings_.columns)
    stim = (adata.obs["stim"] == "STIM").to_numpy()
    types = adata.obs["seurat_annotations"].astype(str).to_numpy()
    within = {}
    for kind in pd.Series(types).value_counts().index:
        here = types == kind
        if here.sum() < 80:
            continue
        shift = scores[here & stim].mean() - scores[here & ~stim].mean()
        within[f"{kind} ({int(here.sum())})"] = {f: round(float(shift[f]), 2) for f in calls}
    same_sign = {f: int(sum(np.sign(v[f]) == np.sign(e) for v in within.values())) for f, e in calls.items()}
    return {"cells_per_half": [int(half.sum()), int((~half).sum())], "called_first_half": len(called),
            "replicated_second_half_same_sign_lfsr_below_0.01": int(sum(
                np.sign(v["second_half"]) == np.sign(v["first_half"]) and v["second_half_lfsr"] < 0.01
                for v in replicated.values())),
            "split_half": replicated, "called_full": len(calls),
            "cell_types": len(within), "cell_types_with_the_call's_sign": same_sign, "within_cell_types": within}


def kang_pseudo_guides(data: Path, n_guides: int = 20, n_stim_guides: int = 3, seed: int = 0) -> dict:
    """A screen built from real cells, with known answers: the CTRL cells dealt at random to a reference (40 %)
    and ``n_guides`` null pseudo-guides (no such guide can move a program: every call on one is false), plus
    ``n_stim_guides`` guides of ~30 STIM cells each (a strong perturbation in a guide-sized group: each should
    raise the interferon program)."""
    adata = load_kang_log(data)
    rng = np.random.default_rng(seed)
    stim = (adata.obs["stim"] == "STIM").to_numpy()
    guides = ["non-targeting"] + [f"G{i:02d}" for i in range(n_guides)]
    label = np.where(stim, "", rng.choice(guides, adata.n_obs, p=[0.4] + [0.6 / n_guides] * n_guides)).astype(object)
    n_ctrl_guide = int(round(0.6 / n_guides * (~stim).sum()))
    picked = rng.choice(np.flatnonzero(stim), n_stim_guides * n_ctrl_guide, replace=False)
    for i, cells in enumerate(np.array_split(picked, n_stim_guides)):
        label[cells] = f"STIM{i}"
    adata = adata[label != ""].copy()
    adata.obs["guide"] = label[label != ""]
    model = pf.models.Spex(progress=False, min_set_size=10).fit(
        adata, annotations=pf.datasets.gene_sets("hallmark"), interventions="guide", reference="non-targeting")
    lfsr, eff = model.intervention_effects_lfsr_, model.intervention_effects_
    null = [g for g in lfsr.columns if g.startswith("G")]
    stim_guides = [g for g in lfsr.columns if g.startswith("STIM")]
    interferon = [f for f in lfsr.index if "INTERFERON" in f]
    return {"cells": adata.n_obs, "null_guides": len(null), "cells_per_stim_guide": n_ctrl_guide,
            "null_effects_tested": int(lfsr[null].size),
            "null_called_lfsr_below_0.05": int((lfsr[null] < 0.05).to_numpy().sum()),
            "null_called_lfsr_below_0.01": int((lfsr[null] < 0.01).to_numpy().sum()),
            "null_min_lfsr": float(f"{lfsr[null].to_numpy().min():.3g}"),
            "stim_guides": {g: {"interferon": {f: [round(float(eff.at[f, g]), 2), float(f"{lfsr.at[f, g]:.3g}")]
                                               for f in interferon},
                                "other_programs_called_lfsr_below_0.01": int(
                                    (lfsr[g].drop(interferon) < 0.01).sum())} for g in stim_guides}}


def kang_tiny_guides(data: Path, sizes=(1, 2, 5), seed: int = 0) -> dict:
    """A null screen of small guides: 60 % of the CTRL cells dealt into guides of ``size`` cells each, the rest
    the reference. No guide can move a program; a guide of one cell has no spread of its own, so its effects come
    without lfsr (NaN) rather than as calls."""
    import warnings

    adata = load_kang_log(data)
    adata = adata[(adata.obs["stim"] == "CTRL").to_numpy()].copy()
    rng, out = np.random.default_rng(seed), {}
    for size in sizes:
        n_guides = int(0.6 * adata.n_obs / size)
        label = np.full(adata.n_obs, "non-targeting", dtype=object)
        cells = rng.permutation(adata.n_obs)[: n_guides * size]
        label[cells] = np.repeat([f"G{i:03d}" for i in range(n_guides)], size)
        adata.obs["guide"] = label
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # one-cell guides are warned of: expected here
            lfsr = pf.models.Spex(progress=False, min_set_size=10).fit(
                adata, annotations=pf.datasets.gene_sets("hallmark"), interventions="guide",
                reference="non-targeting").intervention_effects_lfsr_.to_numpy()
        out[f"{size}_cells"] = {"guides": n_guides, "effects": int(lfsr.size),
                                "called_lfsr_below_0.05": int((lfsr < 0.05).sum()),
                                "without_lfsr": int(np.isnan(lfsr).sum())}
    return out


def eccite_hashtags(data: Path) -> dict:
    adata = ad.read_h5ad(Path(data) / "multiview" / "eccite2019_pbmc_ctrl500_rna_counts.h5ad")
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    sc.pp.highly_variable_genes(adata, n_top_genes=2000)
    adata = adata[:, adata.var.highly_variable].copy()
    start = time.perf_counter()
    model = pf.models.Spex(progress=False).fit(adata, annotations=pf.datasets.gene_sets("hallmark"),
                                               interventions="hto_argmax")
    lfsr = model.intervention_effects_lfsr_
    return {"data": "eccite2019 PBMC control (500 cells, log1p CP10k, 2000 HVGs), interventions = hto_argmax",
            "seconds": round(time.perf_counter() - start, 1), "reference": model.intervention_reference_,
            "levels": list(lfsr.columns), "effects_tested": int(lfsr.size),
            "called_lfsr_below_0.05": int((lfsr < 0.05).to_numpy().sum()),
            "called_lfsr_below_0.01": int((lfsr < 0.01).to_numpy().sum()),
            "min_lfsr": float(f"{lfsr.to_numpy().min():.3g}")}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", type=Path, default=SHARED_DATA)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sweep", action="store_true", help="also fit Kang under 9 other settings (kang_settings)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    result = {"kang": kang(args.data, 15), "kang_min_set_size_10": kang(args.data, 10),
              "kang_replication": kang_replication(args.data),
              "kang_pseudo_guides_negative_control": kang_pseudo_guides(args.data),
              "kang_tiny_guides_negative_control": kang_tiny_guides(args.data),
              "eccite_hashtags_negative_control": eccite_hashtags(args.data)}
    if args.sweep:
        result["kang_settings"] = kang_settings(args.data)
    print(json.dumps(result, indent=1))
    OUT.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
