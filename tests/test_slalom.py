"""Slalom (f-scLVM): the derivation (every block raises the ELBO), recovery of simulated truth, ARD switch-off,
the model face, bad input."""
import numpy as np
import pandas as pd
import pytest
import torch

import pathfactor as pf
from pathfactor.data.simulate import annotation_sets, noisy_annotations, ppca_interventions
from pathfactor.evaluate import mask_f1
from pathfactor.models.slalom import Slalom, SlalomVI, _update_order
from pathfactor.train import one_thread
from pathfactor.models.spex import starting_factors


@pytest.fixture(scope="module")
def sim():
    return noisy_annotations(n_cells=300, n_genes=400, n_factors=8, noise=0.2, sigma2=1.0, seed=3)


@pytest.fixture(scope="module")
def fitted(sim):
    return Slalom(progress=False, min_set_size=5).fit(sim, annotations=annotation_sets(sim))


def _vi(seed=1, dtype=torch.float64):
    """A small problem with every kind of block: annotated, redundant and dense factors, two covariates."""
    sim = noisy_annotations(n_cells=200, n_genes=150, n_factors=4, n_redundant=1, n_dense=1, noise=0.2, seed=seed)
    g = torch.Generator().manual_seed(seed)
    Y = torch.tensor(sim.X, dtype=dtype)
    Z = torch.randn(200, 2, dtype=dtype, generator=g)
    Z = (Z - Z.mean(0)) / Z.std(0)
    Y = Y + Z @ torch.randn(2, 150, dtype=dtype, generator=g)
    Y = Y - Y.mean(0)
    mask = torch.tensor(sim.varm["annotation"], dtype=dtype)
    pi = torch.cat([torch.where(mask > 0, 0.99, 0.001), torch.full((150, 1), 0.99, dtype=dtype)], 1)
    X0 = starting_factors(Y, mask, 1)
    return SlalomVI(Y, Z, pi, X0, order=_update_order(Y, X0, mask))


def test_every_block_update_raises_the_elbo():
    """Each update is the exact maximiser of the ELBO in its block: the test of the derivation (float64)."""
    vi = _vi()
    vi.epoch()
    bound = lambda: vi.elbo(vi.expected_rss())
    blocks = [("loadings", vi.update_loadings), ("covariates", vi.update_covariates),
              ("factors", vi.update_factors), ("noise", lambda: vi.update_noise(vi.expected_rss()))]
    with one_thread(torch.device("cpu")):
        for _ in range(6):
            for name, update in blocks:
                before = bound()
                update()
                after = bound()
                assert after >= before - 1e-9 * abs(before), (name, before, after)
    elbos = [vi.epoch() for _ in range(20)]
    assert (np.diff(elbos) >= -1e-9 * np.abs(elbos[1:])).all()


def test_updates_are_stationary_points_of_the_elbo():
    """The closed-form updates and the ELBO agree: nudging a freshly updated block away lowers the bound."""
    vi = _vi(seed=2)
    for _ in range(5):
        vi.epoch()
    vi.update_loadings()
    k = vi.order[-1]  # the last factor updated is exactly at its optimum given all others
    bound = lambda: vi.elbo(vi.expected_rss())
    best = bound()
    state = [t.clone() for t in (vi.u, vi.mu, vi.s2, vi.W, vi._var_w, vi.a, vi.b)]
    for du, dmu, ds2 in [(0.3, 0, 0), (-0.3, 0, 0), (0, 0.05, 0), (0, -0.05, 0), (0, 0, 0.2), (0, 0, -0.2)]:
        vi.u[k] += du
        vi.mu[k] += dmu * vi.mu[k].abs().max()
        vi.s2[k] *= 1 + ds2
        vi.W[k] = vi.gamma[k] * vi.mu[k]
        vi._var_w = vi.loading_var()
        assert bound() < best
        vi.u, vi.mu, vi.s2, vi.W, vi._var_w, vi.a, vi.b = [t.clone() for t in state]
    vi.update_factors()
    best = bound()
    vi.M = vi.M * 1.05
    vi._x_statistics()
    assert bound() < best


def test_recovers_noisy_annotation(sim, fitted):
    truth, annotation = sim.varm["mask_true"], sim.varm["annotation"].astype(float)
    annotation_f1 = mask_f1(truth, annotation)
    loading_f1 = mask_f1(truth, fitted.loadings_.to_numpy())                    # |w| rule
    inclusion_f1 = mask_f1(truth, (fitted.inclusion_.to_numpy() > 0.5).astype(float))  # E[s] > 0.5
    assert annotation_f1 == pytest.approx(0.8, abs=0.01)
    assert loading_f1 > 0.95 and loading_f1 > annotation_f1 + 0.1
    assert inclusion_f1 > annotation_f1 + 0.05
    # factors are named and ordered like the annotation, and match the true factors
    assert list(fitted.loadings_.columns) == sim.uns["simulation"]["annotation_names"]
    corr = [abs(np.corrcoef(fitted.factor_scores_.iloc[:, k], sim.obsm["X_true"][:, k])[0, 1]) for k in range(8)]
    assert min(corr) > 0.95
    assert fitted.converged_ and fitted.active_.all()
    assert (np.diff(fitted.history_) >= 0).all()  # the engine's objective never fell (float32 here)


def test_refined_annotations_find_the_swapped_genes(sim, fitted):
    truth = pd.DataFrame(sim.varm["mask_true"], index=sim.var_names, columns=sim.uns["simulation"]["factor_names"])
    annotation = pd.DataFrame(sim.varm["annotation"], index=sim.var_names, columns=truth.columns)
    missed = int((truth & ~annotation).to_numpy().sum())
    false_pos = int((annotation & ~truth).to_numpy().sum())
    # f-scLVM's rule, posterior inclusion > 0.5: the missing genes are gained, and nothing true is lost
    refined = fitted.refined_annotations().set_index("term")
    gained = [(term, g) for term, row in refined.iterrows() for g in row.gained]
    lost = [(term, g) for term, row in refined.iterrows() for g in row.lost]
    assert len(gained) >= 0.9 * missed and np.mean([truth.loc[g, t] for t, g in gained]) > 0.95
    assert all(not truth.loc[g, t] for t, g in lost)
    # the loading-size rule also drops the false positives (an FPR of 1 % keeps their inclusion above 0.5)
    by_size = fitted.refined_annotations(fraction=0.1).set_index("term")
    lost = [(term, g) for term, row in by_size.iterrows() for g in row.lost]
    assert len(lost) >= 0.8 * false_pos and np.mean([not truth.loc[g, t] for t, g in lost]) > 0.9
    assert fitted.inclusion_.shape == fitted.loadings_.shape


def test_redundant_annotated_factors_are_switched_off():
    sim = noisy_annotations(n_cells=300, n_genes=400, n_factors=6, n_redundant=2, noise=0.1, seed=5)
    m = Slalom(progress=False, min_set_size=5, dtype="float64").fit(sim, annotations=annotation_sets(sim))
    assert (np.diff(m.history_) >= 0).all()  # switching a factor off freezes it: the bound keeps rising
    redundant = [n for n in m.relevance_.index if n.startswith("redundant")]
    real = [n for n in m.relevance_.index if n.startswith("term")]
    assert not m.active_[redundant].any() and m.active_[real].all()
    assert m.n_switched_off_ == 2
    assert m.relevance_[redundant].max() < 1e-2 * m.relevance_[real].min()
    assert list(m.relevance(active_only=True).index) == list(m.relevance_[real].sort_values(ascending=False).index)
    assert set(m.refined_annotations().term) == set(real)  # switched-off factors have nothing to refine


def test_covariate_effects_recover_the_intervention():
    sim = ppca_interventions(n_cells=400, n_genes=60, n_factors=2, sigma2=0.5, shift=np.linspace(-2, 2, 60), seed=0)
    m = Slalom(n_dense=2, progress=False).fit(sim, covariates="group")
    assert list(m.covariate_effects_.columns) == ["group=stimulated"]
    b = m.covariate_effects_["group=stimulated"].to_numpy()
    assert np.corrcoef(b, sim.var["c_true"])[0, 1] > 0.98
    assert np.abs(b - sim.var["c_true"]).mean() < 0.2
    assert (m.covariate_effects_sd_.to_numpy() > 0).all()
    np.testing.assert_allclose(m.transform(sim).to_numpy(), m.factor_scores_.to_numpy(), atol=1e-4)


def test_transform_reproduces_training_scores_and_survives_save_load(sim, fitted, tmp_path):
    again = fitted.transform(sim)
    np.testing.assert_allclose(again.to_numpy(), fitted.factor_scores_.to_numpy(), rtol=1e-3, atol=1e-3)
    fitted.save(tmp_path / "m")
    with np.load(tmp_path / "m" / "arrays.npz", allow_pickle=False) as npz:  # nothing needs unpickling
        assert all(npz[k].dtype != object for k in npz.files)
    loaded = pf.load(tmp_path / "m")
    assert isinstance(loaded, Slalom) and loaded.get_params() == fitted.get_params()
    pd.testing.assert_frame_equal(loaded.loadings_, fitted.loadings_)
    pd.testing.assert_frame_equal(loaded.inclusion_, fitted.inclusion_)
    pd.testing.assert_series_equal(loaded.active_, fitted.active_)
    pd.testing.assert_series_equal(loaded.relevance_, fitted.relevance_)
    pd.testing.assert_frame_equal(loaded.refined_annotations(), fitted.refined_annotations())
    pd.testing.assert_frame_equal(loaded.transform(sim), again)
    shuffled = sim[:, np.random.default_rng(0).permutation(sim.n_vars)].copy()
    np.testing.assert_allclose(fitted.transform(shuffled).to_numpy(), again.to_numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="missing from the new data"):
        fitted.transform(sim[:, :100])


def test_write_follows_scverse_conventions_and_fit_leaves_input_alone(sim, fitted):
    before = sim.copy()
    Slalom(progress=False, min_set_size=5, max_epochs=3).fit(sim, annotations=annotation_sets(sim))
    assert set(sim.obsm) == set(before.obsm) and set(sim.uns) == set(before.uns)
    np.testing.assert_array_equal(sim.X, before.X)
    out = sim.copy()
    fitted.write(out)
    assert out.obsm["X_slalom"].shape == (300, 8)
    assert out.varm["slalom_loadings"].shape == (400, 8) and out.varm["slalom_annotation"].dtype == bool
    assert list(out.uns["slalom"]["factor_names"]) == list(fitted.loadings_.columns)
    assert out.uns["slalom"]["active"].all() and out.uns["slalom"]["params"]["fpr"] == 0.01
    assert out.uns["slalom"]["relevance_measure"] == "1/E[alpha]" and len(out.uns["slalom"]["r2"]) == 8
    np.testing.assert_allclose(out.varm["slalom_inclusion"], fitted.inclusion_.to_numpy(), rtol=1e-6)


def test_same_seed_same_result_and_unannotated_factors(sim):
    kw = dict(progress=False, min_set_size=5, n_sparse=1, n_dense=1, max_epochs=10)
    a = Slalom(**kw).fit(sim, annotations=annotation_sets(sim), seed=7)
    b = Slalom(**kw).fit(sim, annotations=annotation_sets(sim), seed=7)
    # identical up to float32 rounding (vectorised kernels may sum in another order on differently aligned memory)
    pd.testing.assert_frame_equal(a.loadings_, b.loadings_, check_exact=False, rtol=1e-4, atol=1e-5)
    assert list(a.factor_kinds_)[-2:] == ["sparse", "dense"]
    assert list(a.loadings_.columns)[-2:] == ["sparse_1", "dense_1"]
    only = ppca_interventions(n_cells=200, n_genes=50, n_factors=2, sigma2=0.1, seed=1)
    m = Slalom(n_dense=2, progress=False).fit(only)
    assert list(m.factor_kinds_) == ["dense", "dense"] and m.r2_.sum() > 0.5 and m.annotation_ is None
    with pytest.raises(ValueError, match="without gene-set annotations"):
        m.refined_annotations()


@pytest.mark.parametrize("params,match", [
    (dict(fpr=0.0), "fpr must be a probability"), (dict(fpr=1.0), "fpr must be a probability"),
    (dict(fnr=-0.1), "fnr must be a probability"), (dict(fnr=1.5), "fnr must be a probability"),
    (dict(fnr=True), "fnr must be a probability"), (dict(n_dense=-1), "n_dense must be"),
    (dict(n_sparse=1.5), "n_sparse must be"), (dict(switch_off=0), "switch_off must be"),
    (dict(max_epochs=0), "max_epochs must be"), (dict(dtype="float16"), "dtype must be"),
])
def test_bad_parameters_get_clear_errors(sim, params, match):
    with pytest.raises(ValueError, match=match):
        Slalom(progress=False, min_set_size=5, **params).fit(sim, annotations=annotation_sets(sim))


def test_bad_input_gets_clear_errors(sim):
    fit = lambda **kw: Slalom(progress=False, **kw.pop("model", {})).fit(sim, **kw)
    with pytest.raises(ValueError, match="none of the"):
        fit(annotations={"a": ["NOPE1", "NOPE2"] * 10})
    with pytest.raises(ValueError, match="nothing to fit"):
        fit()
    with pytest.raises(ValueError, match="fewer than the data's 400 genes"):
        fit(model=dict(n_dense=400))
    with pytest.raises(ValueError, match="not a column of obs"):
        fit(model=dict(n_dense=1), covariates="nope")
    bad = sim.copy()
    bad.X[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        Slalom(progress=False, min_set_size=5).fit(bad, annotations=annotation_sets(sim))
    with pytest.raises(RuntimeError, match="not fitted"):
        Slalom().relevance()
