"""Slalom (f-scLVM): the derivation (every block raises the ELBO), recovery of simulated truth, ARD switch-off,
the learned inclusion rates (closed-form Beta update, false gene-set members dropped), the model face, bad input."""
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import optimize, special

import pathfactor as pf
from pathfactor.data.simulate import annotation_sets, noisy_annotations, ppca_interventions
from pathfactor.evaluate import mask_f1
from pathfactor.models.slalom import Slalom, SlalomVI, _update_order
from pathfactor.train import one_thread
from pathfactor.models.spex import starting_factors

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def sim():
    return noisy_annotations(n_cells=300, n_genes=400, n_factors=8, noise=0.2, sigma2=1.0, seed=3)


@pytest.fixture(scope="module")
def fitted(sim):
    return Slalom(progress=False, min_set_size=5).fit(sim, annotations=annotation_sets(sim))


def _vi(seed=1, dtype=torch.float64, rates=False):
    """A small problem with every kind of block: annotated, redundant and dense factors, two covariates; with
    ``rates``, every inclusion rate learned (in-set and out-of-set, the dense factor's too)."""
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
    in_set = torch.cat([mask > 0, torch.zeros(150, 1, dtype=torch.bool)], 1)
    return SlalomVI(Y, Z, pi, X0, order=_update_order(Y, X0, mask), in_set=in_set,
                    rate_strength=(10.0, 10.0) if rates else None)


@pytest.mark.parametrize("rates", [False, True], ids=["fixed_rates", "learned_rates"])
def test_every_block_update_raises_the_elbo(rates):
    """Each update is the exact maximiser of the ELBO in its block: the test of the derivation (float64)."""
    vi = _vi(rates=rates)
    vi.epoch()
    bound = lambda: vi.elbo(vi.expected_rss())
    blocks = [("loadings", vi.update_loadings), ("covariates", vi.update_covariates),
              ("factors", vi.update_factors), ("noise", lambda: vi.update_noise(vi.expected_rss()))]
    if rates:
        assert vi.learned[:-1].all() and vi.learned[-1].tolist() == [True, False]  # the dense factor: no set
        blocks.append(("rates", vi.update_rates))
    with one_thread(torch.device("cpu")):
        for _ in range(6):
            for name, update in blocks:
                before = bound()
                update()
                after = bound()
                assert after >= before - 1e-9 * abs(before), (name, before, after)
    elbos = [vi.epoch() for _ in range(20)]
    assert (np.diff(elbos) >= -1e-9 * np.abs(elbos[1:])).all()


@pytest.mark.parametrize("rates", [False, True], ids=["fixed_rates", "learned_rates"])
def test_updates_are_stationary_points_of_the_elbo(rates):
    """The closed-form updates and the ELBO agree: nudging a freshly updated block away lowers the bound."""
    vi = _vi(seed=2, rates=rates)
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
    if rates:  # q(pi_k): both shape parameters of both groups, after the rate update
        vi.update_factors()
        vi.update_rates()
        best = bound()
        for k in (0, vi.K - 1):  # an annotated factor (both groups learned) and the dense one (out-of-set only)
            for j in torch.nonzero(vi.learned[k]).flatten().tolist():
                for attr in ("rate_a", "rate_b"):
                    for factor in (0.9, 1.1):
                        old = getattr(vi, attr).clone()
                        getattr(vi, attr)[k, j] *= factor
                        vi.rate_expectations()
                        assert bound() < best, (k, j, attr, factor)
                        setattr(vi, attr, old)
                        vi.rate_expectations()
        assert bound() == best


_T = np.linspace(-60.0, 60.0, 40001)  # integration grid on the logit scale: p = sigmoid(t)
_LOG_P, _LOG_1M_P = -np.logaddexp(0.0, -_T), -np.logaddexp(0.0, _T)
_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 has only trapz


def _beta_mean(a, b, values) -> float:
    """E[values(p)] under Beta(a, b) by the trapezoid rule on the logit scale (smooth, decays exponentially)."""
    density = np.exp(a * _LOG_P + b * _LOG_1M_P - special.betaln(a, b))  # Beta pdf times the Jacobian p (1 - p)
    return float(_trapezoid(density * values, _T))


def _beta_objective(a, b, a0, b0, gates):
    """The terms of the ELBO that involve q(pi) = Beta(a, b) for one group of genes with inclusion ``gates``,
    by numerical integration: sum_g E[log p(s_g | pi)] + E[log p(pi)] + H[q] (no digamma anywhere)."""
    log_q = (a - 1) * _LOG_P + (b - 1) * _LOG_1M_P - special.betaln(a, b)
    log_prior = (a0 - 1) * _LOG_P + (b0 - 1) * _LOG_1M_P - special.betaln(a0, b0)
    on = float(np.sum(gates))
    return _beta_mean(a, b, on * _LOG_P + (len(gates) - on) * _LOG_1M_P + log_prior - log_q)


def test_beta_update_is_the_brute_force_optimum_and_the_elbo_integrates_it():
    """q(pi_k^in) = Beta(a0 + sum E[s], b0 + sum (1 - E[s])): the closed form equals the numerical maximiser of the
    integrated objective, E[log pi] is digamma(a) - digamma(a + b), and the ELBO moves exactly as the integral."""
    vi = _vi(seed=4, rates=True)
    for _ in range(2):
        vi.epoch()
    k, j = 0, 1
    genes = vi.in_set[k]
    vi.u[k] = torch.randn(vi.G, dtype=vi.u.dtype, generator=torch.Generator().manual_seed(0))  # generic gates
    vi.update_rates()
    gates = torch.sigmoid(vi.u[k])[genes].numpy()
    a0, b0 = float(vi.rate_a0[k, j]), float(vi.rate_b0[k, j])
    assert a0 == pytest.approx(9.9) and b0 == pytest.approx(0.1)  # strength 10, mean 1 - FPR = 0.99
    a, b = float(vi.rate_a[k, j]), float(vi.rate_b[k, j])
    assert a == pytest.approx(a0 + gates.sum(), rel=1e-12) and b == pytest.approx(b0 + (1 - gates).sum(), rel=1e-12)
    # brute force: maximise the integrated objective over (log a, log b)
    res = optimize.minimize(lambda t: -_beta_objective(*np.exp(t), a0, b0, gates), x0=np.log([2.0, 2.0]),
                            method="Nelder-Mead", options=dict(xatol=1e-7, fatol=1e-10, maxiter=4000))
    np.testing.assert_allclose(np.exp(res.x), [a, b], rtol=1e-3)
    # E[log pi] used by the gates, against quadrature
    assert _beta_mean(a, b, 1.0) == pytest.approx(1.0, rel=1e-10)  # the grid integrates the density
    e_log, e_log_1m = _beta_mean(a, b, _LOG_P), _beta_mean(a, b, _LOG_1M_P)
    g = int(torch.nonzero(genes)[0])
    assert float(vi.log_pi[k, g]) == pytest.approx(e_log, rel=1e-7)
    assert float(vi.log_1m_pi[k, g]) == pytest.approx(e_log_1m, rel=1e-7)
    # the closed-form ELBO changes with q(pi) exactly as the integrated objective does
    before, f_before = vi.elbo(vi.expected_rss()), _beta_objective(a, b, a0, b0, gates)
    vi.rate_a[k, j], vi.rate_b[k, j] = 0.7 * a, 1.6 * b
    vi.rate_expectations()
    after, f_after = vi.elbo(vi.expected_rss()), _beta_objective(0.7 * a, 1.6 * b, a0, b0, gates)
    assert after - before == pytest.approx(f_after - f_before, rel=1e-6)
    assert after < before


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
    # the engine's objective never fell (float32 here: beyond its rounding; the float64 tests above are exact)
    assert (np.diff(fitted.history_) >= -1e-6 * np.abs(fitted.history_[1:])).all()


def test_refined_annotations_find_the_swapped_genes(sim, fitted):
    truth = pd.DataFrame(sim.varm["mask_true"], index=sim.var_names, columns=sim.uns["simulation"]["factor_names"])
    annotation = pd.DataFrame(sim.varm["annotation"], index=sim.var_names, columns=truth.columns)
    missed = int((truth & ~annotation).to_numpy().sum())
    false_pos = int((annotation & ~truth).to_numpy().sum())
    # f-scLVM's rule, posterior inclusion > 0.5: the missing genes are gained, nothing true is lost, and with the
    # learned in-set rates most false positives are lost
    refined = fitted.refined_annotations().set_index("term")
    gained = [(term, g) for term, row in refined.iterrows() for g in row.gained]
    lost = [(term, g) for term, row in refined.iterrows() for g in row.lost]
    assert len(gained) >= 0.9 * missed and np.mean([truth.loc[g, t] for t, g in gained]) > 0.95
    assert all(not truth.loc[g, t] for t, g in lost) and len(lost) >= 0.8 * false_pos
    # the loading-size rule drops the false positives too
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
    pd.testing.assert_frame_equal(loaded.inclusion_rates_, fitted.inclusion_rates_)
    pd.testing.assert_frame_equal(loaded.transform(sim), again)
    shuffled = sim[:, np.random.default_rng(0).permutation(sim.n_vars)].copy()
    np.testing.assert_allclose(fitted.transform(shuffled).to_numpy(), again.to_numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="missing from the new data"):
        fitted.transform(sim[:, :100])


def test_model_saved_before_the_rates_were_learned_loads_as_fixed_rates(sim, fitted, tmp_path, monkeypatch):
    """A save without the Beta posteriors (the format before learned rates) loads, and says it had fixed rates."""
    extra = Slalom._extra_state

    def old_format(self):
        meta, arrays = extra(self)
        arrays.pop("rate_ab")
        return meta, arrays

    monkeypatch.setattr(Slalom, "_extra_state", old_format)
    fitted.save(tmp_path / "old")
    monkeypatch.undo()
    loaded = pf.load(tmp_path / "old")
    assert loaded.rate_strength is None and loaded.out_rate_strength is None and loaded.inclusion_rates_ is None
    pd.testing.assert_frame_equal(loaded.inclusion_, fitted.inclusion_)
    pd.testing.assert_frame_equal(loaded.transform(sim), fitted.transform(sim))
    loaded.save(tmp_path / "again")  # and saves again
    assert pf.load(tmp_path / "again").inclusion_rates_ is None


def test_learned_rates_drop_false_members_that_fixed_rates_keep():
    """The point of the Beta priors: on a small noisy annotation (25 % false members per set) f-scLVM's fixed
    rates keep every false member (E[s] > 0.5), the learned ones drop most of them and lose no true member."""
    sim = noisy_annotations(n_cells=200, n_genes=300, n_factors=5, noise=0.25, seed=0)
    truth, annotation = sim.varm["mask_true"], sim.varm["annotation"]
    false = annotation & ~truth
    fits = {name: Slalom(progress=False, min_set_size=5, dtype="float64", rate_strength=strength)
            .fit(sim, annotations=annotation_sets(sim)) for name, strength in [("fixed", None), ("learned", 10.0)]}
    kept = {name: m.inclusion_.to_numpy() > 0.5 for name, m in fits.items()}
    assert false.sum() == 34
    assert (kept["fixed"] & false).sum() == false.sum()                    # fixed: every false member stays
    assert (~kept["learned"] & false).sum() >= 0.8 * false.sum()            # learned: >= 80 % dropped (32 of 34)
    assert not (~kept["learned"] & annotation & truth).any()                # no true member lost
    f1 = {name: mask_f1(truth, k.astype(float)) for name, k in kept.items()}
    assert f1["learned"] > f1["fixed"] + 0.05 and f1["fixed"] > mask_f1(truth, annotation.astype(float))
    # the learned rates: below the prior mean 0.99 in every set, the out-of-set rates fixed at fnr
    rates = fits["learned"].inclusion_rates_
    assert list(rates.columns) == ["in_set", "out_of_set"]
    assert (rates["in_set"] < 0.95).all()
    np.testing.assert_allclose(rates["out_of_set"], 0.001)
    np.testing.assert_allclose(fits["fixed"].inclusion_rates_["in_set"], 0.99)
    for m in fits.values():
        assert (np.diff(m.history_) >= 0).all()  # float64: the bound never fell
    # the learned model's bound is the higher one: the data prefer it
    assert fits["learned"].elbo_ > fits["fixed"].elbo_


def test_out_of_set_rates_and_unannotated_factors(sim):
    """out_rate_strength learns the out-of-set rates, the unannotated factors' too (they have no in-set rate)."""
    m = Slalom(progress=False, min_set_size=5, n_sparse=1, n_dense=1, out_rate_strength=10.0, max_epochs=20)
    m.fit(sim, annotations=annotation_sets(sim))
    rates = m.inclusion_rates_
    assert np.isnan(rates.loc[["sparse_1", "dense_1"], "in_set"]).all()   # no gene set, no in-set rate
    assert rates["out_of_set"].notna().all() and (rates["out_of_set"] != 0.001).all()  # learned
    assert (np.diff(m.history_) >= -1e-6 * np.abs(m.history_[1:])).all()


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
    (dict(rate_strength=0), "rate_strength must be"), (dict(rate_strength=-1.0), "rate_strength must be"),
    (dict(rate_strength=float("nan")), "rate_strength must be"), (dict(rate_strength=np.inf), "rate_strength must be"),
    (dict(rate_strength=True), "rate_strength must be"), (dict(rate_strength="10"), "rate_strength must be"),
    (dict(out_rate_strength=0.0), "out_rate_strength must be"),
    (dict(out_rate_strength=(1, 2)), "out_rate_strength must be"),
])
def test_bad_parameters_get_clear_errors(sim, params, match):
    with pytest.raises(ValueError, match=match):
        Slalom(progress=False, min_set_size=5, **params).fit(sim, annotations=annotation_sets(sim))


def test_bad_rate_priors_of_the_variational_state_get_clear_errors():
    vi = _vi(rates=True)
    Y, Z, X0 = vi.Y, vi.Z, vi.M
    pi = torch.exp(vi.log_pi.T).clone()
    with pytest.raises(ValueError, match="rate_strength must be"):
        SlalomVI(Y, Z, pi, X0, in_set=vi.in_set.T, rate_strength=(1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match="rate_strength must be"):
        SlalomVI(Y, Z, pi, X0, in_set=vi.in_set.T, rate_strength=(None, -2.0))
    with pytest.raises(ValueError, match="in_set must be"):
        SlalomVI(Y, Z, pi, X0, in_set=vi.in_set, rate_strength=10.0)
    uneven = pi.clone()
    uneven[0, 0] = 0.5
    with pytest.raises(ValueError, match="constant within"):
        SlalomVI(Y, Z, uneven, X0, in_set=vi.in_set.T, rate_strength=10.0)
    SlalomVI(Y, Z, uneven, X0, in_set=vi.in_set.T, rate_strength=None)  # fixed rates: any pi


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
