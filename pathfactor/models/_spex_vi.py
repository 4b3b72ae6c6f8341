"""Closed-form variational inference for the spex-LVM factor model (seed 002).

Model (seed 002, eqs. 2-5; covariates as in seed 000)::

    y_n = W x_n + B z_n + eps_n,   eps_n ~ N(0, diag(sigma2)),   x_n ~ N(0, I_K),   b_gc ~ N(0, 1)
    w_gk ~ N(0, tau_k^2 lam_gk^2) N(0, c_gk^2)          (regularised horseshoe, product form)
    lam_gk ~ C+(0, 1), c_gk^2 ~ IG(alpha, alpha s_gk^2),   sigma2_g ~ IG(a0, b0)
    tau_k fixed (default) or tau_k ~ C+(0, 1)

One global scale per factor: learned by mean-field VI it collapses onto the width of the out-of-set slab (most
of a factor's genes lie outside its gene set), which then prunes real but weak programs (on the mESC data every
Hallmark factor but G2M). Held fixed at the data's scale, the local scales and slabs alone decide sparsity.

Mean-field family q(X) q(W, B) q(sigma2) q(lam) q(tau) q(c) with

* q(x_n) = N(mu_n, Sigma_x), one K x K covariance shared by all cells;
* q(w_g, b_g) = N(m_g, S_g), a full (K+C) x (K+C) Gaussian per gene: the *blocked* joint posterior of the
  loadings and the covariate effects (seed 000), computed for all genes at once by a batched Cholesky;
* inverse-gamma factors for every variance (see ``pathfactor.priors``).

Each update maximises the ELBO in its block, so the ELBO rises monotonically; one iteration costs two
N x G x K matrix products plus a batched Cholesky of G (K+C) x (K+C) matrices. The updates read the data only
through the sufficient statistics ``E[F]^T Y``, ``E[F^T F]`` and ``sum_n y_ng^2`` with F = [X, Z], so the same
code serves minibatches (stochastic VI with natural-gradient steps, Hoffman et al. 2013).
"""
from __future__ import annotations

import math

import torch

from ..priors import FixedScale, HalfCauchy, InverseGamma, RandomSlab, gaussian_prior_terms

_LOG_2PI = math.log(2 * math.pi)


class SpexVI:
    """The variational state and its updates. ``Y`` (N x G) and ``Z`` (N x C) are centred tensors."""

    def __init__(self, Y: torch.Tensor, Z: torch.Tensor, s: torch.Tensor, X0: torch.Tensor,
                 slab_confidence: float = 0.5, noise_prior: tuple[float, float] = (1.0, 0.01),
                 tau: float | None = None, free_start: bool = True):
        self.Y, self.Z = Y, Z
        self.N, self.G = Y.shape
        self.K, self.C = s.shape[1], Z.shape[1]
        self.D = self.K + self.C
        dt, dev = Y.dtype, Y.device
        self._eye_K = torch.eye(self.K, dtype=dt, device=dev)
        self._eye_D = torch.eye(self.D, dtype=dt, device=dev)
        # sufficient statistics of the data that never change
        self.yy = (Y * Y).sum(0)
        self.ZtY = Z.T @ Y
        self.ZtZ = Z.T @ Z
        var = (self.yy / self.N).mean().clamp_min(1e-12)
        self.a0, self.b0 = float(noise_prior[0]), float(noise_prior[1]) * float(var)
        # q(X): point initialisation, no covariance yet
        self.mu = X0.to(dt)
        self.Sigma_x = torch.zeros(self.K, self.K, dtype=dt, device=dev)
        # priors and q(sigma2)
        self.lam = HalfCauchy((self.G, self.K), dtype=dt, device=dev)
        self.tau = (HalfCauchy((self.K,), count=self.G, dtype=dt, device=dev) if tau is None
                    else FixedScale((self.K,), tau, dtype=dt, device=dev))
        self.slab = RandomSlab(s.to(dt), alpha=slab_confidence)
        if free_start:  # first loadings under the widest slab everywhere: the data, not the start, decide gains
            self.slab.q.rate = torch.full_like(self.slab.q.rate, float(self.slab.rate0.max()))
        self.sigma2 = InverseGamma(torch.full((self.G,), self.a0 + 0.5 * self.N, dtype=dt, device=dev),
                                   (self.yy / self.N).clamp_min(1e-6 * float(var)) * (self.a0 + 0.5 * self.N))
        self._update_loadings()
        self._update_noise_and_priors()

    # ----------------------------------------------------------------------------------------- pieces
    @property
    def psi(self) -> torch.Tensor:
        """E[1 / sigma2_g]."""
        return self.sigma2.mean_inv

    def prior_precision(self) -> torch.Tensor:
        """G x D prior precision of (w_g, b_g): E[1/tau^2] E[1/lam^2] + E[1/c^2] (seed 002 eq. 5), then 1 for B."""
        prec_w = self.tau.mean_inv[None, :] * self.lam.mean_inv + self.slab.mean_inv
        return torch.cat([prec_w, torch.ones(self.G, self.C, dtype=prec_w.dtype, device=prec_w.device)], dim=1)

    def _factor_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """E[F]^T Y (D x G) and E[F^T F] (D x D) for F = [X, Z]."""
        mu, Z = self.mu, self.Z
        FtY = torch.cat([mu.T @ self.Y, self.ZtY], dim=0)
        XtZ = mu.T @ Z
        A = torch.cat([torch.cat([mu.T @ mu + self.N * self.Sigma_x, XtZ], 1),
                       torch.cat([XtZ.T, self.ZtZ], 1)], 0)
        return FtY, A

    # ----------------------------------------------------------------------------------------- updates
    def _update_loadings(self) -> None:
        """q(w_g, b_g) = N(m_g, S_g), S_g^-1 = psi_g E[F^T F] + diag(prior precision), m_g = S_g psi_g E[F]^T y_g."""
        FtY, A = self._factor_stats()
        psi, prec = self.psi, self.prior_precision()
        P = psi[:, None, None] * A + torch.diag_embed(prec)
        L, info = torch.linalg.cholesky_ex(P)
        if int(info.max()) > 0:  # numerically indefinite: add jitter and retry once
            L = torch.linalg.cholesky(P + 1e-6 * P.diagonal(dim1=1, dim2=2).mean() * self._eye_D)
        r = (psi[:, None] * FtY.T).unsqueeze(-1)
        self.M = torch.cholesky_solve(r, L).squeeze(-1)
        Linv = torch.linalg.solve_triangular(L, self._eye_D.expand_as(L), upper=False)
        self.S_diag = (Linv * Linv).sum(1)                      # diag(S_g), S_g = Linv^T Linv
        self.logdet_S = -2.0 * torch.log(torch.diagonal(L, dim1=1, dim2=2)).sum(1)
        self._Linv, self._A, self._FtY, self._prec = Linv, A, FtY, prec

    def _update_noise_and_priors(self) -> None:
        """q(sigma2_g), then q(lam), q(tau), q(c) given q(W)."""
        M, A, FtY, psi_old = self.M, self._A, self._FtY, self.psi
        # tr(A S_g) = (D - sum_k prec_gk S_g,kk) / psi_g, because psi_g A = S_g^-1 - diag(prec_g)
        tr_AS = (self.D - (self._prec * self.S_diag).sum(1)) / psi_old
        self.sq_resid = (self.yy - 2 * (M * FtY.T).sum(1) + ((M @ A) * M).sum(1) + tr_AS).clamp_min(0)
        self.sigma2.rate = self.b0 + 0.5 * self.sq_resid
        Ew2 = (M * M + self.S_diag)[:, : self.K]
        self.lam.update(0.5 * Ew2 * self.tau.mean_inv[None, :])
        self.tau.update(0.5 * (Ew2 * self.lam.mean_inv).sum(0))
        self.slab.update(Ew2)

    def _update_factors(self) -> None:
        """q(x_n) = N(mu_n, Sigma_x), Sigma_x = (I + sum_g psi_g E[w_g w_g^T])^-1,
        mu_n = Sigma_x (sum_g psi_g (E[w_g] y_ng - E[w_g b_g^T] z_n))."""
        Q = self.second_moment()
        K = self.K
        self.Sigma_x = torch.linalg.inv(self._eye_K + Q[:K, :K])
        self.Sigma_x = 0.5 * (self.Sigma_x + self.Sigma_x.T)
        self.mu = (self.Y @ (self.M[:, :K] * self.psi[:, None]) - self.Z @ Q[K:, :K]) @ self.Sigma_x

    def second_moment(self) -> torch.Tensor:
        """Q = sum_g psi_g E[(w_g, b_g)(w_g, b_g)^T] (D x D)."""
        psi, M = self.psi, self.M
        R = (self._Linv * psi.sqrt()[:, None, None]).reshape(-1, self.D)
        return (M * psi[:, None]).T @ M + R.T @ R

    def epoch(self) -> float:
        """One CAVI sweep: X, then (W, B), sigma2, lam, tau, c. Returns the ELBO."""
        self._update_factors()
        self._update_loadings()
        self._update_noise_and_priors()
        return float(self.elbo())

    # ----------------------------------------------------------------------------------------- ELBO
    def elbo(self) -> torch.Tensor:
        N, K, G = self.N, self.K, self.G
        s2 = self.sigma2
        lik = -0.5 * (N * (_LOG_2PI + s2.mean_log) + s2.mean_inv * self.sq_resid).sum()
        logdet_Sx = torch.logdet(self.Sigma_x)
        x_term = 0.5 * (N * K + N * logdet_Sx - N * torch.trace(self.Sigma_x) - (self.mu * self.mu).sum())
        Ew2 = self.M * self.M + self.S_diag
        Ew2_W, Ew2_B = Ew2[:, :K], Ew2[:, K:]
        w_prior = gaussian_prior_terms(Ew2_W, self.tau.mean_inv[None, :] * self.lam.mean_inv,
                                       self.tau.scale2.mean_log[None, :] + self.lam.scale2.mean_log)
        w_prior = w_prior + gaussian_prior_terms(Ew2_W, self.slab.mean_inv, self.slab.q.mean_log)
        w_prior = w_prior + gaussian_prior_terms(Ew2_B, torch.ones_like(Ew2_B), torch.zeros_like(Ew2_B))
        w_entropy = 0.5 * (G * self.D * (1 + _LOG_2PI) + self.logdet_S.sum())
        noise = (s2.expected_log_prior(self.a0, self.b0) + s2.entropy()).sum()
        return lik + x_term + w_prior + w_entropy + noise + self.lam.elbo() + self.tau.elbo() + self.slab.elbo()

    # ----------------------------------------------------------------------------------------- results
    def loadings_sd(self) -> torch.Tensor:
        return self.S_diag.sqrt()
