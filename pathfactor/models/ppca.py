"""Probabilistic PCA (seed 000; Tipping & Bishop 1999): closed-form MLE, EM (seed 003), MAP and mean-field VI.

Model (seed 000, eq. 2), for centred data ``Y - mu`` (N cells x G genes)::

    y_n | x_n, W, sigma2 ~ N(W x_n + mu, sigma2 I_G),   x_n ~ N(0, I_K)
    marginally  y_n ~ N(mu, C),  C = W W^T + sigma2 I_G

and, for ``map`` and ``vi``, the poster's priors ``w_gk ~ N(0, 1)`` and ``sigma2 ~ InvGamma(1, 1)``.

* ``mle``: ``W = U_K (Lambda_K - sigma2 I)^(1/2)``, ``sigma2`` = mean of the G - K discarded eigenvalues of the
  sample covariance S (seed 000, "The MLE of W"); the eigen-decomposition is of the smaller Gram matrix.
* ``em``: EM of seed 003 ("EM as an alternating maximisation"): the E-step's posterior q(x_n) = N(M^-1 W^T y_n,
  sigma2 M^-1), M = W^T W + sigma2 I, enters the M-step only through ``E[X]^T Y`` and ``sum_n E[x_n x_n^T]``.
* ``map``: the poster's MAP, the joint mode of p(X, W, sigma2 | Y) (seed 000, "MAP"), by exact block coordinate
  ascent: X, then W (two ridge regressions), then sigma2 = (R + 2 b0) / (N G + 2 a0 + 2). Its subspace is the
  MLE's, but the priors on X and W balance their scales (X^T X = W^T W at the mode), so the factors shrink as
  N grows and sigma2 -> (G - K) / G of the MLE's: the bias of seed 000's Finding 1.
* ``vi``: mean-field q(X) q(W) q(sigma2), Gaussian / Gaussian / inverse-gamma, minimising the poster's -ELBO by
  closed-form coordinate ascent (CAVI); q(x_n) share one K x K covariance, as do q(w_g).

Every iterative method runs through :func:`pathfactor.train.train`; each epoch raises its objective (the
log-likelihood, the log posterior, the ELBO) monotonically. Alternating updates crawl along the scale that X and W
trade (EM's rate is ~ 1 - 2 sigma2 / lambda per step), so each epoch ends with a parameter-expansion step
(:func:`expansion`), an exact maximisation over the reparametrisations ``X -> X R^-T``, ``W -> W R``: all methods
then converge in a handful of epochs. The likelihood fixes W only up to a K x K rotation; fits are finally
rotated to principal axes (W^T W diagonal, decreasing) and signed so that each factor's largest loading is positive.
"""
from __future__ import annotations

import logging
import math
import numbers

import numpy as np
import torch

from ..data.inputs import aligned_centred, check_variance, working_dtype
from ..evaluate import factor_r2, orient
from ..train import Task, train
from .base import LatentModel
from .persist import expect_shapes

__all__ = ["PPCA", "gaussian_log_likelihood", "mle"]

log = logging.getLogger(__name__)

_LOG_2PI = math.log(2 * math.pi)
METHODS = ("mle", "em", "map", "vi")
#: the poster's priors (seed 000): w_gk ~ N(0, W_PRIOR_VAR), sigma2 ~ InvGamma(SIGMA2_PRIOR), in units of the data's
#: typical sd s (``PPCA.fit`` runs MAP and VI on Y / s and scales W by s, sigma2 by s^2): the same factors in any units
W_PRIOR_VAR = 1.0
SIGMA2_PRIOR = (1.0, 1.0)


# ============================================================================ checks shared by the linear models
def check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_common(model) -> None:
    """Validate ``n_factors``, ``max_epochs``, ``tol`` and ``dtype`` where the model has them."""
    check_int("n_factors", model.n_factors, 1)
    if hasattr(model, "max_epochs"):
        check_int("max_epochs", model.max_epochs, 1)
    if hasattr(model, "tol"):
        if isinstance(model.tol, bool) or not isinstance(model.tol, numbers.Real) or not 0 <= model.tol < 1:
            raise ValueError(f"tol must be a number in [0, 1), got {model.tol!r}")
    if getattr(model, "dtype", "float32") not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {model.dtype!r}")


def check_shape(K: int, N: int, G: int, model: str) -> None:
    """A K-factor Gaussian model needs K < G (noise left to estimate) and K < N - 1 (the centred data have rank
    at most N - 1)."""
    if K >= G:
        raise ValueError(f"{model} with n_factors={K} needs more genes than factors, but the data have {G} genes; "
                         f"use n_factors < {G}")
    if K >= N - 1:
        raise ValueError(f"{model} with n_factors={K} needs at least n_factors + 2 cells, but the data have {N} "
                         f"cells; use n_factors < {N - 1}")


# ============================================================================ the maths
def gaussian_log_likelihood(Y: torch.Tensor, W: torch.Tensor, psi: torch.Tensor, YB: torch.Tensor | None = None,
                            ss: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_n log N(y_n; 0, W W^T + diag(psi))`` of centred ``Y`` (N x G), in O(N G K) with K x K algebra only.

    Woodbury and the determinant lemma with ``B = Psi^-1 W``, ``A = I_K + W^T B``:
    ``C^-1 = Psi^-1 - B A^-1 B^T``, ``log|C| = sum_g log psi_g + log|A|``, so
    ``sum_n y_n^T C^-1 y_n = sum_g ss_g / psi_g - tr((Y B) A^-1 (Y B)^T)`` (``ss_g = sum_n y_ng^2``).
    ``psi`` is a length-G vector (PPCA: ``sigma2`` repeated). ``YB`` and ``ss`` may be passed when already known.
    """
    N, G = Y.shape
    K = W.shape[1]
    B = W / psi[:, None]
    A = torch.eye(K, dtype=W.dtype, device=W.device) + W.T @ B
    YB = Y @ B if YB is None else YB
    ss = (Y * Y).sum(0) if ss is None else ss
    quad = (ss / psi).sum() - ((YB @ torch.linalg.inv(A)) * YB).sum()
    logdet = torch.log(psi).sum() + torch.logdet(A)
    return -0.5 * (N * G * _LOG_2PI + N * logdet + quad)


def mle(Y: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tipping & Bishop's closed form (seed 000) for centred ``Y``: ``W = U_K (Lambda_K - sigma2 I)^(1/2)``,
    ``sigma2 = (tr S - sum_k lambda_k) / (G - K)``. Eigen-decomposes ``S = Y^T Y / N`` (G x G) or, when N < G,
    the Gram matrix ``Y Y^T / N`` (same non-zero eigenvalues, ``u = Y^T v / sqrt(N lambda)``)."""
    N, G = Y.shape
    trace = (Y * Y).sum() / N
    if G <= N:
        lam, U = torch.linalg.eigh(Y.T @ Y / N)
        lam, U = lam.flip(0)[:K], U.flip(1)[:, :K]
    else:
        lam, V = torch.linalg.eigh(Y @ Y.T / N)
        lam, V = lam.flip(0)[:K], V.flip(1)[:, :K]
        U = (Y.T @ V) / torch.sqrt(N * lam.clamp_min(torch.finfo(Y.dtype).tiny))
    sigma2 = (trace - lam.sum()) / (G - K)
    floor = 1e-10 * trace / G
    if sigma2 <= floor:
        log.warning("the data have rank <= n_factors (no variance left for the noise); sigma2 floored at %.3g",
                    float(floor))
        sigma2 = torch.clamp(sigma2, min=floor)
    return U * torch.sqrt((lam - sigma2).clamp_min(0.0)), sigma2


def principal_rotation(W: torch.Tensor, metric: torch.Tensor | None = None) -> torch.Tensor:
    """Orthogonal K x K ``R`` making ``(W R)^T diag(metric) (W R)`` diagonal with decreasing entries."""
    WtW = W.T @ (W if metric is None else W * metric[:, None])
    _, R = torch.linalg.eigh(WtW)
    return R.flip(1)


def sym_sqrt(A: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric positive semi-definite K x K matrix."""
    d, V = torch.linalg.eigh(A)
    return (V * d.clamp_min(0.0).sqrt()) @ V.T


def expansion(EXX: torch.Tensor, EWW: torch.Tensor, c: float) -> torch.Tensor:
    """The K x K ``R`` of the best reparametrisation ``X -> X R^-T``, ``W -> W R`` (parameter expansion; Liu,
    Rubin & Wu 1998; Qi & Jaakkola 2006). ``X W^T`` and so the likelihood do not change; the objective's other
    terms ``-tr(EXX P^-1)/2 - tr(EWW P)/2 + c log|P| / 2`` (``P = R R^T``; ``c = G - N`` for VI, whose entropies
    give the log-determinant, 0 for MAP) are maximised at the root of ``P EWW P - c P - EXX = 0``:
    ``P = B^-1/2 Q B^-1/2`` with ``B = EWW``, ``Q = c/2 + (c^2/4 + B^1/2 EXX B^1/2)^1/2``. The step never
    lowers the objective, and it removes the slow scale mode of plain alternating updates. Q's eigenvalues
    ``q = c/2 + (c^2/4 + m)^1/2`` (m those of ``B^1/2 EXX B^1/2``) are taken as ``m / ((c^2/4 + m)^1/2 - c/2)``
    when c < 0: the plain form cancels to 0 when m << c^2 (data far smaller than the unit priors), making R
    singular. Factors that have collapsed to zero (data far smaller than the priors' scale, whose mode is W = 0)
    leave nothing to reparametrise: then R = I."""
    eye = torch.eye(EXX.shape[0], dtype=EXX.dtype, device=EXX.device)
    d, V = torch.linalg.eigh(EWW)
    if not bool(d.max() > 0):
        return eye
    d = d.clamp_min(torch.finfo(d.dtype).eps * d.max())
    Bh, Bih = (V * d.sqrt()) @ V.T, (V / d.sqrt()) @ V.T
    M = Bh @ EXX @ Bh
    m, U = torch.linalg.eigh((M + M.T) / 2)
    m = m.clamp_min(0.0)
    root = torch.sqrt(c * c / 4 + m)
    q = m / (root - c / 2) if c < 0 else c / 2 + root
    if not bool((q > 0).all()):
        return eye
    Q = (U * q) @ U.T
    return sym_sqrt(Bih @ Q @ Bih)


def matmul64(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``A @ B`` in A's dtype (the data's: the N x G x K products), returned in float64 (the K x K algebra)."""
    return (A @ B.to(A.dtype)).double()


class _Task(Task):
    """Shared state of the iterative fits: the centred data ``Y`` in the model's dtype; everything else (W, X,
    K x K statistics, objectives) in float64, so that float32 data give objectives smooth enough for ``tol``.
    Objectives are log-likelihoods (or log-posteriors, ELBOs) summed over the N x G entries."""

    state_exclude = ("Y", "ss", "total", "eye")

    @property
    def objective_scale(self) -> float:
        return float(self.N * self.G)

    def __init__(self, Y, W, sigma2, expand: bool = True):
        self.Y, (self.N, self.G) = Y, Y.shape
        self.ss = (Y * Y).sum(0, dtype=torch.float64)
        self.total = self.ss.sum()
        self.expand = expand
        self.eye = torch.eye(W.shape[1], dtype=torch.float64, device=Y.device)
        self.W, self.sigma2 = W.double(), torch.as_tensor(sigma2, dtype=torch.float64, device=Y.device)
        #: EM keeps sigma2 above this (noiseless data of rank <= K would drive it to 0); the constrained M-step
        #: is still the maximum of a unimodal function of sigma2, so the log-likelihood still rises
        self.floor = 1e-10 * float(self.total) / (self.N * self.G) + 1e-300


class _EM(_Task):
    """EM for PPCA (seed 003; Tipping & Bishop 1999, sec. 3.2); the objective is the log-likelihood.

    ``expand=True`` (default) is parameter-expanded EM (Liu, Rubin & Wu 1998): the M-step also fits the prior
    covariance of x, ``Sigma = sum_n E[x_n x_n^T] / N``, and folds it into W (``W <- W Sigma^1/2``). Plain EM's
    scale of W converges at rate ~ ``1 - 2 sigma2 / lambda`` per step (very slowly at a high signal-to-noise
    ratio); the expanded step's rate is ~ ``(sigma2 / lambda)^2``."""

    def __init__(self, Y, W, sigma2, expand: bool = True):
        super().__init__(Y, W, sigma2, expand)
        self.YW = matmul64(Y, self.W)

    def log_likelihood(self) -> float:
        psi = self.sigma2.expand(self.G)
        return float(gaussian_log_likelihood(self.Y, self.W, psi, YB=self.YW / self.sigma2, ss=self.ss))

    def epoch(self) -> float:
        N, G, W = self.N, self.G, self.W
        # E-step: q(x_n) = N(M^-1 W^T y_n, sigma2 M^-1); sufficient statistics E[X] and sum_n E[x_n x_n^T]
        Minv = torch.linalg.inv(W.T @ W + self.sigma2 * self.eye)
        EX = self.YW @ Minv
        Sxx = N * self.sigma2 * Minv + EX.T @ EX
        YtX = matmul64(self.Y.T, EX)
        # M-step: W = Y^T E[X] (sum E[x x^T])^-1; sigma2 = E||Y - X W^T||^2 / (N G)
        W = YtX @ torch.linalg.inv(Sxx)
        self.sigma2 = ((self.total - 2 * (YtX * W).sum() + (Sxx * (W.T @ W)).sum()) / (N * G)).clamp_min(self.floor)
        if self.expand:
            W = W @ sym_sqrt(Sxx / N)
        self.W, self.YW = W, matmul64(self.Y, W)
        return self.log_likelihood()


class _MAP(_Task):
    """The poster's MAP: maximise log p(Y | X, W, sigma2) + log p(X) + log p(W) + log p(sigma2) (seed 000) by
    exact block updates ``X = Y W (W^T W + sigma2 I)^-1``, ``W = Y^T X (X^T X + sigma2 I)^-1``, the closed-form
    mode of sigma2 and a parameter-expansion step (:func:`expansion`, c = 0: it balances the priors of X and W).
    The objective is the log joint density."""


    def epoch(self) -> float:
        N, G = self.N, self.G
        a0, b0 = SIGMA2_PRIOR
        s = self.sigma2
        X = matmul64(self.Y, self.W) @ torch.linalg.inv(self.W.T @ self.W + s * self.eye)
        XtX, YtX = X.T @ X, matmul64(self.Y.T, X)
        W = YtX @ torch.linalg.inv(XtX + s * self.eye / W_PRIOR_VAR)
        R = self.total - 2 * (YtX * W).sum() + (XtX * (W.T @ W)).sum()   # ||Y - X W^T||^2
        s = (R + 2 * b0) / (N * G + 2 * a0 + 2)
        if self.expand:
            T = expansion(XtX, W.T @ W / W_PRIOR_VAR, 0.0)
            X, W = X @ torch.linalg.inv(T), W @ T
        self.X, self.W, self.sigma2 = X, W, s
        return self.log_posterior(R)

    def log_posterior(self, R) -> float:
        N, G, K = self.N, self.G, self.W.shape[1]
        a0, b0 = SIGMA2_PRIOR
        s = self.sigma2
        lik = -0.5 * (N * G * (_LOG_2PI + torch.log(s)) + R / s)
        prior_x = -0.5 * ((self.X * self.X).sum() + N * K * _LOG_2PI)
        prior_w = -0.5 * ((self.W * self.W).sum() / W_PRIOR_VAR + G * K * (_LOG_2PI + math.log(W_PRIOR_VAR)))
        prior_s = a0 * math.log(b0) - math.lgamma(a0) - (a0 + 1) * torch.log(s) - b0 / s
        return float(lik + prior_x + prior_w + prior_s)


class _VI(_Task):
    """Mean-field VI for PPCA with the poster's priors: q(x_n) = N(m_n, Sigma_X), q(w_g) = N(M_g, Sigma_W),
    q(sigma2) = InvGamma(a, b). Closed-form CAVI, then a parameter-expansion step (:func:`expansion`, c = G - N;
    Qi & Jaakkola 2006). The objective is the ELBO (seed 000's -ELBO, negated)::

        E_q log p(Y | X, W, sigma2) - KL(q(X) || p(X)) - KL(q(W) || p(W)) - KL(q(sigma2) || p(sigma2))
    """

    def __init__(self, Y, W, sigma2, expand: bool = True):
        super().__init__(Y, W, sigma2, expand)
        a0, b0 = SIGMA2_PRIOR
        self.M_W, self.S_W = self.W, torch.zeros_like(self.eye)
        self.a = torch.tensor(a0 + self.N * self.G / 2, dtype=torch.float64, device=Y.device)
        self.b = self.a * self.sigma2                               # E[1/sigma2] = 1 / sigma2 to start
        self.update_x()

    @property
    def tau(self):  # E_q[1 / sigma2]
        return self.a / self.b

    def EWW(self):
        return self.M_W.T @ self.M_W + self.G * self.S_W

    def EXX(self):
        return self.M_X.T @ self.M_X + self.N * self.S_X

    def update_x(self) -> None:
        self.S_X = torch.linalg.inv(self.eye + self.tau * self.EWW())
        self.M_X = self.tau * matmul64(self.Y, self.M_W) @ self.S_X
        self.YtX = None

    def update_w(self) -> None:
        self.S_W = torch.linalg.inv(self.eye / W_PRIOR_VAR + self.tau * self.EXX())
        self.YtX = matmul64(self.Y.T, self.M_X)
        self.M_W = self.tau * self.YtX @ self.S_W

    def update_sigma2(self) -> None:
        a0, b0 = SIGMA2_PRIOR
        self.a = torch.full_like(self.a, a0 + self.N * self.G / 2)
        self.b = b0 + self.expected_residual() / 2

    def update_expansion(self) -> None:
        R = expansion(self.EXX(), self.EWW() / W_PRIOR_VAR, float(self.G - self.N))
        Ri = torch.linalg.inv(R)
        self.M_X, self.S_X = self.M_X @ Ri.T, Ri @ self.S_X @ Ri.T
        self.M_W, self.S_W = self.M_W @ R, R.T @ self.S_W @ R
        if self.YtX is not None:
            self.YtX = self.YtX @ Ri.T

    def expected_residual(self):
        """E_q ||Y - X W^T||^2 = ||Y||^2 - 2 tr(M_X^T Y M_W) + tr(E[X^T X] E[W^T W])."""
        if self.YtX is None:
            self.YtX = matmul64(self.Y.T, self.M_X)
        return self.total - 2 * (self.YtX * self.M_W).sum() + (self.EXX() * self.EWW()).sum()

    def elbo(self) -> float:
        N, G, K = self.N, self.G, self.M_W.shape[1]
        a0, b0 = SIGMA2_PRIOR
        a, b = self.a, self.b
        e_log_s = torch.log(b) - torch.digamma(a)
        lik = -0.5 * (N * G * (_LOG_2PI + e_log_s) + self.tau * self.expected_residual())
        kl_x = 0.5 * (torch.trace(self.EXX()) - N * K - N * torch.logdet(self.S_X))
        kl_w = 0.5 * (torch.trace(self.EWW()) / W_PRIOR_VAR - G * K + G * K * math.log(W_PRIOR_VAR)
                      - G * torch.logdet(self.S_W))
        # KL(IG(a, b) || IG(a0, b0)) = KL(Gamma(a, b) || Gamma(a0, b0)) of the precision (rate parametrisation)
        kl_s = ((a - a0) * torch.digamma(a) - torch.lgamma(a) + math.lgamma(a0) + a0 * (torch.log(b) - math.log(b0))
                + a * (b0 - b) / b)
        return float(lik - kl_x - kl_w - kl_s)

    def epoch(self) -> float:
        self.update_x()
        self.update_w()
        self.update_sigma2()
        if self.expand:
            self.update_expansion()
        return self.elbo()


# ============================================================================ the model
class PPCA(LatentModel):
    """Probabilistic PCA (seed 000) by closed-form MLE, EM (seed 003), MAP or mean-field VI.

    Parameters
    ----------
    n_factors : int, number of latent factors K.
    method : "mle" (closed form, default), "em", "map" (poster's joint MAP over X, W, sigma2; its loadings are
        biased, seed 000 Finding 1) or "vi" (mean-field, closed-form CAVI).
    max_epochs, tol : iterative methods stop after ``max_epochs`` or when the objective's relative change stays
        below ``tol`` (see :func:`pathfactor.train.train`).
    progress : show a progress bar.
    dtype : "float32" (default) or "float64".

    Attributes
    ----------
    Those of :class:`~pathfactor.models.base.LatentModel` (``loadings_`` is W, G x K; ``factor_scores_`` the
    posterior mean of x_n, for "map" its mode), plus ``mu_`` (gene means), ``sigma2_`` (noise variance; for
    "vi" its posterior mean), ``log_likelihood_`` (marginal log-likelihood of the training data under W,
    sigma2), ``objective_`` (last value of the training objective: log-likelihood, log posterior or ELBO),
    ``converged_``. For "vi", ``loadings_sd_`` is the posterior sd of W.

    References
    ----------
    Tipping & Bishop, Probabilistic principal component analysis, JRSS B 61 (1999) (seed 000 [4]);
    seed 003 (EM as alternating maximisation); Bishop, Variational principal components, ICANN 1999.
    """

    key = "ppca"

    def __init__(self, *, n_factors: int = 10, method: str = "mle", max_epochs: int = 1000, tol: float = 1e-7,
                 progress: bool = True, dtype: str = "float32"):
        self.n_factors, self.method = n_factors, method
        self.max_epochs, self.tol, self.progress, self.dtype = max_epochs, tol, progress, dtype

    def fit(self, data, layer: str | None = None, device="auto", seed: int = 0,
            use_highly_variable: bool | None = None) -> "PPCA":
        """Fit to ``data`` (AnnData, DataFrame, array or sparse; cells x genes). The data are centred by their
        gene means ``mu``; ``seed`` draws the random start of the iterative methods."""
        check_common(self)
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {self.method!r}")
        matrix, generator, dev, dt = self._begin_fit(data, layer, seed=seed, device=device,
                                                     use_highly_variable=use_highly_variable)
        N, G = matrix.shape
        K = int(self.n_factors)
        check_shape(K, N, G, "PPCA")
        check_variance(matrix, "PPCA")  # W = 0 and sigma2 = 0 would make every method's K x K algebra singular
        Y, mu = matrix.centred(dev, working_dtype(matrix, dt))  # float64 for data too small for float32

        history, self.converged_ = [], True
        if self.method == "mle":
            W, sigma2 = (t.double() for t in mle(Y, K))
        else:
            var = (Y * Y).sum(dtype=torch.float64) / (N * G)
            # MAP and VI fit Y / s, so that their unit priors are in units of the data's sd s (EM needs no prior)
            s = 1.0 if self.method == "em" else float(var.sqrt())
            W0 = torch.randn(G, K, generator=generator, dtype=torch.float64).to(dev) * var.sqrt() / s
            task = {"em": _EM, "map": _MAP, "vi": _VI}[self.method](Y / s, W0, var / s**2)
            result = train(task, max_epochs=self.max_epochs, tol=self.tol, progress=self.progress,
                           desc=f"PPCA-{self.method}")
            jacobian = -N * G * math.log(s)  # log p(Y) = log p(Y / s) - N G log s
            history, self.converged_ = [v + jacobian for v in result.history], result.converged
            if self.method == "vi":
                task.Y, task.M_W, task.S_W, task.b = Y, task.M_W * s, task.S_W * s**2, task.b * s**2
            W = task.M_W if self.method == "vi" else task.W * s
            sigma2 = task.b / (task.a - 1) if self.method == "vi" else task.sigma2 * s**2

        # principal axes, then signs: the rotation the likelihood (and both priors) cannot see
        R = principal_rotation(W)
        R = R * torch.as_tensor(orient((W @ R).cpu().numpy()), dtype=R.dtype, device=dev)
        W = W @ R
        loadings_sd = None
        if self.method == "vi":
            task.M_W, task.S_W = W, R.T @ task.S_W @ R
            task.update_x()                                  # q(X) for the final q(W), q(sigma2): a CAVI step
            P = task.tau * task.M_W @ task.S_X               # E_q[x_n] = P^T y_n
            loadings_sd = torch.sqrt(torch.diagonal(task.S_W)).expand(G, K).cpu().numpy()
        else:
            P = W @ torch.linalg.inv(W.T @ W + sigma2 * torch.eye(K, dtype=W.dtype, device=dev))
        X = matmul64(Y, P).cpu().numpy()
        self.mu_ = mu.double().cpu().numpy()
        self.sigma2_ = float(sigma2)
        self._projection = P.cpu().numpy()
        psi = torch.full((G,), self.sigma2_, dtype=torch.float64, device=dev)
        self.log_likelihood_ = float(gaussian_log_likelihood(Y, W, psi, YB=matmul64(Y, W / psi[:, None]),
                                                             ss=(Y * Y).sum(0, dtype=torch.float64)))
        W = W.cpu().numpy()
        self._set_results(scores=X, loadings=W, obs_names=matrix.obs_names, var_names=matrix.var_names,
                          factor_names=[f"PPC{k + 1}" for k in range(K)], factor_kinds=["latent"] * K,
                          relevance=factor_r2(Y.cpu().numpy(), X, W), loadings_sd=loadings_sd,
                          history=history or [self.log_likelihood_])
        self.objective_ = self.history_[-1]
        return self

    # ------------------------------------------------------------------ new data
    def transform(self, data, layer: str | None = None):
        """Factor scores of (new) cells: the posterior mean ``E[x_n | y_n] = (W^T W + sigma2 I)^-1 W^T (y_n - mu)``
        (``vi``: the CAVI update of q(x_n) given q(W), q(sigma2)); needs the genes the model was fitted on."""
        import pandas as pd

        self._check_fitted()
        Y, obs = aligned_centred(data, layer, self.loadings_.index, self.mu_)
        return pd.DataFrame(Y @ self._projection, index=obs, columns=self.loadings_.columns)

    def log_likelihood(self, data, layer: str | None = None) -> float:
        """Marginal log-likelihood ``sum_n log N(y_n; mu, W W^T + sigma2 I)`` of ``data`` under the fitted
        ``mu``, W, sigma2 (Woodbury, no G x G matrix; see :func:`gaussian_log_likelihood`)."""
        self._check_fitted()
        Y, _ = aligned_centred(data, layer, self.loadings_.index, self.mu_)
        G = Y.shape[1]
        return float(gaussian_log_likelihood(torch.as_tensor(Y), torch.as_tensor(self.loadings_.to_numpy()),
                                             torch.full((G,), self.sigma2_, dtype=torch.float64)))

    def _extra_state(self):
        meta = {"sigma2": self.sigma2_, "log_likelihood": self.log_likelihood_, "objective": self.objective_,
                "converged": self.converged_}
        return meta, {"mu": self.mu_, "projection": self._projection}

    def _load_extra_state(self, meta, arrays):
        G, K = self.loadings_.shape
        expect_shapes(arrays, {"mu": (G,), "projection": (G, K)})
        self.mu_, self._projection = arrays["mu"], arrays["projection"]
        self.sigma2_, self.log_likelihood_ = meta["sigma2"], meta["log_likelihood"]
        self.objective_, self.converged_ = meta["objective"], meta["converged"]
