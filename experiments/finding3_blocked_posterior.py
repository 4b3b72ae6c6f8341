"""Finding 3 of the poster (seed 000): estimates of the covariate effects B when the latent factors X correlate
with the covariates Z.

``y_n = W x_n + B^T z_n + eps`` cannot tell ``x_n`` from ``x_n - A z_n`` with B moved to ``B + W A``; only the
priors ``x ~ N(0, I)`` and ``B ~ N(0, I)`` pick the split. The two-step estimator (OLS of Y on Z, then PPCA)
gives all of ``W A`` to B. Coordinate ascent with q(W) q(B) apart (MuVI's mean-field) barely moves along that
ridge; the blocked q(w_g, b_g) is closed under the shear and takes the best step along it in closed form
(``pathfactor.models._spex_vi``), and adds the ridge's variance to B's posterior sd.

Set-up: 200 cells (half stimulated), 1000 genes, 2 factors, sigma2 = 0.5, b_g ~ N(0, 1) per gene, each factor
correlated ``rho`` with the group; ``rho`` in {0, 0.3, 0.6}, several data seeds. Per method: the mean absolute
error of B (its bias from the truth), and how often the 90 % credible interval (+-1.645 sd) covers the true b_g.
Reference: the exact posterior of B given the true W and sigma2 (X integrated out; Gaussian, closed form).

Writes experiments/results/finding3.png and finding3.json; prints the JSON summary.

    python experiments/finding3_blocked_posterior.py [--seeds 5] [--out experiments/results]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from pathfactor.data.simulate import ppca_interventions  # noqa: E402
from pathfactor.models.supervised import Supervised  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
N_CELLS, N_GENES, N_FACTORS, SIGMA2 = 200, 1000, 2, 0.5
RHOS = (0.0, 0.3, 0.6)
Z90 = 1.6448536269514722
METHODS = {"blocked": {}, "mean-field": {"posterior": "mean-field"}, "two-step OLS + PPCA": {"two_step": True}}


def simulate(rho: float, seed: int):
    b = np.random.default_rng(10_000 + seed).standard_normal(N_GENES)
    adata = ppca_interventions(n_cells=N_CELLS, n_genes=N_GENES, n_factors=N_FACTORS, sigma2=SIGMA2, shift=b,
                               seed=seed, factor_correlation=rho)
    return adata, b


def exact_posterior(adata, sigma2: float):
    """Mean and sd of B given the true W and sigma2, X integrated out: y_n ~ N(b z_n, C), C = W W^T + sigma2 I,
    b ~ N(0, I) => (Z^T Z I + C) E[b] = Y^T Z and Cov(b) = C (Z^T Z I + C)^-1 (one centred covariate)."""
    Y = adata.X.astype(np.float64)
    Y = Y - Y.mean(0)
    z = adata.obs["z"].to_numpy()
    z = z - z.mean()
    W = adata.varm["W_true"]
    C = W @ W.T + sigma2 * np.eye(W.shape[0])
    inv = np.linalg.inv(z @ z * np.eye(W.shape[0]) + C)
    return inv @ (Y.T @ z), np.sqrt(np.diag(C @ inv))


def score(mean, sd, truth) -> dict:
    return {"abs_error": float(np.mean(np.abs(mean - truth))),
            "coverage90": float(np.mean(np.abs(mean - truth) <= Z90 * sd))}


def run(seeds: int) -> list[dict]:
    rows = []
    for rho in RHOS:
        for seed in range(seeds):
            adata, b = simulate(rho, seed)
            rows.append({"rho": rho, "seed": seed, "method": "exact (true W)", **score(*exact_posterior(adata, SIGMA2), b)})
            for name, kwargs in METHODS.items():
                start = time.perf_counter()
                model = Supervised(n_factors=N_FACTORS, progress=False, dtype="float64", **kwargs)
                model.fit(adata, covariates="group", seed=seed)
                mean = model.covariate_effects_.iloc[:, 0].to_numpy()
                sd = model.covariate_effects_sd_.iloc[:, 0].to_numpy()
                rows.append({"rho": rho, "seed": seed, "method": name, **score(mean, sd, b),
                             "epochs": len(model.history_), "seconds": round(time.perf_counter() - start, 2)})
    return rows


def summarise(rows: list[dict]) -> dict:
    summary = {}
    for rho in RHOS:
        per = {}
        for method in ["exact (true W)", *METHODS]:
            sel = [r for r in rows if r["rho"] == rho and r["method"] == method]
            per[method] = {"abs_error": round(float(np.mean([r["abs_error"] for r in sel])), 4),
                           "coverage90": round(float(np.mean([r["coverage90"] for r in sel])), 4)}
        per["bias_ratio_mean_field_over_blocked"] = round(per["mean-field"]["abs_error"] / per["blocked"]["abs_error"], 2)
        summary[f"rho={rho:g}"] = per
    return summary


def figure(summary: dict, out: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    styles = {"exact (true W)": ("grey", ":"), "blocked": ("#2a9d3f", "-"), "mean-field": ("#d9531e", "--"),
              "two-step OLS + PPCA": ("#3b75af", "-.")}
    for method, (color, ls) in styles.items():
        for ax, metric in zip(axes, ("abs_error", "coverage90")):
            ax.plot(RHOS, [summary[f"rho={r:g}"][method][metric] for r in RHOS], color=color, ls=ls, marker="o",
                    label=method)
    axes[0].set_ylabel("mean |E[b_g] - b_g|")
    axes[0].set_title("(a) error of the covariate effects B", fontsize=9)
    axes[1].axhspan(0.85, 0.95, color="#2a9d3f", alpha=0.12, label="85-95 %")
    axes[1].axhline(0.9, color="grey", lw=0.8)
    axes[1].set_ylabel("coverage of the 90 % credible interval")
    axes[1].set_title("(b) do B's intervals cover the truth?", fontsize=9)
    for ax in axes:
        ax.set_xlabel("correlation of each factor with the group (rho)")
        ax.legend(fontsize=7)
    fig.suptitle(f"Finding 3: blocked vs mean-field posterior of B ({N_CELLS} cells, {N_GENES} genes, "
                 f"{N_FACTORS} factors, sigma2 = {SIGMA2})", fontsize=10)
    fig.savefig(out / "finding3.png", dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=ROOT / "experiments" / "results")
    p.add_argument("--seeds", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows = run(args.seeds)
    summary = summarise(rows)
    figure(summary, args.out)
    result = {"poster": "seed 000, Finding 3", "setup": {"n_cells": N_CELLS, "n_genes": N_GENES, "n_factors": N_FACTORS,
                                                         "sigma2": SIGMA2, "rhos": RHOS, "seeds": args.seeds},
              "summary": summary, "runs": rows, "seconds": round(time.perf_counter() - start, 1),
              "figure": "finding3.png"}
    (args.out / "finding3.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("summary", "seconds")}, indent=1))


if __name__ == "__main__":
    main()
