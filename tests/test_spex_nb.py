"""Spex with a negative-binomial likelihood on raw counts (``_spex_nb``): quadrature and derivatives, monotone
coordinate ascent, recovery on simulated counts, transform, save/load and bad input."""
import anndata as ad
import numpy as np
import pytest
import torch

import pathfactor as pf
from pathfactor.models._spex_nb import SpexNB, gauss_hermite, softplus_expectations, moment_dispersion


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
    return pf.models.Spex(n_sparse=0, likelihood="nb", min_set_size=5, progress=False,
                          dtype="float64").fit(adata, annotations=sets)


def test_quadrature_matches_monte_carlo_and_the_derivatives_match_finite_differences():
    """E[softplus], E[sigmoid], E[sigmoid sigmoid'] over a Gaussian against Monte Carlo; the dispersion's
    gradient and curvature (in log r) against finite differences of the expected log-likelihood."""
    rng = np.random.default_rng(0)
    centre = torch.tensor(rng.normal(-3, 3, 50), dtype=torch.float64)
    sd = torch.tensor(rng.uniform(0.05, 1.5, 50), dtype=torch.float64)
    f, s, ss = softplus_expectations(centre, sd, gauss_hermite(8), derivatives=True)  # the model's 8 nodes
    draws = centre[:, None] + sd[:, None] * torch.randn(50, 200_000, dtype=torch.float64,
                                                         generator=torch.Generator().manual_seed(0))
    for value, sample in ((f, torch.nn.functional.softplus(draws)), (s, torch.sigmoid(draws)),
                          (ss, torch.sigmoid(draws) * torch.sigmoid(-draws))):
        error = sample.std(1) / sample.shape[1] ** 0.5
        assert ((value - sample.mean(1)).abs() <= 5 * error + 1e-12).all()
    exact = softplus_expectations(centre, sd, gauss_hermite(200), derivatives=True)
    for value, reference in zip((f, s, ss), exact):
        torch.testing.assert_close(value, reference, rtol=2e-3, atol=1e-6)
    Y = torch.tensor(rng.negative_binomial(3, 0.5, (40, 6)), dtype=torch.float64) + torch.eye(40, 6, dtype=torch.float64)
    vi = SpexNB(Y, torch.zeros(40, 0, dtype=torch.float64), torch.ones(6, 1, dtype=torch.float64),
                torch.randn(40, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    vi.epoch()

    def total(log_r):
        return vi._expected_loglik(vi._mean, vi._var, log_r=log_r).sum(0)

    r = vi.r
    _, _, _, (f, s, ss) = vi._expected_loglik(vi._mean, vi._var, derivatives=True)
    count = Y + r
    dig, tri = torch.digamma(count) - torch.digamma(r), torch.polygamma(1, count) - torch.polygamma(1, r)
    grad = (r * dig - Y + count * s - r * f).sum(0)
    hess = (r * dig + r * r * tri - r * f + 2 * r * s - count * ss).sum(0)
    h = 1e-4
    fd_grad = (total(vi.log_r + h) - total(vi.log_r - h)) / (2 * h)
    fd_hess = (total(vi.log_r + h) - 2 * total(vi.log_r) + total(vi.log_r - h)) / h ** 2
    torch.testing.assert_close(grad, fd_grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hess, fd_hess, rtol=1e-3, atol=1e-3)


def test_loadings_survive_low_counts_where_a_quadratic_bound_collapsed_them():
    """Droplet-like counts (means 0.02-0.5 a cell): |psi| ~ 4-7, where the Polya-Gamma curvature was 10-100x the
    true one. The in-set loadings (truth 0.5) must come back near their size, and the dispersion near r = 2."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    from nb_low_counts import simulate

    adata, sets, X, W, _ = simulate(2.0, 1)
    model = pf.models.Spex(likelihood="nb", min_set_size=5, progress=False).fit(adata, annotations=sets)
    L = model.loadings_.to_numpy()[:, :3]  # the annotated factors (the default adds 2 sparse ones)
    assert np.median(L[W > 0]) > 0.33
    assert pf.evaluate.mask_f1(W > 0, L) > 0.85
    assert 1.4 < np.median(model.dispersion_[~(W > 0).any(1)]) < 3.0


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
        pf.models.Spex(likelihood="zip", progress=False).fit(adata, annotations=sets)
    with pytest.raises(ValueError, match="posterior='blocked'"):
        pf.models.Spex(likelihood="nb", posterior="mean-field", progress=False).fit(adata, annotations=sets)
    empty = adata.copy()
    empty.X[3] = 0
    with pytest.raises(ValueError, match="library size 0"):
        model.fit(empty, annotations=sets)


def test_minibatches_of_cells_give_the_full_batch_fit_without_its_caches(sim):
    """batch_size: every pass goes through blocks of cells (no N x G cache is kept); the updates are the exact
    full-batch ones, so the ELBO path, loadings and dispersions are the one-block fit's to rounding."""
    adata, sets, _, _ = sim
    fits = [pf.models.Spex(likelihood="nb", min_set_size=5, max_epochs=12, tol=0, batch_size=size, dtype="float64",
                           progress=False).fit(adata, annotations=sets, seed=1) for size in (None, 37)]
    full, blocked = fits
    np.testing.assert_allclose(blocked.history_, full.history_, rtol=1e-10)
    assert all(b >= a - 1e-9 * abs(a) for a, b in zip(blocked.history_, blocked.history_[1:]))
    np.testing.assert_allclose(blocked.loadings_.to_numpy(), full.loadings_.to_numpy(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(blocked.dispersion_.to_numpy(), full.dispersion_.to_numpy(), rtol=1e-6)


def test_blocked_state_keeps_no_cell_by_gene_cache():
    g = torch.Generator().manual_seed(0)
    Y = torch.poisson(torch.full((50, 8), 2.0, dtype=torch.float64), generator=g)
    args = (Y, torch.zeros(50, 0, dtype=torch.float64), torch.ones(8, 1, dtype=torch.float64),
            torch.randn(50, 1, generator=g, dtype=torch.float64))
    one, blocked = SpexNB(*args), SpexNB(*args, batch_size=16)
    assert one.cached and one._mean.shape == (50, 8)
    assert not blocked.cached and blocked._mean is None and blocked._lgamma_y1 is None
    assert len(blocked._blocks) == 4
    for _ in range(3):
        assert blocked.epoch() == pytest.approx(one.epoch(), rel=1e-12)
