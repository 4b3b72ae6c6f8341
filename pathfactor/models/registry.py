"""The registry of model classes by name: filled as each model class is defined, read by ``load`` and by the
AnnData readers that tell a pathfactor result from another tool's. The built-in models are known by name before
their modules are imported (each imports on first use, so that a fit pays only for its own model)."""
import importlib

__all__ = ["REGISTRY", "MODEL_MODULES", "model_class", "is_model_name", "model_names"]

#: model class name -> class, filled by ``LatentModel.__init_subclass__``
REGISTRY: dict[str, type] = {}

#: built-in model class name -> the module of ``pathfactor.models`` that defines it
MODEL_MODULES = {"Autoencoder": "autoencoder", "FactorAnalysis": "factor_analysis", "GMVAE": "gmvae", "NMF": "nmf",
                 "PCA": "pca", "PPCA": "ppca", "Slalom": "slalom", "Spex": "spex", "Supervised": "supervised",
                 "VAE": "vae"}


def model_class(name: str) -> type | None:
    """The model class called ``name`` (a built-in one is imported here), or None."""
    if name not in REGISTRY and name in MODEL_MODULES:
        importlib.import_module(f"{__package__}.{MODEL_MODULES[name]}")
    return REGISTRY.get(name)


def is_model_name(name) -> bool:
    """Whether ``name`` names a built-in or a defined model class (nothing is imported)."""
    return isinstance(name, str) and (name in MODEL_MODULES or name in REGISTRY)


def model_names() -> list[str]:
    """Every known model class name, sorted."""
    return sorted(set(MODEL_MODULES) | set(REGISTRY))
