"""The ``pathfactor`` command line: ``demo``, ``fit``, ``simulate`` and ``report``.

Results go to stdout, logging and progress bars to stderr (``--quiet`` silences both). Bad input -- a missing
file, data the model refuses, an unknown column -- prints one line ``pathfactor: error: <message>`` to stderr and
exits with status 2, without a traceback.

Models are listed in :data:`pathfactor.catalog.MODELS` (shared with ``pf.tl``): a name, the class (imported lazily)
and which CLI options become which constructor arguments. A new model is one more entry there.
"""
from __future__ import annotations

import argparse
import inspect
import logging
import sys
import time
from pathlib import Path

from .catalog import MODEL_OPTIONS, MODELS, ModelSpec, constructor_defaults  # noqa: F401 (ModelSpec re-exported)

__all__ = ["main", "MODELS", "ModelSpec", "build_parser"]

log = logging.getLogger("pathfactor.cli")

PROG = "pathfactor"
#: exit status for bad input (as argparse uses for bad arguments)
EXIT_BAD_INPUT = 2
#: ``pathfactor simulate KIND``: the keys of ``pathfactor.data.simulate.SIMULATORS`` (a test checks they agree;
#: listed here so that ``--help`` does not import the simulators' numpy / anndata)
SIMULATOR_KINDS = ["annotations", "ppca"]
#: errors that mean "the input is wrong": reported in one line, no traceback
INPUT_ERRORS = (ValueError, FileNotFoundError, KeyError, EOFError, OSError, FloatingPointError)


# ============================================================================ the model table (catalog.py)
def _defaults_text(dest: str) -> str:
    """`` (default: spex 0, slalom 0)`` for a model-specific option: each model's own default for it."""
    parts = []
    for name, spec in MODELS.items():
        keyword = spec.options.get(dest)
        if keyword is not None:
            value = constructor_defaults(spec.load.class_name).get(keyword)
            if value is not None:
                parts.append(f"{name} {value}")
    return f" (default: {', '.join(parts)})" if parts else ""


def build_model(name: str, args: argparse.Namespace):
    """The model ``name`` constructed from the parsed CLI options."""
    spec = MODELS[name]
    cls = spec.load()
    accepted = inspect.signature(cls.__init__).parameters
    unused = [flag for dest, flag in MODEL_OPTIONS.items()
              if getattr(args, dest, None) is not None and dest not in spec.options]
    if unused:
        raise ValueError(f"{', '.join(unused)} do(es) not apply to --model {name}")
    kwargs = {ctor: getattr(args, dest) for dest, ctor in spec.options.items() if getattr(args, dest, None) is not None}
    likelihood = getattr(args, "likelihood", None)
    if likelihood is not None:  # any model whose constructor takes a likelihood
        if "likelihood" not in accepted:
            raise ValueError(f"--likelihood does not apply to --model {name}")
        kwargs["likelihood"] = likelihood  # one name or {view: name} (cmd_fit parses --likelihood)
    if "progress" in accepted:
        kwargs["progress"] = not args.quiet
    return cls(**kwargs)


def _fit_kwargs(model, **given) -> dict:
    """Keep the ``fit`` arguments the model takes; an argument the user set but the model lacks is an error."""
    params = inspect.signature(model.fit).parameters
    flags = {"annotations": "--gene-sets", "layer": "--layer", "covariates": "--covariates", "device": "--device",
             "seed": "--seed", "weights": "--weights-layer", "checkpoint_dir": "--checkpoint",
             "use_highly_variable": "--all-genes", "interventions": "--interventions", "reference": "--reference",
             "allow_missing": "--allow-missing"}
    out = {}
    for key, value in given.items():
        if key in params:
            out[key] = value
        elif value is not None and key not in ("device", "seed"):
            raise ValueError(f"{type(model).__name__} does not take {flags.get(key, key)}")
    return out


# ============================================================================ helpers
class _StderrHandler(logging.StreamHandler):
    """A stream handler that always writes to the current ``sys.stderr`` (so it survives redirection)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _setup_logging(quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", handlers=[_StderrHandler()])
    logging.getLogger("pathfactor").setLevel(level)


def _read_h5ad(path):
    from .data.inputs import read_h5ad

    adata = read_h5ad(path)
    log.info("read %s: %d cells x %d genes", path, adata.n_obs, adata.n_vars)
    return adata


def _is_h5mu(path) -> bool:
    return str(path).lower().endswith(".h5mu")


def _read_h5mu(path):
    from .data.views import read_h5mu

    mdata = read_h5mu(path)
    log.info("read %s: %d cells; views %s", path, mdata.n_obs,
             ", ".join(f"{v} ({m.n_vars} features)" for v, m in mdata.mod.items()))
    return mdata


def _write_data(data, path) -> Path:
    """``data`` to ``path``: an AnnData as .h5ad, a MuData (several views) as .h5mu."""
    from .data.views import is_mudata

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    (data.write_h5mu if is_mudata(data) else data.write_h5ad)(p)
    log.info("wrote %s", p)
    return p


def read_gene_sets(sources):
    """Merge gene-set files (GMT / GMT.gz / JSON) or bundled collection names (``hallmark``, ``reactome_mouse``)."""
    from .data.genesets import BUNDLED, as_gene_sets

    out = None
    for source in sources:
        if not Path(source).exists() and str(source).lower() not in BUNDLED:
            raise FileNotFoundError(f"gene set file {str(source)!r} does not exist and is not a bundled collection "
                                    f"({', '.join(BUNDLED)})")
        sets = as_gene_sets(str(source))
        log.info("gene sets %s: %d sets", source, len(sets))
        out = sets if out is None else out + sets
    return out


#: ``--likelihood`` values: Spex's (also per view, ``VIEW:LIK``) and the count models' (vae, gmvae)
SPEX_LIKELIHOODS = ("normal", "gaussian", "nb", "poisson", "bernoulli")
COUNT_LIKELIHOODS = ("poisson", "nb", "zip", "zinb", "gaussian", "normal")


def _parse_view_weights(values, multiview: bool):
    """``--view-weights``: None, ``"balanced"`` or ``{view: weight}`` (the views are checked by the fit)."""
    if not values:
        return None
    if not multiview:
        raise ValueError("--view-weights applies to an .h5mu input (several views)")
    if values == ["balanced"]:
        return "balanced"
    weights = {}
    for value in values:
        view, sep, number = value.partition(":")
        try:
            weight = float(number)
        except ValueError:
            weight = None
        if not sep or weight is None or not weight > 0 or weight == float("inf"):
            raise ValueError(f"--view-weights {value!r}: give 'balanced' (alone) or VIEW:W with a positive number W")
        weights[view] = weight
    return weights


def _parse_likelihood(values, model: str) -> tuple[str | None, dict[str, str]]:
    """``--likelihood`` values as (the plain value or None, ``{view: likelihood}`` of the ``VIEW:LIK`` forms);
    likelihood names hold no ':', so a value splits at its last ':'."""
    if not values:
        return None, {}
    allowed = SPEX_LIKELIHOODS if model == "spex" else COUNT_LIKELIHOODS
    plain, per_view = [], {}
    for value in values:
        view, sep, lik = str(value).rpartition(":")
        view, lik = view.strip(), lik.strip()
        if lik not in allowed:
            raise ValueError(f"argument --likelihood: invalid choice: {lik!r} for --model {model} (choose from "
                             f"{', '.join(allowed)}" + (", or VIEW:LIK per view)" if model == "spex" else ")"))
        if not sep:
            plain.append(lik)
            continue
        if model != "spex":
            raise ValueError(f"--likelihood VIEW:LIK (got {value!r}) applies to --model spex with a .h5mu input; "
                             f"--model {model} takes one plain likelihood")
        if not view:
            raise ValueError(f"--likelihood {value!r} has no view before ':'; write VIEW:LIK")
        if view in per_view and per_view[view] != lik:
            raise ValueError(f"--likelihood gives view {view!r} two likelihoods: {per_view[view]!r} and {lik!r}")
        per_view[view] = lik
    if len(set(plain)) > 1:
        raise ValueError(f"--likelihood was given several plain values {plain}; give one (for every view) and "
                         "VIEW:LIK for the views that differ")
    return (plain[0] if plain else None), per_view


def _view_likelihoods(default: str | None, per_view: dict, views: list[str]):
    """The likelihood to fit a MuData with views ``views``: one name, or ``{view: likelihood}`` (views
    ``per_view`` leaves out get ``default``, else normal)."""
    unknown = [v for v in per_view if v not in views]
    if unknown:
        raise ValueError(f"--likelihood names view(s) {unknown} that the input does not have (views: "
                         f"{', '.join(views)})")
    if not per_view:
        return default
    return {v: per_view.get(v, default or "normal") for v in views}


def _view_gene_sets(values, views: list[str]):
    """``--gene-sets VIEW:PATH`` values for a MuData with views ``views``: the gene sets per view (``{view:
    GeneSets}``; with one view, that view's GeneSets). A value splits at its first ':' only when what precedes it
    is a view name; anything else is an error asking for VIEW:PATH."""
    if not values:
        return None
    sources: dict[str, list[str]] = {}
    for value in values:
        view, sep, path = str(value).partition(":")
        if not sep or view not in views:
            raise ValueError(f"--gene-sets {value!r}: with a .h5mu input give the gene sets per view as VIEW:PATH "
                             f"(views: {', '.join(views)}), e.g. --gene-sets {views[0]}:hallmark")
        if not path:
            raise ValueError(f"--gene-sets {value!r} has no file after '{view}:'; write VIEW:PATH")
        sources.setdefault(view, []).append(path)
    sets = {view: read_gene_sets(paths) for view, paths in sources.items()}
    return sets[views[0]] if len(views) == 1 else sets


def _format_views(model, n: int = 10) -> str:
    """The factors x views relevance table of a multi-view fit, for the ``n`` most relevant factors."""
    table = model.relevance_views_
    shown = [f for f in model.relevance().index[:n] if f in table.index]
    views = [str(v) for v in table.columns]
    width = max([len("factor")] + [len(str(f)) for f in shown])
    cols = [max(len(v), 8) for v in views]
    liks = getattr(model, "view_likelihoods_", None) or {}
    lines = [f"relevance per view, top {len(shown)} factors ("
             + ", ".join(f"{v}: {liks.get(v, '?')}" for v in views) + "):",
             f"  {'factor':<{width}}  " + "  ".join(f"{v:>{w}}" for v, w in zip(views, cols))]
    for f in shown:
        lines.append(f"  {str(f):<{width}}  " + "  ".join(f"{table.at[f, v]:{w}.4f}"
                                                         for v, w in zip(table.columns, cols)))
    return "\n".join(lines)


def _split_columns(values) -> list[str] | None:
    if not values:
        return None
    cols = [c.strip() for v in values for c in v.split(",") if c.strip()]
    return cols or None


def _check_obs_column(adata, column: str, flag: str) -> None:
    if column is not None and column not in adata.obs.columns:
        available = ", ".join(map(str, adata.obs.columns)) or "(none)"
        raise ValueError(f"{flag} {column!r} is not a column of adata.obs; available columns: {available}")


def _parse_reference(values) -> str | dict | None:
    """``--reference`` values as fit's ``reference``: one bare ``LEVEL`` -> that string; ``COL=LEVEL`` forms (split
    at the first ``=``) -> ``{COL: LEVEL}``. Several bare levels, or bare levels mixed with ``COL=LEVEL``, are
    errors."""
    if not values:
        return None
    keyed = [v for v in values if "=" in v]
    if keyed and len(keyed) < len(values):
        raise ValueError(f"--reference takes either one LEVEL or COL=LEVEL forms, not both (got {list(values)}); "
                         "write each as COL=LEVEL")
    if not keyed:
        if len(values) > 1:
            raise ValueError(f"--reference was given {len(values)} bare levels {list(values)}; give one LEVEL, or "
                             "COL=LEVEL for each column")
        if not values[0].strip():
            raise ValueError("--reference needs a level")
        return values[0]
    out: dict[str, str] = {}
    for value in values:
        col, _, level = value.partition("=")
        col = col.strip()
        if not col or not level:
            raise ValueError(f"--reference {value!r} is not COL=LEVEL")
        if col in out and out[col] != level:
            raise ValueError(f"--reference gives column {col!r} two levels: {out[col]!r} and {level!r}")
        out[col] = level
    return out


def _check_reference(reference, interventions: str | None, covariates: list[str] | None) -> None:
    """``--reference`` needs something to apply to, and a ``COL=LEVEL`` its column among the fitted ones."""
    if reference is None:
        return
    if interventions is None and not covariates:
        raise ValueError("--reference sets the reference level of --interventions or of categorical --covariates; "
                         "give one of them")
    if isinstance(reference, dict):
        known = ([interventions] if interventions is not None else []) + list(covariates or [])
        unknown = [col for col in reference if col not in known]
        if unknown:
            raise ValueError(f"--reference names column(s) {unknown} that are neither --interventions nor "
                             f"--covariates (those are: {', '.join(known)})")


def _reference_lines(model, interventions: str | None, reference) -> list[str]:
    """``reference level of 'COL': LEVEL (given | most frequent)`` for the interventions and each categorical
    covariate of the fitted model."""
    lines = []
    level = getattr(model, "intervention_reference_", None)
    if interventions is not None and level is not None:
        asked = reference.get(interventions) if isinstance(reference, dict) else reference
        lines.append(f"reference level of {interventions!r}: {level} "
                     f"({'given' if asked is not None else 'most frequent'})")
    for col, levels in (getattr(model, "covariate_levels_", None) or {}).items():
        if isinstance(reference, dict):
            given = col in reference
        else:  # one bare level applies to the covariates only without interventions
            given = reference is not None and interventions is None and str(levels[0]) == str(reference)
        lines.append(f"reference level of {col!r}: {levels[0]} ({'given' if given else 'most frequent'})")
    return lines


def _intervention_lines(model, n: int = 5, alpha: float = 0.05, max_levels: int = 20) -> list[str]:
    """Per intervention level: how many factors it moves (lfsr < ``alpha``) and the ``n`` largest of them; beyond
    ``max_levels`` levels, the ``max_levels`` that move the most factors (in their order) and a line for the rest."""
    lfsr = getattr(model, "intervention_effects_lfsr_", None)
    if lfsr is None:
        return []
    from .evaluate import one_gene_factors

    effects, lines = model.intervention_effects_, []
    one_gene = one_gene_factors(model.loadings_).to_dict()
    n_called = (lfsr < alpha).sum(axis=0)
    shown = list(lfsr.columns)
    if len(shown) > max_levels:
        best = lfsr.min(axis=0).fillna(1.0)
        ranked = set(sorted(shown, key=lambda level: (-int(n_called[level]), float(best[level])))[:max_levels])
        shown = [level for level in lfsr.columns if level in ranked]
    for level in shown:
        if lfsr[level].isna().all():
            lines.append(f"{level} vs {model.intervention_reference_}: no lfsr (a single cell)")
            continue
        called = lfsr.index[lfsr[level] < alpha]
        top = effects.loc[called, level].abs().sort_values(ascending=False).index[:n]
        largest = ", ".join(f"{f} {effects.at[f, level]:+.2f}"
                            + (f" [one gene: {one_gene[f]}]" if f in one_gene else "") for f in top)
        lines.append(f"{level} vs {model.intervention_reference_}: {len(called)} factor(s) moved at lfsr < {alpha:g}"
                     + (f" (largest: {largest})" if len(top) else ""))
    rest = [level for level in lfsr.columns if level not in set(shown)]
    if rest:
        lines.append(f"... and {len(rest)} more levels, {int((n_called[rest] > 0).sum())} of them moving a factor at "
                     f"lfsr < {alpha:g} (every level is in the output's intervention_effects_lfsr)")
    return lines


def _format_top(model, n: int = 10) -> str:
    rel = model.relevance()
    kinds = model.factor_kinds_
    shown = rel.index[:n]
    width = max([len("factor")] + [len(str(f)) for f in shown])
    measure = model.relevance_measure
    lines = [f"top {len(shown)} of {len(rel)} factors by relevance ({measure} on the training data):",
             f"  {'factor':<{width}}  {'kind':<9}  {measure:>10}"]
    for f in shown:
        flag = "" if model.active_[f] else "  (inactive)"
        lines.append(f"  {str(f):<{width}}  {kinds[f]:<9}  {rel[f]:10.4f}{flag}")
    return "\n".join(lines)


# ============================================================================ commands
def cmd_demo(args) -> int:
    from . import evaluate
    from .data import datasets
    from .models import Spex
    from .report import write_report

    start = time.perf_counter()
    out = Path(args.out)
    adata = datasets.mesc()
    sets = datasets.gene_sets("hallmark")
    print(f"pathfactor demo: Spex(n_sparse=2, n_dense=2) on the Buettner et al. 2015 mESC data "
          f"({adata.n_obs} cells x {adata.n_vars} genes) with the {len(sets)} MSigDB Hallmark gene sets")
    model = Spex(n_sparse=2, n_dense=2, progress=not args.quiet)
    model.fit(adata, annotations=sets, device=args.device, seed=args.seed)
    model.write(adata)
    out.mkdir(parents=True, exist_ok=True)
    h5ad = _write_data(adata, out / "mesc_spex.h5ad")
    html = write_report(adata, out, key=model.key, color_by="cell_cycle_stage")
    print(_format_top(model, 10))
    term = "HALLMARK_G2M_CHECKPOINT"
    if term in model.factor_scores_.columns:
        auc = evaluate.auroc(model.factor_scores_[term], adata.obs["cell_cycle_stage"], "G2M")
        print(f"AUROC of the {term} factor score, G2M vs other cells: {auc:.3f}")
    else:  # pragma: no cover - the bundled data always keep this set
        print(f"{term} was filtered out, no AUROC")
    print(f"wrote {h5ad} and {html}")
    print(f"elapsed: {time.perf_counter() - start:.1f} s")
    return 0


def cmd_fit(args) -> int:
    from .memory import check_fit_memory, format_bytes
    from .models.anndata_io import check_key

    spec = MODELS[args.model]
    if spec.gene_sets == "required" and not args.gene_sets and not _is_h5mu(args.input):
        # several views may be fitted with unannotated factors only (a view without sets gets those anyway)
        raise ValueError(f"--model {args.model} needs --gene-sets (a GMT/JSON file or one of: hallmark, reactome_mouse)")
    if spec.gene_sets == "unused" and args.gene_sets:
        raise ValueError(f"--model {args.model} does not use gene sets; drop --gene-sets")
    if args.color_by is not None and args.report is None:
        raise ValueError("--color-by only applies with --report DIR")
    multiview = _is_h5mu(args.input)
    if multiview and args.model != "spex":
        raise ValueError(f"a .h5mu input (several views) is fitted by --model spex only, not --model {args.model}")
    if multiview and not _is_h5mu(args.out):
        raise ValueError(f"--out {args.out!r}: a .h5mu input is written as .h5mu (one .h5ad cannot hold several "
                         "views' loadings); give --out OUT.h5mu")
    lik_default, lik_views = _parse_likelihood(args.likelihood, args.model)
    if lik_views and not multiview:
        raise ValueError(f"--likelihood VIEW:LIK needs a .h5mu input (several views); {args.input!r} has one view: "
                         "give one plain likelihood")
    args.likelihood = lik_views or lik_default  # the views are checked (and the default filled in) after reading
    view_weights = _parse_view_weights(args.view_weights, multiview)
    start = time.perf_counter()
    model = build_model(args.model, args)  # option errors before any reading
    if view_weights is not None:
        model.view_weights = view_weights
    covariates = _split_columns(args.covariates)
    interventions = args.interventions
    reference = _parse_reference(args.reference)
    _fit_kwargs(model, interventions=interventions, reference=reference)  # a model without them: before reading
    _check_reference(reference, interventions, covariates)
    _fit_kwargs(model, allow_missing=True if args.allow_missing else None)  # a model without it: before reading
    adata = _read_h5mu(args.input) if multiview else _read_h5ad(args.input)
    _check_obs_column(adata, args.color_by, "--color-by")
    _check_obs_column(adata, interventions, "--interventions")
    key = args.key or model.key
    check_key(adata, key)  # a key another tool wrote (e.g. scanpy's pca, umap) is refused before the fit
    if multiview:
        views = [str(v) for v in adata.mod]
        if not views:
            raise ValueError(f"{args.input!r} holds no views (modalities)")
        model.likelihood = _view_likelihoods(lik_default, lik_views, views) or model.likelihood
        sets = _view_gene_sets(args.gene_sets, views)
    else:
        sets = read_gene_sets(args.gene_sets) if args.gene_sets else None
    fit_kwargs = _fit_kwargs(model, annotations=sets, layer=args.layer, covariates=covariates, device=args.device,
                             seed=args.seed, weights=args.weights_layer, checkpoint_dir=args.checkpoint,
                             use_highly_variable=False if args.all_genes else None, interventions=interventions,
                             reference=reference, allow_missing=True if args.allow_missing else None)
    need = None
    if not multiview:  # the memory estimate is of one matrix
        need = check_fit_memory(model, adata, annotations=sets, covariates=covariates, layer=args.layer,
                                device=fit_kwargs.get("device"))  # refuses a fit whose memory does not fit
    log.info("fitting %r%s", model, "" if need is None else f" (about {format_bytes(need)} of memory)")
    try:
        model.fit(adata, **fit_kwargs)
    except ValueError as err:  # the Python API's argument, as the CLI flag
        text = str(err)
        if "allow_missing=True" not in text:
            raise
        for spelled in ("allow_missing=True (CLI --allow-missing)", "fit(..., allow_missing=True)"):
            text = text.replace(spelled, "--allow-missing")
        raise ValueError(text.replace("allow_missing=True", "--allow-missing")) from None
    model.write(adata, key=key)
    _write_data(adata, args.out)
    if args.save_model:
        log.info("saved the model to %s", model.save(args.save_model))
    report = None
    if args.report:
        from .report import write_report  # imported when asked for: matplotlib takes ~0.5 s to import

        report = write_report(adata, args.report, key=key, color_by=args.color_by, gene_set_urls=sets)
        log.info("wrote %s", report)
    n_ann = int((model.factor_kinds_ == "annotated").sum())
    if multiview:
        shape = f"{adata.n_obs} cells; views " + ", ".join(f"{v} ({m.n_vars} features)" for v, m in adata.mod.items())
    else:
        left_out = len(getattr(model, "genes_left_out_", None) or ())
        shape = f"{adata.n_obs} cells x {adata.n_vars - left_out} genes" + (
            f" (the highly variable of {adata.n_vars}; --all-genes fits every gene)" if left_out else "")
    print(f"{type(model).__name__}: {len(model.factor_kinds_)} factors ({n_ann} annotated), "
          f"{int(model.active_.sum())} active; {shape}")
    for line in _reference_lines(model, interventions, reference) + _intervention_lines(model):
        print(line)
    print(_format_top(model, 10))
    if multiview and getattr(model, "relevance_views_", None) is not None:
        print(_format_views(model, 10))
    print(f"wrote {args.out}" + (f" and {report}" if report else "")
          + (f"; model saved to {args.save_model}" if args.save_model else ""))
    print(f"elapsed: {time.perf_counter() - start:.1f} s")
    return 0


def cmd_simulate(args) -> int:
    from .data.simulate import SIMULATORS

    simulator = SIMULATORS[args.kind]
    accepted = inspect.signature(simulator).parameters
    given = {name: getattr(args, name) for name in ("n_cells", "n_genes", "n_factors", "noise", "sigma2", "seed")
             if getattr(args, name) is not None}
    unused = [f"--{name.replace('_', '-')}" for name in given if name not in accepted]
    if unused:
        raise ValueError(f"simulate {args.kind} does not take {', '.join(unused)}")
    adata = simulator(**given)
    _write_data(adata, args.out)
    print(f"simulated {args.kind}: {adata.n_obs} cells x {adata.n_vars} genes; wrote {args.out}")
    return 0


def cmd_report(args) -> int:
    from .report import write_report

    adata = _read_h5mu(args.input) if _is_h5mu(args.input) else _read_h5ad(args.input)
    html = write_report(adata, args.out, key=args.key, color_by=args.color_by)
    print(f"wrote {html}")
    return 0


# ============================================================================ parser
def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog=PROG, description="Interpretable gene programs from single-cell data: latent factor models guided "
                               "by gene sets.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def common(p, seed: int | None | bool = 0):
        p.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no info logging")
        if seed is not False:
            p.add_argument("--seed", type=int, default=seed, metavar="S",
                           help="random seed (default " + ("0)" if seed is None else f"{seed})"))

    p = sub.add_parser("demo", help="fit Spex to the bundled mESC cell-cycle data and write a report",
                       description="Spex(n_sparse=2, n_dense=2) on the bundled Buettner et al. 2015 mESC data with "
                                   "the MSigDB Hallmark sets; writes DIR/mesc_spex.h5ad and DIR/report.html.")
    p.add_argument("--out", default="pathfactor-demo", metavar="DIR", help="output folder (default pathfactor-demo)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1, ...")
    common(p)
    p.set_defaults(func=cmd_demo)

    models = ", ".join(f"{name} ({spec.help})" for name, spec in MODELS.items())
    p = sub.add_parser("fit", help="fit a model to an .h5ad file (or spex to an .h5mu file of several views)",
                       description=f"Fit a latent factor model to INPUT.h5ad and write the results to OUT.h5ad "
                                   f"(obsm['X_<key>'], varm['<key>_loadings'], uns['<key>'], obs['<key>_<factor>'] "
                                   f"for the most relevant factors; --key). Spex also fits an INPUT.h5mu (MuData, "
                                   f"several views; needs the mudata package) into OUT.h5mu: obsm['X_<key>'], each "
                                   f"view's varm['<key>_loadings'] and uns['<key>'] with the factors x views "
                                   f"relevance. Models: {models}.")
    p.add_argument("input", metavar="INPUT.h5ad|INPUT.h5mu")
    p.add_argument("--model", choices=sorted(MODELS), default="spex", help="model (default spex)")
    p.add_argument("--gene-sets", action="append", metavar="FILE|VIEW:FILE",
                   help="GMT, GMT.gz or JSON file, or a bundled collection (hallmark, reactome_mouse); repeat to "
                        "merge several. With an .h5mu input, per view: VIEW:FILE (e.g. rna:hallmark)")
    p.add_argument("--layer", default=None, help="adata.layers entry to fit (default adata.X)")
    p.add_argument("--n-sparse", type=int, default=None, metavar="N", help=("unannotated sparse factors") + _defaults_text("n_sparse"))
    p.add_argument("--n-dense", type=int, default=None, metavar="N", help=("unannotated dense factors") + _defaults_text("n_dense"))
    p.add_argument("--n-factors", type=int, default=None, metavar="K",
                   help=("latent factors (pca, ppca, fa, supervised; latent dimensions of vae, gmvae)") + _defaults_text("n_factors"))
    p.add_argument("--method", choices=["mle", "em", "map", "vi"], default=None, help=("PPCA estimator") + _defaults_text("method"))
    p.add_argument("--posterior", choices=["blocked", "mean-field"], default=None,
                   help=("supervised: joint q(w_g, b_g) per gene (blocked, default) or q(W) q(B)") + _defaults_text("posterior"))
    p.add_argument("--two-step", action="store_const", const=True, default=None,
                   help="supervised: OLS of Y on the covariates, then PPCA of the residuals")
    p.add_argument("--fpr", type=float, default=None, help=("slalom: annotation false-positive rate") + _defaults_text("fpr"))
    p.add_argument("--fnr", type=float, default=None, help=("slalom: annotation false-negative rate") + _defaults_text("fnr"))
    p.add_argument("--loss", choices=["frobenius", "kl"], default=None, help=("nmf: frobenius (log data) or kl (counts)") + _defaults_text("loss"))
    p.add_argument("--likelihood", action="append", default=None, metavar="LIK|VIEW:LIK",
                   help="observation model of the models that take one. vae, gmvae: counts (poisson, nb, zip, "
                        "zinb; raw integer counts) or gaussian (log-normalised data). spex: normal (gaussian), nb or "
                        "poisson (raw counts) or bernoulli (0/1 data); with an .h5mu input also per view, VIEW:LIK "
                        "(repeat; a plain LIK applies to the views not named)")
    p.add_argument("--allow-missing", action="store_true",
                   help="spex: fit NaN entries as missing (otherwise NaN is an error)")
    p.add_argument("--view-weights", action="append", default=None, metavar="balanced|VIEW:W",
                   help="spex with an .h5mu input: 'balanced' gives every view the same total weight (a tempered "
                        "likelihood, as MOFA+'s scale_views), VIEW:W (repeat) sets one view's weight; default: the "
                        "joint likelihood")
    p.add_argument("--n-clusters", type=int, default=None, metavar="C", help=("gmvae: mixture components") + _defaults_text("n_clusters"))
    p.add_argument("--weights-layer", default=None, metavar="LAYER",
                   help="nmf: adata.layers entry of per-entry weights (0 = missing)")
    p.add_argument("--covariates", action="append", metavar="COL[,COL]",
                   help="obs column(s) to regress out (categorical: one effect per non-reference level)")
    p.add_argument("--interventions", default=None, metavar="COL",
                   help="spex, supervised: obs column of perturbations (e.g. the guide's target) whose effects on "
                        "the factors are estimated against the --reference level; written to uns['<key>']"
                        "['intervention_effects'] (and _sd, _lfsr) and varm['<key>_gene_effects']")
    p.add_argument("--reference", action="append", default=None, metavar="LEVEL|COL=LEVEL",
                   help="reference level: one LEVEL for --interventions (without --interventions: for the "
                        "categorical --covariates that have it), or COL=LEVEL per column (repeat); default the "
                        "most frequent level")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1, ...")
    p.add_argument("--max-epochs", type=int, default=None, metavar="E", help=("maximum training epochs") + _defaults_text("max_epochs"))
    p.add_argument("--batch-size", type=int, default=None, metavar="B",
                   help=("cells a minibatch (spex: memoized VI, or blocks of cells with --likelihood nb; a backed "
                         "file is read B cells at a time)") + _defaults_text("batch_size"))
    p.add_argument("--min-set-size", type=int, default=None, metavar="N",
                   help=("drop gene sets with fewer matched genes (model default 15)") + _defaults_text("min_set_size"))
    p.add_argument("--max-set-size", type=int, default=None, metavar="N",
                   help=("drop gene sets with more matched genes (model default 500)") + _defaults_text("max_set_size"))
    p.add_argument("--out", required=True, metavar="OUT.h5ad|OUT.h5mu",
                   help="where to write the data with the results (.h5mu for an .h5mu input)")
    p.add_argument("--report", default=None, metavar="DIR", help="also write DIR/report.html")
    p.add_argument("--color-by", default=None, metavar="COL", help="obs column to colour the report's plots by")
    p.add_argument("--all-genes", action="store_true",
                   help="fit every gene; by default a boolean var['highly_variable'] (sc.pp.highly_variable_genes), "
                        "when present, selects the genes to fit and the others get zero loadings")
    p.add_argument("--checkpoint", default=None, metavar="DIR",
                   help="save the training state to DIR every few epochs and resume from it (spex, supervised)")
    p.add_argument("--save-model", default=None, metavar="DIR", help="save the fitted model (JSON + npz) to DIR")
    p.add_argument("--key", default=None, metavar="NAME",
                   help="write the results under NAME: obsm['X_NAME'], varm['NAME_loadings'], uns['NAME'] and obs "
                        "columns NAME_<factor> for the 10 most relevant factors (default: the model's key, e.g. "
                        "spex, pf_pca); keys another tool wrote are refused")
    common(p)
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("simulate", help="write a simulated data set with its ground truth",
                       description="Simulate data with known factors; options a simulator does not take are errors.")
    p.add_argument("kind", choices=SIMULATOR_KINDS, metavar="KIND", help=f"one of: {', '.join(SIMULATOR_KINDS)}")
    p.add_argument("--out", required=True, metavar="FILE.h5ad")
    p.add_argument("--n-cells", type=int, default=None, metavar="N")
    p.add_argument("--n-genes", type=int, default=None, metavar="G")
    p.add_argument("--n-factors", type=int, default=None, metavar="K")
    p.add_argument("--noise", type=float, default=None, metavar="F", help="annotation noise (annotations only)")
    p.add_argument("--sigma2", type=float, default=None, metavar="S", help="noise variance")
    common(p, seed=None)
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("report", help="write an HTML report of results stored in an .h5ad (or multi-view .h5mu) file")
    p.add_argument("input", metavar="RESULT.h5ad|RESULT.h5mu")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--key", default="spex", help="results key, as given to fit --key (default spex; the models' "
                                                 "own keys: spex, pf_pca, ppca, fa, nmf, ...)")
    p.add_argument("--color-by", default=None, metavar="COL", help="obs column to colour the plots by")
    common(p, seed=False)
    p.set_defaults(func=cmd_report)
    return parser


def _message(err: BaseException) -> str:
    if isinstance(err, KeyError) and len(err.args) == 1:
        text = str(err.args[0])
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())  # one line


def main(argv=None) -> int:
    """Run the CLI with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version, bad arguments: argparse has printed what to say
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    _setup_logging(args.quiet)
    try:
        return args.func(args)
    except INPUT_ERRORS as err:
        print(f"{PROG}: error: {_message(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
