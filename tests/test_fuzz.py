"""Property tests (hypothesis) of every public model on small random inputs, and of the data and gene-set doors.

The contract under test (``docs/bad_input.md``): a fit either succeeds with all-finite ``loadings_``,
``factor_scores_`` and ``relevance_`` (and an all-finite ``transform`` of the same cells), or raises a
``ValueError`` whose message is one of the documented ones -- never another exception type, never a NaN result.

Inputs: 2..30 cells x 2..25 genes; float32 / float64 / int64 / bool values at densities 0..1 and scales 1e-3..1e3;
dense numpy, DataFrame, AnnData or every scipy sparse format (``*_matrix`` and ``*_array``); injected NaN / Inf;
duplicate and case-colliding gene names ('g1' vs 'G1') in the data and in the gene sets; factor counts up to and
beyond the data's shape; covariates of every kind.

Known bugs (each pinned by a strict xfail in ``test_bad_input.py``) would make these properties fail on a
recognisable class of inputs; ``known_bug`` recognises exactly those inputs and the examples are counted as
hypothesis ``event``s instead of failures (``pytest --hypothesis-show-statistics`` lists them). When a bug is fixed,
delete its clause here as well as the xfail mark there.

Examples run in a fixed (derandomised) order so CI is reproducible; ``PATHFACTOR_FUZZ_RANDOM=1`` explores new ones
and ``PATHFACTOR_FUZZ_SCALE=10`` runs ten times as many. 1,440 examples in ~20-45 s on 2 shared cores.
"""
from __future__ import annotations

import logging
import os
import re
import warnings
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pathfactor import GeneSets
from pathfactor.data.inputs import as_matrix
from pathfactor.models import GMVAE, NMF, PCA, PPCA, VAE, FactorAnalysis, Slalom, Spex, Supervised

RANDOM = os.environ.get("PATHFACTOR_FUZZ_RANDOM", "") not in ("", "0")
SCALE = float(os.environ.get("PATHFACTOR_FUZZ_SCALE", "1"))


def fuzz(n: int):
    """Settings of one property: ``n`` examples (times PATHFACTOR_FUZZ_SCALE), no deadline."""
    return settings(max_examples=max(1, int(n * SCALE)), deadline=None, derandomize=not RANDOM,
                    database=None if not RANDOM else settings.default.database,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(autouse=True)
def _quiet():
    """No 'did not converge' warnings from 3-epoch fits, no numpy/sklearn RuntimeWarnings in the log."""
    logging.disable(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    logging.disable(logging.NOTSET)


# ============================================================================ documented errors
#: fragments of every ValueError message docs/bad_input.md lists for data a fit can meet here
DOCUMENTED = (
    "NaN or infinite values",                                  # as_matrix
    "duplicate gene names in var_names",
    "expression data is empty",
    "needs more genes than factors",                           # PPCA / FactorAnalysis check_shape
    "needs at least n_factors + 2 cells",
    "needs at least as many cells and genes as factors",       # PCA
    "exceed(s) min(cells, genes)",                             # NMF
    "NMF needs non-negative data",
    "factors need fewer than the data's",                      # Spex / Supervised
    "covariate columns need fewer than the data's",            # Spex / Slalom
    "none of the",                                             # GeneSets.filter: no set of usable size
    "has a single level",                                      # covariate_design
    "have zero variance (every gene is constant",              # PCA / PPCA (and Supervised two_step) check_variance
    "nothing to fit",                                          # Spex / Slalom without sets or free factors
    "likelihood needs non-negative counts",                    # VAE / GMVAE count likelihoods (check_counts)
    "likelihood needs integer counts",
    "needs fewer latent dimensions than the data's",           # VAE / GMVAE n_latent >= genes
    "needs at least as many cells",                            # GMVAE n_clusters > cells
    "needs at least as many training cells",                   # GMVAE n_clusters > cells left after validation
)


def documented(err: ValueError) -> None:
    assert any(fragment in str(err) for fragment in DOCUMENTED), f"undocumented ValueError: {err}"


def finite(model, transformed=None) -> None:
    for attr in ("loadings_", "factor_scores_", "relevance_"):
        values = getattr(model, attr).to_numpy(dtype=float)
        assert np.isfinite(values).all(), f"{type(model).__name__}.{attr} is not finite:\n{values}"
    if transformed is not None:
        assert transformed.shape == model.factor_scores_.shape
        assert np.isfinite(transformed.to_numpy(dtype=float)).all(), f"transform() is not finite:\n{transformed}"


# ============================================================================ inputs
SPARSE = [f"{fmt}_{kind}" for fmt in ("csr", "csc", "coo", "lil", "dok", "bsr", "dia") for kind in ("matrix", "array")]
CONTAINERS = ["ndarray", "DataFrame", "AnnData", "AnnData-csr"] + SPARSE


@dataclass
class Data:
    obj: object               # what the model gets
    Y: np.ndarray             # the values, float64, cells x genes
    genes: list               # the var_names the model will see
    obs: pd.DataFrame         # per-cell columns (in obj.obs when obj is an AnnData)
    container: str
    poisoned: bool            # a NaN / Inf was injected
    duplicated: bool          # var_names have an exact duplicate

    @property
    def shape(self):
        return self.Y.shape

    @property
    def constant(self) -> bool:
        """Every gene has zero variance (after the float32 cast the models make)."""
        Y32 = self.Y.astype(np.float32)
        return bool(np.all(Y32 == Y32[:1]))


def gene_names(draw, g: int) -> tuple[list[str], bool]:
    """Plain names, case-colliding pairs ('g1', 'G1'), or an exact duplicate."""
    mode = draw(st.sampled_from(["plain", "plain", "case", "duplicate"]))
    names = [f"g{j}" for j in range(g)]
    if mode == "case":
        names = [f"g{j // 2}" if j % 2 == 0 else f"G{j // 2}" for j in range(g)]
    if mode == "duplicate":
        names[-1] = names[0]
    return names, mode == "duplicate"


@st.composite
def expression(draw, nonnegative: bool | None = None, poison: bool = True, max_cells: int = 30,
               max_genes: int = 25) -> Data:
    n, g = draw(st.sampled_from(range(2, max_cells + 1))), draw(st.sampled_from(range(2, max_genes + 1)))
    kind = draw(st.sampled_from(["float32", "float64", "int64", "bool"]))
    density = draw(st.sampled_from([0.5, 0.2, 0.9, 1.0, 0.05, 0.0]))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    signed = draw(st.booleans()) if nonnegative is None else not nonnegative
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    mask = rng.random((n, g)) < density
    if kind == "bool":
        Y = mask
    elif kind == "int64":
        Y = rng.poisson(3.0, (n, g)) * mask - (2 * mask if signed else 0)
    else:
        values = rng.normal(0, 1, (n, g)) if signed else rng.lognormal(0, 1, (n, g))
        Y = (values * scale * mask).astype(kind)
    bad = None  # one example in ten gets a NaN or an Inf
    if poison and draw(st.integers(0, 9)) == 0:
        bad = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    if bad is not None:
        Y = Y.astype(np.float64)
        Y[rng.integers(n), rng.integers(g)] = bad
    container = draw(st.sampled_from(CONTAINERS))
    names, duplicated = gene_names(draw, g)
    levels = draw(st.sampled_from([1, 2, 3]))  # 1: a single-level covariate
    obs = pd.DataFrame({"grp": [["a", "b", "c"][i % levels] for i in range(n)],
                        "x": rng.normal(size=n)}, index=[f"c{i}" for i in range(n)])
    if container in ("ndarray", *SPARSE):
        names, duplicated = [f"gene_{j}" for j in range(g)], False  # as_matrix generates these names
        obj = Y if container == "ndarray" else getattr(sp, container)(Y)
    elif container == "DataFrame":
        obj = pd.DataFrame(Y, columns=names, index=obs.index)
    else:
        X = sp.csr_matrix(Y) if container == "AnnData-csr" else Y
        obj = ad.AnnData(X, obs=obs, var=pd.DataFrame(index=pd.Index(names)))
    return Data(obj, np.asarray(Y, dtype=np.float64), names, obs, container, bad is not None, duplicated)


@st.composite
def gene_sets_for(draw, genes: list[str], max_sets: int = 3) -> dict[str, list[str]]:
    """Sets drawn from ``genes`` with random case flips, duplicates and a few absent symbols."""
    sets = {}
    for s in range(draw(st.integers(1, max_sets))):
        members = draw(st.lists(st.sampled_from(genes), min_size=1, max_size=max(1, len(genes))))
        members = [m.swapcase() if draw(st.booleans()) else m for m in members]
        members += draw(st.lists(st.sampled_from(["ABSENT", "Absent", "nope"]), max_size=2))
        sets[draw(st.sampled_from([f"S{s}", f"s{s}", f"Set {s}"]))] = members
    return sets


# ============================================================================ known bugs (see test_bad_input.py)
def known_bug(model: str, data: Data, **context) -> str | None:
    """The known bug this input hits, or None. Each clause names the xfail case that pins it."""
    if data.poisoned or data.duplicated:
        return None  # refused at the door, before any known bug
    return None


def run_fit(model_key: str, make, data: Data, transform_kw=None, **fit_kw):
    """Fit; on success check finiteness (and transform). Returns the model, None for a documented ValueError, or
    None after recording a known bug. Anything else fails the property."""
    context = fit_kw.pop("_context", {})
    try:
        model = make().fit(data.obj, **fit_kw)
        transformed = model.transform(data.obj, **(transform_kw or {})) if transform_kw is not False else None
        finite(model, transformed)
    except ValueError as err:
        documented(err)
        event(f"{model_key}: ValueError " + re.sub(r"\d+", "N", str(err))[:48])
        return None
    except Exception:
        reason = known_bug(model_key, data, **context)
        if reason is None:
            raise
        event(f"known bug: {reason}")
        return None
    else:
        event(f"{model_key}: fitted")
        return model


# ============================================================================ the data door
@fuzz(320)
@given(data=expression())
def test_as_matrix_accepts_or_refuses_with_the_documented_message(data):
    """as_matrix returns float32 (dense or CSR) values equal to the input, or names the problem."""
    try:
        m = as_matrix(data.obj)
    except ValueError as err:
        if data.duplicated:
            assert "duplicate gene names" in str(err)
        else:
            assert data.poisoned and "NaN or infinite" in str(err), err
        return
    assert not data.poisoned and not data.duplicated
    assert m.Y.dtype == np.float32 and (isinstance(m.Y, np.ndarray) or sp.isspmatrix_csr(m.Y))
    assert sp.issparse(m.Y) == (data.container in (*SPARSE, "AnnData-csr"))
    np.testing.assert_array_equal(m.dense(), data.Y.astype(np.float32))
    assert list(m.var_names) == data.genes and m.shape == data.shape
    if data.container in SPARSE:  # the caller's object is never modified
        assert np.array_equal(np.asarray(data.obj.toarray(), dtype=np.float64), data.Y)


# ============================================================================ gene sets
SYMBOLS = ["A", "a", "B", "b", "Ccnb1", "CCNB1", "ccnb1", "Cdk1", "CDK1", "x", "Mki67"]


def reference_mask(sets: dict, var: list[str], case_sensitive: bool) -> np.ndarray:
    key = (lambda s: s) if case_sensitive else (lambda s: s.upper())
    return np.array([[key(v) in {key(g) for g in genes} for genes in sets.values()] for v in var], dtype=bool)


@fuzz(220)
@given(var=st.lists(st.sampled_from(SYMBOLS + ["Actb", "Gapdh"]), min_size=1, max_size=12),
       sets=st.dictionaries(st.sampled_from(["S", "s", "T", "HALLMARK_X", "hallmark_x"]),
                            st.lists(st.sampled_from(SYMBOLS), max_size=8), min_size=1, max_size=4),
       case_sensitive=st.booleans(), min_size=st.integers(0, 4), extra=st.integers(0, 6))
def test_gene_set_matching_is_exact_or_case_insensitive(var, sets, case_sensitive, min_size, extra):
    """to_mask / filter agree with a brute-force matcher; 'A' and 'a' are one gene unless case_sensitive."""
    gs = GeneSets(sets)
    duplicated = len(set(var)) < len(var)
    try:
        mask = gs.to_mask(var, case_sensitive=case_sensitive)
    except ValueError as err:
        assert duplicated and "duplicates" in str(err), err
        return
    assert not duplicated
    expected = reference_mask(gs.to_dict(), var, case_sensitive)
    np.testing.assert_array_equal(mask.to_numpy(), expected)
    assert list(mask.index) == var and list(mask.columns) == gs.names
    max_size = min_size + extra
    sizes = expected.sum(0)
    try:
        kept = gs.filter(var, min_size=min_size, max_size=max_size, case_sensitive=case_sensitive)
    except ValueError as err:
        assert "none of the" in str(err)
        assert not ((sizes >= min_size) & (sizes <= max_size)).any()
        return
    assert kept.names == [n for n, k in zip(gs.names, sizes) if min_size <= k <= max_size]
    for name in kept.names:
        assert set(kept[name]) == {v for v, hit in zip(var, expected[:, gs.names.index(name)]) if hit}
    assert kept.match_report["n_sets_kept"] == len(kept)


# ============================================================================ the linear models
LINEAR = {
    "PCA": lambda K, dt: PCA(n_factors=K, dtype=dt),
    "PPCA-mle": lambda K, dt: PPCA(n_factors=K, method="mle", progress=False, dtype=dt),
    "PPCA-em": lambda K, dt: PPCA(n_factors=K, method="em", max_epochs=4, progress=False, dtype=dt),
    "PPCA-map": lambda K, dt: PPCA(n_factors=K, method="map", max_epochs=4, progress=False, dtype=dt),
    "PPCA-vi": lambda K, dt: PPCA(n_factors=K, method="vi", max_epochs=4, progress=False, dtype=dt),
    "FactorAnalysis": lambda K, dt: FactorAnalysis(n_factors=K, max_epochs=4, progress=False, dtype=dt),
}


@fuzz(260)
@given(data=expression(), model=st.sampled_from(sorted(LINEAR)), K=st.integers(1, 6),
       dtype=st.sampled_from(["float32", "float64"]))
def test_linear_models_fit_finite_or_refuse(data, model, K, dtype):
    key = model.split("-")[0]
    fitted = run_fit(key, lambda: LINEAR[model](K, dtype), data, transform_kw={})
    if fitted is not None and key in ("PCA", "PPCA"):
        assert not data.constant, f"{model} fitted data in which every gene is constant instead of refusing them"


# ============================================================================ NMF
@fuzz(170)
@given(data=expression(nonnegative=None), K=st.integers(1, 5), loss=st.sampled_from(["frobenius", "kl"]),
       init=st.sampled_from(["nndsvda", "random"]), dtype=st.sampled_from(["float32", "float64"]),
       with_sets=st.booleans(), weights=st.sampled_from([None, None, "dense", "sparse"]), st_data=st.data())
def test_nmf_fits_finite_or_refuses(data, K, loss, init, dtype, with_sets, weights, st_data):
    annotations = st_data.draw(gene_sets_for(data.genes)) if with_sets else None
    fit_kw = {"annotations": annotations}
    if weights is not None:
        rng = np.random.default_rng(K)
        W = (rng.random(data.shape) < 0.8).astype(float)
        W[0, 0] = 1.0  # at least one observed entry
        fit_kw["weights"] = sp.csr_matrix(W) if weights == "sparse" else W
    run_fit("NMF", lambda: NMF(n_factors=K, loss=loss, init=init, dtype=dtype, max_epochs=4, min_set_size=1,
                               progress=False), data, transform_kw=False if weights else {}, **fit_kw)


# ============================================================================ gene-set models and Supervised
@fuzz(150)
@given(data=expression(max_cells=20, max_genes=15), model=st.sampled_from(["Spex", "Slalom"]),
       n_dense=st.integers(0, 2), n_sparse=st.integers(0, 1), with_sets=st.booleans(),
       covariates=st.sampled_from([None, None, "grp", "x", "array"]), st_data=st.data())
def test_gene_set_models_fit_finite_or_refuse(data, model, n_dense, n_sparse, with_sets, covariates, st_data):
    annotations = st_data.draw(gene_sets_for(data.genes)) if with_sets else None
    cls = {"Spex": Spex, "Slalom": Slalom}[model]
    make = lambda: cls(n_dense=n_dense, n_sparse=n_sparse, min_set_size=1, max_epochs=3, progress=False)  # noqa: E731
    cov, transform_kw = None, {}
    if covariates == "array" or (covariates and not hasattr(data.obj, "obs")):
        cov = data.obs[["x"]].to_numpy()
        transform_kw = {"covariates": cov}
    elif covariates:
        cov = covariates
    run_fit(model, make, data, transform_kw=transform_kw, annotations=annotations, covariates=cov)


@fuzz(120)
@given(data=expression(max_cells=20, max_genes=15), K=st.integers(1, 3),
       posterior=st.sampled_from(["blocked", "mean-field"]), two_step=st.booleans(),
       covariates=st.sampled_from(["grp", "x", "both", "array"]))
def test_supervised_fits_finite_or_refuses(data, K, posterior, two_step, covariates):
    if covariates == "array" or not hasattr(data.obj, "obs"):
        cov = data.obs[["x"]].to_numpy() if covariates != "both" else data.obs[["x"]].assign(
            y=np.arange(data.shape[0], dtype=float))
        transform_kw = {"covariates": cov}
    else:
        cov, transform_kw = (["grp", "x"] if covariates == "both" else covariates), {}
    context = {}
    run_fit("Supervised-two-step" if two_step else "Supervised",
            lambda: Supervised(n_factors=K, posterior=posterior, two_step=two_step, max_epochs=3, progress=False),
            data, transform_kw=False if two_step else transform_kw, covariates=cov, _context=context)


# ============================================================================ VAE and GMVAE
NEURAL = {  # tiny networks, 2 epochs (GMVAE: 1 epoch of VAE pre-training first)
    "VAE": lambda lik, K, C, bn: VAE(n_latent=K, likelihood=lik, hidden=(8,), batch_norm=bn, kl_warmup=1,
                                     max_epochs=2, progress=False),
    "GMVAE": lambda lik, K, C, bn: GMVAE(n_clusters=C, n_latent=K, likelihood=lik, hidden=(8,), batch_norm=bn,
                                         kl_warmup=1, pretrain_epochs=1, max_epochs=2, progress=False),
}


def are_counts(Y: np.ndarray) -> bool:
    """Non-negative integers (after the float32 cast), as ``check_counts`` judges them."""
    Y32 = Y.astype(np.float32)
    return bool((Y32 >= 0).all() and (np.abs(Y32 - np.round(Y32)) <= 1e-4).all())


@fuzz(200)
@given(data=expression(max_cells=20, max_genes=15), model=st.sampled_from(sorted(NEURAL)),
       likelihood=st.sampled_from(["poisson", "nb", "zip", "zinb", "gaussian"]), K=st.integers(1, 4),
       C=st.integers(2, 4), batch_norm=st.booleans())
def test_neural_models_fit_finite_or_refuse(data, model, likelihood, K, C, batch_norm):
    """VAE / GMVAE under every likelihood: finite results, a finite per-cell ELBO (and cluster probabilities
    summing to 1), or a documented refusal; a count likelihood never fits data that are not counts."""
    fitted = run_fit(model, lambda: NEURAL[model](likelihood, K, C, batch_norm), data, transform_kw={})
    if fitted is None:
        return
    if likelihood != "gaussian":
        assert are_counts(data.Y), f"{model}(likelihood={likelihood!r}) fitted data that are not counts"
    elbo = fitted.elbo(data.obj)
    assert elbo.shape == (data.shape[0],) and np.isfinite(elbo.to_numpy()).all(), f"elbo() is not finite:\n{elbo}"
    if model == "GMVAE":
        probs = fitted.predict_proba(data.obj).to_numpy()
        assert probs.shape == (data.shape[0], C) and np.allclose(probs.sum(1), 1.0, atol=1e-5), probs
