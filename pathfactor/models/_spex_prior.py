"""The weights' prior of Spex, shared by the Gaussian and the count inference: the normalised regularised horseshoe.

``w_gk ~ N(0, (1 / (tau_k^2 lam_gk^2) + 1 / c_gk^2)^-1)`` (Piironen & Vehtari 2017; seed 002 eqs. 3-5) with the
half-Cauchy ``tau``, ``lam`` and the inverse-gamma slab ``c^2`` of ``pathfactor.priors``. Its normaliser is bounded
below with one variational share ``pi_gk`` per weight (``priors.regularised_horseshoe_terms``), so that every
scale keeps a closed-form update. The covariate effects (and, for counts, the intercepts) have Gaussian priors
``b_prior``.
"""
from __future__ import annotations

import math

import torch

from ..priors import gaussian_prior_terms, regularised_horseshoe_terms, slab_share

_LOG_2PI = math.log(2 * math.pi)


def weight_precision(vi) -> torch.Tensor:
    """G x K prior precision of W: E[1 / (tau^2 lam^2)] + E[1 / c^2]."""
    return vi.tau.mean_inv[None, :] * vi.lam.mean_inv + vi.slab.mean_inv


def _log_horseshoe(vi) -> torch.Tensor:
    return vi.tau.scale2.mean_log[None, :] + vi.lam.scale2.mean_log


def update_scales(vi, Ew2: torch.Tensor) -> None:
    """Coordinate ascent for the shares pi, then q(lam), q(tau), q(c) given E[w^2] (G x K)."""
    vi.share = slab_share(_log_horseshoe(vi), vi.slab.q.mean_log)
    horseshoe = 1 - vi.share
    vi.lam.update(0.5 * Ew2 * vi.tau.mean_inv[None, :], count=horseshoe)
    vi.tau.update(0.5 * (Ew2 * vi.lam.mean_inv).sum(0), count=horseshoe.sum(0))
    vi.slab.update(Ew2, weight=vi.share)


def loading_terms(vi) -> torch.Tensor:
    """The ELBO's terms of the loadings and effects: E[log p(W | tau, lam, c)] (normalised, bounded) + E[log p(B)]
    + the entropy of the q(theta_g) + the scale priors' own terms. ``vi`` holds M, S_diag, logdet_S (its first K
    columns are W, the rest have ``b_prior``), tau, lam, slab, share."""
    K = vi.K
    Ew2 = vi.M * vi.M + vi.S_diag
    Ew2_W, Ew2_B = Ew2[:, :K], Ew2[:, K:]
    if not hasattr(vi, "share"):
        vi.share = slab_share(_log_horseshoe(vi), vi.slab.q.mean_log)
    w_prior = regularised_horseshoe_terms(Ew2_W, vi.tau.mean_inv[None, :] * vi.lam.mean_inv, _log_horseshoe(vi),
                                          vi.slab.mean_inv, vi.slab.q.mean_log, vi.share)
    b = vi.b_prior
    b_prior = gaussian_prior_terms(Ew2_B, b.mean_inv[None, :].expand_as(Ew2_B),
                                   b.scale2.mean_log[None, :].expand_as(Ew2_B))
    entropy = 0.5 * (Ew2.numel() * (1 + _LOG_2PI) + vi.logdet_S.sum())
    return w_prior + b_prior + entropy + vi.lam.elbo() + vi.tau.elbo() + vi.slab.elbo() + b.elbo()
