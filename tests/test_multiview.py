"""Spex on several views, with missing entries, Bernoulli and negative binomial views (``_spex_views``)."""
from __future__ import annotations

import math

import anndata as ad
import numpy as np
import pytest
import torch

import pathfactor as pf
from pathfactor.models._spex_nb import gauss_hermite, softplus_expectations
from pathfactor.models._spex_views import SpexViews

md = pytest.importorskip("mudata")


def _views(seed=0, n=300, missing=0.2, drop_rows=40):
    """Two views sharing 3 factors: a Gaussian one (with entries missing at random) and a Bernoulli one (missing
    for the first ``drop_rows`` cells); factor 2 is off in the Bernoulli view."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3))
    W1 = rng.normal(size=(60, 3)) * (rng.random((60, 3)) < 0.4)
    W2 = 2 * rng.normal(size=(25, 3)) * (rng.random((25, 3)) < 0.5)
    W2[:, 2] = 0
    Y1 = X @ W1.T + 0.5 * rng.normal(size=(n, 60))
    Y2 = (rng.random((n, 25)) < 1 / (1 + np.exp(-(X @ W2.T)))).astype(float)
    Y1_full = Y1.copy()
    Y1[rng.random(Y1.shape) < missing] = np.nan
    Y2[:drop_rows] = np.nan
    a1, a2 = ad.AnnData(Y1.astype(np.float32)), ad.AnnData(Y2.astype(np.float32))
    a1.obs_names = a2.obs_names = [f"c{i}" for i in range(n)]
    a1.var_names = [f"g{i}" for i in range(60)]
    a2.var_names = [f"p{i}" for i in range(25)]
    return {"rna": a1, "met": a2}, X, Y1_full, X @ W1.T


def _fit(views, **kw):
    model = pf.models.Spex(n_sparse=4, likelihood={"rna": "normal", "met": "bernoulli"}, progress=False, **kw)
    return model.fit(views, allow_missing=True)


@pytest.fixture(scope="module")
def fitted():
    views, X, Y1, signal = _views()
    return _fit(views), views, X, Y1, signal


def _max_abs_corr(A, B):
    C = np.corrcoef(A.T, B.T)[: A.shape[1], A.shape[1]:]
    return np.abs(C).max(0)


def test_recovers_shared_factors_and_elbo_rises(fitted):
    model, views, X, _, _ = fitted
    assert model.converged_
    assert np.diff(model.history_).min() > -1e-6 * abs(model.history_[-1])
    assert _max_abs_corr(model.factor_scores_.to_numpy(), X).min() > 0.9


def test_relevance_table_is_factors_by_views_and_sees_view_wise_activity(fitted):
    model, _, X, _, _ = fitted
    rel = model.relevance_views_
    assert list(rel.columns) == ["rna", "met"] and list(rel.index) == list(model.loadings_.columns)
    # the factor matching the true factor 2 (off in the Bernoulli view) explains little there
    C = np.abs(np.corrcoef(model.factor_scores_.to_numpy().T, X.T)[:4, 4:])
    k = int(C[:, 2].argmax())
    assert rel.iloc[k]["rna"] > 0.05 and rel.iloc[k]["met"] < 0.2 * rel.iloc[k]["rna"]


def test_impute_fills_only_missing_entries_better_than_the_mean(fitted):
    model, views, _, Y1, signal = fitted
    out = model.impute()
    assert set(out) == {"rna", "met"}
    observed = np.isfinite(views["rna"].X)
    np.testing.assert_allclose(out["rna"][observed], views["rna"].X[observed], rtol=1e-6)
    miss = ~observed
    mean = np.nanmean(views["rna"].X, 0)[None, :].repeat(len(Y1), 0)
    err = np.sqrt(np.mean((out["rna"][miss] - Y1[miss]) ** 2))
    assert err < 0.6 * np.sqrt(np.mean((mean[miss] - Y1[miss]) ** 2))
    met = out["met"]
    assert np.all((met[:40] > 0) & (met[:40] < 1)) and np.isin(met[40:], (0, 1)).all()


def test_transform_of_training_cells_matches_their_scores(fitted):
    model, views, _, _, _ = fitted
    new = model.transform(views)
    np.testing.assert_allclose(new.to_numpy(), model.factor_scores_.to_numpy(), atol=2e-2)


def test_mudata_write_and_save_load(fitted, tmp_path):
    model, views, _, _, _ = fitted
    mdata = md.MuData({k: v.copy() for k, v in views.items()})
    model.write(mdata)
    assert mdata.obsm["X_spex"].shape == (300, 4)
    assert mdata["met"].varm["spex_loadings"].shape == (25, 4)
    np.testing.assert_allclose(mdata["rna"].varm["spex_loadings"], model.view_loadings("rna").to_numpy(), rtol=1e-5)
    assert np.asarray(mdata.uns["spex"]["relevance_views"]).shape == (4, 2)
    model.save(tmp_path / "m")
    back = pf.load(tmp_path / "m")
    assert back.views_ == model.views_
    np.testing.assert_allclose(back.transform(views).to_numpy(), model.transform(views).to_numpy(), atol=1e-8)
    with pytest.raises(ValueError, match="pass impute"):
        back.impute()
    np.testing.assert_allclose(back.impute(views)["rna"], model.impute(views)["rna"], atol=1e-8)


def test_single_view_with_missing_entries_returns_an_array():
    views, X, _, _ = _views(seed=1)
    model = pf.models.Spex(n_sparse=3, progress=False).fit(views["rna"], allow_missing=True)
    out = model.impute()
    assert isinstance(out, np.ndarray) and out.shape == (300, 60) and np.isfinite(out).all()
    assert _max_abs_corr(model.factor_scores_.to_numpy(), X).min() > 0.85


def test_nan_without_the_flag_names_it():
    views, *_ = _views()
    with pytest.raises(ValueError, match="allow_missing=True"):
        pf.models.Spex(progress=False).fit(views["rna"])
    with pytest.raises(ValueError, match="allow_missing=True"):
        pf.models.Spex(progress=False, likelihood={"met": "bernoulli"}).fit(views)


@pytest.mark.parametrize("lik,value,match", [("bernoulli", 2.0, "other than 0 and 1"), ("nb", -1.0, "non-negative"),
                                             ("nb", 0.5, "non-negative integer")])
def test_values_must_fit_the_likelihood(lik, value, match):
    views, *_ = _views()
    bad = views["met"].copy()
    bad.X[50, 3] = value
    with pytest.raises(ValueError, match=match):
        pf.models.Spex(likelihood={"met": lik}, progress=False).fit({"rna": views["rna"], "met": bad},
                                                                    allow_missing=True)


def test_bad_view_arguments():
    views, *_ = _views()
    with pytest.raises(ValueError, match="annotations per view"):
        pf.models.Spex(progress=False).fit(views, annotations={"SET": ["g1", "g2"]}, allow_missing=True)
    with pytest.raises(ValueError, match="views \\['atac'\\]"):
        pf.models.Spex(likelihood={"atac": "nb"}, progress=False).fit(views, allow_missing=True)
    with pytest.raises(ValueError, match="likelihood of view"):
        pf.models.Spex(likelihood={"met": "poison"}, progress=False).fit(views, allow_missing=True)
    with pytest.raises(ValueError, match="interventions"):
        pf.models.Spex(progress=False).fit(views, allow_missing=True, interventions=np.zeros(300))


def test_per_view_gene_sets_make_annotated_factors():
    views, *_ = _views()
    sets = {"SET_A": [f"g{i}" for i in range(20)]}
    model = pf.models.Spex(n_sparse=2, min_set_size=5, likelihood={"met": "bernoulli"}, progress=False)
    model.fit(views, annotations={"rna": sets}, allow_missing=True)
    assert list(model.loadings_.columns[:1]) == ["SET_A"]
    assert model.annotation_.loc["rna:g3", "SET_A"] and not model.annotation_.loc["met:p3", "SET_A"]


def _engine(lik, seed=0, n=120, g=15, dtype=torch.float64):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 2))
    W = rng.normal(size=(g, 2))
    eta = X @ W.T - 1.0
    if lik == "nb":
        r = 3.0
        lam = rng.gamma(r, np.exp(eta))
        Y = rng.poisson(lam).astype(float)
        offset = torch.zeros(n, g, dtype=dtype)
    else:
        Y = (rng.random((n, g)) < 1 / (1 + np.exp(-eta))).astype(float)
        offset = None
    obs = torch.as_tensor(rng.random((n, g)) > 0.1)
    s = torch.ones(g, 3, dtype=dtype)
    X0 = torch.as_tensor(rng.normal(size=(n, 3)), dtype=dtype)
    return SpexViews(torch.as_tensor(Y, dtype=dtype), obs, torch.zeros(g, dtype=torch.long), [lik],
                     torch.zeros(n, 0, dtype=dtype), s, X0, offset=offset,
                     dispersion=torch.full((g,), 3.0, dtype=dtype))


@pytest.mark.parametrize("lik", ["bernoulli", "nb"])
def test_logistic_views_climb_the_elbo(lik):
    """Logistic entries take checked conjugate-computation steps, from a random start: the exact ELBO (quadrature)
    never falls."""
    vi = _engine(lik)
    history = [vi.epoch() for _ in range(80)]
    assert history[-1] > history[0]
    assert np.diff(history).min() > -1e-9 * abs(history[-1])


def test_expected_log_likelihood_by_quadrature_against_monte_carlo():
    """E_q[y eta - b softplus(eta)] as the ELBO computes it (16 Gauss-Hermite nodes) against 400k draws."""
    rng = np.random.default_rng(0)
    nodes = gauss_hermite(16)
    for y, b, m, v in [(3.0, 5.0, 0.5, 0.8), (0.0, 5.0, -4.0, 0.3), (1.0, 1.0, -6.0, 2.0), (12.0, 13.5, 1.0, 0.0)]:
        eta = m + math.sqrt(v) * rng.standard_normal(400_000)
        exact = np.mean(y * eta - b * np.logaddexp(0, eta))
        f, _, _ = softplus_expectations(torch.tensor([m], dtype=torch.float64),
                                        torch.tensor([math.sqrt(v)], dtype=torch.float64), nodes, False)
        assert y * m - b * float(f) == pytest.approx(exact, abs=5e-3 * (1 + abs(exact)))


def test_nb_view_keeps_programs_on_low_counts():
    """Droplet-like counts (means 0.02-0.5 a cell, 3 programs of 40 genes with loading 0.5 on the log mean, r = 20):
    the Polya-Gamma bound this engine once used switched every program off (in-set loadings 0.000)."""
    rng = np.random.default_rng(0)
    n, g = 500, 240
    X = rng.standard_normal((n, 3))
    W = np.zeros((g, 3))
    for k in range(3):
        W[40 * k:40 * (k + 1), k] = 0.5
    base = np.exp(rng.uniform(np.log(0.02), np.log(0.5), g))
    mean = base * np.exp(X @ W.T - 0.125)
    Y = rng.negative_binomial(20, 20 / (20 + mean)).astype(np.float32)
    keep = Y.sum(1) > 0
    adata = ad.AnnData(Y[keep])
    adata.var_names = [f"g{i}" for i in range(g)]
    sets = {f"program_{k}": [f"g{i}" for i in range(40 * k, 40 * (k + 1))] for k in range(3)}
    model = pf.models.Spex(likelihood="nb", min_set_size=5, progress=False)
    model.fit(adata, annotations=sets, allow_missing=True)            # the multi-view engine, one NB view
    L = model.loadings_.to_numpy()[:, :3]
    assert np.median(L[W > 0]) > 0.25
    assert pf.evaluate.mask_f1(W > 0, L) > 0.85


def test_cell_posterior_matches_the_fit_for_complete_gaussian_views():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(200, 2))
    Y = X @ rng.normal(size=(30, 2)).T + 0.3 * rng.normal(size=(200, 30))
    model = pf.models.Spex(n_sparse=2, progress=False).fit({"a": ad.AnnData(Y[:, :20].astype(np.float32)),
                                                            "b": ad.AnnData(Y[:, 20:].astype(np.float32))})
    assert model.view_likelihoods_ == {"a": "normal", "b": "normal"}
    new = model.transform({"a": ad.AnnData(Y[:, :20].astype(np.float32)), "b": ad.AnnData(Y[:, 20:].astype(np.float32))})
    np.testing.assert_allclose(new.to_numpy(), model.factor_scores_.to_numpy(), atol=1e-2)


def test_poisson_view_elbo_rises_and_bound_is_tight_at_zero_variance():
    rng = np.random.default_rng(5)
    n, g = 150, 12
    X = rng.normal(size=(n, 2))
    eta = X @ rng.normal(size=(g, 2)).T
    Y = rng.poisson(np.logaddexp(0, eta)).astype(float)
    dtype = torch.float64
    obs = torch.as_tensor(rng.random((n, g)) > 0.1)
    vi = SpexViews(torch.as_tensor(Y, dtype=dtype), obs, torch.zeros(g, dtype=torch.long), ["poisson"],
                   torch.zeros(n, 0, dtype=dtype), torch.ones(g, 3, dtype=dtype),
                   torch.as_tensor(rng.normal(size=(n, 3)), dtype=dtype))
    history = [vi.epoch() for _ in range(60)]
    assert np.diff(history).min() > -1e-8 * abs(history[-1])
    # at zeta = eta with no variance the bound is the exact log-likelihood
    vi.S = torch.zeros_like(vi.S)
    vi.Sigma = torch.zeros_like(vi.Sigma)
    vi.zeta = vi._moments(vi.pois)[0]
    m = vi.zeta.numpy()
    exact = (Y * np.log(np.logaddexp(0, m)) - np.logaddexp(0, m) - np.vectorize(math.lgamma)(Y + 1))
    assert float(vi._poisson_bound()) == pytest.approx(float((exact * obs.numpy()).sum()), rel=1e-9)


def test_poisson_view_fits_counts_and_imputes_rates():
    rng = np.random.default_rng(6)
    X = rng.normal(size=(200, 2))
    Y = rng.poisson(np.logaddexp(0, X @ rng.normal(size=(20, 2)).T + 1)).astype(np.float32)
    Y[rng.random(Y.shape) < 0.1] = np.nan
    model = pf.models.Spex(n_sparse=0, n_dense=2, likelihood="poisson", progress=False)
    model.fit(ad.AnnData(Y), allow_missing=True)
    assert model.view_likelihoods_ == {"data": "poisson"}
    out = model.impute()
    assert np.isfinite(out).all() and (out >= 0).all()
    # dense factors are identified up to a rotation: the scores must span the true factors
    F = np.c_[model.factor_scores_.to_numpy(), np.ones(len(X))]
    resid = X - F @ np.linalg.lstsq(F, X, rcond=None)[0]
    assert (1 - (resid**2).sum(0) / ((X - X.mean(0)) ** 2).sum(0)).min() > 0.6


def test_supervised_fits_views_with_covariates(tiny_mudata):
    mdata = tiny_mudata()
    model = pf.models.Supervised(n_factors=2, progress=False).fit(mdata, covariates="group", allow_missing=True)
    columns = list(model.covariate_effects_.columns)
    assert len(columns) == 1 and columns[0].startswith("group=") and model.views_ is not None
    assert model.covariate_effects_.shape == (42, 1) and np.isfinite(model.covariate_effects_.to_numpy()).all()
    with pytest.raises(ValueError, match="two_step=True fits one complete view"):
        pf.models.Supervised(two_step=True, progress=False).fit(mdata, covariates="group", allow_missing=True)


def test_view_weights_temper_each_views_likelihood(tiny_mudata, tmp_path):
    mdata = tiny_mudata()
    lik = {"rna": "normal", "acc": "bernoulli"}
    plain = pf.models.Spex(n_sparse=2, likelihood=lik, progress=False).fit(mdata, allow_missing=True)
    balanced = pf.models.Spex(n_sparse=2, likelihood=lik, view_weights="balanced", progress=False)
    balanced.fit(mdata, allow_missing=True)
    assert plain.view_weights_ == {"rna": 1.0, "acc": 1.0}
    w = balanced.view_weights_
    n_rna, n_acc = int(np.isfinite(mdata["rna"].X).sum()), mdata["acc"].X.size
    assert w["acc"] * n_acc == pytest.approx(w["rna"] * n_rna) and w["acc"] > 1 > w["rna"]
    assert np.diff(balanced.history_).min() > -1e-6 * abs(balanced.history_[-1])
    balanced.save(tmp_path / "m")
    back = pf.load(tmp_path / "m")
    assert back.view_weights_ == balanced.view_weights_
    np.testing.assert_allclose(back.transform(mdata).to_numpy(), balanced.transform(mdata).to_numpy(), atol=1e-8)
    with pytest.raises(ValueError, match="view_weights must be"):
        pf.models.Spex(view_weights={"rna": -1}, progress=False).fit(mdata, allow_missing=True)
    with pytest.raises(ValueError, match="view_weights names views"):
        pf.models.Spex(view_weights={"atac": 2.0}, progress=False).fit(mdata, allow_missing=True)
