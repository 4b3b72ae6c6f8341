"""pathfactor: interpretable gene programs from single-cell data with prior knowledge and interventions."""
import logging
import os

# Bitwise-reproducible BLAS: without this, MKL picks kernels by memory alignment and the same fit can differ in
# the last float bits between runs. Takes effect if set before MKL's first call; set MKL_CBWR yourself to override.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

__version__ = "0.1.0"

from . import datasets, evaluate, models  # noqa: E402
from .data import simulate  # noqa: E402
from .data.genesets import GeneSets  # noqa: E402
from .models import load  # noqa: E402

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = ["GeneSets", "datasets", "evaluate", "models", "simulate", "load", "__version__"]
