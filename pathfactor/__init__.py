"""pathfactor: interpretable gene programs from single-cell data with prior knowledge and interventions.

The submodules load when first used (``pf.models``, ``pf.tl``, ...), so that ``pathfactor --help`` does not wait
for torch, scanpy and anndata to import.
"""
import importlib
import logging
import os

# Bitwise-reproducible BLAS: without this, MKL picks kernels by memory alignment and the same fit can differ in
# the last float bits between runs. Takes effect if set before MKL's first call; set MKL_CBWR yourself to override.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

#: attribute -> (module, name in it or None for the module itself), imported on first access
_LAZY = {
    "datasets": ("pathfactor.datasets", None),
    "evaluate": ("pathfactor.evaluate", None),
    "models": ("pathfactor.models", None),
    "simulate": ("pathfactor.data.simulate", None),
    "distributed": ("pathfactor.distributed", None),
    "tl": ("pathfactor.tl", None),
    "pl": ("pathfactor.pl", None),
    "GeneSets": ("pathfactor.data.genesets", "GeneSets"),
    "load": ("pathfactor.models", "load"),
}

__all__ = ["GeneSets", "datasets", "evaluate", "models", "simulate", "load", "tl", "pl", "__version__"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'pathfactor' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = importlib.import_module(module)
    value = value if attr is None else getattr(value, attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
