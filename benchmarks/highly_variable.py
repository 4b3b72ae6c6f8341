"""A file with var["highly_variable"] fits in about the time of its HVG subset, with zero loadings outside it.

Kang PBMC (log1p CP10k, 13,215 genes, 2,000 flagged highly variable by scanpy), Spex with the Hallmark sets:
the whole AnnData (the flag selects the genes) against the AnnData subset to its HVGs beforehand, then the same
whole AnnData with use_highly_variable=False (every gene). Prints one JSON line.

    python benchmarks/highly_variable.py [--all-genes]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import scanpy as sc
import torch

import pathfactor as pf

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _fit(adata, **kw):
    start = time.perf_counter()
    model = pf.models.Spex(n_sparse=2, n_dense=2, progress=False).fit(adata, annotations="hallmark", **kw)
    return model, round(time.perf_counter() - start, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all-genes", action="store_true", help="also time the fit of every gene (slow)")
    args = parser.parse_args()
    path = SHARED / "kang2018_ifnb_sub2000_counts.h5ad"
    if not path.exists():
        sys.exit(f"{path} is absent")
    torch.set_num_threads(2)
    adata = ad.read_h5ad(path)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    sc.pp.highly_variable_genes(adata, n_top_genes=2000)
    flagged, flagged_s = _fit(adata)
    subset, subset_s = _fit(adata[:, adata.var.highly_variable].copy())
    adata_out = adata.copy()
    flagged.write(adata_out)
    outside = ~adata.var.highly_variable.to_numpy()
    row = {"genes": adata.n_vars, "highly_variable": int((~outside).sum()), "seconds_flagged": flagged_s,
           "seconds_subset": subset_s,
           "max_abs_loading_outside": float(np.abs(adata_out.varm["spex_loadings"][outside]).max()),
           "genes_left_out_in_uns": len(adata_out.uns["spex"]["genes_left_out"]),
           "same_loadings_as_subset": bool(np.allclose(flagged.loadings_.to_numpy(), subset.loadings_.to_numpy(),
                                                       atol=1e-5))}
    if args.all_genes:
        _, row["seconds_every_gene"] = _fit(adata, use_highly_variable=False)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
