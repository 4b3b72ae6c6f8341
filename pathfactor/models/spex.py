"""Spex: gene programs from a regularised-horseshoe factor model guided by gene sets (spex-LVM, seed 002).

``Y = X W^T (+ Z B^T) + noise`` with annotated, sparse and dense unannotated factors (seed 002, eqs. 1-5).
The slab width ``c_gk`` of each weight comes from the annotation mask: wide inside a gene set, narrow outside,
narrow everywhere for sparse factors, wide everywhere for dense ones. Inference is closed-form mean-field VI
(``_spex_vi.SpexVI``): no learning rate, an ELBO that rises monotonically, and a full Gaussian posterior per
gene over its loadings and covariate effects jointly.
"""
from __future__ import annotations

import hashlib
import logging
import math
import warnings

import numpy as np
import torch

from .. import parallel
from ..data import stream
from ..data.genesets import annotation_mask
from ..data.views import is_mudata
from ..data.stream import TensorRows
from ..data.inputs import (Matrix, aligned_centred, as_matrix, check_counts, covariate_design, highly_variable_mask,
                           intervention_groups, levels_explained_by, new_covariates)
from ..evaluate import orient
from ..train import fingerprint, resolve_device, seed_everything, train
from ._spex_effects import ProgramEffects, group_effects
from ._spex_multiview import MultiViewSpex, check_view_weights, needs_views, view_likelihoods
from ._spex_nb import SpexNB, nb_factor_scores
from ._spex_prior import STARTS
from ._spex_vi import SpexVI
from .base import LatentModel, factor_layout
from .persist import expect_shapes

__all__ = ["Spex"]

log = logging.getLogger(__name__)


def _log_normalised(counts: torch.Tensor) -> torch.Tensor:
    """Centred log1p of counts per 10,000: where the count model's factors start."""
    library = counts.sum(1, keepdim=True).clamp_min(1)
    Y = torch.log1p(counts / library * 1e4)
    return Y - Y.mean(0)


def starting_factors(Y: torch.Tensor, mask: torch.Tensor, n_free: int, Z: torch.Tensor | None = None) -> torch.Tensor:
    """Starting scores of centred ``Y``: for each gene set the leading principal component of its genes (a masked
    power iteration, all sets at once), then the leading components of what those (and the covariates ``Z``)
    leave unexplained (``stream.initial_factors``, block by block: no residual matrix is formed)."""
    Z = Y.new_zeros(Y.shape[0], 0) if Z is None else Z
    return stream.initial_factors(TensorRows(Y, Z), mask, n_free)


def _column_names(columns) -> list:
    """Covariate column names given as a name or a list of names (arrays have none)."""
    if isinstance(columns, str):
        return [columns]
    if isinstance(columns, (list, tuple)):
        return [c for c in columns if isinstance(c, str)]
    return []


def _warn_single_cell_levels(codes: np.ndarray, levels: list, what: str) -> None:
    """Levels of one cell have no spread of their own to read an effect's sd from (``ProgramEffects.robust_sd``):
    say so, since their effects then come without sd or lfsr (with a single-cell reference, every level's)."""
    single = [str(levels[i]) for i in np.flatnonzero(np.bincount(codes, minlength=len(levels)) == 1)]
    if single:
        warnings.warn(f"{what} level(s) {single[:5]}{' ...' if len(single) > 5 else ''} have a single cell: one "
                      "cell cannot tell a level's effect from its own variation, so "
                      + ("every level's effects get" if str(levels[0]) in single else "their effects get")
                      + " no sd or lfsr (NaN); pool such levels or drop their cells", UserWarning, stacklevel=3)


def _digest(codes: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(codes, dtype=np.int64).tobytes()).hexdigest()[:16]


class Spex(MultiViewSpex, LatentModel):
    """Gene-set guided sparse factor analysis (spex-LVM, seed 002) by closed-form variational inference.

    Parameters
    ----------
    n_sparse, n_dense : int
        Unannotated sparse factors (narrow slab everywhere: programs no gene set names) and dense factors
        (wide slab: technical or broad variation such as batch or library size). Default 2 and 0: of
        (0, 0), (0, 2), (2, 0), (2, 2) and (5, 5), the ELBO prefers (2, 0) on mESC, Kang and Spectra's immune
        sample and (5, 5) on pbmc68k, and no annotated factor separates the known cell groups worse under it
        (``experiments/defaults.py``).
    slab_in, slab_out : float
        Slab widths ``s`` inside and outside a gene set, in units of the data's typical standard deviation
        (seed 002: about 1 inside, 0 < c < 0.1 outside). ``slab_sparse``, ``slab_dense`` likewise.
    slab_confidence : float
        ``alpha`` of the slab prior ``c^2 ~ IG(alpha, alpha s^2)``: how much evidence a gene outside a set needs
        to join it. Whatever the start (``start``), a loading that is far from zero
        survives outside its set only if its estimate exceeds about ``sqrt(4 (2 alpha + 1) sigma2_g / N)``
        (the non-zero fixed point of its update), while genes inside a set keep a slab of width ~``slab_in``.
        Default 2 (chosen on the noisy-annotation simulations and the mESC data: 0.5 lets annotated factors
        drift into generic ones and converges slowly, 5 loses the G2M program on mESC).
    global_scale : float or None
        The horseshoe's global scale tau of every factor, in units of the data's standard deviation (log units for
        counts); ``None`` learns one per factor (tau ~ C+(0, data sd)). The prior is the normalised regularised
        horseshoe (``_spex_prior``), so a learned tau is safe: it is learned from the weights the slab leaves free,
        and on the noisy-annotation simulations (``benchmarks/global_scale.py``) its mask F1 is within 0.01 of the
        fixed one, which stays the default (equal or slightly better F1 at every noise level, larger loadings on
        low counts). Every prior is in the data's units, so the factors do not depend on the units of the data.
        Several views or missing entries (``_spex_views``): Gaussian views learn tau per view and factor,
        tau ~ C+(0, global_scale x the view's sd); count and binary views hold it at ``global_scale`` log units
        (``None``: learned in every view). Measured: a learned tau imputes Kang better (hidden-entry RMSE 0.358
        against 0.361) and gives a higher mask F1 on the multi-view simulation (0.87 against 0.83), while on
        low counts it halves the NB loadings (0.21 against 0.33, truth 0.5).
    min_set_size, max_set_size, min_set_fraction : gene-set filters applied against the data's genes.
    batch_size : None (default) for exact coordinate ascent on all cells; an int for memoized VI on minibatches of
        at most that many cells (Hughes & Sudderth 2013), for data streamed from disk or with very many cells. The
        cells are dealt once into fixed batches; a visit to a batch updates its cells' factors, swaps its share of
        the sufficient statistics in running totals, and makes the exact global updates (and the covariate shear)
        from the totals. The ELBO is exact and rises monotonically to the full-batch optimum, so ``tol`` works as
        for full batches; an epoch costs one global update per batch, and fewer epochs are needed. The stored
        shares take about ``K / batch_size`` times the data's memory (K factors; see ``_spex_vi``).
        With ``likelihood="nb"`` a batch is a block of cells that every pass goes through in turn: the updates and
        the ELBO stay the exact full-batch ones (the same fit, to rounding), and no cells x genes cache is kept, so
        the memory is the counts plus one block's temporaries; an epoch recomputes what the caches held (about
        twice the work).
    posterior : "blocked" (default): one joint Gaussian over each gene's loadings and covariate effects;
        "mean-field": q(W) q(B) apart, as MuVI does (seed 000's comparison: biased B, too-narrow intervals).
    likelihood : "normal" (default; also spelled "gaussian"; log-normalised or scaled data) or "nb": raw counts
        under a negative binomial with a log link, the library size as offset and a size term per cell
        (``_spex_nb``: the expected log-likelihood by quadrature, checked Newton steps, per-gene dispersions learned
        with empirical-Bayes shrinkage (``dispersion_``), a gene intercept; loadings in log units: a loading of 1 is
        an e-fold change per factor sd).
    coupling : float or None
        The family of each gene's posterior over its weights (``_spex_blocks``). ``None``: one full covariance per
        gene (exact, a D x D factorisation per gene and sweep). A number (default 0.3): a full block over the
        gene's weights whose summed squared posterior correlation with its other weights exceeds ``coupling^2``,
        the others independent, so a sweep costs what the coupled weights cost; treating a weight as independent
        costs at most about ``coupling^2 / 2`` nats of ELBO, and the means are exact (conjugate gradients). On
        10,000 x 8,000 x 100 factors the fit takes 23 s instead of 93 s with the same mask F1
        (``benchmarks/spex_simulation.py``); with covariates the covariances stay full (the shear maps them).
    start : where the coordinate ascent starts the slabs (it decides which local optimum the fit reaches):
        "wide" (default; every slab at ``slab_in``, a dense start), "informed" (no narrower than the width at which
        a weight's prior holds as much information as its data: every weight the data can make active reaches its
        non-zero solution, the others start pinned; ``_spex_vi.starting_slab_rate``) or "prior" (the annotation's
        widths). ``benchmarks/start.py``: on simulated noisy annotations (1,000-20,000 cells x 2,000 genes x 100
        factors) "informed" gives the same mask F1 (+-0.0002) and ELBO (at most 1.2e-4 per observation lower) in
        1.5-2.3x fewer epochs and 2.4-3.6x less time, because the dense start rotates slowly towards the sparse
        solution on many cells; on the real sets (mESC, Kang, pbmc68k, Spectra's sample) "wide" ends at a higher
        ELBO on three of four (by 1.5e-3 to 3.3e-3 per observation), so it stays the default; with 100,000
        simulated cells "prior" converged in 59 epochs, "informed" in 184 and "wide" not in 300. Counts
        (``likelihood="nb"``), several views and missing entries take "wide" or "prior" ("informed" is refused).
    max_epochs, tol : stop after ``max_epochs`` sweeps or when the ELBO's relative change stays below ``tol``.
    progress : show a progress bar.
    dtype : "float32" (default) or "float64".
    view_weights : several views only: ``None`` (default: the joint likelihood, every entry counts once),
        ``"balanced"`` (each view's likelihood raised to the power that gives every view the same total weight,
        mean observed entries per view / the view's observed entries, as MOFA+'s ``scale_views``: 49 proteins then
        count as much as 2000 genes) or ``{view: weight}``. Weights other than 1 make the fit a tempered
        likelihood, no longer the joint model's posterior (``_spex_views``).

    Attributes
    ----------
    See :class:`~pathfactor.models.base.LatentModel`; ``elbo_`` is the final ELBO.

    References
    ----------
    Kopf et al., spex-LVM (seed 002); Piironen & Vehtari 2017 (regularised horseshoe);
    Makalic & Schmidt 2016 (inverse-gamma auxiliaries of the half-Cauchy).
    """

    key = "spex"

    @property
    def relevance_measure(self) -> str:
        """R^2 of the data for Gaussian data; for counts, the variance a factor adds to the log-mean; for several
        views (or missing entries), the largest per-view share (``relevance_views_``)."""
        if getattr(self, "views_", None):
            return "largest R^2 over the views"
        return "log-mean variance" if getattr(self, "likelihood", "normal") == "nb" else "R^2"
    #: dense factors are named ``{dense_name}_i``
    dense_name = "dense"

    def __init__(self, *, n_sparse: int = 2, n_dense: int = 0, slab_in: float = 1.0, slab_out: float = 1e-3,
                 slab_sparse: float = 0.1, slab_dense: float = 1.0, slab_confidence: float = 2.0,
                 global_scale: float | None = 1.0,
                 min_set_size: int = 15, max_set_size: int = 500, min_set_fraction: float = 0.0,
                 max_epochs: int = 300, tol: float = 1e-5, batch_size: int | None = None, posterior: str = "blocked",
                 likelihood: str = "normal", coupling: float | None = 0.3, progress: bool = True,
                 dtype: str = "float32", view_weights=None, start: str = "wide"):
        self.n_sparse, self.n_dense = n_sparse, n_dense
        self.coupling = coupling
        self.likelihood = likelihood
        self.slab_in, self.slab_out, self.slab_sparse, self.slab_dense = slab_in, slab_out, slab_sparse, slab_dense
        self.slab_confidence, self.global_scale = slab_confidence, global_scale
        self.min_set_size, self.max_set_size, self.min_set_fraction = min_set_size, max_set_size, min_set_fraction
        self.max_epochs, self.tol, self.batch_size, self.posterior = max_epochs, tol, batch_size, posterior
        self.progress, self.dtype = progress, dtype
        self.view_weights = view_weights
        self.start = start

    def _check_params(self) -> None:
        for name in ("n_sparse", "n_dense"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        for name in ("slab_in", "slab_out", "slab_sparse", "slab_dense", "slab_confidence", "global_scale"):
            value = getattr(self, name)
            if value is None and name == "global_scale":
                continue
            if not np.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if self.batch_size is not None and (not isinstance(self.batch_size, (int, np.integer)) or self.batch_size < 2):
            raise ValueError(f"batch_size must be None or an integer >= 2, got {self.batch_size!r}")
        if self.posterior not in ("blocked", "mean-field"):
            raise ValueError(f"posterior must be 'blocked' or 'mean-field', got {self.posterior!r}")
        if self.start not in STARTS:
            raise ValueError(f"start must be one of {', '.join(map(repr, STARTS))}, got {self.start!r}")
        if isinstance(self.likelihood, dict):
            view_likelihoods(self.likelihood, [str(v) for v in self.likelihood])
        elif self.likelihood not in ("normal", "gaussian", "nb", "poisson", "bernoulli"):
            raise ValueError(f"likelihood must be 'normal' (or 'gaussian': log-normalised data), 'nb' or 'poisson' "
                             f"(raw counts), 'bernoulli' (0/1 data) or a dict {{view: likelihood}}, "
                             f"got {self.likelihood!r}")
        if self.likelihood == "nb" and self.posterior != "blocked":
            raise ValueError("likelihood='nb' is fitted with the blocked posterior; leave posterior='blocked'")
        if self.coupling is not None and (not np.isfinite(self.coupling) or self.coupling < 0):
            raise ValueError(f"coupling must be None (exact full covariances) or a number >= 0, got {self.coupling!r}")
        check_view_weights(self.view_weights)
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")

    # ------------------------------------------------------------------ fit
    def fit(self, data, annotations=None, layer: str | None = None, covariates=None, device="auto",
            seed: int = 0, checkpoint_dir=None, use_highly_variable: bool | None = None, interventions=None,
            reference=None, allow_missing: bool = False) -> "Spex":
        """Fit to ``data`` (AnnData, DataFrame or array; cells x genes, log-normalised or scaled).

        Several views (modalities) of the same cells: a MuData or ``{view: AnnData}``, with ``likelihood`` and
        ``annotations`` given per view as dicts; ``allow_missing=True`` fits NaN entries as missing (a cell without a
        view is fitted from the others); NB / Poisson / Bernoulli views and missing entries go to the multi-view
        engine (``_spex_views``), results in ``views_``, ``relevance_views_``, ``view_loadings``, ``impute``.

        ``annotations``: GeneSets, ``{name: genes}``, a genes x terms boolean DataFrame or a GMT/JSON path (or a
        list of them); sets are matched to the genes case-insensitively and filtered by size.
        ``covariates``: obs column name(s) (categorical -> one column per non-reference level, ``COL=level``) or
        a cells x C array. The caller's data are not modified; call :meth:`write` to store results.
        ``checkpoint_dir``: save the state there every few epochs (atomically) and resume from it if a
        checkpoint of the same fit is already there.
        ``interventions``: an obs column (or one label per cell) of perturbations that act on the programs:
        each cell's factors are centred on its level's effects (``_spex_effects``), estimated against the
        ``reference`` level (default: the most frequent) and shrunk by adaptive shrinkage (a sparse prior learned
        from all the effects), as ``intervention_effects_`` (factors x levels), ``intervention_effects_sd_``,
        ``intervention_effects_lfsr_`` (local false sign rates) and per-gene total effects W beta
        (``gene_effects_``, ``gene_effects_sd_``); ``intervention_estimates_`` / ``_sd_``: the estimates before
        shrinkage (the posterior under the model's weak N(0, 1) prior). Gaussian likelihood, all cells in memory.
        ``reference``: the reference level of ``interventions`` and, given as ``{column: level}`` (or as one
        level when there are no interventions), of categorical ``covariates`` (default: the most frequent level).

        Out of core: an AnnData opened with ``anndata.read_h5ad(path, backed="r")`` is streamed from disk
        (``data.stream``), ``batch_size`` rows at a time (a few MiB when ``batch_size=None``); memory then holds one
        block of the data plus N x K factor scores. Data-parallel: inside a ``torch.distributed`` process group
        of several processes (``pathfactor.distributed.session()`` under torchrun), each process fits its shard of the
        cells and every process returns the whole model.
        """
        self._check_params()
        self.views_ = None
        if needs_views(data, self.likelihood, allow_missing):
            if interventions is not None:
                raise ValueError("interventions are fitted on one complete Gaussian view; several views, missing "
                                 "entries and Bernoulli data take covariates= instead")
            return self._fit_views(data, annotations, layer, covariates, device, seed, checkpoint_dir,
                                   use_highly_variable, allow_missing)
        generator = seed_everything(seed)
        dev, dt = resolve_device(device), getattr(torch, self.dtype)
        unit = 1.0  # the data's scale the fit divides out (in-memory Gaussian fits; see below)
        # rows streamed from a backed .h5ad and/or shared among the processes of a data-parallel fit
        comm = parallel.current()
        reduce = None if comm is None else comm.reduce
        streamed = self.likelihood != "nb" and (comm is not None or stream.is_backed(data, layer))
        if streamed and stream.is_backed(data, layer):  # streamed with every gene of the file
            if highly_variable_mask(data, use_highly_variable) is not None:
                raise ValueError("a backed AnnData is streamed with all its genes, but var['highly_variable'] selects "
                                 "fewer: write that subset to its own file (adata[:, adata.var.highly_variable]) "
                                 "and back it, or pass use_highly_variable=False to fit every gene")
            matrix, self.genes_left_out_, self.seed_ = stream.backed_matrix(data), [], seed
        else:
            # read only (centred into a copy below, or copied as counts): no copy of the caller's matrix
            matrix = as_matrix(data, layer, use_highly_variable=use_highly_variable, copy=False)
            self._note_inputs(matrix, gaussian=self.likelihood != "nb", seed=seed)
        N, G = matrix.shape
        mask, term_names = annotation_mask(annotations, matrix.var_names, self.min_set_size, self.max_set_size,
                                           self.min_set_fraction)
        obs = getattr(data, "obs", None)
        intervention_ref = reference.get(interventions) if isinstance(reference, dict) and isinstance(
            interventions, str) else reference
        covariate_ref = reference if isinstance(reference, dict) or interventions is None else None
        Z, covariate_names = covariate_design(obs, covariates, N, reference=covariate_ref)
        groups = None
        if interventions is not None:
            if self.likelihood == "nb":
                raise ValueError("interventions are fitted with the Gaussian likelihood; fit log-normalised data "
                                 "with likelihood='normal'")
            if isinstance(interventions, str) and interventions in _column_names(covariates):
                raise ValueError(f"{interventions!r} is both a covariate and the interventions: its effects on the "
                                 "genes (B) and on the programs (W beta) cannot be told apart; pass it once")
            groups, levels = intervention_groups(obs, interventions, N, intervention_ref)
            _warn_single_cell_levels(groups, levels, "intervention")
            explained = levels_explained_by(groups, levels, Z)
            if explained:
                more = f" and {len(explained) - 5} more" if len(explained) > 5 else ""
                raise ValueError(f"intervention level(s) {explained[:5]}{more} are fully explained by the covariates "
                                 f"{_column_names(covariates) or 'given'} (a copy of the column, or levels nested in "
                                 "a covariate's): their effects on the programs and the covariates' effects on the "
                                 "genes cannot be told apart; drop those covariates or fit without interventions")
        A, H = mask.shape[1], self.n_sparse + self.n_dense
        K = A + H
        if K == 0:
            raise ValueError("nothing to fit: give annotations (gene sets) or ask for n_sparse / n_dense factors")
        if K >= G:
            raise ValueError(f"{K} factors need fewer than the data's {G} genes; "
                             "use fewer gene sets (e.g. raise min_set_size) or fewer unannotated factors")
        if Z.shape[1] + 1 >= N:  # the shrinkage prior needs no K < N, but the covariates' effects need cells
            raise ValueError(f"{Z.shape[1]} covariate columns need fewer than the data's {N} cells")

        Zt = torch.as_tensor(Z, dtype=torch.float64, device=dev)
        z_mean = Zt.mean(0)
        Zt = (Zt - z_mean).to(dt)
        names, kinds = factor_layout(term_names, self.n_sparse, self.n_dense, self.dense_name)
        # slab widths s_gk (seed 002: ~1 inside a set, < 0.1 outside; sparse narrow, dense wide)
        s = np.concatenate([np.where(mask, self.slab_in, self.slab_out),
                            np.full((G, self.n_sparse), self.slab_sparse), np.full((G, self.n_dense), self.slab_dense)],
                           axis=1)
        mask_t = torch.as_tensor(mask, dtype=dt, device=dev)
        if self.likelihood == "nb":
            check_counts(matrix, "negative binomial")
            counts = torch.as_tensor(matrix.dense(np.float64 if dt == torch.float64 else np.float32), device=dev)
            Y, gene_mean = _log_normalised(counts), None
            data_sd = 1.0  # loadings act on the log-mean: slab widths and tau are in log units
        elif streamed:  # Y is a row source; same gene means, sd and start as below, from passes over the rows
            prep = stream.prepare(matrix.Y, Zt, mask_t, H, dev, dt, reduce=reduce,
                                  rows=None if comm is None else comm.shard(N))
            Y, gene_mean, data_sd, X0 = prep.source, prep.gene_mean, prep.data_sd, prep.X0
        else:  # fitted on Y / unit, a power of two near the data's sd: exact, and no value is too small for dt
            mean, var = matrix.moments()
            data_sd = float(np.sqrt(var.mean()))
            unit = 2.0 ** round(math.log2(data_sd)) if data_sd > 0 else 1.0
            Y, gene_mean = matrix.centred(dev, dt, mean=mean, scale=unit)
            data_sd = max(data_sd / unit, 1e-12)
        if not streamed:  # start the factors on what the covariates leave unexplained (two-step OLS + PCA, seed 000)
            X0 = starting_factors(Y, mask_t, H, Zt)
        tau = None if self.global_scale is None else self.global_scale * data_sd
        s_t = torch.as_tensor(s * data_sd, dtype=dt, device=dev)
        effects = None if groups is None else ProgramEffects(torch.as_tensor(groups), len(levels) - 1, K,
                                                             blocked=self.posterior == "blocked", dtype=dt, device=dev)
        if self.likelihood == "nb":
            del Y  # the log-normalised copy served the start only
            vi = SpexNB(counts, Zt, s_t, X0, slab_confidence=self.slab_confidence, tau=tau, batch_size=self.batch_size,
                        start=self.start)
        else:
            vi = SpexVI(Y, Zt, s_t, X0, slab_confidence=self.slab_confidence, tau=tau, batch_size=self.batch_size,
                        generator=generator, posterior=self.posterior, reduce=reduce, unit=data_sd, effects=effects,
                        coupling=self.coupling, start=self.start)
        owner = None
        if checkpoint_dir is not None:  # what a checkpoint must belong to before the fit resumes from it
            gene_sums = counts.sum(0) if self.likelihood == "nb" else gene_mean * N
            owner = fingerprint(self, n_cells=N, n_genes=G, obs_names=matrix.obs_names, var_names=matrix.var_names,
                                gene_sums=gene_sums.double().cpu().numpy(), seed=int(seed), factors=names,
                                covariates=list(covariate_names), processes=1 if comm is None else comm.size,
                                interventions=None if groups is None else [levels, _digest(groups)])
            if comm is not None:  # each process saves its own cells' state
                checkpoint_dir = f"{checkpoint_dir}/rank{comm.rank}"
        progress = self.progress and (comm is None or comm.rank == 0)
        result = train(vi, max_epochs=self.max_epochs, tol=self.tol, progress=progress,
                       desc=type(self).__name__, checkpoint_dir=checkpoint_dir, fingerprint=owner)

        # results in the data's units, each factor oriented so that its gene set's loadings point up
        M = vi.M.double().cpu().numpy() * unit
        C = Zt.shape[1]
        sd = vi.loadings_sd().double().cpu().numpy() * unit
        # the ELBO of Y itself: log p(Y) = log p(Y / u) - N G log u (every prior is a normalised density in the
        # data's units, so its terms and the entropies shift together and cancel)
        history = [v - N * G * math.log(unit) for v in result.history]
        mu = vi.scores()
        if streamed:
            relevance = stream.factor_r2(Y, mu, vi.M[:, :K], reduce)
            mu = mu if comm is None else comm.gather_rows(mu)
        mu = mu.double().cpu().numpy()
        annotation = np.concatenate([mask, np.zeros((G, H), dtype=bool)], axis=1)
        signs = orient(M[:, :K], annotation)
        if not streamed:
            if self.likelihood == "nb":  # variance each factor adds to a gene's log-mean, averaged over genes
                relevance = mu.var(0) * (M[:, :K] ** 2).mean(0)
            else:  # from the fitted Y / unit, block by block
                relevance = stream.factor_r2(vi.data, torch.as_tensor(mu, device=dev),
                                             torch.as_tensor(M[:, :K] / unit, dtype=dt, device=dev))
        self._set_results(scores=mu * signs, loadings=M[:, :K] * signs, loadings_sd=sd[:, :K],
                          obs_names=matrix.obs_names, var_names=matrix.var_names, factor_names=names, factor_kinds=kinds,
                          relevance=relevance, annotation=annotation if A else None,
                          covariate_effects=M[:, K:K + C], covariate_effects_sd=sd[:, K:K + C], covariate_names=covariate_names,
                          history=history)
        self.elbo_ = history[-1]
        self.converged_ = result.converged
        # what transform() needs
        post = {"signs": signs, "M": M, "z_mean": z_mean.cpu().numpy()}
        if self.likelihood == "nb":
            post.update(S=vi.S.double().cpu().numpy(), beta=vi.intercepts().double().cpu().numpy(),
                        dispersion=vi.r.double().cpu().numpy())
        else:
            post.update(psi=vi.psi.double().cpu().numpy() / unit**2, Q=vi.second_moment().double().cpu().numpy(),
                        gene_mean=gene_mean.cpu().numpy())
        self._posterior = post
        self._covariates = covariates if isinstance(covariates, (str, list, tuple)) else None
        self._set_intervention_results(vi, levels if groups is not None else None, signs, unit,
                                       interventions if isinstance(interventions, str) else None)
        return self

    def _set_intervention_results(self, vi, levels, signs, unit: float, column) -> None:
        """Effects of the interventions on the factors (oriented as the factors) and on the genes (W beta, in
        the data's units), their sds and local false sign rates; ``None`` without interventions."""
        self.intervention_levels_ = None if levels is None else list(levels)
        self.intervention_reference_ = None if levels is None else levels[0]
        self._interventions = column
        if levels is None:
            self._no_intervention_results()
            return
        eff, K = vi.effects, self.loadings_.shape[1]
        beta, beta_sd, lfsr = (t.double().cpu().numpy() for t in eff.shrunk())
        raw, raw_sd = (t.double().cpu().numpy() for t in eff.effects())
        Mw = vi.M[:, :K].double().cpu().numpy() * unit
        Sw = vi.S_diag[:, :K].double().cpu().numpy() * unit**2    # G x K
        # Var(w_g^T beta_l) for independent q(w_g) and shrunk effects (diagonal): sum_k m_w^2 v_b + m_b^2 s_w + s_w v_b
        v_b = beta_sd**2
        var = (Mw**2) @ v_b.T + Sw @ (beta**2).T + Sw @ v_b.T
        post = {"effects": beta * signs, "effects_sd": beta_sd, "effects_lfsr": lfsr, "estimates": raw * signs,
                "estimates_sd": raw_sd, "gene_effects": Mw @ beta.T,
                "gene_effects_sd": np.sqrt(np.clip(var, 0, None)),
                "level_means": eff.mean.double().cpu().numpy()}  # E[m_g], unoriented (transform orients)
        self._posterior.update(post)
        self._intervention_frames()

    def _no_intervention_results(self) -> None:
        for name in ("effects", "effects_sd", "effects_lfsr", "estimates", "estimates_sd"):
            setattr(self, f"intervention_{name}_", None)
        self.gene_effects_ = self.gene_effects_sd_ = None

    def _intervention_frames(self) -> None:
        """The DataFrames of the intervention results from the posterior's arrays."""
        import pandas as pd

        post, levels = self._posterior, pd.Index(self.intervention_levels_[1:], name="level")
        factors, genes = self.loadings_.columns, self.loadings_.index
        self.intervention_effects_ = pd.DataFrame(post["effects"].T, index=factors, columns=levels)
        self.intervention_effects_sd_ = pd.DataFrame(post["effects_sd"].T, index=factors, columns=levels)
        self.intervention_effects_lfsr_ = pd.DataFrame(post["effects_lfsr"].T, index=factors, columns=levels)
        self.intervention_estimates_ = pd.DataFrame(post["estimates"].T, index=factors, columns=levels)
        self.intervention_estimates_sd_ = pd.DataFrame(post["estimates_sd"].T, index=factors, columns=levels)
        self.gene_effects_ = pd.DataFrame(post["gene_effects"], index=genes, columns=levels)
        self.gene_effects_sd_ = pd.DataFrame(post["gene_effects_sd"], index=genes, columns=levels)

    @property
    def dispersion_(self):
        """The negative binomial's dispersion r_g per gene (``likelihood="nb"`` only): Var = mu + mu^2 / r."""
        import pandas as pd

        self._check_fitted()
        if self.likelihood != "nb":
            raise AttributeError("dispersion_ exists for likelihood='nb' only")
        return pd.Series(self._posterior["dispersion"], index=self.loadings_.index, name="dispersion")

    # ------------------------------------------------------------------ transform
    def transform(self, data, layer: str | None = None, covariates=None, interventions=None):
        """Factor scores of new cells: the posterior mean of x_n given the learned loadings (closed form).

        ``data`` must hold every gene the model was fitted on (extra genes are ignored). If the model was fitted
        with covariates, pass the same covariates for the new cells (obs columns are found by name); if it was
        fitted with interventions, each new cell's prior is centred on its level's effects: the levels come from
        the same obs column, or ``interventions`` (a column name, or one label per cell).
        """
        import pandas as pd

        self._check_fitted()
        if self.is_multiview_:
            return self._transform_views(data, layer)
        post, K = self._posterior, self.loadings_.shape[1]
        C = post["M"].shape[1] - K - (self.likelihood == "nb")  # an NB model's M ends with the intercepts
        if self.likelihood == "nb":
            Y, obs_names = aligned_centred(data, layer, self.loadings_.index, np.zeros(len(self.loadings_)))
            check_counts(Matrix(Y, obs_names, self.loadings_.index), "negative binomial")
        else:
            Y, obs_names = aligned_centred(data, layer, self.loadings_.index, post["gene_mean"])
        Z = self._new_design(data, covariates, Y.shape[0], C)
        if self.likelihood == "nb":
            mu = nb_factor_scores(Y, Z, post["M"], post["S"], post["beta"], post["dispersion"])
        else:
            Q, psi, M = post["Q"], post["psi"], post["M"]
            Sigma_x = np.linalg.inv(np.eye(K) + Q[:K, :K])
            h = Y @ (M[:, :K] * psi[:, None]) - Z @ Q[K:, :K]
            if getattr(self, "intervention_levels_", None) is not None:  # x_n ~ N(E[m_n], I): its level's effects
                h = h + post["level_means"][self._new_levels(data, interventions, Y.shape[0])]
            mu = h @ Sigma_x
        return pd.DataFrame(mu * post["signs"], index=obs_names, columns=self.loadings_.columns)

    def compare(self, data, groupby: str, groups=None, reference: str | None = None, layer: str | None = None,
                covariates=None):
        """Differential programs: each group's shift of every factor against a reference group, from the posterior.

        The cells of ``data`` (the training cells or new ones, with every gene of the model) in the ``groups`` of
        obs column ``groupby`` (default: all its levels; the others are left out) get the model
        ``x_n ~ N(c + delta_group, I)`` under the fitted loadings and noise (as for interventions,
        ``_spex_effects``), the shifts then shrunk by adaptive shrinkage (a point mass at zero and a mixture of
        normals, learned from all the shifts). q(c, delta) is the exact marginal of the joint posterior of
        the cells' factors and the shifts (X integrated out), so it accounts for how well the data pin down each
        cell's factors; a t-test on the point estimates of the scores does not. ``reference``: default the most
        frequent group. Returns a DataFrame (one row per factor and group, sorted by lfsr) with the shift
        (``effect``, in factor sd units), its posterior ``sd``, ``lfsr`` (local false sign rate) and the groups'
        cell counts. A model fitted with interventions or covariates needs them for these cells too."""
        import pandas as pd

        self._check_fitted()
        if self.likelihood == "nb" or self.is_multiview_:
            raise ValueError("compare() uses the Gaussian model's closed form; fit log-normalised data with "
                             "likelihood='normal'")
        if self._posterior is None:
            raise ValueError("compare() needs the posterior; this model (two_step=True) has none")
        obs = getattr(data, "obs", None)
        if obs is None or groupby not in obs.columns:
            raise ValueError(f"groupby={groupby!r} must be a column of the data's obs")
        keep = np.ones(len(obs), dtype=bool) if groups is None else obs[groupby].astype(str).isin(
            [str(g) for g in groups]).to_numpy()
        if groups is not None and reference is not None and str(reference) not in [str(g) for g in groups]:
            keep |= (obs[groupby].astype(str) == str(reference)).to_numpy()
        if keep.sum() < len(obs):
            data = data[keep]
        codes, levels = intervention_groups(data.obs, groupby, data.n_obs, reference)
        _warn_single_cell_levels(codes, levels, f"{groupby!r}")
        post, K = self._posterior, self.loadings_.shape[1]
        h = self._likelihood_terms(data, layer, covariates)
        Sigma_x = np.linalg.inv(np.eye(K) + post["Q"][:K, :K])
        Sigma_x = torch.as_tensor(0.5 * (Sigma_x + Sigma_x.T))
        eff = group_effects(torch.as_tensor(h) @ Sigma_x, Sigma_x, torch.as_tensor(codes), len(levels) - 1)
        mean, sd, lfsr = (t.numpy() for t in eff.shrunk())
        mean = mean * post["signs"]
        counts = np.bincount(codes, minlength=len(levels))
        rows = [{"factor": f, "group": levels[l + 1], "reference": levels[0], "effect": mean[l, k], "sd": sd[l, k],
                 "lfsr": lfsr[l, k], "n_group": int(counts[l + 1]), "n_reference": int(counts[0])}
                for l in range(len(levels) - 1) for k, f in enumerate(self.loadings_.columns)]
        return pd.DataFrame(rows).sort_values(["lfsr", "factor"], kind="stable").reset_index(drop=True)

    def _likelihood_terms(self, data, layer, covariates) -> np.ndarray:
        """h_n = sum_g psi_g (E[w_g] y_ng - E[w_g b_g^T] z_n) (N x K) of the cells of ``data`` (Gaussian model)."""
        post, K = self._posterior, self.loadings_.shape[1]
        Y, _ = aligned_centred(data, layer, self.loadings_.index, post["gene_mean"])
        Z = self._new_design(data, covariates, Y.shape[0], post["M"].shape[1] - K)
        return Y @ (post["M"][:, :K] * post["psi"][:, None]) - Z @ post["Q"][K:, :K]

    def _new_design(self, data, covariates, n_cells: int, n_columns: int) -> np.ndarray:
        """The centred covariates of new cells (``n_columns`` of them; none: an empty design)."""
        if not n_columns:
            return np.zeros((n_cells, 0))
        return new_covariates(data, covariates if covariates is not None else self._covariates, n_cells,
                              self.covariate_effects_.columns, self._posterior["z_mean"],
                              getattr(self, "covariate_levels_", None))

    def _new_levels(self, data, interventions, n_cells: int) -> np.ndarray:
        """New cells' intervention level codes against the fitted levels (reference 0)."""
        import pandas as pd

        spec = interventions if interventions is not None else self._interventions
        if spec is None:
            raise ValueError("the model was fitted with interventions; pass interventions= (a column name or one "
                             "label per cell) for the new cells")
        obs = getattr(data, "obs", None)
        if isinstance(spec, str):
            if obs is None or spec not in obs.columns:
                raise ValueError(f"the model was fitted with interventions {spec!r}, which the new data's obs lacks; "
                                 "pass interventions= for the new cells")
            labels = obs[spec]
        else:
            labels = pd.Series(np.asarray(spec).ravel())
        labels = np.asarray(labels.astype(str), dtype=object)
        if len(labels) != n_cells:
            raise ValueError(f"interventions have {len(labels)} labels but the new data have {n_cells} cells")
        known = self.intervention_levels_
        unseen = sorted(set(labels) - set(known))
        if unseen:
            raise ValueError(f"interventions of the new cells have levels {unseen[:5]} the model was not fitted with "
                             f"(it knows {known[:10]}); drop those cells or refit with them")
        return pd.Categorical(labels, categories=known).codes.astype(np.int64)

    def write(self, adata, key: str | None = None) -> None:
        """As :meth:`LatentModel.write`; with interventions also ``uns[key]["intervention_effects"]``,
        ``["intervention_effects_sd"]``, ``["intervention_effects_lfsr"]`` (DataFrames, factors x levels, the
        reference left out), ``["intervention_reference"]``, ``["intervention_levels"]`` and the per-gene total
        effects ``varm["<key>_gene_effects"]`` / ``varm["<key>_gene_effects_sd"]`` (genes x levels).
        A model of several views writes into a MuData (``_write_views``)."""
        if self.is_multiview_ and (len(self.views_) > 1 or is_mudata(adata)):
            self._check_fitted()
            return self._write_views(adata, key or self.key)
        super().write(adata, key)
        if getattr(self, "intervention_levels_", None) is None:
            return
        key = key or self.key
        uns = adata.uns[key]
        uns["intervention_effects"] = self.intervention_effects_.copy()
        uns["intervention_effects_sd"] = self.intervention_effects_sd_.copy()
        uns["intervention_effects_lfsr"] = self.intervention_effects_lfsr_.copy()
        uns["intervention_reference"] = str(self.intervention_reference_)
        uns["intervention_levels"] = [str(v) for v in self.intervention_levels_[1:]]
        for suffix, frame in (("gene_effects", self.gene_effects_), ("gene_effects_sd", self.gene_effects_sd_)):
            adata.varm[f"{key}_{suffix}"] = frame.reindex(adata.var_names, fill_value=0.0).to_numpy(np.float32)

    def _extra_state(self):
        if self.is_multiview_:
            return self._views_state()
        meta = {"covariates": self._covariates, "elbo": self.elbo_, "converged": self.converged_,
                "interventions": getattr(self, "_interventions", None),
                "intervention_levels": getattr(self, "intervention_levels_", None)}
        return meta, self._posterior

    def _load_extra_state(self, meta, arrays):
        self.views_ = None
        if meta.get("views") is not None:
            return self._load_views_state(meta, arrays)
        if arrays:  # Supervised(two_step=True) saves none
            (G, K), C = self.loadings_.shape, len(arrays["z_mean"])
            D = K + C + (self.likelihood == "nb")  # an NB model's M and S also hold the intercepts
            nb = {"S": (G, D, D), "beta": (G,), "dispersion": (G,)}
            gaussian = {"psi": (G,), "Q": (D, D), "gene_mean": (G,)}
            expect_shapes(arrays, {"signs": (K,), "M": (G, D), **(nb if self.likelihood == "nb" else gaussian)})
        levels = meta.get("intervention_levels")
        if arrays and levels is not None:
            (G, K), L = self.loadings_.shape, len(levels) - 1
            expect_shapes(arrays, {"effects": (L, K), "effects_sd": (L, K), "effects_lfsr": (L, K), "estimates": (L, K),
                                   "estimates_sd": (L, K), "gene_effects": (G, L),
                                   "gene_effects_sd": (G, L), "level_means": (L + 1, K)})
        self._posterior = dict(arrays)
        self._covariates, self.elbo_, self.converged_ = meta["covariates"], meta["elbo"], meta["converged"]
        self._interventions = meta.get("interventions")
        self.intervention_levels_ = None if levels is None else [str(v) for v in levels]
        self.intervention_reference_ = None if levels is None else self.intervention_levels_[0]
        if levels is None:
            self._no_intervention_results()
        else:
            self._intervention_frames()
