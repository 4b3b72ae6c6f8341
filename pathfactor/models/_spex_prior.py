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

#: where a fit may start its slabs (``starting_slab_rate``)
STARTS = ("wide", "informed", "prior")


def _per_gene(vi, t: torch.Tensor) -> torch.Tensor:
    """A global-scale quantity (K, or V x K with one scale per view and factor: ``vi.view_of`` maps each gene to
    its view) broadcast to the genes (1 x K or G x K)."""
    view_of = getattr(vi, "view_of", None)
    return t[None, :] if view_of is None else t[view_of]


def _per_scale(vi, x: torch.Tensor) -> torch.Tensor:
    """G x K per-gene terms summed over the genes of each global scale (K, or V x K per view)."""
    view_of = getattr(vi, "view_of", None)
    if view_of is None:
        return x.sum(0)
    return x.new_zeros(vi.tau.mean_inv.shape).index_add_(0, view_of, x)


def weight_precision(vi) -> torch.Tensor:
    """G x K prior precision of W: E[1 / (tau^2 lam^2)] + E[1 / c^2]."""
    return _per_gene(vi, vi.tau.mean_inv) * vi.lam.mean_inv + vi.slab.mean_inv


def _log_horseshoe(vi) -> torch.Tensor:
    return _per_gene(vi, vi.tau.scale2.mean_log) + vi.lam.scale2.mean_log


def update_scales(vi, Ew2: torch.Tensor) -> None:
    """Coordinate ascent for the shares pi, then q(lam), q(tau), q(c) given E[w^2] (G x K)."""
    vi.share = slab_share(_log_horseshoe(vi), vi.slab.q.mean_log)
    horseshoe = 1 - vi.share
    vi.lam.update(0.5 * Ew2 * _per_gene(vi, vi.tau.mean_inv), count=horseshoe)
    vi.tau.update(0.5 * _per_scale(vi, Ew2 * vi.lam.mean_inv), count=_per_scale(vi, horseshoe))
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
    w_prior = regularised_horseshoe_terms(Ew2_W, _per_gene(vi, vi.tau.mean_inv) * vi.lam.mean_inv, _log_horseshoe(vi),
                                          vi.slab.mean_inv, vi.slab.q.mean_log, vi.share)
    b = vi.b_prior
    b_prior = gaussian_prior_terms(Ew2_B, b.mean_inv[None, :].expand_as(Ew2_B),
                                   b.scale2.mean_log[None, :].expand_as(Ew2_B))
    entropy = 0.5 * (Ew2.numel() * (1 + _LOG_2PI) + vi.logdet_S.sum())
    return w_prior + b_prior + entropy + vi.lam.elbo() + vi.tau.elbo() + vi.slab.elbo() + b.elbo()


def starting_slab_rate(slab, start: str, information: torch.Tensor | None = None) -> torch.Tensor:
    """The rate of q(c^2) for the first loading update (it only decides where the coordinate ascent starts).

    ``"informed"``: each weight's slab starts no narrower than the width at which its prior precision
    E[1/c^2] equals its data's information d_g = N E[1/sigma2_g] E[x^2] (from the starting factors and the total
    variance). In one dimension, with q(c^2) of shape a and E[w^2] ~ m^2, the update m <- w_hat d / (d + 2a / m^2)
    has the zero fixed point and, iff t^2 = w_hat^2 d >= 8a, a stable one near w_hat and an unstable one between
    them with m_u <= w_hat / 2, i.e. at prior precision >= d. Started at precision d, every weight that can be
    active therefore converges to its non-zero solution, as from a dense start, while the weights that cannot
    start pinned instead of crossing from a dense solution, whose slow rotation towards the sparse one took
    most of the epochs (``benchmarks/start.py``). Once d outgrows the annotation's narrow slab (many cells),
    this is the annotation's own widths.
    ``"wide"`` (``Spex``'s default): every slab at the widest annotated width (a dense start). ``"prior"``: the
    annotation's widths.
    ``information``: d_g (G), for "informed" (Gaussian likelihood: ``_spex_vi``; the count and multi-view engines
    start "wide" or "prior"). ``slab``: a ``priors.RandomSlab`` before its first update.
    """
    if start not in STARTS:
        raise ValueError(f"start must be one of {', '.join(map(repr, STARTS))}, got {start!r}")
    if start == "wide":
        return torch.full_like(slab.q.rate, float(slab.rate0.max()))
    if start == "prior":
        return slab.q.rate
    if information is None:
        raise ValueError("start='informed' needs each gene's information d_g, derived for the Gaussian likelihood "
                         "of one complete view; counts, several views and missing entries start 'wide' or 'prior'")
    return torch.maximum(slab.q.rate, slab.q.shape / information[:, None])
