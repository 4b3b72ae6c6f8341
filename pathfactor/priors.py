"""Conjugate pieces of the shrinkage priors, shared by the models.

Every scale prior here is written with inverse-gamma auxiliaries, so that under a Gaussian likelihood each
update of mean-field variational inference is closed form (no sampling, no learning rate):

* half-Cauchy scale ``s ~ C+(0, s0)`` as ``s^2 | nu ~ IG(1/2, 1/nu)``, ``nu ~ IG(1/2, 1/s0^2)``
  (Makalic & Schmidt 2016); used for the horseshoe's local scales ``lam`` and global scale ``tau``
  (seed 002, eq. 3);
* the regularised horseshoe's slab (seed 002, eqs. 4-5) in Piironen & Vehtari's product form
  ``p(w | tau, lam, c) ∝ N(w; 0, tau^2 lam^2) N(w; 0, c^2)``: the weight's prior precision is the horseshoe's
  ``1 / (tau^2 lam^2)`` plus the slab's ``1 / c^2``, which is exactly ``1 / (tau^2 lam_tilde^2)`` with
  ``lam_tilde^2 = c^2 lam^2 / (c^2 + tau^2 lam^2)``. The slab ``c^2 ~ IG(alpha, alpha s^2)`` is learned per
  weight, centred on the width ``s`` the annotation gives.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["InverseGamma", "HalfCauchy", "FixedScale", "SharedVariance", "RandomSlab", "gaussian_prior_terms",
           "slab_share", "regularised_horseshoe_terms"]

_LOG_2PI = 1.8378770664093453
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
#: below this many entries the library's special functions are as fast
_SERIES_MIN_SIZE = 4096


def digamma_lgamma(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(digamma(x), lgamma(x)) for x > 0, together.

    For large float32 tensors with x <= 1e8 (the shapes of a fit's G x K scale posteriors) this is
    about 2x faster than ``torch.digamma`` plus ``torch.lgamma``. It shifts x to y = x + 4 through
    x (x+1) (x+2) (x+3) = u (u + 2), u = x (x + 3), then sums the asymptotic (Stirling) series at y >= 4.
    The series is truncated after its y^-10 (digamma) and y^-7 (lgamma) terms, which puts the error at float32
    rounding (about 1e-6 relative; ``tests/test_priors.py``). Other inputs use torch's functions."""
    if x.dtype != torch.float32 or x.numel() < _SERIES_MIN_SIZE or not bool(x.max() <= 1e8):
        return torch.digamma(x), torch.lgamma(x)
    u = (x + 3).mul_(x)
    product = (u + 2).mul_(u)                      # x (x+1) (x+2) (x+3)
    y = x + 4
    log_y = torch.log(y)
    inv = y.reciprocal()
    inv2 = inv * inv
    # digamma(y) = log y - 1/(2y) - 1/(12 y^2) + 1/(120 y^4) - 1/(252 y^6) + 1/(240 y^8) - 1/(132 y^10)
    digamma = inv2 * (-1 / 132)
    digamma.add_(1 / 240).mul_(inv2).sub_(1 / 252).mul_(inv2).add_(1 / 120).mul_(inv2).sub_(1 / 12).mul_(inv2)
    digamma.add_(log_y).add_(inv, alpha=-0.5)
    # digamma(x) = digamma(y) - sum_{i<4} 1 / (x + i), and that sum is P'/P = 2 (2x + 3)(u + 1) / P
    digamma.sub_(u.add_(1).mul_(x * 4 + 6).div_(product))
    # lgamma(y) = (y - 1/2) log y - y + log(2 pi)/2 + 1/(12 y) - 1/(360 y^3) + 1/(1260 y^5) - 1/(1680 y^7)
    lgamma = inv2 * (-1 / 1680)
    lgamma.add_(1 / 1260).mul_(inv2).sub_(1 / 360).mul_(inv2).add_(1 / 12).mul_(inv)
    lgamma.addcmul_(y.sub_(0.5), log_y).sub_(y).add_(_HALF_LOG_2PI - 0.5)
    return digamma, lgamma.sub_(product.log_())       # lgamma(x) = lgamma(y) - log P


def _sum_product(x, y, shape) -> torch.Tensor:
    """sum of x * y broadcast to ``shape``; a 0-d factor multiplies the other's sum (no temporary)."""
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    if y.dim() == 0 and x.shape == shape:
        return x.sum() * y
    if x.dim() == 0 and y.shape == shape:
        return y.sum() * x
    return torch.broadcast_to(x * y, shape).sum()


@dataclass
class InverseGamma:
    """A variational factor ``q(v) = IG(v; shape, rate)`` with the expectations CAVI needs."""

    shape: torch.Tensor
    rate: torch.Tensor

    def _of_shape(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(digamma(shape), lgamma(shape)), computed once per shape tensor (shapes change far less often than
        rates, and these special functions dominate the ELBO's cost for large G x K)."""
        cached = getattr(self, "_special", None)
        if cached is None or cached[0] is not self.shape:
            cached = (self.shape, *digamma_lgamma(self.shape))
            self._special = cached
        return cached[1], cached[2]

    @property
    def mean_inv(self) -> torch.Tensor:
        """E[1/v] = shape / rate, computed once per (shape, rate) pair (a sweep and its ELBO read it many times).
        Like every cache here it is keyed on the tensors' identity: updates assign new tensors, never write in
        place."""
        cached = getattr(self, "_inv", None)
        if cached is None or cached[0] is not self.shape or cached[1] is not self.rate:
            cached = (self.shape, self.rate, self.shape / self.rate)
            self._inv = cached
        return cached[2]

    def _log_rate(self) -> torch.Tensor:
        """log(rate), computed once per rate tensor (read by several terms of a sweep)."""
        cached = getattr(self, "_log", None)
        if cached is None or cached[0] is not self.rate:
            cached = (self.rate, torch.log(self.rate))
            self._log = cached
        return cached[1]

    @property
    def mean_log(self) -> torch.Tensor:
        """E[log v] = log rate - digamma(shape)."""
        return self._log_rate() - self._of_shape()[0]

    def entropy(self) -> torch.Tensor:
        a = self.shape
        digamma, lgamma = self._of_shape()
        return a + self._log_rate() + lgamma - (1 + a) * digamma

    def expected_log_prior(self, shape0, rate0, mean_log_rate0=None) -> torch.Tensor:
        """E_q[log IG(v; shape0, rate0)], with ``rate0`` itself random when ``mean_log_rate0`` is given
        (then ``rate0`` is E[rate0] and ``mean_log_rate0`` is E[log rate0])."""
        shape0 = torch.as_tensor(shape0, dtype=self.shape.dtype)
        rate0 = torch.as_tensor(rate0, dtype=self.shape.dtype)
        log_rate0 = torch.log(rate0) if mean_log_rate0 is None else mean_log_rate0
        return shape0 * log_rate0 - torch.lgamma(shape0) - (shape0 + 1) * self.mean_log - rate0 * self.mean_inv

    def elbo_sum(self, shape0, rate0, mean_log_rate0=None) -> torch.Tensor:
        """sum(E_q[log IG(v; shape0, rate0)] + H[q]), i.e. minus KL(q || prior) when ``rate0`` is fixed; arguments
        as :meth:`expected_log_prior`. The same number in fewer passes over the entries: with a, b = shape, rate,

            sum[shape0 E log rate0 - lgamma(shape0) - shape0 log b + (shape0 - a) digamma(a) - E[rate0] a / b + a
                + lgamma(a)]."""
        a, b = self.shape, self.rate
        digamma, lgamma = self._of_shape()
        shape0 = torch.as_tensor(shape0, dtype=a.dtype, device=a.device)
        rate0 = torch.as_tensor(rate0, dtype=a.dtype, device=a.device)
        log_rate0 = torch.log(rate0) if mean_log_rate0 is None else mean_log_rate0
        # numpy's, not torch.broadcast_shapes (whose first call imports sympy: half a second)
        shape = torch.Size(np.broadcast_shapes(tuple(b.shape), tuple(shape0.shape), tuple(rate0.shape),
                                               tuple(torch.as_tensor(log_rate0).shape)))
        one = torch.ones((), dtype=a.dtype, device=a.device)
        terms = [_sum_product(shape0, log_rate0, shape), -_sum_product(torch.lgamma(shape0), one, shape),
                 -_sum_product(shape0, self._log_rate(), shape), _sum_product(shape0 - a, digamma, shape),
                 -_sum_product(rate0, self.mean_inv, shape), _sum_product(a, one, shape),
                 _sum_product(lgamma, one, shape)]
        return sum(terms)


class HalfCauchy:
    """Variational posterior of squared half-Cauchy scales ``s^2`` (any tensor shape) with scale ``s0``.

    Each scale governs ``count`` weights; ``update(R)`` takes ``R = E[sum of w^2 / (other scales)^2] / 2``.
    The CAVI updates q(s^2) = IG(count/2 + 1/2, E[1/nu] + R) and q(nu) = IG(1, 1/s0^2 + E[1/s^2]) are iterated to
    their joint fixed point in closed form: T = E[1/s^2] solves ``R T^2 + (1 + R b - a) T - a b = 0`` with
    ``a = (count + 1)/2``, ``b = 1/s0^2``. (Alternating the two one step per sweep instead drifts: for a weight
    near zero E[1/s^2] only grows by about 1 per sweep.)
    """

    def __init__(self, shape: tuple[int, ...], s0=1.0, count: float = 1.0, dtype=torch.float32,
                 device=None):
        """``s0``: a number, or a tensor that broadcasts to ``shape`` (e.g. one scale per row)."""
        kw = dict(dtype=dtype, device=device)
        self.s0 = s0.to(**kw) if isinstance(s0, torch.Tensor) else float(s0)
        self.count = float(count)
        a = 0.5 * self.count + 0.5
        ones = torch.ones(shape, **kw)
        self.scale2 = InverseGamma(ones * a, ones * a * self.s0**2)
        self.aux = InverseGamma(ones.clone(), ones * (1.0 / self.s0**2 + 1.0))

    @property
    def mean_inv(self) -> torch.Tensor:
        return self.scale2.mean_inv

    def update(self, R: torch.Tensor, count=None) -> None:
        """``count``: the weights' effective number per scale (a tensor like ``R``; default: the constructor's)."""
        if count is not None:
            self.count = count
            rate = self.scale2.rate
            shape = torch.as_tensor(0.5 * count + 0.5, dtype=rate.dtype, device=rate.device)
            self.scale2.shape = shape if shape.shape == rate.shape else shape + torch.zeros_like(rate)
        a, b = 0.5 * self.count + 0.5, 1.0 / self.s0**2
        R = R.clamp_min(torch.finfo(R.dtype).tiny)
        h = 1.0 + R * b - a
        disc = torch.sqrt(h * h + 4.0 * R * a * b)
        # the positive root, in the form that does not cancel
        T = torch.where(h > 0, 2.0 * a * b / (h + disc), (disc - h) / (2.0 * R))
        self.aux.rate = b + T
        self.scale2.rate = self.aux.mean_inv + R

    def terms(self) -> torch.Tensor:
        """E[log p(s^2 | nu) + log p(nu)] + H[q(s^2)] + H[q(nu)] of each scale (the weights' term is elsewhere)."""
        s2, nu = self.scale2, self.aux
        lp = s2.expected_log_prior(0.5, nu.mean_inv, -nu.mean_log) + nu.expected_log_prior(0.5, 1.0 / self.s0**2)
        return lp + s2.entropy() + nu.entropy()

    def elbo(self) -> torch.Tensor:
        """:meth:`terms`, summed."""
        s2, nu = self.scale2, self.aux
        return s2.elbo_sum(0.5, nu.mean_inv, -nu.mean_log) + nu.elbo_sum(0.5, 1.0 / self.s0**2)


class FixedScale:
    """A scale held fixed at ``s`` (a point mass; a number or one per entry), with the same face as :class:`HalfCauchy`."""

    def __init__(self, shape: tuple[int, ...], s, dtype=torch.float32, device=None):
        s2 = (torch.as_tensor(s, dtype=dtype, device=device) ** 2).expand(shape).clone()
        self.scale2 = _PointMass(s2)

    @property
    def mean_inv(self) -> torch.Tensor:
        return 1.0 / self.scale2.value

    def update(self, R: torch.Tensor, count=None) -> None:
        pass

    def elbo(self) -> torch.Tensor:
        return torch.zeros((), dtype=self.scale2.value.dtype)


class SharedVariance:
    """One variance ``v ~ IG(a0, b0)`` per column, shared by the ``count`` weights of that column (automatic
    relevance determination): ``q(v) = IG(a0 + count/2, b0 + sum E[w^2] / 2)``. Same face as :class:`FixedScale`
    (``mean_inv``, ``scale2.mean_log``, ``update``, ``elbo``); ``update`` takes the column sums of ``E[w^2]``."""

    def __init__(self, shape: tuple[int, ...], count: float, a0: float, b0: float, start: float,
                 dtype=torch.float32, device=None):
        self.a0, self.b0 = float(a0), float(b0)
        a = torch.full(shape, self.a0 + 0.5 * float(count), dtype=dtype, device=device)
        self.scale2 = InverseGamma(a, a * float(start))  # E[1/v] = 1/start until the first update

    @property
    def mean_inv(self) -> torch.Tensor:
        return self.scale2.mean_inv

    def update(self, sum_w2: torch.Tensor) -> None:
        self.scale2.rate = self.b0 + 0.5 * sum_w2

    def elbo(self) -> torch.Tensor:
        return self.scale2.elbo_sum(self.a0, self.b0)


@dataclass
class _PointMass:
    value: torch.Tensor

    @property
    def mean_log(self) -> torch.Tensor:
        return torch.log(self.value)


class RandomSlab:
    """The slab ``c^2 ~ IG(alpha, alpha s^2)`` of each weight, ``s`` from the annotation (seed 002, eq. 5).

    ``alpha`` is the confidence in the widths: large ``alpha`` pins ``c`` to ``s``; ``alpha = 1/2`` makes the
    marginal slab a Cauchy of scale ``s``, heavy-tailed enough for the data to overrule a wrong annotation.
    """

    def __init__(self, s: torch.Tensor, alpha: float = 0.5):
        self.alpha = float(alpha)
        self.rate0 = self.alpha * s**2
        self.q = InverseGamma(torch.full_like(s, self.alpha), self.rate0.clone())
        self.q.shape = self.q.shape + 0.5

    @property
    def mean_inv(self) -> torch.Tensor:
        return self.q.mean_inv

    def update(self, E_w2: torch.Tensor, weight=None) -> None:
        """``weight``: each weight's share of its own slab term (1 in the product form; see :func:`slab_share`)."""
        if weight is not None:
            self.q.shape = self.alpha + 0.5 * weight
        self.q.rate = self.rate0 + 0.5 * E_w2

    def elbo(self) -> torch.Tensor:
        return self.q.elbo_sum(self.alpha, self.rate0)


def gaussian_prior_terms(E_w2: torch.Tensor, mean_inv_var: torch.Tensor, mean_log_var: torch.Tensor) -> torch.Tensor:
    """Sum of E[log N(w; 0, v)] = -1/2 (log 2 pi + E[log v] + E[w^2] E[1/v])."""
    return -0.5 * (_LOG_2PI + mean_log_var + E_w2 * mean_inv_var).sum()


def slab_share(mean_log_a: torch.Tensor, mean_log_c: torch.Tensor) -> torch.Tensor:
    """The optimal ``pi`` of the bound in :func:`regularised_horseshoe_terms`, pi = a / (a + c) at the geometric
    means exp E[log a], exp E[log c]: the share with which a weight counts for its slab (1 - pi: for its horseshoe
    scales)."""
    return torch.sigmoid(mean_log_a - mean_log_c)


def regularised_horseshoe_terms(E_w2, mean_inv_a, mean_log_a, mean_inv_c, mean_log_c, pi) -> torch.Tensor:
    """A lower bound on sum E[log p(w | a, c)] for the *normalised* regularised horseshoe (Piironen & Vehtari 2017)
    ``p(w | a, c) = N(w; 0, (1/a + 1/c)^-1)``, a = tau^2 lam^2 (horseshoe), c = c^2 (slab; seed 002 eqs. 3-5).

    log p = -1/2 log 2 pi + 1/2 log(a + c) - 1/2 log a - 1/2 log c - w^2 (1/a + 1/c) / 2, and by concavity of log,
    log(a + c) >= pi log(a / pi) + (1 - pi) log(c / (1 - pi)) for any pi in (0, 1), tight at pi = a / (a + c). So

        E[log p] >= -1/2 log 2 pi - (1 - pi)/2 E[log a] - pi/2 E[log c] + H(pi)/2 - E[w^2] (E[1/a] + E[1/c]) / 2.

    The bound keeps every scale's update conjugate: a weight counts (1 - pi) times for its horseshoe scales and pi
    times for its slab. A weight pinned by a narrow slab (c << a, pi -> 1) no longer drags the global scale down,
    which the unnormalised product N(w; 0, a) N(w; 0, c) did (its mass 1 / sqrt(2 pi (a + c)) rewards small a)."""
    tiny = torch.finfo(pi.dtype).tiny
    entropy = -(pi * torch.log(pi.clamp_min(tiny)) + (1 - pi) * torch.log((1 - pi).clamp_min(tiny)))
    return (-0.5 * _LOG_2PI - 0.5 * (1 - pi) * mean_log_a - 0.5 * pi * mean_log_c + 0.5 * entropy
            - 0.5 * E_w2 * (mean_inv_a + mean_inv_c)).sum()
