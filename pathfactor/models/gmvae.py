"""Gaussian-mixture VAE: a VAE whose prior is a mixture, one component per cluster (seed 004, sec. 2.2).

Generative model: ``y_n ~ Cat(pi)``, ``z_n | y_n ~ N(mu_y, diag sigma_y^2)`` (learned), ``x_n | z_n`` as in
:mod:`pathfactor.models.vae`. Inference: ``q(y | x) = softmax(g(x))`` and ``q(z | x, y) = N(m(x, y),
diag s^2(x, y))`` (the encoder sees ``[x, one-hot y]``). The ELBO (seed 004, eq. 8)

    sum_y q(y | x) [ E_q(z|x,y) log p(x | z) - KL(q(z | x, y) || p(z | y)) ] - KL(q(y | x) || p(y))

is computed with the sum over the clusters written out (no sampling of ``y``: every cluster's term is evaluated
and weighted by ``q(y | x)``), closed-form Gaussian and categorical KLs, and one reparameterised ``z`` per
cluster (the same standard-normal draw shifted and scaled by each cluster's ``q(z | x, y)``).
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ..likelihoods import LOG_VAR_RANGE
from ..train import one_thread, train
from .persist import corrupted, expect_shapes
from .vae import VAE, Decoder, Encoder, check_integer, encoder_input, gaussian_kl, stack_layers

__all__ = ["GMVAE"]

log = logging.getLogger(__name__)


class _GMVAENet(nn.Module):
    """The GMVAE's maths. With ``pretraining`` on it is a plain VAE (``q(z | x)`` without ``y``, prior N(0, I)),
    which :class:`GMVAE` trains first to place the mixture."""

    def __init__(self, n_genes, n_latent, n_clusters, hidden, likelihood, batch_norm, learn_weights):
        super().__init__()
        self.y_encoder = nn.Sequential(*stack_layers((n_genes, *hidden), batch_norm), nn.Linear(hidden[-1], n_clusters))
        self.encoder = Encoder(n_genes, n_latent, hidden, batch_norm, n_cond=n_clusters)
        self.decoder = Decoder(n_genes, n_latent, hidden, likelihood, batch_norm)
        self.prior_mean = nn.Parameter(torch.randn(n_clusters, n_latent))
        self.prior_log_var = nn.Parameter(torch.zeros(n_clusters, n_latent))
        self.prior_logits = nn.Parameter(torch.zeros(n_clusters), requires_grad=learn_weights)
        self.n_latent, self.fanout, self.pretraining = n_latent, n_clusters, False

    def eps_shape(self, n: int) -> tuple[int, ...]:
        return (n, 1, self.n_latent)  # one draw per cell, shared by the clusters

    def prior(self):
        """``(mu_y, log sigma_y^2, log p(y))``, the variances clamped to a finite range."""
        return self.prior_mean, self.prior_log_var.clamp(*LOG_VAR_RANGE), F.log_softmax(self.prior_logits, -1)

    def terms(self, x, log_lib, eps) -> dict[str, torch.Tensor]:
        xin = encoder_input(x, log_lib, self.decoder.counts)
        if self.pretraining:
            m, log_v = self.encoder(xin, cond=False)
            z = m + torch.exp(0.5 * log_v) * eps[:, 0]
            return {"recon": self.decoder.log_px(x, z, log_lib), "kl": gaussian_kl(m, log_v),
                    "kl_extra": torch.zeros_like(m[:, 0])}
        log_qy = F.log_softmax(self.y_encoder(xin), dim=-1)                      # (B, C)
        m, log_v = self.encoder(xin)                                             # (B, C, K)
        z = m + torch.exp(0.5 * log_v) * eps
        recon_y = self.decoder.log_px(x.unsqueeze(-2), z, log_lib.unsqueeze(-2))  # (B, C)
        mu, log_var, log_py = self.prior()
        kl_z = gaussian_kl(m, log_v, mu, log_var)                                # (B, C, K)
        qy = log_qy.exp()
        return {"recon": (qy * recon_y).sum(-1), "kl": (qy.unsqueeze(-1) * kl_z).sum(-2),
                "kl_extra": (qy * (log_qy - log_py)).sum(-1), "log_qy": log_qy, "recon_y": recon_y, "kl_z": kl_z}

    def placement_terms(self, x, log_lib, eps) -> tuple[torch.Tensor, torch.Tensor]:
        """The ELBO per cell while every ``q(z | x, y)`` is the pre-trained ``q(z | x)`` (as after the placement)
        and ``q(y | x)`` is the best one for it, ``q*(y | x) ~ p(y) exp(-KL(q(z | x) || p(z | y)))``: then eq. 8
        is ``E_q log p(x | z) + log sum_y p(y) exp(-KL(q(z | x) || p(z | y)))``. Returns it and ``log q*``."""
        m, log_v = self.encoder(encoder_input(x, log_lib, self.decoder.counts), cond=False)
        recon = self.decoder.log_px(x, m + torch.exp(0.5 * log_v) * eps[:, 0], log_lib)
        joint = self._joint(m, log_v)
        evidence = torch.logsumexp(joint, -1)
        return recon + evidence, joint - evidence.unsqueeze(-1)

    def _joint(self, m, log_v) -> torch.Tensor:
        """``log p(y) - KL(N(m, e^log_v) || p(z | y))``, cells x clusters."""
        mu, log_var, log_py = self.prior()
        return log_py - gaussian_kl(m.unsqueeze(-2), log_v.unsqueeze(-2), mu, log_var).sum(-1)

    def latent(self, x, log_lib) -> dict[str, torch.Tensor]:
        xin = encoder_input(x, log_lib, self.decoder.counts)
        if self.pretraining:
            return {"mean": self.encoder(xin, cond=False)[0]}
        qy = F.softmax(self.y_encoder(xin), dim=-1)
        m, _ = self.encoder(xin)
        return {"mean": (qy.unsqueeze(-1) * m).sum(-2), "probs": qy}


#: epochs, and learning-rate multiplier, of fitting ``q(y | x)`` to the placed mixture's responsibilities
QY_EPOCHS, QY_LR_FACTOR = 10, 10.0


@torch.no_grad()
def _placement_elbo(net: _GMVAENet, rows, idx, eps, chunk: int = 1024) -> torch.Tensor:
    """:meth:`_GMVAENet.placement_terms`' ELBO of the cells ``idx`` (noise ``eps``), in evaluation mode."""
    net.eval()
    out = [net.placement_terms(*rows(idx[i:i + chunk]), eps[i:i + chunk])[0] for i in range(0, len(idx), chunk)]
    net.train()
    return torch.cat(out)


def _responsibilities(net: _GMVAENet, x, log_lib) -> torch.Tensor:
    """``log q*(y | x)`` of :meth:`_GMVAENet.placement_terms`, without the decoder pass."""
    m, log_v = net.encoder(encoder_input(x, log_lib, net.decoder.counts), cond=False)
    return F.log_softmax(net._joint(m, log_v), -1)


class GMVAE(VAE):
    """Gaussian-mixture VAE with a count likelihood (seed 004; Grønbech et al. 2020's scVAE GMVAE).

    Clusters are the mixture components: ``clusters_`` holds each cell's most probable ``y`` under ``q(y | x)``,
    ``cluster_probs_`` all of ``q(y | x)``; :meth:`predict` / :meth:`predict_proba` give them for new cells and
    :meth:`write` adds ``obs["<key>_cluster"]`` and ``obsm["<key>_cluster_probs"]``. ``transform`` gives
    ``E_q[z | x] = sum_y q(y | x) m(x, y)``; ``loadings_`` and ``relevance_`` are as for :class:`VAE` (the
    decoder's Jacobian at those means; the expected KL of ``q(z | x, y)`` from ``p(z | y)`` per dimension).

    Initialisation (``pretrain_epochs > 0``, the default). A mixture prior started at random can collapse: on the
    Kang PBMC counts (2000 cells x 2000 HVGs, 13 clusters, experiments/kang_gmvae.py) ``pretrain_epochs=0`` put
    every cell in one cluster (ARI 0.0), while on well-separated simulated clusters it also worked. So the
    network is first trained for ``pretrain_epochs`` as a plain VAE (the same encoder without ``y``, prior
    N(0, I), with the KL warm-up); then k-means (``n_init=10``) on the training cells' latent means places the
    components: ``mu_y`` = centres, ``sigma_y^2`` = within-cluster variances of the means plus the mean
    posterior variance, ``p(y)`` = cluster sizes (uniform with ``prior_weights="uniform"``); the encoder's
    per-``y`` inputs start at zero, so ``q(z | x, y)`` starts as the pre-trained ``q(z | x)``. This is done
    ``n_init`` times from fresh networks and the start with the best ELBO (seed 004, eq. 8) at the placement is
    kept, as k-means keeps its best of ``n_init`` (on the validation cells, else the training cells; with
    ``q(y | x)`` the best one there, ``q*(y | x) ~ p(y) exp(-KL(q(z | x) || p(z | y)))``, which makes the ELBO
    ``E_q log p(x | z) + log sum_y p(y) exp(-KL)``; ``init_elbos_``, ``best_init_``). The y-encoder is then
    fitted to ``q*`` (cross-entropy, ``QY_EPOCHS`` epochs) so that ``q(y | x)`` starts consistent with the
    mixture: left at random it is near uniform, every component is pulled towards all cells, and on Kang 1-4
    of the 13 components emptied (ARI 0.46-0.54 over seeds 0-9, k-means on 20 PCs 0.48-0.53); with both steps
    none did (ARI 0.51-0.55). Then the full
    ELBO is trained with early stopping as in :class:`VAE`. With ``pretrain_epochs=0`` the components start at
    ``N(0, 1)`` draws and training begins with the KL warm-up (``n_init`` unused).

    Parameters
    ----------
    n_clusters : int, mixture components C (>= 2).
    prior_weights : "learned" (default; ``p(y)`` a softmax of learned logits) or "uniform" (fixed ``1 / C``).
    pretrain_epochs : epochs of VAE pre-training before the k-means initialisation (0: none).
    n_init : starts of pre-training + placement (>= 1); the one with the best ELBO at the placement is kept.
    The others as for :class:`VAE`.
    """

    key = "gmvae"

    def __init__(self, *, n_clusters: int = 10, n_latent: int = 10, likelihood: str = "nb", hidden=(128,),
                 batch_norm: bool = False, kl_warmup: int = 10, pretrain_epochs: int = 50, n_init: int = 3,
                 prior_weights: str = "learned", lr: float = 1e-3, batch_size: int = 128, max_epochs: int = 300,
                 tol: float = 1e-4, patience: int = 10, validation_fraction: float = 0.1, n_samples: int = 1,
                 progress: bool = True, dtype: str = "float32"):
        super().__init__(n_latent=n_latent, likelihood=likelihood, hidden=hidden, batch_norm=batch_norm,
                         kl_warmup=kl_warmup, lr=lr, batch_size=batch_size, max_epochs=max_epochs, tol=tol,
                         patience=patience, validation_fraction=validation_fraction, n_samples=n_samples,
                         progress=progress, dtype=dtype)
        self.n_clusters, self.pretrain_epochs, self.n_init = n_clusters, pretrain_epochs, n_init
        self.prior_weights = prior_weights

    def _check_params(self) -> str:
        check_integer("n_clusters", self.n_clusters, 2)
        check_integer("pretrain_epochs", self.pretrain_epochs, 0)
        check_integer("n_init", self.n_init, 1)
        if self.prior_weights not in ("learned", "uniform"):
            raise ValueError(f"prior_weights must be 'learned' or 'uniform', got {self.prior_weights!r}")
        return super()._check_params()

    def _build_net(self, n_genes: int, likelihood: str) -> nn.Module:
        return _GMVAENet(n_genes, self.n_latent, self.n_clusters, self._hidden(), likelihood,
                         bool(self.batch_norm), self.prior_weights == "learned")

    def fit(self, data, layer: str | None = None, device="auto", seed: int = 0,
            use_highly_variable: bool | None = None) -> "GMVAE":
        """Fit to ``data`` as :meth:`VAE.fit`; needs at least ``n_clusters`` cells (and as many training cells
        for the k-means initialisation after pre-training)."""
        return super().fit(data, layer=layer, device=device, seed=seed, use_highly_variable=use_highly_variable)

    def _check_shape(self, n_cells: int, n_genes: int) -> None:
        """As :meth:`VAE._check_shape`, and at least ``n_clusters`` cells."""
        super()._check_shape(n_cells, n_genes)
        if n_cells < self.n_clusters:
            raise ValueError(f"n_clusters={self.n_clusters} needs at least as many cells, but the data have "
                             f"{n_cells}; use fewer clusters")

    def _run(self, task):
        """``n_init`` starts, each from a fresh network: pre-training as a plain VAE (a fixed number of epochs, KL
        warm-up included) and the mixture placed by k-means, scored by the ELBO at the placement; the best start
        is kept, its ``q(y | x)`` fitted to the mixture's responsibilities, then the GMVAE's early-stopped run
        from a fresh optimiser, ending in its best epoch's state."""
        self.init_elbos_, self.best_init_ = [], None
        if not self.pretrain_epochs:
            return super()._run(task)
        net, dev, dt = task.net, task.rows.log_lib.device, task.rows.log_lib.dtype
        idx = task.val_idx if len(task.val_idx) else task.train_idx  # the cells the fit stops on
        eps = torch.randn(net.eps_shape(len(idx)), generator=task.generator).to(dev, dt)  # the same for every start
        best = None
        for start in range(self.n_init):
            if start:
                net.load_state_dict(self._build_net(net.decoder.out.out_features, net.decoder.likelihood).state_dict())
                task.n_epochs, task.train_elbo, task.val_elbo = 0, [], []
                task.reset_optimizer()
            net.pretraining = True
            pretrained = train(task, max_epochs=self.pretrain_epochs, tol=0.0, progress=self.progress,
                               desc="GMVAE pre-training (VAE)")
            net.pretraining = False
            with one_thread(dev, enabled=task.small):
                self._place_mixture(task)
                score = float(_placement_elbo(net, task.rows, idx, eps).mean())
            log.info("GMVAE: start %d of %d, ELBO at the placement %.6g", start + 1, self.n_init, score)
            self.init_elbos_.append(score)
            if best is None or score > self.init_elbos_[best[0]]:
                best = (start, {k: v.clone() for k, v in net.state_dict().items()}, pretrained,
                        list(task.train_elbo), list(task.val_elbo), task.n_epochs)
        self.best_init_, state, pretrained, task.train_elbo, task.val_elbo, task.n_epochs = best
        net.load_state_dict(state)
        with one_thread(dev, enabled=task.small):
            self._fit_qy(task)
        task.kl_warmup = 0
        task.reset_optimizer()
        result = train(task, max_epochs=self.max_epochs, tol=self.tol, patience=self.patience,
                       progress=self.progress, desc="GMVAE", keep_best=True)
        self.converged_ = result.converged
        result.history = pretrained.history + result.history
        result.best_epoch += pretrained.n_epochs
        return result

    def _fit_qy(self, task) -> None:
        """The y-encoder alone trained for ``QY_EPOCHS`` epochs (cross-entropy, Adam at ``QY_LR_FACTOR * lr``)
        towards the placed mixture's responsibilities ``q*(y | x)`` of the training cells."""
        net = task.net
        with torch.no_grad():
            net.eval()
            target = torch.cat([_responsibilities(net, *task.rows(i)) for i in task.train_idx.split(1024)]).exp()
            net.train()
        optimizer = torch.optim.Adam(net.y_encoder.parameters(), lr=self.lr * QY_LR_FACTOR)
        for _ in range(QY_EPOCHS):
            batches = list(torch.randperm(len(task.train_idx), generator=task.generator).split(self.batch_size))
            if self.batch_norm and len(batches) > 1 and len(batches[-1]) < 2:  # batch norm needs 2 cells
                batches[-2] = torch.cat(batches[-2:])
                batches.pop()
            for b in batches:
                x, log_lib = task.rows(task.train_idx[b])
                log_q = F.log_softmax(net.y_encoder(encoder_input(x, log_lib, net.decoder.counts)), -1)
                loss = -(target[b.to(target.device)] * log_q).sum(-1).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

    @torch.no_grad()
    def _place_mixture(self, task) -> None:
        """k-means on the pre-trained latent means of the training cells -> ``mu_y``, ``sigma_y^2``, ``p(y)``."""
        from sklearn.cluster import KMeans

        net = task.net
        net.eval()
        means, variances = [], []
        for idx in task.train_idx.split(1024):
            x, log_lib = task.rows(idx)
            m, log_v = net.encoder(encoder_input(x, log_lib, net.decoder.counts), cond=False)
            means.append(m.double().cpu())
            variances.append(log_v.exp().double().cpu())
        Z, V = torch.cat(means).numpy(), torch.cat(variances).numpy()
        C = self.n_clusters
        if Z.shape[0] < C:
            raise ValueError(f"n_clusters={C} needs at least as many training cells, but {Z.shape[0]} are left "
                             "after the validation split; use fewer clusters or validation_fraction=0")
        state = int(torch.randint(2**31 - 1, (1,), generator=task.generator))
        labels = KMeans(C, n_init=10, random_state=state).fit_predict(Z)
        counts = np.bincount(labels, minlength=C).astype(np.float64)
        mu, var = np.zeros((C, Z.shape[1])), np.ones((C, Z.shape[1]))
        for c in range(C):  # C small loop over clusters; the work per cluster is whole-matrix
            members = labels == c
            if members.any():
                mu[c] = Z[members].mean(0)
                var[c] = Z[members].var(0) + V[members].mean(0)
        dev, dt = net.prior_mean.device, net.prior_mean.dtype
        net.prior_mean.copy_(torch.as_tensor(mu, device=dev, dtype=dt))
        net.prior_log_var.copy_(torch.as_tensor(np.log(np.maximum(var, 1e-4)), device=dev, dtype=dt))
        if self.prior_weights == "learned":
            weights = np.maximum(counts, 1.0) / counts.sum()
            net.prior_logits.copy_(torch.as_tensor(np.log(weights), device=dev, dtype=dt))
        log.info("GMVAE: k-means on the pre-trained latent means, cluster sizes %s", counts.astype(int).tolist())
        net.train()

    def _after_fit(self, latent, matrix) -> None:
        self._set_clusters(latent["probs"].double().cpu().numpy())

    def _set_clusters(self, probs: np.ndarray) -> None:
        index = self.factor_scores_.index
        self.cluster_probs_ = pd.DataFrame(probs, index=index, columns=pd.RangeIndex(self.n_clusters, name="cluster"))
        self.clusters_ = pd.Series(probs.argmax(1), index=index, name="cluster")
        _, log_var, log_py = self._net.prior()
        self.cluster_weights_ = pd.Series(log_py.detach().exp().double().cpu().numpy(), name="weight")

    def predict_proba(self, data, layer: str | None = None) -> pd.DataFrame:
        """``q(y | x)`` of (new) cells, cells x clusters."""
        rows, obs = self._rows(data, layer)
        probs = self._latent(rows, torch.arange(rows.n))["probs"].double().cpu().numpy()
        return pd.DataFrame(probs, index=obs, columns=pd.RangeIndex(self.n_clusters, name="cluster"))

    def predict(self, data, layer: str | None = None) -> pd.Series:
        """Each (new) cell's most probable cluster under ``q(y | x)``."""
        probs = self.predict_proba(data, layer)
        return pd.Series(probs.to_numpy().argmax(1), index=probs.index, name="cluster")

    def write(self, adata, key: str | None = None) -> None:
        """As :meth:`LatentModel.write`, plus ``obs["<key>_cluster"]`` (categorical) and
        ``obsm["<key>_cluster_probs"]``."""
        super().write(adata, key)
        key = key or self.key
        adata.obs[f"{key}_cluster"] = pd.Categorical(self.clusters_.to_numpy(), categories=range(self.n_clusters))
        adata.obsm[f"{key}_cluster_probs"] = self.cluster_probs_.to_numpy(dtype=np.float32)

    def _extra_state(self):
        meta, arrays = super()._extra_state()
        arrays["cluster_probs"] = self.cluster_probs_.to_numpy()
        meta["init_elbos"], meta["best_init"] = self.init_elbos_, self.best_init_
        return meta, arrays

    def _load_extra_state(self, meta, arrays):
        super()._load_extra_state(meta, arrays)  # checks the network against n_clusters
        elbos, best = meta.get("init_elbos", []), meta.get("best_init")  # saves before n_init lack them
        if not isinstance(elbos, list) or not all(type(v) in (int, float) for v in elbos) or not (
                best is None or (type(best) is int and 0 <= best < len(elbos))):
            raise corrupted("model.json", "has malformed init_elbos / best_init")
        self.init_elbos_, self.best_init_ = [float(v) for v in elbos], best
        expect_shapes(arrays, {"cluster_probs": (len(self.factor_scores_), self.n_clusters)})
        self._set_clusters(arrays["cluster_probs"])
