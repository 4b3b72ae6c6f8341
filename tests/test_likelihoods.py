"""Count likelihoods (pathfactor.likelihoods): agreement with scipy.stats, normalisation, broadcasting of the
dispersion and the library offset, finiteness at extreme means and with 95 % zeros, and bad input."""
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy import stats

from pathfactor import likelihoods as L
from pathfactor.data.inputs import as_matrix

T = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float64)  # noqa: E731


@pytest.fixture(scope="module")
def params():
    rng = np.random.default_rng(0)
    N, G = 30, 8
    mu = rng.gamma(0.5, 20, (N, G)) + 1e-3
    x = rng.poisson(mu).astype(float)
    x[:5] = 0
    theta_gene = rng.gamma(1.0, 3.0, G) + 0.05
    theta_cell = rng.gamma(1.0, 3.0, (N, G)) + 0.05
    pi = rng.uniform(0.01, 0.95, (N, G))
    return x, mu, theta_gene, theta_cell, pi


def nb_scipy(x, mu, theta):
    return stats.nbinom.logpmf(x, theta, theta / (theta + mu))


def test_poisson_matches_scipy(params):
    x, mu, *_ = params
    np.testing.assert_allclose(L.poisson_log_prob(T(x), T(np.log(mu))).numpy(), stats.poisson.logpmf(x, mu),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("per", ["gene", "cell"])
def test_nb_matches_scipy_with_dispersion_per_gene_or_per_cell(params, per):
    x, mu, theta_gene, theta_cell, _ = params
    theta = theta_gene if per == "gene" else theta_cell
    got = L.nb_log_prob(T(x), T(np.log(mu)), T(np.log(theta))).numpy()
    np.testing.assert_allclose(got, nb_scipy(x, mu, np.broadcast_to(theta, x.shape)), rtol=1e-9, atol=1e-9)


def test_zero_inflated_match_the_mixture_by_hand(params):
    x, mu, theta, _, pi = params
    logits = T(np.log(pi / (1 - pi)))
    zero = (x == 0).astype(float)
    zip_ = np.log(pi * zero + (1 - pi) * stats.poisson.pmf(x, mu))
    zinb = np.log(pi * zero + (1 - pi) * np.exp(nb_scipy(x, mu, theta)))
    np.testing.assert_allclose(L.zip_log_prob(T(x), T(np.log(mu)), logits).numpy(), zip_, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(L.zinb_log_prob(T(x), T(np.log(mu)), T(np.log(theta)), logits).numpy(), zinb,
                               rtol=1e-9, atol=1e-9)


def test_gaussian_matches_scipy():
    rng = np.random.default_rng(1)
    x, m, log_var = rng.normal(size=(5, 4)), rng.normal(size=(5, 4)), rng.normal(size=4)
    np.testing.assert_allclose(L.gaussian_log_prob(T(x), T(m), T(log_var)).numpy(),
                               stats.norm.logpdf(x, m, np.exp(0.5 * log_var)), rtol=1e-12)


@pytest.mark.parametrize("name", L.COUNT_LIKELIHOODS)
def test_each_count_pmf_sums_to_one(name):
    x = T(np.arange(0, 3000))[:, None]
    log_mu, log_theta, logits = T([np.log(0.3), np.log(7.0), np.log(150.0)]), T([-1.0, 0.5, 2.0]), T([-1.0, 0.0, 2.0])
    extra = {"log_theta": log_theta, "zi_logits": logits}
    kw = {p: extra[p] for p in L.PARAMETERS[name]}
    total = L.log_prob(name, x, log_mu, **kw).exp().sum(0).numpy()
    np.testing.assert_allclose(total, 1.0, rtol=1e-8)


@pytest.mark.parametrize("name", L.COUNT_LIKELIHOODS)
def test_library_offset_is_added_to_the_log_mean(name, params):
    x, mu, theta, _, pi = params
    log_lib = T(np.log(np.random.default_rng(2).uniform(100, 5000, (x.shape[0], 1))))
    extra = {"log_theta": T(np.log(theta)), "zi_logits": T(np.log(pi / (1 - pi)))}
    kw = {p: extra[p] for p in L.PARAMETERS[name]}
    log_p = T(np.log(mu / mu.sum(1, keepdims=True)))
    a = L.log_prob(name, T(x), log_p, offset=log_lib, **kw)
    b = L.log_prob(name, T(x), log_p + log_lib, **kw)
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12)


def test_nb_tends_to_poisson_in_float32_at_large_theta():
    """lgamma(x + theta) - lgamma(theta) is taken in float64, so float32 keeps it at theta = e^12."""
    x = torch.tensor([[0.0, 1.0, 5.0, 40.0]])
    log_mu = torch.log(torch.tensor([[0.5, 2.0, 3.0, 35.0]]))
    nb = L.nb_log_prob(x, log_mu, torch.full((4,), 12.0))
    assert nb.dtype == torch.float32
    np.testing.assert_allclose(nb.numpy(), stats.poisson.logpmf(x.numpy(), log_mu.exp().numpy()), atol=5e-3)


@pytest.mark.parametrize("name", L.LIKELIHOODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finite_values_and_gradients_at_extreme_means_and_95_percent_zeros(name, dtype):
    rng = np.random.default_rng(3)
    N, G = 200, 50
    x = np.where(rng.random((N, G)) < 0.95, 0.0, rng.integers(1, 10**6, (N, G)).astype(float))
    assert (x == 0).mean() > 0.93
    log_mu = torch.as_tensor(rng.uniform(np.log(1e-8), np.log(1e6), (N, G)), dtype=dtype).requires_grad_(True)
    lo_t, hi_t = L.LOG_THETA_RANGE
    log_theta = torch.as_tensor(np.linspace(lo_t, hi_t, G), dtype=dtype).requires_grad_(True)
    logits = torch.as_tensor(np.linspace(-20, 20, G), dtype=dtype).requires_grad_(True)
    log_var = torch.as_tensor(np.linspace(*L.LOG_VAR_RANGE, G), dtype=dtype).requires_grad_(True)
    extra = {"log_theta": log_theta, "zi_logits": logits, "log_var": log_var}
    kw = {p: extra[p] for p in L.PARAMETERS[name]}
    offset = None if name == "gaussian" else torch.zeros(N, 1, dtype=dtype)
    out = L.log_prob(name, torch.as_tensor(x, dtype=dtype), log_mu, offset=offset, **kw)
    assert out.dtype == dtype and torch.isfinite(out).all()
    out.sum().backward()
    for t in [log_mu, *kw.values()]:
        assert torch.isfinite(t.grad).all()
    if name == "poisson":  # a mean of 1e6 at a zero count costs exactly 1e6 nats, no underflow to -inf
        i = np.unravel_index(np.argmax(np.where(x == 0, log_mu.detach().numpy(), -np.inf)), x.shape)
        assert out.detach()[i].item() == pytest.approx(-float(log_mu.detach()[i].exp()), rel=1e-5)


def test_dispatch_checks_names_and_parameters():
    x, loc = torch.zeros(2, 3), torch.zeros(2, 3)
    assert L.check_likelihood("NB") == "nb" and L.check_likelihood("normal") == "gaussian"
    with pytest.raises(ValueError, match="unknown likelihood 'bernoulli'; choose one of poisson, nb"):
        L.log_prob("bernoulli", x, loc)
    with pytest.raises(ValueError, match="the zinb likelihood needs log_theta, zi_logits"):
        L.log_prob("zinb", x, loc)
    with pytest.raises(ValueError, match="the poisson likelihood takes no log_theta"):
        L.log_prob("poisson", x, loc, log_theta=torch.zeros(3))
    with pytest.raises(ValueError, match="offset .* count likelihoods only"):
        L.log_prob("gaussian", x, loc, log_var=torch.zeros(3), offset=torch.zeros(2, 1))


@pytest.mark.parametrize("name", L.COUNT_LIKELIHOODS)
def test_count_likelihoods_refuse_negative_and_non_integer_data(name):
    with pytest.raises(ValueError, match="needs non-negative counts but the data have negative values"):
        L.check_data(as_matrix(np.array([[1.0, -1.0], [0.0, 2.0]])), name)
    with pytest.raises(ValueError, match="needs integer counts but the data have non-integer values"):
        L.check_data(as_matrix(sp.csr_matrix(np.array([[0.0, 0.5], [0.0, 2.0]]))), name)
    L.check_data(as_matrix(np.array([[1.0, 0.0], [3.0, 2.0]])), name)  # float-typed counts are fine
    L.check_data(as_matrix(np.array([[1.5, -1.0], [0.0, 2.0]])), "gaussian")  # the Gaussian takes anything finite
