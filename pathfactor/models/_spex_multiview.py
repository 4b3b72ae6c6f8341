"""Spex on several views, with missing entries and Bernoulli / negative binomial views (``_spex_views``).

The user face of the multi-view fit: reading the views (``data.views``), per-view likelihoods, gene sets, units and
starts, the results (loadings per view, the factors x views relevance table), ``impute``, ``transform`` of new
cells with missing entries, writing into a MuData and saving. ``Spex`` inherits it.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import torch

from ..data.genesets import annotation_mask
from ..data.stream import TensorRows, initial_factors
from ..data.inputs import covariate_design
from ..data.views import Views, is_mudata, is_multiview, per_view, read_views
from ..evaluate import orient
from ..train import fingerprint, resolve_device, seed_everything, train
from ._spex_nb import moment_dispersion
from ._spex_views import SpexViews
from .base import factor_layout

#: the NB dispersion is estimated once (method of moments) and kept within these bounds
DISPERSION_RANGE = (0.1, 100.0)
#: spellings of the view likelihoods
_ALIASES = {"gaussian": "normal", "normal": "normal", "nb": "nb", "bernoulli": "bernoulli", "poisson": "poisson"}


def view_likelihoods(likelihood, names: list[str]) -> dict:
    """Each view's likelihood (``"normal"``, ``"nb"``, ``"poisson"`` or ``"bernoulli"``) from a name or ``{view: name}``
    (views left out: ``"normal"``)."""
    out = {}
    for view, lik in per_view(likelihood, names, "likelihood", default="normal").items():
        if lik not in _ALIASES:
            raise ValueError(f"likelihood of view {view!r} must be one of 'normal' ('gaussian'), 'nb', 'poisson', "
                             "'bernoulli'; "
                             f"got {lik!r}")
        out[view] = _ALIASES[lik]
    return out


def check_view_weights(value) -> None:
    """``view_weights``: None, "balanced" or {view: positive number}."""
    if value is None or value == "balanced":
        return
    positive = lambda w: isinstance(w, (int, float)) and not isinstance(w, bool) and np.isfinite(w) and w > 0  # noqa: E731
    if not isinstance(value, dict) or not all(positive(w) for w in value.values()):
        raise ValueError(f"view_weights must be None, 'balanced' or {{view: positive number}}, got {value!r}")


def _weights(value, names: list[str], observed_per_view: list[int]) -> np.ndarray:
    """Each view's likelihood power (see ``Spex``'s ``view_weights``)."""
    if value is None:
        return np.ones(len(names))
    if value == "balanced":
        n = np.asarray(observed_per_view, dtype=float)
        return n.mean() / np.maximum(n, 1)
    return np.array([float(w) for w in per_view(value, names, "view_weights", default=1.0).values()])


def needs_views(data, likelihood, allow_missing: bool) -> bool:
    """Whether a fit goes to the multi-view engine: several views, a likelihood per view or a Bernoulli one, or
    missing entries allowed."""
    return (is_multiview(data) or isinstance(likelihood, dict) or likelihood in ("bernoulli", "poisson")
            or bool(allow_missing))


def _checked_view(name: str, Y: np.ndarray, lik: str, allow_missing: bool) -> np.ndarray:
    """The observed mask of one view after checking its values against its likelihood."""
    observed = np.isfinite(Y)
    if not observed.all() and not allow_missing:
        raise ValueError(f"view {name!r} has {int((~observed).sum())} missing (NaN) entries; pass "
                         "allow_missing=True (CLI --allow-missing) to fit them as missing, or remove them")
    values = Y[observed]
    if lik in ("nb", "poisson") and values.size and (
            (values < 0).any() or np.abs(values - np.round(values)).max() > 1e-4):
        what = "negative binomial" if lik == "nb" else "Poisson"
        raise ValueError(f"view {name!r} has the {what} likelihood but its values are not non-negative "
                         "integer counts; pass raw counts (layer=) or use likelihood 'normal' for it")
    if lik == "bernoulli" and values.size and not np.isin(values, (0.0, 1.0)).all():
        raise ValueError(f"view {name!r} has the Bernoulli likelihood but holds values other than 0 and 1; "
                         "binarise it (e.g. (x > 0).astype(float)) or use another likelihood")
    never = ~observed.any(0)
    if never.any():
        raise ValueError(f"view {name!r} has {int(never.sum())} features never observed (all NaN); drop them")
    return observed


def library_offsets(library: np.ndarray, reference: float, n_features: int) -> np.ndarray:
    """The NB offsets log(library / reference) of each cell, for each of a view's ``n_features`` (N x n_features);
    a cell with no counts in the view counts as half a count."""
    return np.log(np.maximum(library, 0.5) / reference)[:, None] * np.ones((1, n_features))


class _ViewPrep:
    """One view made ready for the engine: working values, units, offsets, dispersions and a start matrix."""

    def __init__(self, name: str, Y: np.ndarray, observed: np.ndarray, lik: str):
        self.name, self.lik = name, lik
        n, g = Y.shape
        self.mean, self.unit, self.sd = np.zeros(g), np.ones(g), 1.0
        self.offset = self.dispersion = None
        self.library_reference = 1.0
        filled = np.where(observed, Y, 0.0)
        counts = observed.sum(0).clip(min=1)
        if lik == "normal":
            self.mean = filled.sum(0) / counts
            var = (np.where(observed, Y - self.mean, 0.0) ** 2).sum(0) / np.maximum(counts - 1, 1)
            sd = float(np.sqrt(var.mean()))
            unit = 2.0 ** round(math.log2(sd)) if sd > 0 else 1.0
            self.unit[:] = unit
            self.sd = max(sd / unit, 1e-12)
            self.values = np.where(observed, (Y - self.mean) / unit, 0.0)
            start = self.values
        elif lik == "nb":
            library = filled.sum(1)
            measured = observed.any(1)
            ref = library[measured & (library > 0)].mean() if (measured & (library > 0)).any() else 1.0
            self.library_reference = float(ref)
            self.offset = library_offsets(library, ref, g)
            rows = measured & (library > 0)
            r = moment_dispersion(torch.as_tensor(filled[rows]), torch.as_tensor(library[rows]),
                                  *DISPERSION_RANGE)
            self.dispersion = r.numpy()
            self.values = filled
            logged = np.log1p(filled / np.maximum(library, 1)[:, None] * np.median(library[rows]))
            start = np.where(observed, logged - (logged * observed).sum(0) / counts, 0.0)
        elif lik == "poisson":
            self.values = filled
            logged = np.log1p(filled)
            start = np.where(observed, logged - (logged * observed).sum(0) / counts, 0.0)
        else:
            self.values = filled
            start = np.where(observed, filled - filled.sum(0) / counts, 0.0)
        total = float((start**2).sum())
        self.start = start / math.sqrt(total / n) if total > 0 else start   # each view's start has total variance 1


def view_masks(views: Views, sets: dict, min_size: int, max_size: int, min_fraction: float):
    """The features x terms mask of the views' gene sets (``sets``: one annotation per view, or None) and the term
    names; a term found in several views is one factor, annotated in each."""
    masks, terms = [], []
    for name, var_names in zip(views.names, views.var_names):
        mask, found = annotation_mask(sets[name], var_names, min_size, max_size, min_fraction)
        masks.append((mask, found))
        terms += [t for t in found if t not in terms]
    G = sum(views.sizes)
    mask = np.zeros((G, len(terms)), dtype=bool)
    for (m, found), rows in zip(masks, np.split(np.arange(G), np.cumsum(views.sizes)[:-1])):
        for j, t in enumerate(found):
            mask[rows, terms.index(t)] = m[:, j]
    return mask, terms


def _annotations(annotations, names: list[str]) -> dict:
    if annotations is None:
        return {n: None for n in names}
    if isinstance(annotations, dict) and set(map(str, annotations)) <= set(names) and len(names) > 1:
        return per_view(annotations, names, "annotations")
    if len(names) > 1:
        raise ValueError("with several views, give annotations per view: annotations={view: gene_sets} (a view "
                         f"without sets gets unannotated factors only); views: {names}")
    return {names[0]: annotations}


class MultiViewSpex:
    """The multi-view half of :class:`~pathfactor.models.Spex` (see its ``fit``)."""

    def _fit_views(self, data, annotations, layer, covariates, device, seed, checkpoint_dir, use_highly_variable,
                   allow_missing):
        if self.batch_size is not None or self.posterior != "blocked":
            raise ValueError("several views, missing entries and Bernoulli views are fitted with all cells at once "
                             "and the blocked posterior: leave batch_size=None and posterior='blocked'")
        seed_everything(seed)
        dev, dt = resolve_device(device), getattr(torch, self.dtype)
        views = read_views(data, layer, use_highly_variable)
        names, N = views.names, len(views.obs_names)
        liks = view_likelihoods(self.likelihood, names)
        sets = _annotations(annotations, names)
        preps, observed = [], []
        for name, Y in zip(names, views.matrices):
            obs = _checked_view(name, Y, liks[name], allow_missing)
            observed.append(obs)
            preps.append(_ViewPrep(name, Y, obs, liks[name]))
        weights = _weights(self.view_weights, names, [int(o.sum()) for o in observed])
        observed = np.concatenate(observed, 1)
        if not observed.any(1).all():
            warnings.warn(f"{int((~observed.any(1)).sum())} cells have no observed entry in any view; their factors "
                          "are the prior's (zero)", UserWarning, stacklevel=3)
        G = observed.shape[1]
        view_of = np.repeat(np.arange(len(names)), views.sizes)
        mask, terms = view_masks(views, sets, self.min_set_size, self.max_set_size, self.min_set_fraction)
        A, H = len(terms), self.n_sparse + self.n_dense
        K = A + H
        if K == 0:
            raise ValueError("nothing to fit: give annotations (gene sets) or ask for n_sparse / n_dense factors")
        Z, covariate_names = covariate_design(views.obs, covariates, N)
        Zt = torch.as_tensor(Z, dtype=torch.float64)
        z_mean = Zt.mean(0)
        Zt = (Zt - z_mean).to(dt).to(dev)
        names_k, kinds = factor_layout(terms, self.n_sparse, self.n_dense, self.dense_name)
        sd = np.concatenate([np.full(p.values.shape[1], p.sd) for p in preps])
        s = np.concatenate([np.where(mask, self.slab_in, self.slab_out), np.full((G, self.n_sparse), self.slab_sparse),
                            np.full((G, self.n_dense), self.slab_dense)], axis=1) * sd[:, None]
        tau_scale = np.array([(1.0 if self.global_scale is None else self.global_scale) * p.sd for p in preps])
        values = torch.as_tensor(np.concatenate([p.values for p in preps], 1), dtype=dt, device=dev)
        obs_t = None if observed.all() else torch.as_tensor(observed, device=dev)
        offset = None
        if any(p.offset is not None for p in preps):
            offset = torch.as_tensor(np.concatenate([p.offset if p.offset is not None else np.zeros_like(p.values)
                                                     for p in preps], 1), dtype=dt, device=dev)
        dispersion = torch.as_tensor(np.concatenate([p.dispersion if p.dispersion is not None
                                                     else np.ones(p.values.shape[1]) for p in preps]), dtype=dt)
        start = torch.as_tensor(np.concatenate([p.start for p in preps], 1), dtype=dt, device=dev)
        X0 = initial_factors(TensorRows(start, Zt), torch.as_tensor(mask, dtype=dt, device=dev), H)
        vi = SpexViews(values, obs_t, torch.as_tensor(view_of), [liks[n] for n in names], Zt,
                       torch.as_tensor(s, dtype=dt, device=dev), X0, offset=offset, dispersion=dispersion,
                       slab_confidence=self.slab_confidence, tau_scale=torch.as_tensor(tau_scale),
                       learn_tau=torch.tensor([self.global_scale is None or liks[n] == "normal" for n in names]),
                       view_weights=torch.as_tensor(weights), start=self.start)
        feature_names = (list(views.var_names[0]) if len(names) == 1
                         else [f"{n}:{g}" for n, vn in zip(names, views.var_names) for g in vn])
        owner = None
        if checkpoint_dir is not None:
            owner = fingerprint(self, n_cells=N, n_genes=G, obs_names=views.obs_names, var_names=feature_names,
                                gene_sums=np.concatenate([np.nansum(m, 0) for m in views.matrices]), seed=int(seed),
                                factors=names_k, covariates=list(covariate_names), views=names,
                                likelihoods=[liks[n] for n in names], processes=1)
        result = train(vi, max_epochs=self.max_epochs, tol=self.tol, progress=self.progress,
                       desc=type(self).__name__, checkpoint_dir=checkpoint_dir, fingerprint=owner)
        unit = np.concatenate([p.unit for p in preps])
        mean = np.concatenate([p.mean for p in preps])
        M = vi.M.double().cpu().numpy()
        S = vi.S.double().cpu().numpy()
        sdM = np.sqrt(np.clip(np.diagonal(S, axis1=1, axis2=2), 0, None))
        mu = vi.mu.double().cpu().numpy()
        annotation = np.concatenate([mask, np.zeros((G, H), dtype=bool)], axis=1)
        W = M[:, :K] * unit[:, None]
        signs = orient(W, annotation)
        C = Zt.shape[1]
        rel = view_relevance(vi, names)
        self.relevance_views_ = pd.DataFrame(rel.T, index=pd.Index(names_k, name="factor"),
                                             columns=pd.Index(names, name="view"))
        log_unit = float(np.sum(observed * np.log(unit)[None, :]))   # the ELBO of the data in their own units
        history = [v - log_unit for v in result.history]
        self._set_results(scores=mu * signs, loadings=W * signs, loadings_sd=sdM[:, :K] * unit[:, None],
                          obs_names=views.obs_names, var_names=feature_names, factor_names=names_k,
                          factor_kinds=kinds, relevance=rel.max(0), annotation=annotation if A else None,
                          covariate_effects=M[:, K:K + C] * unit[:, None],
                          covariate_effects_sd=sdM[:, K:K + C] * unit[:, None], covariate_names=covariate_names,
                          history=history)
        self.genes_left_out_ = [g for n in names for g in views.genes_left_out[n]]
        self.seed_ = seed
        self.elbo_, self.converged_ = history[-1], result.converged
        self.views_ = {n: [str(g) for g in vn] for n, vn in zip(names, views.var_names)}
        self.view_likelihoods_ = dict(liks)
        self.view_weights_ = {n: float(w) for n, w in zip(names, weights)}
        self.dispersion_views_ = dispersion.double().numpy()
        self._posterior = {"signs": signs, "M": M, "S": S, "psi": vi.sigma2.mean_inv.double().cpu().numpy(),
                           "dispersion": dispersion.double().numpy(), "feature_mean": mean, "feature_unit": unit,
                           "z_mean": z_mean.numpy(), "view_of": view_of,
                           "library_reference": np.array([p.library_reference for p in preps]),
                           "relevance_views": rel.T, "view_weights": weights}
        self._covariates = covariates if isinstance(covariates, (str, list, tuple)) else None
        self._training = views   # for impute(); not saved
        self._training_scores = (vi.mu.double().cpu().numpy(), vi.Sigma.double().cpu().numpy())
        self._no_intervention_results()
        self.intervention_levels_ = self.intervention_reference_ = self._interventions = None
        return self

    # ------------------------------------------------------------------ results
    @property
    def is_multiview_(self) -> bool:
        return getattr(self, "views_", None) is not None

    def view_loadings(self, view: str) -> pd.DataFrame:
        """The loadings of one view's features (indexed by their own names)."""
        self._check_fitted()
        if not self.is_multiview_ or view not in self.views_:
            known = list(self.views_) if self.is_multiview_ else []
            raise ValueError(f"no view {view!r} in this model (views: {known})")
        return self._view_rows(self.loadings_, view)

    def _view_rows(self, frame: pd.DataFrame, view: str) -> pd.DataFrame:
        """The rows of ``frame`` (features x factors) that belong to ``view``, indexed by the view's own names."""
        rows = np.flatnonzero(self._posterior["view_of"] == list(self.views_).index(view))
        out = frame.iloc[rows].copy()
        out.index = pd.Index(self.views_[view], name=view)
        return out

    def impute(self, data=None, layer=None):
        """The data with every missing (NaN) entry filled by its posterior predictive mean: E[y] under q (Gaussian:
        the mean; NB: r exp(o + E eta + Var eta / 2); Poisson: E[softplus(eta)] by quadrature; Bernoulli:
        E[sigmoid(eta)] by the probit approximation
        sigmoid(m / sqrt(1 + pi v / 8))). ``data=None``: the training data (in this session); otherwise new cells
        (with the fitted views and features), whose factors are computed first (:meth:`transform`). Returns an
        array for one view, ``{view: array}`` for several; observed entries are returned unchanged."""
        self._check_fitted()
        if not self.is_multiview_:
            raise ValueError("impute() needs a model fitted with allow_missing=True or several views")
        if data is None:
            views = getattr(self, "_training", None)
            if views is None:
                raise ValueError("this model was loaded from disk and holds no training data: pass impute(data)")
            mu, Sigma = self._training_scores
        else:
            views = self._aligned_views(data, layer)
            mu, Sigma = self._cell_posterior(views)
        mean = self._predictive_mean(views, mu, Sigma)
        out, start = {}, 0
        for name, Y in zip(views.names, views.matrices):
            g = Y.shape[1]
            out[name] = np.where(np.isfinite(Y), Y, mean[:, start:start + g])
            start += g
        return out[views.names[0]] if len(out) == 1 else out

    def _predictive_mean(self, views: Views, mu, Sigma) -> np.ndarray:
        post = self._posterior
        K = self.loadings_.shape[1]
        M, S = post["M"], post["S"]
        Z = self._views_design(views, mu.shape[0])
        F = np.concatenate([mu, Z, np.ones((mu.shape[0], 1))], 1)
        m = F @ M.T
        Ef = F[:, :, None] * F[:, None, :]
        Ef[:, :K, :K] += Sigma
        Eth = M[:, :, None] * M[:, None, :] + S
        v = np.clip(Ef.reshape(len(F), -1) @ Eth.reshape(len(M), -1).T - m * m, 0, None)
        out = np.empty_like(m)
        liks = [self.view_likelihoods_[n] for n in self.views_]
        kind = np.array([liks[v] for v in post["view_of"]])
        gauss, nb, bern, pois = kind == "normal", kind == "nb", kind == "bernoulli", kind == "poisson"
        out[:, gauss] = m[:, gauss] * post["feature_unit"][gauss] + post["feature_mean"][gauss]
        if nb.any():
            offset = self._count_offsets(views)
            out[:, nb] = post["dispersion"][nb] * np.exp(np.clip(offset[:, nb] + m[:, nb] + v[:, nb] / 2, None, 50))
        if bern.any():
            out[:, bern] = 1.0 / (1.0 + np.exp(-m[:, bern] / np.sqrt(1 + np.pi * v[:, bern] / 8)))
        if pois.any():  # E[softplus(eta)] by Gauss-Hermite quadrature
            nodes, weights = np.polynomial.hermite_e.hermegauss(20)
            sd = np.sqrt(v[:, pois])
            out[:, pois] = sum(w * np.logaddexp(0, m[:, pois] + sd * x) for x, w in zip(nodes, weights)) \
                / np.sqrt(2 * np.pi)
        return out

    def _count_offsets(self, views: Views) -> np.ndarray:
        """log(library / mean library) of each cell in each NB view, as in the fit (N x G)."""
        blocks = []
        for name, Y in zip(views.names, views.matrices):
            if self.view_likelihoods_[name] != "nb":
                blocks.append(np.zeros_like(Y))
                continue
            library = np.where(np.isfinite(Y), Y, 0.0).sum(1)
            ref = float(self._posterior["library_reference"][list(self.views_).index(name)])
            blocks.append(library_offsets(library, ref, Y.shape[1]))
        return np.concatenate(blocks, 1)

    def _views_design(self, views: Views, n_cells: int) -> np.ndarray:
        if self.covariate_effects_ is None:
            return np.zeros((n_cells, 0))
        from ..data.inputs import new_covariates

        holder = type("Cells", (), {"obs": views.obs})()
        return new_covariates(holder, self._covariates, n_cells, self.covariate_effects_.columns,
                              self._posterior["z_mean"], getattr(self, "covariate_levels_", None))

    def _aligned_views(self, data, layer) -> Views:
        """New cells' views with the fitted views' features in the fitted order (NaN where absent from a view)."""
        views = read_views(data if is_multiview(data) or len(self.views_) == 1 else data, layer)
        if len(self.views_) == 1 and not is_multiview(data):
            views.names = list(self.views_)
        missing_views = sorted(set(self.views_) - set(views.names))
        if missing_views:
            raise ValueError(f"the new data lack the views {missing_views}; pass every fitted view "
                             "(a view with no measurement: all NaN)")
        mats, vns = [], []
        for name, features in self.views_.items():
            i = views.names.index(name)
            have = views.var_names[i]
            lost = pd.Index(features).difference(have)
            if len(lost):
                raise ValueError(f"view {name!r} of the new data lacks {len(lost)} fitted features "
                                 f"(e.g. {list(lost[:3])})")
            mats.append(views.matrices[i][:, have.get_indexer(features)])
            vns.append(pd.Index(features))
        return Views(list(self.views_), mats, vns, views.obs_names, views.obs, {})

    def _cell_posterior(self, views: Views):
        """q(x_n) of the cells of ``views`` under the fitted loadings (unoriented)."""
        post = self._posterior
        dt = torch.float64
        Y = np.concatenate(views.matrices, 1)
        observed = np.isfinite(Y)
        values = np.where(observed, (Y - post["feature_mean"]) / post["feature_unit"], 0.0)
        offset = self._count_offsets(views)
        Z = self._views_design(views, Y.shape[0])
        liks = [self.view_likelihoods_[n] for n in self.views_]
        mu, Sigma = SpexViews.cell_posterior(
            torch.as_tensor(values, dtype=dt), None if observed.all() else torch.as_tensor(observed),
            torch.as_tensor(post["view_of"]), liks, torch.as_tensor(Z, dtype=dt), torch.as_tensor(post["M"]),
            torch.as_tensor(post["S"]), torch.as_tensor(post["psi"]), offset=torch.as_tensor(offset),
            dispersion=torch.as_tensor(post["dispersion"]), view_weights=torch.as_tensor(post["view_weights"]))
        Sigma = Sigma.numpy()
        if Sigma.shape[0] == 1:
            Sigma = np.broadcast_to(Sigma, (Y.shape[0],) + Sigma.shape[1:])
        return mu.numpy(), Sigma

    def _transform_views(self, data, layer) -> pd.DataFrame:
        views = self._aligned_views(data, layer)
        mu, _ = self._cell_posterior(views)
        return pd.DataFrame(mu * self._posterior["signs"], index=views.obs_names, columns=self.loadings_.columns)

    def _write_views(self, mdata, key: str) -> None:
        """Scores in ``mdata.obsm["X_<key>"]``, each view's loadings in ``mdata[view].varm["<key>_loadings"]``
        (and ``_loadings_sd``), the relevance table and the rest in ``mdata.uns[key]``."""
        if not is_mudata(mdata):
            raise ValueError("a multi-view model writes into the MuData it was fitted on (or a MuData with the same "
                             "cells and views); one AnnData cannot hold several views' loadings")
        if list(mdata.obs_names) != list(self.factor_scores_.index):
            raise ValueError("the MuData's cells differ from the cells the model was fitted on")
        mdata.obsm[f"X_{key}"] = self.factor_scores_.to_numpy(dtype=np.float32)
        for view in self.views_:
            if view not in mdata.mod:
                raise ValueError(f"the MuData has no view {view!r} (it has {list(mdata.mod)})")
            ad = mdata.mod[view]
            for suffix, frame in (("loadings", self.view_loadings(view)), ("loadings_sd", self._view_rows(self.loadings_sd_, view))):
                ad.varm[f"{key}_{suffix}"] = frame.reindex(ad.var_names, fill_value=0.0).to_numpy(np.float32)
        mdata.uns[key] = {
            "model": type(self).__name__, "factor_names": [str(f) for f in self.loadings_.columns],
            "factor_kinds": [str(k) for k in self.factor_kinds_], "views": list(self.views_),
            "likelihoods": [self.view_likelihoods_[v] for v in self.views_],
            "view_weights": [self.view_weights_[v] for v in self.views_],
            "relevance": self.relevance_.to_numpy(dtype=float),
            "relevance_views": self.relevance_views_.to_numpy(dtype=float),
            "relevance_measure": self.relevance_measure, "n_epochs": len(self.history_),
            "converged": bool(self.converged_),
        }

    def _views_state(self):
        meta = {"views": self.views_, "view_likelihoods": self.view_likelihoods_, "covariates": self._covariates,
                "elbo": self.elbo_, "converged": self.converged_}
        return meta, self._posterior

    def _load_views_state(self, meta, arrays) -> None:
        from .persist import expect_shapes

        (G, K), V = self.loadings_.shape, len(meta["views"])
        D = K + len(arrays["z_mean"]) + 1
        expect_shapes(arrays, {"signs": (K,), "M": (G, D), "S": (G, D, D), "psi": (G,), "dispersion": (G,),
                               "feature_mean": (G,), "feature_unit": (G,), "view_of": (G,),
                               "library_reference": (V,), "relevance_views": (K, V), "view_weights": (V,)})
        self.views_ = {str(k): [str(g) for g in v] for k, v in meta["views"].items()}
        if sum(len(v) for v in self.views_.values()) != G:
            raise ValueError("the views' features do not add up to the loadings' rows")
        self.view_likelihoods_ = {str(k): str(v) for k, v in meta["view_likelihoods"].items()}
        self.view_weights_ = {n: float(w) for n, w in zip(self.views_, arrays["view_weights"])}
        self._posterior = dict(arrays)
        self.relevance_views_ = pd.DataFrame(arrays["relevance_views"], index=self.loadings_.columns,
                                             columns=pd.Index(list(self.views_), name="view"))
        self._covariates, self.elbo_, self.converged_ = meta["covariates"], meta["elbo"], meta["converged"]
        self._training = None
        self._interventions = self.intervention_levels_ = self.intervention_reference_ = None
        self._no_intervention_results()


def view_relevance(vi: SpexViews, names) -> np.ndarray:
    """Views x factors share of variance each factor explains (as MOFA reports it): Gaussian views,
    1 - sum (y - b0 - x_k w_k)^2 / sum (y - b0)^2 over the observed entries; NB and Bernoulli views, the same
    for the fitted linear predictor (log-mean or logit) in place of y."""
    K = vi.K
    mu, M = vi.mu, vi.M
    W, b0 = M[:, :K], M[:, -1]
    obs = torch.ones_like(vi.Y) if vi.observed is None else vi.observed.to(vi.Y.dtype)
    F = torch.cat([mu, vi.F_fixed], 1)
    fitted = F @ M.T - b0[None, :]
    target = torch.where(vi.gaussian[None, :], vi.Y - b0[None, :], fitted) * obs
    total = (target * target).sum(0)                                  # G
    cross = (target.T @ mu) * W                                       # G x K: sum_n y x_nk w_gk
    square = (obs.T @ (mu * mu)) * W * W                              # G x K
    out = np.zeros((len(names), K))
    for v in range(len(names)):
        rows = vi.view_of == v
        denom = float(total[rows].sum())
        if denom > 0:
            out[v] = ((2 * cross[rows] - square[rows]).sum(0) / denom).double().cpu().numpy()
    return np.clip(out, 0, None)
