"""VAE and GMVAE (seeds 003, 004): closed-form KL against Monte Carlo, the GMVAE's exact sum over clusters
against a brute-force enumeration and quadrature, recovery of simulated clusters, the model face (transform,
elbo, write, save/load, determinism), the decoder's linearisation, extreme counts and bad input."""
import json
import re
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

import pathfactor as pf
from pathfactor.likelihoods import COUNT_LIKELIHOODS, LOG_VAR_RANGE
from pathfactor.models import GMVAE, VAE
from pathfactor.models.gmvae import _GMVAENet
from pathfactor.models.vae import _Rows, _VAENet, _VAETask, encoder_input, gaussian_kl


def simulate_counts(n_cells=450, n_genes=120, n_clusters=3, theta=5.0, seed=0) -> ad.AnnData:
    """NB counts of well-separated clusters: each has its own gene proportions, libraries ~ 2000 +- 30 %."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_clusters, n_cells)
    logits = rng.normal(0, 1, n_genes) + rng.normal(0, 1.5, (n_clusters, n_genes))[labels]
    p = np.exp(logits - logits.max(1, keepdims=True))
    mu = p / p.sum(1, keepdims=True) * rng.lognormal(np.log(2000), 0.3, n_cells)[:, None]
    adata = ad.AnnData(rng.negative_binomial(theta, theta / (theta + mu)).astype(np.float32))
    adata.obs_names = [f"cell{i}" for i in range(n_cells)]
    adata.var_names = [f"gene{j}" for j in range(n_genes)]
    adata.obs["cluster"] = pd.Categorical(labels.astype(str))
    return adata


@pytest.fixture(scope="module")
def sim():
    return simulate_counts()


@pytest.fixture(scope="module")
def vae(sim):
    return VAE(n_latent=4, progress=False).fit(sim, seed=0)


@pytest.fixture(scope="module")
def gmvae(sim):
    return GMVAE(n_clusters=3, n_latent=4, progress=False).fit(sim, seed=0)


# ----------------------------------------------------------------------------- maths
@pytest.mark.parametrize("standard", [True, False])
def test_gaussian_kl_closed_form_matches_monte_carlo(standard):
    g = torch.Generator().manual_seed(0)
    m, log_v = torch.randn(3, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    pm, plv = (torch.zeros(3, dtype=torch.float64),) * 2 if standard else (
        torch.randn(3, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64))
    z = m + torch.exp(0.5 * log_v) * torch.randn(400_000, 3, generator=g, dtype=torch.float64)
    log_ratio = torch.distributions.Normal(m, torch.exp(0.5 * log_v)).log_prob(z) - \
        torch.distributions.Normal(pm, torch.exp(0.5 * plv)).log_prob(z)
    kl = gaussian_kl(m, log_v) if standard else gaussian_kl(m, log_v, pm, plv)
    se = log_ratio.std(0) / np.sqrt(z.shape[0])
    assert ((kl - log_ratio.mean(0)).abs() < 4 * se + 1e-9).all()
    assert (kl >= 0).all()


def tiny_gmvae(likelihood="zinb", G=6, K=2, C=3, seed=0):
    torch.manual_seed(seed)
    net = _GMVAENet(G, K, C, (5,), likelihood, False, True).double()
    with torch.no_grad():  # move every parameter off its start value, including the per-y encoder inputs
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.tensor(np.random.default_rng(seed).poisson(3.0, (4, G)), dtype=torch.float64)
    return net.eval(), x, torch.log(x.sum(1, keepdim=True))


def test_gmvae_sum_over_clusters_equals_an_explicit_enumeration():
    """terms() evaluates every y at once (per-y vectors added to the first layer); here each y is run
    separately through a first layer on the concatenation [x, one-hot y], as the seed writes it."""
    net, x, log_lib = tiny_gmvae()
    C, K = net.prior_mean.shape
    eps = torch.randn(x.shape[0], 1, K, dtype=torch.float64)
    t = net.terms(x, log_lib, eps)
    xin = encoder_input(x, log_lib, True)
    log_qy = torch.log_softmax(net.y_encoder(xin), -1)
    mu, log_var, log_py = net.prior()
    first = torch.nn.Linear(x.shape[1] + C, net.encoder.first.out_features).double()
    with torch.no_grad():
        first.weight.copy_(torch.cat([net.encoder.first.weight, net.encoder.cond.T], 1))
        first.bias.copy_(net.encoder.first.bias)
    elbo = -(log_qy.exp() * (log_qy - log_py)).sum(-1)
    for y in range(C):
        onehot = torch.zeros(x.shape[0], C, dtype=torch.float64)
        onehot[:, y] = 1
        m, log_v = net.encoder.head(net.encoder.body(first(torch.cat([xin, onehot], 1)))).chunk(2, -1)
        log_v = log_v.clamp(*LOG_VAR_RANGE)
        z = m + torch.exp(0.5 * log_v) * eps[:, 0]
        term = net.decoder.log_px(x, z, log_lib) - gaussian_kl(m, log_v, mu[y], log_var[y]).sum(-1)
        elbo = elbo + log_qy[:, y].exp() * term
    got = t["recon"] - t["kl"].sum(-1) - t["kl_extra"]
    torch.testing.assert_close(got, elbo, rtol=1e-12, atol=1e-10)


def test_gmvae_elbo_equals_quadrature_and_bounds_the_marginal_likelihood():
    """K = 1: Gauss-Hermite quadrature of E_q(y) E_q(z|y) [log p(x|z) p(z|y) p(y) - log q(z|x,y) q(y|x)] with the
    densities written out (no closed-form KL) equals the model's ELBO averaged over the same nodes, and lies
    below log p(x) = log sum_y p(y) int p(x|z) p(z|y) dz."""
    net, x, log_lib = tiny_gmvae("nb", K=1, C=2)
    t_nodes, w = np.polynomial.hermite.hermgauss(80)
    nodes, weights = torch.tensor(np.sqrt(2) * t_nodes), torch.tensor(w / np.sqrt(np.pi))
    n = len(nodes)
    normal = lambda z, m, log_v: torch.distributions.Normal(m, torch.exp(0.5 * log_v)).log_prob(z)  # noqa: E731
    mu, log_var, log_py = net.prior()
    for i in range(x.shape[0]):
        xi, li = x[i:i + 1], log_lib[i:i + 1]
        t = net.terms(xi.expand(n, -1), li.expand(n, -1), nodes.view(n, 1, 1))
        model = (weights * (t["recon"] - t["kl"].sum(-1) - t["kl_extra"])).sum()
        xin = encoder_input(xi, li, True)
        log_qy = torch.log_softmax(net.y_encoder(xin), -1)[0]
        m, log_v = (a[0, :, 0] for a in net.encoder(xin))
        brute, marginal = 0.0, []
        for y in range(2):
            z = m[y] + torch.exp(0.5 * log_v[y]) * nodes
            log_px = net.decoder.log_px(xi, z[:, None], li)
            f = log_px + normal(z, mu[y, 0], log_var[y, 0]) - normal(z, m[y], log_v[y])
            brute = brute + log_qy[y].exp() * ((weights * f).sum() + log_py[y] - log_qy[y])
            zp = mu[y, 0] + torch.exp(0.5 * log_var[y, 0]) * nodes  # int p(x|z) p(z|y) dz by quadrature
            log_px_prior = net.decoder.log_px(xi, zp[:, None], li)
            marginal.append(log_py[y] + torch.logsumexp(torch.log(weights) + log_px_prior, 0))
        torch.testing.assert_close(model, brute, rtol=1e-10, atol=1e-8)
        assert model < torch.logsumexp(torch.stack(marginal), 0)


def test_vae_elbo_bounds_the_quadrature_marginal_likelihood():
    torch.manual_seed(1)
    net = _VAENet(5, 1, (4,), "poisson", False).double().eval()
    x = torch.tensor([[0.0, 3.0, 1.0, 0.0, 7.0]], dtype=torch.float64)
    log_lib = torch.log(x.sum(1, keepdim=True))
    t_nodes, w = np.polynomial.hermite.hermgauss(100)
    nodes, weights = torch.tensor(np.sqrt(2) * t_nodes), torch.tensor(w / np.sqrt(np.pi))
    t = net.terms(x.expand(100, -1), log_lib.expand(100, -1), nodes[:, None])
    elbo = (weights * (t["recon"] - t["kl"].sum(-1))).sum()
    log_px = torch.logsumexp(torch.log(weights) + net.decoder.log_px(x, nodes[:, None], log_lib), 0)
    assert elbo < log_px and torch.isfinite(elbo)


def test_kl_warmup_weight_rises_linearly_to_one(sim):
    net = _VAENet(sim.n_vars, 2, (8,), "nb", False)
    rows = _Rows(sim.X, torch.device("cpu"), torch.float32)
    task = _VAETask(net, rows, torch.arange(40), torch.arange(40, 50), lr=1e-3, batch_size=16, kl_warmup=4,
                    generator=torch.Generator().manual_seed(0), batch_norm=False)
    betas = []
    for _ in range(6):
        betas.append(task.beta())
        task.epoch()
    assert betas == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


# ----------------------------------------------------------------------------- recovery
def test_vae_latent_separates_the_clusters(sim, vae):
    Z = vae.factor_scores_.to_numpy()
    labels = KMeans(3, n_init=10, random_state=0).fit_predict(Z)
    assert adjusted_rand_score(sim.obs["cluster"], labels) > 0.9
    assert np.isfinite(vae.history_).all() and np.isfinite(vae.elbo_)
    assert vae.validation_elbo_[vae.best_epoch_ - 1] == max(vae.validation_elbo_[vae.kl_warmup:])
    assert vae.dispersion_.between(1.5, 15).mean() > 0.9  # simulated theta = 5
    assert (vae.relevance_ >= 0).all() and list(vae.factor_kinds_) == ["latent"] * 4


def test_gmvae_clusters_recover_the_truth(sim, gmvae):
    assert adjusted_rand_score(sim.obs["cluster"], gmvae.clusters_) > 0.9
    np.testing.assert_allclose(gmvae.cluster_probs_.sum(1), 1.0, rtol=1e-6)
    assert gmvae.cluster_weights_.sum() == pytest.approx(1.0)
    assert np.isfinite(gmvae.history_).all()


def test_nb_beats_poisson_on_overdispersed_counts(sim, vae):
    poisson = VAE(n_latent=4, likelihood="poisson", progress=False).fit(sim, seed=0)
    assert vae.elbo(sim).mean() > poisson.elbo(sim).mean() + 10


def test_loadings_are_the_mean_jacobian_of_the_decoder(sim):
    m = VAE(n_latent=2, max_epochs=3, kl_warmup=1, dtype="float64", progress=False).fit(sim, seed=0)
    Z = torch.as_tensor(m.factor_scores_.to_numpy())
    h, fd = 1e-6, []
    for k in range(2):
        step = torch.zeros_like(Z)
        step[:, k] = h
        with torch.no_grad():
            fd.append(((m._net.decoder.loc(Z + step) - m._net.decoder.loc(Z - step)) / (2 * h)).mean(0).numpy())
    np.testing.assert_allclose(m.loadings_.to_numpy(), np.stack(fd, 1), rtol=1e-5, atol=1e-8)


# ----------------------------------------------------------------------------- the model face
def test_transform_elbo_write_and_save_load(sim, vae, gmvae, tmp_path):
    for model in (vae, gmvae):
        np.testing.assert_allclose(model.transform(sim).to_numpy(), model.factor_scores_.to_numpy(), atol=1e-5)
        shuffled = sim[:, ::-1].copy()
        np.testing.assert_allclose(model.transform(shuffled).to_numpy(), model.factor_scores_.to_numpy(), atol=1e-5)
        with pytest.raises(ValueError, match="genes are missing"):
            model.transform(sim[:, :10])
        elbo = model.elbo(sim, n_samples=3)
        assert np.isfinite(elbo).all() and elbo.index.equals(sim.obs_names)
        model.save(tmp_path / model.key)
        back = pf.load(tmp_path / model.key)
        assert type(back) is type(model)
        pd.testing.assert_frame_equal(back.loadings_, model.loadings_)
        np.testing.assert_allclose(back.transform(sim).to_numpy(), model.transform(sim).to_numpy(), atol=1e-6)
        pd.testing.assert_series_equal(back.elbo(sim), model.elbo(sim))
    back = pf.load(tmp_path / "gmvae")
    pd.testing.assert_series_equal(back.clusters_, gmvae.clusters_)
    assert back.init_elbos_ == gmvae.init_elbos_ and back.best_init_ == gmvae.best_init_
    assert back.get_params()["n_init"] == gmvae.n_init == 3
    pd.testing.assert_series_equal(gmvae.predict(sim), gmvae.clusters_)
    adata = sim.copy()
    gmvae.write(adata)
    assert adata.obsm["X_gmvae"].shape == (sim.n_obs, 4) and adata.varm["gmvae_loadings"].shape == (sim.n_vars, 4)
    assert list(adata.obs["gmvae_cluster"]) == list(gmvae.clusters_)
    assert adata.obsm["gmvae_cluster_probs"].shape == (sim.n_obs, 3)
    assert adata.uns["gmvae"]["relevance_measure"] == "KL (nats)"
    assert "X_vae" not in sim.obsm and "gmvae_cluster" not in sim.obs  # fitting does not write


def test_gmvae_loads_saves_without_starts_and_refuses_malformed_ones(gmvae, tmp_path):
    path = Path(gmvae.save(tmp_path / "gmvae"))
    meta = json.loads((path / "model.json").read_text())
    del meta["extra"]["init_elbos"], meta["extra"]["best_init"]  # as saved before n_init
    (path / "model.json").write_text(json.dumps(meta))
    old = pf.load(path)
    assert old.init_elbos_ == [] and old.best_init_ is None
    pd.testing.assert_series_equal(old.clusters_, gmvae.clusters_)
    for elbos, best in ((["x"], 0), ([-1.0], 1), ([-1.0], True), ("-1", None)):
        meta["extra"]["init_elbos"], meta["extra"]["best_init"] = elbos, best
        (path / "model.json").write_text(json.dumps(meta))
        with pytest.raises(ValueError, match="malformed init_elbos / best_init"):
            pf.load(path)


def test_same_seed_same_fit_other_seed_other_fit(sim):
    small = sim[:120, :40].copy()
    fit = lambda seed: GMVAE(n_clusters=2, n_latent=2, pretrain_epochs=3, max_epochs=3, kl_warmup=2,  # noqa: E731
                             batch_norm=True, progress=False).fit(small, seed=seed)
    a, b, c = fit(0), fit(0), fit(1)
    np.testing.assert_array_equal(a.factor_scores_.to_numpy(), b.factor_scores_.to_numpy())
    assert not np.allclose(a.factor_scores_.to_numpy(), c.factor_scores_.to_numpy())


@pytest.mark.parametrize("likelihood", COUNT_LIKELIHOODS)
def test_extreme_counts_stay_finite(likelihood):
    rng = np.random.default_rng(4)
    X = np.where(rng.random((101, 30)) < 0.95, 0, rng.integers(1, 10**6, (101, 30))).astype(np.float32)
    X[0] = 0  # a cell without counts
    # 101 cells, 10 held out: the last training minibatch has one cell, which batch norm must not see alone
    m = VAE(n_latent=2, likelihood=likelihood, batch_size=10, max_epochs=4, kl_warmup=2, batch_norm=True,
            progress=False).fit(X, seed=0)
    assert np.isfinite(m.history_).all() and np.isfinite(m.factor_scores_.to_numpy()).all()
    assert np.isfinite(m.loadings_.to_numpy()).all() and np.isfinite(m.elbo(X)).all()


def test_gaussian_likelihood_on_log_data(sim):
    logged = sim.copy()
    logged.X = np.log1p(logged.X / logged.X.sum(1, keepdims=True) * 1e4)
    m = VAE(n_latent=2, likelihood="gaussian", max_epochs=20, progress=False).fit(logged, seed=0)
    assert np.isfinite(m.elbo(logged)).all() and m.dispersion_ is None and m.zero_inflation_ is None
    with pytest.raises(ValueError, match="needs integer counts"):
        VAE(likelihood="nb").fit(logged)


# ----------------------------------------------------------------------------- GMVAE starts (n_init) and q(y | x)
def small_gmvae(**kw) -> GMVAE:
    return GMVAE(**{"n_clusters": 3, "n_latent": 2, "hidden": (8,), "pretrain_epochs": 3, "kl_warmup": 1,
                    "max_epochs": 2, "progress": False, **kw})


def snapshot(net) -> dict:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


@pytest.mark.filterwarnings("ignore::pathfactor.train.ConvergenceWarning")
def test_gmvae_n_init_keeps_the_start_with_the_best_elbo(sim, monkeypatch):
    """The starts' ELBOs are scripted (-3, -1, -2): the fit must go on from the second start's network (as it
    was after its placement) and report that start's pre-training history."""
    import pathfactor.models.gmvae as gm

    histories, placed, kept = [], [], []
    real_train, real_place, real_fit_qy = gm.train, gm.GMVAE._place_mixture, gm.GMVAE._fit_qy

    def spy_train(task, **kw):
        result = real_train(task, **kw)
        if task.net.pretraining:
            histories.append(list(result.history))
        return result

    def spy_place(self, task):
        real_place(self, task)
        placed.append(snapshot(task.net))

    def spy_fit_qy(self, task):
        kept.append(snapshot(task.net))
        real_fit_qy(self, task)

    scores = iter([-3.0, -1.0, -2.0])
    monkeypatch.setattr(gm, "train", spy_train)
    monkeypatch.setattr(gm.GMVAE, "_place_mixture", spy_place)
    monkeypatch.setattr(gm.GMVAE, "_fit_qy", spy_fit_qy)
    monkeypatch.setattr(gm, "_placement_elbo", lambda net, rows, idx, eps: torch.full((len(idx),), next(scores)))
    model = small_gmvae(n_init=3).fit(sim[:150, :40].copy(), seed=0)
    assert model.init_elbos_ == [-3.0, -1.0, -2.0] and model.best_init_ == 1
    assert len(histories) == len(placed) == 3 and len(kept) == 1
    assert histories[0] != histories[1] != histories[2]  # fresh networks
    assert list(model.history_[:3]) == histories[1]
    for name, value in kept[0].items():
        torch.testing.assert_close(value, placed[1][name], rtol=0, atol=0, msg=name)
    assert any(not torch.equal(value, placed[2][name]) for name, value in kept[0].items())


@pytest.mark.filterwarnings("ignore::pathfactor.train.ConvergenceWarning")
def test_gmvae_n_init_scores_every_start_and_keeps_the_best(sim):
    small = sim[:150, :40].copy()
    three, one = small_gmvae(n_init=3).fit(small, seed=0), small_gmvae(n_init=1).fit(small, seed=0)
    assert len(three.init_elbos_) == 3 and np.isfinite(three.init_elbos_).all()
    assert three.best_init_ == int(np.argmax(three.init_elbos_))
    assert one.init_elbos_ == three.init_elbos_[:1] and one.best_init_ == 0  # start k does not depend on n_init
    unplaced = small_gmvae(n_init=3, pretrain_epochs=0).fit(small, seed=0)  # nothing to place: no starts
    assert unplaced.init_elbos_ == [] and unplaced.best_init_ is None


@pytest.mark.filterwarnings("ignore::pathfactor.train.ConvergenceWarning")
def test_gmvae_q_y_starts_at_the_placed_mixtures_responsibilities(sim, monkeypatch):
    """After the placement q(y | x) is fitted to q*(y | x) ~ p(y) exp(-KL(q(z | x) || p(z | y)))."""
    import pathfactor.models.gmvae as gm

    real_fit_qy, seen = gm.GMVAE._fit_qy, {}

    def spy(self, task):
        net = task.net
        x, log_lib = task.rows(task.train_idx)
        with torch.no_grad():
            before = torch.softmax(net.y_encoder(encoder_input(x, log_lib, True)), -1)
        real_fit_qy(self, task)
        with torch.no_grad():
            net.eval()
            target = gm._responsibilities(net, x, log_lib).exp()
            after = torch.softmax(net.y_encoder(encoder_input(x, log_lib, True)), -1)
            net.train()
        tv = lambda q: float(0.5 * (q - target).abs().sum(1).mean())  # noqa: E731
        agree = float((after.argmax(1) == target.argmax(1)).float().mean())
        seen.update(before=tv(before), after=tv(after), agree=agree)

    monkeypatch.setattr(gm.GMVAE, "_fit_qy", spy)
    GMVAE(n_clusters=3, n_latent=4, pretrain_epochs=20, n_init=1, max_epochs=1, progress=False).fit(sim, seed=0)
    assert seen["before"] > 0.3 and seen["after"] < 0.05 and seen["agree"] > 0.97, seen


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("model", [VAE(), GMVAE(n_clusters=2)], ids=["VAE", "GMVAE"])
def test_bad_data(model, sim):
    X = sim.X.copy()
    with pytest.raises(ValueError, match="needs non-negative counts"):
        model.fit(X - 1)
    with pytest.raises(ValueError, match="needs integer counts"):
        model.fit(X + 0.5)
    X[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        model.fit(X)


@pytest.mark.parametrize("kwargs, match", [
    ({"likelihood": "bernoulli"}, "unknown likelihood 'bernoulli'"), ({"n_latent": 0}, "n_latent must be"),
    ({"hidden": ()}, "hidden must be"), ({"hidden": (0,)}, "hidden must be"), ({"lr": -1.0}, "lr must be"),
    ({"validation_fraction": 1.0}, "validation_fraction"), ({"batch_norm": "yes"}, "batch_norm"),
    ({"n_latent": 500}, "fewer latent dimensions than the data's 120 genes"),
])
def test_bad_parameters(kwargs, match, sim):
    with pytest.raises(ValueError, match=match):
        VAE(**kwargs).fit(sim)


def test_gmvae_bad_parameters(sim):
    with pytest.raises(ValueError, match="n_clusters must be an integer >= 2"):
        GMVAE(n_clusters=1).fit(sim)
    with pytest.raises(ValueError, match="prior_weights"):
        GMVAE(prior_weights="dirichlet").fit(sim)
    for bad in (0, -2, 1.5, "3", True, None):
        with pytest.raises(ValueError, match=re.escape(f"n_init must be an integer >= 1, got {bad!r}")):
            GMVAE(n_init=bad).fit(sim)
    with pytest.raises(ValueError, match="n_clusters=20 needs at least as many cells"):
        GMVAE(n_clusters=20).fit(sim[:10])
    with pytest.raises(RuntimeError, match="not fitted"):
        GMVAE().transform(sim)
