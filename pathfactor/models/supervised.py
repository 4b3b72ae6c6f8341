"""The supervised model of seed 000 (MuVI with known covariates): ``y_n ~ N(W x_n + B^T z_n, Psi)``.

Horseshoe loadings W on latent factors, ``b_gc ~ N(0, v_c)`` effects of known covariates Z (e.g. stimulated vs
control), each covariate's variance ``v_c`` learned from all genes (the seed's ``B ~ N(0, I)`` in the data's
units: a fixed unit variance would make the results depend on the units of the data). This is Spex with covariates and no gene sets (dense factors), so the maths lives in one place
(``_spex_vi``). Two estimators on top:

* ``posterior="blocked"`` (default): per gene one joint Gaussian q(w_g, b_g) — the blocked posterior seed 000
  proposes — plus the closed-form step along the likelihood's symmetry ``x -> x - A z``, ``b -> b + A^T w``
  (see ``_spex_vi``) and the posterior variance of B along it; ``"mean-field"``: q(W) q(B) apart, as MuVI;
* ``two_step=True``: the poster's reading of MuVI — OLS of Y on Z, then PPCA of the residuals.
"""
from __future__ import annotations

import numpy as np

from ..data.inputs import as_matrix, check_variance, covariate_design
from ..data.views import is_multiview
from ..evaluate import factor_r2
from .base import factor_layout
from .spex import Spex

__all__ = ["Supervised"]


class Supervised(Spex):
    """``Y = X W^T + Z B^T + noise`` with known covariates Z (seed 000).

    Parameters
    ----------
    n_factors : number of latent factors X next to the covariates.
    posterior : "blocked" | "mean-field" (see module docstring).
    two_step : estimate B by OLS and the factors by PPCA (maximum likelihood) of the OLS residuals instead.
    global_scale : ``None`` (default) learns the horseshoe's global scale tau ~ C+(0, 1) per factor, as seed 000
        and MuVI do; a number holds tau fixed at that many data sd (as Spex). Fixed, tau shrinks W less, which
        helps B when factors correlate strongly with the covariates (Finding 3 at correlation 0.6: 90 % coverage
        0.83 vs 0.77), but on Kang PBMC the learned scale ranks interferon genes higher (7 vs 6 of the top 10).
    max_epochs, tol, progress, dtype : as :class:`Spex`.

    ``fit(data, covariates=..., layer=None, device="auto", seed=0)``; results as Spex's, with
    ``covariate_effects_`` / ``covariate_effects_sd_`` (genes x levels ``COL=level``).
    """

    key = "supervised"
    dense_name = "factor"

    def __init__(self, *, n_factors: int = 5, posterior: str = "blocked", two_step: bool = False,
                 global_scale: float | None = None, max_epochs: int = 500, tol: float = 1e-6, progress: bool = True,
                 dtype: str = "float32"):
        super().__init__(n_sparse=0, n_dense=n_factors, global_scale=global_scale, max_epochs=max_epochs, tol=tol,
                         posterior=posterior, progress=progress, dtype=dtype)
        self.n_factors, self.two_step = n_factors, two_step

    def fit(self, data, covariates=None, layer: str | None = None, device="auto", seed: int = 0,
            annotations=None, checkpoint_dir=None, use_highly_variable: bool | None = None, interventions=None,
            reference=None, allow_missing: bool = False) -> "Supervised":
        """``covariates`` act on the genes (B); ``interventions`` (an obs column, or one label per cell) act on the
        factors, against the ``reference`` level (see :meth:`Spex.fit`). At least one of them is needed.
        ``data`` may also hold several (Gaussian) views, a MuData or ``{view: AnnData}``, and ``allow_missing=True``
        fits NaN entries as missing, as for Spex (the covariates then come from the MuData's global obs)."""
        no_covariates = covariates is None or (not isinstance(covariates, str) and len(covariates) == 0)
        if no_covariates and interventions is None:
            raise ValueError("the supervised model needs covariates= (obs column names or a cells x C array) or "
                             "interventions= (an obs column); without them use Spex or PPCA")
        if self.two_step and interventions is not None:
            raise ValueError("two_step=True estimates covariate effects on genes only; fit interventions with "
                             "two_step=False")
        if annotations is not None:
            raise ValueError("the supervised model takes no gene sets; use Spex(covariates=...) for annotated factors")
        if self.two_step and (allow_missing or is_multiview(data)):
            raise ValueError("two_step=True fits one complete view; use two_step=False for several views or "
                             "missing entries")
        if not self.two_step:
            self.n_dense = self.n_factors  # Spex's name for them (n_factors may have changed by set_params)
            super().fit(data, covariates=covariates, layer=layer, device=device, seed=seed,
                        checkpoint_dir=checkpoint_dir, use_highly_variable=use_highly_variable,
                        interventions=interventions, reference=reference, allow_missing=allow_missing)
            self.factor_kinds_[:] = "latent"
            return self
        return self._fit_two_step(data, covariates, layer, seed, use_highly_variable, reference)

    def _fit_two_step(self, data, covariates, layer, seed, use_highly_variable, reference=None) -> "Supervised":
        """OLS of the centred Y on the centred Z, then PPCA (closed-form MLE) of the residuals."""
        from .ppca import PPCA

        matrix = as_matrix(data, layer, use_highly_variable=use_highly_variable)
        self._note_inputs(matrix, seed=seed)
        check_variance(matrix, "Supervised")
        Z, names = covariate_design(getattr(data, "obs", None), covariates, matrix.shape[0], reference=reference)
        Y = matrix.dense(np.float64)
        Yc, Zc = Y - Y.mean(0), Z - Z.mean(0)
        rank = np.linalg.matrix_rank(Zc)
        if rank < Zc.shape[1]:
            raise ValueError(f"covariate columns {list(names)} are collinear (rank {rank} < {Zc.shape[1]}): OLS needs "
                             "independent columns; drop the redundant covariate or use two_step=False")
        B, *_ = np.linalg.lstsq(Zc, Yc, rcond=None)                       # C x G
        R = Yc - Zc @ B
        dof = max(Y.shape[0] - Z.shape[1] - 1, 1)
        sigma2 = (R * R).sum(0) / dof
        B_sd = np.sqrt(np.outer(np.diag(np.linalg.inv(Zc.T @ Zc)), sigma2))  # C x G
        ppca = PPCA(n_factors=self.n_factors, method="mle", progress=False).fit(R, seed=seed)
        X, W = ppca.factor_scores_.to_numpy(), ppca.loadings_.to_numpy()
        self._set_results(scores=X, loadings=W, obs_names=matrix.obs_names, var_names=matrix.var_names,
                          factor_names=factor_layout([], 0, self.n_factors, self.dense_name)[0],
                          factor_kinds=["latent"] * self.n_factors,
                          relevance=factor_r2(Yc, X, W), covariate_effects=B.T, covariate_effects_sd=B_sd.T,
                          covariate_names=names)
        self.elbo_, self.converged_ = float("nan"), True
        self._posterior = None
        self._set_intervention_results(None, None, None, 1.0, None)
        return self

    def transform(self, data, layer: str | None = None, covariates=None):
        if self.two_step:
            raise ValueError("transform is not available for two_step=True; fit with two_step=False")
        return super().transform(data, layer=layer, covariates=covariates)

    def _extra_state(self):
        if self._posterior is None:
            return {"covariates": None, "elbo": None, "converged": True}, {}
        return super()._extra_state()
