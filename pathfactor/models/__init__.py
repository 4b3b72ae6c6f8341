"""Models on one face: ``fit`` / ``transform`` / ``write`` / ``save``; see ``base.LatentModel``."""
from .base import REGISTRY, LatentModel, load
from .spex import Spex

__all__ = ["LatentModel", "Spex", "REGISTRY", "load"]
