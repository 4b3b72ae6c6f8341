"""Slalom (f-scLVM): gene-set guided factor analysis with a spike-and-slab prior (seed 001).

Model (seed 001, "f-scLVM (2)-(4)"; Buettner et al. 2017)::

    y_n = W x_n + B z_n + eps_n,     eps_ng ~ N(0, 1 / tau_g),     tau_g ~ Gamma(c0, d0)
    x_n ~ N(0, I_K),                  b_gc ~ N(0, 1 / beta)                       (known covariates Z)
    w_gk = s_gk v_gk,   s_gk ~ Bernoulli(pi_gk),   v_gk ~ N(0, 1 / alpha_k),   alpha_k ~ Gamma(a0, b0)  (ARD)

The annotation enters only through the prior inclusion probability ``pi_gk``: ``1 - FPR`` for a gene inside
gene set k, ``FNR`` outside (the seed's ``P(I | z)`` read as a prior on the indicator, as slalom does); dense
unannotated factors have ``pi = 0.99`` everywhere, sparse unannotated ones ``pi = 0.01``.

Learned inclusion rates (an extension of the seed's ``P(z_gk)``). With a fixed ``pi = 1 - FPR`` an annotated gene
without signal pays only the slab's Occam factor, about ``1/2 log N`` nats, against ``logit(0.99) = 4.6`` nats of
prior: a false member stays in. So each factor's in-set rate is learned::

    s_gk ~ Bernoulli(pi_k^in)  (g in set k),     pi_k^in ~ Beta(a_in, b_in),   a_in = n0 (1 - FPR), b_in = n0 FPR
    s_gk ~ Bernoulli(pi_k^out) (g not in set k), pi_k^out fixed at FNR (or ~ Beta(n0' FNR, n0' (1 - FNR)))

prior mean = f-scLVM's fixed probability, strength ``n0 = rate_strength`` pseudo-genes (default 10).
``q(pi_k^j) = Beta(a_j + sum_g E[s_gk], b_j + sum_g (1 - E[s_gk]))`` over the group's genes, and the gates read
``logit pi`` as ``E[log pi] - E[log(1 - pi)] = digamma(a) - digamma(b)``; the ELBO gains ``E[log p(s | pi)] +
E[log p(pi)] + H[q(pi)]``. A set whose genes partly lack signal learns a lower rate, and its false members drop.
The out-of-set rates stay fixed by default (``out_rate_strength=None``): learned, a small gene set's factor can
turn dense (on mESC one 20-gene Reactome set took in 5279 more genes and lost its G2M signal).

The first sweep's gates use the fixed log-odds ``logit m`` (as if q(pi) were a Beta with those expected
log-odds), and each q(pi_k) is then updated from them. Starting from q(pi) itself would be worse: with
``b_in = 0.1``, ``digamma(b)`` is about ``-1/b``, so q(pi) at the prior gives the gates ~13 nats of prior, and
q(pi) from gates at the prior mean still 6-8; in a simulation that kept 3 of 8 factors at "keep every gene", a
local optimum with a lower ELBO. Sets with few genes (~15, 3-4 false) carry little evidence about their rate;
the prior then often keeps their false members.

Inference is variational Bayes by coordinate ascent, with the spike-and-slab family of Titsias & Lázaro-Gredilla
(2011): ``q(s_gk, v_gk) = q(s_gk) q(v_gk | s_gk)`` with ``q(v | s = 1) = N(mu, sigma2)`` and ``q(v | s = 0)`` the
prior ``p(v | alpha)`` (the structured choice under which the switched-off slab costs nothing, so ARD sees only
the genes a factor uses, as in slalom). The other factors are ``q(x_n) = N(m_n, Sigma_x)`` (one K x K covariance
shared by all cells -- slalom factorises X over factors too; the full covariance costs nothing here),
``q(alpha_k)``, ``q(tau_g)`` Gamma and ``q(b_g)`` a C x C Gaussian per gene. Every block update is the exact
maximiser of the evidence lower bound (ELBO) given the others, so the ELBO, computed in closed form after every
sweep, never decreases; it drives the training engine's early stopping (slalom itself has no bound and runs a
fixed 700+ iterations).

One sweep: for each factor k in turn, ``q(s_.k, v_.k)`` for all genes at once and then ``q(alpha_k)``; then
(learned rates) ``q(pi)`` of all factors, ``q(B)``, ``q(X)`` and ``q(tau)``. It costs two N x G x K products
plus G x K^2 for the factor loop. Factors start from f-scLVM's initialisation (each gene set's leading principal
component); the factor loop visits unannotated factors first, then annotated ones by decreasing estimated
relevance (see ``_update_order``: with overlapping gene sets the first one visited explains the shared signal,
so the order matters, as in f-scLVM's pre-training).

A factor whose ARD precision explodes (``E[alpha_k] * var(Y) > switch_off``) carries no signal: it is flagged
inactive and its blocks are no longer updated (a frozen block keeps the ELBO valid and monotone). With fixed
rates (``rate_strength=None``, f-scLVM) an annotated gene without signal keeps a posterior inclusion near
``1 - fpr`` (its slab costs little), so the inclusion rule only *gains* genes; the learned in-set rates let it
drop them too (``experiments/slalom_drop_genes.py``).
"""
from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
import torch
from scipy.special import digamma

from ..data.genesets import annotation_mask
from ..data.inputs import aligned_centred, covariate_design, new_covariates
from ..evaluate import factor_r2, orient
from ..evaluate import refined_annotations as _refined_by_loading
from ..train import Task, one_thread, train
from .base import LatentModel, factor_layout
from .persist import expect_shapes
from .spex import starting_factors

__all__ = ["Slalom"]

log = logging.getLogger(__name__)

_LOG_2PI = math.log(2 * math.pi)
#: prior inclusion probability of dense / sparse unannotated factors (slalom's values)
PI_DENSE, PI_SPARSE = 0.99, 0.01
#: Gamma(shape, rate) hyper-priors of the ARD and noise precisions, rates in units of the data's variance
#: (slalom: Gamma(1e-3, 1e-3) on its data scale)
ARD_PRIOR, NOISE_PRIOR = (1e-3, 1e-3), (1e-3, 1e-3)
#: prior strength (a0 + b0, in pseudo-genes) of the Beta priors on the inclusion rates; see ``Slalom``
RATE_STRENGTH = 10.0
#: below this many multiply-adds (N G K) a sweep's matrix products run on one CPU thread (see ``train.one_thread``)
SMALL_PRODUCT = 2e8
#: prior sd of a covariate effect per sd of the (standardised) covariate, in data sd
COVARIATE_PRIOR_SD = 100.0


def _gamma_elbo(shape, rate, shape0, rate0) -> torch.Tensor:
    """E_q[log Gamma(v; shape0, rate0)] + H[q] for q = Gamma(shape, rate), summed."""
    e_log = torch.digamma(shape) - torch.log(rate)
    prior = shape0 * math.log(rate0) - math.lgamma(shape0) + (shape0 - 1) * e_log - rate0 * shape / rate
    entropy = shape - torch.log(rate) + torch.lgamma(shape) + (1 - shape) * torch.digamma(shape)
    return (prior + entropy).sum()


def _group_mean(pi: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Mean of ``pi`` (K x G) over each factor's genes in ``group`` (K x G bool); 0.5 for an empty group."""
    n = group.sum(1)
    return torch.where(n > 0, (pi * group).sum(1) / n.clamp_min(1), 0.5)


def _group_spread(pi: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Largest minus smallest ``pi`` over each factor's genes in ``group`` (0 for an empty group)."""
    hi = torch.where(group, pi, -math.inf).amax(1)
    lo = torch.where(group, pi, math.inf).amin(1)
    return torch.where(group.any(1), hi - lo, 0.0)


def _beta_elbo(a, b, a0, b0) -> torch.Tensor:
    """E_q[log Beta(pi; a0, b0)] + H[q] for q = Beta(a, b), summed (= -KL(q || prior); seed 001's P(z) made a
    Beta-Bernoulli)."""
    e_log, e_log_1m = torch.digamma(a) - torch.digamma(a + b), torch.digamma(b) - torch.digamma(a + b)
    log_beta = lambda x, y: torch.lgamma(x) + torch.lgamma(y) - torch.lgamma(x + y)
    prior = (a0 - 1) * e_log + (b0 - 1) * e_log_1m - log_beta(a0, b0)
    entropy = log_beta(a, b) - (a - 1) * e_log - (b - 1) * e_log_1m
    return (prior + entropy).sum()


def _update_order(Y: torch.Tensor, X0: torch.Tensor, mask: torch.Tensor) -> list[int]:
    """The order in which a sweep updates the factors: unannotated factors first, then the annotated ones by
    decreasing estimated relevance.

    Coordinate ascent lets the first of several overlapping gene sets explain their shared signal (the others
    then lose it to ARD), so the order matters; f-scLVM fixes it by a pre-training run ordered by relevance.
    Here the estimate is free: the relevance ``1/alpha_k`` factor k would get alone from its starting scores
    x_k (standardised), ``mean over the set's genes of (y_g^T x_k / N)^2``.
    """
    N, A = Y.shape[0], mask.shape[1]
    K = X0.shape[1]
    cov = (Y.T @ X0[:, :A]) / N                                     # G x A univariate loadings
    estimate = ((cov * cov) * mask).sum(0) / mask.sum(0).clamp_min(1)
    annotated = torch.argsort(estimate, descending=True, stable=True).tolist()
    return list(range(A, K)) + annotated


class SlalomVI(Task):
    """Variational state and coordinate-ascent updates of f-scLVM.

    ``Y`` (N x G) and ``Z`` (N x C, standardised) are centred tensors; ``pi`` (G x K) the prior inclusion
    probabilities (the prior means of learned rates); ``X0`` (N x K) the starting factor scores; ``order`` the order
    in which the factors' loadings are updated within a sweep (default: as given); ``in_set`` (G x K bool) the
    annotation, ``rate_strength`` the Beta priors' strength, a number or a pair (out-of-set, in-set), None for
    fixed rates (see :meth:`_init_rates`). Per-(gene, factor) quantities are stored factor-major
    (K x G), so the factor loop reads and writes contiguous rows.
    """

    state_exclude = ("Y", "Z", "yy", "ZY", "ZZ", "U", "d")  # the data and their fixed statistics

    @property
    def objective_scale(self) -> float:
        """The ELBO sums over N x G observations."""
        return float(self.N * self.G)

    def __init__(self, Y: torch.Tensor, Z: torch.Tensor, pi: torch.Tensor, X0: torch.Tensor, *,
                 order=None, switch_off: float = 1e3, in_set: torch.Tensor | None = None,
                 rate_strength: float | None = None):
        self.Y, self.Z = Y, Z
        self.N, self.G = Y.shape
        self.K, self.C = pi.shape[1], Z.shape[1]
        dt, dev = Y.dtype, Y.device
        self.order = list(range(self.K)) if order is None else [int(k) for k in order]
        if sorted(self.order) != list(range(self.K)):
            raise ValueError(f"order must be a permutation of range({self.K})")
        self.var = float(((Y * Y).sum(0) / self.N).mean().clamp_min(1e-12))
        self.switch_off = float(switch_off)
        # priors (factor-major). log_pi / log_1m_pi hold E[log pi_gk] and E[log(1 - pi_gk)]: constants for fixed
        # rates, refreshed from q(pi_k) after each of its updates for learned ones
        pi = pi.T.contiguous()
        self.log_pi, self.log_1m_pi = torch.log(pi), torch.log1p(-pi)
        self.logit_pi = self.log_pi - self.log_1m_pi
        self._init_rates(pi, in_set, rate_strength)
        self.a0, self.b0 = ARD_PRIOR[0], ARD_PRIOR[1] * self.var
        self.c0, self.d0 = NOISE_PRIOR[0], NOISE_PRIOR[1] * self.var
        self.beta = 1.0 / (COVARIATE_PRIOR_SD**2 * self.var)
        # sufficient statistics of the data
        self.yy = (Y * Y).sum(0)
        self.ZY = Z.T @ Y                                   # C x G
        self.ZZ = Z.T @ Z
        if self.C:
            d, self.U = torch.linalg.eigh(self.ZZ)
        else:
            d, self.U = torch.zeros(0, dtype=dt, device=dev), torch.zeros(0, 0, dtype=dt, device=dev)
        self.d = d.clamp_min(0)
        # q(s, v): logit of E[s] (u), slab mean and variance; loadings E[w] = E[s] mu  (all K x G)
        self.u = self.logit_pi.clone()
        self.mu = torch.zeros(self.K, self.G, dtype=dt, device=dev)
        self.s2 = torch.full((self.K, self.G), self.var, dtype=dt, device=dev)
        self.W = torch.zeros_like(self.mu)
        self._var_w = torch.zeros_like(self.mu)
        # q(alpha): start at a slab variance of the data's variance; q(tau): at the genes' variances
        self.a = torch.ones(self.K, dtype=dt, device=dev)
        self.b = torch.full((self.K,), self.var, dtype=dt, device=dev)
        self.c = torch.full((self.G,), self.c0 + 0.5 * self.N, dtype=dt, device=dev)
        self.d_tau = self.c * (self.yy / self.N).clamp_min(1e-6 * self.var)
        # q(B) in the eigenbasis of Z^T Z: means and variances (C x G)
        self.B = torch.zeros(self.C, self.G, dtype=dt, device=dev)
        self.Bvar = 1.0 / (self.d[:, None] * self.tau + self.beta)
        # q(X): the starting scores as a point mass (the first sweep begins with the loadings)
        self.M = X0.to(dt)
        self.Sigma_x = torch.zeros(self.K, self.K, dtype=dt, device=dev)
        self._logdet_Sigma_x = None
        self.active = torch.ones(self.K, dtype=torch.bool, device=dev)
        self._x_statistics()

    def _init_rates(self, pi: torch.Tensor, in_set, rate_strength) -> None:
        """The Beta priors of the inclusion rates (seed 001's ``P(z_gk)``, with its rate learned).

        Each factor k has two rates, ``pi_k^out`` for the genes outside its gene set (column 0) and ``pi_k^in``
        for those inside (column 1), ``pi_k^j ~ Beta(a0_kj, b0_kj)`` with ``a0 = m n0`` and ``b0 = (1 - m) n0``:
        prior mean ``m`` the fixed probability the genes of that group have in ``pi`` and prior strength ``n0``
        pseudo-genes. ``rate_strength`` is ``n0`` for both groups, or a pair ``(n0_out, n0_in)``; ``None`` (for
        both or one group) keeps those rates fixed at ``pi`` (f-scLVM).
        """
        K, G, dt, dev = self.K, self.G, pi.dtype, pi.device
        self.in_set = torch.zeros(K, G, dtype=torch.bool, device=dev) if in_set is None \
            else torch.as_tensor(in_set, device=dev).T.to(torch.bool).contiguous()
        if self.in_set.shape != (K, G):
            raise ValueError(f"in_set must be genes x factors ({G} x {K}), got {tuple(self.in_set.T.shape)}")
        self._in_set_f = self.in_set.to(dt)
        self.n_rate = torch.stack([(~self.in_set).sum(1), self.in_set.sum(1)], 1).to(dt)  # K x 2 group sizes
        strengths = tuple(rate_strength) if isinstance(rate_strength, (tuple, list)) else (rate_strength,) * 2
        if len(strengths) != 2:
            raise ValueError(f"rate_strength must be a number, None or a pair (out, in), got {rate_strength!r}")
        for n0 in strengths:
            if n0 is not None and (isinstance(n0, bool) or not isinstance(n0, (int, float, np.number))
                                   or not 0 < n0 < math.inf):
                raise ValueError(f"rate_strength must be positive finite numbers or None, got {rate_strength!r}")
        mean = torch.stack([_group_mean(pi, ~self.in_set), _group_mean(pi, self.in_set)], 1)  # K x 2
        # learned: the groups with a strength and at least one gene
        self.learned = torch.tensor([[n0 is not None for n0 in strengths]], device=dev) & (self.n_rate > 0)
        self.learn_rates = bool(self.learned.any())
        spread = torch.stack([_group_spread(pi, ~self.in_set), _group_spread(pi, self.in_set)], 1)
        if bool((self.learned & (spread > 1e-6 * mean)).any()):
            raise ValueError("a learned inclusion rate needs the prior inclusion probability pi to be constant "
                             "within each factor's in-set (and out-of-set) genes")
        n0 = torch.tensor([[1.0 if v is None else float(v) for v in strengths]], dtype=dt, device=dev)
        # fixed groups keep a = m, b = 1 - m: their 'posterior mean' a / (a + b) is the fixed rate
        self.rate_a0 = torch.where(self.learned, n0 * mean, mean)
        self.rate_b0 = torch.where(self.learned, n0 * (1 - mean), 1 - mean)
        self.rate_a, self.rate_b = self.rate_a0.clone(), self.rate_b0.clone()
        self._log_m, self._log_1m_m = torch.log(mean), torch.log1p(-mean)

    # ------------------------------------------------------------------ expectations
    @property
    def gamma(self) -> torch.Tensor:
        """Posterior inclusion probabilities E[s_gk] (K x G)."""
        return torch.sigmoid(self.u)

    @property
    def tau(self) -> torch.Tensor:
        return self.c / self.d_tau

    @property
    def alpha(self) -> torch.Tensor:
        return self.a / self.b

    def loading_var(self) -> torch.Tensor:
        """Var[w_gk] = E[s](mu^2 + sigma2) - (E[s] mu)^2 (K x G)."""
        return (self.gamma * (self.mu * self.mu + self.s2) - self.W * self.W).clamp_min(0)

    def B_mean(self) -> torch.Tensor:
        """Covariate effects in the covariates' own (standardised) basis, C x G."""
        return self.U @ self.B if self.C else self.B

    def B_sd(self) -> torch.Tensor:
        return ((self.U * self.U) @ self.Bvar).sqrt() if self.C else self.B

    # ------------------------------------------------------------------ updates
    def _x_statistics(self) -> None:
        """E[X^T X] and the data projected on E[X], as the loading updates need them."""
        self.S = self.M.T @ self.M + self.N * self.Sigma_x
        self.MZ = self.M.T @ self.Z                         # K x C
        self.MY = self.M.T @ self.Y                         # K x G
        self.R0 = self.MY - self.MZ @ self.B_mean() if self.C else self.MY

    def update_loadings(self) -> None:
        """q(s_.k, v_.k) for all genes, then q(alpha_k), factor after factor (exact coordinate ascent); then, for
        learned rates, q(pi) (:meth:`update_rates`).

        Few tensor operations per factor: the loop is sequential by nature (each factor's update sees the
        others' newest loadings), so its cost is the per-operation overhead plus one K x G product."""
        tau, S, W = self.tau, self.S, self.W
        S_diag = torch.diagonal(S).tolist()
        a, b = self.a.tolist(), self.b.tolist()
        live = self.active.tolist()
        for k in self.order:
            if not live[k]:
                continue
            # E[x_k]^T (y_g - sum_{k' != k} E[x_k'] w_gk') in E[X^T X] form
            r = torch.addmv(self.R0[k], W.T, S[k], alpha=-1.0).add_(W[k], alpha=S_diag[k])
            prec = (tau * S_diag[k]).add_(a[k] / b[k])         # tau_g E[x_k^T x_k] + E[alpha_k]
            s2 = prec.reciprocal()
            mu = r.mul_(tau).mul_(s2)
            e_log_alpha = float(digamma(a[k])) - math.log(b[k])
            # logit E[s] = logit pi + (mu^2 / sigma2 + log sigma2 + E[log alpha]) / 2, with logit pi read as
            # E[log pi] - E[log(1 - pi)] when the rates are learned
            u = (mu * mu).mul_(prec).add_(s2.log()).add_(e_log_alpha).mul_(0.5).add_(self.logit_pi[k])
            g = torch.sigmoid(u)
            self.u[k], self.mu[k], self.s2[k] = u, mu, s2
            torch.mul(g, mu, out=W[k])
            a[k] = self.a0 + 0.5 * float(g.sum())
            b[k] = self.b0 + 0.5 * float(torch.dot(g, torch.addcmul(s2, mu, mu)))
        self.a = torch.tensor(a, dtype=self.a.dtype, device=self.a.device)
        self.b = torch.tensor(b, dtype=self.b.dtype, device=self.b.device)
        self._var_w = self.loading_var()
        if self.learn_rates:
            self.update_rates()  # the first sweep's gates used the fixed log-odds logit m

    def update_rates(self) -> None:
        """q(pi_k^out), q(pi_k^in) = Beta(a0 + sum_g E[s_gk], b0 + sum_g (1 - E[s_gk])), sums over the group's
        genes (the conjugate update of seed 001's P(z_gk) given a Beta prior on its rate), for every factor at
        once (q(pi_k) and the gates of the other factors do not interact); switched-off factors stay frozen."""
        live = self.learned & self.active[:, None]
        g = self.gamma
        s_in = (g * self._in_set_f).sum(1)
        on = torch.stack([g.sum(1) - s_in, s_in], 1)                    # K x 2 expected active genes
        self.rate_a = torch.where(live, self.rate_a0 + on, self.rate_a)
        self.rate_b = torch.where(live, self.rate_b0 + (self.n_rate - on).clamp_min(0), self.rate_b)
        self.rate_expectations()

    def rate_expectations(self) -> None:
        """E[log pi_gk] and E[log(1 - pi_gk)] = digamma(a or b) - digamma(a + b) of the gene's group under the
        current q(pi), as the gates' update reads them (fixed groups: log m and log(1 - m))."""
        ab = torch.digamma(self.rate_a + self.rate_b)
        e_log = torch.where(self.learned, torch.digamma(self.rate_a) - ab, self._log_m)
        e_log_1m = torch.where(self.learned, torch.digamma(self.rate_b) - ab, self._log_1m_m)
        self.log_pi = torch.where(self.in_set, e_log[:, 1:], e_log[:, :1])
        self.log_1m_pi = torch.where(self.in_set, e_log_1m[:, 1:], e_log_1m[:, :1])
        self.logit_pi = self.log_pi - self.log_1m_pi

    def update_covariates(self) -> None:
        """q(b_g) = N(., Sigma_bg) per gene: Sigma_bg = (tau_g Z^T Z + beta I)^-1, in the eigenbasis of Z^T Z."""
        if not self.C:
            return
        tau = self.tau
        self.Bvar = 1.0 / (self.d[:, None] * tau + self.beta)
        self.B = (self.U.T @ (self.ZY - self.MZ.T @ self.W)) * tau * self.Bvar

    def update_factors(self) -> None:
        """q(x_n) = N(m_n, Sigma_x): Sigma_x = (I + sum_g tau_g E[w_g w_g^T])^-1, shared by all cells."""
        tau = self.tau
        WT = self.W * tau                                   # K x G
        prec = WT @ self.W.T + torch.diag(1.0 + self._var_w @ tau)
        L = torch.linalg.cholesky(prec)
        self.Sigma_x = torch.cholesky_inverse(L)
        rhs = self.Y @ WT.T
        if self.C:
            rhs = rhs - self.Z @ (self.B_mean() @ WT.T)
        self.M = rhs @ self.Sigma_x
        self._logdet_Sigma_x = -2.0 * torch.log(torch.diagonal(L)).sum()
        self._x_statistics()

    def expected_rss(self) -> torch.Tensor:
        """E||y_g - X w_g - Z b_g||^2 per gene under q."""
        W, S = self.W, self.S
        rss = self.yy - 2 * (W * self.MY).sum(0) + ((S @ W) * W).sum(0) + torch.diagonal(S) @ self._var_w
        if self.C:
            B = self.B_mean()
            rss = rss - 2 * (B * self.ZY).sum(0) + 2 * ((self.MZ.T @ W) * B).sum(0) \
                + ((self.ZZ @ B) * B).sum(0) + self.d @ self.Bvar
        return rss.clamp_min(1e-12 * self.var)

    def update_noise(self, rss: torch.Tensor) -> None:
        self.d_tau = self.d0 + 0.5 * rss

    def switch_off_factors(self) -> list[int]:
        """Flag factors whose ARD precision exploded (E[alpha_k] var(Y) > switch_off); returns the new ones."""
        dead = self.active & (self.alpha * self.var > self.switch_off)
        self.active &= ~dead
        return torch.nonzero(dead).flatten().tolist()

    # ------------------------------------------------------------------ the bound
    def elbo(self, rss: torch.Tensor) -> float:
        """The evidence lower bound (closed form), given ``rss`` from :meth:`expected_rss`."""
        N, K = self.N, self.K
        e_log_tau = torch.digamma(self.c) - torch.log(self.d_tau)
        lik = 0.5 * N * (e_log_tau - _LOG_2PI).sum() - 0.5 * (self.tau * rss).sum()
        x = 0.5 * (N * K + N * self._logdet_Sigma_x - N * torch.trace(self.Sigma_x) - (self.M * self.M).sum())
        # spike: E[log p(s | pi)] + H[q(s)] (log pi read as E[log pi] when learned); slab: E[s] (E log N(v; 0,
        # 1/alpha) + H[q(v | s = 1)]); learned rates add E[log p(pi)] + H[q(pi)]
        g = self.gamma
        log_g = torch.nn.functional.logsigmoid(self.u)                  # log(1 - g) = log g - u
        spike = (g * (self.log_pi - log_g) + (1 - g) * (self.log_1m_pi - log_g + self.u)).sum()
        e_alpha, e_log_alpha = self.alpha, torch.digamma(self.a) - torch.log(self.b)
        slab = 0.5 * (g * (e_log_alpha[:, None] - e_alpha[:, None] * (self.mu * self.mu + self.s2)
                           + torch.log(self.s2) + 1.0)).sum()
        total = lik + x + spike + slab + _gamma_elbo(self.a, self.b, self.a0, self.b0) \
            + _gamma_elbo(self.c, self.d_tau, self.c0, self.d0)
        if self.learn_rates:
            on = self.learned
            total = total + _beta_elbo(self.rate_a[on], self.rate_b[on], self.rate_a0[on], self.rate_b0[on])
        if self.C:
            total = total + 0.5 * (math.log(self.beta) - self.beta * (self.B * self.B + self.Bvar)
                                   + 1.0 + torch.log(self.Bvar)).sum()
        return float(total)

    # ------------------------------------------------------------------ one sweep
    def epoch(self) -> float:
        dev = self.Y.device
        with one_thread(dev):
            self.update_loadings()
        with one_thread(dev, enabled=self.N * self.G * self.K < SMALL_PRODUCT):
            self.update_covariates()
            self.update_factors()
            rss = self.expected_rss()
            self.update_noise(rss)
            value = self.elbo(rss)
        for k in self.switch_off_factors():
            log.debug("factor %d switched off (E[alpha] * var = %.3g)", k, float(self.alpha[k]) * self.var)
        return value


class Slalom(LatentModel):
    """f-scLVM ("slalom", seed 001): spike-and-slab factor analysis guided by gene-set annotations.

    Each annotated factor's loadings ``w_gk = s_gk v_gk`` have a spike-and-slab prior whose inclusion
    probability is ``fnr`` outside its gene set and, inside, a rate learned per factor with a Beta prior of mean
    ``1 - fpr`` (so the data can drop false members; ``rate_strength=None``: fixed at ``1 - fpr``, as f-scLVM);
    an ARD precision per factor switches off factors the data do not support. Fitted by variational Bayes
    (closed-form coordinate ascent with a monotone ELBO); see the module docstring for the model and the updates.

    Parameters
    ----------
    n_dense : int
        Unannotated dense factors (inclusion prior 0.99 for every gene): broad technical or biological
        variation no gene set names (slalom's ``nHidden``; its default is 3).
    n_sparse : int
        Unannotated sparse factors (inclusion prior 0.01): small programs outside the annotation.
    fpr, fnr : float in (0, 1)
        Annotation false-positive rate (an annotated gene is inactive with prior probability ``fpr``) and
        false-negative rate (an unannotated gene is active with prior probability ``fnr``). Defaults as in
        f-scLVM: 0.01 and 0.001. With learned rates they are the prior means of the rates.
    rate_strength : float > 0 or None
        Strength ``n0`` (pseudo-genes) of each annotated factor's Beta prior on its in-set inclusion rate,
        ``pi_k^in ~ Beta(n0 (1 - fpr), n0 fpr)``: the rate is learned from the data, so a gene set whose genes
        partly lack signal learns a lower rate and its false members drop out. Default 10 pseudo-genes: fewer
        than a set has (``min_set_size=15``), so the data move the rate, while the prior mean stays f-scLVM's
        0.99. Smaller is bolder (3 drops more false members), larger more cautious (30 fewer); see
        ``experiments/slalom_drop_genes.py``. ``None``: the rate is fixed at ``1 - fpr`` (f-scLVM's model, exactly
        the previous behaviour; annotated genes are then hardly ever dropped).
    out_rate_strength : float > 0 or None
        The same for the out-of-set rates (mean ``fnr``; unannotated factors: 0.01 sparse, 0.99 dense). Default
        None: fixed, as in f-scLVM -- learned, the out-of-set rate lets a gene-set factor turn into a dense one.
    switch_off : float
        A factor is switched off (flagged inactive, no longer updated) once its ARD precision exceeds this many
        times the inverse of the data's average gene variance, i.e. its slab variance ``1/E[alpha_k]`` fell
        below ``var(Y) / switch_off``.
    min_set_size, max_set_size : gene-set filters applied against the data's genes (slalom: ``minGenes``).
    max_epochs, tol : stop after ``max_epochs`` sweeps or when the ELBO's relative change stays below ``tol``.
    progress : show a progress bar.
    dtype : "float32" (default) or "float64".

    Attributes
    ----------
    See :class:`~pathfactor.models.base.LatentModel`, with these differences:

    relevance_ : Series
        f-scLVM's relevance ``1 / E[alpha_k]``: the slab variance of the factor's loadings (in squared data
        units per unit factor score), large for factors that drive many genes strongly; switched-off factors
        have a tiny relevance. ``r2_`` holds the explained variance (``evaluate.factor_r2``) as the other models
        report it.
    active_ : Series of bool
        False for factors the ARD prior switched off.
    inclusion_ : DataFrame, genes x factors
        Posterior inclusion probabilities ``E[s_gk]``; :meth:`refined_annotations` compares them with the
        annotation.
    inclusion_rates_ : DataFrame, factors x ["in_set", "out_of_set"]
        Posterior mean of each factor's inclusion rates (the fixed rate where not learned; NaN for a group with
        no genes, e.g. the in-set rate of an unannotated factor).
    loadings_ : ``E[s_gk v_gk]``, ``loadings_sd_`` its posterior sd.
    elbo_, converged_, n_switched_off_

    References
    ----------
    Buettner, Pratanwanich, McCarthy, Marioni & Stegle (2017), f-scLVM: scalable and versatile factor analysis
    for single-cell RNA-seq, Genome Biology 18:212 (seed 001). Titsias & Lázaro-Gredilla (2011), Spike and slab
    variational inference for multi-task and multiple kernel learning, NeurIPS.
    """

    key = "slalom"
    relevance_measure = "1/E[alpha]"

    def __init__(self, *, n_dense: int = 0, n_sparse: int = 0, fpr: float = 0.01, fnr: float = 0.001,
                 rate_strength: float | None = RATE_STRENGTH, out_rate_strength: float | None = None,
                 switch_off: float = 1e3, max_epochs: int = 500, tol: float = 1e-5, min_set_size: int = 15,
                 max_set_size: int = 500, progress: bool = True, dtype: str = "float32"):
        self.n_dense, self.n_sparse = n_dense, n_sparse
        self.fpr, self.fnr, self.switch_off = fpr, fnr, switch_off
        self.rate_strength, self.out_rate_strength = rate_strength, out_rate_strength
        self.max_epochs, self.tol = max_epochs, tol
        self.min_set_size, self.max_set_size = min_set_size, max_set_size
        self.progress, self.dtype = progress, dtype

    def _check_params(self) -> None:
        for name in ("n_dense", "n_sparse"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        for name in ("fpr", "fnr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not 0 < value < 1:
                raise ValueError(f"{name} must be a probability strictly between 0 and 1, got {value!r}")
        for name in ("rate_strength", "out_rate_strength"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float, np.number))
                                      or not 0 < value < math.inf):
                raise ValueError(f"{name} must be a positive finite number (or None for fixed rates), got {value!r}")
        if isinstance(self.switch_off, bool) or not isinstance(self.switch_off, (int, float, np.number)) \
                or not self.switch_off > 0 or not np.isfinite(self.switch_off):
            raise ValueError(f"switch_off must be a positive number, got {self.switch_off!r}")
        if isinstance(self.max_epochs, bool) or not isinstance(self.max_epochs, (int, np.integer)) \
                or self.max_epochs < 1:
            raise ValueError(f"max_epochs must be an integer >= 1, got {self.max_epochs!r}")
        if isinstance(self.tol, bool) or not isinstance(self.tol, (int, float, np.number)) or not self.tol >= 0:
            raise ValueError(f"tol must be a number >= 0, got {self.tol!r}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")

    # ------------------------------------------------------------------ fit
    def fit(self, data, annotations=None, layer: str | None = None, covariates=None, device="auto",
            seed: int = 0, use_highly_variable: bool | None = None) -> "Slalom":
        """Fit to ``data`` (AnnData, DataFrame or array; cells x genes, log-normalised expression).

        ``annotations``: GeneSets, ``{name: genes}``, a genes x terms boolean DataFrame or a GMT/JSON path (or a
        list of them); sets are matched to the genes case-insensitively and filtered by size.
        ``covariates``: obs column name(s) (categorical -> one column per non-reference level) or a cells x C
        array; their effects get a vague Gaussian prior. The caller's data are not modified.
        """
        self._check_params()
        matrix, _, dev, dt = self._begin_fit(data, layer, seed=seed, device=device,
                                             use_highly_variable=use_highly_variable)
        N, G = matrix.shape
        mask, term_names = annotation_mask(annotations, matrix.var_names, self.min_set_size, self.max_set_size)
        Z, covariate_names = covariate_design(getattr(data, "obs", None), covariates, N)
        A, H = mask.shape[1], self.n_sparse + self.n_dense
        K = A + H
        if K == 0:
            raise ValueError("nothing to fit: give annotations (gene sets) or ask for n_dense / n_sparse factors")
        if K + Z.shape[1] >= G:
            raise ValueError(f"{K} factors + {Z.shape[1]} covariate columns need fewer than the data's {G} genes; "
                             "use fewer gene sets (e.g. raise min_set_size) or fewer unannotated factors")
        if Z.shape[1] + 1 >= N:  # the spike-and-slab prior needs no K < N, but the covariates' effects need cells
            raise ValueError(f"{Z.shape[1]} covariate columns need fewer than the data's {N} cells")

        Y, gene_mean = matrix.centred(dev, dt)
        Zt = torch.as_tensor(Z, dtype=torch.float64, device=dev)
        z_mean = Zt.mean(0)
        z_sd = Zt.std(0).clamp_min(1e-12) if Zt.shape[1] else torch.ones(0, dtype=torch.float64, device=dev)
        Zt = ((Zt - z_mean) / z_sd).to(dt)
        names, kinds = factor_layout(term_names, self.n_sparse, self.n_dense)
        pi = np.concatenate([np.where(mask, 1.0 - self.fpr, self.fnr), np.full((G, self.n_sparse), PI_SPARSE),
                             np.full((G, self.n_dense), PI_DENSE)], axis=1)
        # f-scLVM's start: each term's leading principal component, then those of what the terms leave
        Y_resid = Y - Zt @ torch.linalg.lstsq(Zt, Y).solution if Zt.shape[1] else Y
        mask_t = torch.as_tensor(mask, dtype=dt, device=dev)
        X0 = starting_factors(Y_resid, mask_t, H)
        order = _update_order(Y_resid, X0, mask_t)
        in_set = torch.as_tensor(np.concatenate([mask, np.zeros((G, H), dtype=bool)], axis=1), device=dev)
        vi = SlalomVI(Y, Zt, torch.as_tensor(pi, dtype=dt, device=dev), X0, order=order, switch_off=self.switch_off,
                      in_set=in_set, rate_strength=(self.out_rate_strength, self.rate_strength))
        result = train(vi, max_epochs=self.max_epochs, tol=self.tol, progress=self.progress, desc="Slalom")
        vi.update_factors()  # scores given the final loadings and noise: what transform() gives for these cells

        W = vi.W.T.double().cpu().numpy()
        sd = vi.loading_var().T.sqrt().double().cpu().numpy()
        scores = vi.M.double().cpu().numpy()
        annotation = np.concatenate([mask, np.zeros((G, H), dtype=bool)], axis=1)
        signs = orient(W, annotation)
        relevance = 1.0 / vi.alpha.double().cpu().numpy()
        z_sd_np = z_sd.double().cpu().numpy()
        B = vi.B_mean().T.double().cpu().numpy() / z_sd_np if Z.shape[1] else None
        B_sd = vi.B_sd().T.double().cpu().numpy() / z_sd_np if Z.shape[1] else None
        self._set_results(scores=scores * signs, loadings=W * signs, loadings_sd=sd, obs_names=matrix.obs_names,
                          var_names=matrix.var_names, factor_names=names, factor_kinds=kinds, relevance=relevance,
                          annotation=annotation if A else None, covariate_effects=B, covariate_effects_sd=B_sd,
                          covariate_names=covariate_names, history=result.history)
        self.active_ = pd.Series(vi.active.cpu().numpy(), index=self.relevance_.index, name="active")
        self.inclusion_ = pd.DataFrame(vi.gamma.T.double().cpu().numpy(), index=self.loadings_.index,
                                       columns=self.loadings_.columns)
        self.r2_ = pd.Series(factor_r2(Y.double().cpu().numpy(), scores, W), index=self.relevance_.index, name="r2")
        self._rate_ab = torch.cat([vi.rate_a, vi.rate_b], 1).double().cpu().numpy()  # K x 4: a_out a_in b_out b_in
        self._set_inclusion_rates()
        self.elbo_, self.converged_ = result.history[-1], result.converged
        self.n_switched_off_ = int((~self.active_).sum())
        # what transform() needs
        self._posterior = {"signs": signs, "tau": vi.tau.double().cpu().numpy(), "W": W,
                           "loading_var": vi.loading_var().T.double().cpu().numpy(),
                           "gene_mean": gene_mean.cpu().numpy(), "z_mean": z_mean.cpu().numpy(),
                           "B": np.zeros((G, 0)) if B is None else B}
        self._covariates = covariates if isinstance(covariates, (str, list, tuple)) else None
        log.info("Slalom: %d of %d factors switched off by ARD", self.n_switched_off_, K)
        return self

    def _set_inclusion_rates(self) -> None:
        """``inclusion_rates_`` from the Beta posteriors' parameters (NaN for a factor's empty gene group)."""
        ab = self._rate_ab
        mean = ab[:, :2] / (ab[:, :2] + ab[:, 2:])
        n_in = self.annotation_.sum(0).to_numpy() if self.annotation_ is not None else np.zeros(len(ab))
        n_in = np.asarray(n_in, dtype=float)
        mean[:, 0] = np.where(n_in < len(self.loadings_.index), mean[:, 0], np.nan)
        mean[:, 1] = np.where(n_in > 0, mean[:, 1], np.nan)
        self.inclusion_rates_ = pd.DataFrame(mean[:, ::-1].copy(), index=self.loadings_.columns,
                                             columns=["in_set", "out_of_set"])

    # ------------------------------------------------------------------ results
    def refined_annotations(self, fraction: float | None = None, threshold: float = 0.5) -> pd.DataFrame:
        """Genes the data add to (``gained``) and remove from (``lost``) each annotated term.

        By default (``fraction=None``) a gene is active in a factor when its posterior inclusion probability
        ``E[s_gk]`` exceeds ``threshold`` (f-scLVM's rule); give ``fraction`` to use the loading-size rule of
        the other models instead (``|w_gk| > fraction * max_g |w_gk|``). Switched-off factors are skipped.
        Returns one row per term: ``term``, ``n_annotated``, ``n_active``, ``gained`` (by decreasing inclusion)
        and ``lost`` (by increasing inclusion).
        """
        self._check_fitted()
        if self.annotation_ is None:
            raise ValueError("this Slalom was fitted without gene-set annotations")
        live = self.active_.to_numpy()
        if fraction is not None:
            return _refined_by_loading(self.loadings_.loc[:, live], self.annotation_.loc[:, live], fraction)
        rows = []
        for term in self.loadings_.columns[live]:
            ann = self.annotation_[term]
            if not ann.any():
                continue
            p = self.inclusion_[term]
            on = p > threshold
            rows.append(dict(term=term, n_annotated=int(ann.sum()), n_active=int(on.sum()),
                             gained=p[on & ~ann].sort_values(ascending=False).index.tolist(),
                             lost=p[ann & ~on].sort_values().index.tolist()))
        return pd.DataFrame(rows, columns=["term", "n_annotated", "n_active", "gained", "lost"])

    def write(self, adata, key: str | None = None) -> None:
        """As :meth:`LatentModel.write`, plus ``varm["<key>_inclusion"]`` (posterior inclusion E[s_gk]),
        ``uns[key]["r2"]`` and ``uns[key]["relevance_measure"] = "1/E[alpha]"`` (this model's relevance is the
        ARD slab variance, not an R^2)."""
        super().write(adata, key)
        key = key or self.key
        adata.varm[f"{key}_inclusion"] = self.inclusion_.reindex(adata.var_names, fill_value=0.0).to_numpy(np.float32)
        adata.uns[key]["r2"] = self.r2_.to_numpy(dtype=float)

    def transform(self, data, layer: str | None = None, covariates=None) -> pd.DataFrame:
        """Factor scores of new cells: the posterior mean of x_n given the learned loadings and noise.

        ``data`` must hold every gene the model was fitted on (extra genes are ignored). If the model was fitted
        with covariates, pass the same covariates for the new cells (obs columns are found by name).
        """
        self._check_fitted()
        post = self._posterior
        Y, obs_names = aligned_centred(data, layer, self.loadings_.index, post["gene_mean"])
        if post["B"].shape[1]:
            Z = new_covariates(data, covariates if covariates is not None else self._covariates, Y.shape[0],
                               self.covariate_effects_.columns, post["z_mean"],
                               getattr(self, "covariate_levels_", None))
            Y = Y - Z @ post["B"].T
        W, tau = post["W"], post["tau"]
        TW = tau[:, None] * W
        prec = W.T @ TW + np.diag(1.0 + tau @ post["loading_var"])
        mu = np.linalg.solve(prec, (Y @ TW).T).T
        return pd.DataFrame(mu * post["signs"], index=obs_names, columns=self.loadings_.columns)

    # ------------------------------------------------------------------ save / load
    def _extra_state(self):
        meta = {"covariates": self._covariates, "elbo": self.elbo_, "converged": self.converged_}
        arrays = dict(self._posterior, active=self.active_.to_numpy(), inclusion=self.inclusion_.to_numpy(),
                      r2=self.r2_.to_numpy())
        if self._rate_ab is not None:
            arrays["rate_ab"] = self._rate_ab
        return meta, arrays

    def _load_extra_state(self, meta, arrays):
        (G, K), C = self.loadings_.shape, len(arrays["z_mean"])
        expect_shapes(arrays, {"active": (K,), "inclusion": (G, K), "r2": (K,), "signs": (K,), "tau": (G,),
                               "W": (G, K), "loading_var": (G, K), "gene_mean": (G,), "B": (G, C)})
        arrays = dict(arrays)
        index, columns = self.loadings_.index, self.loadings_.columns
        self.active_ = pd.Series(arrays.pop("active").astype(bool), index=columns, name="active")
        self.inclusion_ = pd.DataFrame(arrays.pop("inclusion"), index=index, columns=columns)
        self.r2_ = pd.Series(arrays.pop("r2"), index=columns, name="r2")
        if "rate_ab" in arrays:  # absent from models saved before the rates were learned
            expect_shapes(arrays, {"rate_ab": (K, 4)})
            self._rate_ab = arrays.pop("rate_ab")
            self._set_inclusion_rates()
        else:  # saved before the rates were learned: it was fitted with fixed rates
            self._rate_ab, self.inclusion_rates_ = None, None
            self.rate_strength = self.out_rate_strength = None
        self.n_switched_off_ = int((~self.active_).sum())
        self._posterior = arrays
        self._covariates, self.elbo_, self.converged_ = meta["covariates"], meta["elbo"], meta["converged"]
