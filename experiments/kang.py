"""The Kang et al. 2018 IFN-beta PBMC subset as the experiments use it: counts -> CP10k -> log1p -> HVGs."""
from __future__ import annotations

from pathlib import Path

import anndata as ad
import scanpy as sc

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def load_kang_log(data: Path = SHARED_DATA, n_top_genes: int = 2000) -> ad.AnnData:
    """Log-normalised Kang cells restricted to ``n_top_genes`` highly variable genes (scanpy defaults)."""
    adata = ad.read_h5ad(Path(data) / "kang2018_ifnb_sub2000_counts.h5ad")
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    sc.pp.highly_variable_genes(adata, n_top_genes=n_top_genes)
    return adata[:, adata.var.highly_variable].copy()


def load_kang_counts(data: Path = SHARED_DATA, n_top_genes: int = 2000) -> ad.AnnData:
    """Raw counts of the Kang cells on the same ``n_top_genes`` highly variable genes as :func:`load_kang_log`."""
    counts = ad.read_h5ad(Path(data) / "kang2018_ifnb_sub2000_counts.h5ad")
    genes = load_kang_log(data, n_top_genes).var_names
    return counts[:, genes].copy()
