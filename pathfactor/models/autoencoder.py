"""Interpretable autoencoder: a non-linear encoder, a linear decoder whose columns are tied to gene sets (seed 001).

``z_n = f(y_n)`` (an MLP), ``y_n ≈ W z_n`` with a bias-free decoder ``W`` (G genes x K factors) whose columns are
annotated (one per gene set), sparse or dense. The loss per minibatch is the squared reconstruction error plus
``lambda0 ||z||^2``; after each optimiser step three proximal operators act on ``W``, in the seed's order:

1. soft-threshold the weights of annotated columns *outside* their gene set by ``lr * lambda_off``;
2. soft-threshold every weight of the sparse columns by ``lr * lambda_l1``;
3. group lasso: shrink each column's norm by ``lr * lambda_group`` (a column whose norm falls below that is zero).

So an annotated factor may only recruit a gene outside its set when the data push it there harder than
``lambda_off``, sparse factors stay sparse, and factors the data do not need are switched off.
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..data.genesets import annotation_mask
from ..data.inputs import as_matrix
from ..evaluate import factor_r2, orient
from ..train import Task, one_thread, train
from .base import LatentModel, factor_layout
from .persist import expect_shapes, module_shapes

__all__ = ["Autoencoder"]

log = logging.getLogger(__name__)


#: below this many multiply-adds per minibatch step (batch x genes x widest layer) training runs on one CPU thread
SMALL_STEP = 2e8


def _soft_threshold(W: torch.Tensor, t: float) -> torch.Tensor:
    return W.sign() * (W.abs() - t).clamp_min(0)


def _encoder(G: int, hidden, K: int) -> nn.Sequential:
    layers, width = [], G
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ELU()]
        width = h
    layers.append(nn.Linear(width, K))
    return nn.Sequential(*layers)


class _AutoencoderTask(Task):
    """One epoch = one pass of shuffled minibatches: an Adam step on the loss, then the proximal steps on ``W``.
    ``epoch()`` returns minus the epoch's mean loss (reconstruction + lambda0 term) for :func:`train`."""

    state_exclude = ("Y", "off")  # the data and the annotation

    def __init__(self, Y, mask, n_sparse, encoder, W, *, lambda0, lambda_off, lambda_l1, lambda_group, lr,
                 batch_size, generator):
        self.Y, self.encoder, self.W = Y, encoder, W
        self.A, self.S = mask.shape[1], n_sparse
        self.off = ~mask  # genes x annotated terms: entries the first operator shrinks
        self.lambda0, self.batch_size, self.generator = lambda0, batch_size, generator
        self.t_off, self.t_l1, self.t_group = lr * lambda_off, lr * lambda_l1, lr * lambda_group
        self.optimizer = torch.optim.Adam(list(encoder.parameters()) + [W], lr=lr)
        self.G = Y.shape[1]
        width = max([p.shape[0] for p in encoder.parameters() if p.ndim == 2] + [W.shape[1]])
        self.step_ops = min(batch_size, Y.shape[0]) * self.G * width

    def loss(self, y: torch.Tensor) -> torch.Tensor:
        z = self.encoder(y)
        r = y - z @ self.W.T
        return ((r * r).sum() + self.lambda0 * (z * z).sum()) / (y.shape[0] * self.G)

    @torch.no_grad()
    def proximal(self) -> None:
        W, A, S = self.W, self.A, self.S
        if A and self.t_off > 0:
            Wa = W[:, :A]
            Wa.copy_(torch.where(self.off, _soft_threshold(Wa, self.t_off), Wa))
        if S and self.t_l1 > 0:
            Ws = W[:, A:A + S]
            Ws.copy_(_soft_threshold(Ws, self.t_l1))
        if self.t_group > 0:
            norms = W.norm(dim=0)
            W.mul_((1 - self.t_group / norms.clamp_min(1e-30)).clamp_min(0))

    def epoch(self) -> float:
        order = torch.randperm(self.Y.shape[0], generator=self.generator).to(self.Y.device)
        self.encoder.train()
        with one_thread(self.Y.device, enabled=self.step_ops < SMALL_STEP):  # small steps stall on 2 threads
            total, count = self._pass(order)
        return -total / count

    def _pass(self, order):
        N, total, count = self.Y.shape[0], 0.0, 0
        for start in range(0, N, self.batch_size):
            y = self.Y[order[start:start + self.batch_size]]
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.loss(y)
            loss.backward()
            self.optimizer.step()
            self.proximal()
            total += float(loss.detach()) * y.shape[0]
            count += y.shape[0]
        return total, count


class Autoencoder(LatentModel):
    """Interpretable autoencoder guided by gene sets (seed 001; Rybakov et al., intercode).

    An MLP encoder maps each (centred, scaled) cell to its factor scores ``z``; a linear bias-free decoder
    ``y ≈ W z`` gives loadings that can be read like a factor model's. Annotated decoder columns are kept
    inside their gene set by a soft threshold on the genes outside it, sparse columns by an L1 threshold, and
    every column is subject to a group lasso that switches unneeded factors off (see the module docstring).

    Scale. The data are centred by their gene means and divided by one global scale ``s`` (the root mean
    per-gene variance), so the network sees data of unit typical variance whatever the input's units; the
    reported loadings are in the data's units (``W * s``), the scores are the encoder's output. Training uses
    Adam, whose steps are about ``lr`` in size whatever the gradient's scale; the thresholds ``lr * lambda`` are
    therefore relative to Adam's step: a weight survives a threshold ``lambda`` when its (minibatch-averaged)
    gradient has a signal-to-noise ratio of roughly ``lambda`` or more, so the penalties need no rescaling with
    the data's scale or the number of cells.

    Parameters
    ----------
    n_sparse, n_dense : int
        Unannotated sparse factors (L1 on every gene) and dense factors (only the group lasso).
    hidden : tuple of int
        Widths of the encoder's hidden layers (ELU activations).
    lambda0 : float
        Weight of ``||z||^2`` relative to the squared error (both per cell, divided by the number of genes).
    lambda_off, lambda_l1, lambda_group : float >= 0
        Thresholds (in units of the learning rate, see Scale) of the three proximal operators: off-annotation
        weights of annotated columns, weights of sparse columns, and column norms.
    lr : float
        Adam's learning rate.
    batch_size : int
        Cells per minibatch.
    max_epochs, tol : stop after ``max_epochs`` passes or when the epoch's mean loss changes by less than
        ``tol`` (relative) twice in a row.
    min_set_size, max_set_size : gene-set filters applied against the data's genes.
    progress : show a progress bar.
    dtype : "float32" (default) or "float64".

    How the defaults were chosen: on ``pathfactor.data.simulate.noisy_annotations`` with annotation noise 0.2
    (1000 cells x 800 genes x 20 factors and 2000 x 1000 x 30 with sigma2 = 2; mask F1 of the annotation itself
    0.80). ``lambda_off``: 0.2 -> F1 0.85 / 0.42 (off-set weights barely pruned, 38-60 % exact zeros), 0.5 ->
    0.88 / 0.98 (90-95 % zeros), 1.0 -> 0.89 / 0.88 (100 % zeros: true genes missing from a set can no longer
    join it). ``lambda_group`` on 15 real + 5 redundant (annotated, no signal) factors + 1 sparse + 1 dense
    (1000 x 800): 0.1 keeps all 5 redundant columns (F1 0.972), 1.0 zeroes 4 of 5 and keeps every real factor
    (F1 0.985), 3.0 loses a real factor; but on Kang PBMCs with Reactome (experiments/kang_slalom_vs_autoencoder.py)
    1.0 pushed the interferon-signalling factor from rank 3 to 26 by R^2 (stimulated-vs-control AUROC 0.95 ->
    0.73), so the default is 0.1; raise it to prune unsupported gene sets harder. ``lambda_l1``: 0.5 and 0.25 switched the simulated sparse factor off, 0.1 kept it but
    let it take over an annotated factor; 0.5 was kept (sparse factors are the weakest part of this model).
    ``lr`` 1e-2 and ``tol`` 1e-4 (relative change of the epoch's mean loss, twice in a row) converge in 30-200
    epochs; the stochastic loss can meet ``tol`` on an early plateau, so lower ``tol`` if a fit stops very early.

    Attributes
    ----------
    See :class:`~pathfactor.models.base.LatentModel`. ``relevance_`` is each factor's R^2, i.e. the variance of
    the centred data explained by ``z_k w_k^T`` alone (``evaluate.factor_r2``), as for the other models.
    ``loss_`` is the last epoch's mean loss, ``converged_`` whether the tolerance was met.

    References
    ----------
    Rybakov, Lotfollahi, Theis & Wolf (2020), Learning interpretable latent autoencoder representations with
    annotations of feature sets (intercode), MLCB; seed 001 (Rybakov, "Learning latent representations with
    prior information using autoencoders", 2019).
    """

    key = "autoencoder"

    def __init__(self, *, n_sparse: int = 0, n_dense: int = 0, hidden=(256,), lambda0: float = 0.1,
                 lambda_off: float = 0.5, lambda_l1: float = 0.5, lambda_group: float = 0.1, lr: float = 1e-2,
                 batch_size: int = 128, max_epochs: int = 300, tol: float = 1e-4, min_set_size: int = 15,
                 max_set_size: int = 500, progress: bool = True, dtype: str = "float32"):
        self.n_sparse, self.n_dense, self.hidden = n_sparse, n_dense, hidden
        self.lambda0, self.lambda_off, self.lambda_l1, self.lambda_group = lambda0, lambda_off, lambda_l1, lambda_group
        self.lr, self.batch_size, self.max_epochs, self.tol = lr, batch_size, max_epochs, tol
        self.min_set_size, self.max_set_size = min_set_size, max_set_size
        self.progress, self.dtype = progress, dtype

    def _check_params(self) -> None:
        def is_int(v):
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

        for name in ("n_sparse", "n_dense"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {getattr(self, name)!r}")
        hidden = self.hidden
        if isinstance(hidden, (int, np.integer)) and not isinstance(hidden, bool):
            hidden = (hidden,)
        if not isinstance(hidden, (tuple, list)) or not all(is_int(h) and h > 0 for h in hidden):
            raise ValueError(f"hidden must be a tuple of positive integers (layer widths), got {self.hidden!r}")
        for name in ("lambda0", "lambda_off", "lambda_l1", "lambda_group"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not np.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float, np.number)) or not self.lr > 0:
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not is_int(self.batch_size) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if not is_int(self.max_epochs) or self.max_epochs < 1:
            raise ValueError(f"max_epochs must be an integer >= 1, got {self.max_epochs!r}")
        if isinstance(self.tol, bool) or not isinstance(self.tol, (int, float, np.number)) or not self.tol >= 0:
            raise ValueError(f"tol must be a number >= 0, got {self.tol!r}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")

    def _hidden(self) -> tuple[int, ...]:
        h = self.hidden
        return (int(h),) if isinstance(h, (int, np.integer)) else tuple(int(v) for v in h)

    # ------------------------------------------------------------------ fit
    def fit(self, data, annotations=None, layer: str | None = None, device="auto", seed: int = 0,
            use_highly_variable: bool | None = None) -> "Autoencoder":
        """Fit to ``data`` (AnnData, DataFrame or array; cells x genes, log-normalised).

        ``annotations``: GeneSets, ``{name: genes}``, a genes x terms boolean DataFrame or a GMT/JSON path (or a
        list of them); sets are matched to the genes case-insensitively and filtered by size. The caller's data
        are not modified; call :meth:`write` to store results.
        """
        self._check_params()
        matrix, generator, dev, dt = self._begin_fit(data, layer, seed=seed, device=device,
                                                     use_highly_variable=use_highly_variable)
        N, G = matrix.shape
        mask, term_names = annotation_mask(annotations, matrix.var_names, self.min_set_size, self.max_set_size)
        A, S, D = mask.shape[1], self.n_sparse, self.n_dense
        K = A + S + D
        if K == 0:
            raise ValueError("nothing to fit: give annotations (gene sets) or ask for n_sparse / n_dense factors")
        if K >= G:
            raise ValueError(f"{K} factors need fewer than the data's {G} genes; use fewer gene sets "
                             "(e.g. raise min_set_size) or fewer unannotated factors")

        Y64 = matrix.dense(np.float64)
        gene_mean = Y64.mean(0)
        scale = float(np.sqrt(np.mean((Y64 - gene_mean) ** 2)))
        if not scale > 0:
            raise ValueError("every gene is constant across cells: nothing to fit")
        self._state = {"gene_mean": gene_mean, "scale": np.array(scale)}
        Y = torch.as_tensor(self._standardise(Y64), device=dev)
        del Y64

        encoder = _encoder(G, self._hidden(), K).to(device=dev, dtype=dt)
        # decoder start: annotated columns spread evenly over their set (unit norm), free columns small random
        W0 = torch.empty(G, K, dtype=torch.float64)
        if A:
            m = torch.as_tensor(mask, dtype=torch.float64)
            W0[:, :A] = m / m.norm(dim=0).clamp_min(1e-12)
        if S + D:
            W0[:, A:] = torch.randn(G, S + D, generator=generator, dtype=torch.float64) / np.sqrt(G)
        W = W0.to(device=dev, dtype=dt).requires_grad_(True)
        mask_t = torch.as_tensor(mask, device=dev)
        task = _AutoencoderTask(Y, mask_t, S, encoder, W, lambda0=self.lambda0, lambda_off=self.lambda_off,
                                lambda_l1=self.lambda_l1, lambda_group=self.lambda_group, lr=self.lr,
                                batch_size=self.batch_size, generator=generator)
        result = train(task, max_epochs=self.max_epochs, tol=self.tol, progress=self.progress, desc="Autoencoder")

        encoder.eval()
        self._encoder = encoder
        self._state["signs"] = np.ones(K)
        Wn = W.detach().double().cpu().numpy() * scale
        Xs = self._encode(Y)
        names, kinds = factor_layout(term_names, S, D)
        annotation = np.concatenate([mask, np.zeros((G, S + D), dtype=bool)], axis=1)
        signs = orient(Wn, annotation)
        self._state["signs"] = signs
        relevance = factor_r2(Y.double().cpu().numpy() * scale, Xs, Wn)
        self._set_results(scores=Xs * signs, loadings=Wn * signs, obs_names=matrix.obs_names,
                          var_names=matrix.var_names, factor_names=names, factor_kinds=kinds, relevance=relevance,
                          annotation=annotation if A else None, history=result.history)
        self.loss_ = -result.history[-1]
        self.converged_ = result.converged
        return self

    # ------------------------------------------------------------------ encoding
    def _standardise(self, Y64: np.ndarray) -> np.ndarray:
        s = self._state
        return ((Y64 - s["gene_mean"]) / float(s["scale"])).astype(self.dtype)

    @torch.no_grad()
    def _encode(self, Y: torch.Tensor) -> np.ndarray:
        """The encoder's output (float64 numpy, not yet oriented) for standardised data, in chunks of cells."""
        out = [self._encoder(Y[i:i + 4096]).double().cpu().numpy() for i in range(0, Y.shape[0], 4096)]
        return np.concatenate(out, axis=0)

    def transform(self, data, layer: str | None = None) -> pd.DataFrame:
        """Factor scores of new cells: the encoder's output. ``data`` must hold every gene the model was fitted on
        (matched by name; extra genes are ignored)."""
        self._check_fitted()
        matrix = as_matrix(data, layer)
        var = self.loadings_.index
        missing = var.difference(matrix.var_names)
        if len(missing):
            raise ValueError(f"{len(missing)} of the model's {len(var)} genes are missing from the new data "
                             f"(e.g. {list(missing[:3])}); transform needs the genes the model was fitted on")
        cols = matrix.var_names.get_indexer(var)
        Y = matrix.Y[:, cols]
        Y = (Y.toarray() if hasattr(Y, "toarray") else np.asarray(Y)).astype(np.float64)
        dev = next(self._encoder.parameters()).device
        X = self._encode(torch.as_tensor(self._standardise(Y), device=dev))
        return pd.DataFrame(X * self._state["signs"], index=matrix.obs_names, columns=self.loadings_.columns)

    # ------------------------------------------------------------------ save / load
    def _extra_state(self):
        params = [p.detach().cpu().numpy() for p in self._encoder.state_dict().values()]
        arrays = {f"encoder_{i}": p for i, p in enumerate(params)}
        arrays.update(self._state)
        meta = {"n_encoder_arrays": len(params), "n_genes": int(self.loadings_.shape[0]),
                "n_factors": int(self.loadings_.shape[1]), "loss": self.loss_, "converged": self.converged_}
        return meta, arrays

    def _load_extra_state(self, meta, arrays):
        (G, K), hidden = self.loadings_.shape, self._hidden()
        expect_shapes(arrays, {"gene_mean": (G,), "scale": (), "signs": (K,)})
        self._state = {k: arrays[k] for k in ("gene_mean", "scale", "signs")}
        saved = [arrays[f"encoder_{i}"] for i in range(meta["n_encoder_arrays"])]
        if len(hidden) > len(saved):  # every layer has parameters; also keeps the shape check below quick
            raise ValueError(f"hidden has {len(hidden)} layers but the saved encoder only {len(saved)} arrays")
        shapes = module_shapes(lambda: _encoder(G, hidden, K))  # before building it for real: no huge hidden
        if list(shapes.values()) != [a.shape for a in saved]:
            raise ValueError(f"the saved encoder does not match the model's hidden layers {hidden}")
        encoder = _encoder(G, hidden, K).to(dtype=getattr(torch, self.dtype))
        encoder.load_state_dict({k: torch.as_tensor(a) for k, a in zip(shapes, saved)})
        encoder.eval()
        self._encoder = encoder
        self.loss_, self.converged_ = meta["loss"], meta["converged"]
