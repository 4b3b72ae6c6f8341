"""Closed-form variational inference for the spex-LVM factor model (seed 002).

Model (seed 002, eqs. 2-5; covariates as in seed 000)::

    y_n = W x_n + B z_n + eps_n,   eps_n ~ N(0, diag(sigma2)),   x_n ~ N(0, I_K),   b_gc ~ N(0, v_c)
    w_gk ~ N(0, (1 / (tau_k^2 lam_gk^2) + 1 / c_gk^2)^-1)   (regularised horseshoe, normalised; ``_spex_prior``)
    lam_gk ~ C+(0, 1), c_gk^2 ~ IG(alpha, alpha s_gk^2),   sigma2_g ~ IG(a0, b0),   v_c ~ IG(1, u^2)
    tau_k fixed (default) or tau_k ~ C+(0, u)

``u`` (``unit``) is the data's typical standard deviation, as are the slab widths ``s`` and a fixed ``tau``, and
``b0`` scales with the data's variance: every prior is in the data's units, so data in other units (x 1000,
x 1e-4) give the same factors, with loadings and effects in those units. The variance ``v_c`` of each covariate's
effects is learned from all genes (automatic relevance determination): only the priors of X and B decide how
the likelihood's ridge ``x -> x - A z``, ``b -> b + A^T w`` is split, so B's prior scale must come from the data.

One global scale per factor. Written as the unnormalised product N(w; 0, tau^2 lam^2) N(w; 0, c^2), the prior's
missing normaliser rewards small scales, and a learned tau collapsed onto the width of the out-of-set slab (most of
a factor's genes lie outside its gene set), pruning real but weak programs. The normalised prior (bounded with one
share per weight, ``priors.regularised_horseshoe_terms``) lets a weight pinned by a narrow slab count for its slab
only, so tau is learned from the weights the slab leaves free.

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
through per-cell sums, the sufficient statistics ``E[F]^T Y``, ``E[F^T F]`` and ``sum_n y_ng^2`` with F = [X, Z]
(and ``sum_n |mu_n|^2`` for the ELBO).

Minibatches (``batch_size``): memoized VI (Hughes & Sudderth 2013), not stochastic VI. The cells are dealt once,
by one random permutation of runs of neighbouring cells (a sixteenth of a batch, at most 4096 cells: a batch of a
backed file is then read in long slices), into ``ceil(N / batch_size)`` fixed batches (each process of a data-parallel fit deals
its own cells into that many), and each batch keeps its share of the statistics that depend on the factors:
``mu_b^T Y_b`` (K x G), ``mu_b^T mu_b`` and ``mu_b^T Z_b``, with their running totals over the batches (float64;
``Z^T Y``, ``Z^T Z`` and ``sum y^2`` never change). A visit to batch b sets Sigma_x (it depends only on the global
factors, so this is the exact update of every cell's covariance) and the batch's means mu_b, swaps its old share
in the totals for the new one, and makes the exact updates of the loadings, noise and priors from the totals,
summed over processes: step 1, no learning rate, no batch scaled up to N cells. Every step is then a
coordinate-ascent step on the full-data ELBO, which is computed from the totals, so it is exact and rises
monotonically, the fixed points are the full-batch fit's, and the engine's convergence test reads the exact ELBO
(measured, ``benchmarks/minibatch.py``: batches of 250 and 1000 out of 2000 cells end within 2e-5 of the
full-batch ELBO, with the same mask F1, in about half the epochs).

Each visit also takes the shear, from the totals: ``mu^T Z`` summed over all cells is a total, and the shift
mu_n -> mu_n - A z_n of every cell's mean maps the totals in closed form (``_shear_totals``). The stored shares are
not touched then: shears add up, so a share taken when the accumulated shear was A_b is brought up to date at its
batch's next visit with A = A_now - A_b and that batch's ``Z_b^T Y_b`` and ``Z_b^T Z_b``, computed from the rows
read anyway (``_visit``), before it leaves the totals.

Cost: an epoch is one pass over the data plus ``n_batches`` global updates (a batched Cholesky and a shear each),
so it takes longer than a full-batch epoch; fewer epochs are needed. Memory: the shares take
``n_batches x K x G`` numbers in the data's dtype (plus ``n_batches x K x (K + 2C)`` in float64), about
``K / batch_size`` times the data's N x G (50 factors in batches of 250 cells: a fifth of the data; 10 in batches
of 2048: 0.5 %); a batch_size below K is warned about (its shares outgrow the data). The factor means themselves are
not held (``scores`` computes them under the final global factors). The mean-field posterior is only implemented
for full batches.
"""
from __future__ import annotations

import logging
import math

import torch

from ..data.stream import TensorRows
from ..priors import FixedScale, HalfCauchy, InverseGamma, RandomSlab, SharedVariance
from ._spex_blocks import GeneCovariances, batched_inverse, conjugate_gradient_means, coupled_weights, factorise
from ._spex_prior import loading_terms, starting_slab_rate, update_scales, weight_precision
from ..train import Task, one_thread

_LOG_2PI = math.log(2 * math.pi)

log = logging.getLogger(__name__)


def in_threads(fn, *batches: torch.Tensor):
    """``fn`` over the leading (batch) dimension of ``batches``, split across the CPU threads torch may use.

    torch runs a batch of small LAPACK factorisations on one thread, and with several threads asked for it can
    even stall (measured: a batched cholesky_inverse of 4000 100 x 100 matrices took 2 s on one thread, 16 s
    on two). Chunks on Python threads, each op on one thread, use all cores instead."""
    n = torch.get_num_threads()
    small = batches[0][0].numel() ** 1.5 * batches[0].shape[0] < 2e6  # ~ the flops of the batch's factorisations
    if n == 1 or batches[0].device.type != "cpu" or batches[0].shape[0] < 2 * n or small:
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
    S, logdet = batched_inverse(P)
    mean = (S @ h.unsqueeze(-1)).squeeze(-1)  # a batched product: cholesky_solve costs ~30 us a matrix here
    return _flush_tiny(mean), S, logdet


def _flush_tiny(mean: torch.Tensor) -> torch.Tensor:
    """A weight the prior pins to zero gets a mean ~1e-20 and covariances ~1e-40: subnormal numbers, or products
    of two such means, which CPUs compute 10-100x slower (a fit went from 2 to 16 s an epoch). Covariances are
    flushed by the threads' FPU flags (``in_threads``, ``train._flush_denormal``); means below sqrt(tiny) are
    rounded to zero so that no product of two is subnormal in later matrix products on other threads."""
    return mean.masked_fill(mean.abs() < torch.finfo(mean.dtype).tiny ** 0.5, 0.0)


def ridge_eigen(Phi: torch.Tensor, ZtZ: torch.Tensor, p: torch.Tensor):
    """Eigen-decompositions behind a shear x -> x - A z, theta -> theta + A^T w, in the coordinates A~ = A P^1/2
    (P = diag p, the prior precisions of the sheared columns): Phi = sum_g E[w_g w_g^T] = U diag(a) U^T (curvature of
    their prior along A~) and P^-1/2 Z^T Z P^-1/2 = V diag(d) V^T (curvature of the X prior). Returns
    (a, U, d, V, P^-1/2)."""
    a, U = torch.linalg.eigh(Phi)
    p_isqrt = p.rsqrt()
    d, V = torch.linalg.eigh(p_isqrt[:, None] * ZtZ * p_isqrt[None, :])
    return a, U, d, V, p_isqrt


def best_shear(ridge, rhs: torch.Tensor) -> torch.Tensor:
    """The A (K x C) solving the Sylvester equation Phi A P + A Z^T Z = rhs, in the eigenbases of ``ridge``
    (:func:`ridge_eigen`)."""
    a, U, d, V, p_isqrt = ridge
    return (U @ ((U.T @ (rhs * p_isqrt[None, :]) @ V) / (a[:, None] + d[None, :])) @ V.T) * p_isqrt[None, :]


def sheared_loadings(M: torch.Tensor, S: torch.Tensor, A: torch.Tensor, K: int):
    """q(theta_g) mapped by the unit-determinant shear L = [[I, 0], [A^T, I]] (theta_g = [w_g, the sheared
    coefficients]): the means M L^T and covariances L S_g L^T, where only the sheared rows and columns move."""
    L = torch.eye(M.shape[1], dtype=A.dtype, device=A.device)
    L[K:, :K] = A.T
    S_new = S.clone()
    S_new[:, :, K:] += S[:, :, :K] @ A                     # S_g L^T
    S_new[:, K:, :] += A.T @ S_new[:, :K, :]               # L (S_g L^T)
    return M @ L.T, S_new


def natural_gaussian(P: torch.Tensor, h: torch.Tensor):
    """A batch of Gaussians given in natural form (precision P, G x D x D; P mean = h, G x D): the means, the
    covariances S = P^-1 and their log determinants, by one Cholesky factorisation each (on all CPU threads)."""
    return in_threads(_factorise, P, h)


class _Shares:
    """Each minibatch's share of the memoized statistics, as attributes ``xy<i>`` (``mu_b^T Y_b``, K x G, in the
    data's dtype) and ``loc<i>`` (``[mu_b^T mu_b, mu_b^T Z_b, A_b]``, K x (K + 2C), float64; A_b: the accumulated
    shear when the share was taken). One tensor per batch, found by the engine's state walk (checkpoints, rollback)
    and rebound, never written into, when its batch is visited (``Task.rebinds_state``)."""

    def get(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"xy{i}"), getattr(self, f"loc{i}")

    def put(self, i: int, xy: torch.Tensor, loc: torch.Tensor) -> None:
        setattr(self, f"xy{i}", xy)
        setattr(self, f"loc{i}", loc)


class SpexVI(Task):
    """The variational state and its updates. ``Y`` (N x G) and ``Z`` (N x C) are centred tensors.

    ``batch_size=None`` runs exact coordinate ascent (one batch). With a batch size, memoized VI (see the module
    docstring): the cells are dealt once into fixed batches; a visit to a batch updates its factors, replaces its
    share of the statistics in the running totals, and makes the exact global updates (and the shear) from the
    totals. The ELBO ``epoch`` returns is the exact full-data ELBO in both modes.

    The rows come from a data source (``pathfactor.data.stream``): pass tensors ``Y``, ``Z`` (held in memory), or
    a row source as ``Y`` (``Z=None``; e.g. ``BackedRows``, streamed from a backed .h5ad). ``reduce`` sums a dict of
    per-cell sums over the processes of a data-parallel fit (``pathfactor.distributed``): each process then holds
    its own cells (and, with minibatches, its own batches and their shares; the totals are reduced at every
    visit, and every process makes the same number of visits), and the statistics and the ELBO's per-cell sums
    cover all of them.
    """

    state_exclude = ("Y", "Z", "data")  # the data: not part of the state
    rebinds_state = True  # every update binds new tensors
    resizable_state = ("cov.cols", "cov.S")  # the block family's flat storage (``_spex_blocks``)

    @property
    def objective_scale(self) -> float:
        """The ELBO sums over N x G observations (``train`` compares its changes per observation)."""
        return float(self.N * self.G)

    def __init__(self, Y: torch.Tensor, Z: torch.Tensor, s: torch.Tensor, X0: torch.Tensor,
                 slab_confidence: float = 0.5, noise_prior: tuple[float, float] = (1.0, 0.01),
                 tau: float | None = None, start: str = "wide", batch_size: int | None = None,
                 generator: torch.Generator | None = None, posterior: str = "blocked",
                 reduce=None, unit: float = 1.0, effects=None, coupling: float | None = None):
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
        if effects is not None and (self.batch_size is not None or self.Y is None or reduce is not None):
            raise ValueError("interventions are fitted with all cells in memory: leave batch_size=None and pass "
                             "the data in memory (not backed, not data-parallel)")
        self.effects = effects  # q(c, beta) of interventions acting on the factors (``_spex_effects``), or None
        # the block family of q(w_g) (``_spex_blocks``); the full covariance with covariates (the shear maps it) and
        # for the mean-field posterior
        self.coupling = None if (coupling is None or self.Z.shape[1] or self.mean_field) else float(coupling)
        self.cg_rtol = 1e-5  # each sweep's conjugate gradients start from the last means: accuracy accumulates
        self.generator = generator
        dt, dev = self.data.dtype, self.data.device
        self._eye_K = torch.eye(self.K, dtype=dt, device=dev)
        yy = self.data.sum_squares()
        self._yy = yy if reduce is None else reduce({"yy": yy})["yy"]    # sum_n y_ng^2 over all cells
        yy = self._yy
        self._ZtZ = self._summed(ZtZ=self.Z.T @ self.Z)["ZtZ"]            # sum_n z_n z_n^T over all cells
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
        self.sigma2 = InverseGamma(torch.full((self.G,), self.a0 + 0.5 * self.N, dtype=dt, device=dev),
                                   (yy / self.N).clamp_min(1e-6 * float(var)) * (self.a0 + 0.5 * self.N))
        self._start_slabs(start)
        if self.batch_size is None:
            stats = self._stats(slice(None), self.mu)
        else:
            stats = self._memoize_start()
        self._update_loadings(stats)
        self._update_noise_and_priors(stats)

    def _start_slabs(self, start: str) -> None:
        """The slabs of the first loading update (``starting_slab_rate``), d_g from the starting factors and the
        total variance."""
        information = None
        if start == "informed":
            x2 = self._summed(mu2=(self.mu * self.mu).sum())["mu2"] / (self.N * max(self.K, 1))
            information = self.N * self.sigma2.mean_inv * x2.clamp_min(1e-12)
        self.slab.q.rate = starting_slab_rate(self.slab, start, information)

    # ----------------------------------------------------------------------------------------- pieces
    @property
    def psi(self) -> torch.Tensor:
        """E[1 / sigma2_g]."""
        return self.sigma2.mean_inv

    def prior_precision(self) -> torch.Tensor:
        """G x D prior precision of (w_g, b_g): E[1/tau^2] E[1/lam^2] + E[1/c^2] (seed 002 eq. 5), then E[1/v_c]."""
        return torch.cat([weight_precision(self), self.b_prior.mean_inv[None, :].expand(self.G, self.C)], dim=1)

    def _stats(self, cells, mu: torch.Tensor) -> dict[str, torch.Tensor]:
        """Sufficient statistics of a set of cells (all of them: ``slice(None)``): E[F]^T Y (D x G), E[F^T F]
        (D x D), sum_n y_ng^2 (G) and sum_n |mu_n|^2, for F = [X, Z]. ``mu``: their factor means, in their order."""
        full, total, start = _is_all(cells), None, 0
        for Y, Z in self.data.blocks(cells):
            total = _accumulated(total, self._block_sums(Y, Z, mu[start:start + Y.shape[0]], full))
            start += Y.shape[0]
        return self._added(total, full)

    def _block_sums(self, Y, Z, mu, full: bool) -> dict:
        """The per-cell sums of one block of rows (``sum_n y_ng^2`` is known beforehand for all cells)."""
        XtZ = mu.T @ Z
        A = torch.cat([torch.cat([mu.T @ mu, XtZ], 1), torch.cat([XtZ.T, Z.T @ Z], 1)], 0)
        sums = {"FtY": torch.cat([mu.T @ Y, Z.T @ Y], 0), "A": A, "mu2": (mu * mu).sum(), "n": Y.shape[0]}
        if not full:
            sums["yy"] = (Y * Y).sum(0)
        return sums

    def _added(self, stats: dict, full: bool) -> dict[str, torch.Tensor]:
        """The blocks' sums (``_accumulated``), added over processes, with E[x x^T] = mu mu^T + Sigma_x."""
        if self.reduce is not None:
            stats = self.reduce(stats)
        n, K = stats.pop("n"), self.K
        stats["A"][:K, :K] += n * self.Sigma_x
        if full:
            stats["yy"] = self._yy
        return stats

    # ----------------------------------------------------------------------------------------- minibatches
    def _memoize_start(self) -> dict[str, torch.Tensor]:
        """Deal the cells into fixed batches (one random permutation; each batch sorted, so a backed file is read in
        increasing row order), take every batch's share of the statistics at the starting factors ``self.mu``
        (one pass over the data), and return the totals' statistics (those of the full-batch start)."""
        dev, dt, K, C = self.data.device, self.data.dtype, self.K, self.C
        self.n_batches = math.ceil(self.N / self.batch_size)  # the same number in every process of a parallel fit
        # cells dealt in runs of neighbours (a sixteenth of a batch, at most 4096), so that a batch of a backed file
        # is read in long slices: rows scattered one in n_batches cost HDF5 about 5x the bytes read
        unit = min(4096, max(1, self.batch_size // 16))
        if math.ceil(self.data.N / unit) < self.n_batches:
            unit = 1
        runs = torch.arange(self.data.N).split(unit)
        dealt = torch.randperm(len(runs), generator=self.generator).tensor_split(self.n_batches)
        batches = [torch.cat([runs[i] for i in group.tolist()]).sort().values if len(group)
                   else torch.zeros(0, dtype=torch.long) for group in dealt]
        self._order = torch.cat(batches).to(dev)
        self._batch_sizes = [len(b) for b in batches]
        self._shares = _Shares()
        f64 = dict(dtype=torch.float64, device=dev)
        self._tot_xy, self._tot_loc = torch.zeros(K, self.G, **f64), torch.zeros(K, K + C, **f64)
        self._acc = torch.zeros(K, C, **f64)                   # the shears taken so far, added up
        self._zy = torch.zeros(C, self.G, **f64)               # Z^T Y of this process's cells
        for i, cells in enumerate(self._batches()):
            xy, xx, xz, zy, _ = self._batch_sums(cells, self.mu[cells])
            loc = torch.cat([xx, xz, self._acc], 1)
            self._shares.put(i, xy, loc)
            self._tot_xy, self._tot_loc = self._tot_xy + xy.double(), self._tot_loc + loc[:, :K + C]
            self._zy = self._zy + zy
        self._zy_all = self._summed(zy=self._zy)["zy"].to(dt)   # ... and of all cells
        self._zz = (self.Z.T @ self.Z).double()
        self.mu = None  # the factors live in the shares; ``scores`` gives them under the final global factors
        nbytes = self.n_batches * K * (self.G * torch.empty((), dtype=dt).element_size() + 8 * (K + 2 * C))
        log.info("memoized VI: %d batches of about %d cells; their statistics take %.1f MiB",
                 self.n_batches, math.ceil(self.data.N / self.n_batches), nbytes / 2**20)
        if K > self.batch_size:
            log.warning("batch_size=%d is smaller than the %d factors: the batches' stored statistics (K x G each) "
                        "take more memory than the data; a larger batch_size needs less", self.batch_size, K)
        return self._memo_stats()

    def _batches(self):
        if self.batch_size is None:
            return [slice(None)]
        return list(self._order.split(self._batch_sizes))

    def _batch_sums(self, cells, mu: torch.Tensor | None = None):
        """One sweep over a batch's rows: ``mu^T Y`` (data dtype), ``mu^T mu``, ``mu^T Z``, ``Z^T Y`` and ``Z^T Z``
        (float64). ``mu``: the batch's factor means in its order, or ``None`` for the posterior means under the
        current global factors (which also sets Sigma_x)."""
        maps = None if mu is not None else self._factor_maps()
        K, C, G, dev = self.K, self.C, self.G, self.data.device
        xy = torch.zeros(K, G, dtype=self.data.dtype, device=dev)
        xx, xz = torch.zeros(K, K, dtype=xy.dtype, device=dev), torch.zeros(K, C, dtype=xy.dtype, device=dev)
        zy, zz = torch.zeros(C, G, dtype=xy.dtype, device=dev), torch.zeros(C, C, dtype=xy.dtype, device=dev)
        start = 0
        for Y, Z in self.data.blocks(cells):
            if maps is None:
                m = mu[start:start + Y.shape[0]]
                start += Y.shape[0]
            else:
                m = (Y @ maps[0] - Z @ maps[1]) @ self.Sigma_x
            xy, xx, xz = xy + m.T @ Y, xx + m.T @ m, xz + m.T @ Z
            if C:
                zy, zz = zy + Z.T @ Y, zz + Z.T @ Z
        return xy, xx.double(), xz.double(), zy.double(), zz.double()

    def _visit(self, i: int, cells) -> dict[str, torch.Tensor]:
        """Batch ``i``'s factors under the current global factors, its new share of the statistics in place of its
        old one in the totals; returns the statistics of all cells (``_memo_stats``).

        The old share was taken before the shears since (``A = acc - A_b`` in all, shears add up), which moved each
        of the batch's means by ``-A z_n``; it is brought up to date before it leaves the totals:
        ``mu^T Y -> mu^T Y - A Z_b^T Y_b``, ``mu^T Z -> mu^T Z - A Z_b^T Z_b`` and
        ``mu^T mu -> mu^T mu - (mu^T Z) A^T - A (Z^T mu) + A Z_b^T Z_b A^T``."""
        K, C = self.K, self.C
        xy, xx, xz, zy, zz = self._batch_sums(cells)
        old_xy, old_loc = self._shares.get(i)
        old_xy, old_xx, old_xz, taken = old_xy.double(), old_loc[:, :K], old_loc[:, K:K + C], old_loc[:, K + C:]
        if C:
            A = self._acc - taken
            old_xx = old_xx - old_xz @ A.T - A @ old_xz.T + A @ zz @ A.T
            old_xy, old_xz = old_xy - A @ zy, old_xz - A @ zz
        loc = torch.cat([xx, xz, self._acc], 1)
        self._shares.put(i, xy, loc)
        self._tot_xy = self._tot_xy - old_xy + xy.double()
        self._tot_loc = self._tot_loc - torch.cat([old_xx, old_xz], 1) + loc[:, :K + C]
        return self._memo_stats()

    def _memo_stats(self) -> dict[str, torch.Tensor]:
        """The statistics of all cells from the totals (summed over processes), as ``_stats(slice(None), mu)``."""
        K, dt = self.K, self.data.dtype
        tot = self._summed(xy=self._tot_xy, loc=self._tot_loc)
        xx, xz = tot["loc"][:, :K], tot["loc"][:, K:]
        A = torch.cat([torch.cat([xx + self.N * self.Sigma_x.double(), xz], 1),
                       torch.cat([xz.T, self._ZtZ.double()], 1)], 0)
        return {"FtY": torch.cat([tot["xy"].to(dt), self._zy_all], 0), "A": A.to(dt), "yy": self._yy,
                "mu2": torch.trace(xx).to(dt)}

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
        """The factors (``_local_factors``) and statistics (``_stats``) of ``cells`` in one sweep over their rows."""
        Wpsi, QzK = self._factor_maps()
        full, mus, total = _is_all(cells), [], None
        if self.effects is not None:
            return self._local_step_with_effects(Wpsi, QzK)
        for Y, Z in self.data.blocks(cells):
            mus.append((Y @ Wpsi - Z @ QzK) @ self.Sigma_x)
            total = _accumulated(total, self._block_sums(Y, Z, mus[-1], full))
        return (mus[0] if len(mus) == 1 else torch.cat(mus)), self._added(total, full)

    def _local_step_with_effects(self, Wpsi, QzK):
        """q(X, theta) of the interventions (``_spex_effects``), blocked or mean-field, and the statistics of all
        cells: mu_n = Sigma_x (h_n + E[m_n]); Cov(x_n) adds J V_g J^T to Sigma_x."""
        eff, Sx = self.effects, self.Sigma_x
        u = (self.Y @ Wpsi - self.Z @ QzK) @ Sx                     # Sigma_x h_n
        if eff.blocked:
            eff.update(u, Sx)
            mu = u + eff.cell_means() @ Sx
        else:
            mu = u + eff.cell_means() @ Sx
            eff.update(mu, Sx)
        stats = self._added(self._block_sums(self.Y, self.Z, mu, True), True)
        stats["A"][: self.K, : self.K] += eff.x_covariance_sum()
        return mu, stats

    def _update_loadings(self, stats: dict[str, torch.Tensor], rho: float = 1.0) -> None:
        """q(w_g, b_g) = N(m_g, S_g) with natural parameters S_g^-1 = psi_g E[F^T F] + diag(prior precision) and
        S_g^-1 m_g = psi_g E[F]^T y_g: exact (full S_g), or in the block family of ``_spex_blocks`` when
        ``coupling`` is set (means by conjugate gradients). ``rho``: 1, the exact step (the only one)."""
        _exact(rho)
        if self.mean_field and self.C:
            return self._update_loadings_mean_field(stats)
        psi, prec, A = self.psi, self.prior_precision(), stats["A"]
        h = psi[:, None] * stats["FtY"].T
        if self.coupling is None:
            P = psi[:, None, None] * A
            P.diagonal(dim1=1, dim2=2).add_(prec)
            self.M, S, logdet = natural_gaussian(P, h)
            return self._set_covariance(GeneCovariances.full(S, logdet))
        # the very first update (from the starting factors, before any sweep) takes the diagonal family: a start
        # needs no full blocks, and under the first, wide slabs every weight would look coupled
        score = coupled_weights(A, psi, prec) if hasattr(self, "M") else torch.zeros_like(prec)
        cov = factorise(A, psi, prec, score, self.coupling, inverse=lambda P: in_threads(batched_inverse, P))
        if hasattr(self, "M"):
            M = conjugate_gradient_means(A, psi, prec, h, self.M, cov, rtol=self.cg_rtol, max_iter=3)
        else:  # the start: a few iterations from zero are plenty
            M = conjugate_gradient_means(A, psi, prec, h, torch.zeros_like(h), cov, rtol=self.cg_rtol, max_iter=20)
        self.M = _flush_tiny(M)
        self._set_covariance(cov)

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
        self._set_covariance(GeneCovariances.full(_block_diagonal(blocks[0][0], blocks[1][0]),
                                                  blocks[0][1] + blocks[1][1]))

    def _set_covariance(self, cov: GeneCovariances) -> None:
        self.cov, self.logdet_S, self.S_diag = cov, cov.logdet(), cov.diag()

    @property
    def S(self) -> torch.Tensor:
        """The covariances S_g as G x D x D (dense)."""
        return self.cov.dense()

    def _update_noise_and_priors(self, stats: dict[str, torch.Tensor], rho: float = 1.0) -> None:
        """q(sigma2_g), then q(lam), q(tau), q(c) given q(W) (``rho``: 1, as in ``_update_loadings``)."""
        _exact(rho)
        M, A, FtY = self.M, stats["A"], stats["FtY"]
        tr_AS = self.cov.trace_with(A)
        self.sq_resid = (stats["yy"] - 2 * (M * FtY.T).sum(1) + ((M @ A) * M).sum(1) + tr_AS).clamp_min(0)
        self.sigma2.rate = self.b0 + 0.5 * self.sq_resid
        Ew2 = (M * M + self.S_diag)[:, : self.K]
        update_scales(self, Ew2)
        self.b_prior.update((M[:, self.K:] ** 2 + self.S_diag[:, self.K:]).sum(0))
        self._mu2 = stats["mu2"]

    def _ridge(self, S_sum: torch.Tensor | None = None):
        """Eigen-decompositions behind the shear, in the coordinates A~ = A P^1/2 (P = diag E[1/v_c]): Phi =
        sum_g E[w_g w_g^T] = U diag(a) U^T (curvature of the B prior along A~) and P^-1/2 Z^T Z P^-1/2 =
        V diag(d) V^T (curvature of the X prior); also P^-1/2. ``S_sum``: sum_g S_g, when already at hand."""
        K, Mw = self.K, self.M[:, : self.K]
        Phi = Mw.T @ Mw + (self._sum_covariance() if S_sum is None else S_sum)[:K, :K]
        return ridge_eigen(Phi, self._ZtZ, self.b_prior.mean_inv)

    def _summed(self, **sums) -> dict:
        """Per-cell sums over all cells (over the processes of a data-parallel fit)."""
        return sums if self.reduce is None else self.reduce(sums)

    def _sum_covariance(self) -> torch.Tensor:
        """sum_g S_g (D x D)."""
        return self.cov.weighted_sum(torch.ones_like(self.psi))

    def _shear(self, XtZ: torch.Tensor | None = None) -> None:
        """Parameter-expansion step along the likelihood's symmetry x_n -> x_n - A z_n, b_g -> b_g + A^T w_g.

        Only the X prior -1/2 sum_n |mu_n - A z_n|^2 and the B prior -1/2 sum_g E[(b_g + A^T w_g)^T P (b_g + A^T w_g)]
        (P = diag E[1/v_c]) change, so the best A solves Phi A P + A Z^T Z = mu^T Z - sum_g E[w_g b_g^T] P; with
        A = A~ P^-1/2 that is the Sylvester equation Phi A~ + A~ (P^-1/2 Z^T Z P^-1/2) = (right side) P^-1/2,
        solved in the two eigenbases. q(w_g, b_g) is mapped by the unit-determinant shear L = [[I, 0], [A^T, I]]: entropy and
        expected likelihood stay put, and the ELBO rises by the prior terms.

        ``XtZ``: mu^T Z summed over all cells (computed from ``self.mu`` when not given). With minibatches the means
        are not held; the shear maps the totals of their statistics instead (``_shear_totals``)."""
        K, S_sum = self.K, self._sum_covariance()
        Mw, Mb, p = self.M[:, :K], self.M[:, K:], self.b_prior.mean_inv
        if XtZ is None:
            XtZ = self._summed(XtZ=self.mu.T @ self.Z)["XtZ"]
        if self.effects is not None:  # the X prior is centred on E[m_n]: sum_n (mu_n - E m_n) z_n^T
            XtZ = XtZ - self.effects.mean.T @ self.effects.group_sums(self.Z)
        A = best_shear(self._ridge(S_sum), XtZ - (Mw.T @ Mb + S_sum[:K, K:]) * p[None, :])
        if self.batch_size is None:
            self.mu = self.mu - self.Z @ A.T
            self._mu2 = self._summed(mu2=(self.mu * self.mu).sum())["mu2"]
        else:
            self._shear_totals(A, XtZ)
        self.M, S = sheared_loadings(self.M, self.cov.dense(), A, K)
        self._set_covariance(GeneCovariances.full(S, self.cov.block_logdet))  # a unit-determinant map

    def _shear_totals(self, A: torch.Tensor, XtZ: torch.Tensor) -> None:
        """The shift mu_n -> mu_n - A z_n of every cell's factor mean, applied to the memoized totals of this
        process's cells: mu^T Y -= A Z^T Y, mu^T Z -= A Z^T Z, mu^T mu -> mu^T mu - (mu^T Z) A^T - A (Z^T mu)
        + A Z^T Z A^T; |mu|^2 over all cells from the reduced sums, tr(mu^T mu) - 2 tr(A Z^T mu) + tr(A Z^T Z A^T).
        The batches' stored shares are updated when next visited (``_visit``), from the accumulated shear."""
        K, C = self.K, self.C
        A64, xx, xz = A.double(), self._tot_loc[:, :K], self._tot_loc[:, K:K + C]
        xx = xx - xz @ A64.T - A64 @ xz.T + A64 @ self._zz @ A64.T
        self._tot_loc = torch.cat([xx, xz - A64 @ self._zz], 1)
        self._tot_xy = self._tot_xy - A64 @ self._zy
        self._acc = self._acc + A64
        self._mu2 = self._mu2 - 2 * (A * XtZ).sum() + ((A @ self._ZtZ) * A).sum()

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
        return (M * psi[:, None]).T @ M + self.cov.weighted_sum(psi)

    def epoch(self) -> float:
        """One pass: the factors X, then (W, B), sigma2, lam, tau, c, then the shear (with covariates). With
        minibatches each batch in turn, its share of the statistics memoized (``_visit``), then the global updates
        and the shear from the totals. Returns the exact ELBO of all cells."""
        shear = self.C and not self.mean_field
        if self.batch_size is None:
            mu, stats = self._local_step(slice(None))
            self._update_loadings(stats)
            self._update_noise_and_priors(stats)
            self.mu = mu
            if shear:
                self._shear()
            return float(self.elbo())
        for i, cells in enumerate(self._batches()):
            stats = self._visit(i, cells)
            self._update_loadings(stats)
            self._update_noise_and_priors(stats)
            if shear:
                self._shear(stats["A"][: self.K, self.K:])
        return float(self.elbo())

    def scores(self) -> torch.Tensor:
        """Posterior means of the factors of all cells (of this process's cells, in a data-parallel fit) under the
        current global factors."""
        if self.batch_size is None:
            return self.mu
        return self._local_factors(slice(None))

    # ----------------------------------------------------------------------------------------- ELBO
    def elbo(self) -> torch.Tensor:
        """ELBO at the current state (seed 002's objective), from the statistics of all cells."""
        N, K = self.N, self.K
        s2 = self.sigma2
        lik = -0.5 * (N * (_LOG_2PI + s2.mean_log) + s2.mean_inv * self.sq_resid).sum()
        logdet_Sx = torch.logdet(self.Sigma_x)
        misfit = self._mu2 if self.effects is None else self.effects.prior_misfit(self.mu)
        x_term = 0.5 * (N * K + N * logdet_Sx - N * torch.trace(self.Sigma_x) - misfit)
        noise = s2.elbo_sum(self.a0, self.b0)
        effects = 0.0 if self.effects is None else self.effects.elbo()
        return lik + x_term + noise + loading_terms(self) + effects

    # ----------------------------------------------------------------------------------------- results
    def covariance(self) -> torch.Tensor:
        """Full posterior covariances S_g of (w_g, b_g), G x D x D."""
        return self.cov.dense()

    def loadings_sd(self) -> torch.Tensor:
        """Posterior sd of (W, B); B's includes the ridge variance (``covariate_effects_var``)."""
        return torch.cat([self.S_diag[:, : self.K], self.covariate_effects_var()], dim=1).sqrt()


def _accumulated(total: dict | None, sums: dict) -> dict:
    """``total`` plus one block's ``sums``, added in place as the blocks come (holding every block's D x G sums
    until the end kept about 6 MB a block resident: 130 MB for 10k x 8k x 100)."""
    if total is None:
        return sums
    for name, value in sums.items():
        total[name] += value
    return total


def _block_diagonal(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Batched block-diagonal matrices [[A, 0], [0, B]]."""
    G, k, c = A.shape[0], A.shape[1], B.shape[1]
    out = A.new_zeros(G, k + c, k + c)
    out[:, :k, :k], out[:, k:, k:] = A, B
    return out


def _exact(rho: float) -> None:
    if rho != 1.0:
        raise ValueError(f"the updates take exact steps (rho = 1); got rho={rho} (minibatches use memoized VI)")


def _is_all(cells) -> bool:
    """Whether ``cells`` selects every cell (a full batch)."""
    return isinstance(cells, slice) and cells == slice(None)
