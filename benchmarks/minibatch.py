"""Spex with minibatches (memoized VI) against the full-batch fit: final ELBO, mask F1, epochs, seconds.

    python benchmarks/minibatch.py                      # 2000 cells x 2000 genes x 50 factors, batches 250 and 1000
    python benchmarks/minibatch.py --cells 600 --genes 300 --factors 8 --batch-sizes 100 300

For each setting (without and with a covariate) the full-batch fit runs first, then one fit per batch size, all
from the same data, start and seed, to convergence (``tol``); ``seconds`` is wall-clock, ``cpu_seconds`` the
process's CPU time (steadier on a shared machine). One JSON line per fit, then a summary line with the
largest ELBO gap relative to |full-batch ELBO| and the largest F1 difference, checked against the acceptance
(``--max-elbo-gap`` 0.1 %, ``--max-f1-gap`` 0.005).

The covariate: a two-level ``group`` whose level depends on the first true factor (P(group = 1) = logistic(x_n1)),
shifting every gene by ``b_g ~ N(0, 1)`` in group 1: factors and covariate correlate, so the shear matters.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

import pathfactor as pf
from pathfactor.data.simulate import annotation_sets, noisy_annotations
from pathfactor.evaluate import mask_f1

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Timer, emit, limit_threads  # noqa: E402


def with_covariate(sim, seed: int):
    """The simulation plus a group covariate correlated with the first true factor (see the module docstring)."""
    rng = np.random.default_rng(1000 + seed)
    x = sim.obsm["X_true"][:, 0]
    group = rng.random(sim.n_obs) < 1.0 / (1.0 + np.exp(-x))
    shift = rng.standard_normal(sim.n_vars)
    out = sim.copy()
    out.X = (sim.X + np.outer(group, shift)).astype(np.float32)
    out.obs["group"] = np.where(group, "treated", "control")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=2000)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--factors", type=int, default=50)
    p.add_argument("--noise", type=float, default=0.2)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[250, 1000])
    p.add_argument("--covariate", choices=["both", "none", "group"], default="both")
    p.add_argument("--max-epochs", type=int, default=1000)
    p.add_argument("--tol", type=float, default=1e-5)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-elbo-gap", type=float, default=1e-3)
    p.add_argument("--max-f1-gap", type=float, default=0.005)
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = p.parse_args()
    limit_threads(args.threads)

    sim = noisy_annotations(n_cells=args.cells, n_genes=args.genes, n_factors=args.factors, noise=args.noise,
                            seed=args.seed)
    sets, truth = annotation_sets(sim), sim.varm["mask_true"]
    settings = {"none": [None], "group": ["group"], "both": [None, "group"]}[args.covariate]
    worst_gap, worst_f1, n_fits = 0.0, 0.0, 0
    for covariate in settings:
        data = sim if covariate is None else with_covariate(sim, args.seed)
        full = None
        for batch_size in [None, *args.batch_sizes]:
            model = pf.models.Spex(progress=False, min_set_size=1, max_set_size=10**9, batch_size=batch_size,
                                   max_epochs=args.max_epochs, tol=args.tol, dtype=args.dtype)
            cpu = time.process_time()
            with Timer() as t:
                model.fit(data, annotations=sets, covariates=covariate, seed=args.seed)
            cpu = time.process_time() - cpu
            f1 = mask_f1(truth, model.loadings_.to_numpy())
            elbo = float(model.elbo_)
            history = np.asarray(model.history_)
            record = {"method": "pathfactor.Spex", "n_cells": args.cells, "n_genes": args.genes,
                      "n_factors": args.factors, "noise": args.noise, "covariate": covariate,
                      "batch_size": batch_size, "dtype": args.dtype, "seed": args.seed, "threads": args.threads,
                      "seconds": round(t.seconds, 2), "cpu_seconds": round(cpu, 2), "epochs": len(history), "converged": bool(model.converged_),
                      "elbo": round(elbo, 2), "f1": round(f1, 4),
                      "elbo_drops": int((np.diff(history) < -1e-6 * np.abs(history[1:])).sum())}
            if full is None:
                full = (elbo, f1)
            else:
                gap = abs(elbo - full[0]) / abs(full[0])
                record.update(elbo_gap_vs_full=float(f"{gap:.3g}"), f1_diff_vs_full=round(f1 - full[1], 4))
                worst_gap, worst_f1 = max(worst_gap, gap), max(worst_f1, abs(f1 - full[1]))
                n_fits += 1
            emit(record, args.out)
    emit({"summary": "minibatch vs full batch", "fits": n_fits, "max_elbo_gap": float(f"{worst_gap:.3g}"),
          "max_f1_diff": round(worst_f1, 4), "elbo_gap_ok": worst_gap <= args.max_elbo_gap,
          "f1_ok": worst_f1 <= args.max_f1_gap}, args.out)


if __name__ == "__main__":
    main()
