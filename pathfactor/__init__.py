"""pathfactor: interpretable gene programs from single-cell data with prior knowledge and interventions."""
import logging

__version__ = "0.1.0"

from . import datasets, evaluate, models  # noqa: E402
from .data import simulate  # noqa: E402
from .data.genesets import GeneSets  # noqa: E402
from .models import load  # noqa: E402

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = ["GeneSets", "datasets", "evaluate", "models", "simulate", "load", "__version__"]
