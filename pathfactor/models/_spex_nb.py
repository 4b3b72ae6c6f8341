"""Closed-form variational inference for Spex on raw counts: a negative-binomial likelihood with a log link.

Model (seed 002's factor model, with counts in place of Gaussian data)::

    y_ng ~ NB(mean mu_ng, dispersion r_g),   log mu_ng = log l_n + beta_g + w_g^T x_n + b_g^T z_n
    x_n ~ N(0, I_K),   b_gc ~ N(0, 1),   w_gk: the regularised horseshoe of ``_spex_vi`` (same priors)

``l_n`` is the cell's library size (an offset), ``beta_g`` a gene intercept (point estimate, flat prior) and
``r_g`` is held at a method-of-moments estimate. Written with the log-odds ``psi_ng = log mu_ng - log r_g``,

    NB(y; mu, r) = Gamma(y + r) / (Gamma(r) y!) * exp(kappa psi) / (2 cosh(psi / 2))^(y + r),  kappa = (y - r) / 2,

and ``log cosh(psi / 2)`` is concave in ``psi^2`` (Polya-Gamma augmentation, Polson, Scott & Windle 2013), so

    log NB >= const + kappa psi - (y + r) log(2 cosh(c / 2)) - omega (psi^2 - c^2) / 2,
    omega = (y + r) tanh(c / 2) / (2 c),   tight at c^2 = psi^2.

Under this bound every factor's update is a Gaussian one with per-entry weights ``omega_ng`` (the Polya-Gamma
expectations): q(x_n) = N(mu_n, Sigma_n) per cell, the blocked q(w_g, b_g) = N(m_g, S_g) per gene (batched
Cholesky), ``c_ng^2 = E[psi_ng^2]``; the bound (our ELBO) rises monotonically. One epoch costs a few
N x G x (K + C)^2 matrix products.
"""
from __future__ import annotations


import torch

from ..priors import FixedScale, HalfCauchy, RandomSlab
from ..train import Task
from ._spex_vi import loading_terms, natural_gaussian



def moment_dispersion(Y: torch.Tensor, library: torch.Tensor, lo: float = 1e-2, hi: float = 1e4) -> torch.Tensor:
    """Per-gene NB dispersion r_g by the method of moments on library-normalised counts:
    Var = m + m^2 / r  =>  r = m^2 / (Var - m), clipped to [lo, hi] (hi: about Poisson)."""
    scaled = Y / (library / library.mean())[:, None]
    m, v = scaled.mean(0), scaled.var(0)
    r = m * m / (v - m).clamp_min(1e-12)
    return torch.where(v > m, r, torch.full_like(r, hi)).clamp(lo, hi)


def _pg_weight(count: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """E[omega] of PG(count, c) = count tanh(c / 2) / (2 c), with its limit count / 4 at c = 0."""
    small = c < 1e-4
    safe = torch.where(small, torch.ones_like(c), c)
    return torch.where(small, count / 4, count * torch.tanh(safe / 2) / (2 * safe))


def _log_2cosh_half(c: torch.Tensor) -> torch.Tensor:
    """log(2 cosh(c / 2)) without overflow: |c| / 2 + log1p(exp(-|c|))."""
    a = c.abs()
    return a / 2 + torch.log1p(torch.exp(-a))


def _f_second(mu: torch.Tensor, Sigma: torch.Tensor, Z: torch.Tensor) -> torch.Tensor:
    """E[f_n f_n^T] for f_n = [x_n, z_n] with q(x_n) = N(mu_n, Sigma_n), flattened: N x D^2."""
    K = mu.shape[1]
    F = torch.cat([mu, Z], 1)
    E = F[:, :, None] * F[:, None, :]
    E[:, :K, :K] += Sigma
    return E.reshape(F.shape[0], -1)


def _second_psi(mean, mu, Sigma, Z, M, T2) -> torch.Tensor:
    """E[psi_ng^2] = E[psi]^2 + Var(f_n^T theta_g), Var = E[f f^T] : E[theta theta^T] - (E f^T m)^2, with
    ``T2`` = E[theta_g theta_g^T] (G x D x D)."""
    lin = torch.cat([mu, Z], 1) @ M.T
    var = _f_second(mu, Sigma, Z) @ T2.reshape(T2.shape[0], -1).T - lin * lin
    return mean * mean + var.clamp_min(0)


def _factor_posterior(omega, target, M, T2, Z):
    """q(x_n) = N(mu_n, Sigma_n): Sigma_n^-1 = I + sum_g omega_ng E[w_g w_g^T],
    mu_n = Sigma_n sum_g (E[w_g] t_ng - omega_ng E[w_g b_g^T] z_n), t = kappa - omega o.
    Returns (mu, Sigma, log det Sigma)."""
    N, G, C = omega.shape[0], omega.shape[1], Z.shape[1]
    K = M.shape[1] - C
    prec = torch.eye(K, dtype=M.dtype, device=M.device) + (omega @ T2[:, :K, :K].reshape(G, -1)).reshape(N, K, K)
    h = target @ M[:, :K]
    if C:
        cross = (omega @ T2[:, :K, K:].reshape(G, -1)).reshape(N, K, C)
        h = h - (cross @ Z[:, :, None]).squeeze(-1)
    return natural_gaussian(prec, h)


class SpexNB(Task):
    """The variational state and its updates for counts ``Y`` (N x G), centred covariates ``Z`` (N x C), slab
    widths ``s`` (G x K, log-scale units), starting scores ``X0``."""

    state_exclude = ("Y", "Z", "kappa", "count", "const")  # the data and what is computed from them alone
    rebinds_state = True  # every update binds new tensors

    @property
    def objective_scale(self) -> float:
        """The bound sums over N x G counts (``train`` compares its changes per observation)."""
        return float(self.N * self.G)

    def __init__(self, Y: torch.Tensor, Z: torch.Tensor, s: torch.Tensor, X0: torch.Tensor,
                 slab_confidence: float = 2.0, tau: float | None = 1.0, free_start: bool = True,
                 library: torch.Tensor | None = None, dispersion: torch.Tensor | None = None):
        self.Y, self.Z = Y, Z
        self.N, self.G = Y.shape
        self.K, self.C = s.shape[1], Z.shape[1]
        self.D = self.K + self.C
        dt, dev = Y.dtype, Y.device
        library = Y.sum(1) if library is None else library
        if bool((library <= 0).any()):
            raise ValueError("some cells have no counts (library size 0); remove empty cells before fitting")
        self.r = moment_dispersion(Y, library) if dispersion is None else dispersion.to(dt)
        self.count = Y + self.r                                  # y + r, the PG counts
        self.kappa = (Y - self.r) / 2
        self.const = (torch.lgamma(self.count) - torch.lgamma(self.r) - torch.lgamma(Y + 1)).sum()
        self.offset_cell = torch.log(library)                    # log l_n
        rate = (Y / library[:, None]).mean(0).clamp_min(0.5 / float(library.sum()))
        self.beta = torch.log(rate)                              # gene intercepts: log of the mean rate
        self.mu = X0.to(dt)
        self.Sigma = torch.zeros(self.N, self.K, self.K, dtype=dt, device=dev)
        self.M = torch.zeros(self.G, self.D, dtype=dt, device=dev)
        self.S = torch.zeros(self.G, self.D, self.D, dtype=dt, device=dev)
        self.S_diag = torch.zeros(self.G, self.D, dtype=dt, device=dev)
        self.logdet_S = torch.zeros(self.G, dtype=dt, device=dev)
        self.b_prior = FixedScale((self.C,), 1.0, dtype=dt, device=dev)  # b ~ N(0, 1): log units, as the slabs
        self.lam = HalfCauchy((self.G, self.K), dtype=dt, device=dev)
        self.tau = (HalfCauchy((self.K,), count=self.G, dtype=dt, device=dev) if tau is None
                    else FixedScale((self.K,), tau, dtype=dt, device=dev))
        self.slab = RandomSlab(s.to(dt), alpha=slab_confidence)
        if free_start:
            self.slab.q.rate = torch.full_like(self.slab.q.rate, float(self.slab.rate0.max()))
        self._update_weights()
        self._update_loadings()
        self._update_priors()

    # ----------------------------------------------------------------------------------------- moments
    def _theta_second(self) -> torch.Tensor:
        """E[theta_g theta_g^T] for theta_g = [w_g, b_g]: G x D x D."""
        return self.M[:, :, None] * self.M[:, None, :] + self.S

    def mean_psi(self) -> torch.Tensor:
        """E[psi_ng] = log l_n + beta_g - log r_g + E[f_n]^T m_g (N x G)."""
        F = torch.cat([self.mu, self.Z], 1)
        return self.offset_cell[:, None] + (self.beta - torch.log(self.r))[None, :] + F @ self.M.T

    def _second_psi(self, mean: torch.Tensor) -> torch.Tensor:
        return _second_psi(mean, self.mu, self.Sigma, self.Z, self.M, self._theta_second())

    # ----------------------------------------------------------------------------------------- updates
    def _update_weights(self) -> None:
        """c_ng^2 = E[psi_ng^2] (tightens the bound), omega_ng = E[PG(y + r, c)]."""
        self.psi_mean = self.mean_psi()
        self.c = self._second_psi(self.psi_mean).sqrt()
        self.omega = _pg_weight(self.count, self.c)
        self._tight = True

    def _target(self) -> torch.Tensor:
        """kappa_ng - omega_ng o_ng with the known offset o_ng = log l_n + beta_g - log r_g."""
        o = self.offset_cell[:, None] + (self.beta - torch.log(self.r))[None, :]
        return self.kappa - self.omega * o

    def _update_factors(self) -> None:
        """q(x_n) given the weights (``_factor_posterior``); the bound is no longer tight."""
        self._tight = False
        self.mu, self.Sigma, self._logdet_Sigma = _factor_posterior(self.omega, self._target(), self.M,
                                                                    self._theta_second(), self.Z)

    def prior_precision(self) -> torch.Tensor:
        prec_w = self.tau.mean_inv[None, :] * self.lam.mean_inv + self.slab.mean_inv
        return torch.cat([prec_w, torch.ones(self.G, self.C, dtype=prec_w.dtype, device=prec_w.device)], dim=1)

    def _update_loadings(self) -> None:
        """q(w_g, b_g) = N(m_g, S_g): S_g^-1 = sum_n omega_ng E[f_n f_n^T] + diag(prior precision),
        S_g^-1 m_g = sum_n E[f_n] t_ng."""
        F = torch.cat([self.mu, self.Z], 1)
        self._tight = False
        P = (self.omega.T @ _f_second(self.mu, self.Sigma, self.Z)).reshape(self.G, self.D, self.D)
        P.diagonal(dim1=1, dim2=2).add_(self.prior_precision())
        h = (F.T @ self._target()).T
        self.M, self.S, self.logdet_S = natural_gaussian(P, h)
        self.S_diag = torch.diagonal(self.S, dim1=1, dim2=2).clone()

    def _update_intercepts(self) -> None:
        """beta_g maximises sum_n kappa psi - omega psi^2 / 2 (flat prior): a weighted mean."""
        F = torch.cat([self.mu, self.Z], 1)
        rest = self.offset_cell[:, None] - torch.log(self.r)[None, :] + F @ self.M.T
        self._tight = False
        self.beta = (self.kappa - self.omega * rest).sum(0) / self.omega.sum(0).clamp_min(1e-12)

    def _update_priors(self) -> None:
        Ew2 = (self.M * self.M + self.S_diag)[:, : self.K]
        self.lam.update(0.5 * Ew2 * self.tau.mean_inv[None, :])
        self.tau.update(0.5 * (Ew2 * self.lam.mean_inv).sum(0))
        self.slab.update(Ew2)

    def epoch(self) -> float:
        """One sweep; every block update maximises the bound for the current c, and the last one makes it tight
        (the bound holds for any c, so one weight update per sweep keeps the ELBO monotone)."""
        self._update_factors()
        self._update_loadings()
        self._update_priors()
        self._update_intercepts()
        self._update_weights()
        return float(self.elbo())

    def scores(self) -> torch.Tensor:
        return self.mu

    # ----------------------------------------------------------------------------------------- ELBO
    def elbo(self) -> torch.Tensor:
        """The Polya-Gamma bound on E_q[log NB] plus the Gaussian and scale-prior terms (as ``_spex_vi``)."""
        if getattr(self, "_tight", False):       # c^2 = E[psi^2]: the bound's quadratic term vanishes
            mean, quad = self.psi_mean, 0.0
        else:
            mean = self.mean_psi()
            quad = 0.5 * self.omega * (self._second_psi(mean) - self.c * self.c)
        lik = self.const + (self.kappa * mean - self.count * _log_2cosh_half(self.c) - quad).sum()
        K = self.K
        trace = torch.diagonal(self.Sigma, dim1=1, dim2=2).sum(1)
        x_term = 0.5 * (self.N * K + self._logdet_Sigma.sum() - trace.sum() - (self.mu * self.mu).sum()) \
            if hasattr(self, "_logdet_Sigma") else 0.5 * (self.N * K - (self.mu * self.mu).sum())
        return lik + x_term + loading_terms(self)

    # ----------------------------------------------------------------------------------------- results
    def loadings_sd(self) -> torch.Tensor:
        return self.S_diag.sqrt()


def nb_factor_scores(Y, Z, M, T2, beta, dispersion, n_iter: int = 100, tol: float = 1e-6):
    """Posterior means of the factors of new cells (counts ``Y``, N x G; centred covariates ``Z``) with the
    global factors fixed: the (omega, q(x_n)) updates of :class:`SpexNB` iterated to their fixed point."""
    f64 = torch.float64
    Y, Z = torch.as_tensor(Y, dtype=f64), torch.as_tensor(Z, dtype=f64)
    M, T2 = torch.as_tensor(M, dtype=f64), torch.as_tensor(T2, dtype=f64)
    beta, r = torch.as_tensor(beta, dtype=f64), torch.as_tensor(dispersion, dtype=f64)
    N, K = Y.shape[0], M.shape[1] - Z.shape[1]
    library = Y.sum(1)
    if bool((library <= 0).any()):
        raise ValueError("some cells have no counts on the model's genes (library size 0); remove them first")
    count, kappa = Y + r, (Y - r) / 2
    o = torch.log(library)[:, None] + (beta - torch.log(r))[None, :]
    mu, Sigma = torch.zeros(N, K, dtype=f64), torch.zeros(N, K, K, dtype=f64)
    for _ in range(n_iter):
        second = _second_psi(o + torch.cat([mu, Z], 1) @ M.T, mu, Sigma, Z, M, T2)
        omega = _pg_weight(count, second.sqrt())
        new, Sigma, _ = _factor_posterior(omega, kappa - omega * o, M, T2, Z)
        done = float((new - mu).abs().max()) < tol
        mu = new
        if done:
            break
    return mu.numpy()
