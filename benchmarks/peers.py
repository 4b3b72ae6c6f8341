"""pathfactor's models and the peers on the same simulated data: one JSON line per (method, size, noise).

Data: ``pathfactor.data.simulate.noisy_annotations`` (spex-LVM's benchmark: sparse loadings, a gene-set
annotation with a fraction ``noise`` of each set's genes swapped). Every method gets the same matrix (its SHA-1
is in the ``data`` field): the gene-set models get the noisy annotation, the others K = n_factors factors.

Methods (``--methods``; peers missing from the environment give a line with ``"skipped"``):
  pathfactor.Spex, pathfactor.Slalom, pathfactor.Autoencoder   gene-set models, README defaults
  pathfactor.PCA, pathfactor.PPCA, pathfactor.FactorAnalysis, pathfactor.NMF
  muvi.MuVI            the noisy annotation as prior mask; its tutorial's settings (prior_confidence=0.99,
                       fit(batch_size=1000, seed)), otherwise MuVI's defaults (10,000 steps, early stopping)
  intercode.Intercode  its notebook's settings (centred data, lr 1e-3, batch 62, 80 epochs, lambda0 0.1,
                       lambda1 0.93, lambda3 0.57)
  sklearn.PCA, sklearn.FactorAnalysis, sklearn.NMF   defaults, K components
NMF needs non-negative data: it gets the data minus each gene's minimum (that shift is added back for R^2).

Each line: method, n_cells, n_genes, n_factors, noise, seconds (wall clock of building and fitting the model),
process_seconds (wall clock of the method's whole fresh process: interpreter start, imports, reading the data, fit;
pathfactor's bytecode is written first, as pip writes every installed package's),
peak_rss_mb (``ru_maxrss`` of a fresh process that read the data and ran this one method), rss_before_fit_mb,
f1 (``evaluate.mask_f1``, as in ``spex_simulation.py``), factor_correlation (mean |corr| of the factor scores
with the true factors), r2 (``1 - ||Y - Yhat||^2 / ||Y - mean||^2``), and for reference f1_truth (the true W),
f1_annotation (the noisy annotation) and r2_truth. Unannotated methods are matched to the true factors first
(Hungarian on factor-score correlation; ``matching``). Lines are appended to ``benchmarks/results/peers.jsonl``.

Threads: ``--threads`` (default 2, the cores of this project's machine) caps torch and BLAS in every method. On a
machine that other jobs share, use ``--threads 1``: with more threads than free cores torch's OpenMP barriers stall
(measured here under load: Spex 45 s with 2 threads vs 1.2-3.9 s with 1, PPCA 23 s vs 0.4-1.0 s).

    /work/peer-venv/bin/python benchmarks/peers.py                                   # 1000x2000x20, noise 0.1
    python benchmarks/peers.py --sizes 300x500x10 --noise 0.1 0.2 --methods pathfactor.Spex sklearn.PCA
    python benchmarks/peers.py --sizes 300x500x10 --muvi-epochs 200 --out ''          # quick check, no file
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (RESULTS, Fit, Timer, current_rss_mb, emit, limit_threads, parse_size,  # noqa: E402
                    peak_rss_mb, reference_scores, rounded, score, thread_env)

HUGE_SET = 10**9  # no gene-set size filter: the simulated sets are what they are
INSTALL_HINT = "pip install -r benchmarks/requirements-peers.txt"


# ---------------------------------------------------------------------------------------------- data
@dataclass
class Data:
    """One simulated data set as every method sees it: plain arrays, so that reading it imports nothing a method
    does not import itself (a worker reads them from an ``.npz``; each method then pays for its own imports)."""

    Y: np.ndarray  # cells x genes, float32
    genes: list[str]
    terms: list[str]
    annotation: np.ndarray  # genes x terms, the noisy annotation
    X_true: np.ndarray
    W_true: np.ndarray
    mask_true: np.ndarray

    @classmethod
    def from_adata(cls, adata) -> "Data":
        """From ``noisy_annotations``' AnnData (the true factors are its first ``n_factors`` columns)."""
        K = int(adata.uns["simulation"]["n_factors"])
        return cls(Y=np.ascontiguousarray(np.asarray(adata.X, dtype=np.float32)),
                   genes=[str(g) for g in adata.var_names],
                   terms=[str(t) for t in np.atleast_1d(adata.uns["simulation"]["annotation_names"])],
                   annotation=np.asarray(adata.varm["annotation"], dtype=bool),
                   X_true=np.asarray(adata.obsm["X_true"])[:, :K], W_true=np.asarray(adata.varm["W_true"])[:, :K],
                   mask_true=np.asarray(adata.varm["mask_true"], dtype=bool)[:, :K])

    def save(self, path: Path) -> None:
        np.savez(path, **{name: np.asarray(getattr(self, name)) for name in self.__dataclass_fields__})

    @classmethod
    def load(cls, path) -> "Data":
        with np.load(path) as saved:
            fields = {name: saved[name] for name in cls.__dataclass_fields__}
        return cls(**{**fields, "genes": [str(g) for g in fields["genes"]],
                      "terms": [str(t) for t in fields["terms"]]})

    @property
    def K(self) -> int:
        return self.X_true.shape[1]

    @cached_property
    def mean(self) -> np.ndarray:
        return self.Y.mean(axis=0, dtype=np.float64)

    @cached_property
    def frame(self):
        """The data as a cells x genes DataFrame (the gene names a gene-set model matches the sets to)."""
        import pandas as pd

        return pd.DataFrame(self.Y, columns=self.genes, copy=False)

    @cached_property
    def sets(self) -> dict[str, list[str]]:
        genes = np.asarray(self.genes, dtype=object)
        return {term: [str(g) for g in genes[self.annotation[:, k]]] for k, term in enumerate(self.terms)}

    @cached_property
    def nonnegative(self) -> tuple[np.ndarray, np.ndarray]:
        """(data minus each gene's minimum, that minimum)."""
        low = self.Y.min(axis=0)
        return self.Y - low, low.astype(np.float64)

    def truth(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.X_true, self.W_true, self.mask_true


def fingerprint(Y: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(Y).tobytes()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------- methods
def _pathfactor(cls_name: str, annotated: bool, nonnegative: bool = False):
    def run(data: Data, opts) -> Fit:
        import pathfactor as pf

        if cls_name == "PCA":  # pathfactor's PCA imports scikit-learn when it fits: keep that import out of its time
            import sklearn.decomposition  # noqa: F401

        cls = getattr(pf.models, cls_name)
        params = dict(opts.spex_params) if cls_name == "Spex" else {}
        if cls_name != "PCA":
            params.setdefault("progress", False)
        if annotated:
            params.update(min_set_size=1, max_set_size=HUGE_SET)
        else:
            params["n_factors"] = data.K
        fit_args = {"seed": opts.seed}
        if cls_name != "PCA":
            fit_args["device"] = opts.device
        if annotated:
            fit_args["annotations"] = data.sets
        if nonnegative:
            matrix, offset = data.nonnegative
        else:
            matrix, offset = data.frame, data.mean
        with Timer() as t:
            model = cls(**params).fit(matrix, **fit_args)
        columns = data.terms if annotated else list(model.loadings_.columns)
        extra = {"version": pf.__version__, "settings": {k: v for k, v in params.items() if k != "progress"}}
        if getattr(model, "history_", None):
            extra["epochs"] = len(model.history_)
        if hasattr(model, "converged_"):
            extra["converged"] = bool(model.converged_)
        return Fit(t.seconds, model.factor_scores_[columns].to_numpy(), model.loadings_[columns].to_numpy(),
                   offset, aligned=annotated, extra=extra)
    return run


def _sklearn(cls_name: str, nonnegative: bool = False):
    def run(data: Data, opts) -> Fit:
        import sklearn
        from sklearn import decomposition
        from sklearn.exceptions import ConvergenceWarning

        params = {"n_components": data.K, "random_state": opts.seed}
        if cls_name == "NMF":
            params["init"] = "nndsvda"
        matrix, offset = data.nonnegative if nonnegative else (data.Y, None)
        with Timer() as t, warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model = getattr(decomposition, cls_name)(**params)
            X = model.fit_transform(matrix)
        extra = {"version": sklearn.__version__, "settings": {k: v for k, v in params.items() if k != "random_state"}}
        if hasattr(model, "n_iter_"):
            extra["epochs"] = int(model.n_iter_)
        return Fit(t.seconds, X, model.components_.T, model.mean_ if offset is None else offset,
                   aligned=False, extra=extra)
    return run


def _muvi(data: Data, opts) -> Fit:
    import logging

    import muvi

    logging.getLogger("muvi").setLevel(logging.ERROR)
    Y, mask = data.Y.copy(), data.annotation.T.copy()
    batch_size = min(1000, Y.shape[0])
    settings = {"prior_confidence": 0.99, "batch_size": batch_size, "n_epochs": opts.muvi_epochs or "default"}
    with Timer() as t:
        model = muvi.MuVI(observations={"rna": Y}, prior_masks={"rna": mask}, prior_confidence=0.99,
                          device=opts.device)
        model.fit(batch_size=batch_size, n_epochs=opts.muvi_epochs or 0, seed=opts.seed, verbose=False)
    # MuVI fits the data centred and divided by one global standard deviation: back to the data's units
    scale = float(np.std(data.Y - data.mean))
    X = np.asarray(model.get_factor_scores(), dtype=np.float64)
    W = np.asarray(model.get_factor_loadings()["rna"], dtype=np.float64).T * scale
    log = model._training_log
    extra = {"version": importlib.metadata.version("muvi"), "settings": settings,
             "epochs": int(log.get("n_iter", 0)), "converged": bool(log.get("stop_early", False))}
    return Fit(t.seconds, X, W, data.mean, aligned=True, extra=extra)


def _intercode(data: Data, opts) -> Fit:
    import anndata as ad
    import torch
    from intercode import Intercode

    settings = {"lr": 1e-3, "batch_size": 62, "num_epochs": opts.intercode_epochs, "l2_reg_lambda0": 0.1,
                "lambda1": 0.93, "lambda3": 0.57}
    centred = ad.AnnData(X=(data.Y - data.mean).astype(np.float32))
    centred.varm["I"] = data.annotation.astype(np.int32)
    centred.uns["terms"] = list(data.terms)
    torch.manual_seed(opts.seed)
    np.random.seed(opts.seed)  # intercode draws its minibatches with np.random
    with Timer() as t, open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
        model = Intercode(centred, use_cuda=opts.device.startswith("cuda"))
        model.train(settings["lr"], settings["batch_size"], settings["num_epochs"], settings["l2_reg_lambda0"],
                    lambda1=settings["lambda1"], lambda3=settings["lambda3"])
    X = np.asarray(model.encode(centred.X), dtype=np.float64)
    W = model.model.decoder.weight_dict["annotated"].detach().cpu().double().numpy()
    extra = {"version": importlib.metadata.version("intercode"), "settings": settings,
             "epochs": settings["num_epochs"]}
    return Fit(t.seconds, X, W, data.mean, aligned=True, extra=extra)


METHODS = {
    "pathfactor.Spex": _pathfactor("Spex", annotated=True),
    "pathfactor.Slalom": _pathfactor("Slalom", annotated=True),
    "pathfactor.Autoencoder": _pathfactor("Autoencoder", annotated=True),
    "pathfactor.PCA": _pathfactor("PCA", annotated=False),
    "pathfactor.PPCA": _pathfactor("PPCA", annotated=False),
    "pathfactor.FactorAnalysis": _pathfactor("FactorAnalysis", annotated=False),
    "pathfactor.NMF": _pathfactor("NMF", annotated=False, nonnegative=True),
    "muvi.MuVI": _muvi,
    "intercode.Intercode": _intercode,
    "sklearn.PCA": _sklearn("PCA"),
    "sklearn.FactorAnalysis": _sklearn("FactorAnalysis"),
    "sklearn.NMF": _sklearn("NMF", nonnegative=True),
}
PEER_PACKAGES = {"muvi.MuVI": "muvi", "intercode.Intercode": "intercode"}


def run_method(method: str, data: Data, opts) -> dict:
    """Fit one method and score it: the per-method fields of a result line (or ``skipped`` / ``error``)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    package = PEER_PACKAGES.get(method)
    if package is not None:
        try:
            importlib.import_module(package)
        except ImportError as err:
            return {"skipped": f"{package} is not importable in {sys.executable} ({err}); {INSTALL_HINT}"}
    _ = (data.Y, data.mean, data.sets)  # prepared before the method's timing and memory baseline
    rss_before = current_rss_mb()
    fit = METHODS[method](data, opts)
    peak = peak_rss_mb()
    X_true, _, mask_true = data.truth()
    record = {"seconds": rounded(fit.seconds, 3), "peak_rss_mb": round(peak, 1),
              "rss_before_fit_mb": round(rss_before, 1)}
    record.update(score(fit, data.Y, X_true, mask_true))
    record.update(fit.extra)
    return record


def compile_bytecode() -> None:
    """Write pathfactor's bytecode, as ``pip install`` does for every installed package (the peers' included).
    An editable install on a machine with PYTHONDONTWRITEBYTECODE set would otherwise compile each of its modules
    from source in every worker process (measured: about 0.3 s of a 4 s process)."""
    import compileall

    import pathfactor

    compileall.compile_dir(str(Path(pathfactor.__file__).parent), quiet=1)


def run_isolated(method: str, path: Path, opts) -> dict:
    """``run_method`` in a fresh interpreter (so that ``peak_rss_mb`` is this method's alone)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", method, "--data", str(path),
           "--seed", str(opts.seed), "--threads", str(opts.threads), "--device", opts.device,
           "--intercode-epochs", str(opts.intercode_epochs)]
    if opts.muvi_epochs:
        cmd += ["--muvi-epochs", str(opts.muvi_epochs)]
    for name, value in opts.spex_params.items():
        cmd += ["--spex-param", f"{name}={value!r}"]
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=thread_env(opts.threads),
                              timeout=opts.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"no result within --timeout {opts.timeout} s"}
    process_seconds = round(time.perf_counter() - start, 2)  # the whole process: start-up, imports, reading, fit
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            return {**json.loads(line), "process_seconds": process_seconds}
    tail = " | ".join(done.stderr.strip().splitlines()[-3:])
    return {"error": f"worker exited with status {done.returncode}: {tail}"}


def benchmark(size: str, noise: float, methods, opts, out=None) -> list[dict]:
    """Simulate one data set and run every method on it; emit and return one record per method."""
    from pathfactor.data.simulate import noisy_annotations

    N, G, K = parse_size(size)
    data = Data.from_adata(noisy_annotations(n_cells=N, n_genes=G, n_factors=K, noise=noise, seed=opts.seed))
    X_true, W_true, mask_true = data.truth()
    base = {"n_cells": N, "n_genes": G, "n_factors": K, "noise": noise, "seed": opts.seed,
            "threads": opts.threads, "device": opts.device, "data": fingerprint(data.Y)}
    reference = reference_scores(data.Y, X_true, W_true, mask_true, data.annotation)
    records = []
    with tempfile.TemporaryDirectory(prefix="pathfactor-peers-") as tmp:
        path = Path(tmp) / "data.npz"
        if opts.isolate:
            data.save(path)
            compile_bytecode()
        for method in methods:
            try:
                result = run_isolated(method, path, opts) if opts.isolate else run_method(method, data, opts)
            except Exception as err:  # one failing method must not stop the others
                result = {"error": f"{type(err).__name__}: {err}"}
            record = {"method": method, **base, **result, **reference, "isolated": opts.isolate,
                      "host": platform.node(), "cpus": os.cpu_count(),
                      "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
            records.append(emit(record, out))
    return records


# ---------------------------------------------------------------------------------------------- command line
def _param(text: str) -> tuple[str, object]:
    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        raise argparse.ArgumentTypeError(f"{value!r} is not a Python literal (in {text!r})") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["1000x2000x20"], help="CELLSxGENESxFACTORS")
    p.add_argument("--noise", type=float, nargs="+", default=[0.1])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch and BLAS threads of every method")
    p.add_argument("--device", default="cpu", help="cpu or cuda: pathfactor's torch models, MuVI, intercode")
    p.add_argument("--muvi-epochs", type=int, default=None, help="MuVI's n_epochs (default: MuVI's own)")
    p.add_argument("--intercode-epochs", type=int, default=80)
    p.add_argument("--spex-param", type=_param, action="append", default=[], metavar="NAME=VALUE",
                   help="a Spex parameter (Python literal), e.g. max_epochs=50")
    p.add_argument("--no-isolate", dest="isolate", action="store_false",
                   help="run every method in this process (faster; peak_rss_mb is then the running maximum)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per isolated method")
    p.add_argument("--out", default=str(RESULTS / "peers.jsonl"), help="JSON lines file to append to ('' = none)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> list[dict]:
    opts = parser().parse_args(argv)
    opts.spex_params = dict(opts.spex_param)
    if opts.threads < 1:
        raise SystemExit("--threads must be >= 1")
    limit_threads(opts.threads)
    if opts.worker:  # one method in this fresh process, data read from --data
        record = run_method(opts.worker, Data.load(opts.data), opts)
        print(json.dumps(record, default=lambda v: v.item() if isinstance(v, np.generic) else str(v)), flush=True)
        return [record]
    records = []
    for size in opts.sizes:
        parse_size(size)  # fail on a bad size before any work
    for size in opts.sizes:
        for noise in opts.noise:
            records += benchmark(size, noise, opts.methods, opts, out=opts.out or None)
    return records


if __name__ == "__main__":
    main()
