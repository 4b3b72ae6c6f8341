"""Factor analysis by EM (seed 003): PPCA with a per-gene noise variance, ``Psi = diag(psi_1, ..., psi_G)``.

Model, for centred data ``Y - mu`` (N cells x G genes)::

    y_n | x_n ~ N(W x_n + mu, Psi),   x_n ~ N(0, I_K),   so   y_n ~ N(mu, W W^T + Psi)

EM (seed 003, "EM as an alternating maximisation"; Rubin & Thayer 1982), with whole-matrix sufficient statistics:

    E-step   A = I + W^T Psi^-1 W,   E[X] = Y Psi^-1 W A^-1,   sum_n E[x_n x_n^T] = N A^-1 + E[X]^T E[X]
    M-step   W = Y^T E[X] (sum_n E[x_n x_n^T])^-1,   psi_g = (sum_n y_ng^2 - w_g^T (Y^T E[X])_g) / N

plus the parameter-expansion step of :class:`~pathfactor.models.ppca.PPCA`'s EM (``W <- W (sum E[x x^T] / N)^1/2``,
Liu, Rubin & Wu 1998), which removes EM's slow convergence of the loadings' scale. Started from the PPCA closed
form; the log-likelihood rises monotonically.
"""
from __future__ import annotations

import logging

import pandas as pd
import torch

from ..data.inputs import aligned_centred, working_dtype
from ..evaluate import factor_r2, orient
from ..train import Task, train
from .base import LatentModel
from .persist import expect_shapes
from .ppca import (check_common, check_shape, gaussian_log_likelihood, matmul64, mle, principal_rotation,
                   sym_sqrt)

__all__ = ["FactorAnalysis"]

log = logging.getLogger(__name__)

#: psi_g is kept above PSI_FLOOR * (variance of gene g) (and a tiny absolute floor): no Heywood collapse to 0
PSI_FLOOR = 1e-6


class _FAEM(Task):
    """EM for factor analysis; ``Y`` in the model's dtype, everything else float64. Objective: log-likelihood."""

    state_exclude = ("Y", "ss", "eye")

    @property
    def objective_scale(self) -> float:
        """The log-likelihood sums over N x G entries."""
        return float(self.N * self.G)

    def __init__(self, Y, W, psi, expand: bool = True):
        self.Y, (self.N, self.G) = Y, Y.shape
        self.ss = (Y * Y).sum(0, dtype=torch.float64)
        self.floor = torch.clamp(PSI_FLOOR * self.ss / self.N, min=1e-12 * float(self.ss.mean() / self.N) + 1e-300)
        self.W, self.psi, self.expand = W.double(), torch.maximum(psi.double(), self.floor), expand
        self.eye = torch.eye(W.shape[1], dtype=torch.float64, device=Y.device)
        self.YB = matmul64(Y, self.W / self.psi[:, None])

    def log_likelihood(self) -> float:
        return float(gaussian_log_likelihood(self.Y, self.W, self.psi, YB=self.YB, ss=self.ss))

    def epoch(self) -> float:
        N, W = self.N, self.W
        # E-step
        Ainv = torch.linalg.inv(self.eye + W.T @ (W / self.psi[:, None]))
        EX = self.YB @ Ainv
        Sxx = N * Ainv + EX.T @ EX
        YtX = matmul64(self.Y.T, EX)
        # M-step (psi_g maximised under its floor: the constrained maximum of a unimodal function)
        W = YtX @ torch.linalg.inv(Sxx)
        self.psi = torch.maximum((self.ss - (W * YtX).sum(1)) / N, self.floor)
        if self.expand:
            W = W @ sym_sqrt(Sxx / N)
        self.W, self.YB = W, matmul64(self.Y, W / self.psi[:, None])
        return self.log_likelihood()


class FactorAnalysis(LatentModel):
    """Factor analysis, ``y_n ~ N(mu, W W^T + Psi)`` with diagonal Psi, by EM (seed 003).

    Parameters
    ----------
    n_factors : int, number of factors K.
    max_epochs, tol : stop after ``max_epochs`` EM steps or when the log-likelihood's relative change stays
        below ``tol``.
    progress : show a progress bar.
    dtype : "float32" (default) or "float64" for the N x G x K products (the rest is float64).

    Attributes
    ----------
    Those of :class:`~pathfactor.models.base.LatentModel` (``loadings_`` is W, rotated so that
    ``W^T Psi^-1 W`` is diagonal and decreasing; ``factor_scores_`` the posterior means E[x_n | y_n]), plus
    ``mu_`` (gene means), ``Psi_`` (Series, noise variance per gene), ``log_likelihood_``, ``objective_``,
    ``converged_``.

    References
    ----------
    Rubin & Thayer, EM algorithms for ML factor analysis, Psychometrika 47 (1982); seed 003;
    Liu, Rubin & Wu, Parameter expansion to accelerate EM, Biometrika 85 (1998).
    """

    key = "fa"

    def __init__(self, *, n_factors: int = 10, max_epochs: int = 1000, tol: float = 1e-7, progress: bool = True,
                 dtype: str = "float32"):
        self.n_factors, self.max_epochs, self.tol = n_factors, max_epochs, tol
        self.progress, self.dtype = progress, dtype

    def fit(self, data, layer: str | None = None, device="auto", seed: int = 0,
            use_highly_variable: bool | None = None) -> "FactorAnalysis":
        """Fit to ``data`` (AnnData, DataFrame, array or sparse; cells x genes), centred by its gene means.
        EM starts from the PPCA closed form (W, Psi = sigma2 I); ``seed`` is accepted for a uniform face."""
        check_common(self)
        matrix, _, dev, dt = self._begin_fit(data, layer, seed=seed, device=device,
                                             use_highly_variable=use_highly_variable)
        N, G = matrix.shape
        K = int(self.n_factors)
        check_shape(K, N, G, "FactorAnalysis")
        Y, mu = matrix.centred(dev, working_dtype(matrix, dt))  # float64 for data too small for float32

        W0, sigma2 = mle(Y, K)
        task = _FAEM(Y, W0, sigma2.double().expand(G))
        result = train(task, max_epochs=self.max_epochs, tol=self.tol, progress=self.progress, desc="FactorAnalysis")
        W, psi = task.W, task.psi
        R = principal_rotation(W, metric=1 / psi)
        R = R * torch.as_tensor(orient((W @ R).cpu().numpy()), dtype=R.dtype, device=dev)
        W = W @ R
        B = W / psi[:, None]
        P = B @ torch.linalg.inv(torch.eye(K, dtype=W.dtype, device=dev) + W.T @ B)   # E[x_n] = P^T y_n
        X = matmul64(Y, P).cpu().numpy()
        self.mu_ = mu.double().cpu().numpy()
        self._projection = P.cpu().numpy()
        self.Psi_ = pd.Series(psi.cpu().numpy(), index=matrix.var_names, name="Psi")
        self.log_likelihood_ = float(gaussian_log_likelihood(Y, W, psi, YB=matmul64(Y, B), ss=task.ss))
        W = W.cpu().numpy()
        self._set_results(scores=X, loadings=W, obs_names=matrix.obs_names, var_names=matrix.var_names,
                          factor_names=[f"FA{k + 1}" for k in range(K)], factor_kinds=["latent"] * K,
                          relevance=factor_r2(Y.cpu().numpy(), X, W), history=result.history)
        self.objective_, self.converged_ = self.history_[-1], result.converged
        return self

    # ------------------------------------------------------------------ new data
    def transform(self, data, layer: str | None = None) -> pd.DataFrame:
        """Posterior means ``E[x_n | y_n] = (I + W^T Psi^-1 W)^-1 W^T Psi^-1 (y_n - mu)`` of (new) cells."""
        self._check_fitted()
        Y, obs = aligned_centred(data, layer, self.loadings_.index, self.mu_)
        return pd.DataFrame(Y @ self._projection, index=obs, columns=self.loadings_.columns)

    def log_likelihood(self, data, layer: str | None = None) -> float:
        """``sum_n log N(y_n; mu, W W^T + Psi)`` under the fitted parameters (Woodbury; no G x G matrix)."""
        self._check_fitted()
        Y, _ = aligned_centred(data, layer, self.loadings_.index, self.mu_)
        return float(gaussian_log_likelihood(torch.as_tensor(Y), torch.as_tensor(self.loadings_.to_numpy()),
                                             torch.as_tensor(self.Psi_.to_numpy())))

    def _extra_state(self):
        meta = {"log_likelihood": self.log_likelihood_, "objective": self.objective_, "converged": self.converged_}
        return meta, {"mu": self.mu_, "projection": self._projection, "Psi": self.Psi_.to_numpy()}

    def _load_extra_state(self, meta, arrays):
        G, K = self.loadings_.shape
        expect_shapes(arrays, {"mu": (G,), "projection": (G, K), "Psi": (G,)})
        self.mu_, self._projection = arrays["mu"], arrays["projection"]
        self.Psi_ = pd.Series(arrays["Psi"], index=self.loadings_.index, name="Psi")
        self.log_likelihood_, self.objective_ = meta["log_likelihood"], meta["objective"]
        self.converged_ = meta["converged"]
