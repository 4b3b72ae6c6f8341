"""Interventions acting on programs: each cell's factors are centred on its intervention level's effects.

Model (seed 000's interventions on the latent factors; the form of GSFA's ``Z = G beta + Phi``)::

    x_n ~ N(m_n, I_K),   m_n = c + beta^T t_n,   c ~ N(0, I_K),
    beta_lk ~ N(0, tau_l^2 lam_lk^2),   lam_lk ~ C+(0, 1),   tau_l ~ C+(0, 1)

``t_n`` is the one-hot code of cell n's level (all zeros at the reference level), ``c`` the reference cells' mean
factor values and ``beta_l`` (K) level l's effect on every factor against the reference, in units of the factors'
within-level sd. The horseshoe lets each level move a few programs and a level without effect none.

Posterior. q(theta), theta = (c, beta_1 .. beta_L), is one joint Gaussian; the scales have the inverse-gamma
factors of ``pathfactor.priors``. Given q(W, B) and q(sigma2), the likelihood of x_n is Gaussian with precision
Gamma = sum_g psi_g E[w_g w_g^T]; with Sigma_x = (I + Gamma)^-1 and h_n the likelihood's linear term:

* ``blocked=True`` (default): the joint q(X, theta) that is optimal in that block, q(x_n | theta) =
  N(Sigma_x (h_n + m_n), Sigma_x) and q(theta) its exact marginal, found by integrating X out:
  ``log q(theta) = log p(theta) + sum_n (-1/2 m_n^T R m_n + m_n^T u_n)`` with ``R = I - Sigma_x`` and
  ``u_n = Sigma_x h_n``. A factor the data pin down weakly (Sigma_x near I) then tells little about its effects;
* ``blocked=False``: q(X) q(theta) apart, ``R = I`` and ``u_n = E[x_n]``: the factor scores taken as data, as a
  regression of point estimates would, which overstates the effects' precision for weakly determined factors.

The precision of theta is an arrow: every beta_l couples to c only (``n_l R`` off the diagonal, ``n_l R + D_l`` on
it, D_l = diag E[1/(tau_l^2 lam_lk^2)]), so it is solved through the Schur complement of c, in O(L K^3).

For the ELBO, x_n = a_n + J m_n + eps (J = Sigma_x blocked, 0 mean-field; eps ~ N(0, Sigma_x)), so
E|x_n - m_n|^2 = |E x_n - E m_n|^2 + tr Sigma_x + tr((I - J) V_g (I - J)^T) and Cov(x_n) = Sigma_x + J V_g J^T
(V_g = Cov(m_g)), with J and Sigma_x those of the last update of q(X, theta).
"""
from __future__ import annotations

import math

import torch

from ..priors import HalfCauchy, gaussian_prior_terms

_LOG_2PI = math.log(2 * math.pi)

__all__ = ["ProgramEffects", "local_false_sign_rate", "group_effects"]


def local_false_sign_rate(mean: torch.Tensor, sd: torch.Tensor) -> torch.Tensor:
    """lfsr = min(P(effect >= 0), P(effect <= 0)) under a Gaussian marginal N(mean, sd^2) (Stephens 2017)."""
    z = mean.abs() / sd.clamp_min(torch.finfo(sd.dtype).tiny)
    return 0.5 * torch.erfc(z / math.sqrt(2.0))


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
        self.lam = HalfCauchy((L, K), **kw)
        self.tau = HalfCauchy((L,), count=K, **kw)
        self.mean = torch.zeros(L + 1, K, **kw)                  # E[m_g]: the reference (g = 0), then each level
        self.cov = torch.zeros(L + 1, K, K, **kw)                # Cov(m_g)
        self.beta = torch.zeros(L, K, **kw)                      # E[beta]
        self.beta_cov = torch.zeros(L, K, K, **kw)               # Cov(beta_l)
        self.c2 = torch.zeros((), **kw)                          # E|c|^2
        self.logdet_P = torch.zeros((), **kw)                    # log det of q(theta)'s precision
        self.J = torch.zeros(K, K, **kw)                         # x_n = a_n + J m_n + eps at the last update
        self.Sigma_x = torch.zeros(K, K, **kw)

    # ------------------------------------------------------------------ pieces
    def group_sums(self, rows: torch.Tensor) -> torch.Tensor:
        """(L+1) x P sums of ``rows`` (N x P) over each level's cells."""
        out = torch.zeros(self.L + 1, rows.shape[1], dtype=rows.dtype, device=rows.device)
        return out.index_add(0, self.groups, rows)

    def prior_precision(self) -> torch.Tensor:
        """L x K: E[1 / (tau_l^2 lam_lk^2)]."""
        return self.tau.mean_inv[:, None] * self.lam.mean_inv

    def cell_means(self) -> torch.Tensor:
        """N x K: E[m_n] of every cell."""
        return self.mean[self.groups]

    # ------------------------------------------------------------------ updates
    def update(self, u_sums: torch.Tensor, Sigma_x: torch.Tensor) -> None:
        """q(theta) from each level's sums of u_n ((L+1) x K; ``Sigma_x h_n`` blocked, ``E[x_n]`` mean-field), then
        q(lam), q(tau). Sets the coupling J of q(X, theta) (the factors' means then follow as
        ``u_n + J E[m_n]`` blocked)."""
        K, L, dt = self.K, self.L, Sigma_x.dtype
        eye = torch.eye(K, dtype=dt, device=Sigma_x.device)
        Sigma_x = 0.5 * (Sigma_x + Sigma_x.T)
        R = eye - Sigma_x if self.blocked else eye
        n = self.n
        # beta_l's own block n_l R + D_l, and the Schur complement of c
        P = n[1:, None, None] * R + torch.diag_embed(self.prior_precision())
        Lc, logdet_blocks = _cholesky(P)
        H = torch.cholesky_inverse(Lc)                                   # (n_l R + D_l)^-1
        X = H @ (n[1:, None, None] * R)                                  # H_l n_l R
        Sc = n.sum() * R + eye - ((n[1:, None, None] * R) @ X).sum(0)    # N R + I - sum_l n_l^2 R H_l R
        Lsc, logdet_c = _cholesky(0.5 * (Sc + Sc.T))
        Cc = torch.cholesky_inverse(Lsc)
        s = u_sums
        rhs_c = s.sum(0) - (X.transpose(1, 2) @ s[1:, :, None]).squeeze(-1).sum(0)
        m_c = Cc @ rhs_c
        beta = (H @ (s[1:] - n[1:, None] * (m_c @ R))[:, :, None]).squeeze(-1)
        IX = eye - X
        self.beta = beta
        self.beta_cov = H + X @ Cc @ X.transpose(1, 2)
        self.mean = torch.cat([m_c[None, :], m_c[None, :] + beta], 0)
        self.cov = torch.cat([Cc[None], H + IX @ Cc @ IX.transpose(1, 2)], 0)
        self.c2 = (m_c * m_c).sum() + torch.trace(Cc)
        self.logdet_P = logdet_blocks.sum() + logdet_c
        self.J = Sigma_x if self.blocked else torch.zeros_like(Sigma_x)
        self.Sigma_x = Sigma_x
        Eb2 = beta * beta + torch.diagonal(self.beta_cov, dim1=1, dim2=2)
        self.lam.update(0.5 * Eb2 * self.tau.mean_inv[:, None])
        self.tau.update(0.5 * (Eb2 * self.lam.mean_inv).sum(1))

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
        """E[log p(c)] + E[log p(beta | tau, lam)] + H[q(theta)] + the scales' own terms."""
        K, L = self.K, self.L
        Eb2 = self.beta * self.beta + torch.diagonal(self.beta_cov, dim1=1, dim2=2)
        log_scale = self.tau.scale2.mean_log[:, None] + self.lam.scale2.mean_log
        beta_prior = gaussian_prior_terms(Eb2, self.prior_precision(), log_scale)
        c_prior = -0.5 * (K * _LOG_2PI + self.c2)
        entropy = 0.5 * ((L + 1) * K * (1 + _LOG_2PI) - self.logdet_P)
        return beta_prior + c_prior + entropy + self.lam.elbo() + self.tau.elbo()

    # ------------------------------------------------------------------ results
    def effects(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(E[beta], sd[beta]), each L x K."""
        return self.beta, torch.diagonal(self.beta_cov, dim1=1, dim2=2).clamp_min(0).sqrt()


def group_effects(u: torch.Tensor, Sigma_x: torch.Tensor, codes: torch.Tensor, n_levels: int,
                  max_iter: int = 1000, tol: float = 1e-7) -> ProgramEffects:
    """q(c, beta) of groups of cells with the global factors held fixed (blocked; ``u``: N x K rows Sigma_x h_n),
    iterated with the horseshoe scales until the effects change by less than ``tol`` (factor sd units)."""
    effects = ProgramEffects(codes, n_levels, u.shape[1], blocked=True, dtype=u.dtype, device=u.device)
    sums = effects.group_sums(u)
    for _ in range(max_iter):
        before = effects.beta
        effects.update(sums, Sigma_x)
        if float((effects.beta - before).abs().max()) < tol:
            break
    return effects


def _cholesky(P: torch.Tensor):
    """Cholesky factors of (a batch of) positive definite matrices and their log determinants."""
    L, info = torch.linalg.cholesky_ex(P)
    if int(info.max()) > 0:
        eye = torch.eye(P.shape[-1], dtype=P.dtype, device=P.device)
        L = torch.linalg.cholesky(P + 1e-6 * P.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None] * eye)
    return L, 2.0 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
