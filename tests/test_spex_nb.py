"""Spex with a negative-binomial likelihood on raw counts (``_spex_nb``): the Polya-Gamma bound, monotone
coordinate ascent, recovery on simulated counts, transform, save/load and bad input."""
import anndata as ad
import numpy as np
import pytest
import scipy.stats as st
import torch

import pathfactor as pf
from pathfactor.models._spex_nb import SpexNB, _log_2cosh_half, _pg_weight, moment_dispersion


def _counts(n_cells=400, n_genes=150, n_factors=3, r=5.0, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n_cells, n_factors))
    mask = np.zeros((n_genes, n_factors), dtype=bool)
    for k in range(n_factors):  # disjoint blocks of 25 genes per program
        mask[25 * k:25 * (k + 1), k] = True
    W = mask * rng.uniform(0.5, 1.0, (n_genes, n_factors))
    beta = np.log(rng.uniform(0.05, 2.0, n_genes)) - np.log(1000)
    library = np.exp(0.3 * rng.standard_normal(n_cells)) * 3000
    mean = library[:, None] * np.exp(beta + X @ W.T)
    Y = rng.negative_binomial(r, r / (r + mean)).astype(np.float32)
    adata = ad.AnnData(Y)
    adata.var_names = [f"g{i}" for i in range(n_genes)]
    adata.obs_names = [f"c{i}" for i in range(n_cells)]
    sets = {f"program_{k}": list(adata.var_names[mask[:, k]]) for k in range(n_factors)}
    return adata, sets, X, W


@pytest.fixture(scope="module")
def sim():
    return _counts()


@pytest.fixture(scope="module")
def fitted(sim):
    adata, sets, _, _ = sim
    return pf.models.Spex(likelihood="nb", min_set_size=5, progress=False, dtype="float64").fit(adata, annotations=sets)


def test_polya_gamma_bound_is_below_the_nb_log_pmf_and_tight_at_c_equal_psi():
    rng = np.random.default_rng(0)
    y = torch.tensor(rng.negative_binomial(3, 0.2, 200), dtype=torch.float64)
    r = torch.tensor(rng.uniform(0.1, 20, 200), dtype=torch.float64)
    psi = torch.tensor(rng.normal(0, 3, 200), dtype=torch.float64)
    exact = st.nbinom.logpmf(y.numpy(), r.numpy(), 1 / (1 + np.exp(psi.numpy())))   # p = r / (r + mu)
    const = torch.lgamma(y + r) - torch.lgamma(r) - torch.lgamma(y + 1)

    def bound(c):
        omega = _pg_weight(y + r, c)
        return (const + (y - r) / 2 * psi - (y + r) * _log_2cosh_half(c) - omega / 2 * (psi ** 2 - c ** 2)).numpy()

    np.testing.assert_allclose(bound(psi.abs()), exact, rtol=1e-9, atol=1e-9)
    for c in (psi.abs() * 0.5 + 0.1, psi.abs() * 2 + 1e-3, torch.zeros_like(psi)):
        assert (bound(c) <= exact + 1e-9).all()


def test_extreme_means_and_mostly_zero_counts_stay_finite():
    rng = np.random.default_rng(1)
    Y = np.zeros((60, 40))
    Y[rng.random(Y.shape) < 0.05] = 1.0
    Y[:, 0] = rng.poisson(1e6, 60)                     # one gene with means near 1e6
    Y[:, 1] = 0
    Y[0, 1] = 3
    Yt = torch.tensor(Y)
    r = moment_dispersion(Yt, Yt.sum(1))
    assert torch.isfinite(r).all()
    vi = SpexNB(Yt, torch.zeros(60, 0, dtype=torch.float64), torch.ones(40, 2, dtype=torch.float64),
                torch.randn(60, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    elbos = [vi.epoch() for _ in range(5)]
    assert np.isfinite(elbos).all() and torch.isfinite(vi.M).all()


def test_elbo_rises_monotonically_with_covariates(sim):
    adata, sets, X, _ = sim
    Y = torch.tensor(adata.X, dtype=torch.float64)
    z = torch.tensor(np.arange(adata.n_obs) % 2, dtype=torch.float64)[:, None]
    s = torch.ones(adata.n_vars, 3, dtype=torch.float64)  # wide slabs everywhere
    vi = SpexNB(Y, z - z.mean(), s, torch.tensor(X) + 0.3, tau=None)
    elbos = [vi.epoch() for _ in range(15)]
    steps = np.diff(elbos)
    assert (steps >= -1e-8 * np.abs(elbos[1:])).all(), steps


def test_recovers_the_programs_from_counts(sim, fitted):
    adata, sets, X, W = sim
    corr = [abs(np.corrcoef(fitted.factor_scores_.iloc[:, k], X[:, k])[0, 1]) for k in range(3)]
    assert min(corr) > 0.85, corr
    assert pf.evaluate.mask_f1(W > 0, fitted.loadings_.to_numpy()) > 0.9
    # loadings are on the log-mean scale: the true ones are 0.5-1
    inside = fitted.loadings_.to_numpy()[W > 0]
    assert 0.3 < np.median(inside) < 1.2
    assert fitted.relevance_measure == "log-mean variance" and (fitted.relevance_ > 0.02).all()


def test_pure_noise_gives_no_relevant_program():
    counts = ad.AnnData(np.random.default_rng(0).poisson(2.0, (300, 200)).astype(np.float32))
    model = pf.models.Spex(n_sparse=2, likelihood="nb", progress=False).fit(counts)
    assert (model.relevance_ < 0.01).all(), model.relevance_


def test_transform_and_save_load(sim, fitted, tmp_path):
    adata, _, _, _ = sim
    scores = fitted.transform(adata).to_numpy()
    for k in range(3):
        assert np.corrcoef(scores[:, k], fitted.factor_scores_.iloc[:, k])[0, 1] > 0.99
    fitted.save(tmp_path / "nb")
    loaded = pf.load(tmp_path / "nb")
    assert loaded.likelihood == "nb"
    np.testing.assert_allclose(loaded.transform(adata[:5]).to_numpy(), scores[:5], rtol=1e-6, atol=1e-8)


def test_count_likelihood_refuses_what_cannot_be_counts(sim):
    adata, sets, _, _ = sim
    model = pf.models.Spex(likelihood="nb", min_set_size=5, progress=False)
    logged = adata.copy()
    logged.X = np.log1p(logged.X)
    with pytest.raises(ValueError, match="integer counts"):
        model.fit(logged, annotations=sets)
    negative = adata.copy()
    negative.X[0, 0] = -1
    with pytest.raises(ValueError, match="non-negative counts"):
        model.fit(negative, annotations=sets)
    with pytest.raises(ValueError, match="likelihood must be"):
        pf.models.Spex(likelihood="poisson", progress=False).fit(adata, annotations=sets)
    with pytest.raises(ValueError, match="batch_size=None"):
        pf.models.Spex(likelihood="nb", batch_size=100, progress=False).fit(adata, annotations=sets)
    empty = adata.copy()
    empty.X[3] = 0
    with pytest.raises(ValueError, match="library size 0"):
        model.fit(empty, annotations=sets)
