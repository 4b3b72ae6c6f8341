"""Closed-form variational inference for the spex-LVM factor model (seed 002).

Model (seed 002, eqs. 2-5; covariates as in seed 000)::

    y_n = W x_n + B z_n + eps_n,   eps_n ~ N(0, diag(sigma2)),   x_n ~ N(0, I_K),   b_gc ~ N(0, v_c)
    w_gk ~ N(0, tau_k^2 lam_gk^2) N(0, c_gk^2)          (regularised horseshoe, product form)
    lam_gk ~ C+(0, 1), c_gk^2 ~ IG(alpha, alpha s_gk^2),   sigma2_g ~ IG(a0, b0),   v_c ~ IG(1, u^2)
    tau_k fixed (default) or tau_k ~ C+(0, u)

``u`` (``unit``) is the data's typical standard deviation, as are the slab widths ``s`` and a fixed ``tau``, and
``b0`` scales with the data's variance: every prior is in the data's units, so data in other units (x 1000,
x 1e-4) give the same factors, with loadings and effects in those units. The variance ``v_c`` of each covariate's
effects is learned from all genes (automatic relevance determination): only the priors of X and B decide how
the likelihood's ridge ``x -> x - A z``, ``b -> b + A^T w`` is split, so B's prior scale must come from the data.

One global scale per factor: learned by mean-field VI it collapses onto the width of the out-of-set slab (most
of a factor's genes lie outside its gene set), which then prunes real but weak programs (on the mESC data every
Hallmark factor but G2M). Held fixed at the data's scale, the local scales and slabs alone decide sparsity.

Mean-field family q(X) q(W, B) q(sigma2) q(lam) q(tau) q(c) with

* q(x_n) = N(mu_n, Sigma_x), one K x K covariance shared by all cells;
* q(w_g, b_g) = N(m_g, S_g), a full (K+C) x (K+C) Gaussian per gene: the *blocked* joint posterior of the
  loadings and the covariate effects (seed 000), computed for all genes at once by a batched Cholesky;
* inverse-gamma factors for every variance (see ``pathfactor.priors``).

With covariates, the likelihood cannot tell ``x_n`` from ``x_n - A z_n`` with ``b_g`` moved to ``b_g + A^T w_g``
(any K x C matrix A): only the priors of X and B pick the split. Coordinate ascent on q(X) and q(W, B) crawls
along this ridge when the factors correlate with the covariates, and stops near its start (the two-step OLS
+ PCA split, biased B). The blocked family is closed under the shear, so each epoch also takes the best A in
closed form (parameter expansion, Qi & Jaakkola 2006): an exact ELBO step that q(W) q(B) cannot take. The ridge
also carries posterior variance of B that q(X) q(W, B) leaves out; ``covariate_effects_var`` adds it back.

Each update maximises the ELBO in its block, so the ELBO rises monotonically; one iteration costs two
N x G x K matrix products plus a batched Cholesky of G (K+C) x (K+C) matrices. The updates read the data only
through the sufficient statistics ``E[F]^T Y``, ``E[F^T F]`` and ``sum_n y_ng^2`` with F = [X, Z], so the same
code serves minibatches (stochastic VI with natural-gradient steps, Hoffman et al. 2013).
"""
from __future__ import annotations

import math

import torch

from ..data.stream import TensorRows
from ..priors import FixedScale, HalfCauchy, InverseGamma, RandomSlab, SharedVariance, gaussian_prior_terms
from ..train import Task, one_thread

_LOG_2PI = math.log(2 * math.pi)


def in_threads(fn, *batches: torch.Tensor):
    """``fn`` over the leading (batch) dimension of ``batches``, split across the CPU threads torch may use.

    torch runs a batch of small LAPACK factorisations on one thread, and with several threads asked for it can
    even stall (measured: a batched cholesky_inverse of 4000 100 x 100 matrices took 2 s on one thread, 16 s
    on two). Chunks on Python threads, each op on one thread, use all cores instead."""
    n = torch.get_num_threads()
    if n == 1 or batches[0].device.type != "cpu" or batches[0].shape[0] < 2 * n:
        return fn(*batches)
    from concurrent.futures import ThreadPoolExecutor

    def run(args):
        torch.set_flush_denormal(True)  # a fresh thread's own FPU flags (see ``train._flush_denormal``)
        return fn(*args)

    chunks = list(zip(*(b.chunk(n) for b in batches)))
    with one_thread(batches[0].device), ThreadPoolExecutor(len(chunks)) as pool:
        parts = list(pool.map(run, chunks))
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(p) for p in zip(*parts))
    return torch.cat(parts)


def _factorise(P: torch.Tensor, h: torch.Tensor):
    L, info = torch.linalg.cholesky_ex(P)
    if int(info.max()) > 0:  # numerically indefinite: add jitter and retry once
        eye = torch.eye(P.shape[-1], dtype=P.dtype, device=P.device)
        L = torch.linalg.cholesky(P + 1e-6 * P.diagonal(dim1=1, dim2=2).mean(1)[:, None, None] * eye)
    S = torch.cholesky_inverse(L)
    mean = (S @ h.unsqueeze(-1)).squeeze(-1)  # a batched product: cholesky_solve costs ~30 us a matrix here
    # a weight the prior pins to zero gets a mean ~1e-20 and covariances ~1e-40: subnormal numbers, or products
    # of two such means, which CPUs compute 10-100x slower (a fit went from 2 to 16 s an epoch). Covariances are
    # flushed by the threads' FPU flags (``in_threads``, ``train._flush_denormal``); means below sqrt(tiny) are
    # rounded to zero so that no product of two is subnormal in later matrix products on other threads.
    mean = mean.masked_fill(mean.abs() < torch.finfo(S.dtype).tiny ** 0.5, 0.0)
    return mean, S, -2.0 * torch.log(torch.diagonal(L, dim1=1, dim2=2)).sum(1)


def natural_gaussian(P: torch.Tensor, h: torch.Tensor):
    """A batch of Gaussians given in natural form (precision P, G x D x D; P mean = h, G x D): the means, the
    covariances S = P^-1 and their log determinants, by one Cholesky factorisation each (on all CPU threads)."""
    return in_threads(_factorise, P, h)


class SpexVI(Task):
    """The variational state and its updates. ``Y`` (N x G) and ``Z`` (N x C) are centred tensors.

    ``batch_size=None`` runs exact coordinate ascent (one batch, step 1). With a batch size, each epoch visits
    the cells in random minibatches: the batch's factors are updated exactly (local step), then the global
    factors take a natural-gradient step of size ``rho_t = (t + 1)^-forget`` towards the update that the batch,
    scaled up to N cells, implies (stochastic VI, Hoffman et al. 2013).

    The rows come from a data source (``pathfactor.data.stream``): pass tensors ``Y``, ``Z`` (held in memory), or
    a row source as ``Y`` (``Z=None``; e.g. ``BackedRows``, streamed from a backed .h5ad). ``reduce`` sums a dict of
    per-cell sums over the processes of a data-parallel fit (``pathfactor.distributed``): each process then holds
    its own cells, and the statistics and the ELBO's per-cell sums cover all of them.
    """

    state_exclude = ("Y", "Z", "data")  # the data: not part of the state
    rebinds_state = True  # every update binds new tensors

    @property
    def objective_scale(self) -> float:
        """The ELBO sums over N x G observations (``train`` compares its changes per observation)."""
        return float(self.N * self.G)

    def __init__(self, Y: torch.Tensor, Z: torch.Tensor, s: torch.Tensor, X0: torch.Tensor,
                 slab_confidence: float = 0.5, noise_prior: tuple[float, float] = (1.0, 0.01),
                 tau: float | None = None, free_start: bool = True, batch_size: int | None = None,
                 forget: float = 0.7, generator: torch.Generator | None = None, posterior: str = "blocked",
                 reduce=None, unit: float = 1.0):
        self.data = Y if hasattr(Y, "blocks") else TensorRows(Y, Z)
        self.Y, self.Z, self.reduce = getattr(self.data, "Y", None), self.data.Z, reduce
        self.N = self.data.N if reduce is None else int(reduce({"n": self.data.N})["n"])
        self.G = self.data.G
        self.K, self.C = s.shape[1], self.Z.shape[1]
        self.D = self.K + self.C
        self.batch_size = None if batch_size is None or batch_size >= self.N else int(batch_size)
        if posterior not in ("blocked", "mean-field"):
            raise ValueError(f"posterior must be 'blocked' or 'mean-field', got {posterior!r}")
        if posterior == "mean-field" and self.batch_size is not None:
            raise ValueError("the mean-field posterior q(W) q(B) is only implemented for full batches (batch_size=None)")
        self.mean_field = posterior == "mean-field"
        self.forget, self.generator, self.t = float(forget), generator, 0
        dt, dev = self.data.dtype, self.data.device
        self._eye_K = torch.eye(self.K, dtype=dt, device=dev)
        yy = self.data.sum_squares()
        self._yy = yy if reduce is None else reduce({"yy": yy})["yy"]    # sum_n y_ng^2 over all cells
        yy = self._yy
        var = (yy / self.N).mean().clamp_min(1e-12)
        self.a0, self.b0 = float(noise_prior[0]), float(noise_prior[1]) * float(var)
        # q(X): point initialisation, no covariance yet
        self.mu = X0.to(dt)
        self.Sigma_x = torch.zeros(self.K, self.K, dtype=dt, device=dev)
        # priors and q(sigma2)
        self.b_prior = SharedVariance((self.C,), count=self.G, a0=1.0, b0=float(unit) ** 2, start=float(unit) ** 2,
                                      dtype=dt, device=dev)                # q(v_c), the variance of B's column c
        self.lam = HalfCauchy((self.G, self.K), dtype=dt, device=dev)
        self.tau = (HalfCauchy((self.K,), s0=float(unit), count=self.G, dtype=dt, device=dev) if tau is None
                    else FixedScale((self.K,), tau, dtype=dt, device=dev))
        self.slab = RandomSlab(s.to(dt), alpha=slab_confidence)
        if free_start:  # first loadings under the widest slab everywhere: the data, not the start, decide gains
            self.slab.q.rate = torch.full_like(self.slab.q.rate, float(self.slab.rate0.max()))
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
        """G x D prior precision of (w_g, b_g): E[1/tau^2] E[1/lam^2] + E[1/c^2] (seed 002 eq. 5), then E[1/v_c]."""
        prec_w = self.tau.mean_inv[None, :] * self.lam.mean_inv + self.slab.mean_inv
        return torch.cat([prec_w, self.b_prior.mean_inv[None, :].expand(self.G, self.C)], dim=1)

    def _stats(self, cells, mu: torch.Tensor) -> dict[str, torch.Tensor]:
        """Sufficient statistics of a batch of cells, scaled up to N cells: E[F]^T Y (D x G), E[F^T F] (D x D),
        sum_n y_ng^2 (G) and sum_n |mu_n|^2, for F = [X, Z]. ``mu``: the batch's factor means, in its order."""
        full, parts, start = _is_all(cells), [], 0
        for Y, Z in self.data.blocks(cells):
            parts.append(self._block_sums(Y, Z, mu[start:start + Y.shape[0]], full))
            start += Y.shape[0]
        return self._scaled(parts, full)

    def _block_sums(self, Y, Z, mu, full: bool) -> dict:
        """The unscaled per-cell sums of one block of rows (``sum_n y_ng^2`` is known beforehand for all cells)."""
        XtZ = mu.T @ Z
        A = torch.cat([torch.cat([mu.T @ mu, XtZ], 1), torch.cat([XtZ.T, Z.T @ Z], 1)], 0)
        sums = {"FtY": torch.cat([mu.T @ Y, Z.T @ Y], 0), "A": A, "mu2": (mu * mu).sum(), "n": Y.shape[0]}
        if not full:
            sums["yy"] = (Y * Y).sum(0)
        return sums

    def _scaled(self, parts: list[dict], full: bool) -> dict[str, torch.Tensor]:
        """Blocks' sums added up (and over processes), E[x x^T] = mu mu^T + Sigma_x, all scaled up to N cells."""
        stats = parts[0] if len(parts) == 1 else {k: sum(p[k] for p in parts) for k in parts[0]}
        if self.reduce is not None:
            stats = self.reduce(stats)
        n, K = stats.pop("n"), self.K
        stats["A"][:K, :K] += n * self.Sigma_x
        if full:
            stats["yy"] = self._yy
        scale = self.N / n
        return stats if scale == 1.0 else {k: scale * v for k, v in stats.items()}

    # ----------------------------------------------------------------------------------------- updates
    def _factor_maps(self):
        """Sigma_x = (I + sum_g psi_g E[w_g w_g^T])^-1 (set) and the maps of y_n and z_n to mu_n."""
        Q, K = self.second_moment(), self.K
        Sigma_x = torch.linalg.inv(self._eye_K + Q[:K, :K])
        self.Sigma_x = 0.5 * (Sigma_x + Sigma_x.T)
        return self.M[:, :K] * self.psi[:, None], Q[K:, :K]

    def _local_factors(self, cells) -> torch.Tensor:
        """q(x_n) = N(mu_n, Sigma_x), Sigma_x = (I + sum_g psi_g E[w_g w_g^T])^-1,
        mu_n = Sigma_x (sum_g psi_g (E[w_g] y_ng - E[w_g b_g^T] z_n))."""
        Wpsi, QzK = self._factor_maps()
        mus = [(Y @ Wpsi - Z @ QzK) @ self.Sigma_x for Y, Z in self.data.blocks(cells)]
        return mus[0] if len(mus) == 1 else torch.cat(mus)

    def _local_step(self, cells):
        """The batch's factors (``_local_factors``) and statistics (``_stats``) in one sweep over its rows."""
        Wpsi, QzK = self._factor_maps()
        full, mus, parts = _is_all(cells), [], []
        for Y, Z in self.data.blocks(cells):
            mus.append((Y @ Wpsi - Z @ QzK) @ self.Sigma_x)
            parts.append(self._block_sums(Y, Z, mus[-1], full))
        return (mus[0] if len(mus) == 1 else torch.cat(mus)), self._scaled(parts, full)

    def _update_loadings(self, stats: dict[str, torch.Tensor], rho: float) -> None:
        """q(w_g, b_g) = N(m_g, S_g) with natural parameters S_g^-1 = psi_g E[F^T F] + diag(prior precision) and
        S_g^-1 m_g = psi_g E[F]^T y_g, moved a step ``rho`` towards the batch's values (rho = 1: exact CAVI)."""
        if self.mean_field and self.C:
            return self._update_loadings_mean_field(stats)
        psi, prec, A = self.psi, self.prior_precision(), stats["A"]
        P = psi[:, None, None] * A
        P.diagonal(dim1=1, dim2=2).add_(prec)
        h = psi[:, None] * stats["FtY"].T
        if rho < 1.0:
            P, h = (1 - rho) * self._P + rho * P, (1 - rho) * self._h + rho * h
        self.M, S, logdet = natural_gaussian(P, h)
        self._set_covariance(S, logdet)
        self._P, self._h = P, h

    def _update_loadings_mean_field(self, stats: dict[str, torch.Tensor]) -> None:
        """The factorised alternative q(w_g) q(b_g) (MuVI's): q(w_g) given E[b_g], then q(b_g) given E[w_g]."""
        K, psi, prec, A, FtY = self.K, self.psi, self.prior_precision(), stats["A"], stats["FtY"].T
        M = self.M.clone() if hasattr(self, "M") else torch.zeros(self.G, self.D, dtype=A.dtype, device=A.device)
        blocks = []
        for own, other in ((slice(0, K), slice(K, None)), (slice(K, None), slice(0, K))):
            P = psi[:, None, None] * A[own, own] + torch.diag_embed(prec[:, own])
            h = psi[:, None] * (FtY[:, own] - M[:, other] @ A[other, own])
            M[:, own], S, logdet = natural_gaussian(P, h)
            blocks.append((S, logdet))
        self.M = M
        self._set_covariance(_block_diagonal(blocks[0][0], blocks[1][0]), blocks[0][1] + blocks[1][1])

    def _set_covariance(self, S: torch.Tensor, logdet: torch.Tensor) -> None:
        self.S, self.logdet_S = S, logdet
        self.S_diag = torch.diagonal(S, dim1=1, dim2=2).clone()

    def _update_noise_and_priors(self, stats: dict[str, torch.Tensor], rho: float) -> None:
        """q(sigma2_g) (a step ``rho`` in its rate), then q(lam), q(tau), q(c) given q(W)."""
        M, A, FtY = self.M, stats["A"], stats["FtY"]
        if rho == 1.0:  # tr(A S_g) = (D - sum_k prec_gk S_g,kk) / psi_g, because psi_g A = S_g^-1 - diag(prec_g)
            tr_AS = (self.D - (self.prior_precision() * self.S_diag).sum(1)) / self.psi
        else:  # a blended S_g^-1 has no such form: sum_ij A_ij S_g,ij
            tr_AS = (self.S.reshape(self.G, -1) @ A.reshape(-1))
        self.sq_resid = (stats["yy"] - 2 * (M * FtY.T).sum(1) + ((M @ A) * M).sum(1) + tr_AS).clamp_min(0)
        self.sigma2.rate = (1 - rho) * self.sigma2.rate + rho * (self.b0 + 0.5 * self.sq_resid)
        Ew2 = (M * M + self.S_diag)[:, : self.K]
        self.lam.update(0.5 * Ew2 * self.tau.mean_inv[None, :])
        self.tau.update(0.5 * (Ew2 * self.lam.mean_inv).sum(0))
        self.slab.update(Ew2)
        self.b_prior.update((M[:, self.K:] ** 2 + self.S_diag[:, self.K:]).sum(0))
        self._mu2 = stats["mu2"]

    def _ridge(self):
        """Eigen-decompositions behind the shear, in the coordinates A~ = A P^1/2 (P = diag E[1/v_c]): Phi =
        sum_g E[w_g w_g^T] = U diag(a) U^T (curvature of the B prior along A~) and P^-1/2 Z^T Z P^-1/2 =
        V diag(d) V^T (curvature of the X prior); also P^-1/2."""
        K, Mw = self.K, self.M[:, : self.K]
        Phi = Mw.T @ Mw + self._sum_covariance()[:K, :K]
        a, U = torch.linalg.eigh(Phi)
        p_isqrt = self.b_prior.mean_inv.rsqrt()
        ZtZ = self._summed(ZtZ=self.Z.T @ self.Z)["ZtZ"]
        d, V = torch.linalg.eigh(p_isqrt[:, None] * ZtZ * p_isqrt[None, :])
        return a, U, d, V, p_isqrt

    def _summed(self, **sums) -> dict:
        """Per-cell sums over all cells (over the processes of a data-parallel fit)."""
        return sums if self.reduce is None else self.reduce(sums)

    def _sum_covariance(self) -> torch.Tensor:
        """sum_g S_g (D x D)."""
        return self.S.sum(0)

    def _shear(self) -> None:
        """Parameter-expansion step along the likelihood's symmetry x_n -> x_n - A z_n, b_g -> b_g + A^T w_g.

        Only the X prior -1/2 sum_n |mu_n - A z_n|^2 and the B prior -1/2 sum_g E[(b_g + A^T w_g)^T P (b_g + A^T w_g)]
        (P = diag E[1/v_c]) change, so the best A solves Phi A P + A Z^T Z = mu^T Z - sum_g E[w_g b_g^T] P; with
        A = A~ P^-1/2 that is the Sylvester equation Phi A~ + A~ (P^-1/2 Z^T Z P^-1/2) = (right side) P^-1/2,
        solved in the two eigenbases. q(w_g, b_g) is mapped by the unit-determinant shear L = [[I, 0], [A^T, I]]: entropy and
        expected likelihood stay put, and the ELBO rises by the prior terms."""
        K = self.K
        a, U, d, V, p_isqrt = self._ridge()
        Mw, Mb, p = self.M[:, :K], self.M[:, K:], self.b_prior.mean_inv
        rhs = self._summed(XtZ=self.mu.T @ self.Z)["XtZ"] - (Mw.T @ Mb + self._sum_covariance()[:K, K:]) * p[None, :]
        A = (U @ ((U.T @ (rhs * p_isqrt[None, :]) @ V) / (a[:, None] + d[None, :])) @ V.T) * p_isqrt[None, :]
        self.mu = self.mu - self.Z @ A.T
        self._mu2 = self._summed(mu2=(self.mu * self.mu).sum())["mu2"]
        L = torch.eye(self.D, dtype=A.dtype, device=A.device)
        L[K:, :K] = A.T
        self.M = self.M @ L.T
        self.S = L @ self.S @ L.T                              # S_g -> L S_g L^T
        self.S_diag = torch.diagonal(self.S, dim1=1, dim2=2).clone()
        if hasattr(self, "_P"):                                # natural parameters: P -> L^-T P L^-1, h -> L^-T h
            Linv_shear = torch.linalg.inv(L)
            self._P = Linv_shear.T @ self._P @ Linv_shear
            self._h = self._h @ Linv_shear

    def covariate_effects_var(self) -> torch.Tensor:
        """G x C posterior variances of B: diag of S_g's B block plus the variance along the shear ridge.

        The ELBO is quadratic in A~ = A P^1/2 with precision (P^-1/2 Z^T Z P^-1/2) (x) I + I (x) Phi; taking A~ from
        N(0, that^-1) (a Laplace step along the symmetry, which q(X) q(W, B) cannot represent) adds
        Var(A^T E[w_g]) to b_g: sum_ij (U^T m_wg)_i^2 V_cj^2 / (a_i + d_j) / P_c."""
        K = self.K
        var = self.S_diag[:, K:]
        if self.mean_field or not self.C:
            return var
        a, U, d, V, p_isqrt = self._ridge()
        proj2 = (self.M[:, :K] @ U) ** 2                         # G x K
        return var + (proj2 @ (1.0 / (a[:, None] + d[None, :])) @ (V * V).T) * (p_isqrt**2)[None, :]

    def second_moment(self) -> torch.Tensor:
        """Q = sum_g psi_g E[(w_g, b_g)(w_g, b_g)^T] (D x D)."""
        psi, M = self.psi, self.M
        return (M * psi[:, None]).T @ M + (psi @ self.S.reshape(self.G, -1)).reshape(self.D, self.D)

    def _batches(self):
        if self.batch_size is None:
            return [slice(None)]
        order = torch.randperm(self.data.N, generator=self.generator).to(self.data.device)
        if self.reduce is None:
            return list(order.split(self.batch_size))
        # across processes every one must take part in every step: the same number of batches everywhere
        return list(order.tensor_split(math.ceil(self.N / self.batch_size)))

    def epoch(self) -> float:
        """One pass: per batch, the factors X, then a step for (W, B), sigma2, lam, tau, c. Returns the ELBO
        (exact for full batches; for minibatches the mean of the batches' unbiased estimates)."""
        elbos = []
        for cells in self._batches():
            mu, stats = self._local_step(cells)
            rho = 1.0 if self.batch_size is None else (self.t + 1.0) ** -self.forget
            self._update_loadings(stats, rho)
            self._update_noise_and_priors(stats, rho)
            if self.batch_size is None:
                self.mu = mu
                if self.C and not self.mean_field:
                    self._shear()
            self.t += 1
            elbos.append(float(self.elbo()))
        return sum(elbos) / len(elbos)

    def scores(self) -> torch.Tensor:
        """Posterior means of the factors of all cells (of this process's cells, in a data-parallel fit) under the
        current global factors."""
        if self.batch_size is None:
            return self.mu
        return self._local_factors(slice(None))

    # ----------------------------------------------------------------------------------------- ELBO
    def elbo(self) -> torch.Tensor:
        """ELBO at the current state (seed 002's objective); uses the last batch's scaled statistics."""
        N, K, G = self.N, self.K, self.G
        s2 = self.sigma2
        lik = -0.5 * (N * (_LOG_2PI + s2.mean_log) + s2.mean_inv * self.sq_resid).sum()
        logdet_Sx = torch.logdet(self.Sigma_x)
        x_term = 0.5 * (N * K + N * logdet_Sx - N * torch.trace(self.Sigma_x) - self._mu2)
        noise = (s2.expected_log_prior(self.a0, self.b0) + s2.entropy()).sum()
        return lik + x_term + noise + loading_terms(self)

    # ----------------------------------------------------------------------------------------- results
    def covariance(self) -> torch.Tensor:
        """Full posterior covariances S_g of (w_g, b_g), G x D x D."""
        return self.S

    def loadings_sd(self) -> torch.Tensor:
        """Posterior sd of (W, B); B's includes the ridge variance (``covariate_effects_var``)."""
        return torch.cat([self.S_diag[:, : self.K], self.covariate_effects_var()], dim=1).sqrt()


def loading_terms(vi) -> torch.Tensor:
    """The ELBO's terms of the loadings and effects, shared by the Gaussian and NB inference: E[log p(W | tau,
    lam, c)] + E[log p(B)] + the entropy of the q(w_g, b_g), plus the scale priors' own terms."""
    K = vi.K
    Ew2 = vi.M * vi.M + vi.S_diag
    Ew2_W, Ew2_B = Ew2[:, :K], Ew2[:, K:]
    w_prior = gaussian_prior_terms(Ew2_W, vi.tau.mean_inv[None, :] * vi.lam.mean_inv,
                                   vi.tau.scale2.mean_log[None, :] + vi.lam.scale2.mean_log)
    w_prior = w_prior + gaussian_prior_terms(Ew2_W, vi.slab.mean_inv, vi.slab.q.mean_log)
    b = vi.b_prior
    w_prior = w_prior + gaussian_prior_terms(Ew2_B, b.mean_inv[None, :].expand_as(Ew2_B),
                                             b.scale2.mean_log[None, :].expand_as(Ew2_B))
    w_entropy = 0.5 * (vi.G * vi.D * (1 + _LOG_2PI) + vi.logdet_S.sum())
    return w_prior + w_entropy + vi.lam.elbo() + vi.tau.elbo() + vi.slab.elbo() + b.elbo()


def _block_diagonal(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Batched block-diagonal matrices [[A, 0], [0, B]]."""
    G, k, c = A.shape[0], A.shape[1], B.shape[1]
    out = A.new_zeros(G, k + c, k + c)
    out[:, :k, :k], out[:, k:, k:] = A, B
    return out


def _is_all(cells) -> bool:
    """Whether ``cells`` selects every cell (a full batch)."""
    return isinstance(cells, slice) and cells == slice(None)
