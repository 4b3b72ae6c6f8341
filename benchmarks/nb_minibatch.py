"""NB-Spex with minibatches of cells against the full-batch fit: final ELBO, mask F1, seconds, peak memory.

    python benchmarks/nb_minibatch.py                          # 20000 cells x 1000 genes, 10 programs; batches 2000
    python benchmarks/nb_minibatch.py --cells 3000 --genes 300 --programs 4 --batch-sizes 500 --max-epochs 10

Counts: ``pathfactor.data.simulate.droplet_counts``, the droplet design of ``experiments/nb_low_counts.py``, larger: mean counts 0.05-2 a cell at x = 0
(log-uniform), library sizes log-normal (sd 0.3), programs of 40 genes with loading 0.5 on the log mean, the rest
null genes, NB dispersion ``--r`` for all genes; Spex(likelihood="nb") gets the true sets and learns the
dispersions. With ``batch_size`` every pass of the fit goes through blocks of that many cells and no cells x genes
cache is kept; the updates stay the exact full-batch ones, so the ELBO path is the full-batch path (to rounding)
and the memory is the counts plus a block's temporaries. Each fit runs in a fresh process (``peak_rss_mb`` is that
process's ``ru_maxrss``, imports and the simulated counts included; ``rss_before_fit_mb`` what it held before the
fit). One JSON line per fit, then a summary line: the largest ELBO gap relative to |full-batch ELBO| and the largest
F1 difference.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Timer, current_rss_mb, emit, limit_threads, peak_rss_mb, thread_env  # noqa: E402

SET_SIZE, LOADING = 40, 0.5


def fit(args, batch_size: int | None) -> dict:
    limit_threads(args.threads)
    import pathfactor as pf
    from pathfactor.data.simulate import annotation_sets, droplet_counts

    adata = droplet_counts(n_cells=args.cells, n_genes=args.genes, n_programs=args.programs, set_size=SET_SIZE,
                           loading=LOADING, r=args.r, low=0.05, high=2.0, seed=args.seed)
    sets, W = annotation_sets(adata), adata.varm["W_true"]
    rss_before = current_rss_mb()
    with Timer() as t:
        model = pf.models.Spex(likelihood="nb", min_set_size=5, batch_size=batch_size, max_epochs=args.max_epochs,
                               tol=args.tol, progress=False).fit(adata, annotations=sets, seed=args.seed)
    L = model.loadings_[list(sets)].to_numpy()
    return {"batch_size": batch_size, "seconds": round(t.seconds, 2), "peak_rss_mb": round(peak_rss_mb(), 1),
            "rss_before_fit_mb": round(rss_before, 1), "epochs": len(model.history_),
            "converged": bool(model.converged_), "elbo": float(model.elbo_),
            "mask_f1": round(pf.evaluate.mask_f1(W > 0, L), 4),
            "median_in_set_loading": round(float(np.median(L[W > 0])), 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=20_000)
    p.add_argument("--genes", type=int, default=1000)
    p.add_argument("--programs", type=int, default=10)
    p.add_argument("--r", type=float, default=20.0)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[2000])
    p.add_argument("--max-epochs", type=int, default=300)
    p.add_argument("--tol", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one fit in this process: a batch size or 0
    args = p.parse_args()
    if args.programs * SET_SIZE > args.genes:
        raise SystemExit(f"--programs {args.programs} x {SET_SIZE} genes need --genes >= {args.programs * SET_SIZE}")
    if args.worker is not None:
        print(json.dumps(fit(args, int(args.worker) or None)), flush=True)
        return
    base = {"cells": args.cells, "genes": args.genes, "programs": args.programs, "r": args.r, "seed": args.seed,
            "threads": args.threads}
    records = []
    for size in [0, *args.batch_sizes]:
        cmd = [sys.executable, __file__, "--worker", str(size)] + sys.argv[1:]
        done = subprocess.run(cmd, env=thread_env(args.threads), capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"the fit with batch size {size or None} failed:\n{done.stderr[-3000:]}")
        records.append(emit({"method": "pathfactor.Spex(likelihood='nb')", **base,
                             **json.loads(done.stdout.strip().splitlines()[-1])}, out=args.out))
    full = records[0]
    emit({"summary": True, **base,
          "max_elbo_gap": max(abs(r["elbo"] - full["elbo"]) / abs(full["elbo"]) for r in records[1:]),
          "max_f1_gap": max(abs(r["mask_f1"] - full["mask_f1"]) for r in records[1:]),
          "peak_rss_mb": {str(r["batch_size"]): r["peak_rss_mb"] for r in records}}, out=args.out)


if __name__ == "__main__":
    main()
