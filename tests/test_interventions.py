"""Interventions acting on programs (``_spex_effects``): closed form against brute force, monotone ELBO, results,
persistence, compare() and bad input."""
import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import pathfactor as pf
from pathfactor.models import Spex, Supervised
from pathfactor.models._spex_effects import ProgramEffects, adaptive_shrinkage, local_false_sign_rate

TARGETS = ["NT", "g1", "g2", "g3"]
BETA = {"NT": [0, 0, 0, 0], "g1": [1.0, 0, 0, 0], "g2": [0, -0.7, 0, 0], "g3": [0, 0, 0, 0]}


def _screen(n=900, g=200, noise=1.0, seed=0):
    """Cells x genes with 4 programs of 50 genes; g1 raises program 0, g2 lowers program 1, g3 does nothing."""
    rng = np.random.default_rng(seed)
    target = rng.choice(TARGETS, size=n, p=[0.4, 0.2, 0.2, 0.2])
    X = rng.normal(size=(n, 4)) + np.array([BETA[t] for t in target])
    mask = np.zeros((g, 4), bool)
    for k in range(4):
        mask[k * 50:(k + 1) * 50, k] = True
    W = mask * rng.normal(0.8, 0.2, size=(g, 4))
    Y = X @ W.T + rng.normal(scale=noise, size=(n, g))
    obs = pd.DataFrame({"target": target, "batch": rng.choice(["a", "b"], size=n)}, index=[f"c{i}" for i in range(n)])
    adata = ad.AnnData(Y.astype(np.float32), obs=obs)
    adata.var_names = [f"g{i}" for i in range(g)]
    sets = {f"P{k}": [f"g{i}" for i in range(k * 50, (k + 1) * 50)] for k in range(4)}
    return adata, sets


@pytest.fixture(scope="module")
def screen():
    return _screen()


@pytest.fixture(scope="module")
def fitted(screen):
    adata, sets = screen
    return Spex(n_sparse=0, min_set_size=5, progress=False).fit(adata, annotations=sets, interventions="target",
                                                                reference="NT")


def test_blocked_update_is_the_exact_marginal_posterior():
    """With W and sigma2 known, q(c, beta) must equal the posterior of theta in y_n ~ N(W m_n, W W^T + s2 I)."""
    rng = np.random.default_rng(1)
    N, G, K, L, s2 = 40, 6, 3, 2, 0.5
    codes = rng.integers(0, L + 1, size=N)
    codes[:L + 1] = np.arange(L + 1)
    W = rng.normal(size=(G, K)) * np.array([1.0, 0.3, 0.05])  # a strong, a weak and a barely determined factor
    Y = rng.normal(size=(N, G))
    eff = ProgramEffects(torch.as_tensor(codes), L, K, blocked=True, dtype=torch.float64)
    D = eff.prior_precision().numpy()
    Sigma_x = np.linalg.inv(np.eye(K) + W.T @ W / s2)
    u = Y @ W / s2 @ Sigma_x
    eff.update(torch.as_tensor(u), torch.as_tensor(Sigma_x))
    # brute force over theta = (c, beta_1, ..., beta_L)
    Vinv = np.linalg.inv(W @ W.T + s2 * np.eye(G))
    P = np.diag(np.concatenate([np.ones(K), D.ravel()]))
    h = np.zeros((L + 1) * K)
    for n in range(N):
        E = np.zeros((K, (L + 1) * K))
        E[:, :K] = np.eye(K)
        if codes[n]:
            E[:, codes[n] * K:(codes[n] + 1) * K] = np.eye(K)
        P += E.T @ W.T @ Vinv @ W @ E
        h += E.T @ W.T @ Vinv @ Y[n]
    cov = np.linalg.inv(P)
    mean = cov @ h
    np.testing.assert_allclose(eff.mean[0].numpy(), mean[:K], rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(eff.beta.numpy().ravel(), mean[K:], rtol=1e-8, atol=1e-10)
    for l in range(L):
        block = cov[K * (l + 1):K * (l + 2), K * (l + 1):K * (l + 2)]
        np.testing.assert_allclose(eff.beta_cov[l].numpy(), block, rtol=1e-8, atol=1e-12)
        Em = np.hstack([np.eye(K), np.eye(K)])  # m_l = c + beta_l
        idx = list(range(K)) + list(range(K * (l + 1), K * (l + 2)))
        np.testing.assert_allclose(eff.cov[l + 1].numpy(), Em @ cov[np.ix_(idx, idx)] @ Em.T, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(float(eff.logdet_P), np.linalg.slogdet(P)[1], rtol=1e-10)


def test_mean_field_is_narrower_than_blocked_for_a_weak_factor():
    """q(X) q(theta) takes the scores as data: its sds are too small where the factor is poorly determined."""
    rng = np.random.default_rng(2)
    N, K = 200, 2
    codes = torch.as_tensor(rng.integers(0, 2, size=N))
    Sigma_x = torch.diag(torch.tensor([0.01, 0.8], dtype=torch.float64))  # strong and weak factor
    u = torch.as_tensor(rng.normal(size=(N, K)))
    sds = {}
    for blocked in (True, False):
        eff = ProgramEffects(codes, 1, K, blocked=blocked, dtype=torch.float64)
        eff.update(u, Sigma_x)
        sds[blocked] = torch.diagonal(eff.beta_cov, dim1=1, dim2=2).sqrt()[0].numpy()
    assert sds[True][1] > 1.5 * sds[False][1]
    assert sds[True][0] == pytest.approx(sds[False][0], rel=0.05)


def _linear_map_sandwich(codes, L, K, u, Sigma_x):
    """Brute force: E[beta] as an explicit linear map of the levels' sums (a Jacobian), then sum_g A_g Cov(s_g) A_g^T."""
    def beta_of(sums):
        eff = ProgramEffects(torch.as_tensor(codes), L, K, blocked=True, dtype=torch.float64)
        eff.group_sums = lambda rows: sums  # the update reads the rows through their sums only
        eff.update(torch.zeros(len(codes), K, dtype=torch.float64), Sigma_x)
        return eff.beta
    sums0 = torch.zeros(L + 1, K, dtype=torch.float64)
    A = torch.autograd.functional.jacobian(beta_of, sums0)               # L x K x (L+1) x K
    var = torch.zeros(L, K, dtype=torch.float64)
    for g in range(L + 1):
        rows = u[codes == g]
        C = torch.as_tensor(np.cov(rows.numpy().T, ddof=1) * len(rows)) if len(rows) > 1 else torch.zeros(K, K)
        Ag = A[:, :, g, :]
        var += torch.einsum("lka,ab,lkb->lk", Ag, C.double(), Ag)
    return var.sqrt()


def test_robust_sd_is_the_sandwich_of_the_linear_estimate():
    rng = np.random.default_rng(5)
    N, K, L = 120, 3, 3
    codes = rng.integers(0, L + 1, size=N)
    codes[:L + 1] = np.arange(L + 1)
    codes[L + 1] = 0
    G = rng.normal(size=(K, K))
    Sigma_x = torch.as_tensor(np.linalg.inv(np.eye(K) + G @ G.T))
    u = torch.as_tensor(rng.standard_t(3, size=(N, K)))
    eff = ProgramEffects(torch.as_tensor(codes), L, K, blocked=True, dtype=torch.float64)
    eff.update(u, Sigma_x)
    np.testing.assert_allclose(eff.robust_sd().numpy(), _linear_map_sandwich(codes, L, K, u, Sigma_x).numpy(),
                               rtol=1e-8)


def test_robust_sd_matches_the_model_when_the_model_holds_and_grows_with_an_outlier():
    """Rows drawn from the model (u_n ~ N(R m_g, R)): the sandwich sd is q's (the prior's share is small at 4,000
    cells). One cell with a huge score in a small level: q's sd stays, the reported sd grows and the call goes."""
    rng = np.random.default_rng(6)
    N, K, L = 4000, 3, 2
    codes = rng.choice(L + 1, size=N, p=[0.5, 0.25, 0.25])
    Sigma_x = np.diag([0.05, 0.3, 0.8])
    R = np.eye(K) - Sigma_x
    m = np.zeros((L + 1, K))
    u = rng.multivariate_normal(np.zeros(K), R, size=N) + (m @ R)[codes]
    eff = ProgramEffects(torch.as_tensor(codes), L, K, blocked=True, dtype=torch.float64)
    eff.update(torch.as_tensor(u), torch.as_tensor(Sigma_x))
    model_sd = torch.diagonal(eff.beta_cov, dim1=1, dim2=2).sqrt().numpy()
    np.testing.assert_allclose(eff.robust_sd().numpy(), model_sd, rtol=0.12)
    small = np.r_[np.zeros(400, int), np.ones(30, int), np.full(30, 2)]
    u = rng.multivariate_normal(np.zeros(K), R, size=small.size)
    u[400, 0] = 30 * R[0, 0]                                    # one cell of level 1 with a factor-0 score of 30
    eff = ProgramEffects(torch.as_tensor(small), L, K, blocked=True, dtype=torch.float64)
    eff.update(torch.as_tensor(u), torch.as_tensor(Sigma_x))
    bhat, sd = eff.effects()
    model_sd = torch.diagonal(eff.beta_cov, dim1=1, dim2=2).sqrt()
    assert float(bhat[0, 0]) > 0.8 and float(bhat[0, 0] / model_sd[0, 0]) > 4  # q alone would call it
    assert float(sd[0, 0]) > 4 * float(model_sd[0, 0])
    assert float(eff.shrunk()[2][0, 0]) > 0.05


def test_a_level_of_one_cell_gets_no_sd_and_no_call():
    """One cell has no spread to read: a single-cell level with a score of 30 is not called (q alone, with its
    N(m, I) prior, would call it), its sd and lfsr are NaN, and the other levels are shrunk among themselves."""
    rng = np.random.default_rng(7)
    K = 2
    codes = np.r_[np.zeros(300, int), np.ones(60, int), [2], np.full(60, 3)]
    u = rng.normal(size=(codes.size, K))
    u[codes == 1, 0] += 1.0                                     # a real effect
    u[300 + 60, 0] = 30.0                                       # the one cell of level 2
    Sigma_x = torch.eye(K, dtype=torch.float64) * 0.1
    eff = ProgramEffects(torch.as_tensor(codes), 3, K, blocked=True, dtype=torch.float64)
    eff.update(torch.as_tensor(u), Sigma_x)
    assert torch.isnan(eff.robust_sd()[1]).all() and torch.isfinite(eff.robust_sd()[[0, 2]]).all()
    mean, sd, lfsr = eff.shrunk()
    assert torch.isnan(sd[1]).all() and torch.isnan(lfsr[1]).all()
    assert float(mean[1, 0]) == pytest.approx(float(eff.beta[1, 0]))     # E[beta] kept, unshrunk
    assert float(lfsr[0, 0]) < 1e-6 and float(lfsr[2].min()) > 0.05
    bhat, bsd = eff.effects()
    rest = adaptive_shrinkage(bhat[[0, 2]], bsd[[0, 2]])
    np.testing.assert_allclose(lfsr[[0, 2]].numpy(), rest[2].numpy(), rtol=1e-10)
    single_reference = ProgramEffects(torch.as_tensor(np.r_[0, codes[300:]]), 3, K, blocked=True, dtype=torch.float64)
    single_reference.update(torch.as_tensor(u[299:]), Sigma_x)
    assert torch.isnan(single_reference.shrunk()[2]).all()


def test_fits_warn_of_single_cell_levels(screen, tmp_path):
    adata, sets = screen
    adata = adata.copy()
    target = adata.obs["target"].astype(str).to_numpy()
    target[0] = "lonely"
    adata.obs["target"] = target
    with pytest.warns(UserWarning, match=r"level\(s\) \['lonely'\] have a single cell"):
        m = Spex(n_sparse=0, min_set_size=5, progress=False).fit(adata, annotations=sets, interventions="target",
                                                                 reference="NT")
    assert m.intervention_effects_lfsr_["lonely"].isna().all()
    assert m.intervention_effects_lfsr_.drop(columns="lonely").notna().all().all()
    with pytest.warns(UserWarning, match="'target' level"):
        m.compare(adata, groupby="target", reference="NT")
    back = pf.load(m.save(tmp_path / "model"))  # NaN is a value there ("not estimable"), and saves
    pd.testing.assert_frame_equal(back.intervention_effects_lfsr_, m.intervention_effects_lfsr_)


@pytest.mark.parametrize("posterior", ["blocked", "mean-field"])
def test_elbo_rises_with_interventions_and_covariates(screen, posterior):
    adata, sets = screen
    m = Spex(n_sparse=1, min_set_size=5, progress=False, posterior=posterior, max_epochs=40, tol=1e-9)
    m.fit(adata, annotations=sets, interventions="target", reference="NT", covariates="batch")
    h = np.array(m.history_)
    assert len(h) > 5
    assert (np.diff(h) >= -1e-6 * np.abs(h[1:])).all()


def test_effects_recovered_with_calibrated_calls(fitted):
    eff, lfsr = fitted.intervention_effects_, fitted.intervention_effects_lfsr_
    assert list(eff.columns) == ["g1", "g2", "g3"] and fitted.intervention_reference_ == "NT"
    assert eff.loc["P0", "g1"] == pytest.approx(1.0, abs=0.25)
    assert eff.loc["P1", "g2"] == pytest.approx(-0.7, abs=0.25)
    assert lfsr.loc["P0", "g1"] < 1e-6 and lfsr.loc["P1", "g2"] < 1e-6
    truth = pd.DataFrame({t: BETA[t] for t in TARGETS[1:]}, index=eff.index)
    null_lfsr = lfsr.to_numpy()[truth.to_numpy() == 0]
    assert (null_lfsr < 0.01).sum() <= 1 and null_lfsr.min() > 1e-3  # at most one null call at 1 %
    z = (eff - truth) / fitted.intervention_effects_sd_
    assert float(np.abs(z.to_numpy()).max()) < 3.5
    # per-gene total effects W beta: the program's genes move, the others do not
    ge = fitted.gene_effects_["g1"]
    assert ge.iloc[:50].mean() > 0.5 and ge.iloc[50:].abs().median() < 0.05
    assert ge.nlargest(50).index.isin(ge.index[:50]).mean() >= 0.9
    assert (fitted.gene_effects_sd_.to_numpy() > 0).all()


def test_adaptive_shrinkage_keeps_signals_and_zeroes_noise():
    rng = np.random.default_rng(3)
    truth = np.r_[np.zeros(450), rng.choice([-1, 1], 50) * rng.uniform(0.3, 1.0, 50)]
    se = rng.uniform(0.05, 0.15, truth.size)
    bhat = truth + se * rng.normal(size=truth.size)
    mean, sd, lfsr, pi, sigma = adaptive_shrinkage(torch.as_tensor(bhat), torch.as_tensor(se))
    mean, sd, lfsr = mean.numpy(), sd.numpy(), lfsr.numpy()
    assert pi[0] > 0.8 and float(pi.sum()) == pytest.approx(1.0)
    called = lfsr < 0.05
    false = called & ((np.sign(mean) != np.sign(truth)) | (truth == 0))
    assert false.sum() <= 0.05 * max(called.sum(), 1) and called[450:].mean() > 0.8
    assert np.median(np.abs(mean[:450])) < np.median(np.abs(bhat[:450])) / 5  # noise shrunk towards zero
    # a lone huge effect is barely shrunk; lfsr equals the Gaussian one when the prior is flat in its region
    assert mean[np.argmax(np.abs(truth))] == pytest.approx(bhat[np.argmax(np.abs(truth))], rel=0.05)
    assert ((lfsr >= 0) & (lfsr <= 1)).all() and (sd >= 0).all()


def test_lfsr_formula():
    m, s = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([1.0, 1.0, 1.0])
    np.testing.assert_allclose(local_false_sign_rate(m, s).numpy(), [0.5, 0.158655, 0.02275], rtol=1e-4)


def test_default_reference_is_the_most_frequent_level(screen):
    adata, sets = screen
    m = Supervised(n_factors=4, progress=False, max_epochs=30).fit(adata, interventions="target")
    assert m.intervention_reference_ == "NT"  # 40 % of the cells
    assert list(m.intervention_effects_.columns) == ["g1", "g2", "g3"]


def test_compare_agrees_with_the_fitted_effects(fitted, screen):
    adata, _ = screen
    table = fitted.compare(adata, groupby="target", reference="NT")
    assert set(table.columns) >= {"factor", "group", "effect", "sd", "lfsr", "n_group", "n_reference"}
    top = table.iloc[:2]
    assert {(r.factor, r.group) for r in top.itertuples()} == {("P0", "g1"), ("P1", "g2")}
    row = table.set_index(["factor", "group"]).loc[("P0", "g1")]
    assert row.effect == pytest.approx(fitted.intervention_effects_.loc["P0", "g1"], abs=0.1)
    # two groups only: the others are left out
    two = fitted.compare(adata, groupby="target", groups=["g1"], reference="NT")
    assert set(two.group) == {"g1"} and int(two.n_reference.iloc[0]) == int((adata.obs.target == "NT").sum())


def test_transform_save_load_and_write(fitted, screen, tmp_path):
    adata, _ = screen
    scores = fitted.transform(adata)
    assert np.abs(scores.to_numpy() - fitted.factor_scores_.to_numpy()).max() < 0.05
    loaded = pf.load(fitted.save(tmp_path / "m"))
    pd.testing.assert_frame_equal(loaded.intervention_effects_lfsr_, fitted.intervention_effects_lfsr_)
    np.testing.assert_allclose(loaded.transform(adata).to_numpy(), scores.to_numpy())
    out = adata.copy()
    fitted.write(out)
    uns = out.uns["spex"]
    assert uns["intervention_reference"] == "NT" and list(uns["intervention_levels"]) == ["g1", "g2", "g3"]
    assert uns["intervention_effects_lfsr"].shape == (4, 3)
    out.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    assert isinstance(back.uns["spex"]["intervention_effects"], pd.DataFrame)
    assert back.varm["spex_gene_effects"].shape == (adata.n_vars, 3)


def test_transform_refuses_unknown_levels(fitted, screen):
    adata, _ = screen
    new = adata[:5].copy()
    new.obs["target"] = ["g9"] * 5
    with pytest.raises(ValueError, match="g9"):
        fitted.transform(new)
    with pytest.raises(ValueError, match="interventions"):
        fitted.transform(adata[:5].to_df())


@pytest.mark.parametrize("kwargs,match", [
    ({"interventions": "nope"}, "not a column"),
    ({"interventions": "target", "reference": "zz"}, "not a level"),
    ({"interventions": "target", "covariates": "target"}, "both a covariate"),
    ({"interventions": "target", "covariates": "copy"}, r"\['g1', 'g2', 'g3'\] are fully explained.*'copy'"),
    ({"interventions": "target", "covariates": ["batch", "guide"]}, r"\['g2'\] are fully explained"),
    ({"interventions": "target", "covariates": "is_reference"}, r"\['g1', 'g2', 'g3'\] are fully explained"),
    ({"interventions": "one"}, "single level"),
    ({"interventions": "gap"}, "missing values"),
])
def test_bad_interventions_are_refused(screen, kwargs, match):
    adata, sets = screen
    adata = adata.copy()
    adata.obs["one"] = "x"
    adata.obs["gap"] = adata.obs["target"].where(np.arange(adata.n_obs) % 7 > 0)
    adata.obs["copy"] = adata.obs["target"].astype(str)
    # two guides of g2 (nested in the target), the other targets' cells share one guide with other targets' cells
    target = adata.obs["target"].to_numpy()
    adata.obs["guide"] = np.where(target == "g2", np.where(np.arange(adata.n_obs) % 2, "g2a", "g2b"), "other")
    adata.obs["is_reference"] = (target == "NT").astype(float)  # all the levels' common shift is the covariate's
    with pytest.raises(ValueError, match=match):
        Spex(n_sparse=0, min_set_size=5, progress=False, max_epochs=2).fit(adata, annotations=sets, **kwargs)


def test_interventions_need_the_gaussian_model_in_memory(screen):
    adata, sets = screen
    with pytest.raises(ValueError, match="batch_size"):
        Spex(n_sparse=0, min_set_size=5, progress=False, batch_size=100).fit(adata, annotations=sets,
                                                                             interventions="target")
    counts = adata.copy()
    counts.X = np.random.default_rng(0).poisson(1.0, size=counts.shape).astype(np.float32)
    with pytest.raises(ValueError, match="Gaussian"):
        Spex(n_sparse=0, min_set_size=5, progress=False, likelihood="nb").fit(counts, annotations=sets,
                                                                              interventions="target")
