"""Held-out ELBO of the VAE per count likelihood on the Kang et al. 2018 PBMC counts (seed 004's Table 3).

Raw counts of 2000 cells; 10 % of the cells (seeded) are held out; 2000 highly variable genes are chosen on the
training cells only (scanpy's default "seurat" flavour on log1p CP10k data; the counts stay raw). A VAE with each
likelihood is fitted to the training cells' counts (its own early stopping uses 10 % of them) and the held-out
cells' mean per-cell ELBO (10 reparameterised samples) is reported, in nats per cell over the 2000 genes (and
each count likelihood's difference from NB, paired over the held-out cells, with its standard error); for
the count likelihoods it bounds log p(counts | library size). The Gaussian row (VAE on log1p CP10k data) is a
density of other numbers and is not comparable with the count rows. Fails if any number is NaN or infinite.
Writes experiments/results/kang_vae_likelihoods.json and prints the table.

    python experiments/kang_vae_likelihoods.py [--data ../shared/data] [--n-top-genes 2000] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import anndata as ad
import numpy as np
import scanpy as sc
import torch

from kang import SHARED_DATA
from pathfactor.models import VAE

RESULTS = Path(__file__).resolve().parent / "results"


def log_normalised(counts: ad.AnnData) -> ad.AnnData:
    """log1p of counts per 10,000 (a copy)."""
    out = counts.copy()
    sc.pp.normalize_total(out, target_sum=1e4)
    sc.pp.log1p(out)
    return out


def kang_counts(data: Path, n_top_genes: int, test_fraction: float, seed: int):
    """(training counts, held-out counts) restricted to HVGs chosen on the training cells."""
    adata = ad.read_h5ad(Path(data) / "kang2018_ifnb_sub2000_counts.h5ad")
    rng = np.random.default_rng(seed)
    test = np.zeros(adata.n_obs, dtype=bool)
    test[rng.permutation(adata.n_obs)[:int(round(test_fraction * adata.n_obs))]] = True
    train = adata[~test].copy()
    logged = log_normalised(train)
    sc.pp.highly_variable_genes(logged, n_top_genes=n_top_genes)
    genes = logged.var_names[logged.var["highly_variable"].to_numpy()]
    return train[:, genes].copy(), adata[test][:, genes].copy()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", type=Path, default=SHARED_DATA)
    p.add_argument("--n-top-genes", type=int, default=2000)
    p.add_argument("--n-latent", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "kang_vae_likelihoods.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    train, test = kang_counts(args.data, args.n_top_genes, 0.1, args.seed)
    zeros = float((train.X.toarray() == 0).mean())
    rows, per_cell = [], {}
    for likelihood in ["poisson", "nb", "zip", "zinb", "gaussian"]:
        tr, te = (train, test) if likelihood != "gaussian" else (log_normalised(train), log_normalised(test))
        start, cpu = time.perf_counter(), time.process_time()
        model = VAE(n_latent=args.n_latent, likelihood=likelihood, progress=False).fit(tr, seed=args.seed)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        held_out = model.elbo(te, n_samples=10, seed=args.seed)
        train_elbo = model.elbo(tr, n_samples=10, seed=args.seed)
        row = {"likelihood": likelihood, "heldout_elbo": round(float(held_out.mean()), 2),
               "heldout_elbo_se": round(float(held_out.std() / np.sqrt(len(held_out))), 2),
               "train_elbo": round(float(train_elbo.mean()), 2), "seconds": round(seconds, 1),
               "cpu_seconds": round(cpu, 1),
               "epochs": len(model.history_), "best_epoch": model.best_epoch_,
               "active_dims": int(model.active_.sum()), "comparable": likelihood != "gaussian"}
        if not np.isfinite(held_out).all() or not np.isfinite(train_elbo).all() or not all(
                math.isfinite(v) for v in model.history_) or not np.isfinite(model.factor_scores_.to_numpy()).all():
            raise FloatingPointError(f"{likelihood}: a NaN or infinite ELBO or latent mean")
        rows.append(row)
        per_cell[likelihood] = held_out.to_numpy()
        print(json.dumps(row), flush=True)
    for row in rows:  # paired over the held-out cells: the cell-to-cell spread cancels
        if row["comparable"] and row["likelihood"] != "nb":
            diff = per_cell[row["likelihood"]] - per_cell["nb"]
            row["minus_nb"] = round(float(diff.mean()), 2)
            row["minus_nb_se"] = round(float(diff.std() / np.sqrt(len(diff))), 2)
    best = max((r for r in rows if r["comparable"]), key=lambda r: r["heldout_elbo"])
    result = {"data": "kang2018_ifnb_sub2000_counts: raw UMI counts, %d HVGs chosen on the training cells"
                      % args.n_top_genes,
              "train_cells": train.n_obs, "heldout_cells": test.n_obs, "genes": train.n_vars,
              "zero_fraction": round(zeros, 4), "model": f"VAE(n_latent={args.n_latent}, hidden=(128,)), defaults",
              "elbo_units": "nats per cell (sum over genes), mean over cells, 10 samples; count rows bound "
                            "log p(x | library size); the gaussian row is a density of log1p CP10k values and "
                            "is not comparable",
              "threads": 1, "seed": args.seed,
              "timing": "seconds: wall clock of the fit; cpu_seconds: its process CPU time (the wall clock "
                        "includes waiting for shared cores)",
              "best_count_likelihood": best["likelihood"], "table": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n{'likelihood':<10} {'held-out ELBO':>14} {'minus NB (paired se)':>21} {'train ELBO':>11} "
          f"{'cpu s':>7} {'epochs':>7}")
    for r in rows:
        note = "" if r["comparable"] else "  (log1p data: not comparable)"
        paired = f"{r['minus_nb']:.2f} ({r['minus_nb_se']:.2f})" if "minus_nb" in r else ""
        print(f"{r['likelihood']:<10} {r['heldout_elbo']:>14.2f} {paired:>21} {r['train_elbo']:>11.2f} "
              f"{r['cpu_seconds']:>7.1f} {r['epochs']:>7}{note}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
