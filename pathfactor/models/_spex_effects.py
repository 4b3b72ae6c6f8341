"""Interventions acting on programs: each cell's factors are centred on its intervention level's effects.

Model (seed 000's interventions on the latent factors; the form of GSFA's ``Z = G beta + Phi``)::

    x_n ~ N(m_n, I_K),   m_n = c + beta^T t_n,   c ~ N(0, I_K),   beta_lk ~ N(0, 1)

``t_n`` is the one-hot code of cell n's level (all zeros at the reference level), ``c`` the reference cells' mean
factor values and ``beta_l`` (K) level l's effect on every factor against the reference, in units of the factors'
within-level sd. Inside the factor model the effects get a weakly informative N(0, 1) prior (an effect of one
sd is a strong perturbation), so the fit centres each level's cells on what the data say.

Posterior. q(theta), theta = (c, beta_1 .. beta_L), is one joint Gaussian. Given q(W, B) and q(sigma2), the
likelihood of x_n is Gaussian with precision Gamma = sum_g psi_g E[w_g w_g^T]; with Sigma_x = (I + Gamma)^-1 and
h_n the likelihood's linear term:

* ``blocked=True`` (default): the joint q(X, theta) that is optimal in that block, q(x_n | theta) =
  N(Sigma_x (h_n + m_n), Sigma_x) and q(theta) its exact marginal, found by integrating X out:
  ``log q(theta) = log p(theta) + sum_n (-1/2 m_n^T R m_n + m_n^T u_n)`` with ``R = I - Sigma_x`` and
  ``u_n = Sigma_x h_n``. A factor the data pin down weakly (Sigma_x near I) then tells little about its effects;
* ``blocked=False``: q(X) q(theta) apart, ``R = I`` and ``u_n = E[x_n]``: the factor scores taken as data, as a
  regression of point estimates would, which overstates the effects' precision for weakly determined factors.

The precision of theta is an arrow: every beta_l couples to c only (``n_l R`` off the diagonal, ``n_l R + I`` on
it), so it is solved through the Schur complement of c, in O(L K^3).

For the ELBO, x_n = a_n + J m_n + eps (J = Sigma_x blocked, 0 mean-field; eps ~ N(0, Sigma_x)), so
E|x_n - m_n|^2 = |E x_n - E m_n|^2 + tr Sigma_x + tr((I - J) V_g (I - J)^T) and Cov(x_n) = Sigma_x + J V_g J^T
(V_g = Cov(m_g)), with J and Sigma_x those of the last update of q(X, theta).

Reported effects: most levels move few programs, so the estimates are then shrunk by adaptive shrinkage
(Stephens 2017, :func:`adaptive_shrinkage`): each effect's marginal q(beta_lk) = N(bhat, se^2) is read as its
likelihood, the prior ``g = pi_0 delta_0 + sum_j pi_j N(0, sigma_j^2)`` (a point mass at zero and a grid of
normals) is learned from all effects by empirical Bayes, and each effect's posterior under g gives its mean, sd
and local false sign rate. The per-effect likelihoods ignore the correlations among the effects (through the
shared reference and overlapping factors), as ``ashr`` does.
"""
from __future__ import annotations

import math

import torch

from ._spex_blocks import batched_inverse

_LOG_2PI = math.log(2 * math.pi)

__all__ = ["ProgramEffects", "local_false_sign_rate", "group_effects", "adaptive_shrinkage"]


def local_false_sign_rate(mean: torch.Tensor, sd: torch.Tensor) -> torch.Tensor:
    """lfsr = min(P(effect >= 0), P(effect <= 0)) under a Gaussian marginal N(mean, sd^2)."""
    z = mean.abs() / sd.clamp_min(torch.finfo(sd.dtype).tiny)
    return 0.5 * torch.erfc(z / math.sqrt(2.0))


def _normal_cdf(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.erfc(-z / math.sqrt(2.0))


def adaptive_shrinkage(bhat: torch.Tensor, se: torch.Tensor, null_weight: float = 10.0, max_iter: int = 1000,
                       tol: float = 1e-10):
    """Empirical-Bayes shrinkage of estimates ``bhat`` with standard errors ``se`` (any shape; Stephens 2017).

    Prior g = pi_0 delta_0 + sum_j pi_j N(0, sigma_j^2) on a grid sigma_j = sigma_min sqrt(2)^j up to
    2 sqrt(max(bhat^2 - se^2)) (as ``ashr``); pi by EM on the marginal likelihood N(bhat; 0, se^2 + sigma_j^2) with a
    null-biased Dirichlet prior (``null_weight`` on pi_0). Returns (posterior mean, posterior sd, lfsr, pi, sigma):
    the lfsr is min(P(beta >= 0), P(beta <= 0)), the point mass at zero counting on both sides."""
    b, s = bhat.reshape(-1).double(), se.reshape(-1).double().clamp_min(1e-300)
    s_min = float(s.min()) / 10.0
    s_max = 2.0 * math.sqrt(max(float((b * b - s * s).max()), 0.0) + s_min**2)
    n_grid = max(int(math.ceil(math.log(s_max / s_min) / math.log(math.sqrt(2.0)))) + 1, 2)
    sigma = torch.cat([torch.zeros(1, dtype=b.dtype), s_min * math.sqrt(2.0) ** torch.arange(n_grid, dtype=b.dtype)])
    var = s[:, None] ** 2 + sigma[None, :] ** 2                               # n x (J + 1)
    log_lik = -0.5 * (_LOG_2PI + torch.log(var) + b[:, None] ** 2 / var)
    log_lik = log_lik - log_lik.max(1, keepdim=True).values
    lik = torch.exp(log_lik)
    alpha = torch.ones_like(sigma)
    alpha[0] = null_weight
    pi = torch.full_like(sigma, 1.0 / sigma.numel())
    for _ in range(max_iter):
        w = lik * pi
        w = w / w.sum(1, keepdim=True)
        new = (w.sum(0) + alpha - 1).clamp_min(0)
        new = new / new.sum()
        done = float((new - pi).abs().max()) < tol
        pi = new
        if done:
            break
    w = lik * pi
    w = w / w.sum(1, keepdim=True)
    shrink = sigma[None, :] ** 2 / var                                         # sigma_j^2 / (s^2 + sigma_j^2)
    m_j, v_j = shrink * b[:, None], shrink * s[:, None] ** 2
    mean = (w * m_j).sum(1)
    sd = ((w * (v_j + m_j**2)).sum(1) - mean**2).clamp_min(0).sqrt()
    sd_j = v_j.sqrt().clamp_min(1e-300)
    above = w[:, 0] + (w[:, 1:] * _normal_cdf(m_j[:, 1:] / sd_j[:, 1:])).sum(1)   # P(beta >= 0)
    below = w[:, 0] + (w[:, 1:] * _normal_cdf(-m_j[:, 1:] / sd_j[:, 1:])).sum(1)  # P(beta <= 0)
    lfsr = torch.minimum(above, below).clamp(0, 1)
    shape = bhat.shape
    return (mean.reshape(shape).to(bhat.dtype), sd.reshape(shape).to(bhat.dtype), lfsr.reshape(shape).to(bhat.dtype),
            pi, sigma)


class ProgramEffects:
    """q(c, beta) and the horseshoe scales of the intervention effects (see the module docstring).

    ``groups``: each cell's level code (N, long), 0 for the reference and 1..L for the other levels."""

    def __init__(self, groups: torch.Tensor, n_levels: int, n_factors: int, blocked: bool = True,
                 dtype=torch.float32, device=None):
        L, K = int(n_levels), int(n_factors)
        if L < 1:
            raise ValueError("interventions need at least one level besides the reference")
        self.L, self.K, self.blocked = L, K, bool(blocked)
        self.groups = groups.to(device=device, dtype=torch.long)
        counts = torch.bincount(self.groups, minlength=L + 1)
        if int(counts.min()) == 0:
            raise ValueError("every intervention level, the reference included, needs cells")
        self.n = counts.to(dtype)
        kw = dict(dtype=dtype, device=device)
        self.mean = torch.zeros(L + 1, K, **kw)                  # E[m_g]: the reference (g = 0), then each level
        self.cov = torch.zeros(L + 1, K, K, **kw)                # Cov(m_g)
        self.beta = torch.zeros(L, K, **kw)                      # E[beta]
        self.beta_cov = torch.zeros(L, K, K, **kw)               # Cov(beta_l)
        self.c2 = torch.zeros((), **kw)                          # E|c|^2
        self.logdet_P = torch.zeros((), **kw)                    # log det of q(theta)'s precision
        self.J = torch.zeros(K, K, **kw)                         # x_n = a_n + J m_n + eps at the last update
        self.Sigma_x = torch.zeros(K, K, **kw)
        self.rows = None                                         # the rows of the last update (``robust_sd``)

    # ------------------------------------------------------------------ pieces
    def group_sums(self, rows: torch.Tensor) -> torch.Tensor:
        """(L+1) x P sums of ``rows`` (N x P) over each level's cells."""
        out = torch.zeros(self.L + 1, rows.shape[1], dtype=rows.dtype, device=rows.device)
        return out.index_add(0, self.groups, rows)

    def prior_precision(self) -> torch.Tensor:
        """L x K: the prior precision of each effect (1: beta_lk ~ N(0, 1))."""
        return torch.ones(self.L, self.K, dtype=self.n.dtype, device=self.n.device)

    def cell_means(self) -> torch.Tensor:
        """N x K: E[m_n] of every cell."""
        return self.mean[self.groups]

    # ------------------------------------------------------------------ updates
    def update(self, rows: torch.Tensor, Sigma_x: torch.Tensor) -> None:
        """q(theta) from the cells' rows u_n (N x K; ``Sigma_x h_n`` blocked, ``E[x_n]`` mean-field), which enter
        through each level's sums (the rows are kept for :meth:`robust_sd`). Sets the coupling J of q(X, theta)
        (the factors' means then follow as ``u_n + J E[m_n]`` blocked)."""
        self.rows = rows
        u_sums = self.group_sums(rows)
        K, dt = self.K, Sigma_x.dtype
        eye = torch.eye(K, dtype=dt, device=Sigma_x.device)
        Sigma_x = 0.5 * (Sigma_x + Sigma_x.T)
        R = eye - Sigma_x if self.blocked else eye
        n = self.n
        # beta_l's own block n_l R + D_l, and the Schur complement of c
        P = n[1:, None, None] * R + torch.diag_embed(self.prior_precision())
        H, logdet_H = batched_inverse(P)                                 # (n_l R + D_l)^-1
        X = H @ (n[1:, None, None] * R)                                  # H_l n_l R
        Sc = n.sum() * R + eye - ((n[1:, None, None] * R) @ X).sum(0)    # N R + I - sum_l n_l^2 R H_l R
        Cc, logdet_Cc = batched_inverse(0.5 * (Sc + Sc.T)[None])
        Cc = Cc[0]
        s = u_sums
        rhs_c = s.sum(0) - (X.transpose(1, 2) @ s[1:, :, None]).squeeze(-1).sum(0)
        m_c = Cc @ rhs_c
        beta = (H @ (s[1:] - n[1:, None] * (m_c @ R))[:, :, None]).squeeze(-1)
        IX = eye - X
        self._solve = (H, X, Cc)
        self.beta = beta
        self.beta_cov = H + X @ Cc @ X.transpose(1, 2)
        self.mean = torch.cat([m_c[None, :], m_c[None, :] + beta], 0)
        self.cov = torch.cat([Cc[None], H + IX @ Cc @ IX.transpose(1, 2)], 0)
        self.c2 = (m_c * m_c).sum() + torch.trace(Cc)
        self.logdet_P = -(logdet_H.sum() + logdet_Cc[0])
        self.J = Sigma_x if self.blocked else torch.zeros_like(Sigma_x)
        self.Sigma_x = Sigma_x

    # ------------------------------------------------------------------ what the factor model needs
    def x_covariance_sum(self) -> torch.Tensor:
        """sum_n Cov(x_n) - N Sigma_x = sum_g n_g J V_g J^T (K x K): the factors' extra spread from q(theta)."""
        JV = self.J @ self.cov @ self.J.T
        return (self.n[:, None, None] * JV).sum(0)

    def prior_misfit(self, mu: torch.Tensor) -> torch.Tensor:
        """sum_n E|x_n - m_n|^2 - N tr Sigma_x: |E x_n - E m_n|^2 over the cells, plus q(theta)'s spread."""
        I_J = torch.eye(self.K, dtype=mu.dtype, device=mu.device) - self.J
        spread = torch.diagonal(I_J @ self.cov @ I_J.T, dim1=1, dim2=2).sum(1)
        return ((mu - self.cell_means()) ** 2).sum() + (self.n * spread).sum()

    def elbo(self) -> torch.Tensor:
        """E[log p(c)] + E[log p(beta)] + H[q(theta)]."""
        K, L = self.K, self.L
        Eb2 = self.beta * self.beta + torch.diagonal(self.beta_cov, dim1=1, dim2=2)
        priors = -0.5 * ((L + 1) * K * _LOG_2PI + self.c2 + Eb2.sum())
        entropy = 0.5 * ((L + 1) * K * (1 + _LOG_2PI) - self.logdet_P)
        return priors + entropy

    # ------------------------------------------------------------------ results
    def robust_sd(self) -> torch.Tensor:
        """L x K: the sd of E[beta] from the spread of the cells' rows within each level (a sandwich estimate).

        E[beta_l] is linear in the levels' sums s_g of the rows: ``beta_l = H_l s_l - X_l C_c (s_0 + sum_m
        (I - X_m^T) s_m)`` (``update``). Each s_g is a sum of n_g independent cells, so Cov(s_g) = n_g S_g with S_g
        the rows' covariance within level g, estimated from the data instead of taken from the model (under the
        model, S_g = R and this is q's own covariance, less the prior's share). Factor scores are rarely Gaussian
        within a level: one rare cell with a score of 30 among 30 cells moves their mean by 1, which q, with its
        N(m, I) prior, reads as a certain effect, and this sd does not. A level of one cell has no spread to
        read (nor has any level, when the reference has one cell): its sd is NaN, not a guess."""
        H, X, Cc = self._solve
        K, dt, dev = self.K, self.rows.dtype, self.rows.device
        eye = torch.eye(K, dtype=dt, device=dev)
        order = torch.argsort(self.groups, stable=True)
        sizes = self.n.long().tolist()
        C = torch.zeros(self.L + 1, K, K, dtype=dt, device=dev)       # Cov(s_g) = n_g S_g
        for g, cells in enumerate(torch.split(order, sizes)):
            if sizes[g] > 1:
                d = self.rows[cells] - self.rows[cells].mean(0)
                C[g] = d.T @ d * (sizes[g] / (sizes[g] - 1))
        Y = torch.cat([eye[None], eye - X.transpose(1, 2)], 0)          # s_g's coefficient in C_c's right-hand side
        M = (Y @ C @ Y.transpose(1, 2)).sum(0)
        XC = X @ Cc
        HCY = H @ C[1:] @ Y[1:].transpose(1, 2) @ XC.transpose(1, 2)
        V = H @ C[1:] @ H - HCY - HCY.transpose(1, 2) + XC @ M @ XC.transpose(1, 2)
        sd = torch.diagonal(V, dim1=1, dim2=2).clamp_min(0).sqrt()
        single = (self.n[1:] < 2) | (self.n[0] < 2)
        return sd.masked_fill(single[:, None], float("nan"))

    def effects(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(E[beta], sd), each L x K: the effects' likelihood summaries for the shrinkage. The sd is the larger of
        q's and :meth:`robust_sd`: no more certain than the model, nor than the cells' own spread says (NaN for
        a level of one cell)."""
        model_sd = torch.diagonal(self.beta_cov, dim1=1, dim2=2).clamp_min(0).sqrt()
        return self.beta, torch.maximum(model_sd, self.robust_sd())  # NaN wins

    def shrunk(self):
        """The effects after adaptive shrinkage (:func:`adaptive_shrinkage`): (mean, sd, lfsr), each L x K. The
        effects with no sd (levels of one cell) take no part in the shrinkage and keep E[beta], with sd and lfsr
        NaN."""
        beta, sd = self.effects()
        known = torch.isfinite(sd)
        mean, out_sd, lfsr = beta.clone(), torch.full_like(sd, float("nan")), torch.full_like(sd, float("nan"))
        if bool(known.any()):
            mean[known], out_sd[known], lfsr[known], _, _ = adaptive_shrinkage(beta[known], sd[known])
        return mean, out_sd, lfsr


def group_effects(u: torch.Tensor, Sigma_x: torch.Tensor, codes: torch.Tensor, n_levels: int) -> ProgramEffects:
    """q(c, beta) of groups of cells with the global factors held fixed (blocked; ``u``: N x K rows Sigma_x h_n)."""
    effects = ProgramEffects(codes, n_levels, u.shape[1], blocked=True, dtype=u.dtype, device=u.device)
    effects.update(u, Sigma_x)
    return effects
