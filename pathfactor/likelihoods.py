"""Observation models in one place: Poisson, negative binomial, ZIP, ZINB and Gaussian log-probabilities.

Every count density takes the *log* of its mean (log link), so a mean of 1e6 is the number 13.8 and nothing
overflows; a library-size ``offset`` (log library) is added to the log-mean. Zero-inflated mixtures are
combined in log space with ``logaddexp`` and ``softplus`` (seed 004, sec. 3.3.1: a product of ``e^{-lambda}``
that underflows to 0 is what sent scVAE's Poisson loss to -inf). All functions return the element-wise log
probability and broadcast their arguments (dispersion per gene ``(G,)`` or per cell and gene ``(N, G)``).

Parameterisations (seed 004, sec. 3.3):

* Poisson ``x ~ Poi(mu)``: ``x log mu - mu - log x!``.
* Negative binomial with mean ``mu`` and inverse dispersion ``theta`` (variance ``mu + mu^2 / theta``); scipy's
  ``nbinom(n=theta, p=theta / (theta + mu))``:
  ``lgamma(x + theta) - lgamma(theta) - log x! + theta log(theta / (theta + mu)) + x log(mu / (theta + mu))``.
* ZIP / ZINB: with probability ``pi = sigmoid(zi_logits)`` an extra zero, else the Poisson / NB draw:
  ``log p(0) = logaddexp(log pi, log(1 - pi) + log f(0))``, ``log p(x > 0) = log(1 - pi) + log f(x)`` with
  ``log pi = -softplus(-zi_logits)`` and ``log(1 - pi) = -softplus(zi_logits)``.
* Gaussian ``x ~ N(mean, exp(log_var))`` (for log-normalised data; a density, not comparable with the count
  masses).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .data.inputs import Matrix, check_counts

__all__ = ["LIKELIHOODS", "COUNT_LIKELIHOODS", "PARAMETERS", "check_likelihood", "check_data", "log_prob",
           "poisson_log_prob", "nb_log_prob", "zip_log_prob", "zinb_log_prob", "gaussian_log_prob",
           "LOG_THETA_RANGE", "LOG_VAR_RANGE"]

#: the per-gene parameters each likelihood needs beside its location (log-mean, or the mean for "gaussian")
PARAMETERS: dict[str, tuple[str, ...]] = {
    "poisson": (), "nb": ("log_theta",), "zip": ("zi_logits",), "zinb": ("log_theta", "zi_logits"),
    "gaussian": ("log_var",),
}
LIKELIHOODS = tuple(PARAMETERS)
COUNT_LIKELIHOODS = ("poisson", "nb", "zip", "zinb")
_NAMES = {"poisson": "Poisson", "nb": "negative binomial", "zip": "zero-inflated Poisson",
          "zinb": "zero-inflated negative binomial", "gaussian": "Gaussian"}
#: clamps models apply to learned log-dispersions and log-variances: theta in [4.5e-5, 1.6e5] (beyond that the
#: NB is a Poisson to float32 precision), variances in [4.5e-5, 2.2e4]
LOG_THETA_RANGE = (-10.0, 12.0)
LOG_VAR_RANGE = (-10.0, 10.0)
_LOG_2PI = math.log(2 * math.pi)


def check_likelihood(name) -> str:
    """The likelihood's name in lower case; ``ValueError`` listing the choices if it is unknown
    (``"normal"`` is accepted as another name for ``"gaussian"``)."""
    key = name.lower() if isinstance(name, str) else None
    key = "gaussian" if key == "normal" else key
    if key not in PARAMETERS:
        raise ValueError(f"unknown likelihood {name!r}; choose one of {', '.join(LIKELIHOODS)} "
                         "(counts: poisson, nb, zip, zinb; log-normalised data: gaussian)")
    return key


def check_data(matrix: Matrix, likelihood: str) -> None:
    """Raise a ``ValueError`` if ``matrix`` cannot be modelled by ``likelihood`` (counts must be non-negative
    integers; see :func:`pathfactor.data.inputs.check_counts`)."""
    likelihood = check_likelihood(likelihood)
    if likelihood in COUNT_LIKELIHOODS:
        check_counts(matrix, _NAMES[likelihood])


def _log_mean(log_mu, offset):
    return log_mu if offset is None else log_mu + offset


def poisson_log_prob(x, log_mu, offset=None) -> torch.Tensor:
    """``log Poi(x; mu)`` with ``log mu = log_mu + offset``."""
    log_mu = _log_mean(log_mu, offset)
    return x * log_mu - log_mu.exp() - torch.lgamma(x + 1)


def _nb_terms(x, log_mu, log_theta):
    """``(log NB(x; mu, theta), log NB(0; mu, theta))``. With ``d = log mu - log theta``,
    ``log(theta / (theta + mu)) = -softplus(d)`` and ``log(mu / (theta + mu)) = d - softplus(d)``, accurate also
    when ``mu << theta`` (where ``log theta - log(theta + mu)`` would cancel), and one softplus serves both.
    ``lgamma(x + theta) - lgamma(theta)`` is taken in float64: for a large ``theta`` both terms are large and
    float32 would lose their difference."""
    theta64 = log_theta.double().exp()
    gammas = (torch.lgamma(x.double() + theta64) - torch.lgamma(theta64) - torch.lgamma(x.double() + 1))
    d = log_mu - log_theta
    sp = F.softplus(d)
    log_zero = -log_theta.exp() * sp
    return gammas.to(log_mu.dtype) + log_zero + x * (d - sp), log_zero


def nb_log_prob(x, log_mu, log_theta, offset=None) -> torch.Tensor:
    """``log NB(x; mu, theta)`` (mean ``mu``, inverse dispersion ``theta = exp(log_theta)``)."""
    return _nb_terms(x, _log_mean(log_mu, offset), log_theta)[0]


def _zero_inflate(x, log_f, log_f0, zi_logits):
    """Mix a point mass at zero (probability ``sigmoid(zi_logits)``) with a count density ``f``."""
    log_keep = -F.softplus(zi_logits)  # log(1 - pi)
    zero = torch.logaddexp(-F.softplus(-zi_logits), log_keep + log_f0)
    return torch.where(x == 0, zero, log_keep + log_f)


def zip_log_prob(x, log_mu, zi_logits, offset=None) -> torch.Tensor:
    """Zero-inflated Poisson: ``pi 1[x = 0] + (1 - pi) Poi(x; mu)``, ``pi = sigmoid(zi_logits)``."""
    log_mu = _log_mean(log_mu, offset)
    return _zero_inflate(x, poisson_log_prob(x, log_mu), -log_mu.exp(), zi_logits)


def zinb_log_prob(x, log_mu, log_theta, zi_logits, offset=None) -> torch.Tensor:
    """Zero-inflated negative binomial: ``pi 1[x = 0] + (1 - pi) NB(x; mu, theta)``."""
    log_f, log_f0 = _nb_terms(x, _log_mean(log_mu, offset), log_theta)
    return _zero_inflate(x, log_f, log_f0, zi_logits)


def gaussian_log_prob(x, mean, log_var) -> torch.Tensor:
    """``log N(x; mean, exp(log_var))``."""
    return -0.5 * (_LOG_2PI + log_var + (x - mean) ** 2 * torch.exp(-log_var))


def log_prob(likelihood: str, x, loc, *, log_theta=None, zi_logits=None, log_var=None, offset=None) -> torch.Tensor:
    """Element-wise ``log p(x)`` under ``likelihood``. ``loc`` is the log-mean for the count likelihoods and the
    mean for ``"gaussian"``; the other parameters as :data:`PARAMETERS` lists (a missing one is an error);
    ``offset`` (log library size) is added to the log-mean of count likelihoods and refused for the Gaussian."""
    likelihood = check_likelihood(likelihood)
    given = {"log_theta": log_theta, "zi_logits": zi_logits, "log_var": log_var}
    missing = [p for p in PARAMETERS[likelihood] if given[p] is None]
    if missing:
        raise ValueError(f"the {likelihood} likelihood needs {', '.join(missing)}")
    extra = [p for p, v in given.items() if v is not None and p not in PARAMETERS[likelihood]]
    if extra:
        raise ValueError(f"the {likelihood} likelihood takes no {', '.join(extra)}")
    if likelihood == "gaussian":
        if offset is not None:
            raise ValueError("offset (log library size) applies to count likelihoods only")
        return gaussian_log_prob(x, loc, log_var)
    if likelihood == "poisson":
        return poisson_log_prob(x, loc, offset)
    if likelihood == "nb":
        return nb_log_prob(x, loc, log_theta, offset)
    if likelihood == "zip":
        return zip_log_prob(x, loc, zi_logits, offset)
    return zinb_log_prob(x, loc, log_theta, zi_logits, offset)
