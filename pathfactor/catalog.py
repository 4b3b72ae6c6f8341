"""The models the fronts know by name (``pathfactor fit --model NAME``, ``pf.tl.<tool>``): for each, its class
(imported when first needed, so ``pathfactor --help`` stays fast), which CLI options become which constructor
arguments, and whether it takes gene sets. A new model is one more entry in :data:`MODELS`.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ModelSpec", "MODELS", "MODEL_OPTIONS", "constructor_defaults"]


@dataclass(frozen=True)
class ModelSpec:
    """How ``pathfactor fit --model NAME`` builds a model.

    load : returns the model class (imported when needed, so ``--help`` stays fast)
    options : CLI option dest -> constructor keyword; only options the user gave are passed, so the model's own
        defaults apply otherwise. A model-specific option (see ``MODEL_OPTIONS``) given to a model that has no
        entry for it is an error rather than silently ignored.
    gene_sets : "required", "optional" or "unused" -- whether ``--gene-sets`` must / may / must not be given
    """

    load: Callable[[], type]
    options: Mapping[str, str]
    gene_sets: str = "optional"
    help: str = ""


def _model(name: str):
    """A loader for ``pathfactor.models.<name>`` (imported when needed, so ``--help`` stays fast)."""
    def load():
        from . import models
        return getattr(models, name)
    load.class_name = name
    return load


def constructor_defaults(class_name: str) -> dict:
    """A model's constructor defaults, read from its source file without importing it (``--help`` shows them
    without waiting for torch): ``{parameter: default}`` for the defaults that are plain literals."""
    import ast

    module = {"FactorAnalysis": "factor_analysis"}.get(class_name, class_name.lower())
    tree = ast.parse((Path(__file__).parent / "models" / f"{module}.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            init = next(n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
            args = init.args
            pairs = list(zip(args.args[len(args.args) - len(args.defaults):], args.defaults))
            pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
            out = {}
            for arg, default in pairs:
                try:
                    out[arg.arg] = ast.literal_eval(default)
                except ValueError:
                    pass
            return out
    return {}


#: model-specific CLI options (argparse dest -> the flag, for messages)
MODEL_OPTIONS = {"n_sparse": "--n-sparse", "n_dense": "--n-dense", "min_set_size": "--min-set-size",
                 "max_set_size": "--max-set-size", "max_epochs": "--max-epochs", "n_factors": "--n-factors",
                 "method": "--method", "posterior": "--posterior", "two_step": "--two-step",
                 "loss": "--loss", "fpr": "--fpr", "fnr": "--fnr", "n_clusters": "--n-clusters",
                 "batch_size": "--batch-size"}

_SAME = lambda *names: {n: n for n in names}  # noqa: E731

MODELS: dict[str, ModelSpec] = {
    "spex": ModelSpec(
        load=_model("Spex"),
        options=_SAME("n_sparse", "n_dense", "min_set_size", "max_set_size", "max_epochs", "batch_size"),
        gene_sets="required",
        help="gene-set guided sparse factor analysis (regularised horseshoe, closed-form VI)",
    ),
    "supervised": ModelSpec(
        load=_model("Supervised"), options=_SAME("n_factors", "posterior", "two_step", "max_epochs"),
        gene_sets="unused", help="latent factors next to known covariates (seed 000; needs --covariates and/or --interventions)",
    ),
    "slalom": ModelSpec(
        load=_model("Slalom"), options=_SAME("n_sparse", "n_dense", "min_set_size", "max_set_size", "max_epochs",
                                             "fpr", "fnr"),
        gene_sets="required",
        help="f-scLVM: spike-and-slab factors with annotation FPR/FNR and ARD (variational Bayes)",
    ),
    "autoencoder": ModelSpec(
        load=_model("Autoencoder"), options=_SAME("n_sparse", "n_dense", "min_set_size", "max_set_size", "max_epochs",
                                                  "batch_size"),
        gene_sets="required",
        help="interpretable autoencoder: MLP encoder, linear decoder guided by gene sets (proximal steps)",
    ),
    "nmf": ModelSpec(
        load=_model("NMF"), options=_SAME("n_factors", "loss", "min_set_size", "max_set_size", "max_epochs"),
        gene_sets="optional",
        help="non-negative matrix factorisation (multiplicative updates, Frobenius or KL; gene sets mask W)",
    ),
    "pca": ModelSpec(load=_model("PCA"), options=_SAME("n_factors"), gene_sets="unused",
                     help="PCA baseline (scikit-learn)"),
    "ppca": ModelSpec(load=_model("PPCA"), options=_SAME("n_factors", "method", "max_epochs"), gene_sets="unused",
                      help="probabilistic PCA: closed form, EM, MAP or VI"),
    "fa": ModelSpec(load=_model("FactorAnalysis"), options=_SAME("n_factors", "max_epochs"), gene_sets="unused",
                    help="factor analysis (per-gene noise) by EM"),
    "vae": ModelSpec(load=_model("VAE"), options={"n_factors": "n_latent", "max_epochs": "max_epochs",
                                                  "batch_size": "batch_size"},
                     gene_sets="unused", help="variational autoencoder on counts (--likelihood, default nb)"),
    "gmvae": ModelSpec(load=_model("GMVAE"), options={"n_factors": "n_latent", "max_epochs": "max_epochs",
                                                      "n_clusters": "n_clusters", "batch_size": "batch_size"},
                       gene_sets="unused", help="Gaussian-mixture VAE: clusters in obs['gmvae_cluster']"),
}
