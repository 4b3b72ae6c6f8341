"""Weighted NMF (seed 003) against NMF that takes hidden entries for zeros: RMSE on the hidden entries.
One JSON line per loss and seed.

    python benchmarks/nmf_missing_entries.py [--cells 150] [--genes 100] [--hidden 0.2] [--seeds 1 2 3]
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from pathfactor.models import NMF


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cells", type=int, default=150)
    p.add_argument("--genes", type=int, default=100)
    p.add_argument("--factors", type=int, default=4)
    p.add_argument("--noise", type=float, default=0.5)
    p.add_argument("--hidden", type=float, default=0.2)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    args = p.parse_args()
    for seed in args.seeds:
        rng = np.random.default_rng(seed)
        X, W = rng.gamma(1.0, 1.0, (args.cells, args.factors)), rng.gamma(0.7, 1.0, (args.genes, args.factors))
        Y = np.clip(X @ W.T + rng.normal(0, args.noise, (args.cells, args.genes)), 0, None)
        hidden = rng.random(Y.shape) < args.hidden
        observed = np.where(hidden, 0.0, Y)
        for loss in ("frobenius", "kl"):
            fit = lambda **kw: NMF(n_factors=args.factors, loss=loss, max_epochs=300, progress=False).fit(observed, **kw)
            rmse = lambda m: float(np.sqrt(((m.reconstruct() - Y)[hidden] ** 2).mean()))
            print(json.dumps({"loss": loss, "seed": seed, "hidden_fraction": args.hidden,
                              "rmse_hidden_weighted": round(rmse(fit(weights=~hidden)), 4),
                              "rmse_hidden_as_zeros": round(rmse(fit()), 4), "noise_sd": args.noise}))


if __name__ == "__main__":
    main()
