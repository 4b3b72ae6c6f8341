"""Variational inference for Spex on raw counts: a negative-binomial likelihood with a log link.

Model (seed 002's factor model, with counts in place of Gaussian data)::

    y_ng ~ NB(mean mu_ng, dispersion r_g),   log mu_ng = log l_n + delta_n + beta_g + w_g^T x_n + b_g^T z_n
    x_n ~ N(0, I_K),   delta_n ~ N(0, 1),   b_gc ~ N(0, 1),   beta_g ~ N(beta0_g, 10^2),   log r_g ~ N(rho0, varsigma^2)
    w_gk: the regularised horseshoe of ``_spex_prior`` (in log units)

``l_n`` is the cell's library size over the fitted genes, ``beta0_g`` the log of the gene's mean rate. The cell's own
size ``delta_n`` corrects the library where the programs themselves move it (a cell high in a program of 40 of
240 genes has a larger library, and a fixed offset log l_n would take part of the program's effect away). With the log-odds
``psi_ng = log mu_ng - log r_g`` the log-likelihood is

    l(psi) = log Gamma(y + r) - log Gamma(r) - log y! + y psi - (y + r) softplus(psi),

whose curvature ``(y + r) sigmoid(psi) sigmoid(-psi)`` is ``~mu`` for the low counts of droplet data. (A Polya-Gamma
quadratic bound replaces it by ``(y + r) tanh(|psi|/2) / (2 |psi|)``: 11x too large at ``|psi| = 4.6``, which shrinks
every loading to zero.) Here the expected log-likelihood is computed, not bounded:

* q(x_n, delta_n) = N(mu_n, Sigma_n) jointly per cell (``u_n = [x_n, delta_n]``), q(theta_g) = N(m_g, S_g) per gene
  over theta_g = [w_g, b_g, beta_g] jointly;
* the linear predictor ``eta_ng = u_n^T [w_g, 1] + [z_n, 1]^T [b_g, beta_g]`` has the exact moments
  ``E = E[u_n]^T [m_w, 1] + ...`` and ``Var = f_n^T S_g f_n + tr(Sigma_n E[[w_g, 1] [w_g, 1]^T])``
  (f_n = [E x_n, z_n, 1]); E_q[l] is taken over a Gaussian with those
  moments by Gauss-Hermite quadrature. **Approximation**: eta is a sum of products of Gaussians, close to but
  not exactly Gaussian; the objective below (called the ELBO) is the ELBO under this approximation.
* q(u_n) and q(theta_g) take natural-gradient steps (Khan & Nielsen 2018): precision ``(1 - rho) P + rho
  (prior + sum E[-l''] E[f f^T])``, mean ``m + rho S grad`` -- Newton steps with the expected true curvature
  (``rho = 1``). Each step is checked on the objective, which is separable over cells (for q(x, delta)) and genes (for
  q(theta), r): a row whose objective would fall halves its ``rho`` until it rises. The ELBO is monotone.
* the dispersions are point estimates (maximum a posteriori), one Newton step per sweep on ``log r_g`` with the same
  check; ``rho0`` and ``varsigma^2 >= 0.5^2`` are empirical-Bayes estimates pooling all genes (shrinkage: a gene
  whose counts say little about its dispersion takes the genes' common one).
* ``batch_size``: every pass goes through blocks of that many cells (the factor steps; the loadings' and the
  dispersions' expected gradients and curvatures, summed; each candidate's E[l], summed, with one more pass for the
  genes that halve their step). Each gene's E[l] summed over cells is kept, so the ELBO needs no cells x genes
  array; the updates are the full-batch ones, and only with one block are eta's moments and E[l] cached (N x G).
* the horseshoe and slab scales take their closed-form updates (``pathfactor.priors``), and a shear step along the
  likelihood's symmetry ``x_n -> x_n - A [z_n, 1]``, ``[b_g, beta_g] -> [b_g, beta_g] + A^T w_g`` (as in
  ``_spex_vi``) keeps the factors centred and separated from the covariates.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..priors import FixedScale, HalfCauchy, RandomSlab
from ..train import Task
from ._spex_prior import loading_terms, starting_slab_rate, update_scales, weight_precision
from ._spex_vi import best_shear, natural_gaussian, ridge_eigen, sheared_loadings

INTERCEPT_SD = 10.0      # beta_g ~ N(beta0_g, 10^2): flat on the log scale
DISPERSION_SD_FLOOR = 0.5  # the smallest spread of log r_g across genes the empirical-Bayes prior may take
LOG_R_RANGE = (math.log(1e-3), math.log(1e6))
_MAX_HALVINGS = 10


def moment_dispersion(Y: torch.Tensor, library: torch.Tensor, lo: float = 1e-2, hi: float = 1e4) -> torch.Tensor:
    """Per-gene NB dispersion r_g by the method of moments on library-normalised counts y_n / s_n, s_n = l_n / mean l:
    Var = m mean(1 / s_n) + m^2 / r (the Poisson part grows where libraries are small), clipped to [lo, hi]."""
    size = library / library.mean()
    scaled = Y / size[:, None]
    m, v = scaled.mean(0), scaled.var(0)
    poisson = m * (1.0 / size).mean()
    r = m * m / (v - poisson).clamp_min(1e-12)
    return torch.where(v > poisson, r, torch.full_like(r, hi)).clamp(lo, hi)


def gauss_hermite(n: int):
    """Nodes and weights of E over N(0, 1) (probabilists' Hermite)."""
    x, w = np.polynomial.hermite_e.hermegauss(n)
    w = w / w.sum()
    return [(float(a), float(b)) for a, b in zip(x, w)]


def softplus_expectations(centre, sd, nodes, derivatives: bool):
    """E[softplus(psi)] and, with ``derivatives``, E[sigmoid(psi)] and E[sigmoid(psi) sigmoid(-psi)] for
    psi ~ N(centre, sd^2), by quadrature.

    At each node t: sigmoid(t) = exp(t - softplus(t)) and sigmoid(t) sigmoid(-t) = exp(t - 2 softplus(t)), so
    neither is a difference of numbers near 1 (droplet counts put psi far below 0, where 1 - sigmoid(-t) loses
    float32's digits), and each node costs one softplus and two exps, mostly in place."""
    f = torch.zeros_like(centre)
    s = torch.zeros_like(centre) if derivatives else None
    ss = torch.zeros_like(centre) if derivatives else None
    for x, w in nodes:
        t = torch.add(centre, sd, alpha=x) if x else centre.clone()
        sp = torch.nn.functional.softplus(t)
        f.add_(sp, alpha=w)
        if derivatives:
            t.sub_(sp)                              # log sigmoid(t)
            s.add_(torch.exp(t), alpha=w)
            ss.add_(t.sub_(sp).exp_(), alpha=w)     # exp(log sigmoid(t) - softplus(t)) = sigmoid(t) sigmoid(-t)
    return f, s, ss


class SpexNB(Task):
    """The variational state and its updates for counts ``Y`` (N x G), centred covariates ``Z`` (N x C), slab
    widths ``s`` (G x K, log units), starting scores ``X0``. ``dispersion``: fixed r_g (learned when None)."""

    state_exclude = ("Y", "Z", "Zf", "nodes", "_lgamma_y1", "_const", "_const_of")
    rebinds_state = True  # every update binds new tensors

    @property
    def objective_scale(self) -> float:
        """The ELBO sums over N x G counts (``train`` compares its changes per observation)."""
        return float(self.N * self.G)

    def __init__(self, Y: torch.Tensor, Z: torch.Tensor, s: torch.Tensor, X0: torch.Tensor,
                 slab_confidence: float = 2.0, tau: float | None = 1.0, start: str = "wide",
                 library: torch.Tensor | None = None, dispersion: torch.Tensor | None = None, n_nodes: int = 8,
                 batch_size: int | None = None):
        dt, dev = Y.dtype, Y.device
        self.K = s.shape[1]
        self._set_cells(Y, Z, library, n_nodes, batch_size)
        G = self.G
        self.learn_dispersion = dispersion is None
        r = moment_dispersion(Y, self.library) if dispersion is None else torch.as_tensor(dispersion).to(Y)
        self.log_r = torch.log(r).clamp(*LOG_R_RANGE)
        self.rho0, self.varsigma2 = self.log_r.mean(), torch.tensor(1.0, dtype=dt, device=dev)
        self._update_dispersion_prior()
        rate = (Y / self.library[:, None]).mean(0).clamp_min(0.5 / float(self.library.sum()))
        self.beta0 = torch.log(rate)
        self.b_prior = FixedScale((self.C + 1,), torch.tensor([1.0] * self.C + [INTERCEPT_SD], dtype=dt, device=dev),
                                  dtype=dt, device=dev)
        self.lam = HalfCauchy((G, self.K), dtype=dt, device=dev)
        self.tau = (HalfCauchy((self.K,), count=G, dtype=dt, device=dev) if tau is None
                    else FixedScale((self.K,), tau, dtype=dt, device=dev))
        self.slab = RandomSlab(s.to(dt), alpha=slab_confidence)
        self.slab.q.rate = starting_slab_rate(self.slab, start)
        # a tiny starting spread: the first steps are accepted from any point, then every step is checked
        U0 = torch.cat([X0.to(dt), torch.zeros(self.N, 1, dtype=dt, device=dev)], 1)   # [x_n, delta_n]
        eye = torch.eye(self.K + 1, dtype=dt, device=dev)
        self._set_factors(U0, 1e4 * eye.expand(self.N, self.K + 1, self.K + 1).clone())
        eye_d = torch.eye(self.D, dtype=dt, device=dev)
        M = torch.zeros(G, self.D, dtype=dt, device=dev)
        self._set_loadings(M, 1e4 * eye_d.expand(G, self.D, self.D).clone())
        self._refresh()
        self._loading_step()
        self._update_priors()

    def _set_cells(self, Y, Z, library, n_nodes, batch_size=None) -> None:
        """The data and what is computed from them alone; the blocks of cells the passes go through."""
        self.Y, self.Z = Y, Z
        self.N, self.G = Y.shape
        self.batch_size = None if batch_size is None or batch_size >= self.N else int(batch_size)
        step = self.batch_size or max(self.N, 1)
        self._blocks = [slice(lo, min(lo + step, self.N)) for lo in range(0, self.N, step)]
        self.C = Z.shape[1]
        self.D = self.K + self.C + 1
        self.Zf = torch.cat([Z, torch.ones(self.N, 1, dtype=Y.dtype, device=Y.device)], 1)  # fixed columns of f_n
        self.library = Y.sum(1) if library is None else library
        if bool((self.library <= 0).any()):
            raise ValueError("some cells have no counts (library size 0); remove empty cells before fitting")
        self.offset_cell = torch.log(self.library)
        # one block: N x G caches of eta's moments, E[l] and the count constants; blocks: computed block by block
        self._lgamma_y1 = torch.lgamma(Y + 1) if self.cached else None
        self.nodes = gauss_hermite(n_nodes)

    @property
    def cached(self) -> bool:
        """Whether the N x G caches are kept (one block of cells: ``batch_size=None``)."""
        return len(self._blocks) <= 1

    # ----------------------------------------------------------------------------------------- state setters
    def _set_factors(self, mu, Lam) -> None:
        L = torch.linalg.cholesky(Lam)
        self.mu, self.Lam_x = mu, Lam
        self.Sigma = torch.cholesky_inverse(L)
        self.logdet_Sigma = -2.0 * torch.log(torch.diagonal(L, dim1=1, dim2=2)).sum(1)

    def _set_loadings(self, M, P) -> None:
        L = torch.linalg.cholesky(P)
        self.M, self.P = M, P
        self.S = torch.cholesky_inverse(L)
        self.S_diag = torch.diagonal(self.S, dim1=1, dim2=2).clone()
        self.logdet_S = -2.0 * torch.log(torch.diagonal(L, dim1=1, dim2=2)).sum(1)

    # ----------------------------------------------------------------------------------------- moments
    @property
    def r(self) -> torch.Tensor:
        return torch.exp(self.log_r)

    def _F(self, cells=slice(None), mu=None) -> torch.Tensor:
        return torch.cat([(self.mu[cells] if mu is None else mu)[:, : self.K], self.Zf[cells]], 1)

    def _moments(self, cells=slice(None), genes=slice(None), mu=None, Sigma=None, M=None, S=None):
        """Mean and variance of eta_ng = f_n^T theta_g for the given cells x genes (N' x G' each)."""
        F = self._F(cells, mu)
        Sigma = self.Sigma[cells] if Sigma is None else Sigma
        M = self.M[genes] if M is None else M
        S = self.S[genes] if S is None else S
        K, n, g = self.K, F.shape[0], M.shape[0]
        size = (self.mu[cells] if mu is None else mu)[:, K]
        mean = (self.offset_cell[cells] + size)[:, None] + F @ M.T
        F2 = (F[:, :, None] * F[:, None, :]).reshape(n, -1)
        var = F2 @ S.reshape(g, -1).T + Sigma.reshape(n, -1) @ self._factor_second(M, S).reshape(g, -1).T
        return mean, var.clamp_min(0)

    def _factor_second(self, M, S) -> torch.Tensor:
        """E[[w_g, 1] [w_g, 1]^T]: the second moments of u_n's coefficients (G x (K+1) x (K+1))."""
        K = self.K
        Mu = torch.cat([M[:, :K], torch.ones_like(M[:, :1])], 1)
        T2 = Mu[:, :, None] * Mu[:, None, :]
        T2[:, :K, :K] += S[:, :K, :K]
        return T2

    def _expected_loglik(self, mean, var, cells=slice(None), genes=slice(None), log_r=None, derivatives=False):
        """E_q[l_ng] (and with ``derivatives`` E[l'], E[-l''] with respect to eta) for the given cells x genes."""
        current = log_r is None
        log_r = self.log_r[genes] if current else log_r
        r = torch.exp(log_r)
        Y = self.Y[cells][:, genes]
        centre = mean + self.beta0[genes][None, :] - log_r[None, :]
        f, s, ss = softplus_expectations(centre, var.sqrt(), self.nodes, derivatives)
        count = Y + r
        const = self._count_constant(Y, cells, genes, log_r, current)
        ell = const + Y * centre - count * f
        if not derivatives:
            return ell
        return ell, Y - count * s, count * ss, (f, s, ss)

    def _count_constant(self, Y, cells, genes, log_r, current: bool) -> torch.Tensor:
        """log Gamma(y + r) - log Gamma(r) - log y! of counts ``Y`` (cells x genes); cached while r stays."""
        if current and self.cached:
            if getattr(self, "_const_of", None) is not self.log_r:
                self._const = torch.lgamma(self.Y + self.r) - torch.lgamma(self.r) - self._lgamma_y1
                self._const_of = self.log_r
            return self._const[cells][:, genes]
        r = torch.exp(log_r)
        lgamma_y1 = self._lgamma_y1[cells][:, genes] if self.cached else torch.lgamma(Y + 1)
        return torch.lgamma(Y + r) - torch.lgamma(r) - lgamma_y1

    def _refresh(self) -> None:
        """Each gene's E[l] summed over cells at the current state (and, with one block, the N x G caches of eta's
        moments and E[l])."""
        self._mean = self._var = self._ell = None
        ell_gene = torch.zeros(self.G, dtype=torch.float64, device=self.Y.device)
        for b in self._blocks:
            mean, var = self._moments(cells=b)
            ell = self._expected_loglik(mean, var, cells=b)
            ell_gene += ell.double().sum(0)
            if self.cached:
                self._mean, self._var, self._ell = mean, var, ell
        self._ell_gene = ell_gene

    # ----------------------------------------------------------------------------------------- updates
    def _cell_objective(self, ell_rows, mu, Sigma, logdet) -> torch.Tensor:
        trace = torch.diagonal(Sigma, dim1=1, dim2=2).sum(1)
        return ell_rows.double().sum(1) + 0.5 * (logdet - trace - (mu * mu).sum(1)).double()

    def _gene_objective(self, ell_sums, M, S_diag, logdet, prec) -> torch.Tensor:
        """Each gene's share of the ELBO from its E[l] summed over cells (float64, length G')."""
        return ell_sums + (0.5 * logdet - 0.5 * (prec * (M * M + S_diag)).sum(1)).double()

    def _block_moments(self, b, genes=slice(None)):
        """eta's mean and variance for the cells of block ``b`` and ``genes`` at the current state."""
        if self._mean is not None:
            return self._mean[:, genes], self._var[:, genes]
        return self._moments(cells=b, genes=genes)

    def _factor_step(self) -> None:
        """Natural-gradient (Newton) step for every q(x_n, delta_n), each checked on its cell's share of the ELBO,
        block by block; each gene's E[l] summed over the cells is kept for the loading step and the ELBO."""
        second = self._factor_second(self.M, self.S).reshape(self.G, -1)
        new = [t.clone() for t in (self.mu, self.Lam_x, self.Sigma, self.logdet_Sigma)]  # rebound, never written
        ell_gene = torch.zeros(self.G, dtype=torch.float64, device=self.Y.device)
        for b in self._blocks:
            ell_gene += self._factor_block(b, second, *new).double().sum(0)
        self.mu, self.Lam_x, self.Sigma, self.logdet_Sigma = new
        self._ell_gene = ell_gene

    def _factor_block(self, b: slice, second, mu, Lam, Sigma, logdet) -> torch.Tensor:
        """The checked steps of the cells of block ``b`` (written into ``mu``, ``Lam``, ``Sigma``, ``logdet``, the
        new state's tensors); returns their E[l] (cells x genes) at the new factors."""
        K, U = self.K, self.K + 1
        mean, var = self._block_moments(b)  # the caches themselves with one block: written in place below
        ell, d1, w, _ = self._expected_loglik(mean, var, cells=b, derivatives=True)
        n, Mw = ell.shape[0], self.M[:, :K]
        eye = torch.eye(U, dtype=Mw.dtype, device=Mw.device)
        target = eye + (w @ second).reshape(n, U, U)
        F = self._F(b)
        curv = ((w @ self.S[:, :K, :].reshape(self.G, -1)).reshape(n, K, self.D) @ F[:, :, None]).squeeze(-1)
        mu0, Lam0 = self.mu[b], self.Lam_x[b]
        grad = torch.cat([d1 @ Mw - curv, d1.sum(1, keepdim=True)], 1) - mu0
        old = self._cell_objective(ell, mu0, self.Sigma[b], self.logdet_Sigma[b])
        rho = torch.ones(n, dtype=Mw.dtype, device=Mw.device)
        todo = torch.arange(n, device=Mw.device)
        for _ in range(_MAX_HALVINGS):
            r = rho[todo][:, None, None]
            Lam_new = (1 - r) * Lam0[todo] + r * target[todo]
            L, info = torch.linalg.cholesky_ex(Lam_new)
            Sigma_new = torch.cholesky_inverse(L)
            mu_new = mu0[todo] + rho[todo][:, None] * (Sigma_new @ grad[todo][:, :, None]).squeeze(-1)
            logdet_new = -2.0 * torch.log(torch.diagonal(L, dim1=1, dim2=2)).sum(1)
            cells = todo + b.start
            mean_new, var_new = self._moments(cells=cells, mu=mu_new, Sigma=Sigma_new)
            ell_new = self._expected_loglik(mean_new, var_new, cells=cells)
            value = self._cell_objective(ell_new, mu_new, Sigma_new, logdet_new)
            ok = (value >= old[todo]) & (info == 0) & torch.isfinite(value)
            idx = todo[ok]
            rows = idx + b.start
            mu[rows], Lam[rows], Sigma[rows], logdet[rows] = mu_new[ok], Lam_new[ok], Sigma_new[ok], logdet_new[ok]
            mean[idx], var[idx], ell[idx] = mean_new[ok], var_new[ok], ell_new[ok]
            todo = todo[~ok]
            if not len(todo):
                break
            rho[todo] = rho[todo] / 2
        if self._mean is not None:  # the caches (``mean`` and ``var`` are theirs, written in place)
            self._ell = ell
        return ell

    def prior_precision(self) -> torch.Tensor:
        """G x D prior precision of theta_g = [w_g, b_g, beta_g]."""
        return torch.cat([weight_precision(self), self.b_prior.mean_inv[None, :].expand(self.G, self.C + 1)], dim=1)

    def _loading_step(self) -> None:
        """Natural-gradient (Newton) step for every q(theta_g), each checked on its gene's share of the ELBO: one
        pass over the blocks of cells for the expected gradient and curvature, then one for the candidates (and
        one more, for fewer genes, per halving)."""
        K, G, D = self.K, self.G, self.D
        dt, dev = self.M.dtype, self.M.device
        target = torch.zeros(G, D, D, dtype=dt, device=dev)
        sig = torch.zeros(G, K, K, dtype=dt, device=dev)
        grad = torch.zeros(G, D, dtype=dt, device=dev)
        size_cov = torch.zeros(G, K, dtype=dt, device=dev)
        for b in self._blocks:
            mean, var = self._block_moments(b)
            _, d1, w, _ = self._expected_loglik(mean, var, cells=b, derivatives=True)
            F = self._F(b)
            n = F.shape[0]
            F2 = (F[:, :, None] * F[:, None, :]).reshape(n, -1)
            sig += (w.T @ self.Sigma[b, :K, :K].reshape(n, -1)).reshape(G, K, K)
            target += (w.T @ F2).reshape(G, D, D)
            grad += d1.T @ F
            size_cov += w.T @ self.Sigma[b, :K, K]
        prec = self.prior_precision()
        target[:, :K, :K] += sig
        target.diagonal(dim1=1, dim2=2).add_(prec)
        grad -= prec * self.M
        # d Var(eta) / d m_w = 2 (Sigma_xx m_w + Sigma_x,delta): the factors' and the size's covariance
        grad[:, :K] -= (sig @ self.M[:, :K, None]).squeeze(-1) + size_cov
        old = self._gene_objective(self._ell_gene, self.M, self.S_diag, self.logdet_S, prec)
        rho = torch.ones(G, dtype=dt, device=dev)
        todo = torch.arange(G, device=dev)
        M, P, S, logdet = self.M.clone(), self.P.clone(), self.S.clone(), self.logdet_S.clone()
        ell_gene = self._ell_gene.clone()
        for _ in range(_MAX_HALVINGS):
            r = rho[todo][:, None, None]
            P_new = (1 - r) * self.P[todo] + r * target[todo]
            # (mean of N(0, .) from natural_gaussian is unused: the step is m + rho S grad)
            _, S_new, logdet_new = natural_gaussian(P_new, torch.zeros_like(grad[todo]))
            M_new = self.M[todo] + rho[todo][:, None] * (S_new @ grad[todo][:, :, None]).squeeze(-1)
            S_diag_new = torch.diagonal(S_new, dim1=1, dim2=2)
            sums = torch.zeros(len(todo), dtype=torch.float64, device=dev)
            for b in self._blocks:
                mean, var = self._moments(cells=b, genes=todo, M=M_new, S=S_new)
                ell_new = self._expected_loglik(mean, var, cells=b, genes=todo)
                sums += ell_new.double().sum(0)
            value = self._gene_objective(sums, M_new, S_diag_new, logdet_new, prec[todo])
            ok = (value >= old[todo]) & torch.isfinite(value)
            idx = todo[ok]
            M[idx], P[idx], S[idx], logdet[idx] = M_new[ok], P_new[ok], S_new[ok], logdet_new[ok]
            ell_gene[idx] = sums[ok]
            if self._mean is not None:  # one block: its last moments are every cell's
                self._mean[:, idx], self._var[:, idx], self._ell[:, idx] = mean[:, ok], var[:, ok], ell_new[:, ok]
            todo = todo[~ok]
            if not len(todo):
                break
            rho[todo] = rho[todo] / 2
        self.M, self.P, self.S, self.logdet_S = M, P, S, logdet
        self.S_diag = torch.diagonal(S, dim1=1, dim2=2).clone()
        self._ell_gene = ell_gene

    def _update_priors(self) -> None:
        """Closed-form updates of the horseshoe's scales and the slabs given q(W)."""
        update_scales(self, (self.M * self.M + self.S_diag)[:, : self.K])

    def _dispersion_log_prior(self, log_r) -> torch.Tensor:
        return -0.5 * (math.log(2 * math.pi) + torch.log(self.varsigma2)
                       + (log_r - self.rho0) ** 2 / self.varsigma2)

    def _update_dispersion_prior(self) -> None:
        """rho0, varsigma^2 maximise sum_g log N(log r_g; rho0, varsigma^2) (varsigma >= DISPERSION_SD_FLOOR)."""
        self.rho0 = self.log_r.mean()
        self.varsigma2 = ((self.log_r - self.rho0) ** 2).mean().clamp_min(DISPERSION_SD_FLOOR ** 2)

    def _dispersion_step(self) -> None:
        """One Newton step on each log r_g (its expected log-likelihood plus the log-normal prior), checked; the
        gradient and curvature are summed over the blocks of cells, and so is each candidate's E[l]."""
        r = self.r
        grad = torch.zeros(self.G, dtype=torch.float64, device=r.device)
        hess = torch.zeros_like(grad)
        for b in self._blocks:
            mean, var = self._block_moments(b)
            _, _, _, (f, s, ss) = self._expected_loglik(mean, var, cells=b, derivatives=True)
            Y = self.Y[b]
            count = Y + r
            dig = torch.digamma(count) - torch.digamma(r)
            tri = torch.polygamma(1, count) - torch.polygamma(1, r)
            # d l / d log r and d^2 l / d log r^2 with psi = eta - log r (derived in the module docstring's terms)
            grad += (r * dig - Y + count * s - r * f).double().sum(0)
            hess += (r * dig + r * r * tri - r * f + 2 * r * s - count * ss).double().sum(0)
        grad = (grad - (self.log_r - self.rho0) / self.varsigma2).to(r.dtype)
        hess = (hess - 1.0 / self.varsigma2).to(r.dtype)
        step = torch.where(hess < 0, -grad / hess.clamp_max(-1e-12), grad.sign() * 0.5).clamp(-2.0, 2.0)
        old = self._ell_gene + self._dispersion_log_prior(self.log_r).double()
        rho = torch.ones_like(step)
        todo = torch.arange(self.G, device=step.device)
        log_r, ell_gene = self.log_r.clone(), self._ell_gene.clone()
        for _ in range(_MAX_HALVINGS):
            cand = (self.log_r[todo] + rho[todo] * step[todo]).clamp(*LOG_R_RANGE)
            sums = torch.zeros(len(todo), dtype=torch.float64, device=step.device)
            for b in self._blocks:
                mean, var = self._block_moments(b, todo)
                ell_new = self._expected_loglik(mean, var, cells=b, genes=todo, log_r=cand)
                sums += ell_new.double().sum(0)
            new = sums + self._dispersion_log_prior(cand).double()
            ok = (new >= old[todo]) & torch.isfinite(new)
            idx = todo[ok]
            log_r[idx], ell_gene[idx] = cand[ok], sums[ok]
            if self._ell is not None:
                self._ell[:, idx] = ell_new[:, ok]
            todo = todo[~ok]
            if not len(todo):
                break
            rho[todo] = rho[todo] / 2
        self.log_r, self._ell_gene = log_r, ell_gene
        self._update_dispersion_prior()

    def _shear(self) -> None:
        """The best shear x_n -> x_n - A f0_n, theta_g -> L theta_g (f0_n = [z_n, 1]; L adds A^T w_g to [b_g, beta_g]).

        eta_ng is unchanged for every draw, so E[l] and the entropies are too; only the priors of X and of [b, beta]
        (precision P) move: A solves Phi A P + A F0^T F0 = mu^T F0 - E[sum_g w_g [b_g, beta_g]^T] P, Phi =
        sum_g E[w_g w_g^T] -- the Gaussian model's shear (``_spex_vi.best_shear``) with the intercepts sheared too."""
        K, f64 = self.K, torch.float64
        Mw, Mb = self.M[:, :K].to(f64), self.M[:, K:].to(f64)
        Ssum = self.S.sum(0).to(f64)
        p, F0 = self.b_prior.mean_inv.to(f64), self.Zf.to(f64)
        ridge = ridge_eigen(Mw.T @ Mw + Ssum[:K, :K], F0.T @ F0, p)
        A = best_shear(ridge, self.mu[:, :K].to(f64).T @ F0 - (Mw.T @ Mb + Ssum[:K, K:]) * p[None, :]).to(self.M.dtype)
        L_inv = torch.eye(self.D, dtype=A.dtype, device=A.device)
        L_inv[K:, :K] = -A.T                                   # the inverse of the shear [[I, 0], [A^T, I]]
        self.mu = self.mu - torch.cat([self.Zf @ A.T, torch.zeros_like(self.mu[:, K:])], 1)
        self.M, self.S = sheared_loadings(self.M, self.S, A, K)
        self.P = L_inv.T @ self.P @ L_inv
        self.S_diag = torch.diagonal(self.S, dim1=1, dim2=2).clone()  # eta's moments (the cache) are unchanged

    def epoch(self) -> float:
        """One sweep: q(X, delta), q(W, B, beta), the scales, the dispersions, the shear; each step raises the ELBO."""
        self._factor_step()
        self._loading_step()
        self._update_priors()
        if self.learn_dispersion:
            self._dispersion_step()
        self._shear()
        return float(self.elbo())

    def scores(self) -> torch.Tensor:
        return self.mu[:, : self.K]

    # ----------------------------------------------------------------------------------------- ELBO
    def elbo(self) -> torch.Tensor:
        """E_q[log NB] (Gauss-Hermite over eta's Gaussian approximation) + the Gaussian, scale and dispersion terms."""
        K = self.K
        trace = torch.diagonal(self.Sigma, dim1=1, dim2=2).sum(1)
        x_term = 0.5 * (self.N * (K + 1) + self.logdet_Sigma.sum() - trace.sum() - (self.mu * self.mu).sum())
        total = self._ell_gene.sum() + x_term.double() + loading_terms(self).double()
        if self.learn_dispersion:
            total = total + self._dispersion_log_prior(self.log_r).double().sum()
        return total

    # ----------------------------------------------------------------------------------------- results
    def intercepts(self) -> torch.Tensor:
        """beta_g = beta0_g + E[intercept shift]: the log rate per unit of library size at x = 0, z = 0."""
        return self.beta0 + self.M[:, -1]

    def loadings_sd(self) -> torch.Tensor:
        """Posterior sd of [W, B] (the intercept's left out)."""
        return self.S_diag[:, :-1].sqrt()

    @classmethod
    def for_new_cells(cls, Y, Z, M, S, beta, dispersion, n_nodes: int = 8) -> "SpexNB":
        """A state holding fixed global factors (loadings ``M``, covariances ``S``, intercepts ``beta``, dispersions)
        for new cells ``Y``, ``Z``: only q(x_n, delta_n) is to be fitted (``_factor_step``)."""
        self = cls.__new__(cls)
        self.K = M.shape[1] - Z.shape[1] - 1
        self._set_cells(Y, Z, None, n_nodes)
        self.log_r = torch.log(dispersion)
        self.beta0 = beta - M[:, -1]
        self.M, self.S = M, S
        eye = torch.eye(self.K + 1, dtype=Y.dtype, device=Y.device)
        self._set_factors(torch.zeros(self.N, self.K + 1, dtype=Y.dtype, device=Y.device),
                          eye.expand(self.N, self.K + 1, self.K + 1).clone())
        self._refresh()
        return self


def nb_factor_scores(Y, Z, M, S, beta, dispersion, n_iter: int = 200, tol: float = 1e-9):
    """Posterior means of the factors of new cells (counts ``Y``, N x G; centred covariates ``Z``) with the
    global factors fixed: the checked Newton steps of q(x_n, delta_n) iterated until the means stop moving."""
    f64 = torch.float64
    Y, Z = torch.as_tensor(Y, dtype=f64), torch.as_tensor(Z, dtype=f64)
    if bool((Y.sum(1) <= 0).any()):
        raise ValueError("some cells have no counts on the model's genes (library size 0); remove them first")
    state = SpexNB.for_new_cells(Y, Z, torch.as_tensor(M, dtype=f64), torch.as_tensor(S, dtype=f64),
                                 torch.as_tensor(beta, dtype=f64), torch.as_tensor(dispersion, dtype=f64))
    for _ in range(n_iter):
        before = state.mu
        state._factor_step()
        if float((state.mu - before).abs().max()) < tol:
            break
    return state.scores().numpy()
