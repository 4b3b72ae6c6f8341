"""Spex on the design of Spectra's runtime benchmark (Kunes et al. 2023): cell types, global and cell-type-specific
gene programs with gene sets of 20 genes that overlap, 2,000 genes; 10k, 100k and 200k cells. One JSON line per
size, appended to ``benchmarks/results/spectra_benchmark.jsonl``, and the figure ``spectra_benchmark.png``.

Simulation (``simulate``): ``n_types`` cell types of equal size, each with its own mean expression (the base
factors, given to Spex as the covariate ``cell_type``); ``n_global`` programs active in every cell and
``n_specific`` programs per cell type active only in its cells; program k's genes are a set of 20 genes that
shares ``overlap`` genes with the next set; its loadings are Gamma(2, 0.5) on those genes; cell scores are
Gamma(1, 1) where the program is active (0 elsewhere); Gaussian noise of sd 1. Spex gets the gene sets with a
fraction ``--noise`` of each set's genes swapped for random others (as in spex-LVM's benchmark).

Accuracy against the truth: mask F1 of the annotated factors' loadings (``evaluate.mask_f1``) and the mean
|correlation| of each program's factor scores with its true scores (over all cells, and over the cells where the
program is active). Spectra's published times (its paper's
runtime benchmark, same design and sizes; GPU / CPU) are printed beside.

    python benchmarks/spectra_benchmark.py                       # 10k and 100k in memory, 200k streamed
    python benchmarks/spectra_benchmark.py --cells 10000 --out ''
    peer-venv/bin/python benchmarks/spectra_benchmark.py --method spectra --cells 10000   # Spectra itself, run here
    python benchmarks/spectra_benchmark.py --figure-only         # redraw the figure from the results file

Spectra itself (``--method spectra``, package ``scspectra``; its ``est_spectra`` with the defaults and the same
noisy gene sets, split into "global" and per-cell-type dictionaries as it expects): its loss is a Poisson
likelihood and its factors are non-negative, so it gets each gene minus the gene's minimum (non-negative, the same
information). Its factors are matched one to one to the true programs by the correlation of their cell scores
(Hungarian); mask F1 and score correlations are then computed as for Spex.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

import pathfactor as pf
from pathfactor.evaluate import mask_f1

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import column_correlation, limit_threads, peak_rss_mb, reset_peak_rss  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
#: Spectra's published runtimes (seconds) on this design, 2,000 genes: cells -> (GPU, CPU)
SPECTRA_PUBLISHED = {10_000: (49, 237), 100_000: (1147, 794), 200_000: (822, 1572)}


def simulate(n_cells: int, n_genes: int = 2000, n_types: int = 5, n_global: int = 10, n_specific: int = 4,
             set_size: int = 20, overlap: int = 5, noise: float = 0.2, seed: int = 0):
    """(AnnData with obs['cell_type'], gene sets given to the model, true mask G x P, true scores N x P)."""
    rng = np.random.default_rng(seed)
    P = n_global + n_types * n_specific
    step = set_size - overlap
    if step * (P - 1) + set_size > n_genes:
        raise ValueError("the gene sets do not fit in the genes; use fewer programs or more genes")
    genes = np.array([f"g{i}" for i in range(n_genes)])
    members = [np.arange(k * step, k * step + set_size) for k in range(P)]
    W = np.zeros((n_genes, P), dtype=np.float32)
    for k, m in enumerate(members):
        W[m, k] = rng.gamma(2.0, 0.5, size=set_size)
    cell_type = rng.integers(0, n_types, size=n_cells)
    active = np.ones((n_cells, P), dtype=bool)                          # global programs: every cell
    for t in range(n_types):
        cols = slice(n_global + t * n_specific, n_global + (t + 1) * n_specific)
        active[:, cols] = (cell_type == t)[:, None]
    X = (rng.gamma(1.0, 1.0, size=(n_cells, P)) * active).astype(np.float32)
    type_means = rng.normal(0.0, 1.0, size=(n_types, n_genes)).astype(np.float32)
    Y = np.empty((n_cells, n_genes), dtype=np.float32)
    for start in range(0, n_cells, 8192):                               # row blocks: no float64 copy
        rows = slice(start, min(start + 8192, n_cells))
        Y[rows] = (type_means[cell_type[rows]] + X[rows] @ W.T
                   + rng.standard_normal((rows.stop - rows.start, n_genes)).astype(np.float32))
    names = [f"global_{k}" for k in range(n_global)] + [f"type{t}_{j}" for t in range(n_types)
                                                        for j in range(n_specific)]
    sets = {}
    for name, m in zip(names, members):
        given = m.copy()
        n_swap = int(round(noise * set_size))
        swap = rng.choice(set_size, size=n_swap, replace=False)
        given[swap] = rng.choice(np.setdiff1d(np.arange(n_genes), m), size=n_swap, replace=False)
        sets[name] = list(genes[given])
    obs = pd.DataFrame({"cell_type": pd.Categorical([f"type{t}" for t in cell_type])},
                       index=[f"c{i}" for i in range(n_cells)])
    adata = ad.AnnData(Y, obs=obs, var=pd.DataFrame(index=genes))
    return adata, sets, W != 0, X, names, active


def run(n_cells: int, streamed: bool, batch_size: int, seed: int) -> dict:
    adata, sets, mask, X_true, names, active = simulate(n_cells, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        data = adata
        if streamed:
            path = Path(tmp) / "sim.h5ad"
            adata.write_h5ad(path)
            data = ad.read_h5ad(path, backed="r")
        reset_peak_rss()
        start = time.perf_counter()
        model = pf.models.Spex(progress=False, min_set_size=5, batch_size=batch_size if streamed else None)
        model.fit(data, annotations=sets, covariates="cell_type", seed=seed)
        seconds = time.perf_counter() - start
        peak = peak_rss_mb()
    W = model.loadings_[names].to_numpy()
    scores = model.factor_scores_[names].to_numpy()
    gpu, cpu = SPECTRA_PUBLISHED.get(n_cells, (None, None))
    return {"method": "pathfactor.Spex", "n_cells": n_cells, "n_genes": adata.n_vars, "programs": len(names),
            "factors": model.loadings_.shape[1], "streamed": streamed, "batch_size": batch_size if streamed else None,
            "seconds": round(seconds, 1), "epochs": len(model.history_), "converged": bool(model.converged_),
            "mask_f1": round(mask_f1(mask, W), 4),
            "mask_f1_annotation": round(mask_f1(mask, np.column_stack([model.annotation_[n] for n in names])), 4),
            "factor_correlation": round(float(column_correlation(X_true, scores).mean()), 4),
            # a cell-type-specific program's scores are 0 outside its type, where the covariate takes the type's
            # mean: correlation in the cells where each program is active
            "factor_correlation_active_cells": round(float(np.mean([column_correlation(
                X_true[active[:, k], k:k + 1], scores[active[:, k], k:k + 1])[0] for k in range(len(names))])), 4),
            "peak_rss_mb": round(peak, 1), "data_mb": round(adata.X.nbytes / 2**20, 1),
            "spectra_published_gpu_s": gpu, "spectra_published_cpu_s": cpu,
            "speedup_vs_spectra_cpu": None if cpu is None else round(cpu / seconds, 1)}


def run_spectra(n_cells: int, seed: int, epochs: int | None) -> dict:
    """Spectra (``scspectra``) on the same simulation, 10,000 epochs by default (its own default)."""
    import Spectra
    import torch
    from scipy.optimize import linear_sum_assignment

    adata, sets, mask, X_true, names, active = simulate(n_cells, seed=seed)
    adata.X = adata.X - adata.X.min(0)   # a Poisson loss over non-negative factors: shift each gene to >= 0
    types = sorted(adata.obs["cell_type"].cat.categories)
    dictionary = {"global": {n: sets[n] for n in names if n.startswith("global")}}
    dictionary.update({t: {n: sets[n] for n in names if n.startswith(f"{t}_")} for t in types})
    torch.manual_seed(seed)
    kwargs = {} if epochs is None else {"num_epochs": epochs}
    reset_peak_rss()
    start = time.perf_counter()
    Spectra.est_spectra(adata, dictionary, use_highly_variable=False, cell_type_key="cell_type", **kwargs)
    seconds = time.perf_counter() - start
    peak = peak_rss_mb()
    scores = np.asarray(adata.obsm["SPECTRA_cell_scores"], dtype=np.float64)
    loadings = np.asarray(adata.uns["SPECTRA_factors"], dtype=np.float64).T          # genes x factors
    corr = np.nan_to_num(np.abs(np.corrcoef(X_true.T, scores.T)[:X_true.shape[1], X_true.shape[1]:]))
    truth_idx, factor_idx = linear_sum_assignment(-corr)
    order = factor_idx[np.argsort(truth_idx)]
    matched = scores[:, order]
    gpu, cpu = SPECTRA_PUBLISHED.get(n_cells, (None, None))
    return {"method": "Spectra", "version": importlib.metadata.version("scspectra"), "n_cells": n_cells,
            "n_genes": adata.n_vars, "programs": len(names), "factors": scores.shape[1],
            "epochs": epochs or 10_000, "seconds": round(seconds, 1), "mask_f1": round(mask_f1(mask, loadings[:, order]), 4),
            "factor_correlation": round(float(column_correlation(X_true, matched).mean()), 4),
            "factor_correlation_active_cells": round(float(np.mean([column_correlation(
                X_true[active[:, k], k:k + 1], matched[active[:, k], k:k + 1])[0] for k in range(len(names))])), 4),
            "peak_rss_mb": round(peak, 1), "spectra_published_gpu_s": gpu, "spectra_published_cpu_s": cpu}


def figure(rows: list[dict], path: Path, spectra: dict | None = None) -> None:
    """Spex's measured seconds per size beside Spectra's published CPU and GPU times, and (``spectra``) the time of
    Spectra itself run here, with its epochs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [r["n_cells"] for r in rows]
    x = np.arange(len(cells))
    width = 0.2 if spectra else 0.27
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.bar(x - 1.5 * width if spectra else x - width, [r["seconds"] for r in rows], width,
           label="pathfactor Spex (2 CPU cores, measured)")
    ax.bar(x - 0.5 * width if spectra else x, [r["spectra_published_cpu_s"] or np.nan for r in rows], width,
           label="Spectra, CPU (published)")
    ax.bar(x + 0.5 * width if spectra else x + width, [r["spectra_published_gpu_s"] or np.nan for r in rows], width,
           label="Spectra, GPU (published)")
    if spectra:
        here = [spectra["seconds"] if r["n_cells"] == spectra["n_cells"] else np.nan for r in rows]
        ax.bar(x + 1.5 * width, here, width,
               label=f"Spectra run here (2 cores, {spectra['epochs']} of up to 10,000 epochs)")
    ax.set_xticks(x, [f"{c // 1000}k" + (" (streamed)" if r["streamed"] else "") for c, r in zip(cells, rows)])
    ax.set_yscale("log")
    ax.set_ylabel("seconds")
    ax.set_xlabel("cells (2,000 genes)")
    ax.set_title("Spectra's runtime benchmark design")
    ax.legend(fontsize=7, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def latest(path: Path) -> tuple[list[dict], dict | None]:
    """The last Spex line per size and the last Spectra line of a results file."""
    spex, spectra = {}, None
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if row["method"] == "Spectra":
            spectra = row
        else:
            spex[row["n_cells"]] = row
    return [spex[n] for n in sorted(spex)], spectra


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, nargs="+", default=[10_000, 100_000, 200_000])
    p.add_argument("--stream-above", type=int, default=150_000, help="stream sizes above this from a backed file")
    p.add_argument("--batch-size", type=int, default=25_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS / "spectra_benchmark.jsonl"))
    p.add_argument("--method", choices=["spex", "spectra"], default="spex")
    p.add_argument("--spectra-epochs", type=int, default=None, help="Spectra's num_epochs (default: its 10,000)")
    p.add_argument("--figure-only", action="store_true", help="redraw the figure from the --out file's last lines")
    args = p.parse_args()
    if args.figure_only:
        rows, spectra = latest(Path(args.out))
        figure(rows, Path(args.out).with_suffix(".png"), spectra)
        return
    limit_threads(args.threads)
    if args.method == "spectra":
        for n in args.cells:
            row = run_spectra(n, args.seed, args.spectra_epochs)
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
        return
    rows = []
    for n in args.cells:
        rows.append(run(n, n > args.stream_above, args.batch_size, args.seed))
        print(json.dumps(rows[-1]), flush=True)
        if args.out:
            with open(args.out, "a") as fh:
                fh.write(json.dumps(rows[-1]) + "\n")
    if args.out:
        figure(rows, Path(args.out).with_suffix(".png"), latest(Path(args.out))[1])


if __name__ == "__main__":
    main()
