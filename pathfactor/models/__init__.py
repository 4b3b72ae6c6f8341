"""Models on one face: ``fit`` / ``transform`` / ``write`` / ``save``; see ``base.LatentModel``.

Each model class is imported on first access (``pathfactor.models.Spex`` imports Spex's modules only)."""
from .base import LatentModel, load
from .registry import MODEL_MODULES, REGISTRY as _REGISTRY, model_class

__all__ = ["LatentModel", "Autoencoder", "PCA", "PPCA", "FactorAnalysis", "NMF", "Slalom", "Spex", "Supervised", "VAE", "GMVAE", "REGISTRY", "load"]


def __getattr__(name: str):
    if name == "REGISTRY":  # every model class by name: the built-in ones are imported first
        for model in MODEL_MODULES:
            model_class(model)
        globals()[name] = _REGISTRY
        return _REGISTRY
    if name not in MODEL_MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    cls = model_class(name)
    globals()[name] = cls
    return cls


def __dir__():
    return sorted(set(globals()) | set(MODEL_MODULES) | {"REGISTRY"})
