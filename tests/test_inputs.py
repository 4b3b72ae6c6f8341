"""The door every model goes through: checks with clear messages, and the caller's data left alone."""
import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from pathfactor.data.inputs import as_matrix, check_counts, covariate_design


def _adata(X):
    return ad.AnnData(X, obs=pd.DataFrame(index=[f"c{i}" for i in range(X.shape[0])]),
                      var=pd.DataFrame(index=[f"g{j}" for j in range(X.shape[1])]))


@pytest.mark.parametrize("fmt", ["csr", "csc", "coo", "lil", "dok", "bsr", "dia"])
def test_every_sparse_format_is_read_as_csr_with_the_same_values(fmt):
    X = np.random.default_rng(0).poisson(1.0, size=(6, 5)).astype(np.float64)
    m = as_matrix(sp.csr_matrix(X).asformat(fmt))
    assert sp.isspmatrix_csr(m.Y) and m.Y.dtype == np.float32
    np.testing.assert_array_equal(m.dense(), X.astype(np.float32))


def test_layers_names_and_no_mutation():
    X = np.arange(12, dtype=np.float64).reshape(4, 3)
    a = _adata(X.copy())
    a.layers["counts"] = X * 2
    m = as_matrix(a, layer="counts")
    np.testing.assert_array_equal(m.dense(), (X * 2).astype(np.float32))
    assert list(m.var_names) == ["g0", "g1", "g2"] and list(m.obs_names) == ["c0", "c1", "c2", "c3"]
    m.Y[0, 0] = -1
    assert a.layers["counts"][0, 0] == 0  # a copy, not a view
    frame = pd.DataFrame(X, index=list("abcd"), columns=["x", "y", "z"])
    assert list(as_matrix(frame).var_names) == ["x", "y", "z"]


@pytest.mark.parametrize("X,match", [
    (np.array([[1.0, np.nan], [0.0, 1.0]]), "NaN or infinite"),
    (np.array([[1.0, np.inf], [0.0, 1.0]]), "NaN or infinite"),
    (sp.csr_matrix(np.array([[1.0, np.nan], [0.0, 1.0]])), "NaN or infinite"),
    (np.zeros((0, 3)), "empty"),
    (np.zeros((3, 0)), "empty"),
    (np.ones((1, 3)), "at least 2 cells"),
    (np.ones(3), "2-D"),
    (np.array([["a", "b"], ["c", "d"]], dtype=object), "numeric"),
])
def test_bad_matrices(X, match):
    with pytest.raises(ValueError, match=match):
        as_matrix(X)


def test_duplicate_gene_names_and_missing_layer():
    a = _adata(np.ones((3, 2)))
    a.var_names = ["g", "g"]
    with pytest.raises(ValueError, match="duplicate gene names.*var_names_make_unique"):
        as_matrix(a)
    with pytest.raises(ValueError, match="layer 'counts' is not in adata.layers"):
        as_matrix(_adata(np.ones((3, 2))), layer="counts")


@pytest.mark.parametrize("X,match", [
    (np.array([[1.0, -1.0], [0.0, 2.0]]), "negative values"),
    (np.array([[1.5, 1.0], [0.0, 2.0]]), "non-integer values"),
])
def test_count_likelihoods_reject_non_counts(X, match):
    with pytest.raises(ValueError, match=match):
        check_counts(as_matrix(X), "negative binomial")
    check_counts(as_matrix(np.array([[1.0, 0.0], [3.0, 2.0]])), "poisson")  # real counts pass


def test_covariate_design_levels_and_errors():
    obs = pd.DataFrame({"stim": ["CTRL", "STIM", "STIM", "CTRL"], "dose": [0.0, 1.0, 2.0, 3.0],
                        "one": ["x"] * 4, "gap": ["a", None, "b", "a"]})
    Z, names = covariate_design(obs, ["stim", "dose"], 4)
    assert names == ["stim=STIM", "dose"]
    np.testing.assert_array_equal(Z, [[0, 0], [1, 1], [1, 2], [0, 3]])
    assert covariate_design(obs, None, 4)[0].shape == (4, 0)
    for cols, match in [("nope", "not a column"), ("one", "single level"), ("gap", "missing values")]:
        with pytest.raises(ValueError, match=match):
            covariate_design(obs, cols, 4)
    with pytest.raises(ValueError, match="3 rows but the data have 4 cells"):
        covariate_design(None, np.zeros((3, 1)), 4)
    with pytest.raises(ValueError, match="need AnnData"):
        covariate_design(None, "stim", 4)


def _flagged(n_cells=60, n_genes=40, seed=0):
    import anndata as ad

    rng = np.random.default_rng(seed)
    adata = ad.AnnData(rng.normal(size=(n_cells, n_genes)).astype(np.float32))
    adata.var_names = [f"g{i}" for i in range(n_genes)]
    adata.var["highly_variable"] = np.arange(n_genes) % 2 == 0
    return adata


@pytest.mark.parametrize("model", ["PCA", "PPCA", "Spex", "NMF"])
def test_highly_variable_genes_are_used_by_default_and_the_rest_get_zero_loadings(model):
    import pathfactor as pf

    adata = _flagged()
    if model == "NMF":
        adata.X = np.abs(adata.X)
    kw = {"n_dense": 2} if model == "Spex" else {"n_factors": 2}
    m = getattr(pf.models, model)(**kw).fit(adata)
    assert list(m.loadings_.index) == list(adata.var_names[adata.var.highly_variable])
    m.write(adata)
    key = m.key
    loadings = adata.varm[f"{key}_loadings"]
    assert np.all(loadings[~adata.var.highly_variable.to_numpy()] == 0)
    assert list(adata.uns[key]["genes_left_out"]) == list(adata.var_names[~adata.var.highly_variable])
    every = getattr(pf.models, model)(**kw).fit(adata, use_highly_variable=False)
    assert every.loadings_.shape[0] == adata.n_vars and not every.genes_left_out_


def test_use_highly_variable_true_needs_the_column():
    import anndata as ad

    import pathfactor as pf

    adata = ad.AnnData(np.random.default_rng(0).normal(size=(20, 10)).astype(np.float32))
    with pytest.raises(ValueError, match="no 'highly_variable' column"):
        pf.models.PCA(n_factors=2).fit(adata, use_highly_variable=True)


def test_gaussian_model_warns_on_raw_counts_and_count_models_do_not():
    import warnings

    import pathfactor as pf

    counts = np.random.default_rng(0).poisson(5.0, size=(40, 30)).astype(np.float32)
    with pytest.warns(UserWarning, match="look like raw counts"):
        pf.models.PCA(n_factors=2).fit(counts)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        pf.models.NMF(n_factors=2, loss="kl", progress=False).fit(counts)
        pf.models.PCA(n_factors=2).fit(np.log1p(counts))


def test_levels_explained_by_the_covariates_alone_or_together():
    from pathfactor.data.inputs import levels_explained_by

    rng = np.random.default_rng(0)
    codes, levels = rng.integers(0, 4, 500), ["ref", "a", "b", "c"]
    Z = rng.normal(size=(500, 3))
    t_b = (codes == 2).astype(float)
    assert levels_explained_by(codes, levels, Z) == []
    assert levels_explained_by(codes, levels, np.zeros((500, 0))) == []
    assert levels_explained_by(codes, levels, np.c_[Z, t_b]) == ["b"]
    # split across two columns, after a column that repeats another (a dependent design still has its span)
    assert levels_explained_by(codes, levels, np.c_[Z[:, 0], 2 * Z[:, 0], t_b + Z[:, 1], Z[:, 1]]) == ["b"]
    # a covariate marking the reference: the levels' common shift is the covariate's, so all three
    assert levels_explained_by(codes, levels, np.c_[Z, (codes == 0).astype(float)]) == ["a", "b", "c"]
    assert levels_explained_by(codes, levels, np.c_[Z, t_b + 0.01 * rng.normal(size=500)]) == []  # only near
