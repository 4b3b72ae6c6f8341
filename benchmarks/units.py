"""The same data in other units (x 1000, x 1e-4) must give the same factors: relevance per factor of Supervised
(learned global scale, its default), Spex, NMF and PPCA on simulated data, as JSON lines.

    python benchmarks/units.py            # -> one JSON line per model, and benchmarks/results/units.json
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

import pathfactor as pf
from pathfactor.data.simulate import annotation_sets, noisy_annotations, ppca_interventions

try:
    from common import RESULTS
except ImportError:  # run as a module from the repository root
    from benchmarks.common import RESULTS

SCALES = (1.0, 1000.0, 1e-4)


def _fits(name: str, seed: int):
    """(data, fit(data) -> model) for one model."""
    if name == "Supervised":
        data = ppca_interventions(n_cells=200, n_genes=300, n_factors=3, seed=seed)
        return data, lambda a: pf.models.Supervised(n_factors=3, progress=False).fit(a, covariates="group")
    sim = noisy_annotations(n_cells=300, n_genes=400, n_factors=6, noise=0.2, seed=seed)
    if name == "Spex":
        sets = annotation_sets(sim)
        return sim, lambda a: pf.models.Spex(n_sparse=1, n_dense=1, min_set_size=5, progress=False).fit(
            a, annotations=sets)
    if name == "NMF":
        sim.X = np.abs(sim.X)
        return sim, lambda a: pf.models.NMF(n_factors=6, progress=False).fit(a)
    if name.startswith("PPCA"):  # "PPCA" (closed form), "PPCA-em", "PPCA-map", "PPCA-vi"
        method = name.partition("-")[2] or "mle"
        return sim, lambda a: pf.models.PPCA(n_factors=6, method=method, progress=False).fit(a)
    raise ValueError(name)


def measure(name: str, seed: int = 0) -> dict:
    data, fit = _fits(name, seed)
    relevance, seconds = {}, {}
    for scale in SCALES:
        scaled = data.copy()
        scaled.X = np.asarray(scaled.X, dtype=np.float64) * scale
        start = time.perf_counter()
        model = fit(scaled)
        seconds[scale] = round(time.perf_counter() - start, 3)
        relevance[scale] = model.relevance_.to_numpy()
    base = relevance[1.0]
    top = base >= 0.01 * base.max()  # factors that explain something; the rest are ~0 at every scale
    worst = {str(s): float(np.max(np.abs(relevance[s][top] / base[top] - 1))) for s in SCALES[1:]}
    return {"model": name, "max_relative_change": worst,
            "relevance": {str(s): np.round(r, 5).tolist() for s, r in relevance.items()}, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["Supervised", "Spex", "NMF", "PPCA", "PPCA-map", "PPCA-vi"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [measure(m, args.seed) for m in args.models]
    for row in rows:
        print(json.dumps(row))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "units.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
