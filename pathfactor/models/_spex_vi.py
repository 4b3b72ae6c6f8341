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
    """The variational state and its updates. ``Y`` (N x G) and ``Z`` (N x C) are centred tensors.

    ``batch_size=None`` runs exact coordinate ascent (one batch, step 1). With a batch size, each epoch visits
    the cells in random minibatches: the batch's factors are updated exactly (local step), then the global
    factors take a natural-gradient step of size ``rho_t = (t + 1)^-forget`` towards the update that the batch,
    scaled up to N cells, implies (stochastic VI, Hoffman et al. 2013).
    """

    checkpoint_exclude = ("Y", "Z")  # the data: not part of a checkpoint

    def __init__(self, Y: torch.Tensor, Z: torch.Tensor, s: torch.Tensor, X0: torch.Tensor,
                 slab_confidence: float = 0.5, noise_prior: tuple[float, float] = (1.0, 0.01),
                 tau: float | None = None, free_start: bool = True, batch_size: int | None = None,
                 forget: float = 0.7, generator: torch.Generator | None = None, posterior: str = "blocked"):
        self.Y, self.Z = Y, Z
        self.N, self.G = Y.shape
        self.K, self.C = s.shape[1], Z.shape[1]
        self.D = self.K + self.C
        self.batch_size = None if batch_size is None or batch_size >= self.N else int(batch_size)
        if posterior not in ("blocked", "mean-field"):
            raise ValueError(f"posterior must be 'blocked' or 'mean-field', got {posterior!r}")
        if posterior == "mean-field" and self.batch_size is not None:
            raise ValueError("the mean-field posterior q(W) q(B) is only implemented for full batches (batch_size=None)")
        self.mean_field = posterior == "mean-field"
        self.forget, self.generator, self.t = float(forget), generator, 0
        dt, dev = Y.dtype, Y.device
        self._eye_K = torch.eye(self.K, dtype=dt, device=dev)
        var = ((Y * Y).sum(0) / self.N).mean().clamp_min(1e-12)
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
        yy = (Y * Y).sum(0)
        self.sigma2 = InverseGamma(torch.full((self.G,), self.a0 + 0.5 * self.N, dtype=dt, device=dev),
                                   (yy / self.N).clamp_min(1e-6 * float(var)) * (self.a0 + 0.5 * self.N))
        stats = self._stats(slice(None), self.mu)
        self._update_loadings(stats, rho=1.0)
        self._update_noise_and_priors(stats, rho=1.0)

    # ----------------------------------------------------------------------------------------- pieces
    @property
    def psi(self) -> torch.Tensor:
        """E[1 / sigma2_g]."""
        return self.sigma2.mean_inv

    def prior_precision(self) -> torch.Tensor:
        """G x D prior precision of (w_g, b_g): E[1/tau^2] E[1/lam^2] + E[1/c^2] (seed 002 eq. 5), then 1 for B."""
        prec_w = self.tau.mean_inv[None, :] * self.lam.mean_inv + self.slab.mean_inv
        return torch.cat([prec_w, torch.ones(self.G, self.C, dtype=prec_w.dtype, device=prec_w.device)], dim=1)

    def _stats(self, cells, mu: torch.Tensor) -> dict[str, torch.Tensor]:
        """Sufficient statistics of a batch of cells, scaled up to N cells: E[F]^T Y (D x G), E[F^T F] (D x D),
        sum_n y_ng^2 (G) and sum_n |mu_n|^2, for F = [X, Z]."""
        Y, Z = self.Y[cells], self.Z[cells]
        n = Y.shape[0]
        scale = self.N / n
        XtZ = mu.T @ Z
        A = torch.cat([torch.cat([mu.T @ mu + n * self.Sigma_x, XtZ], 1), torch.cat([XtZ.T, Z.T @ Z], 1)], 0)
        return {"FtY": scale * torch.cat([mu.T @ Y, Z.T @ Y], 0), "A": scale * A,
                "yy": scale * (Y * Y).sum(0), "mu2": scale * (mu * mu).sum()}

    # ----------------------------------------------------------------------------------------- updates
    def _local_factors(self, cells) -> torch.Tensor:
        """q(x_n) = N(mu_n, Sigma_x), Sigma_x = (I + sum_g psi_g E[w_g w_g^T])^-1,
        mu_n = Sigma_x (sum_g psi_g (E[w_g] y_ng - E[w_g b_g^T] z_n))."""
        Q, K = self.second_moment(), self.K
        Sigma_x = torch.linalg.inv(self._eye_K + Q[:K, :K])
        self.Sigma_x = 0.5 * (Sigma_x + Sigma_x.T)
        return (self.Y[cells] @ (self.M[:, :K] * self.psi[:, None]) - self.Z[cells] @ Q[K:, :K]) @ self.Sigma_x

    def _update_loadings(self, stats: dict[str, torch.Tensor], rho: float) -> None:
        """q(w_g, b_g) = N(m_g, S_g) with natural parameters S_g^-1 = psi_g E[F^T F] + diag(prior precision) and
        S_g^-1 m_g = psi_g E[F]^T y_g, moved a step ``rho`` towards the batch's values (rho = 1: exact CAVI)."""
        if self.mean_field and self.C:
            return self._update_loadings_mean_field(stats)
        psi, prec, A = self.psi, self.prior_precision(), stats["A"]
        P = psi[:, None, None] * A + torch.diag_embed(prec)
        h = psi[:, None] * stats["FtY"].T
        if rho < 1.0:
            P, h = (1 - rho) * self._P + rho * P, (1 - rho) * self._h + rho * h
        self.M, Linv, logdet = self._gaussian(P, h)
        self._set_covariance(Linv, logdet)
        self._P, self._h = P, h

    def _update_loadings_mean_field(self, stats: dict[str, torch.Tensor]) -> None:
        """The factorised alternative q(w_g) q(b_g) (MuVI's): q(w_g) given E[b_g], then q(b_g) given E[w_g]."""
        K, psi, prec, A, FtY = self.K, self.psi, self.prior_precision(), stats["A"], stats["FtY"].T
        M = self.M.clone() if hasattr(self, "M") else torch.zeros(self.G, self.D, dtype=A.dtype, device=A.device)
        blocks = []
        for own, other in ((slice(0, K), slice(K, None)), (slice(K, None), slice(0, K))):
            P = psi[:, None, None] * A[own, own] + torch.diag_embed(prec[:, own])
            h = psi[:, None] * (FtY[:, own] - M[:, other] @ A[other, own])
            M[:, own], Linv, logdet = self._gaussian(P, h)
            blocks.append((Linv, logdet))
        self.M = M
        self._set_covariance(_block_diagonal(blocks[0][0], blocks[1][0]), blocks[0][1] + blocks[1][1])

    def _gaussian(self, P: torch.Tensor, h: torch.Tensor):
        """Mean P^-1 h, inverse Cholesky factor and log det P^-1 of a batch of Gaussians in natural form."""
        L, info = torch.linalg.cholesky_ex(P)
        if int(info.max()) > 0:  # numerically indefinite: add jitter and retry once
            eye = torch.eye(P.shape[-1], dtype=P.dtype, device=P.device)
            L = torch.linalg.cholesky(P + 1e-6 * P.diagonal(dim1=1, dim2=2).mean() * eye)
        mean = torch.cholesky_solve(h.unsqueeze(-1), L).squeeze(-1)
        eye = torch.eye(P.shape[-1], dtype=P.dtype, device=P.device)
        Linv = torch.linalg.solve_triangular(L, eye.expand_as(L), upper=False)
        return mean, Linv, -2.0 * torch.log(torch.diagonal(L, dim1=1, dim2=2)).sum(1)

    def _set_covariance(self, Linv: torch.Tensor, logdet: torch.Tensor) -> None:
        self._Linv, self.logdet_S = Linv, logdet
        self.S_diag = (Linv * Linv).sum(1)                      # diag(S_g), S_g = Linv^T Linv

    def _update_noise_and_priors(self, stats: dict[str, torch.Tensor], rho: float) -> None:
        """q(sigma2_g) (a step ``rho`` in its rate), then q(lam), q(tau), q(c) given q(W)."""
        M, A, FtY = self.M, stats["A"], stats["FtY"]
        if rho == 1.0:  # tr(A S_g) = (D - sum_k prec_gk S_g,kk) / psi_g, because psi_g A = S_g^-1 - diag(prec_g)
            tr_AS = (self.D - (self.prior_precision() * self.S_diag).sum(1)) / self.psi
        else:  # a blended S_g^-1 has no such form: sum_ij A_ij S_g,ij with S_g = Linv^T Linv
            tr_AS = ((self._Linv @ A) * self._Linv).sum((1, 2))
        self.sq_resid = (stats["yy"] - 2 * (M * FtY.T).sum(1) + ((M @ A) * M).sum(1) + tr_AS).clamp_min(0)
        self.sigma2.rate = (1 - rho) * self.sigma2.rate + rho * (self.b0 + 0.5 * self.sq_resid)
        Ew2 = (M * M + self.S_diag)[:, : self.K]
        self.lam.update(0.5 * Ew2 * self.tau.mean_inv[None, :])
        self.tau.update(0.5 * (Ew2 * self.lam.mean_inv).sum(0))
        self.slab.update(Ew2)
        self._mu2 = stats["mu2"]

    def second_moment(self) -> torch.Tensor:
        """Q = sum_g psi_g E[(w_g, b_g)(w_g, b_g)^T] (D x D)."""
        psi, M = self.psi, self.M
        R = (self._Linv * psi.sqrt()[:, None, None]).reshape(-1, self.D)
        return (M * psi[:, None]).T @ M + R.T @ R

    def _batches(self):
        if self.batch_size is None:
            return [slice(None)]
        order = torch.randperm(self.N, generator=self.generator).to(self.Y.device)
        return list(order.split(self.batch_size))

    def epoch(self) -> float:
        """One pass: per batch, the factors X, then a step for (W, B), sigma2, lam, tau, c. Returns the ELBO
        (exact for full batches; for minibatches the mean of the batches' unbiased estimates)."""
        elbos = []
        for cells in self._batches():
            mu = self._local_factors(cells)
            rho = 1.0 if self.batch_size is None else (self.t + 1.0) ** -self.forget
            stats = self._stats(cells, mu)
            self._update_loadings(stats, rho)
            self._update_noise_and_priors(stats, rho)
            if self.batch_size is None:
                self.mu = mu
            self.t += 1
            elbos.append(float(self.elbo()))
        return sum(elbos) / len(elbos)

    def scores(self) -> torch.Tensor:
        """Posterior means of the factors of all cells under the current global factors."""
        if self.batch_size is None:
            return self.mu
        return torch.cat([self._local_factors(cells) for cells in torch.arange(self.N).split(self.batch_size)])

    # ----------------------------------------------------------------------------------------- ELBO
    def elbo(self) -> torch.Tensor:
        """ELBO at the current state (seed 002's objective); uses the last batch's scaled statistics."""
        N, K, G = self.N, self.K, self.G
        s2 = self.sigma2
        lik = -0.5 * (N * (_LOG_2PI + s2.mean_log) + s2.mean_inv * self.sq_resid).sum()
        logdet_Sx = torch.logdet(self.Sigma_x)
        x_term = 0.5 * (N * K + N * logdet_Sx - N * torch.trace(self.Sigma_x) - self._mu2)
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
    def covariance(self) -> torch.Tensor:
        """Full posterior covariances S_g of (w_g, b_g), G x D x D."""
        return self._Linv.transpose(1, 2) @ self._Linv

    def loadings_sd(self) -> torch.Tensor:
        return self.S_diag.sqrt()


def _block_diagonal(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Batched block-diagonal matrices [[A, 0], [0, B]]."""
    G, k, c = A.shape[0], A.shape[1], B.shape[1]
    out = A.new_zeros(G, k + c, k + c)
    out[:, :k, :k], out[:, k:, k:] = A, B
    return out
