"""Spex: the derivation (monotone ELBO), recovery of simulated truth, the model face, bad input."""
import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import pathfactor as pf
from pathfactor.data.simulate import annotation_sets, noisy_annotations, ppca_interventions
from pathfactor.evaluate import mask_f1
from pathfactor.models._spex_prior import starting_slab_rate
from pathfactor.models._spex_vi import SpexVI
from pathfactor.priors import RandomSlab
from pathfactor.models.spex import starting_factors


@pytest.fixture(scope="module")
def sim():
    return noisy_annotations(n_cells=300, n_genes=400, n_factors=8, noise=0.2, sigma2=1.0, seed=3)


@pytest.fixture(scope="module")
def fitted(sim):
    return pf.models.Spex(n_sparse=0, progress=False, min_set_size=5).fit(sim, annotations=annotation_sets(sim))


@pytest.mark.parametrize("tau,posterior", [(None, "blocked"), (1.0, "blocked"), (1.0, "mean-field")])
def test_elbo_rises_monotonically_with_covariates(sim, tau, posterior):
    """Every CAVI block update maximises the ELBO: the test of the derivation (float64)."""
    Y = torch.tensor(sim.X, dtype=torch.float64)
    Y = Y - Y.mean(0)
    mask = torch.tensor(sim.varm["annotation"], dtype=torch.float64)
    Z = torch.randn(300, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    Z = Z - Z.mean(0)
    s = torch.where(mask > 0, 1.0, 0.01) * Y.std()
    vi = SpexVI(Y, Z, s, starting_factors(Y, mask, 1)[:, :8], tau=tau, posterior=posterior)
    elbos = [vi.epoch() for _ in range(25)]
    steps = np.diff(elbos)
    assert (steps >= -1e-8 * np.abs(elbos[1:])).all(), steps


def test_blocked_posterior_is_the_exact_conditional_for_known_factors():
    """With X known (Sigma_x = 0) and fixed priors, q(w_g, b_g) is the exact Gaussian posterior of a Bayesian
    linear regression: compare with the textbook formula for one gene."""
    g = torch.Generator().manual_seed(1)
    N, K, C, G = 50, 3, 2, 4
    X, Z = torch.randn(N, K, dtype=torch.float64, generator=g), torch.randn(N, C, dtype=torch.float64, generator=g)
    Y = X @ torch.randn(K, G, dtype=torch.float64, generator=g) + torch.randn(N, G, dtype=torch.float64, generator=g)
    vi = SpexVI(Y, Z, torch.ones(G, K, dtype=torch.float64), X, tau=1.0)
    vi.Sigma_x = torch.zeros(K, K, dtype=torch.float64)
    vi._update_loadings(vi._stats(slice(None), X), rho=1.0)
    F = torch.cat([X, Z], 1)
    prec = vi.prior_precision()
    psi = vi.psi
    for j in range(G):
        P = psi[j] * F.T @ F + torch.diag(prec[j])
        m = torch.linalg.solve(P, psi[j] * F.T @ Y[:, j])
        assert torch.allclose(vi.M[j], m, atol=1e-10)
        assert torch.allclose(vi.S_diag[j], torch.linalg.inv(P).diagonal(), atol=1e-12)
        assert vi.logdet_S[j].item() == pytest.approx(-torch.logdet(P).item(), abs=1e-9)


def test_recovers_noisy_annotation(sim, fitted):
    annotation_f1 = mask_f1(sim.varm["mask_true"], sim.varm["annotation"].astype(float))
    learned_f1 = mask_f1(sim.varm["mask_true"], fitted.loadings_.to_numpy())
    assert learned_f1 > 0.9 > annotation_f1 + 0.05
    # factors are named and ordered like the annotation, and match the true factors
    assert list(fitted.loadings_.columns) == sim.uns["simulation"]["annotation_names"]
    corr = [abs(np.corrcoef(fitted.factor_scores_.iloc[:, k], sim.obsm["X_true"][:, k])[0, 1]) for k in range(8)]
    assert min(corr) > 0.9
    assert fitted.converged_


def test_refined_annotations_find_the_swapped_genes(sim, fitted):
    refined = fitted.refined_annotations().set_index("term")
    truth = pd.DataFrame(sim.varm["mask_true"], index=sim.var_names, columns=sim.uns["simulation"]["factor_names"])
    annotation = pd.DataFrame(sim.varm["annotation"], index=sim.var_names, columns=truth.columns)
    lost_right = gained_right = n_lost = n_gained = 0
    for term, row in refined.iterrows():
        n_lost += len(row.lost)
        n_gained += len(row.gained)
        lost_right += (~truth.loc[row.lost, term]).sum()
        gained_right += truth.loc[row.gained, term].sum()
    false_pos = int((annotation & ~truth).to_numpy().sum())
    assert lost_right / max(n_lost, 1) > 0.9 and n_lost >= 0.8 * false_pos
    assert gained_right / max(n_gained, 1) > 0.8 and n_gained > 0


def test_redundant_factors_are_flagged_inactive():
    sim = noisy_annotations(n_cells=300, n_genes=400, n_factors=6, n_redundant=2, noise=0.1, seed=5)
    m = pf.models.Spex(progress=False, min_set_size=5).fit(sim, annotations=annotation_sets(sim))
    rel = m.relevance_
    redundant = [n for n in rel.index if n.startswith("redundant")]
    real = [n for n in rel.index if n.startswith("term")]
    assert rel[redundant].max() < 0.05 * rel[real].min()


def test_covariate_effects_recover_the_intervention():
    sim = ppca_interventions(n_cells=400, n_genes=60, n_factors=2, sigma2=0.5, shift=np.linspace(-2, 2, 60), seed=0)
    m = pf.models.Spex(n_dense=2, progress=False).fit(sim, covariates="group")
    assert list(m.covariate_effects_.columns) == ["group=stimulated"]
    b = m.covariate_effects_["group=stimulated"].to_numpy()
    assert np.corrcoef(b, sim.var["c_true"])[0, 1] > 0.99
    assert np.abs(b - sim.var["c_true"]).mean() < 0.15
    assert (m.covariate_effects_sd_.to_numpy() > 0).all()


def test_transform_reproduces_training_scores_and_survives_save_load(sim, fitted, tmp_path):
    again = fitted.transform(sim)
    np.testing.assert_allclose(again.to_numpy(), fitted.factor_scores_.to_numpy(), rtol=1e-3, atol=1e-3)
    fitted.save(tmp_path / "m")
    with np.load(tmp_path / "m" / "arrays.npz", allow_pickle=False) as npz:  # nothing needs unpickling
        assert all(npz[k].dtype != object for k in npz.files)
    loaded = pf.load(tmp_path / "m")
    assert isinstance(loaded, pf.models.Spex) and loaded.get_params() == fitted.get_params()
    pd.testing.assert_frame_equal(loaded.loadings_, fitted.loadings_)
    pd.testing.assert_frame_equal(loaded.transform(sim), again)
    # extra genes in new data are ignored, shuffled order is fine
    shuffled = sim[:, np.random.default_rng(0).permutation(sim.n_vars)].copy()
    np.testing.assert_allclose(fitted.transform(shuffled).to_numpy(), again.to_numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="missing from the new data"):
        fitted.transform(sim[:, :100])


def test_write_follows_scverse_conventions_and_fit_leaves_input_alone(sim, fitted):
    before = sim.copy()
    pf.models.Spex(progress=False, min_set_size=5, max_epochs=3).fit(sim, annotations=annotation_sets(sim))
    assert set(sim.obsm) == set(before.obsm) and set(sim.uns) == set(before.uns)
    np.testing.assert_array_equal(sim.X, before.X)
    out = sim.copy()
    fitted.write(out)
    assert out.obsm["X_spex"].shape == (300, 8)
    assert out.varm["spex_loadings"].shape == (400, 8) and out.varm["spex_annotation"].dtype == bool
    assert list(out.uns["spex"]["factor_names"]) == list(fitted.loadings_.columns)
    assert len(out.uns["spex"]["relevance"]) == 8


def test_same_seed_same_result(sim):
    kw = dict(progress=False, min_set_size=5, n_sparse=1, n_dense=1, max_epochs=10)
    a = pf.models.Spex(**kw).fit(sim, annotations=annotation_sets(sim), seed=7)
    b = pf.models.Spex(**kw).fit(sim, annotations=annotation_sets(sim), seed=7)
    # identical up to float32 rounding (vectorised kernels may sum in another order on differently aligned memory)
    pd.testing.assert_frame_equal(a.loadings_, b.loadings_, check_exact=False, rtol=1e-4, atol=1e-5)


def test_unannotated_only_model_fits():
    sim = ppca_interventions(n_cells=200, n_genes=50, n_factors=2, sigma2=0.1, seed=1)
    m = pf.models.Spex(n_sparse=0, n_dense=2, progress=False).fit(sim)
    assert list(m.factor_kinds_) == ["dense", "dense"]
    assert m.relevance_.sum() > 0.5


@pytest.mark.parametrize("mutate,match", [
    (lambda a: a.X.__setitem__((0, 0), np.nan), "NaN or infinite"),
    (lambda a: a.X.__setitem__((1, 1), np.inf), "NaN or infinite"),
    (lambda a: setattr(a, "var_names", ["g"] * a.n_vars), "duplicate gene names"),
])
def test_bad_data_gets_a_clear_error(sim, mutate, match):
    bad = sim.copy()
    mutate(bad)
    with pytest.raises(ValueError, match=match):
        pf.models.Spex(progress=False, min_set_size=5).fit(bad, annotations=annotation_sets(sim))


def test_bad_arguments_get_clear_errors(sim):
    fit = lambda **kw: pf.models.Spex(progress=False, **kw.pop("model", {})).fit(sim, **kw)
    with pytest.raises(ValueError, match="none of the"):
        fit(annotations={"a": ["NOPE1", "NOPE2"] * 10})
    with pytest.raises(ValueError, match="nothing to fit"):
        fit(model=dict(n_sparse=0))
    with pytest.raises(ValueError, match="fewer than the data.s 400 genes"):
        fit(model=dict(n_dense=400))
    with pytest.raises(ValueError, match="not a column of obs"):
        fit(model=dict(n_dense=1), covariates="nope")
    with pytest.raises(ValueError, match="rows but the data have 300 cells"):
        fit(model=dict(n_dense=1), covariates=np.zeros((10, 1)))
    cov = sim.copy()
    cov.obs["batch"] = ["a", np.nan] * 150
    with pytest.raises(ValueError, match="missing values"):
        pf.models.Spex(n_dense=1, progress=False).fit(cov, covariates="batch")
    with pytest.raises(ValueError, match="n_sparse must be"):
        fit(model=dict(n_sparse=-1))
    with pytest.raises(ValueError, match="start must be one of 'wide', 'informed', 'prior'"):
        fit(model=dict(n_dense=1, start="free"))
    with pytest.raises(ValueError, match="layer 'counts' is not in adata.layers"):
        fit(model=dict(n_dense=1), layer="counts")
    with pytest.raises(RuntimeError, match="not fitted"):
        pf.models.Spex().relevance()


def test_accepts_numpy_dataframe_and_sparse(sim):
    import scipy.sparse as sp

    sets = annotation_sets(sim)
    frame = sim.to_df()
    m1 = pf.models.Spex(progress=False, min_set_size=5, max_epochs=5).fit(frame, annotations=sets)
    m2 = pf.models.Spex(progress=False, min_set_size=5, max_epochs=5).fit(
        ad.AnnData(sp.csr_matrix(sim.X), obs=sim.obs, var=sim.var), annotations=sets)
    np.testing.assert_allclose(m1.loadings_.to_numpy(), m2.loadings_.to_numpy(), rtol=1e-4, atol=1e-5)
    m3 = pf.models.Spex(progress=False, n_dense=2, max_epochs=5).fit(np.asarray(sim.X))
    assert m3.loadings_.index[0] == "gene_0"


def test_informed_start_puts_every_slab_at_least_as_wide_as_its_data_information():
    """E[1/c^2] <= d_g at the start, equal where the annotation's slab is narrower; wide slabs stay."""
    G, K = 60, 3
    s = torch.full((G, K), 1e-3, dtype=torch.float64)
    s[:20, 0] = 1.0
    information = torch.linspace(10.0, 1e8, G, dtype=torch.float64)
    start = {name: RandomSlab(s, alpha=2.0) for name in ("informed", "wide", "prior")}
    for name, slab in start.items():
        slab.q.rate = starting_slab_rate(slab, name, information if name == "informed" else None)
    precision = {name: slab.mean_inv for name, slab in start.items()}
    inside, d = s > 0.5, information[:, None].expand(G, K)
    narrow_prior = precision["prior"] > d                     # the annotation's slab is narrower than d allows
    assert torch.all(precision["informed"] <= d * (1 + 1e-12))
    torch.testing.assert_close(precision["informed"][narrow_prior], d[narrow_prior])
    torch.testing.assert_close(precision["informed"][~narrow_prior], precision["prior"][~narrow_prior])
    assert narrow_prior[~inside].any() and not narrow_prior[~inside].all()   # both cases occur outside the sets
    torch.testing.assert_close(precision["wide"], precision["prior"][inside].max().expand(G, K))
    with pytest.raises(ValueError, match="start must be"):
        starting_slab_rate(start["prior"], "dense")
    with pytest.raises(ValueError, match="start='informed' needs each gene's information"):
        starting_slab_rate(start["prior"], "informed")


@pytest.mark.parametrize("fit_args", [dict(model=dict(likelihood="nb")), dict(allow_missing=True)])
def test_informed_start_is_refused_where_it_is_not_derived(fit_args):
    """Counts, several views and missing entries have no d_g: asked for, the informed start fails loudly."""
    rng = np.random.default_rng(0)
    counts = ad.AnnData(rng.poisson(2.0, (60, 30)).astype(np.float32))
    if "allow_missing" in fit_args:
        counts.X[0, 0] = np.nan
    data_args = {k: v for k, v in fit_args.items() if k != "model"}
    model = pf.models.Spex(n_sparse=2, start="informed", progress=False, **fit_args.get("model", {}))
    with pytest.raises(ValueError, match="start='informed' needs each gene's information"):
        model.fit(counts, **data_args)
    model.set_params(start="prior").fit(counts, **data_args)  # the annotation's widths are fine there


def test_starts_reach_the_same_programs_and_the_informed_start_is_no_slower():
    sim = noisy_annotations(n_cells=1500, n_genes=500, n_factors=15, noise=0.2, sigma2=1.0, seed=4)
    truth, sets = sim.varm["mask_true"], annotation_sets(sim)
    fits = {start: pf.models.Spex(start=start, n_sparse=0, min_set_size=5, progress=False).fit(sim, annotations=sets)
            for start in ("informed", "wide")}
    f1 = {start: mask_f1(truth, m.loadings_.to_numpy()) for start, m in fits.items()}
    n_obs = 1500 * 500
    assert f1["informed"] > 0.9 and abs(f1["informed"] - f1["wide"]) < 0.01, f1
    assert abs(fits["informed"].elbo_ - fits["wide"].elbo_) / n_obs < 1e-3
    assert len(fits["informed"].history_) <= len(fits["wide"].history_)


def test_minibatch_memoized_vi_recovers_the_annotation_too(sim):
    m = pf.models.Spex(n_sparse=0, progress=False, min_set_size=5, batch_size=100, max_epochs=15)
    m.fit(sim, annotations=annotation_sets(sim))
    assert mask_f1(sim.varm["mask_true"], m.loadings_.to_numpy()) > 0.9
    assert np.isfinite(m.history_).all() and m.factor_scores_.shape == (300, 8)
    assert np.diff(m.history_).min() > -1e-6 * abs(m.history_[-1])  # the exact ELBO, monotone (float32)


# ------------------------------------------------------------------------- minibatches: memoized VI
def _memo_problem(covariate: bool = True):
    """A small float64 problem; the covariate (a group) correlates with the first true factor, so shears move."""
    sim = noisy_annotations(n_cells=200, n_genes=80, n_factors=3, noise=0.2, seed=5)
    g = torch.Generator().manual_seed(0)
    Y = torch.tensor(sim.X, dtype=torch.float64)
    x = torch.tensor(sim.obsm["X_true"][:, 0])
    Z = (torch.rand(200, generator=g, dtype=torch.float64) < torch.sigmoid(2 * x)).double()[:, None]
    Y = Y + Z @ torch.randn(1, 80, generator=g, dtype=torch.float64)
    Y, Z = Y - Y.mean(0), (Z - Z.mean(0))[:, : int(covariate)]
    mask = torch.tensor(sim.varm["annotation"], dtype=torch.float64)
    s = torch.where(mask > 0, 1.0, 0.01) * Y.std()
    X0 = starting_factors(Y - Z @ torch.linalg.lstsq(Z, Y).solution if covariate else Y, mask, 0)
    return Y, Z, s, X0


def _memo(batch_size, covariate=True, cls=SpexVI, seed=1):
    Y, Z, s, X0 = _memo_problem(covariate)
    return cls(Y, Z, s, X0, tau=1.0, batch_size=batch_size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("covariate", [True, False])
def test_memoized_elbo_rises_monotonically(covariate, torch_one_thread):
    """Every visit (factors of one batch, then the global updates and the shear from the totals) is a
    coordinate-ascent step on the full-data ELBO: no drop, unlike stochastic VI's noisy estimates."""
    vi = _memo(30, covariate)  # 7 batches, the last ones smaller
    assert vi.n_batches == 7
    elbos = [vi.epoch() for _ in range(25)]
    steps = np.diff(elbos)
    assert (steps >= -1e-9 * np.abs(elbos[1:])).all(), steps
    assert elbos[-1] > elbos[0]


class _Tracked(SpexVI):
    """SpexVI that also keeps every cell's current factor mean, which the memoized path itself does not hold:
    each batch's means when it is visited, moved by every shear since."""

    def _memoize_start(self):
        self.track = self.mu.clone()
        return super()._memoize_start()

    def _batch_sums(self, cells, mu=None):
        out = super()._batch_sums(cells, mu)
        if mu is None:  # a visit: the means just computed under the current global factors
            Wpsi, QzK = self.M[:, : self.K] * self.psi[:, None], self.second_moment()[self.K:, : self.K]
            self.track = self.track.index_copy(0, cells, (self.Y[cells] @ Wpsi - self.Z[cells] @ QzK) @ self.Sigma_x)
        return out

    def _shear_totals(self, A, XtZ):
        super()._shear_totals(A, XtZ)
        self.track = self.track - self.Z @ A.T


def test_memoized_totals_are_the_statistics_of_all_cells_and_the_elbo_is_exact(torch_one_thread):
    """After visits and shears the totals equal the statistics of every cell's current means (each batch's from its
    last visit, moved by the shears since), so the ELBO computed from them is the exact full-data ELBO."""
    vi = _memo(45, cls=_Tracked)
    for _ in range(3):
        vi.epoch()
    batches = vi._batches()
    for i in (2, 0):  # a partial epoch: batches visited at different states
        vi._visit(i, batches[i])
        stats = vi._memo_stats()
        vi._update_loadings(stats)
        vi._update_noise_and_priors(stats)
        vi._shear(stats["A"][: vi.K, vi.K:])
    memo, direct = vi._memo_stats(), vi._stats(slice(None), vi.track)
    for key in ("FtY", "A", "yy", "mu2"):
        torch.testing.assert_close(memo[key], direct[key], rtol=1e-10, atol=1e-9)
    M, A = vi.M, direct["A"]
    resid = direct["yy"] - 2 * (M * direct["FtY"].T).sum(1) + ((M @ A) * M).sum(1) + (vi.S * A).sum((1, 2))
    torch.testing.assert_close(vi.sq_resid, resid, rtol=1e-9, atol=1e-9)  # so the likelihood term is exact too
    assert float(vi._mu2) == pytest.approx(float((vi.track**2).sum()), rel=1e-10)
    # and the stored shares, brought up to date, add up to the totals (nothing drifts)
    xy = sum(vi._shares.get(i)[0] for i in range(vi.n_batches))
    assert vi.n_batches == 5 and float((xy - vi._tot_xy).abs().max()) > 1e-6  # stale: shears since their visits
    for i, cells in enumerate(batches):
        vi._visit(i, cells)  # (no global updates in between: the factors do not change)
    torch.testing.assert_close(sum(vi._shares.get(i)[0] for i in range(vi.n_batches)), vi._tot_xy)


def test_memoized_optimum_is_the_full_batch_optimum(torch_one_thread):
    full, memo = _memo(None), _memo(50)
    e_full = [full.epoch() for _ in range(250)]
    e_memo = [memo.epoch() for _ in range(250)]
    assert e_memo[-1] == pytest.approx(e_full[-1], rel=1e-9, abs=1e-5)
    torch.testing.assert_close(memo.M, full.M, rtol=0, atol=1e-3 * float(full.M.abs().max()))
    torch.testing.assert_close(memo.S_diag, full.S_diag, rtol=1e-3, atol=1e-8)
    torch.testing.assert_close(memo.scores(), full.scores(), rtol=0, atol=1e-3)
    assert e_memo[60] > e_full[60]  # and it gets there in fewer epochs


def test_shear_in_minibatch_mode_keeps_the_likelihood_and_raises_the_elbo(torch_one_thread):
    vi = _memo(50)
    cells = vi._batches()[0]
    stats = vi._visit(0, cells)
    vi._update_loadings(stats)
    vi._update_noise_and_priors(stats)
    before_resid, before = vi.sq_resid.clone(), float(vi.elbo())
    vi._shear(stats["A"][: vi.K, vi.K:])
    assert float(vi.elbo()) > before + 0.1
    assert float(vi._acc.abs().max()) > 1e-3  # the shear moved
    after = vi._memo_stats()  # the sheared totals
    M, A = vi.M, after["A"]
    resid = after["yy"] - 2 * (M * after["FtY"].T).sum(1) + ((M @ A) * M).sum(1) + (vi.S * A).sum((1, 2))
    torch.testing.assert_close(resid, before_resid, rtol=1e-9, atol=1e-9)
    assert float(vi._mu2) == pytest.approx(float(torch.trace(after["A"][: vi.K, : vi.K]
                                                              - vi.N * vi.Sigma_x)), rel=1e-10)
    # at its optimum a second shear is the identity
    acc = vi._acc.clone()
    vi._shear(after["A"][: vi.K, vi.K:])
    torch.testing.assert_close(vi._acc, acc, rtol=1e-7, atol=1e-9)


def test_memoized_state_round_trips_through_a_checkpoint(tmp_path, torch_one_thread):
    """The shares and totals are in the task's state: a fit checkpointed and resumed in a fresh task continues as
    the uninterrupted one, and an epoch never writes into the state's tensors (the engine's rollback holds
    references to them)."""
    from pathfactor.train import train

    vi = _memo(50)
    names = set(vi.state_dict())
    assert {"_shares.xy0", "_shares.loc3", "_tot_xy", "_tot_loc", "_acc", "_order"} <= names
    refs, copies = vi.state_dict(copy=False), vi.state_dict(copy=True)
    vi.epoch()
    for name, value in refs.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, copies[name]), name

    whole = train(_memo(50), max_epochs=6, tol=0.0, progress=False).history
    train(_memo(50), max_epochs=3, tol=0.0, progress=False, checkpoint_dir=tmp_path, checkpoint_every=1)
    resumed = _memo(50, seed=7)  # another dealing of the cells: the checkpoint's must win
    history = train(resumed, max_epochs=6, tol=0.0, progress=False, checkpoint_dir=tmp_path).history
    np.testing.assert_allclose(history, whole, rtol=1e-12)


def test_more_factors_than_cells_fit_with_a_monotone_elbo(torch_one_thread):
    """A shrinkage prior needs no K < N (the spex-LVM paper fits 83 gene sets to 182 cells): 32 factors on 25 cells."""
    sim = noisy_annotations(n_cells=25, n_genes=300, n_factors=30, noise=0.2, seed=1)
    m = pf.models.Spex(n_sparse=1, n_dense=1, min_set_size=3, tol=0.0, max_epochs=15, progress=False,
                       dtype="float64").fit(sim, annotations=annotation_sets(sim))
    assert m.loadings_.shape[1] == 32 > sim.n_obs
    assert np.isfinite(m.loadings_.to_numpy()).all() and np.isfinite(m.factor_scores_.to_numpy()).all()
    assert np.diff(m.history_).min() > -1e-6 * abs(m.history_[-1])


def test_learned_global_scale_does_not_collapse_weak_programs():
    """With the normalised prior a learned tau is learned from the weights the slab leaves free: on weak programs
    (noise variance 16) its mask F1 stays within 0.03 of the fixed tau's, and the learned scales stay large."""
    sim = noisy_annotations(n_cells=300, n_genes=400, n_factors=5, noise=0.2, sigma2=16.0, seed=2)
    sets, truth = annotation_sets(sim), sim.varm["mask_true"]
    f1 = {}
    for tau in (1.0, None):
        model = pf.models.Spex(n_sparse=0, global_scale=tau, min_set_size=1, progress=False, dtype="float64")
        f1[tau] = pf.evaluate.mask_f1(truth, model.fit(sim, annotations=sets).loadings_.to_numpy())
    assert f1[None] > 0.8 and abs(f1[None] - f1[1.0]) < 0.03, f1
