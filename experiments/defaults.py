"""Do Spex's defaults hold across data sets? The number of unannotated factors against the biology and the ELBO.

For every real set in ../shared/data with known cell groups, Spex is fitted with (n_sparse, n_dense) in a small
grid, and each fit reports its ELBO per observation (a criterion the model computes) and how well annotated factors
separate the known groups (AUROC, as oriented: no flipping):

* mESC (182 cells, Hallmark): HALLMARK_G2M_CHECKPOINT, G2M vs rest;
* Kang PBMC (2000 cells, log1p CP10k, 2000 HVGs, Hallmark): HALLMARK_INTERFERON_GAMMA_RESPONSE, STIM vs CTRL;
* pbmc68k_reduced (700 cells, scaled log data, Spectra's immune sets): the best annotated factor for CD19+ B and
  for CD14+ Monocyte;
* Spectra's sample (1000 immune cells, log data, its HVGs, Spectra's sets): the best annotated factor for
  B_memory and for CD8_T.

    python experiments/defaults.py [--out experiments/results/defaults.json]
    python experiments/defaults.py --slab-confidence 0.5 2 10
        # the default (n_sparse, n_dense) with each slab confidence instead of the grid; writes
        # experiments/results/defaults_slab_confidence.json
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import anndata as ad
import torch

import pathfactor as pf
from pathfactor.evaluate import auroc

from kang import SHARED_DATA, load_kang_log

GRID = [(0, 0), (0, 2), (2, 0), (2, 2), (5, 5)]
RESULTS = Path(__file__).resolve().parent / "results"


def spectra_sets(data: Path) -> pf.GeneSets:
    return pf.GeneSets.read_json(data / "genesets" / "spectra_default_gene_sets.json")  # named cell_type/set


def cases(data: Path):
    """(name, AnnData, gene sets, obs column, {group: target factor or None for the best annotated one})."""
    hallmark = pf.datasets.gene_sets("hallmark")
    yield "mesc", pf.datasets.mesc(), hallmark, "cell_cycle_stage", {"G2M": "HALLMARK_G2M_CHECKPOINT"}
    yield "kang", load_kang_log(data), hallmark, "stim", {"STIM": "HALLMARK_INTERFERON_GAMMA_RESPONSE"}
    spectra = spectra_sets(data)
    pbmc = ad.read_h5ad(data / "scanpy_pbmc68k_reduced.h5ad")
    yield "pbmc68k", pbmc, spectra, "bulk_labels", {"CD19+ B": None, "CD14+ Monocyte": None}
    sample = ad.read_h5ad(data / "spectra_sample_data.h5ad")
    yield "spectra_sample", sample, spectra, "cell_type_annotations", {"B_memory": None, "CD8_T": None}


def score(model, adata, column, targets) -> dict:
    out = {}
    annotated = model.factor_kinds_.index[model.factor_kinds_ == "annotated"]
    for group, factor in targets.items():
        labels = adata.obs[column].astype(str)
        if factor is not None:
            out[group] = {factor: round(auroc(model.factor_scores_[factor], labels, group), 4)}
        else:
            values = {f: auroc(model.factor_scores_[f], labels, group) for f in annotated}
            best = max(values, key=values.get)
            out[group] = {best: round(values[best], 4)}
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", type=Path, default=SHARED_DATA)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--slab-confidence", type=float, nargs="+", default=None,
                   help="fit (2, 0) with each of these slab_confidence values instead of the (n_sparse, n_dense) grid")
    args = p.parse_args()
    if args.slab_confidence:
        settings = [(2, 0, c) for c in args.slab_confidence]
        args.out = args.out or RESULTS / "defaults_slab_confidence.json"
    else:
        settings = [(n_sparse, n_dense, None) for n_sparse, n_dense in GRID]
        args.out = args.out or RESULTS / "defaults.json"
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    rows = []
    for name, adata, sets, column, targets in cases(args.data):
        for n_sparse, n_dense, confidence in settings:
            start = time.perf_counter()
            extra = {} if confidence is None else {"slab_confidence": confidence}
            model = pf.models.Spex(n_sparse=n_sparse, n_dense=n_dense, progress=False, **extra).fit(
                adata, annotations=sets)
            n_obs = model.factor_scores_.shape[0] * model.loadings_.shape[0]
            rows.append({"data": name, "n_sparse": n_sparse, "n_dense": n_dense, **extra,
                         "elbo_per_obs": round(model.elbo_ / n_obs, 5), "auroc": score(model, adata, column, targets),
                         "factors": model.loadings_.shape[1], "epochs": len(model.history_),
                         "seconds": round(time.perf_counter() - start, 1)})
            print(json.dumps(rows[-1]), flush=True)
    chosen = {}
    for name in dict.fromkeys(r["data"] for r in rows):
        mine = [r for r in rows if r["data"] == name]
        best = max(mine, key=lambda r: r["elbo_per_obs"])
        chosen[name] = {"by_elbo": [best["n_sparse"], best["n_dense"]] + ([best["slab_confidence"]] if
                                                                        "slab_confidence" in best else []),
                        "auroc": best["auroc"]}
    print(json.dumps({"chosen_by_elbo": chosen}, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"fits": rows, "chosen_by_elbo": chosen}, indent=1) + "\n")


if __name__ == "__main__":
    main()
