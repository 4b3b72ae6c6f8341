"""PCA, PPCA (closed form, EM, MAP, VI) and factor analysis: the derivations (monotone objectives, agreement with
the closed form and scikit-learn), recovery of simulated truth, the model face (save/load, transform), bad input."""
import numpy as np
import pytest
import torch
from scipy.linalg import subspace_angles
from scipy.stats import multivariate_normal
from sklearn.decomposition import PCA as SkPCA
from sklearn.decomposition import FactorAnalysis as SkFA

import pathfactor as pf
from pathfactor.data.simulate import ppca_interventions
from pathfactor.models.factor_analysis import FactorAnalysis, _FAEM
from pathfactor.models.pca import PCA
from pathfactor.models.ppca import PPCA, _EM, _MAP, _VI, gaussian_log_likelihood, mle

F64 = dict(progress=False, dtype="float64")


@pytest.fixture(scope="module")
def sim():
    return ppca_interventions(n_cells=300, n_genes=40, n_factors=3, sigma2=0.5, shift=0.0, seed=1)


@pytest.fixture(scope="module")
def Yc(sim):
    Y = torch.tensor(sim.X, dtype=torch.float64)
    return Y - Y.mean(0)


@pytest.fixture(scope="module")
def hetero():
    """Factor-analysis data with a heteroscedastic Psi (noise variances 0.2 to 3)."""
    rng = np.random.default_rng(0)
    N, G, K = 500, 60, 4
    W = rng.normal(size=(G, K))
    psi = rng.uniform(0.2, 3.0, G)
    Y = rng.normal(size=(N, K)) @ W.T + rng.normal(size=(N, G)) * np.sqrt(psi) + 5.0
    return Y, psi, K


def _start(Y, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    var = (Y * Y).mean()
    return torch.randn(Y.shape[1], K, generator=g, dtype=torch.float64) * var.sqrt(), var


def _non_decreasing(values, rel=1e-10):
    values = np.asarray(values, dtype=float)
    steps = np.diff(values)
    return (steps >= -rel * np.abs(values[1:])).all(), steps


# ---------------------------------------------------------------------------------------------- the maths
def test_woodbury_log_likelihood_matches_dense_gaussian(Yc):
    g = torch.Generator().manual_seed(2)
    W = torch.randn(40, 3, generator=g, dtype=torch.float64)
    psi = torch.rand(40, generator=g, dtype=torch.float64) + 0.1
    dense = multivariate_normal(np.zeros(40), (W @ W.T + torch.diag(psi)).numpy()).logpdf(Yc.numpy()).sum()
    assert float(gaussian_log_likelihood(Yc, W, psi)) == pytest.approx(dense, rel=1e-12)


@pytest.mark.parametrize("n_cells, n_genes", [(300, 40), (30, 80)])
def test_closed_form_is_tipping_bishop(n_cells, n_genes):
    """Both branches (S = Y^T Y / N when G <= N, the Gram matrix when N < G) give seed 000's MLE."""
    Y = torch.tensor(ppca_interventions(n_cells=n_cells, n_genes=n_genes, n_factors=3, shift=0.0, seed=4).X,
                     dtype=torch.float64)
    Y = Y - Y.mean(0)
    W, sigma2 = mle(Y, 3)
    lam, U = np.linalg.eigh((Y.T @ Y / n_cells).numpy())
    lam, U = lam[::-1], U[:, ::-1]
    assert float(sigma2) == pytest.approx(lam[3:].mean(), rel=1e-10)
    np.testing.assert_allclose((W @ W.T).numpy(), (U[:, :3] * (lam[:3] - lam[3:].mean())) @ U[:, :3].T, atol=1e-9)


def test_ppca_em_agrees_with_closed_form(sim):
    closed = PPCA(n_factors=3, **F64).fit(sim)
    em = PPCA(n_factors=3, method="em", tol=1e-10, **F64).fit(sim)
    assert em.converged_
    assert em.log_likelihood_ == pytest.approx(closed.log_likelihood_, rel=1e-4)
    assert subspace_angles(em.loadings_.to_numpy(), closed.loadings_.to_numpy()).max() < 1e-3
    # principal axes and signs make the two fits the same matrix, not only the same subspace
    np.testing.assert_allclose(em.loadings_.to_numpy(), closed.loadings_.to_numpy(), rtol=1e-3, atol=1e-3)
    assert em.sigma2_ == pytest.approx(closed.sigma2_, rel=1e-4)


@pytest.mark.parametrize("expand", [True, False])
def test_em_log_likelihood_never_decreases(Yc, expand):
    W0, var = _start(Yc, 3)
    em = _EM(Yc, W0, var, expand=expand)
    lls = [em.log_likelihood()] + [em.epoch() for _ in range(40)]
    ok, steps = _non_decreasing(lls)
    assert ok, steps
    assert lls[-1] > lls[0] + 100
    if expand:  # parameter expansion converges in a few steps (plain EM crawls along the scale of W)
        assert lls[10] == pytest.approx(float(gaussian_log_likelihood(Yc, *mle(Yc, 3)[:1], mle(Yc, 3)[1].expand(40))),
                                        rel=1e-9)


def test_vi_elbo_never_decreases_at_any_block_update(Yc):
    """Each CAVI block (q(X), q(W), q(sigma2)) and the expansion step maximises the ELBO: the derivation's test."""
    W0, var = _start(Yc, 3, seed=5)
    vi = _VI(Yc, W0, var)
    vi.update_w()                      # q(W) starts as a point mass (Sigma_W = 0, ELBO -inf)
    elbos = [vi.elbo()]
    for _ in range(15):
        for step in (vi.update_x, vi.update_w, vi.update_sigma2, vi.update_expansion):
            step()
            elbos.append(vi.elbo())
    ok, steps = _non_decreasing(elbos)
    assert ok, steps
    assert elbos[-1] > elbos[0] + 100


@pytest.mark.parametrize("expand", [True, False])
def test_map_log_posterior_never_decreases(Yc, expand):
    W0, var = _start(Yc, 3, seed=6)
    task = _MAP(Yc, W0, var, expand=expand)
    ok, steps = _non_decreasing([task.epoch() for _ in range(40)])
    assert ok, steps


def test_map_and_vi_approach_the_mle_as_cells_grow():
    """Isotropic priors keep the principal subspace: MAP and VI share the MLE's subspace at any N, which
    approaches the truth as N grows. VI's loadings themselves approach the MLE's (the prior's pull fades as 1/N);
    the poster's joint MAP stays biased (seed 000, Finding 1): its factors shrink and sigma2 -> (G-K)/G sigma2."""
    rng = np.random.default_rng(0)
    G, K = 30, 2
    W_true = rng.normal(size=(G, K))
    out = {}
    for N in (100, 2000):
        Y = rng.normal(size=(N, K)) @ W_true.T + rng.normal(size=(N, G))
        fits = {m: PPCA(n_factors=K, method=m, **F64).fit(Y) for m in ("mle", "map", "vi")}
        W_mle = fits["mle"].loadings_.to_numpy()
        for m in ("map", "vi"):
            W = fits[m].loadings_.to_numpy()
            assert subspace_angles(W, W_mle).max() < 1e-3, (m, N)
        # at the joint mode the priors of X and W balance (the expansion step's fixed point): X^T X = W^T W / s^2,
        # the W prior being N(0, s^2) in units of the data's sd s
        X, W = fits["map"].factor_scores_.to_numpy(), fits["map"].loadings_.to_numpy()
        Yc = Y - Y.mean(0)
        s2 = (Yc * Yc).mean()
        Ws = W / np.sqrt(s2)
        np.testing.assert_allclose(X.T @ X, Ws.T @ Ws, rtol=1e-4, atol=1e-4 * np.abs(Ws.T @ Ws).max())
        # and sigma2 is the mode of its conditional with the InvGamma(1, s^2) prior: (R + 2 b0) / (N G + 2 a0 + 2)
        R = ((Yc - X @ W.T) ** 2).sum()
        assert fits["map"].sigma2_ == pytest.approx((R + 2 * s2) / (N * G + 4), rel=1e-6)
        out[N] = dict(
            angle_true={m: subspace_angles(f.loadings_.to_numpy(), W_true).max() for m, f in fits.items()},
            vi_gap=np.linalg.norm(fits["vi"].loadings_.to_numpy() - W_mle) / np.linalg.norm(W_mle),
            map_sigma2_ratio=fits["map"].sigma2_ / fits["mle"].sigma2_,
            map_x_var=fits["map"].factor_scores_.var().max())
    for m in ("map", "vi"):
        assert out[2000]["angle_true"][m] < out[100]["angle_true"][m]
        assert out[2000]["angle_true"][m] < 0.05
    assert out[2000]["vi_gap"] < 0.2 * out[100]["vi_gap"] and out[2000]["vi_gap"] < 0.01
    assert out[2000]["map_sigma2_ratio"] == pytest.approx((G - K) / G, rel=0.01)
    assert out[2000]["map_x_var"] < 0.5 * out[100]["map_x_var"] < 0.5


def test_fa_matches_sklearn_and_recovers_heteroscedastic_psi(hetero):
    Y, psi, K = hetero
    fa = FactorAnalysis(n_factors=K, **F64).fit(Y)
    sk = SkFA(K, tol=1e-8, max_iter=10000, svd_method="lapack").fit(Y)
    assert fa.converged_
    assert fa.log_likelihood_ == pytest.approx(sk.score(Y) * Y.shape[0], rel=1e-3)
    assert fa.log_likelihood(Y) == pytest.approx(fa.log_likelihood_, rel=1e-10)
    np.testing.assert_allclose(fa.Psi_.to_numpy(), sk.noise_variance_, rtol=0.02)
    assert np.corrcoef(fa.Psi_, psi)[0, 1] > 0.95
    assert np.median(np.abs(fa.Psi_.to_numpy() / psi - 1)) < 0.1
    # PPCA, with one noise variance for all genes, fits these data worse
    assert PPCA(n_factors=K, **F64).fit(Y).log_likelihood_ < fa.log_likelihood_ - 100


def test_fa_log_likelihood_never_decreases(hetero):
    Y, _, K = hetero
    Yc = torch.tensor(Y - Y.mean(0))
    W0, var = _start(Yc, K, seed=3)
    for expand in (True, False):
        em = _FAEM(Yc, W0, var.expand(Yc.shape[1]), expand=expand)
        ok, steps = _non_decreasing([em.log_likelihood()] + [em.epoch() for _ in range(30)])
        assert ok, (expand, steps)


def test_pca_matches_sklearn(sim):
    pca = PCA(n_factors=5, dtype="float64").fit(sim)
    sk = SkPCA(5).fit(sim.X.astype(np.float64))
    signs = np.sign((pca.loadings_.to_numpy() * sk.components_.T).sum(0))
    np.testing.assert_allclose(pca.loadings_.to_numpy(), sk.components_.T * signs, atol=1e-8)
    np.testing.assert_allclose(pca.factor_scores_.to_numpy(), sk.transform(sim.X.astype(np.float64)) * signs, atol=1e-6)
    np.testing.assert_allclose(pca.relevance_.to_numpy(), sk.explained_variance_ratio_, rtol=1e-10)
    assert list(pca.loadings_.columns) == ["PC1", "PC2", "PC3", "PC4", "PC5"]
    # sparse input gives the same components
    import scipy.sparse as sp
    sparse = PCA(n_factors=5, dtype="float64").fit(sp.csr_matrix(sim.X))
    assert subspace_angles(sparse.loadings_.to_numpy(), pca.loadings_.to_numpy()).max() < 1e-6


# ---------------------------------------------------------------------------------------------- the model face
MODELS = [PCA(n_factors=3), PPCA(n_factors=3, progress=False), PPCA(n_factors=3, method="em", progress=False), PPCA(n_factors=3, method="map", progress=False),
          PPCA(n_factors=3, method="vi", progress=False), FactorAnalysis(n_factors=3, progress=False)]


@pytest.mark.parametrize("model", MODELS, ids=lambda m: getattr(m, "method", type(m).__name__))
def test_save_load_round_trip_and_transform(sim, model, tmp_path):
    model.fit(sim)
    assert model.factor_scores_.shape == (300, 3) and model.loadings_.shape == (40, 3)
    # transform of the training cells gives the training scores, with genes in any order and extra genes
    shuffled = sim[:, ::-1].copy()
    np.testing.assert_allclose(model.transform(shuffled).to_numpy(), model.factor_scores_.to_numpy(), atol=1e-4)
    loaded = pf.load(model.save(tmp_path / "m"))
    assert type(loaded) is type(model) and loaded.get_params() == model.get_params()
    np.testing.assert_allclose(loaded.transform(sim).to_numpy(), model.transform(sim).to_numpy(), atol=1e-10)
    np.testing.assert_allclose(loaded.relevance_, model.relevance_)
    if hasattr(model, "log_likelihood"):
        assert loaded.log_likelihood(sim) == pytest.approx(model.log_likelihood(sim), rel=1e-12)
    with pytest.raises(ValueError, match="genes are missing"):
        model.transform(sim[:, :20])
    adata = sim.copy()
    model.write(adata)
    assert adata.obsm[f"X_{model.key}"].shape == (300, 3) and adata.uns[model.key]["model"] == type(model).__name__


def test_relevance_is_r2_and_vi_reports_loading_sd(sim):
    vi = PPCA(n_factors=3, method="vi", **F64).fit(sim)
    assert (vi.relevance_ > 0.05).all() and vi.relevance_.sum() < 1
    assert vi.loadings_sd_.shape == (40, 3) and (vi.loadings_sd_.to_numpy() > 0).all()
    assert list(vi.relevance().index) == ["PPC1", "PPC2", "PPC3"]   # principal axes: decreasing relevance


@pytest.mark.parametrize("make", [PCA, PPCA, FactorAnalysis], ids=lambda c: c.__name__)
@pytest.mark.parametrize("n_factors, data_shape, match", [
    (35, (30, 40), "cells"), (45, (300, 40), "genes"), (0, (30, 40), "n_factors"), (2.5, (30, 40), "n_factors"),
    (True, (30, 40), "n_factors")])
def test_bad_shapes_and_factor_counts(make, n_factors, data_shape, match):
    Y = np.random.default_rng(0).normal(size=data_shape)
    with pytest.raises(ValueError, match=match):
        make(n_factors=n_factors).fit(Y)


@pytest.mark.parametrize("make", [PCA, PPCA, FactorAnalysis], ids=lambda c: c.__name__)
def test_nan_is_refused(make):
    Y = np.random.default_rng(0).normal(size=(30, 10))
    Y[3, 4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        make(n_factors=2).fit(Y)


def test_bad_method_and_options():
    Y = np.random.default_rng(0).normal(size=(30, 10))
    with pytest.raises(ValueError, match="method must be one of 'mle', 'em', 'map', 'vi'"):
        PPCA(n_factors=2, method="gibbs").fit(Y)
    with pytest.raises(ValueError, match="dtype"):
        PPCA(n_factors=2, dtype="float16").fit(Y)
    with pytest.raises(ValueError, match="max_epochs"):
        FactorAnalysis(n_factors=2, max_epochs=0).fit(Y)
    with pytest.raises(ValueError, match="svd_solver"):
        PCA(n_factors=2, svd_solver="magic").fit(Y)
    with pytest.raises(RuntimeError, match="not fitted"):
        PPCA(n_factors=2).transform(Y)


@pytest.mark.parametrize("name", ["Spex", "Supervised", "Slalom", "Autoencoder", "NMF", "PCA", "PPCA",
                                  "FactorAnalysis", "VAE", "GMVAE"])
def test_scikit_learn_clone_and_set_params(name):
    from sklearn.base import clone

    cls = getattr(pf.models, name)
    model = cls(max_epochs=7) if "max_epochs" in cls._param_names() else cls(n_factors=3)
    copy = clone(model)
    assert type(copy) is cls and copy.get_params() == model.get_params() and copy is not model
    with pytest.raises(TypeError):
        cls(3)  # keyword-only, as scikit-learn's estimators
    with pytest.raises(ValueError, match="has no parameters"):
        model.set_params(not_a_parameter=1)


def test_clone_keeps_spex_parameters_and_set_params_changes_the_fit():
    from sklearn.base import clone

    assert clone(pf.models.Spex(n_sparse=2)).n_sparse == 2
    sim = pf.simulate.ppca_interventions(n_cells=60, n_genes=40, n_factors=2)
    sup = pf.models.Supervised(n_factors=1, max_epochs=3, progress=False).set_params(n_factors=2)
    assert sup.fit(sim, covariates="group").loadings_.shape[1] == 2
