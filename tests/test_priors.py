"""The conjugate pieces against scipy and Monte Carlo."""
import numpy as np
import pytest
import torch
from scipy import stats

from pathfactor.priors import HalfCauchy, InverseGamma, RandomSlab


def test_inverse_gamma_moments_and_entropy_match_scipy():
    a, b = torch.tensor([0.7, 2.0, 30.0], dtype=torch.float64), torch.tensor([0.3, 1.5, 4.0], dtype=torch.float64)
    q = InverseGamma(a, b)
    for i in range(3):
        dist = stats.invgamma(a[i].item(), scale=b[i].item())
        assert q.entropy()[i].item() == pytest.approx(dist.entropy(), rel=1e-10)
        assert q.mean_inv[i].item() == pytest.approx(stats.gamma(a[i].item(), scale=1 / b[i].item()).mean(), rel=1e-12)
        # E[log v] by Monte Carlo
        draws = dist.rvs(size=400_000, random_state=i)
        assert q.mean_log[i].item() == pytest.approx(np.log(draws).mean(), abs=5e-3)


def test_expected_log_prior_equals_monte_carlo():
    q = InverseGamma(torch.tensor([3.0], dtype=torch.float64), torch.tensor([2.0], dtype=torch.float64))
    draws = stats.invgamma(3.0, scale=2.0).rvs(size=400_000, random_state=1)
    mc = stats.invgamma(0.5, scale=0.7).logpdf(draws).mean()
    assert q.expected_log_prior(0.5, 0.7).item() == pytest.approx(mc, abs=1e-2)


def _alternate(R, count, s0, sweeps):
    hc = HalfCauchy(R.shape, s0=s0, count=count, dtype=torch.float64)
    for _ in range(sweeps):  # the plain one-step-each CAVI updates
        hc.scale2.rate = hc.aux.mean_inv + R
        hc.aux.rate = 1 / s0**2 + hc.scale2.mean_inv
    return hc.mean_inv


@pytest.mark.parametrize("count,s0", [(1, 1.0), (200, 1.0), (50, 0.3)])
def test_half_cauchy_closed_form_is_the_fixed_point_of_alternating_updates(count, s0):
    R = torch.tensor([1e-3, 0.1, 1.0, 25.0], dtype=torch.float64)
    hc = HalfCauchy(R.shape, s0=s0, count=count, dtype=torch.float64)
    hc.update(R)
    slow = _alternate(R, count, s0, 20_000)
    assert torch.allclose(hc.mean_inv, slow, rtol=1e-4)
    # and q(nu) is consistent with q(s^2)
    assert torch.allclose(hc.aux.rate, 1 / s0**2 + hc.mean_inv)


def test_half_cauchy_update_never_decreases_its_elbo_block():
    """Given the weights' term -E[1/s^2] R - (count/2) E[log s^2], the closed form maximises the block."""
    R = torch.tensor([0.01, 0.5, 3.0], dtype=torch.float64)
    count = 1.0

    def block(hc):
        return (-(hc.mean_inv * R) - 0.5 * count * hc.scale2.mean_log).sum() + hc.elbo()

    hc = HalfCauchy(R.shape, count=count, dtype=torch.float64)
    before = block(hc)
    hc.update(R)
    best = block(hc)
    assert best >= before
    for scale in (0.9, 1.1):  # moving either factor off the optimum lowers the bound
        for part in (hc.scale2, hc.aux):
            saved = part.rate.clone()
            part.rate = saved * scale
            assert block(hc) <= best + 1e-9
            part.rate = saved


def test_random_slab_centres_on_its_width():
    s = torch.tensor([1.0, 0.01], dtype=torch.float64)
    slab = RandomSlab(s, alpha=50.0)
    slab.update(torch.zeros(2, dtype=torch.float64))
    assert torch.allclose(slab.mean_inv, (50.5 / 50.0) / s**2)
    slab.update(torch.tensor([4.0, 4.0], dtype=torch.float64))  # a big weight widens the slab
    assert (slab.mean_inv < (50.5 / 50.0) / s**2).all()


def test_normalised_horseshoe_bound_is_tight_at_its_share_and_below_elsewhere():
    """With fixed scales a = tau^2 lam^2 and c (point masses), the bound equals log N(w; 0, (1/a + 1/c)^-1) at
    pi = a / (a + c) and lies below it for any other pi."""
    from pathfactor.priors import regularised_horseshoe_terms, slab_share

    rng = np.random.default_rng(0)
    a = torch.tensor(rng.uniform(1e-4, 3, 40), dtype=torch.float64)
    c = torch.tensor(rng.uniform(1e-4, 3, 40), dtype=torch.float64)
    w2 = torch.tensor(rng.uniform(0, 2, 40), dtype=torch.float64)
    var = 1 / (1 / a + 1 / c)
    exact = -0.5 * (torch.log(2 * torch.pi * var) + w2 / var)
    pi = slab_share(torch.log(a), torch.log(c))
    torch.testing.assert_close(pi, a / (a + c))
    for i in range(40):
        tight = regularised_horseshoe_terms(w2[i], 1 / a[i], torch.log(a[i]), 1 / c[i], torch.log(c[i]), pi[i])
        torch.testing.assert_close(tight, exact[i])
        for other in (0.01, 0.3, 0.7, 0.99):
            loose = regularised_horseshoe_terms(w2[i], 1 / a[i], torch.log(a[i]), 1 / c[i], torch.log(c[i]),
                                                torch.tensor(other, dtype=torch.float64))
            assert loose <= exact[i] + 1e-12


@pytest.mark.parametrize("lo, hi", [(1e-3, 0.5), (0.5, 1.5), (0.5, 100.0), (100.0, 1e6), (1e6, 1e8)])
def test_series_special_functions_match_torch_at_float32_precision(lo, hi):
    from pathfactor.priors import digamma_lgamma
    x = torch.rand(50_000, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * (hi - lo) + lo
    digamma, lgamma = digamma_lgamma(x.float())
    assert digamma.dtype == torch.float32
    for fast, exact in ((digamma, torch.digamma(x)), (lgamma, torch.lgamma(x))):
        assert float(((fast.double() - exact).abs() / exact.abs().clamp_min(1.0)).max()) < 3e-6


def test_special_functions_outside_the_series_range_are_torch_s():
    from pathfactor.priors import digamma_lgamma
    for x in (torch.tensor([0.3, 2.0, 1e9]), torch.rand(10_000, dtype=torch.float64) + 0.5,
              torch.full((10_000,), 3e8)):
        digamma, lgamma = digamma_lgamma(x)
        assert torch.equal(digamma, torch.digamma(x)) and torch.equal(lgamma, torch.lgamma(x))


@pytest.mark.parametrize("prior", [(0.5, 0.7, None), ("tensor", "tensor", None), (1.5, "tensor", "tensor")])
def test_elbo_sum_is_expected_log_prior_plus_entropy(prior):
    gen = torch.Generator().manual_seed(3)
    a = torch.rand(40, 7, dtype=torch.float64, generator=gen) + 0.5
    b = torch.rand(40, 7, dtype=torch.float64, generator=gen) + 0.1
    q = InverseGamma(a, b)
    shape0, rate0, log_rate0 = (torch.rand(40, 7, dtype=torch.float64, generator=gen) + 0.2 if v == "tensor" else v
                                for v in prior)
    expected = (q.expected_log_prior(shape0, rate0, log_rate0) + q.entropy()).sum()
    assert q.elbo_sum(shape0, rate0, log_rate0).item() == pytest.approx(expected.item(), rel=1e-12)
    # a prior shared along one axis broadcasts as the per-entry terms do
    row = torch.rand(7, dtype=torch.float64, generator=gen) + 0.3
    assert q.elbo_sum(0.5, row).item() == pytest.approx((q.expected_log_prior(0.5, row) + q.entropy()).sum().item(),
                                                        rel=1e-12)
