"""GMVAE clusters against k-means on PCA, scored by the adjusted Rand index with the Seurat annotations of the
Kang et al. 2018 PBMCs (2000 cells, 13 annotated types).

* k-means: log1p CP10k data, 2000 HVGs (scanpy "seurat" flavour), scaled per gene (``sc.pp.scale``), 20 PCA
  components, ``KMeans(k, n_init=10)``.
* GMVAE: the raw counts of the same 2000 genes, NB likelihood, ``n_clusters = k``, defaults otherwise (VAE
  pre-training and the mixture placed by k-means on the latent means, best of ``n_init=3`` starts by the ELBO
  at the placement, ``q(y | x)`` fitted to the placed mixture; see :class:`pathfactor.models.GMVAE`).

``k`` is the number of annotated types (13). Both are run for seeds 0-4; the acceptance is the GMVAE's minimum
AND median ARI over the seeds >= k-means' minimum and median. Writes experiments/results/kang_gmvae.json and
prints it.

What was tried. Without the VAE pre-training and k-means placement (``GMVAE(pretrain_epochs=0)``, components
drawn from N(0, 1), KL warm-up) seed 0 collapsed into a single cluster (ARI 0.0; k-means on that model's latent
means still gave 0.47). With one start and ``q(y | x)`` left at its random initialisation (the previous
default), seeds 0-9 gave ARI 0.542, 0.525, 0.496, 0.537, 0.531 | 0.506, 0.472, 0.481, 0.464, 0.507 with 9-13
non-empty clusters (k-means: 0.500, 0.485, 0.492, 0.475, 0.531 | 0.523, 0.484, 0.521, 0.491, 0.485): below
k-means' minimum on seeds 6 and 8. Fitting ``q(y | x)`` to the placed mixture kept all 13 clusters (0.529,
0.535, 0.536, 0.484, 0.539 | 0.540, 0.478, 0.476, 0.491, 0.531); adding the best of 3 starts gave the defaults
measured here (seeds 5-9, same code: 0.524, 0.505, 0.516, 0.545, 0.529). Refining the k-means placement by EM
of the diagonal mixture on the latent posteriors raised the ELBO at the placement by < 0.1 nat and did not
change the ARI systematically.

    python experiments/kang_gmvae.py [--data ../shared/data] [--seeds 0 1 2 3 4]
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
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
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
                      "elbo": round(model.elbo_, 2), "init_elbos": [round(v, 2) for v in model.init_elbos_],
                      "best_init": model.best_init_, "non_empty_clusters": int((sizes > 0).sum())})
        print(json.dumps({"kmeans": kmeans[-1], "gmvae": gmvae[-1]}), flush=True)

    def summary(rows) -> dict:
        ari = [r["ari"] for r in rows]
        return {"ari_min": round(float(np.min(ari)), 4), "ari_median": round(float(np.median(ari)), 4),
                "ari_mean": round(float(np.mean(ari)), 4)}

    km, gm = summary(kmeans), summary(gmvae)
    result = {
        "data": f"kang2018_ifnb_sub2000_counts: {counts.n_obs} cells, {counts.n_vars} HVGs",
        "labels": "obs['seurat_annotations']", "k": k, "threads": 1, "seeds": args.seeds,
        "timing": "seconds: wall clock; cpu_seconds: process CPU time (the wall clock includes waiting for "
                  "shared cores)",
        "kmeans": {"method": "KMeans(k, n_init=10) on 20 PCs of scaled log1p CP10k HVGs", **km, "runs": kmeans},
        "gmvae": {"method": f"GMVAE(n_clusters={k}, likelihood='nb'), defaults (VAE pre-training, mixture placed "
                            f"by k-means on the latent means, best of n_init={model.n_init} starts by the ELBO at "
                            "the placement, q(y | x) fitted to the placed mixture), raw counts", **gm,
                  "runs": gmvae},
        "gmvae_min_and_median_at_least_kmeans": gm["ari_min"] >= km["ari_min"]
                                                and gm["ari_median"] >= km["ari_median"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k_: v for k_, v in result.items() if k_ not in ("kmeans", "gmvae")}
                     | {"kmeans": km, "gmvae": gm}))


if __name__ == "__main__":
    main()
