"""Where Spex starts its slabs (``Spex(start=...)``): epochs, seconds, ELBO and mask F1 of each start.

* Simulations: ``noisy_annotations`` (20 % of each set's members false, as many true members missing) at several
  numbers of cells, 2000 genes, 100 factors; mask F1 against the truth.
* Real data (``--real``; the sets of ``experiments/defaults.py``: mESC, Kang, pbmc68k, Spectra's sample): the
  ELBO per observation and the AUROC of the annotated factors for the known groups, as oriented.

One JSON line per fit, appended to ``--out``; the starts of one data set are fitted back to back on the same data.

    python benchmarks/start.py [--cells 1000 2000 5000 20000] [--starts informed wide prior] [--real]
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from common import RESULTS, emit, limit_threads  # noqa: E402

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def fit(adata, sets, start: str, seed: int, min_set_size: int = 15):
    import pathfactor as pf

    began = time.perf_counter()
    model = pf.models.Spex(start=start, min_set_size=min_set_size, progress=False)
    model.fit(adata, annotations=sets, seed=seed)
    n_obs = model.factor_scores_.shape[0] * model.loadings_.shape[0]
    return model, {"start": start, "epochs": len(model.history_), "converged": bool(model.converged_),
                   "seconds": round(time.perf_counter() - began, 2), "elbo_per_obs": round(model.elbo_ / n_obs, 6)}


def simulations(args) -> None:
    from pathfactor.data.simulate import annotation_sets, noisy_annotations
    from pathfactor.evaluate import mask_f1

    for n_cells in args.cells:
        for seed in args.seeds:
            sim = noisy_annotations(n_cells=n_cells, n_genes=args.genes, n_factors=args.factors, noise=args.noise,
                                    seed=seed)
            terms = [str(t) for t in np.atleast_1d(sim.uns["simulation"]["annotation_names"])]
            truth = np.asarray(sim.varm["mask_true"], dtype=bool)[:, :args.factors]
            for start in args.starts:
                model, row = fit(sim, annotation_sets(sim), start, seed, min_set_size=1)
                emit({"data": f"simulation {n_cells}x{args.genes}x{args.factors}", "noise": args.noise, "seed": seed,
                      **row, "f1": round(mask_f1(truth, model.loadings_[terms].to_numpy()), 4)}, args.out)


def real(args) -> None:
    sys.path.insert(0, str(EXPERIMENTS))
    from defaults import cases, score  # the real sets with known groups, and how their factors are scored

    for name, adata, sets, column, targets in cases(args.data):
        for start in args.starts:
            model, row = fit(adata, sets, start, args.seeds[0])
            emit({"data": name, **row, "auroc": score(model, adata, column, targets)}, args.out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, nargs="*", default=[1000, 2000, 5000, 20000])
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--factors", type=int, default=100)
    p.add_argument("--noise", type=float, default=0.2)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--starts", nargs="+", default=["informed", "wide", "prior"],
                   choices=["informed", "wide", "prior"])
    p.add_argument("--real", action="store_true", help="also the real sets of experiments/defaults.py")
    p.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS / "start.jsonl"), help="JSON lines file to append to ('' = none)")
    args = p.parse_args(argv)
    args.out = args.out or None
    limit_threads(args.threads)
    warnings.simplefilter("ignore")
    simulations(args)
    if args.real:
        if not args.data.is_dir():
            raise SystemExit(f"--real needs the shared data folder; {args.data} is not there")
        real(args)


if __name__ == "__main__":
    main()
