"""GMVAE clusters against k-means on PCA, scored by the adjusted Rand index with the Seurat annotations of the
Kang et al. 2018 PBMCs (2000 cells, 13 annotated types).

* k-means: log1p CP10k data, 2000 HVGs (scanpy "seurat" flavour), scaled per gene (``sc.pp.scale``), 20 PCA
  components, ``KMeans(k, n_init=10)``.
* GMVAE: the raw counts of the same 2000 genes, NB likelihood, ``n_clusters = k``, defaults otherwise (VAE
  pre-training, then the mixture placed by k-means on the latent means; see :class:`pathfactor.models.GMVAE`).

``k`` is the number of annotated types (13). Both are run for several seeds; the acceptance is the GMVAE's mean
ARI >= k-means' mean ARI. Writes experiments/results/kang_gmvae.json and prints it.

What was tried: the GMVAE defaults above met the acceptance at the first run (seeds 0, 1, 2). Without the VAE
pre-training and k-means placement (``GMVAE(pretrain_epochs=0)``, components drawn from N(0, 1), KL warm-up)
seed 0 collapsed into a single cluster (ARI 0.0; k-means on that model's latent means still gave 0.47).

    python experiments/kang_gmvae.py [--data ../shared/data] [--seeds 0 1 2]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import anndata as ad
import numpy as np
import scanpy as sc
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from kang import SHARED_DATA
from pathfactor.models import GMVAE

RESULTS = Path(__file__).resolve().parent / "results"


def prepare(data: Path, n_top_genes: int):
    """(raw counts of the HVGs, 20 PCA components of their scaled log1p CP10k values, annotations)."""
    counts = ad.read_h5ad(Path(data) / "kang2018_ifnb_sub2000_counts.h5ad")
    logged = counts.copy()
    sc.pp.normalize_total(logged, target_sum=1e4)
    sc.pp.log1p(logged)
    sc.pp.highly_variable_genes(logged, n_top_genes=n_top_genes)
    genes = logged.var_names[logged.var["highly_variable"].to_numpy()]
    logged = logged[:, genes].copy()
    sc.pp.scale(logged)
    sc.tl.pca(logged, n_comps=20, random_state=0)
    return counts[:, genes].copy(), logged.obsm["X_pca"], counts.obs["seurat_annotations"].astype(str).to_numpy()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", type=Path, default=SHARED_DATA)
    p.add_argument("--n-top-genes", type=int, default=2000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", type=Path, default=RESULTS / "kang_gmvae.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    counts, pcs, labels = prepare(args.data, args.n_top_genes)
    k = len(np.unique(labels))
    kmeans, gmvae = [], []
    for seed in args.seeds:
        start = time.perf_counter()
        km = KMeans(k, n_init=10, random_state=seed).fit_predict(pcs)
        kmeans.append({"seed": seed, "ari": round(adjusted_rand_score(labels, km), 4),
                       "seconds": round(time.perf_counter() - start, 1)})
        start, cpu = time.perf_counter(), time.process_time()
        model = GMVAE(n_clusters=k, likelihood="nb", progress=False).fit(counts, seed=seed)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        sizes = np.bincount(model.clusters_.to_numpy(), minlength=k)
        if not np.isfinite(model.factor_scores_.to_numpy()).all() or not np.isfinite(model.history_).all():
            raise FloatingPointError(f"GMVAE seed {seed}: NaN or infinite results")
        gmvae.append({"seed": seed, "ari": round(adjusted_rand_score(labels, model.clusters_), 4),
                      "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1), "epochs": len(model.history_),
                      "best_epoch": model.best_epoch_,
                      "elbo": round(model.elbo_, 2), "non_empty_clusters": int((sizes > 0).sum())})
        print(json.dumps({"kmeans": kmeans[-1], "gmvae": gmvae[-1]}), flush=True)
    mean = lambda rows: round(float(np.mean([r["ari"] for r in rows])), 4)  # noqa: E731
    result = {
        "data": f"kang2018_ifnb_sub2000_counts: {counts.n_obs} cells, {counts.n_vars} HVGs",
        "labels": "obs['seurat_annotations']", "k": k, "threads": 1,
        "timing": "seconds: wall clock; cpu_seconds: process CPU time (the wall clock includes waiting for "
                  "shared cores)",
        "kmeans": {"method": "KMeans(k, n_init=10) on 20 PCs of scaled log1p CP10k HVGs", "ari_mean": mean(kmeans),
                   "runs": kmeans},
        "gmvae": {"method": f"GMVAE(n_clusters={k}, likelihood='nb'), defaults (VAE pre-training, mixture placed "
                            "by k-means on the latent means), raw counts", "ari_mean": mean(gmvae), "runs": gmvae},
        "gmvae_at_least_kmeans": mean(gmvae) >= mean(kmeans),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k_: v for k_, v in result.items() if k_ not in ("kmeans", "gmvae")}
                     | {"kmeans_ari": mean(kmeans), "gmvae_ari": mean(gmvae)}))


if __name__ == "__main__":
    main()
