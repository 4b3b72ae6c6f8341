"""Variational autoencoder for counts (seed 003's ELBO, seed 004's scVAE models).

Generative model (seed 004, eqs. 1, 4): ``z_n ~ N(0, I_K)``, ``x_ng | z_n ~ p(x; mu_ng, ...)`` with ``p`` one of
:mod:`pathfactor.likelihoods` (Poisson, NB, ZIP, ZINB, or Gaussian for log data). As scVI does, the decoder
gives gene *proportions*: ``log mu_ng = log softmax_g(f(z_n)) + log l_n`` with ``l_n`` the cell's observed total
count over the model's genes (the library-size offset), so the model describes which genes a cell's counts fall
on, conditional on how many it has. NB dispersion and zero-inflation logits are per gene.

Inference: ``q(z_n | x_n) = N(m(x_n), diag s^2(x_n))`` from an MLP on ``log1p(1e4 x_n / l_n)``. The ELBO per
cell (seed 003; seed 004 eq. 7) is ``E_q[log p(x_n | z)] - KL(q(z | x_n) || N(0, I))`` with the KL in closed form
and the expectation by one reparameterised sample per step; training weights the KL by ``beta`` rising linearly
from ``1 / kl_warmup`` to 1 over the first ``kl_warmup`` epochs (KL warm-up), then runs with ``beta = 1``.
"""
from __future__ import annotations

import logging
import math
import numbers

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from ..data.inputs import as_matrix
from ..likelihoods import (COUNT_LIKELIHOODS, LOG_THETA_RANGE, LOG_VAR_RANGE, PARAMETERS, check_data,
                           check_likelihood, log_prob)
from ..train import Task, one_thread, train
from .autoencoder import SMALL_STEP
from .base import LatentModel
from .persist import module_shapes

__all__ = ["VAE", "gaussian_kl"]

log = logging.getLogger(__name__)

#: counts per cell the encoder's input is scaled to (``log1p(TARGET_SUM * x / l)``)
TARGET_SUM = 1e4
#: a latent dimension is reported active when its mean KL(q || prior) exceeds this many nats
ACTIVE_KL = 0.01
#: learning-rate multiplier of the per-gene dispersion / zero-inflation / variance parameters
GENE_LR_FACTOR = 10.0
#: above this many matrix entries the data stay on the CPU (CSR or dense) and are copied a minibatch at a time
RESIDENT_ENTRIES = 2**26


def gaussian_kl(m, log_v, prior_m=None, prior_log_v=None) -> torch.Tensor:
    """``KL(N(m, e^log_v) || N(prior_m, e^prior_log_v))`` per dimension, in closed form (default prior N(0, 1))."""
    if prior_m is None:
        return 0.5 * (log_v.exp() + m * m - 1 - log_v)
    return 0.5 * (prior_log_v - log_v + (log_v.exp() + (m - prior_m) ** 2) * torch.exp(-prior_log_v) - 1)


def _flat(module: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Apply ``module`` to the last dimension of ``h`` whatever its leading dimensions (batch norm wants 2-D)."""
    out = module(h.reshape(-1, h.shape[-1]))
    return out.reshape(*h.shape[:-1], out.shape[-1])


def _act(width: int, batch_norm: bool) -> list[nn.Module]:
    return ([nn.BatchNorm1d(width)] if batch_norm else []) + [nn.ELU()]


def stack_layers(widths, batch_norm: bool) -> list[nn.Module]:
    """``Linear [BN] ELU`` from each width to the next."""
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), *_act(b, batch_norm)]
    return layers


class Encoder(nn.Module):
    """``q(z | x[, y]) = N(m, diag e^log_v)``. With ``n_cond`` the one-hot ``y`` joins the input; a linear layer
    on ``[x, y]`` is the first layer on ``x`` plus a learned vector per ``y``, which is how it is computed (one
    pass over ``x`` gives every ``y``'s output, shape ``(..., n_cond, K)``)."""

    def __init__(self, n_in: int, n_latent: int, hidden, batch_norm: bool, n_cond: int = 0):
        super().__init__()
        self.first = nn.Linear(n_in, hidden[0])
        self.cond = nn.Parameter(torch.zeros(n_cond, hidden[0])) if n_cond else None
        self.body = nn.Sequential(*_act(hidden[0], batch_norm), *stack_layers(tuple(hidden), batch_norm))
        self.head = nn.Linear(hidden[-1], 2 * n_latent)

    def forward(self, xin: torch.Tensor, cond: bool = True):
        pre = self.first(xin)
        if cond and self.cond is not None:
            pre = pre.unsqueeze(-2) + self.cond
        m, log_v = self.head(_flat(self.body, pre)).chunk(2, dim=-1)
        return m, log_v.clamp(*LOG_VAR_RANGE)


class Decoder(nn.Module):
    """``z -> `` the likelihood's location per gene (log-proportions for counts, means for the Gaussian) and its
    per-gene parameters (log-dispersion, zero-inflation logits, log-variance), clamped to finite ranges."""

    def __init__(self, n_genes: int, n_latent: int, hidden, likelihood: str, batch_norm: bool):
        super().__init__()
        widths = (n_latent, *reversed(tuple(hidden)))
        self.body = nn.Sequential(*stack_layers(widths, batch_norm))
        self.out = nn.Linear(widths[-1], n_genes)
        self.likelihood = likelihood
        self.counts = likelihood in COUNT_LIKELIHOODS
        start = {"log_theta": 0.0, "zi_logits": -2.0, "log_var": 0.0}
        for name in PARAMETERS[likelihood]:
            setattr(self, name, nn.Parameter(torch.full((n_genes,), start[name])))

    def loc(self, z: torch.Tensor) -> torch.Tensor:
        out = _flat(self.out, _flat(self.body, z))
        return F.log_softmax(out, dim=-1) if self.counts else out

    def gene_params(self) -> dict[str, torch.Tensor]:
        out = {}
        for name in PARAMETERS[self.likelihood]:
            value = getattr(self, name)
            if name == "log_theta":
                value = value.clamp(*LOG_THETA_RANGE)
            elif name == "log_var":
                value = value.clamp(*LOG_VAR_RANGE)
            else:
                value = value.clamp(-20.0, 20.0)
            out[name] = value
        return out

    def log_px(self, x, z, log_lib) -> torch.Tensor:
        """``sum_g log p(x_g | z)``; ``x`` and ``log_lib`` broadcast against ``z``'s leading dimensions."""
        offset = log_lib if self.counts else None
        return log_prob(self.likelihood, x, self.loc(z), offset=offset, **self.gene_params()).sum(-1)


def encoder_input(x: torch.Tensor, log_lib: torch.Tensor, counts: bool) -> torch.Tensor:
    """What the encoders see: ``log1p(1e4 x / l)`` for counts, the data themselves otherwise."""
    return torch.log1p(x * (TARGET_SUM * torch.exp(-log_lib))) if counts else x


class _VAENet(nn.Module):
    """The VAE's maths: ``terms`` gives the per-cell expected log-likelihood and KL per latent dimension."""

    def __init__(self, n_genes, n_latent, hidden, likelihood, batch_norm):
        super().__init__()
        self.encoder = Encoder(n_genes, n_latent, hidden, batch_norm)
        self.decoder = Decoder(n_genes, n_latent, hidden, likelihood, batch_norm)
        self.n_latent = n_latent
        self.fanout = 1  # decoder passes per cell

    def eps_shape(self, n: int) -> tuple[int, ...]:
        return (n, self.n_latent)

    def terms(self, x, log_lib, eps) -> dict[str, torch.Tensor]:
        m, log_v = self.encoder(encoder_input(x, log_lib, self.decoder.counts))
        z = m + torch.exp(0.5 * log_v) * eps
        return {"recon": self.decoder.log_px(x, z, log_lib), "kl": gaussian_kl(m, log_v),
                "kl_extra": torch.zeros_like(m[:, 0])}

    def latent(self, x, log_lib) -> dict[str, torch.Tensor]:
        m, _ = self.encoder(encoder_input(x, log_lib, self.decoder.counts))
        return {"mean": m}


class _Rows:
    """A matrix's cells as float tensors (``x``, ``log l``) on the device, a minibatch at a time; small data are
    copied to the device once, large data stay on the CPU (dense or CSR) until a batch is asked for."""

    def __init__(self, Y, device, dtype):
        lib = np.asarray(Y.sum(axis=1), dtype=np.float64).ravel()
        self.log_lib = torch.as_tensor(np.log(np.maximum(lib, 1.0)), dtype=dtype, device=device)[:, None]
        self.n, self.device, self.dtype = Y.shape[0], device, dtype
        if Y.shape[0] * Y.shape[1] <= RESIDENT_ENTRIES:
            Y = Y.toarray() if sp.issparse(Y) else Y
            self.Y = torch.as_tensor(np.asarray(Y), dtype=dtype, device=device)
        else:
            self.Y = Y

    def __call__(self, idx: torch.Tensor):
        if isinstance(self.Y, torch.Tensor):
            x = self.Y[idx.to(self.device)]
        else:
            rows = self.Y[idx.cpu().numpy()]
            x = torch.as_tensor(rows.toarray() if sp.issparse(rows) else rows, dtype=self.dtype, device=self.device)
        return x, self.log_lib[idx.to(self.device)]


class _VAETask(Task):
    """One epoch = one pass of shuffled minibatches with an Adam step on ``-(recon - beta KL)``. ``epoch()``
    returns the training cells' mean ELBO, or with validation cells their ELBO (one fixed noise draw); the
    engine keeps the best epoch's state (``train(..., keep_best=True)``)."""

    #: the data, the split, the fixed noise, and the per-epoch logs (kept whole when the best state returns)
    state_exclude = ("rows", "train_idx", "val_idx", "val_eps", "train_elbo", "val_elbo")

    def __init__(self, net, rows, train_idx, val_idx, *, lr, batch_size, kl_warmup, generator, batch_norm):
        self.net, self.rows, self.train_idx, self.val_idx = net, rows, train_idx, val_idx
        self.batch_size, self.kl_warmup, self.generator, self.batch_norm = batch_size, kl_warmup, generator, batch_norm
        self.lr = lr
        self.reset_optimizer()
        self.n_epochs = 0
        self.train_elbo, self.val_elbo = [], []
        dev, dt = rows.log_lib.device, rows.log_lib.dtype
        self.val_eps = torch.randn(net.eps_shape(len(val_idx)), generator=generator).to(dev, dt)
        step = min(batch_size, len(train_idx)) * net.decoder.out.out_features * net.decoder.out.in_features
        self.small = step * net.fanout < SMALL_STEP  # small steps stall on 2 shared threads

    def reset_optimizer(self) -> None:
        """Adam; the per-gene likelihood parameters (one number each, moved by every minibatch) step
        ``GENE_LR_FACTOR`` times faster than the network's weights."""
        gene = set(PARAMETERS[self.net.decoder.likelihood])
        named = [(n, p) for n, p in self.net.named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in named if n.split(".")[-1] not in gene], "lr": self.lr},
                  {"params": [p for n, p in named if n.split(".")[-1] in gene], "lr": self.lr * GENE_LR_FACTOR}]
        self.optimizer = torch.optim.Adam([g for g in groups if g["params"]])

    def beta(self) -> float:
        return 1.0 if self.kl_warmup == 0 else min(1.0, (self.n_epochs + 1) / self.kl_warmup)

    def epoch(self) -> float:
        with one_thread(self.rows.log_lib.device, enabled=self.small):
            value = self._epoch()
        self.n_epochs += 1
        return value

    def _epoch(self) -> float:
        beta, net = self.beta(), self.net
        net.train()
        order = self.train_idx[torch.randperm(len(self.train_idx), generator=self.generator)]
        batches = list(order.split(self.batch_size))
        if self.batch_norm and len(batches) > 1 and len(batches[-1]) < 2:  # batch norm needs 2 cells
            batches[-2] = torch.cat(batches[-2:])
            batches.pop()
        total, count = 0.0, 0
        for idx in batches:
            x, log_lib = self.rows(idx)
            eps = torch.randn(net.eps_shape(len(idx)), generator=self.generator).to(x.device, x.dtype)
            t = net.terms(x, log_lib, eps)
            kl = t["kl"].sum(-1) + t["kl_extra"]
            loss = -(t["recon"] - beta * kl).mean()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total += float((t["recon"] - kl).detach().sum())
            count += len(idx)
        self.train_elbo.append(total / count)
        if not len(self.val_idx):
            return self.train_elbo[-1]
        value = float(evaluate_elbo(net, self.rows, self.val_idx, self.val_eps).mean())
        self.val_elbo.append(value)
        return value


@torch.no_grad()
def evaluate_elbo(net, rows, idx, eps, chunk: int = 1024) -> torch.Tensor:
    """Per-cell ELBO (beta = 1) of the cells ``idx`` with the given noise ``eps`` (first dimension: cells), in
    evaluation mode (batch norm uses its running statistics)."""
    was_training = net.training
    net.eval()
    out = []
    for start in range(0, len(idx), chunk):
        x, log_lib = rows(idx[start:start + chunk])
        t = net.terms(x, log_lib, eps[start:start + chunk])
        out.append(t["recon"] - t["kl"].sum(-1) - t["kl_extra"])
    net.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)) and math.isfinite(v)


def check_integer(name, value, minimum):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


class VAE(LatentModel):
    """Variational autoencoder with a count likelihood (seeds 003 and 004; scVI-style decoder).

    See the module docstring for the model. Training: Adam on minibatches, KL warm-up, then early stopping on
    held-out cells: ``validation_fraction`` of the cells (seeded) are not trained on; after every epoch their
    ELBO is computed (one fixed noise draw), and training stops when it has not improved by more than ``tol``
    (relative) for ``patience`` epochs; the parameters of the best epoch are kept. With
    ``validation_fraction=0`` it stops on the training ELBO's relative change instead.

    Parameters
    ----------
    n_latent : int, latent dimensions K.
    likelihood : "nb" (default), "poisson", "zip", "zinb" (raw counts) or "gaussian" (log-normalised data).
    hidden : tuple of int, hidden layer widths of the encoder (the decoder mirrors them); ELU activations.
    batch_norm : batch normalisation after each hidden layer.
    kl_warmup : epochs over which the KL weight rises linearly to 1 (0: no warm-up).
    lr, batch_size : Adam's learning rate and cells per minibatch.
    max_epochs, tol, patience, validation_fraction : stopping, as above.
    n_samples : reparameterised samples per cell when :meth:`elbo` estimates ``E_q[log p(x | z)]``.
    progress : show a progress bar. dtype : "float32" (default) or "float64".

    Attributes
    ----------
    ``factor_scores_``: posterior means ``m(x_n)`` (what :meth:`transform` gives). ``loadings_``: the decoder is
    non-linear, so there are no loadings in the linear-model sense; ``loadings_`` is its linearisation, the
    Jacobian ``d loc_g / d z_k`` averaged over the fitted cells' posterior means, where ``loc`` is the log
    proportion (log-mean minus log library) for counts and the mean for the Gaussian: a unit step along ``z_k``
    changes gene ``g``'s log-mean by about ``W_gk`` near the data. ``relevance_``: mean
    ``KL(q(z_k | x) || p(z_k))`` in nats per latent dimension (``relevance_measure``); dimensions below
    ``ACTIVE_KL`` nats carry no information and are flagged inactive (``active_``). ``elbo_``: mean per-cell
    ELBO of the fitted cells; ``validation_elbo_``, ``train_elbo_``: per-epoch curves; ``best_epoch_``;
    ``dispersion_`` (NB theta per gene) and ``zero_inflation_`` (probability per gene) where the likelihood
    has them.

    References
    ----------
    Kingma & Welling (2014), Auto-encoding variational Bayes; Lopez et al. (2018), scVI; Grønbech et al. (2020),
    scVAE (reviewed in seed 004).
    """

    key = "vae"
    relevance_measure = "KL (nats)"

    def __init__(self, *, n_latent: int = 10, likelihood: str = "nb", hidden=(128,), batch_norm: bool = False,
                 kl_warmup: int = 10, lr: float = 1e-3, batch_size: int = 128, max_epochs: int = 300,
                 tol: float = 1e-4, patience: int = 10, validation_fraction: float = 0.1, n_samples: int = 1,
                 progress: bool = True, dtype: str = "float32"):
        self.n_latent, self.likelihood, self.hidden, self.batch_norm = n_latent, likelihood, hidden, batch_norm
        self.kl_warmup, self.lr, self.batch_size, self.max_epochs = kl_warmup, lr, batch_size, max_epochs
        self.tol, self.patience, self.validation_fraction = tol, patience, validation_fraction
        self.n_samples, self.progress, self.dtype = n_samples, progress, dtype

    # ------------------------------------------------------------------ checks
    def _hidden(self) -> tuple[int, ...]:
        h = self.hidden
        h = (h,) if isinstance(h, numbers.Integral) and not isinstance(h, bool) else h
        if not isinstance(h, (tuple, list)) or not h or not all(
                isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0 for v in h):
            raise ValueError("hidden must be a non-empty tuple of positive integers (layer widths), "
                             f"got {self.hidden!r}")
        return tuple(int(v) for v in h)

    def _check_params(self) -> str:
        check_integer("n_latent", self.n_latent, 1)
        self._hidden()
        for name, minimum in (("kl_warmup", 0), ("batch_size", 1), ("max_epochs", 1), ("patience", 1),
                              ("n_samples", 1)):
            check_integer(name, getattr(self, name), minimum)
        if not _is_real(self.lr) or self.lr <= 0:
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not _is_real(self.tol) or not 0 <= self.tol < 1:
            raise ValueError(f"tol must be a number in [0, 1), got {self.tol!r}")
        if not _is_real(self.validation_fraction) or not 0 <= self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in [0, 1), got {self.validation_fraction!r}")
        if not isinstance(self.batch_norm, (bool, np.bool_)):
            raise ValueError(f"batch_norm must be True or False, got {self.batch_norm!r}")
        if self.batch_norm and self.batch_size < 2:
            raise ValueError(f"batch_norm=True needs batch_size >= 2 (batch statistics of one cell are undefined), "
                             f"got batch_size={self.batch_size}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
        return check_likelihood(self.likelihood)

    # ------------------------------------------------------------------ hooks for subclasses
    def _build_net(self, n_genes: int, likelihood: str) -> nn.Module:
        return _VAENet(n_genes, self.n_latent, self._hidden(), likelihood, bool(self.batch_norm))

    def _run(self, task):
        """The KL warm-up epochs, then early stopping on the best objective; the task ends in its best epoch's
        state. Returns the engine's result (``best_epoch`` 0: the run ended within the warm-up)."""
        result = train(task, max_epochs=self.max_epochs, tol=self.tol, patience=self.patience,
                       progress=self.progress, desc=type(self).__name__, warmup=self.kl_warmup, keep_best=True)
        self.converged_ = result.converged
        return result

    # ------------------------------------------------------------------ fit
    def fit(self, data, layer: str | None = None, device="auto", seed: int = 0,
            use_highly_variable: bool | None = None) -> "VAE":
        """Fit to ``data`` (AnnData, DataFrame, array or sparse; cells x genes): raw counts for the count
        likelihoods (non-negative integers, else ``ValueError``), log-normalised data for "gaussian". The
        caller's data are not modified; :meth:`write` stores results."""
        likelihood = self._check_params()
        matrix, generator, dev, dt = self._begin_fit(data, layer, seed=seed, device=device,
                                                     use_highly_variable=use_highly_variable,
                                                     gaussian=likelihood == "gaussian")
        check_data(matrix, likelihood)
        N, G = matrix.shape
        self._check_shape(N, G)
        n_val = int(round(self.validation_fraction * N)) if N >= 10 else 0
        need = 2 if self.batch_norm else 1
        if N - n_val < need:
            raise ValueError(f"validation_fraction={self.validation_fraction} leaves {N - n_val} of the {N} cells "
                             f"for training, but {need} are needed{' (batch_norm)' if need == 2 else ''}; "
                             "lower validation_fraction")
        rows = _Rows(matrix.Y, dev, dt)
        perm = torch.randperm(N, generator=generator)
        val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:].sort().values
        net = self._build_net(G, likelihood).to(device=dev, dtype=dt)
        task = _VAETask(net, rows, train_idx, val_idx, lr=self.lr, batch_size=self.batch_size,
                        kl_warmup=self.kl_warmup, generator=generator, batch_norm=bool(self.batch_norm))
        result = self._run(task)
        history = result.history
        net.eval()
        self._net, self._likelihood = net, likelihood
        self.train_elbo_, self.validation_elbo_, self.best_epoch_ = task.train_elbo, task.val_elbo, result.best_epoch
        all_idx = torch.arange(N)
        with self._one_thread(N):
            with torch.no_grad():
                latent = self._latent(rows, all_idx)
                eps = torch.randn(net.eps_shape(N), generator=generator).to(dev, dt)
                self.elbo_ = float(evaluate_elbo(net, rows, all_idx, eps).mean())
                kl = torch.cat([net.terms(*rows(i), eps[i])["kl"] for i in all_idx.split(1024)]).mean(0)
            loadings = self._jacobian(latent["mean"])
        self._set_results(scores=latent["mean"].double().cpu().numpy(), loadings=loadings,
                          obs_names=matrix.obs_names, var_names=matrix.var_names, factor_names=self._factor_names(),
                          factor_kinds=["latent"] * self.n_latent, relevance=kl.double().cpu().numpy(),
                          history=history)
        self.active_ = (self.relevance_ > ACTIVE_KL).rename("active")
        self._gene_attributes()
        self._after_fit(latent, matrix)
        return self

    def _check_shape(self, n_cells: int, n_genes: int) -> None:
        """Raise if the data's shape cannot carry the model's latent dimensions."""
        if self.n_latent >= n_genes:
            raise ValueError(f"n_latent={self.n_latent} needs fewer latent dimensions than the data's {n_genes} genes")

    def _after_fit(self, latent, matrix) -> None:
        pass

    def _factor_names(self) -> list[str]:
        return [f"z{k}" for k in range(1, self.n_latent + 1)]

    def _gene_attributes(self) -> None:
        params = {k: v.detach().double().cpu().numpy() for k, v in self._net.decoder.gene_params().items()}
        index = self.loadings_.index
        self.dispersion_ = pd.Series(np.exp(params["log_theta"]), index=index, name="theta") \
            if "log_theta" in params else None
        self.zero_inflation_ = pd.Series(1 / (1 + np.exp(-params["zi_logits"])), index=index, name="pi") \
            if "zi_logits" in params else None

    def _one_thread(self, n_cells: int):
        """Passes of the fitted network over ``n_cells`` cells run on one CPU thread when they are small, as the
        training epochs do (small steps stall on 2 shared threads)."""
        out = self._net.decoder.out
        step = min(n_cells, 1024) * out.in_features * out.out_features * self._net.fanout
        return one_thread(next(self._net.parameters()).device, enabled=step < SMALL_STEP)

    @torch.no_grad()
    def _latent(self, rows, idx) -> dict[str, torch.Tensor]:
        self._net.eval()
        with self._one_thread(len(idx)):
            parts = [self._net.latent(*rows(i)) for i in idx.split(1024)]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def _jacobian(self, Z: torch.Tensor) -> np.ndarray:
        """Mean over the rows of ``Z`` of ``d loc / d z`` (genes x K). Each column ``J e_k`` comes from the vector-
        Jacobian product ``g(u) = J^T u`` (linear in a dummy ``u``) differentiated with respect to ``u`` along
        ``e_k``: reverse mode only, ``K + 1`` backward passes per chunk of cells."""
        decoder = self._net.decoder
        total = torch.zeros(decoder.out.out_features, Z.shape[1], dtype=torch.float64, device=Z.device)
        with torch.enable_grad():
            for z in Z.detach().split(1024):
                z = z.clone().requires_grad_(True)
                out = decoder.loc(z)
                u = torch.zeros_like(out, requires_grad=True)
                (g,) = torch.autograd.grad(out, z, u, create_graph=True)
                for k in range(Z.shape[1]):
                    (d,) = torch.autograd.grad(g[:, k].sum(), u, retain_graph=k < Z.shape[1] - 1)
                    total[:, k] += d.double().sum(0)
        return (total / Z.shape[0]).cpu().numpy()

    # ------------------------------------------------------------------ new cells
    def _rows(self, data, layer):
        """New data checked and aligned to the model's genes (extra genes are ignored), as ``_Rows``."""
        self._check_fitted()
        matrix = as_matrix(data, layer, new_cells=True)
        var = self.loadings_.index
        missing = var.difference(matrix.var_names)
        if len(missing):
            raise ValueError(f"{len(missing)} of the model's {len(var)} genes are missing from the new data "
                             f"(e.g. {list(missing[:3])}); pass data with the genes the model was fitted on")
        Y = matrix.Y[:, matrix.var_names.get_indexer(var)]
        check_data(type(matrix)(Y, matrix.obs_names, var), self._likelihood)
        p = next(self._net.parameters())
        return _Rows(Y, p.device, p.dtype), matrix.obs_names

    def transform(self, data, layer: str | None = None) -> pd.DataFrame:
        """Posterior means ``E_q[z | x]`` of (new) cells; needs the genes the model was fitted on."""
        rows, obs = self._rows(data, layer)
        Z = self._latent(rows, torch.arange(rows.n))["mean"]
        return pd.DataFrame(Z.double().cpu().numpy(), index=obs, columns=self.loadings_.columns)

    def elbo(self, data, layer: str | None = None, n_samples: int | None = None, seed: int = 0) -> pd.Series:
        """Per-cell ELBO (nats, ``beta = 1``) of (new) cells: ``E_q[log p(x | z)]`` averaged over ``n_samples``
        reparameterised draws (default the model's ``n_samples``) minus the closed-form KL. For count
        likelihoods it is a lower bound on ``log p(x_n | l_n)``, the cell's counts given its library size."""
        n_samples = self.n_samples if n_samples is None else n_samples
        check_integer("n_samples", n_samples, 1)
        if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        rows, obs = self._rows(data, layer)
        generator = torch.Generator().manual_seed(int(seed))
        idx = torch.arange(rows.n)
        p = next(self._net.parameters())
        total = torch.zeros(rows.n, dtype=torch.float64, device=p.device)
        with self._one_thread(rows.n):
            for _ in range(n_samples):
                eps = torch.randn(self._net.eps_shape(rows.n), generator=generator).to(p.device, p.dtype)
                total += evaluate_elbo(self._net, rows, idx, eps).double()
        return pd.Series((total / n_samples).cpu().numpy(), index=obs, name="elbo")

    # ------------------------------------------------------------------ save / load
    def _extra_state(self):
        state = self._net.state_dict()
        arrays = {f"net_{i}": v.detach().cpu().numpy() for i, v in enumerate(state.values())}
        meta = {"net_keys": list(state.keys()), "n_genes": int(self.loadings_.shape[0]),
                "likelihood": self._likelihood, "elbo": self.elbo_, "train_elbo": self.train_elbo_,
                "validation_elbo": self.validation_elbo_, "best_epoch": self.best_epoch_,
                "converged": self.converged_}
        return meta, arrays

    def _load_extra_state(self, meta, arrays):
        keys, hidden, likelihood = meta["net_keys"], self._hidden(), check_likelihood(meta["likelihood"])
        saved = [arrays[f"net_{i}"] for i in range(len(keys))]
        if len(hidden) > len(saved):  # every layer has parameters; also keeps the shape check below quick
            raise ValueError(f"hidden has {len(hidden)} layers but the saved network only {len(saved)} arrays")
        build = lambda: self._build_net(self.loadings_.shape[0], likelihood)  # noqa: E731
        # the parameters' network must be the saved one before it is built for real (no huge hidden / n_latent)
        if list(module_shapes(build).items()) != [(k, a.shape) for k, a in zip(keys, saved)]:
            raise ValueError("the saved network does not match the model's parameters (hidden, n_latent, ...)")
        net = build().to(dtype=getattr(torch, self.dtype))
        net.load_state_dict({k: torch.as_tensor(a) for k, a in zip(keys, saved)})
        net.eval()
        self._net, self._likelihood = net, likelihood
        self.elbo_, self.train_elbo_, self.validation_elbo_ = meta["elbo"], meta["train_elbo"], meta["validation_elbo"]
        self.best_epoch_, self.converged_ = meta["best_epoch"], meta["converged"]
        self.active_ = (self.relevance_ > ACTIVE_KL).rename("active")
        self._gene_attributes()
