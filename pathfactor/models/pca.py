"""PCA, the baseline of seed 000: scikit-learn's ``PCA`` on the model face.

``Y - mu ≈ X W^T`` with orthonormal loadings W (G x K, the principal axes) and scores ``X = (Y - mu) W``; the
limit ``sigma2 -> 0`` of PPCA's ``W = U_K (Lambda_K - sigma2 I)^(1/2)`` up to the scale (seed 000). Sparse input
stays sparse (scikit-learn centres it implicitly, ARPACK solver).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..data.inputs import aligned_centred, as_matrix, check_variance, working_dtype
from ..evaluate import orient
from .base import LatentModel
from .persist import expect_shapes
from .ppca import check_int

__all__ = ["PCA"]


class PCA(LatentModel):
    """Principal component analysis (scikit-learn ``PCA``; seed 000's baseline).

    Parameters
    ----------
    n_factors : int, number of components K (at most min(cells, genes)).
    svd_solver : passed to :class:`sklearn.decomposition.PCA` ("auto", "full", "covariance_eigh", "arpack",
        "randomized"); sparse input needs "auto" or "arpack".
    dtype : "float32" (default) or "float64".

    Attributes
    ----------
    Those of :class:`~pathfactor.models.base.LatentModel`: ``loadings_`` the principal axes (G x K,
    orthonormal, each signed so that its largest loading is positive), ``factor_scores_`` the projections,
    ``relevance_`` the explained variance ratio of each component; plus ``mu_`` (gene means) and
    ``explained_variance_``.
    """

    #: not "pca": scanpy owns obsm["X_pca"], uns["pca"] and varm["PCs"] (sc.pp.pca)
    key = "pf_pca"

    def __init__(self, *, n_factors: int = 10, svd_solver: str = "auto", dtype: str = "float32"):
        self.n_factors, self.svd_solver, self.dtype = n_factors, svd_solver, dtype

    def fit(self, data, layer: str | None = None, seed: int = 0, use_highly_variable: bool | None = None) -> "PCA":
        """Fit to ``data`` (AnnData, DataFrame, array or sparse; cells x genes). ``seed`` seeds the randomized
        and ARPACK solvers."""
        from sklearn.decomposition import PCA as SkPCA

        K = check_int("n_factors", self.n_factors, 1)
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
        solvers = ("auto", "full", "covariance_eigh", "arpack", "randomized")
        if self.svd_solver not in solvers:
            raise ValueError(f"svd_solver must be one of {solvers}, got {self.svd_solver!r}")
        matrix = as_matrix(data, layer, dtype=np.dtype(self.dtype), use_highly_variable=use_highly_variable)
        self._note_inputs(matrix, seed=seed)
        matrix = matrix.astype(working_dtype(matrix, matrix.Y.dtype))  # float64 for data too small for float32
        N, G = matrix.shape
        if K > min(N, G) or (sp.issparse(matrix.Y) and K >= min(N, G)):
            raise ValueError(f"PCA with n_factors={K} needs at least as many cells and genes as factors (sparse "
                             f"data: more), but the data have {N} cells x {G} genes; use n_factors < {min(N, G)}")
        if sp.issparse(matrix.Y) and self.svd_solver not in ("auto", "arpack"):
            raise ValueError(f"svd_solver={self.svd_solver!r} does not take sparse data; use 'auto' or 'arpack'")
        check_variance(matrix, "PCA")  # else sklearn divides 0 by 0 (dense) or ARPACK fails (sparse)
        sk = SkPCA(n_components=K, svd_solver=self.svd_solver, random_state=int(seed)).fit(matrix.Y)
        signs = orient(sk.components_.T)
        W = sk.components_.T.astype(np.float64) * signs
        self.mu_ = np.asarray(sk.mean_, dtype=np.float64)
        X = np.asarray(matrix.Y @ W) - self.mu_ @ W
        self.explained_variance_ = pd.Series(sk.explained_variance_, index=[f"PC{k + 1}" for k in range(K)],
                                             name="explained_variance")
        self._set_results(scores=X, loadings=W, obs_names=matrix.obs_names, var_names=matrix.var_names,
                          factor_names=[f"PC{k + 1}" for k in range(K)], factor_kinds=["latent"] * K,
                          relevance=sk.explained_variance_ratio_)
        return self

    def transform(self, data, layer: str | None = None) -> pd.DataFrame:
        """Scores ``(y_n - mu) W`` of (new) cells; needs the genes the model was fitted on."""
        self._check_fitted()
        Y, obs = aligned_centred(data, layer, self.loadings_.index, self.mu_)
        return pd.DataFrame(Y @ self.loadings_.to_numpy(), index=obs, columns=self.loadings_.columns)

    def _extra_state(self):
        return {}, {"mu": self.mu_, "explained_variance": self.explained_variance_.to_numpy()}

    def _load_extra_state(self, meta, arrays):
        G, K = self.loadings_.shape
        expect_shapes(arrays, {"mu": (G,), "explained_variance": (K,)})
        self.mu_ = arrays["mu"]
        self.explained_variance_ = pd.Series(arrays["explained_variance"], index=self.loadings_.columns,
                                             name="explained_variance")
