"""Out-of-core Spex: a fit streamed from a backed .h5ad equals the same fit from memory (same seed, same batches)."""
import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

import pathfactor as pf
from pathfactor.data import stream
from pathfactor.data.simulate import annotation_sets, noisy_annotations
from pathfactor.models.spex import starting_factors

TOL = 1e-8  # relative, float64: the two paths differ only in the order of floating-point sums


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def sim():
    s = noisy_annotations(n_cells=240, n_genes=120, n_factors=4, noise=0.2, n_sparse=1, seed=4)
    s.obs["batch"] = np.where(np.arange(240) % 3 == 0, "a", "b")
    return s


@pytest.fixture(scope="module")
def files(sim, tmp_path_factory):
    """The simulation written dense and as CSR (non-negative with exact zeros, as counts-like data are)."""
    folder = tmp_path_factory.mktemp("backed")
    dense, csr = folder / "dense.h5ad", folder / "csr.h5ad"
    sim.write_h5ad(dense)
    sparse = sim.copy()
    X = np.clip(sparse.X, 0, None)
    X[X < 0.5] = 0
    sparse.X = sp.csr_matrix(X)
    sparse.write_h5ad(csr)
    return {"dense": (dense, sim), "csr": (csr, sparse)}


def _rel(a, b):
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return np.abs(a - b).max() / max(np.abs(a).max(), 1e-300)


@pytest.mark.parametrize("kind,batch_size,covariates", [("dense", 64, None), ("csr", 64, "batch"),
                                                        ("dense", None, "batch")])
def test_streamed_fit_equals_in_memory_fit(files, kind, batch_size, covariates, monkeypatch):
    path, adata = files[kind]
    params = dict(n_sparse=1, n_dense=1, min_set_size=3, dtype="float64", batch_size=batch_size, max_epochs=6,
                  tol=0.0, progress=False)
    sets = annotation_sets(adata)
    memory = pf.models.Spex(**params).fit(adata, annotations=sets, covariates=covariates, seed=1)

    backed = ad.read_h5ad(path, backed="r")
    # the streamed path must never load the whole matrix
    monkeypatch.setattr("pathfactor.models.spex.as_matrix", lambda *a, **k: pytest.fail("as_matrix loaded the data"))
    streamed = pf.models.Spex(**params).fit(backed, annotations=sets, covariates=covariates, seed=1)

    assert backed.isbacked and backed.X is not None and "X_spex" not in backed.obsm
    assert len(streamed.history_) == len(memory.history_) == 6
    assert _rel(memory.history_, streamed.history_) < TOL
    assert _rel(memory.loadings_, streamed.loadings_) < TOL
    assert _rel(memory.loadings_sd_, streamed.loadings_sd_) < TOL
    assert _rel(memory.factor_scores_, streamed.factor_scores_) < TOL
    assert _rel(memory.relevance_, streamed.relevance_) < TOL
    if covariates:
        assert _rel(memory.covariate_effects_, streamed.covariate_effects_) < TOL
    assert list(streamed.factor_scores_.index) == list(adata.obs_names)
    np.testing.assert_allclose(streamed.transform(adata).to_numpy(), memory.transform(adata).to_numpy(),
                               rtol=1e-7, atol=1e-9)


def test_float32_streamed_fit_matches_to_float32_rounding(files):
    path, adata = files["dense"]
    params = dict(n_sparse=1, min_set_size=3, batch_size=50, max_epochs=4, tol=0.0, progress=False)
    sets = annotation_sets(adata)
    memory = pf.models.Spex(**params).fit(adata, annotations=sets, seed=0)
    streamed = pf.models.Spex(**params).fit(ad.read_h5ad(path, backed="r"), annotations=sets, seed=0)
    assert _rel(memory.loadings_, streamed.loadings_) < 1e-4


def test_backed_rows_come_centred_in_the_batch_order(files):
    path, adata = files["csr"]
    X = adata.X.toarray().astype(np.float64)
    mean = X.mean(0)
    Z = torch.arange(240, dtype=torch.float64)[:, None]
    rows = stream.BackedRows(ad.read_h5ad(path, backed="r").X, mean, Z, torch.float64, "cpu", block_rows=7)
    cells = torch.randperm(240, generator=torch.Generator().manual_seed(0))[:40]
    Y = torch.cat([y for y, _ in rows.blocks(cells)])
    Zb = torch.cat([z for _, z in rows.blocks(cells)])
    np.testing.assert_allclose(Y.numpy(), X[cells.numpy()] - mean, atol=1e-12)
    assert torch.equal(Zb[:, 0], cells.double())
    whole = torch.cat([y for y, _ in rows.blocks(slice(None))])
    np.testing.assert_allclose(whole.numpy(), X - mean, atol=1e-12)
    np.testing.assert_allclose(rows.sum_squares().numpy(), ((X - mean) ** 2).sum(0), rtol=1e-10)


@pytest.mark.parametrize("kind", ["dense", "csr"])
def test_runs_of_neighbouring_rows_are_read_as_slices_and_come_back_in_order(files, kind, monkeypatch):
    """A batch dealt in runs of neighbours (as memoized VI deals them) is read with one slice a run, not row by
    row, and gives the rows of the in-memory matrix in the batch's order."""
    path, adata = files[kind]
    X = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    X = X.astype(np.float64)
    mean = X.mean(0)
    backed = ad.read_h5ad(path, backed="r").X
    reads = []

    class Counting:
        shape = backed.shape

        def __getitem__(self, index):
            reads.append(index)
            return backed[index]

    rows = stream.BackedRows(Counting(), mean, torch.zeros(240, 0, dtype=torch.float64), torch.float64, "cpu",
                             block_rows=100)
    cells = torch.cat([torch.arange(150, 190), torch.arange(10, 50)])  # two runs of 40, out of order
    Y = torch.cat([y for y, _ in rows.blocks(cells)])
    np.testing.assert_allclose(Y.numpy(), X[cells.numpy()] - mean, atol=1e-12)
    assert reads == [slice(10, 50), slice(150, 190)]
    reads.clear()
    scattered = torch.arange(0, 240, 3)  # one row in three: read by index
    Y = torch.cat([y for y, _ in rows.blocks(scattered)])
    np.testing.assert_allclose(Y.numpy(), X[scattered.numpy()] - mean, atol=1e-12)
    assert len(reads) == 1 and not isinstance(reads[0], slice)


def test_minibatches_are_dealt_in_runs_of_neighbouring_cells():
    from pathfactor.models._spex_vi import SpexVI

    g = torch.Generator().manual_seed(0)
    Y = torch.randn(1000, 30, generator=g, dtype=torch.float64)
    vi = SpexVI(Y - Y.mean(0), torch.zeros(1000, 0, dtype=torch.float64), torch.full((30, 2), 0.5, dtype=torch.float64),
                torch.randn(1000, 2, generator=g, dtype=torch.float64), batch_size=160, generator=g)
    batches = vi._batches()
    assert len(batches) == 7 and sum(len(b) for b in batches) == 1000
    assert sorted(torch.cat(batches).tolist()) == list(range(1000))
    for b in batches:  # runs of batch_size // 16 = 10 neighbours, sorted within the batch
        assert torch.equal(b, b.sort().values)
        assert int((b.diff() != 1).sum()) + 1 <= len(b) // 10


def test_one_pass_gives_the_in_memory_means_and_sd(files):
    path, adata = files["dense"]
    Y = torch.as_tensor(adata.X, dtype=torch.float64)
    mask = torch.zeros(120, 0, dtype=torch.float64)
    prep = stream.prepare(ad.read_h5ad(path, backed="r").X, torch.zeros(240, 0, dtype=torch.float64), mask, 2,
                          "cpu", torch.float64, block_rows=17)
    np.testing.assert_allclose(prep.gene_mean.numpy(), Y.mean(0).numpy(), rtol=1e-12, atol=1e-12)
    assert prep.data_sd == pytest.approx(float(Y.var(0).mean().sqrt()), rel=1e-12)
    np.testing.assert_allclose(prep.source.sum_squares().numpy(), ((Y - Y.mean(0)) ** 2).sum(0).numpy(), rtol=1e-10)


@pytest.mark.parametrize("n_cells", [60, 200])  # fewer and more cells than genes: svd_lowrank's two branches
def test_streamed_start_is_the_in_memory_start(n_cells):
    """The start streamed from a backed file in blocks of 13 rows is the in-memory start (starting_factors), the
    random draws of the range finder included."""
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(n_cells, 100, generator=g) @ torch.randn(100, 100, generator=g)  # float32: read exactly
    mean = raw.double().mean(0)
    Y = raw.double() - mean
    mask = (torch.rand(100, 3, generator=g) < 0.2).double()
    torch.manual_seed(5)
    expected = starting_factors(Y, mask, 2)
    torch.manual_seed(5)
    source = stream.BackedRows(raw.numpy(), mean.numpy(), torch.zeros(n_cells, 0, dtype=torch.float64),
                               torch.float64, "cpu", block_rows=13)
    got = stream.initial_factors(source, mask, 2)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-8, atol=1e-8)


def test_backed_data_are_checked_without_loading(tmp_path):
    bad = noisy_annotations(n_cells=50, n_genes=40, n_factors=2, seed=0)
    bad.X[3, 4] = np.nan
    bad.write_h5ad(tmp_path / "nan.h5ad")
    with pytest.raises(ValueError, match="NaN or infinite"):
        pf.models.Spex(n_dense=2, batch_size=10, progress=False).fit(ad.read_h5ad(tmp_path / "nan.h5ad", backed="r"))
    csc = noisy_annotations(n_cells=50, n_genes=40, n_factors=2, seed=0)
    csc.X = sp.csc_matrix(csc.X)
    csc.write_h5ad(tmp_path / "csc.h5ad")
    with pytest.raises(ValueError, match="CSR or dense"):
        pf.models.Spex(n_dense=2, progress=False).fit(ad.read_h5ad(tmp_path / "csc.h5ad", backed="r"))


def test_backed_file_with_highly_variable_genes_is_refused_not_silently_fit_whole(sim, tmp_path):
    """In memory the flag selects the genes; a streamed file cannot be subset on the fly, so it says so."""
    flagged = sim.copy()
    flagged.var["highly_variable"] = np.arange(flagged.n_vars) % 2 == 0
    flagged.write_h5ad(tmp_path / "flagged.h5ad")
    backed = ad.read_h5ad(tmp_path / "flagged.h5ad", backed="r")
    with pytest.raises(ValueError, match="streamed with all its genes.*use_highly_variable=False"):
        pf.models.Spex(n_dense=2, progress=False, batch_size=50).fit(backed)
    model = pf.models.Spex(n_dense=2, progress=False, batch_size=50, max_epochs=2).fit(backed,
                                                                                       use_highly_variable=False)
    assert model.loadings_.shape[0] == flagged.n_vars


def test_residual_products_equal_those_of_the_formed_residual():
    """``_Residual`` never forms R = Y - sum_i L_i C_i: its R V, R^T X and gram agree with the explicit matrix
    (blocks of 7 rows, two regressed-out terms)."""
    g = torch.Generator().manual_seed(3)
    Y = torch.randn(50, 12, generator=g).double()  # float32 values: rows are read through float32 exactly
    source = stream.BackedRows(Y.numpy(), np.zeros(12), torch.zeros(50, 0, dtype=torch.float64), torch.float64,
                               "cpu", block_rows=7)
    R = stream._Residual(source, None)
    L1 = torch.randn(50, 2, generator=g, dtype=torch.float64)
    R.regress_out(L1)
    L2 = torch.randn(50, 3, generator=g, dtype=torch.float64)
    R.regress_out(L2)
    explicit = Y - L1 @ R.terms[0][1] - L2 @ R.terms[1][1]
    # each term is the least-squares fit of the residual so far: what is left is orthogonal to L1 and L2
    assert float((L1.T @ (Y - L1 @ R.terms[0][1])).abs().max()) < 1e-10
    assert float((L2.T @ explicit).abs().max()) < 1e-10
    V, X = torch.randn(12, 4, generator=g, dtype=torch.float64), torch.randn(50, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(R.mm(V), explicit @ V, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(R.tmm(X), explicit.T @ X, rtol=1e-12, atol=1e-12)
    RtRV, norms = R.gram(V)
    torch.testing.assert_close(RtRV, explicit.T @ (explicit @ V), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(norms, (explicit @ V).norm(dim=0), rtol=1e-12, atol=1e-12)
