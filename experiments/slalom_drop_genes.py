"""Slalom (f-scLVM, seed 001) with learned inclusion rates: does it drop the false members of a gene set?

Simulation (``pathfactor.data.simulate.noisy_annotations``, spex-LVM's benchmark): 20 sparse annotated factors on
1000 genes; in each gene set a fraction ``noise`` (20 % or 30 %) of the members are false (genes without a loading
on that factor) and as many true members are missing. For each cell count N (50, 100, 300), noise and seed (0-2)
it fits

* ``fixed``: ``rate_strength=None``, f-scLVM's fixed prior inclusion probabilities (1 - fpr in the set, fnr
  outside) -- the model before the change (bit-identical to it);
* ``learned``: the default, a Beta(9.9, 0.1) prior (mean 0.99, strength 10) on each factor's in-set rate;
* sensitivity variants: ``learned_n0=3`` / ``learned_n0=30`` (prior strength) and ``learned_in+out`` (the
  out-of-set rates learned too, strength 10);

checks that each fit's ELBO never fell (beyond float32 rounding, 1e-6 relative) and scores the recovered
memberships ``E[s_gk] > 0.5`` against the true support (micro precision / recall / F1 over the annotated
factors), with the counts of false members dropped, missing members gained, true members lost and non-members
gained; ``annotation_f1`` is the F1 of the noisy annotation itself. Then the same comparison on the mESC data
(Buettner 2015, hallmark + reactome_mouse, as ``experiments/mesc_slalom.py``): G2M AUROC of the cell-cycle
factors and how many annotated genes each drops.

Prints one JSON object and writes it to ``--out`` (default ``experiments/results/slalom_drop_genes.json``).

    python experiments/slalom_drop_genes.py [--threads 1] [--no-mesc] [--out PATH]
"""
from __future__ import annotations

import argparse
import json
import re
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import pathfactor as pf
from pathfactor import evaluate
from pathfactor.data.simulate import annotation_sets, noisy_annotations
from pathfactor.models.slalom import Slalom

METHODS = {
    "fixed": dict(rate_strength=None),
    "learned": dict(),
    "learned_n0=3": dict(rate_strength=3.0),
    "learned_n0=30": dict(rate_strength=30.0),
    "learned_in+out": dict(out_rate_strength=10.0),
}
CELLS, NOISES, SEEDS = (50, 100, 300), (0.2, 0.3), (0, 1, 2)
N_GENES, N_FACTORS = 1000, 20
#: the fits run in float32: an ELBO "decrease" below this relative size is rounding (float64 fits never fall)
ROUNDING = 1e-6
CELL_CYCLE = re.compile(r"G2M|CELL_CYCLE|MITOTIC", re.IGNORECASE)


def largest_drop(history) -> float:
    """The largest decrease of the ELBO between sweeps, relative to its size (0 when it never fell)."""
    h = np.asarray(history, dtype=float)
    return float(max(0.0, np.max(-np.diff(h) / np.abs(h[1:]), initial=0.0)))


def membership_scores(truth: np.ndarray, annotation: np.ndarray, included: np.ndarray) -> dict:
    """Counts of the recovered memberships against the truth (all genes x annotated factors)."""
    false_members, missing = annotation & ~truth, truth & ~annotation
    return {"tp": int((included & truth).sum()), "n_included": int(included.sum()), "n_true": int(truth.sum()),
            "false_members": int(false_members.sum()), "false_dropped": int((false_members & ~included).sum()),
            "missing": int(missing.sum()), "missing_gained": int((missing & included).sum()),
            "true_members_lost": int((annotation & truth & ~included).sum()),
            "false_gained": int((~annotation & ~truth & included).sum())}


def summarise(counts: list[dict]) -> dict:
    total = {k: sum(c[k] for c in counts) for k in counts[0]}
    precision = total["tp"] / max(total["n_included"], 1)
    recall = total["tp"] / max(total["n_true"], 1)
    f1 = 2 * precision * recall / max(precision + recall, 1e-12)
    return {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4),
            "false_dropped": f"{total['false_dropped']}/{total['false_members']}",
            "false_dropped_fraction": round(total["false_dropped"] / max(total["false_members"], 1), 4),
            "missing_gained": f"{total['missing_gained']}/{total['missing']}",
            "true_members_lost": total["true_members_lost"], "false_gained": total["false_gained"]}


def simulation() -> dict:
    rows, per_condition = [], []
    for n_cells in CELLS:
        for noise in NOISES:
            counts = {m: [] for m in METHODS}
            extra = {m: {"seconds": 0.0, "epochs": [], "drop": 0.0} for m in METHODS}
            annotation_counts = []
            for seed in SEEDS:
                sim = noisy_annotations(n_cells=n_cells, n_genes=N_GENES, n_factors=N_FACTORS, noise=noise, seed=seed)
                truth, annotation = sim.varm["mask_true"][:, :N_FACTORS], sim.varm["annotation"][:, :N_FACTORS]
                annotation_counts.append(membership_scores(truth, annotation, annotation))
                for method, kw in METHODS.items():
                    start = time.perf_counter()
                    m = Slalom(progress=False, min_set_size=5, **kw).fit(sim, annotations=annotation_sets(sim),
                                                                         device="cpu", seed=seed)
                    extra[method]["seconds"] += time.perf_counter() - start
                    extra[method]["epochs"].append(len(m.history_))
                    extra[method]["drop"] = max(extra[method]["drop"], largest_drop(m.history_))
                    included = m.inclusion_.to_numpy()[:, :N_FACTORS] > 0.5
                    counts[method].append(membership_scores(truth, annotation, included))
            condition = {"n_cells": n_cells, "noise": noise, "seeds": list(SEEDS),
                         "annotation_f1": summarise(annotation_counts)["f1"]}
            for method in METHODS:
                condition[method] = dict(summarise(counts[method]),
                                         seconds=round(extra[method]["seconds"], 2),
                                         epochs=extra[method]["epochs"],
                                         elbo_largest_relative_drop=float(f"{extra[method]['drop']:.2g}"),
                                         elbo_monotone=extra[method]["drop"] <= ROUNDING)
                rows.extend(counts[method])
            per_condition.append(condition)
    return {"design": {"n_genes": N_GENES, "n_factors": N_FACTORS, "cells": list(CELLS), "noise": list(NOISES),
                       "seeds": list(SEEDS), "rule": "E[s_gk] > 0.5", "methods": {k: v for k, v in METHODS.items()}},
            "conditions": per_condition}


def mesc() -> dict:
    adata = pf.datasets.mesc()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sets = pf.datasets.gene_sets("hallmark") + pf.datasets.gene_sets("reactome_mouse")
    stage = adata.obs["cell_cycle_stage"]
    out = {}
    for method in ("fixed", "learned", "learned_in+out"):
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = Slalom(progress=False, **METHODS[method]).fit(adata, annotations=sets, device="cpu", seed=0)
        seconds = time.perf_counter() - start
        ranking = m.relevance()
        annotated = m.annotation_.to_numpy()
        included = m.inclusion_.to_numpy() > 0.5
        live = m.active_.to_numpy()
        cycle = []
        for rank, name in enumerate(ranking.index):
            if not CELL_CYCLE.search(name):
                continue
            ann, inc = m.annotation_[name].to_numpy(), m.inclusion_[name].to_numpy() > 0.5
            cycle.append({"factor": name, "rank": rank, "active": bool(m.active_[name]),
                          "auroc_g2m": round(evaluate.auroc(m.factor_scores_[name], stage, "G2M"), 3),
                          "n_annotated": int(ann.sum()), "n_dropped": int((ann & ~inc).sum()),
                          "n_gained": int((~ann & inc).sum()),
                          "rate_in": round(float(m.inclusion_rates_.loc[name, "in_set"]), 4),
                          "rate_out": round(float(m.inclusion_rates_.loc[name, "out_of_set"]), 5)})
        top5 = [c for c in cycle if c["rank"] < 5]
        out[method] = {
            "seconds_fit": round(seconds, 2), "epochs": len(m.history_), "n_switched_off": int(m.n_switched_off_),
            "elbo_largest_relative_drop": float(f"{largest_drop(m.history_):.2g}"),
            "elbo_monotone": largest_drop(m.history_) <= ROUNDING,
            "annotated_genes_dropped_active_factors": f"{int((annotated & ~included)[:, live].sum())}/"
                                                      f"{int(annotated[:, live].sum())}",
            "genes_gained_active_factors": int((~annotated & included)[:, live].sum()),
            "first_cell_cycle_factor_in_top5": top5[0] if top5 else None,
            "best_g2m_auroc_in_top5": max((c["auroc_g2m"] for c in top5), default=None),
            "cell_cycle_factors": cycle,
        }
    return {"data": {"n_cells": adata.n_obs, "n_genes": adata.n_vars}, "gene_sets": "hallmark + reactome_mouse",
            "fits": out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-mesc", action="store_true", help="only the simulation")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "slalom_drop_genes.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = {"experiment": "slalom: learned inclusion rates drop false gene-set members", "threads": args.threads,
           "torch": torch.__version__, "pathfactor": pf.__version__, "simulation": simulation()}
    if not args.no_mesc:
        out["mesc"] = mesc()
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
