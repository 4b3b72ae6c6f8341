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

from dataclasses import dataclass

import torch

__all__ = ["InverseGamma", "HalfCauchy", "FixedScale", "SharedVariance", "RandomSlab", "gaussian_prior_terms"]

_LOG_2PI = 1.8378770664093453


@dataclass
class InverseGamma:
    """A variational factor ``q(v) = IG(v; shape, rate)`` with the expectations CAVI needs."""

    shape: torch.Tensor
    rate: torch.Tensor

    @property
    def mean_inv(self) -> torch.Tensor:
        """E[1/v] = shape / rate."""
        return self.shape / self.rate

    @property
    def mean_log(self) -> torch.Tensor:
        """E[log v] = log rate - digamma(shape)."""
        return torch.log(self.rate) - torch.digamma(self.shape)

    def entropy(self) -> torch.Tensor:
        a, b = self.shape, self.rate
        return a + torch.log(b) + torch.lgamma(a) - (1 + a) * torch.digamma(a)

    def expected_log_prior(self, shape0, rate0, mean_log_rate0=None) -> torch.Tensor:
        """E_q[log IG(v; shape0, rate0)], with ``rate0`` itself random when ``mean_log_rate0`` is given
        (then ``rate0`` is E[rate0] and ``mean_log_rate0`` is E[log rate0])."""
        shape0 = torch.as_tensor(shape0, dtype=self.shape.dtype)
        rate0 = torch.as_tensor(rate0, dtype=self.shape.dtype)
        log_rate0 = torch.log(rate0) if mean_log_rate0 is None else mean_log_rate0
        return shape0 * log_rate0 - torch.lgamma(shape0) - (shape0 + 1) * self.mean_log - rate0 * self.mean_inv


class HalfCauchy:
    """Variational posterior of squared half-Cauchy scales ``s^2`` (any tensor shape) with scale ``s0``.

    Each scale governs ``count`` weights; ``update(R)`` takes ``R = E[sum of w^2 / (other scales)^2] / 2``.
    The CAVI updates q(s^2) = IG(count/2 + 1/2, E[1/nu] + R) and q(nu) = IG(1, 1/s0^2 + E[1/s^2]) are iterated to
    their joint fixed point in closed form: T = E[1/s^2] solves ``R T^2 + (1 + R b - a) T - a b = 0`` with
    ``a = (count + 1)/2``, ``b = 1/s0^2``. (Alternating the two one step per sweep instead drifts: for a weight
    near zero E[1/s^2] only grows by about 1 per sweep.)
    """

    def __init__(self, shape: tuple[int, ...], s0: float = 1.0, count: float = 1.0, dtype=torch.float32,
                 device=None):
        self.s0, self.count = float(s0), float(count)
        kw = dict(dtype=dtype, device=device)
        a = 0.5 * self.count + 0.5
        self.scale2 = InverseGamma(torch.full(shape, a, **kw), torch.full(shape, a * self.s0**2, **kw))
        self.aux = InverseGamma(torch.ones(shape, **kw), torch.full(shape, 1.0 / self.s0**2 + 1.0, **kw))

    @property
    def mean_inv(self) -> torch.Tensor:
        return self.scale2.mean_inv

    def update(self, R: torch.Tensor) -> None:
        a, b = 0.5 * self.count + 0.5, 1.0 / self.s0**2
        R = R.clamp_min(torch.finfo(R.dtype).tiny)
        h = 1.0 + R * b - a
        disc = torch.sqrt(h * h + 4.0 * R * a * b)
        # the positive root, in the form that does not cancel
        T = torch.where(h > 0, 2.0 * a * b / (h + disc), (disc - h) / (2.0 * R))
        self.aux.rate = b + T
        self.scale2.rate = self.aux.mean_inv + R

    def elbo(self) -> torch.Tensor:
        """E[log p(s^2 | nu) + log p(nu)] + H[q(s^2)] + H[q(nu)], summed (the weights' term is elsewhere)."""
        s2, nu = self.scale2, self.aux
        lp = s2.expected_log_prior(0.5, nu.mean_inv, -nu.mean_log) + nu.expected_log_prior(0.5, 1.0 / self.s0**2)
        return (lp + s2.entropy() + nu.entropy()).sum()


class FixedScale:
    """A scale held fixed at ``s`` (a point mass), with the same face as :class:`HalfCauchy`."""

    def __init__(self, shape: tuple[int, ...], s: float, dtype=torch.float32, device=None):
        s2 = torch.full(shape, float(s) ** 2, dtype=dtype, device=device)
        self.scale2 = _PointMass(s2)

    @property
    def mean_inv(self) -> torch.Tensor:
        return 1.0 / self.scale2.value

    def update(self, R: torch.Tensor) -> None:
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
        q = self.scale2
        return (q.expected_log_prior(self.a0, self.b0) + q.entropy()).sum()


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

    def update(self, E_w2: torch.Tensor) -> None:
        self.q.rate = self.rate0 + 0.5 * E_w2

    def elbo(self) -> torch.Tensor:
        return (self.q.expected_log_prior(self.alpha, self.rate0) + self.q.entropy()).sum()


def gaussian_prior_terms(E_w2: torch.Tensor, mean_inv_var: torch.Tensor, mean_log_var: torch.Tensor) -> torch.Tensor:
    """Sum of E[log N(w; 0, v)] = -1/2 (log 2 pi + E[log v] + E[w^2] E[1/v])."""
    return -0.5 * (_LOG_2PI + mean_log_var + E_w2 * mean_inv_var).sum()
