"""Models on one face: ``fit`` / ``transform`` / ``write`` / ``save``; see ``base.LatentModel``."""
from .base import REGISTRY, LatentModel, load
from .spex import Spex
from .supervised import Supervised

__all__ = ["LatentModel", "Spex", "Supervised", "REGISTRY", "load"]
