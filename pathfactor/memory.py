"""How much memory a fit needs, how much there is, and a check that refuses a fit that cannot fit.

:func:`memory_estimate` gives the bytes a model's fit needs from the problem's shape (cells, genes, factors,
covariate columns), :func:`fit_memory_estimate` the same from the data and the ``fit`` arguments themselves (it
counts the gene sets that pass the model's size filters and the covariates' design columns), and
:func:`check_memory` (from the shapes; for a model's ``fit``, once it knows them) and :func:`check_fit_memory` (from
the ``fit`` arguments; ``pathfactor fit`` runs it before every fit) raise :class:`InsufficientMemoryError` -- a
``ValueError``, so the CLI reports it in one line -- when the estimate exceeds :func:`available_memory`.

The estimates are calibrated against the peak resident memory of real fits (float32, one thread) and err high by
a little: for Spex / Supervised the G per-gene D x D posterior precisions and covariances (``D`` = factors +
covariate columns; about six such G x D x D arrays are alive at once: precision, Cholesky factor, inverse, the
kept natural parameters, the shear's products), for every model a few N x G copies of the data (the float32
matrix, the float64 pass that centres it, the working copies), plus the factor-sized arrays and, for the neural
networks, the weights with their gradients and Adam moments.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

__all__ = ["InsufficientMemoryError", "memory_estimate", "fit_memory_estimate", "available_memory",
           "check_memory", "check_fit_memory", "format_bytes"]


class InsufficientMemoryError(ValueError, MemoryError):
    """A fit was refused because its estimated memory exceeds the available memory (a ``ValueError`` -- bad input
    for this machine -- and a ``MemoryError``)."""


#: models whose fit holds one D x D posterior per gene (D = factors + covariate columns)
_PER_GENE_BLOCKS = {"Spex", "Supervised"}
_NETWORKS = {"VAE", "GMVAE", "Autoencoder"}


def _itemsize(dtype) -> int:
    return 8 if "64" in str(dtype) else 4


def memory_estimate(model, n_cells: int, n_genes: int, n_factors: int, n_covariates: int = 0,
                    dtype: str = "float32", hidden: int = 0) -> int:
    """Estimated peak bytes of fitting ``model`` (a model instance or class name: "Spex", "PPCA", ...) to
    ``n_cells`` x ``n_genes`` data with ``n_factors`` factors in all (for Spex: gene sets + sparse + dense),
    ``n_covariates`` covariate design columns, in ``dtype``; ``hidden``: the widest hidden layer of a network."""
    name = model if isinstance(model, str) else type(model).__name__
    N, G, K, C = int(n_cells), int(n_genes), int(n_factors), int(n_covariates)
    b = _itemsize(dtype)
    small = min(N, G)
    if name in _PER_GENE_BLOCKS:
        D = K + C
        return N * G * (12 + 3 * b) + 6 * G * D * D * b + 8 * (N + G) * D * b
    if name == "Slalom":
        return N * G * (12 + 3 * b) + 16 * G * (K + C) * b + 8 * N * (K + C) * b
    if name in ("PPCA", "FactorAnalysis"):
        return N * G * (12 + 3 * b) + 3 * small * small * b + 8 * (N + G) * K * 8
    if name == "PCA":
        return N * G * (4 + 2 * b) + 2 * small * small * b + 4 * (N + G) * K * 8
    if name == "NMF":
        return N * G * (4 + 4 * b) + 8 * (N + G) * K * b
    if name in _NETWORKS:
        width = max(int(hidden), K)
        return N * G * (12 + 4 * b) + 8 * G * (width + K) * b
    return N * G * (12 + 3 * b) + 8 * (N + G) * (K + C) * b  # an unknown model: the data and factor-sized arrays


def _n_factors(model, var_names, annotations) -> int:
    """All factors the fit will have: gene sets kept by the model's filters plus its unannotated factors."""
    if hasattr(model, "n_latent"):
        return int(model.n_latent)
    free = int(getattr(model, "n_sparse", 0) or 0) + int(getattr(model, "n_dense", 0) or 0)
    if type(model).__name__ in ("Supervised",) or (not free and hasattr(model, "n_factors")):
        free = int(model.n_factors)
    if annotations is None or not hasattr(model, "min_set_size"):
        return free
    from .data.genesets import annotation_mask

    with warnings.catch_warnings():  # "N gene sets were dropped": the fit says it, once
        warnings.simplefilter("ignore")
        mask, _ = annotation_mask(annotations, var_names, model.min_set_size, model.max_set_size,
                                  getattr(model, "min_set_fraction", 0.0))
    if type(model).__name__ == "NMF":  # gene sets are factors; n_factors counts them
        return max(free, mask.shape[1])
    return free + mask.shape[1]


def fit_memory_estimate(model, data, annotations=None, covariates=None, layer=None) -> int:
    """Estimated peak bytes of ``model.fit(data, annotations=..., covariates=..., layer=...)``: the shapes come from
    ``data`` (AnnData, DataFrame, array, sparse), the gene sets kept by the model's size filters and the covariate
    design's columns. Reads no expression values (data held in memory are assumed; a backed AnnData that Spex
    streams needs less)."""
    n_cells, n_genes = (data.layers[layer] if layer is not None and hasattr(data, "layers") else data).shape
    var_names = getattr(data, "var_names", None)
    if var_names is None:
        var_names = getattr(data, "columns", None)
    if var_names is None:
        var_names = [f"gene_{j}" for j in range(n_genes)]
    K = _n_factors(model, var_names, annotations)
    C = 0
    if covariates is not None and len(covariates):
        from .data.inputs import covariate_design

        C = covariate_design(getattr(data, "obs", None), covariates, n_cells)[0].shape[1]
    hidden = max([int(h) for h in getattr(model, "hidden", ()) or ()] or [0])
    return memory_estimate(model, n_cells, n_genes, K, C, dtype=getattr(model, "dtype", "float32"), hidden=hidden)


def _read_int(path) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (no limit) is not a number


def _cgroup_room() -> int | None:
    """Bytes left under this process's cgroup memory limit (v2 or v1), or None when there is no limit."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 1 << 60:  # v1 writes ~2^63 for "no limit"
            return max(limit - usage, 0)
    return None


def available_memory(device=None) -> int | None:
    """Bytes available to a fit: on a CUDA ``device`` the GPU's free memory; otherwise the host's
    ``MemAvailable`` (/proc/meminfo; else ``os.sysconf`` available pages), capped by a cgroup memory limit and by
    the address space left under ``ulimit -v``. ``None`` when it cannot be told."""
    if device is not None and str(device).startswith("cuda"):
        try:
            import torch

            return int(torch.cuda.mem_get_info(torch.device(device))[0])
        except Exception:  # noqa: BLE001 - no CUDA or no such device: the fit reports that itself
            return None
    free = _proc_kib("/proc/meminfo", "MemAvailable:")
    if free is None:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            free = None
    for room in (_cgroup_room(), _address_space_room()):
        if room is not None:
            free = room if free is None else min(free, room)
    return free


def _address_space_room() -> int | None:
    """Bytes of address space left under this process's ``ulimit -v`` (RLIMIT_AS), or None without a limit."""
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    except (ImportError, OSError, ValueError, AttributeError):
        return None
    if limit == resource.RLIM_INFINITY or limit < 0:
        return None
    used = _proc_kib("/proc/self/status", "VmSize:")
    return max(int(limit) - (used or 0), 0)


def _proc_kib(path: str, field: str) -> int | None:
    """Bytes of a ``field: N kB`` line of a /proc file, or None where it cannot be read."""
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def format_bytes(n: float) -> str:
    """``1.5 GiB``-style size."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def check_memory(model, n_cells: int, n_genes: int, n_factors: int, n_covariates: int = 0, device=None,
                 available: int | None = None, hidden: int | None = None) -> int | None:
    """Raise :class:`InsufficientMemoryError` (one line: the estimate, the available memory and what to change)
    when :func:`memory_estimate` of ``model`` (its dtype, and its widest hidden layer unless ``hidden`` is given)
    exceeds ``available`` (default: :func:`available_memory` of ``device``; "auto" means what the fit would pick).
    Returns the estimate in bytes, or ``None`` without a verdict when the available memory is unknown. For a
    ``fit`` that knows its shapes (after ``as_matrix``, the gene-set filter and the covariate design)."""
    if hidden is None:
        hidden = max([int(h) for h in getattr(model, "hidden", ()) or ()] or [0])
    need = memory_estimate(model, n_cells, n_genes, n_factors, n_covariates,
                           dtype=getattr(model, "dtype", "float32"), hidden=hidden)
    if available is None:
        if device is not None and str(device) == "auto":
            from .train import resolve_device

            device = resolve_device(device)
        available = available_memory(device)
    if available is None:
        return None
    if need <= available:
        return need
    hint = ("fewer factors (fewer gene sets: raise the minimum set size or lower the maximum; fewer unannotated "
            "factors)" if hasattr(model, "min_set_size") else "fewer factors")
    raise InsufficientMemoryError(
        f"fitting {type(model).__name__} with {int(n_factors)} factors to {int(n_cells)} cells x {int(n_genes)} "
        f"genes needs about {format_bytes(need)} of memory (estimate) but {format_bytes(available)} is available; "
        f"use {hint}, fewer genes (e.g. highly variable genes) or fewer cells, or a machine with more memory")


def check_fit_memory(model, data, annotations=None, covariates=None, layer=None, device=None,
                     available: int | None = None) -> int | None:
    """:func:`check_memory` for ``model.fit(data, annotations=..., covariates=..., layer=..., device=...)``, the
    shapes taken as :func:`fit_memory_estimate` takes them; before a fit (``pathfactor fit`` calls it). ``None``,
    without a verdict, also when the arguments are such that the fit itself refuses them (gene sets that match
    nothing, an unknown covariate or device, as many factors as genes or cells): the fit's own message then says
    what is wrong."""
    try:
        n_cells, n_genes = (data.layers[layer] if layer is not None and hasattr(data, "layers") else data).shape
        var_names = getattr(data, "var_names", None)
        if var_names is None:
            var_names = getattr(data, "columns", None)
        K = _n_factors(model, [f"gene_{j}" for j in range(n_genes)] if var_names is None else var_names,
                       annotations)
        C = 0
        if covariates is not None and len(covariates):
            from .data.inputs import covariate_design

            C = covariate_design(getattr(data, "obs", None), covariates, n_cells)[0].shape[1]
        if K + C >= min(n_cells, n_genes):
            return None
        if available is None and device is not None and str(device) == "auto":
            from .train import resolve_device

            device = resolve_device(device)
    except (ValueError, TypeError, KeyError):
        return None
    return check_memory(model, n_cells, n_genes, K, C, device=device, available=available)
