"""NMF: monotone multiplicative updates (Frobenius, KL; weighted or not; dense or sparse), imputation of missing
entries by weighted NMF, agreement with scikit-learn, the gene-set mask, the model face, bad input."""
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import pathfactor as pf
from pathfactor.data.inputs import unit_scale
from pathfactor.models.nmf import NMF


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These problems are tiny: one thread avoids thread contention on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def low_rank(n_cells=120, n_genes=80, k=4, noise="poisson", seed=0):
    """Non-negative low-rank data ``Y = X W^T`` (+ Poisson or clipped Gaussian noise) with the truth."""
    rng = np.random.default_rng(seed)
    X, W = rng.gamma(1.0, 1.0, (n_cells, k)), rng.gamma(0.7, 1.0, (n_genes, k))
    mean = X @ W.T
    Y = rng.poisson(mean) if noise == "poisson" else np.clip(mean + rng.normal(0, noise, mean.shape), 0, None)
    return Y.astype(np.float64), X, W


def programs(n_cells=300, n_genes=200, k=4, block=30, seed=0):
    """Counts from a background profile plus ``k`` programs on disjoint gene blocks (genes g0.., cells c0..)."""
    rng = np.random.default_rng(seed)
    X = rng.gamma(0.5, 2.0, (n_cells, k))
    W = np.zeros((n_genes, k))
    for j in range(k):
        W[j * block:(j + 1) * block, j] = rng.gamma(2.0, 1.0, block)
    background = rng.uniform(0.5, 1.5, n_cells)[:, None] * rng.gamma(2.0, 0.5, n_genes)[None, :]
    Y = rng.poisson(X @ W.T + background).astype(np.float32)
    genes = [f"g{i}" for i in range(n_genes)]
    return pd.DataFrame(Y, index=[f"c{i}" for i in range(n_cells)], columns=genes), X, genes


@pytest.fixture(scope="module")
def data():
    return low_rank()


@pytest.fixture(scope="module")
def planted():
    return programs()


@pytest.fixture(scope="module")
def fitted(planted):
    Y, _, genes = planted
    sets = {"PROG_A": genes[0:30], "PROG_B": genes[30:60]}
    return NMF(n_factors=5, progress=False, min_set_size=5).fit(Y, annotations=sets)


def _weights(shape, kind, seed=1):
    if kind is None:
        return None
    M = (np.random.default_rng(seed).random(shape) > 0.2) * np.random.default_rng(seed + 1).uniform(0.5, 2.0, shape)
    return sp.csr_matrix(M) if kind == "sparse" else M


# ------------------------------------------------------------------ the updates
@pytest.mark.parametrize("loss", ["frobenius", "kl"])
@pytest.mark.parametrize("weights", [None, "dense", "sparse"])
@pytest.mark.parametrize("sparse_input", [False, True])
def test_loss_never_increases(data, loss, weights, sparse_input):
    """Every multiplicative update is a majorise-minimise step (Lee & Seung): the loss never goes up (float64)."""
    Y = data[0]
    model = NMF(n_factors=4, loss=loss, max_epochs=40, tol=0, dtype="float64", progress=False)
    model.fit(sp.csr_matrix(Y) if sparse_input else Y, weights=_weights(Y.shape, weights))
    losses = -np.asarray(model.history_)
    assert len(losses) == 40
    assert (np.diff(losses) <= 1e-10 * losses[1:]).all(), np.diff(losses).max()
    assert losses[-1] < 0.8 * losses[0]
    assert (model.loadings_.to_numpy() >= 0).all() and (model.factor_scores_.to_numpy() >= 0).all()


@pytest.mark.parametrize("loss", ["frobenius", "kl"])
def test_loss_never_increases_with_mask(planted, loss):
    Y, _, genes = planted
    sets = {"PROG_A": genes[0:30], "PROG_B": genes[30:60]}
    model = NMF(n_factors=3, loss=loss, max_epochs=30, tol=0, dtype="float64", progress=False, min_set_size=5)
    adata = ad.AnnData(sp.csr_matrix(Y.to_numpy()), obs=pd.DataFrame(index=Y.index), var=pd.DataFrame(index=genes))
    model.fit(adata, annotations=pd.DataFrame(
        {name: np.isin(genes, members) for name, members in sets.items()}, index=genes))
    losses = -np.asarray(model.history_)
    assert (np.diff(losses) <= 1e-10 * losses[1:]).all()


@pytest.mark.parametrize("loss", ["frobenius", "kl"])
@pytest.mark.parametrize("weights", [None, "dense", "sparse"])
def test_sparse_input_takes_the_same_path_as_dense(data, loss, weights):
    """The sparse kernels (CSR products, sampled X W^T at the non-zeros) reproduce the dense updates exactly."""
    Y = data[0]
    M = _weights(Y.shape, weights)
    fit = lambda Yin, Min: NMF(n_factors=4, loss=loss, max_epochs=25, tol=0, dtype="float64",
                               progress=False).fit(Yin, weights=Min)
    dense = fit(Y, None if M is None else (M.toarray() if sp.issparse(M) else M))
    sparse = fit(sp.csr_matrix(Y), M)
    assert sparse.loss_ == pytest.approx(dense.loss_, rel=1e-9)
    np.testing.assert_allclose(sparse.loadings_.to_numpy(), dense.loadings_.to_numpy(), rtol=1e-6, atol=1e-10)


def test_loss_is_the_documented_objective(data):
    """loss_ is 1/2 sum M (Y - XW^T)^2 and sum M (Y log(Y/XW^T) - Y + XW^T), recomputed from the results."""
    Y = data[0]
    M = _weights(Y.shape, "dense")
    for loss in ("frobenius", "kl"):
        model = NMF(n_factors=3, loss=loss, max_epochs=20, tol=0, dtype="float64", progress=False).fit(Y, weights=M)
        L = model.reconstruct()
        if loss == "frobenius":
            expected = 0.5 * (M * (Y - L) ** 2).sum()
        else:
            expected = (M * (np.where(Y > 0, Y * np.log(np.where(Y > 0, Y, 1) / L), 0) - Y + L)).sum()
        assert model.loss_ == pytest.approx(expected, rel=1e-8)
        assert model.reconstruction_err_ == pytest.approx(np.sqrt(2 * expected), rel=1e-8)


# ------------------------------------------------------------------ weighted NMF: missing entries
@pytest.mark.parametrize("loss", ["frobenius", "kl"])
def test_weighted_nmf_predicts_hidden_entries(loss):
    """Seed 003: with 20 % of entries hidden (weight 0), weighted NMF imputes them far better than NMF that takes
    them for zeros."""
    Y, _, _ = low_rank(n_cells=150, n_genes=100, k=4, noise=0.5, seed=1)
    hidden = np.random.default_rng(2).random(Y.shape) < 0.2
    observed = np.where(hidden, 0.0, Y)
    weighted = NMF(n_factors=4, loss=loss, max_epochs=300, progress=False).fit(observed, weights=~hidden)
    plain = NMF(n_factors=4, loss=loss, max_epochs=300, progress=False).fit(observed)
    rmse = lambda m: np.sqrt(((m.reconstruct() - Y)[hidden] ** 2).mean())
    assert rmse(weighted) < 0.5 * rmse(plain)
    assert rmse(weighted) < 0.8  # noise sd 0.5


# ------------------------------------------------------------------ against scikit-learn
@pytest.mark.parametrize("loss,sk_loss", [("frobenius", "frobenius"), ("kl", "kullback-leibler")])
@pytest.mark.parametrize("sparse_input", [False, True])
def test_loss_matches_scikit_learn(data, loss, sk_loss, sparse_input):
    """Same K, NNDSVDa start and number of multiplicative updates as scikit-learn's NMF(solver='mu'): the same
    loss (the brief asks for 5 %; the two implement the same updates, so they agree far closer)."""
    from sklearn.decomposition import NMF as SkNMF

    Y = data[0].astype(np.float32)
    Y = Y / unit_scale(Y)  # in the units NMF fits in, scikit-learn's absolute thresholds act at the same place
    Y = sp.csr_matrix(Y) if sparse_input else Y
    ours = NMF(n_factors=5, loss=loss, max_epochs=100, tol=0, progress=False).fit(Y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning: tol=0 runs all iterations on purpose
        theirs = SkNMF(5, init="nndsvda", solver="mu", beta_loss=sk_loss, max_iter=100, tol=0, random_state=0).fit(Y)
    assert ours.reconstruction_err_ == pytest.approx(theirs.reconstruction_err_, rel=0.05)
    assert ours.reconstruction_err_ == pytest.approx(theirs.reconstruction_err_, rel=1e-3)


# ------------------------------------------------------------------ gene sets
def test_mask_is_respected_and_planted_programs_recovered(planted, fitted):
    Y, X_true, genes = planted
    assert list(fitted.loadings_.columns) == ["PROG_A", "PROG_B", "nmf_1", "nmf_2", "nmf_3"]
    assert list(fitted.factor_kinds_) == ["annotated"] * 2 + ["latent"] * 3
    L = fitted.loadings_
    outside_a = [g for g in genes if g not in genes[0:30]]
    outside_b = [g for g in genes if g not in genes[30:60]]
    assert (L.loc[outside_a, "PROG_A"] == 0).all() and (L.loc[outside_b, "PROG_B"] == 0).all()
    assert (L.loc[genes[0:30], "PROG_A"] > 0).all()
    assert fitted.annotation_["PROG_A"].sum() == 30 and not fitted.annotation_["nmf_1"].any()
    for k, name in enumerate(["PROG_A", "PROG_B"]):
        assert np.corrcoef(fitted.factor_scores_[name], X_true[:, k])[0, 1] > 0.95
    # the unannotated programs are found by the free factors
    corr = np.corrcoef(np.c_[fitted.factor_scores_.to_numpy()[:, 2:], X_true[:, 2:]].T)[:3, 3:]
    assert (corr.max(0) > 0.95).all()
    # a hard mask never adds genes to a set
    assert all(len(g) == 0 for g in fitted.refined_annotations()["gained"])


def test_kl_with_mask_on_sparse_counts(planted):
    Y, X_true, genes = planted
    model = NMF(n_factors=5, loss="kl", progress=False, min_set_size=5)
    adata = ad.AnnData(sp.csr_matrix(Y.to_numpy()), obs=pd.DataFrame(index=Y.index), var=pd.DataFrame(index=genes))
    model.fit(adata, annotations={"PROG_A": genes[0:30], "PROG_B": genes[30:60]})
    assert (model.loadings_.iloc[30:, 0] == 0).all()
    assert np.corrcoef(model.factor_scores_.iloc[:, 0], X_true[:, 0])[0, 1] > 0.95


# ------------------------------------------------------------------ the model face
def test_results_relevance_and_write(planted, fitted):
    Y, _, _ = planted
    np.testing.assert_allclose(fitted.loadings_.sum(0), 1.0, rtol=1e-6)  # programs as distributions over genes
    # relevance: uncentred R^2 of each factor alone, recomputed by brute force
    Yv = Y.to_numpy(dtype=np.float64)
    Xs, Ws = fitted.factor_scores_.to_numpy(), fitted.loadings_.to_numpy()
    r2 = [1 - ((Yv - np.outer(Xs[:, k], Ws[:, k])) ** 2).sum() / (Yv ** 2).sum() for k in range(Xs.shape[1])]
    np.testing.assert_allclose(fitted.relevance_.to_numpy(), r2, rtol=1e-5, atol=1e-8)
    free = fitted.relevance_.iloc[2:].to_numpy()
    assert (np.diff(free) <= 0).all()  # nmf_1 explains most
    adata = ad.AnnData(Y)
    fitted.write(adata)
    assert adata.obsm["X_nmf"].shape == (300, 5) and adata.varm["nmf_loadings"].shape == (200, 5)
    assert adata.uns["nmf"]["factor_names"][0] == "PROG_A" and "nmf_annotation" in adata.varm


def test_transform_recovers_the_training_scores(planted, fitted):
    Y, _, _ = planted
    scores = fitted.transform(Y)
    for name in scores.columns:
        assert np.corrcoef(scores[name], fitted.factor_scores_[name])[0, 1] > 0.99
    # extra genes and another gene order are fine
    shuffled = Y.iloc[:, ::-1].assign(extra=1.0)
    np.testing.assert_allclose(fitted.transform(shuffled).to_numpy(), scores.to_numpy(), rtol=1e-4, atol=1e-4)


def test_save_load_round_trip(tmp_path, planted, fitted):
    Y, _, _ = planted
    fitted.save(tmp_path / "m")
    back = pf.load(tmp_path / "m")
    assert isinstance(back, NMF) and back.get_params() == fitted.get_params()
    pd.testing.assert_frame_equal(back.loadings_, fitted.loadings_)
    pd.testing.assert_frame_equal(back.factor_scores_, fitted.factor_scores_)
    pd.testing.assert_frame_equal(back.annotation_, fitted.annotation_)
    assert back.loss_ == fitted.loss_ and back.n_iter_ == fitted.n_iter_
    pd.testing.assert_frame_equal(back.transform(Y.iloc[:20]), fitted.transform(Y.iloc[:20]))


def test_weights_from_a_layer_and_a_dataframe(data):
    Y = data[0]
    M = _weights(Y.shape, "dense")
    adata = ad.AnnData(Y.astype(np.float32), layers={"certainty": M.astype(np.float32)})
    a = NMF(n_factors=3, max_epochs=20, tol=0, progress=False).fit(adata, weights="certainty")
    frame = pd.DataFrame(M, index=adata.obs_names, columns=adata.var_names).iloc[::-1]  # aligned by name
    b = NMF(n_factors=3, max_epochs=20, tol=0, progress=False).fit(adata, weights=frame)
    assert a.loss_ == pytest.approx(b.loss_, rel=1e-6)
    assert "certainty" in adata.layers and adata.obsm == {}  # the caller's data are untouched


def test_same_seed_same_result(data):
    fit = lambda seed: NMF(n_factors=3, init="random", max_epochs=10, progress=False).fit(data[0], seed=seed)
    np.testing.assert_allclose(fit(3).loadings_, fit(3).loadings_, rtol=1e-5, atol=1e-7)
    assert not np.array_equal(fit(3).loadings_, fit(4).loadings_)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("make,kwargs,match", [
    (lambda Y: Y - 1.0, {}, "non-negative data.*not scaled or centred"),
    (lambda Y: np.where(Y > 3, np.nan, Y), {}, "NaN.*weights="),
    (lambda Y: Y, {"weights": np.ones((3, 3))}, "weights have shape"),
    (lambda Y: Y, {"weights": -np.ones((120, 80))}, "non-negative"),
    (lambda Y: Y, {"weights": np.zeros((120, 80))}, "all weights are zero"),
    (lambda Y: Y, {"weights": "counts"}, "needs AnnData"),
    (lambda Y: Y, {"annotations": {"NOPE": ["XYZ1", "XYZ2"]}}, "none of the 1 gene sets"),
])
def test_bad_input(data, make, kwargs, match):
    with pytest.raises(ValueError, match=match):
        NMF(n_factors=2, progress=False, min_set_size=1).fit(make(data[0]), **kwargs)


@pytest.mark.parametrize("params,match", [
    ({"n_factors": 0}, "n_factors must be an integer >= 1"),
    ({"n_factors": 2.5}, "n_factors must be an integer"),
    ({"n_factors": 81}, "exceed.*min\\(cells, genes\\) = 80"),
    ({"loss": "poisson"}, "loss must be"),
    ({"init": "nndsvd"}, "init must be"),
    ({"dtype": "float16"}, "dtype"),
])
def test_bad_parameters(data, params, match):
    with pytest.raises(ValueError, match=match):
        NMF(progress=False, **params).fit(data[0])


def test_transform_needs_the_model_genes(planted, fitted):
    Y, _, _ = planted
    with pytest.raises(ValueError, match="genes are missing"):
        fitted.transform(Y.iloc[:, :10])
    with pytest.raises(ValueError, match="non-negative"):
        fitted.transform(-Y)
    with pytest.raises(RuntimeError, match="not fitted"):
        NMF().reconstruct()
