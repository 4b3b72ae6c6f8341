import anndata as ad
import numpy as np
import pytest

from pathfactor.data.simulate import (SIMULATORS, annotation_sets, droplet_counts, noisy_annotations,
                                      ppca_interventions)

SMALL = dict(n_cells=200, n_genes=500, n_factors=8)


# --------------------------------------------------------------------------- seeding
@pytest.mark.parametrize("make, kwargs", [(ppca_interventions, {}), (noisy_annotations, SMALL), (droplet_counts, {})])
def test_same_seed_same_data_other_seed_other_data(make, kwargs):
    a, b, c = make(seed=3, **kwargs), make(seed=3, **kwargs), make(seed=4, **kwargs)
    np.testing.assert_array_equal(a.X, b.X)
    np.testing.assert_array_equal(a.varm["W_true"], b.varm["W_true"])
    np.testing.assert_array_equal(a.obsm["X_true"], b.obsm["X_true"])
    assert not np.allclose(a.X, c.X)
    assert not np.allclose(a.obsm["X_true"][:10], c.obsm["X_true"][:10])
    if make is not droplet_counts:  # its loadings are the design's, not drawn
        assert not np.allclose(a.varm["W_true"], c.varm["W_true"])
    if "annotation" in a.varm:
        np.testing.assert_array_equal(a.varm["annotation"], b.varm["annotation"])


def test_simulators_registry():
    assert SIMULATORS["ppca"] is ppca_interventions
    assert SIMULATORS["annotations"] is noisy_annotations


# --------------------------------------------------------------------------- ppca_interventions
def test_ppca_shapes_and_truth():
    a = ppca_interventions(n_cells=101, n_genes=30, n_factors=3, sigma2=0.5, shift=1.5, seed=1)
    assert a.shape == (101, 30)
    assert a.X.dtype == np.float32
    assert a.obsm["X_true"].shape == (101, 3)
    assert a.varm["W_true"].shape == (30, 3)
    np.testing.assert_array_equal(a.var["c_true"].to_numpy(), np.full(30, 1.5))
    assert list(a.obs["group"].cat.categories) == ["control", "stimulated"]
    assert (a.obs["group"][:50] == "control").all() and (a.obs["group"][50:] == "stimulated").all()
    np.testing.assert_array_equal(a.obs["z"].to_numpy(), (np.arange(101) >= 50).astype(float))
    sim = a.uns["simulation"]
    assert sim["kind"] == "ppca_interventions" and sim["n_cells"] == 101 and sim["sigma2"] == 0.5
    assert sim["seed"] == 1 and sim["shift"] == 1.5
    assert list(a.obs_names[:2]) == ["cell_0", "cell_1"] and a.var_names[-1] == "gene_29"
    # the stored truth reproduces Y up to N(0, sigma2) noise
    resid = a.X - a.obsm["X_true"] @ a.varm["W_true"].T - a.obs["z"].to_numpy()[:, None] * a.var["c_true"].to_numpy()
    assert abs(resid.var() - 0.5) < 0.05


def test_ppca_array_shift():
    c = np.linspace(-2, 2, 20)
    a = ppca_interventions(n_genes=20, shift=c)
    np.testing.assert_array_equal(a.var["c_true"].to_numpy(), c)
    assert isinstance(a.uns["simulation"]["shift"], str)


def test_ppca_covariance_matches_model():
    sigma2 = 0.5
    a = ppca_interventions(n_cells=20000, n_genes=50, n_factors=3, sigma2=sigma2, shift=2.0, seed=0)
    Y = a.X.astype(float)
    z = a.obs["z"].to_numpy() == 1
    # remove the group means, then the covariance should be W W^T + sigma2 I
    R = Y.copy()
    R[z] -= R[z].mean(0)
    R[~z] -= R[~z].mean(0)
    S = R.T @ R / (len(R) - 2)
    W = a.varm["W_true"]
    C = W @ W.T + sigma2 * np.eye(W.shape[0])
    assert np.linalg.norm(S - C) / np.linalg.norm(C) < 0.1


def test_ppca_group_means_differ_by_c():
    c = np.linspace(-3, 3, 40)
    a = ppca_interventions(n_cells=20000, n_genes=40, n_factors=2, sigma2=0.5, shift=c, seed=2)
    z = a.obs["z"].to_numpy() == 1
    diff = a.X[z].mean(0) - a.X[~z].mean(0)
    np.testing.assert_allclose(diff, c, atol=0.15)


# --------------------------------------------------------------------------- noisy_annotations
def test_annotations_shapes_and_names():
    a = noisy_annotations(n_cells=100, n_genes=400, n_factors=5, n_redundant=2, n_sparse=3, n_dense=1, seed=0)
    K = 5 + 2 + 3 + 1
    assert a.shape == (100, 400) and a.X.dtype == np.float32
    assert a.varm["W_true"].shape == (400, K) and a.obsm["X_true"].shape == (100, K)
    assert a.varm["mask_true"].dtype == bool and a.varm["annotation"].dtype == bool
    assert a.varm["annotation"].shape == (400, 7)
    np.testing.assert_array_equal(a.varm["mask_true"], a.varm["W_true"] != 0)
    sim = a.uns["simulation"]
    assert sim["factor_names"] == ["term_0", "term_1", "term_2", "term_3", "term_4", "redundant_0",
                                   "redundant_1", "sparse_0", "sparse_1", "sparse_2", "dense_0"]
    assert sim["annotation_names"] == sim["factor_names"][:7]
    assert a.obs_names[0] == "cell_0" and a.var_names[399] == "gene_399"
    # redundant factors carry no signal but have a gene set of realistic size
    red = slice(5, 7)
    assert not a.varm["W_true"][:, red].any() and not a.obsm["X_true"][:, red].any()
    sizes = a.varm["annotation"][:, red].sum(0)
    assert np.all((sizes >= 0.03 * 400) & (sizes <= 0.16 * 400))
    # the stored truth reproduces Y up to N(0, sigma2) noise
    resid = a.X - a.obsm["X_true"] @ a.varm["W_true"].T
    assert abs(resid.var() - 1.0) < 0.05


def test_annotations_sparsity():
    a = noisy_annotations(n_cells=50, n_genes=2000, n_factors=20, n_sparse=5, n_dense=5, seed=1)
    W = a.varm["W_true"]
    nz = W[W != 0]
    assert np.all(np.abs(nz) >= 0.5)
    zero_frac = (W == 0).mean(0)
    sparse_like = zero_frac[:25]  # annotated and sparse
    assert np.all(sparse_like >= 0.85) and np.all(sparse_like <= 0.98)
    # dense factors: only |w| < 0.5 zeroed, P(|N(0,4)| < 0.5) ~ 0.197
    assert np.all(np.abs(zero_frac[25:] - 0.197) < 0.04)
    # the random thinning itself lies within the requested range
    thin = np.asarray(a.uns["simulation"]["zero_fraction"])
    assert np.all((thin[:25] >= 0.85) & (thin[:25] <= 0.95)) and np.all(thin[25:] == 0)
    # loadings have sd 2 before zeroing: the nonzero ones are far wider than N(0, 1)
    assert np.std(nz) > 2.0


@pytest.mark.parametrize("noise", [0.1, 0.25, 0.5])
def test_annotation_noise_counts(noise):
    a = noisy_annotations(n_cells=20, n_genes=1000, n_factors=10, noise=noise, seed=5)
    mask = a.varm["mask_true"][:, :10]
    ann = a.varm["annotation"][:, :10]
    n_active = mask.sum(0)
    expected = np.array([round(noise * n) for n in n_active])
    fn = (mask & ~ann).sum(0)
    fp = (~mask & ann).sum(0)
    np.testing.assert_array_equal(fn, expected)
    np.testing.assert_array_equal(fp, expected)
    np.testing.assert_array_equal(ann.sum(0), n_active)
    assert expected.min() > 0
    assert a.uns["simulation"]["n_false_negatives"] == list(expected)


def test_noise_zero_annotation_is_true_mask():
    a = noisy_annotations(n_cells=20, n_genes=500, n_factors=6, n_sparse=2, noise=0.0, seed=2)
    np.testing.assert_array_equal(a.varm["annotation"], a.varm["mask_true"][:, :6])


def test_annotation_sets():
    a = noisy_annotations(n_cells=20, n_genes=300, n_factors=3, n_redundant=1, seed=0)
    sets = annotation_sets(a)
    assert list(sets) == ["term_0", "term_1", "term_2", "redundant_0"]
    for k, genes in enumerate(sets.values()):
        assert genes == list(a.var_names[a.varm["annotation"][:, k]])


# --------------------------------------------------------------------------- h5ad round trip
def test_h5ad_round_trip_ppca(tmp_path):
    a = ppca_interventions(n_cells=20, n_genes=10, seed=7)
    a.write_h5ad(tmp_path / "ppca.h5ad")
    b = ad.read_h5ad(tmp_path / "ppca.h5ad")
    np.testing.assert_array_equal(a.X, b.X)
    np.testing.assert_array_equal(a.obsm["X_true"], b.obsm["X_true"])
    np.testing.assert_array_equal(a.varm["W_true"], b.varm["W_true"])
    np.testing.assert_array_equal(a.var["c_true"], b.var["c_true"])
    assert list(b.obs["group"]) == list(a.obs["group"])
    assert b.uns["simulation"]["kind"] == "ppca_interventions" and b.uns["simulation"]["seed"] == 7


def test_h5ad_round_trip_annotations(tmp_path):
    a = noisy_annotations(n_cells=30, n_genes=200, n_factors=4, n_redundant=1, n_dense=1, seed=9)
    a.write_h5ad(tmp_path / "ann.h5ad")
    b = ad.read_h5ad(tmp_path / "ann.h5ad")
    np.testing.assert_array_equal(a.X, b.X)
    for key in ("W_true", "mask_true", "annotation"):
        np.testing.assert_array_equal(a.varm[key], b.varm[key])
    assert b.varm["annotation"].dtype == bool
    np.testing.assert_array_equal(a.obsm["X_true"], b.obsm["X_true"])
    assert list(b.uns["simulation"]["factor_names"]) == a.uns["simulation"]["factor_names"]
    assert b.uns["simulation"]["noise"] == 0.2
    assert annotation_sets(b) == annotation_sets(a)


# --------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("kwargs", [
    dict(n_cells=1), dict(n_factors=0), dict(n_genes=0), dict(sigma2=0.0), dict(sigma2=-1.0),
    dict(sigma2=float("nan")), dict(shift=np.ones(3)), dict(shift=np.ones((200, 2))), dict(shift="a"),
    dict(seed=-1), dict(seed=1.5), dict(n_cells=10.0),
])
def test_ppca_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        ppca_interventions(**kwargs)


@pytest.mark.parametrize("kwargs", [
    dict(noise=1.0), dict(noise=-0.1), dict(n_factors=0), dict(sigma2=0), dict(n_cells=1),
    dict(sparsity=(0.5, 1.0)), dict(sparsity=(-0.1, 0.5)), dict(sparsity=(0.9, 0.8)), dict(sparsity="x"),
    dict(n_redundant=-1), dict(n_sparse=-1), dict(n_dense=1.5),
])
def test_annotations_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        noisy_annotations(**{**dict(n_cells=10, n_genes=50, n_factors=2), **kwargs})


# --------------------------------------------------------------------------- droplet_counts
def test_droplet_counts_follow_their_negative_binomial():
    """Integer counts whose per-gene mean and variance match mean_true and the NB's mean + mean^2 / r, and the
    programs' sets as the annotation."""
    a = droplet_counts(n_cells=20000, n_genes=60, n_programs=2, set_size=20, r=5.0, low=0.5, high=2.0, seed=1)
    Y, mean = np.asarray(a.X, dtype=np.float64), np.asarray(a.layers["mean_true"], dtype=np.float64)
    assert np.array_equal(Y, np.round(Y)) and Y.min() >= 0
    null = slice(40, 60)  # genes outside both programs: mean_ng = s_n base_g
    np.testing.assert_allclose(Y.mean(0), mean.mean(0), rtol=0.03)
    expected_var = (mean + mean ** 2 / 5.0).mean(0) + mean.var(0)
    np.testing.assert_allclose(Y[:, null].var(0), expected_var[null], rtol=0.08)
    assert annotation_sets(a) == {"program_1": [f"g{i}" for i in range(20)],
                                  "program_2": [f"g{i}" for i in range(20, 40)]}
    with pytest.raises(ValueError, match="n_genes >="):
        droplet_counts(n_genes=50, n_programs=3, set_size=20)
