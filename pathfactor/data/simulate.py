"""Simulated single-cell data sets that carry their own ground truth.

Two generators, each seeded through ``np.random.default_rng(seed)`` and returning an
:class:`anndata.AnnData` that can be written straight to ``.h5ad``:

``ppca_interventions``
    Probabilistic PCA with a group shift (the "PPCA with interventions" poster)::

        W ~ N(0, 1)            (G x K)
        x_n ~ N(0, I_K)
        y_n = W x_n + z_n c + eps_n,   eps_n ~ N(0, sigma2 I_G)

    with ``z_n = 0`` for the first half of the cells ("control") and ``z_n = 1`` for the rest
    ("stimulated"); ``c`` is the length-G group shift.

``noisy_annotations``
    The synthetic benchmark of spex-LVM (section 3.1): sparse loadings ``N(0, 4)`` with
    ``|w| < 0.5`` set to zero and a further 85-95 % of each annotated factor's genes zeroed at
    random, ``Y = X W^T + N(0, sigma2)``, and an annotation (gene-set mask) corrupted by swapping
    a fraction ``noise`` of the true active genes for as many inactive genes. Optional redundant
    annotated factors (annotation only, no signal) and unannotated sparse / dense factors (signal
    only, no annotation).

Symbols follow the seeds: ``Y`` (cells x genes, ``.X``), ``X`` (cells x factors,
``obsm["X_true"]``), ``W`` (genes x factors, ``varm["W_true"]``), ``sigma2`` and ``c``
(``var["c_true"]``). ``uns["simulation"]`` records the parameters (only h5ad-serialisable values).
"""
from __future__ import annotations

import numbers

import anndata as ad
import numpy as np
import pandas as pd

__all__ = ["ppca_interventions", "noisy_annotations", "droplet_counts", "annotation_sets", "SIMULATORS"]

#: loadings with an absolute value below this are set to zero (spex-LVM, section 3.1)
MIN_ABS_LOADING = 0.5


# --------------------------------------------------------------------------- argument checks
def _int(name: str, value, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _positive(name: str, value) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    value = float(value)
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def _seed(seed) -> int:
    return _int("seed", seed, 0)


def _names(prefix: str, n: int) -> list[str]:
    return [f"{prefix}_{i}" for i in range(n)]


def _rank_within_columns(keys: np.ndarray) -> np.ndarray:
    """Rank (0 = smallest) of every entry of ``keys`` within its column."""
    order = np.argsort(keys, axis=0, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(keys.shape[0])[:, None], axis=0)
    return ranks


def _pick_per_column(rng: np.random.Generator, eligible: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Boolean mask choosing ``counts[k]`` entries uniformly at random among ``eligible[:, k]``.

    Vectorised over genes and factors: eligible entries get uniform keys in [0, 1), the others 2,
    so the ``counts[k]`` smallest keys of column k are a uniform random subset of its eligible rows.
    """
    keys = rng.random(eligible.shape)
    keys[~eligible] = 2.0
    return eligible & (_rank_within_columns(keys) < np.asarray(counts)[None, :])


# --------------------------------------------------------------------------- PPCA + intervention
def ppca_interventions(
    n_cells: int = 100,
    n_genes: int = 200,
    n_factors: int = 2,
    sigma2: float = 0.5,
    shift=2.0,
    seed: int = 0,
    factor_correlation: float = 0.0,
) -> ad.AnnData:
    """PPCA data with a control and a stimulated group (poster: PPCA with interventions).

    ``W ~ N(0, 1)`` (genes x factors), ``x_n ~ N(0, I)``, ``y_n = W x_n + z_n c + eps``,
    ``eps ~ N(0, sigma2 I)``. With ``factor_correlation = rho`` (in [0, 1)) every factor correlates with the
    group: ``x_n = rho * zs_n + sqrt(1 - rho^2) * e_n`` with ``zs`` the standardised group indicator, so each
    factor keeps unit variance and correlation ``rho`` with z.
    The first ``n_cells // 2`` cells are "control" (``z = 0``), the rest
    "stimulated" (``z = 1``; with an odd ``n_cells`` the stimulated group has one cell more).
    ``shift`` is a float (``c = shift * ones(G)``) or a length-``n_genes`` array (``c = shift``).

    Returns an AnnData with ``.X = Y`` (float32), ``obs["group"]`` (categorical control /
    stimulated), ``obs["z"]`` (0./1.), ``obsm["X_true"]``, ``varm["W_true"]``, ``var["c_true"]`` and
    ``uns["simulation"]``.
    """
    n_cells = _int("n_cells", n_cells, 2)
    n_genes = _int("n_genes", n_genes, 1)
    n_factors = _int("n_factors", n_factors, 1)
    sigma2 = _positive("sigma2", sigma2)
    seed = _seed(seed)
    if isinstance(factor_correlation, (bool, np.bool_)) or not isinstance(factor_correlation, numbers.Real) \
            or not 0.0 <= float(factor_correlation) < 1.0:
        raise ValueError(f"factor_correlation must be a number in [0, 1), got {factor_correlation!r}")
    rho = float(factor_correlation)
    if isinstance(shift, (bool, np.bool_)):
        raise ValueError(f"shift must be a number or an array of length n_genes={n_genes}, got {shift!r}")
    if isinstance(shift, numbers.Real):
        scalar_shift = float(shift)
        c = np.full(n_genes, scalar_shift)
    else:
        scalar_shift = None
        try:
            c = np.asarray(shift, dtype=float)
        except (TypeError, ValueError) as err:
            raise ValueError(f"shift must be a number or an array of length n_genes={n_genes}: {err}") from None
        if c.ndim != 1 or c.shape[0] != n_genes:
            raise ValueError(f"shift must be a number or a 1-D array of length n_genes={n_genes}, "
                             f"got shape {c.shape}")
    if not np.all(np.isfinite(c)):
        raise ValueError("shift must be finite")

    rng = np.random.default_rng(seed)
    W = rng.standard_normal((n_genes, n_factors))
    X = rng.standard_normal((n_cells, n_factors))
    n_control = n_cells // 2
    z = np.zeros(n_cells)
    z[n_control:] = 1.0
    if rho > 0.0:
        X = rho * ((z - z.mean()) / z.std())[:, None] + np.sqrt(1.0 - rho ** 2) * X
    eps = rng.standard_normal((n_cells, n_genes)) * np.sqrt(sigma2)
    Y = X @ W.T + z[:, None] * c[None, :] + eps

    obs = pd.DataFrame(
        {
            "group": pd.Categorical(np.where(z == 1.0, "stimulated", "control"),
                                    categories=["control", "stimulated"]),
            "z": z,
        },
        index=pd.Index(_names("cell", n_cells)),
    )
    var = pd.DataFrame({"c_true": c}, index=pd.Index(_names("gene", n_genes)))
    adata = ad.AnnData(X=Y.astype(np.float32), obs=obs, var=var)
    adata.obsm["X_true"] = X
    adata.varm["W_true"] = W
    adata.uns["simulation"] = {
        "kind": "ppca_interventions",
        "n_cells": n_cells,
        "n_genes": n_genes,
        "n_factors": n_factors,
        "sigma2": sigma2,
        "shift": scalar_shift if scalar_shift is not None else "per-gene (see var['c_true'])",
        "factor_correlation": rho,
        "n_control": n_control,
        "n_stimulated": n_cells - n_control,
        "seed": seed,
        "factor_names": _names("factor", n_factors),
    }
    return adata


# --------------------------------------------------------------------------- noisy annotations
def _check_sparsity(sparsity) -> tuple[float, float]:
    if isinstance(sparsity, numbers.Real) and not isinstance(sparsity, (bool, np.bool_)):
        lo = hi = float(sparsity)
    else:
        try:
            lo, hi = (float(v) for v in sparsity)
        except (TypeError, ValueError):
            raise ValueError(f"sparsity must be a pair (low, high) of fractions in [0, 1), got {sparsity!r}") from None
    if not (0.0 <= lo <= hi < 1.0):
        raise ValueError(f"sparsity must satisfy 0 <= low <= high < 1, got ({lo}, {hi})")
    return lo, hi


def noisy_annotations(
    n_cells: int = 1000,
    n_genes: int = 2000,
    n_factors: int = 50,
    noise: float = 0.2,
    sigma2: float = 1.0,
    n_redundant: int = 0,
    n_sparse: int = 0,
    n_dense: int = 0,
    sparsity=(0.85, 0.95),
    seed: int = 0,
) -> ad.AnnData:
    """spex-LVM's synthetic benchmark: sparse factors with a noisy gene-set annotation.

    Factors (columns of ``W_true`` / ``X_true``, in this order):

    * ``n_factors`` annotated factors ``term_i``: loadings ``N(0, 4)``, ``|w| < 0.5`` set to 0, then
      a fraction drawn uniformly in ``sparsity`` of the genes set to 0 at random. They generate data
      and are annotated (with noise).
    * ``n_redundant`` redundant factors ``redundant_i``: annotated with a random gene set drawn like
      an annotated factor's support (so of similar size), but their loadings and factor values are
      0, so they do not generate data. Annotation noise is not applied to them (their set is
      already random).
    * ``n_sparse`` unannotated sparse factors ``sparse_i`` (drawn like the annotated ones).
    * ``n_dense`` unannotated dense factors ``dense_i`` (only ``|w| < 0.5`` zeroed).

    ``X ~ N(0, I)``, ``Y = X W^T + N(0, sigma2)``; the true mask is ``W != 0``. Annotation noise
    ``noise = f``: per annotated factor ``round(f * n_active)`` true active genes are switched off
    (false negatives) and as many inactive genes switched on (false positives), chosen at random,
    so the annotated set keeps its size. (If a factor had fewer inactive than that many genes, which
    only happens with a low ``sparsity``, both counts are capped at the number of inactive genes;
    the counts used are in ``uns["simulation"]["n_false_negatives"]``.)

    Returns an AnnData with ``.X = Y`` (float32), ``varm["W_true"]``, ``varm["mask_true"]``,
    ``varm["annotation"]`` (genes x (n_factors + n_redundant), bool), ``obsm["X_true"]`` and
    ``uns["simulation"]`` (with ``factor_names`` and ``annotation_names``).
    """
    n_cells = _int("n_cells", n_cells, 2)
    n_genes = _int("n_genes", n_genes, 1)
    n_factors = _int("n_factors", n_factors, 1)
    n_redundant = _int("n_redundant", n_redundant, 0)
    n_sparse = _int("n_sparse", n_sparse, 0)
    n_dense = _int("n_dense", n_dense, 0)
    sigma2 = _positive("sigma2", sigma2)
    if isinstance(noise, (bool, np.bool_)) or not isinstance(noise, numbers.Real) \
            or not (0.0 <= float(noise) < 1.0):
        raise ValueError(f"noise must be a fraction in [0, 1), got {noise!r}")
    noise = float(noise)
    lo, hi = _check_sparsity(sparsity)
    seed = _seed(seed)

    G, N = n_genes, n_cells
    n_ann = n_factors + n_redundant           # columns with an annotation
    K = n_ann + n_sparse + n_dense            # all columns
    annotated = slice(0, n_factors)
    redundant = slice(n_factors, n_ann)
    # columns whose support is additionally thinned: annotated, redundant (phantom), sparse
    thinned = np.zeros(K, dtype=bool)
    thinned[: n_ann + n_sparse] = True

    rng = np.random.default_rng(seed)
    # loadings N(0, 4), small ones zeroed
    W = rng.normal(0.0, 2.0, size=(G, K))
    W[np.abs(W) < MIN_ABS_LOADING] = 0.0
    # per-factor zero fraction ~ U(sparsity), that many genes zeroed at random
    zero_frac = rng.uniform(lo, hi, size=K)
    n_zero = np.where(thinned, np.rint(zero_frac * G).astype(int), 0)
    W[_pick_per_column(rng, np.ones((G, K), dtype=bool), n_zero)] = 0.0
    zero_frac = np.where(thinned, zero_frac, 0.0)

    # redundant factors: their (phantom) support is the annotation; they carry no signal
    redundant_sets = W[:, redundant] != 0
    W[:, redundant] = 0.0
    mask = W != 0

    X = rng.standard_normal((N, K))
    X[:, redundant] = 0.0
    Y = np.empty((N, G), dtype=np.float32)  # row blocks: the same draws as one (N, G) call, no float64 copy
    for start in range(0, N, 2048):
        rows = slice(start, min(start + 2048, N))
        Y[rows] = X[rows] @ W.T + rng.standard_normal((rows.stop - rows.start, G)) * np.sqrt(sigma2)

    # annotation noise: swap round(f * n_active) active genes for as many inactive ones
    true_ann = mask[:, annotated]
    n_active = true_ann.sum(axis=0)
    n_flip = np.minimum(np.rint(noise * n_active).astype(int), G - n_active)
    false_neg = _pick_per_column(rng, true_ann, n_flip)
    false_pos = _pick_per_column(rng, ~true_ann, n_flip)
    annotation = np.concatenate([(true_ann & ~false_neg) | false_pos, redundant_sets], axis=1)

    factor_names = (_names("term", n_factors) + _names("redundant", n_redundant)
                    + _names("sparse", n_sparse) + _names("dense", n_dense))
    adata = ad.AnnData(
        X=Y,
        obs=pd.DataFrame(index=pd.Index(_names("cell", N))),
        var=pd.DataFrame(index=pd.Index(_names("gene", G))),
    )
    adata.obsm["X_true"] = X
    adata.varm["W_true"] = W
    adata.varm["mask_true"] = mask
    adata.varm["annotation"] = annotation
    adata.uns["simulation"] = {
        "kind": "noisy_annotations",
        "n_cells": N,
        "n_genes": G,
        "n_factors": n_factors,
        "n_redundant": n_redundant,
        "n_sparse": n_sparse,
        "n_dense": n_dense,
        "noise": noise,
        "sigma2": sigma2,
        "sparsity": [lo, hi],
        "min_abs_loading": MIN_ABS_LOADING,
        "loading_sd": 2.0,
        "seed": seed,
        "factor_names": factor_names,
        "annotation_names": factor_names[:n_ann],
        "zero_fraction": [float(v) for v in zero_frac],
        "n_false_negatives": [int(v) for v in n_flip],
        "n_false_positives": [int(v) for v in n_flip],
    }
    return adata


def droplet_counts(n_cells: int = 500, n_genes: int = 240, n_programs: int = 3, set_size: int = 40,
                   loading: float = 0.5, r: float = 20.0, low: float = 0.02, high: float = 0.5,
                   library_sd: float = 0.3, seed=0) -> ad.AnnData:
    """Droplet-like negative-binomial counts with gene programs::

        x_n ~ N(0, I),   w_gk = ``loading`` on program k's ``set_size`` genes (0 elsewhere; the rest are null genes)
        mean_ng = s_n base_g exp(w_g^T x_n - |w_g|^2 / 2),   y_ng ~ NB(mean_ng, r)

    with ``base_g`` log-uniform in [``low``, ``high``] (mean counts a cell), cell sizes ``s_n`` log-normal (sd
    ``library_sd``, mean 1). Cells without a count are dropped. Truth: ``obsm["X_true"]``, ``varm["W_true"]``,
    ``layers["mean_true"]``; the programs' gene sets as ``varm["annotation"]`` (``annotation_sets`` reads them).
    """
    n_cells, n_genes = _int("n_cells", n_cells, 1), _int("n_genes", n_genes, 1)
    n_programs, set_size = _int("n_programs", n_programs, 1), _int("set_size", set_size, 1)
    if n_programs * set_size > n_genes:
        raise ValueError(f"{n_programs} programs of {set_size} genes need n_genes >= {n_programs * set_size}")
    r, low, high = _positive("r", r), _positive("low", low), _positive("high", high)
    rng = np.random.default_rng(_seed(seed))
    X = rng.standard_normal((n_cells, n_programs))
    W = np.zeros((n_genes, n_programs))
    for k in range(n_programs):
        W[set_size * k:set_size * (k + 1), k] = loading
    size = np.exp(library_sd * rng.standard_normal(n_cells))
    size /= size.mean()
    base = np.exp(rng.uniform(np.log(low), np.log(high), n_genes))
    mean = size[:, None] * base[None, :] * np.exp(X @ W.T - 0.5 * (W ** 2).sum(1))
    Y = rng.negative_binomial(r, r / (r + mean)).astype(np.float32)
    keep = Y.sum(1) > 0
    names = [f"program_{k + 1}" for k in range(n_programs)]
    adata = ad.AnnData(Y[keep])
    adata.obs_names = [f"c{i}" for i in range(int(keep.sum()))]
    adata.var_names = [f"g{i}" for i in range(n_genes)]
    adata.obsm["X_true"] = X[keep]
    adata.varm["W_true"] = W
    adata.varm["annotation"] = W > 0
    adata.layers["mean_true"] = mean[keep].astype(np.float32)
    adata.uns["simulation"] = {"kind": "droplet_counts", "r": r, "low": low, "high": high, "loading": loading,
                               "set_size": set_size, "library_sd": library_sd, "seed": _seed(seed),
                               "annotation_names": names}
    return adata


def annotation_sets(adata: ad.AnnData) -> dict[str, list[str]]:
    """The (noisy) annotation of a ``noisy_annotations`` data set as ``{term: [gene names]}``.

    Works on the returned object and on one read back from ``.h5ad``.
    """
    if "annotation" not in adata.varm:
        raise ValueError("adata has no varm['annotation']; it was not made by noisy_annotations")
    sim = adata.uns.get("simulation", {})
    mask = np.asarray(adata.varm["annotation"]).astype(bool)
    names = sim.get("annotation_names")
    names = _names("term", mask.shape[1]) if names is None else [str(n) for n in np.atleast_1d(names)]
    if len(names) != mask.shape[1]:
        raise ValueError(f"uns['simulation']['annotation_names'] has {len(names)} names but "
                         f"varm['annotation'] has {mask.shape[1]} columns")
    genes = np.asarray(adata.var_names, dtype=object)
    return {name: [str(g) for g in genes[mask[:, k]]] for k, name in enumerate(names)}


#: simulators by kind, for a CLI to dispatch on
SIMULATORS = {"ppca": ppca_interventions, "annotations": noisy_annotations}
