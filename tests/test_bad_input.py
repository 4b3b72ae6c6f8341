"""Every public entry point against bad input: one test case per row of ``docs/bad_input.md``.

Each case names the entry point, the bad input and what must happen: a ``ValueError`` (or the documented type)
whose message contains a fragment, "works" (sparse input in every scipy format must work), or -- for the CLI --
exit status 2 with one line ``pathfactor: error: ...`` on stderr. Cases marked ``bug=`` are known defects: they
assert the behaviour we *want* and run as ``xfail(strict=True)``, so fixing the bug turns them into an XPASS
failure that asks for the mark to be removed (and the row of ``docs/bad_input.md`` to be updated).

``test_doc_table_lists_every_case`` keeps this file and the table in step: the table's first column is the test id.
Runtime budget: about half a minute on one thread (tiny data and networks, 3-5 epochs, no report rendering).
"""
from __future__ import annotations

import contextlib
import functools
import gzip
import io
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import pathfactor as pf
from pathfactor import GeneSets
from pathfactor.cli import main
from pathfactor.data.inputs import as_matrix, check_counts
from pathfactor.models import GMVAE, NMF, PCA, PPCA, VAE, FactorAnalysis, Slalom, Spex, Supervised
from pathfactor.models.persist import manifest

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad_input.md"

# ============================================================================ tiny data
N, G = 12, 10
GENES = [f"G{j}" for j in range(G)]
SETS = {"S1": GENES[:5], "S2": GENES[4:9]}


def counts(n: int = N, g: int = G, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).poisson(2.0, size=(n, g)).astype(np.float32)


def groups(n: int, levels=("a", "b")) -> list[str]:
    return [levels[i % len(levels)] for i in range(n)]


def adata(X, genes=None, obs: dict | None = None) -> ad.AnnData:
    """An AnnData with cells c0.., genes G0.. and obs columns grp (a/b), one (single level), gap (a missing value),
    num (numeric), numnan, numinf."""
    n, g = np.shape(X)
    genes = GENES[:g] if genes is None else genes
    frame = {"grp": groups(n), "one": ["x"] * n, "gap": [None if i == 1 else "a" if i % 2 else "b" for i in range(n)],
             "num": np.arange(n, dtype=float), "numnan": [np.nan if i == 0 else float(i) for i in range(n)],
             "numinf": [np.inf if i == 0 else float(i) for i in range(n)]}
    frame.update(obs or {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata: non-string index / object X
        return ad.AnnData(X, obs=pd.DataFrame(frame, index=[f"c{i}" for i in range(n)]),
                          var=pd.DataFrame(index=list(genes)))


def with_nan(value=np.nan) -> np.ndarray:
    Y = counts()
    Y[3, 4] = value
    return Y


# ============================================================================ models
MODEL_NAMES = ["PCA", "PPCA", "FactorAnalysis", "NMF", "Spex", "Supervised", "Slalom", "VAE", "GMVAE"]
FACTORIES = {
    "PCA": lambda **kw: PCA(**{"n_factors": 2, **kw}),
    "PPCA": lambda **kw: PPCA(**{"n_factors": 2, "max_epochs": 5, "progress": False, **kw}),
    "FactorAnalysis": lambda **kw: FactorAnalysis(**{"n_factors": 2, "max_epochs": 5, "progress": False, **kw}),
    "NMF": lambda **kw: NMF(**{"n_factors": 2, "max_epochs": 5, "progress": False, **kw}),
    "Spex": lambda **kw: Spex(**{"n_dense": 1, "min_set_size": 2, "max_epochs": 3, "progress": False, **kw}),
    "Supervised": lambda **kw: Supervised(**{"n_factors": 2, "max_epochs": 3, "progress": False, **kw}),
    "Slalom": lambda **kw: Slalom(**{"n_dense": 1, "min_set_size": 2, "max_epochs": 3, "progress": False, **kw}),
    "VAE": lambda **kw: VAE(**{"n_latent": 2, "hidden": (8,), "kl_warmup": 1, "max_epochs": 3, "progress": False,
                               **kw}),
    "GMVAE": lambda **kw: GMVAE(**{"n_clusters": 2, "n_latent": 2, "hidden": (8,), "kl_warmup": 1,
                                   "pretrain_epochs": 2, "max_epochs": 3, "progress": False, **kw}),
}
#: the likelihoods of VAE / GMVAE; "VAE-zip" etc. name a model with that likelihood (the plain names use "nb")
LIKELIHOODS = ["poisson", "nb", "zip", "zinb", "gaussian"]
COUNT_LIKELIHOODS = {"poisson": "Poisson", "nb": "negative binomial", "zip": "zero-inflated Poisson",
                     "zinb": "zero-inflated negative binomial"}
FACTORIES.update({f"{m}-{lik}": lambda m=m, lik=lik, **kw: FACTORIES[m](**{"likelihood": lik, **kw})
                  for m in ("VAE", "GMVAE") for lik in LIKELIHOODS})
FACTORIES["Spex-nb"] = lambda **kw: FACTORIES["Spex"](**{"likelihood": "nb", **kw})
#: constructor arguments asking for more factors than the 10 genes allow
TOO_MANY = {"PCA": {"n_factors": G + 1}, "PPCA": {"n_factors": G}, "FactorAnalysis": {"n_factors": G},
            "NMF": {"n_factors": G + 1}, "Spex": {"n_dense": G}, "Supervised": {"n_factors": G},
            "Slalom": {"n_dense": G}, "VAE": {"n_latent": G}, "GMVAE": {"n_latent": G}}


#: the covariate Supervised gets for input without .obs
CELL_GROUP = np.asarray([i % 2 for i in range(N)], dtype=float)


def fit(name: str, data, params: dict | None = None, **fit_kw):
    """Fit model ``name`` (tiny settings) to ``data``; gene-set models get SETS, Supervised gets covariates."""
    model = FACTORIES[name](**(params or {}))
    if name.split("-")[0] in ("Spex", "Slalom"):
        fit_kw.setdefault("annotations", SETS)
    if name == "Supervised" and "covariates" not in fit_kw:
        fit_kw["covariates"] = "grp" if hasattr(data, "obs") else np.asarray(
            [i % 2 for i in range(np.shape(data)[0])], dtype=float)
    return model.fit(data, **fit_kw)


@functools.lru_cache(maxsize=None)
def fitted(name: str, covariates: bool = False):
    """A model fitted once to ``adata(counts())`` (``covariates=True``: with covariates="grp")."""
    kw = {"covariates": "grp"} if covariates else {}
    return fit(name, adata(counts()), **kw)


def assert_finite(model) -> None:
    for attr in ("loadings_", "factor_scores_", "relevance_"):
        values = getattr(model, attr).to_numpy(dtype=float)
        assert np.isfinite(values).all(), f"{type(model).__name__}.{attr} has NaN/Inf: {values}"
    if isinstance(model, VAE):  # and GMVAE
        assert np.isfinite(model.elbo_), f"{type(model).__name__}.elbo_ is {model.elbo_}"


# ============================================================================ expectations
@dataclass(frozen=True)
class Raises:
    """The call raises ``exc`` with ``match`` (a literal fragment) in its message."""
    exc: type
    match: str

    def verify(self, result_or_error):
        err = result_or_error
        assert isinstance(err, BaseException), f"expected {self.exc.__name__}, but the call returned {err!r:.200}"
        if not isinstance(err, self.exc):
            raise AssertionError(f"expected {self.exc.__name__}, got {type(err).__name__}: {err}") from err
        assert self.match in str(err), f"{self.match!r} not in message {str(err)!r}"

    def describe(self) -> str:
        return f"{self.exc.__name__} containing `{self.match}`"


@dataclass(frozen=True)
class Works:
    """The call returns; ``check(result)`` passes."""
    check: Callable | None = None

    def verify(self, result_or_error):
        if isinstance(result_or_error, BaseException):
            raise AssertionError(f"expected it to work, got {type(result_or_error).__name__}: "
                                 f"{result_or_error}") from result_or_error
        if self.check is not None:
            ok = self.check(result_or_error)
            assert ok is None or ok, f"check failed on {result_or_error!r:.300}"

    def describe(self) -> str:
        return "works"


@dataclass(frozen=True)
class RaisesOrFinite:
    """Degenerate data: a ``ValueError`` containing ``match``, or a fit whose results are all finite."""
    match: str

    def verify(self, result_or_error):
        if isinstance(result_or_error, BaseException):
            Raises(ValueError, self.match).verify(result_or_error)
        else:
            assert_finite(result_or_error)

    def describe(self) -> str:
        return f"ValueError containing `{self.match}`, or all-finite results"


@dataclass(frozen=True)
class CliError:
    """``main([...])`` returns 2 and prints one line ``pathfactor: error: ...`` containing ``match``
    (``usage=True``: argparse's own error: usage lines, then ``pathfactor <cmd>: error: ...``)."""
    match: str
    usage: bool = False

    def verify(self, result_or_error):
        if isinstance(result_or_error, BaseException):
            raise AssertionError(f"main() raised {type(result_or_error).__name__}: {result_or_error} "
                                 "(a traceback instead of exit status 2)") from result_or_error
        rc, out, err = result_or_error
        assert rc == 2, f"exit status {rc}, stderr {err!r}"
        assert self.match in err, f"{self.match!r} not in stderr {err!r}"
        if not self.usage:
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("pathfactor: error: "), err
            assert "Traceback" not in err

    def describe(self) -> str:
        return f"exit 2, `{'usage + ' if self.usage else ''}... error: ...{self.match}...`"


# ============================================================================ the cases
@dataclass
class Ctx:
    tmp: Path      # this test's own folder
    files: dict    # prepared input files (module scope)


@dataclass
class Case:
    id: str
    entry: str
    bad: str
    call: Callable[[Ctx], object]
    expect: object
    bug: str | None = None  # why it is an xfail: file:line, what happens today
    section: str = field(default="")


CASES: list[Case] = []


def case(section, id, entry, bad, call, expect, bug=None):
    CASES.append(Case(id, entry, bad, call, expect, bug, section))


def cli(*argv):
    """Run the CLI in-process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


# ---------------------------------------------------------------------------- the data door of every fit
S = "fit: the expression data (every model, through `as_matrix`)"
for name in MODEL_NAMES:
    m = name
    case(S, f"fit-{m}-nan", f"{m}.fit", "a NaN in X", lambda c, m=m: fit(m, adata(with_nan())),
         Raises(ValueError, "expression data contains 1 NaN or infinite values"))
    case(S, f"fit-{m}-inf", f"{m}.fit", "an Inf in X", lambda c, m=m: fit(m, adata(with_nan(np.inf))),
         Raises(ValueError, "expression data contains 1 NaN or infinite values"))
    case(S, f"fit-{m}-no-cells", f"{m}.fit", "0 cells x 10 genes", lambda c, m=m: fit(m, adata(counts()[:0])),
         Raises(ValueError, "expression data is empty (0 cells x 10 genes)"))
    case(S, f"fit-{m}-no-genes", f"{m}.fit", "12 cells x 0 genes", lambda c, m=m: fit(m, adata(counts()[:, :0])),
         Raises(ValueError, "expression data is empty (12 cells x 0 genes)"))
    case(S, f"fit-{m}-single-cell", f"{m}.fit", "1 cell", lambda c, m=m: fit(m, adata(counts()[:1])),
         Raises(ValueError, "need at least 2 cells"))
    case(S, f"fit-{m}-duplicate-genes", f"{m}.fit", "var_names G0..G8, G0",
         lambda c, m=m: fit(m, adata(counts(), GENES[:-1] + ["G0"])),
         Raises(ValueError, "duplicate gene names in var_names (e.g. ['G0'])"))
    case(S, f"fit-{m}-strings", f"{m}.fit", "X of dtype <U1", lambda c, m=m: fit(m, adata(np.full((N, G), "a"))),
         Raises(ValueError, "expression data must be numeric, got dtype <U1"))
    case(S, f"fit-{m}-object", f"{m}.fit", "X of dtype object (numbers inside)",
         lambda c, m=m: fit(m, adata(counts().astype(object))),
         Raises(ValueError, "expression data must be numeric, got dtype object"))
    case(S, f"fit-{m}-booleans", f"{m}.fit", "X of dtype bool", lambda c, m=m: fit(m, adata(counts() > 1)),
         Works(assert_finite))
    case(S, f"fit-{m}-integers", f"{m}.fit", "X of dtype int64",
         lambda c, m=m: fit(m, adata(counts().astype(np.int64))), Works(assert_finite))

ONE_GENE = {  # one gene: each model's own shape check (gene-set models: no set keeps 2 genes)
    "PCA": "PCA with n_factors=2 needs at least as many cells and genes as factors",
    "PPCA": "PPCA with n_factors=2 needs more genes than factors",
    "FactorAnalysis": "FactorAnalysis with n_factors=2 needs more genes than factors",
    "NMF": "n_factors=2 exceed(s) min(cells, genes) = 1 of the data",
    "Spex": "none of the 2 gene sets has between 2 and 500 genes among the data's 1 var_names",
    "Supervised": "2 factors need fewer than the data's 1 genes",
    "Slalom": "none of the 2 gene sets has between 2 and 500 genes among the data's 1 var_names",
    "VAE": "n_latent=2 needs fewer latent dimensions than the data's 1 genes",
    "GMVAE": "n_latent=2 needs fewer latent dimensions than the data's 1 genes",
}
TOO_MANY_MSG = {
    "PCA": "PCA with n_factors=11 needs at least as many cells and genes as factors",
    "PPCA": "PPCA with n_factors=10 needs more genes than factors, but the data have 10 genes",
    "FactorAnalysis": "FactorAnalysis with n_factors=10 needs more genes than factors",
    "NMF": "n_factors=11 exceed(s) min(cells, genes) = 10 of the data",
    "Spex": "14 factors need fewer than the data's 10 genes",  # n_dense=10 + the 2 default sparse factors
    "Supervised": "10 factors need fewer than the data's 10 genes",
    "Slalom": "12 factors + 0 covariate columns need fewer than the data's 10 genes",
    "VAE": "n_latent=10 needs fewer latent dimensions than the data's 10 genes",
    "GMVAE": "n_latent=10 needs fewer latent dimensions than the data's 10 genes",
}
S = "fit: shapes and factor counts"
for name in MODEL_NAMES:
    m = name
    case(S, f"fit-{m}-single-gene", f"{m}.fit", "1 gene", lambda c, m=m: fit(m, adata(counts()[:, :1])),
         Raises(ValueError, ONE_GENE[m]))
    case(S, f"fit-{m}-more-factors-than-genes", f"{m}.fit", f"{TOO_MANY[m]} on 10 genes",
         lambda c, m=m: fit(m, adata(counts()), TOO_MANY[m]), Raises(ValueError, TOO_MANY_MSG[m]))
case(S, "fit-PPCA-too-few-cells", "PPCA.fit", "n_factors=2 on 3 cells", lambda c: fit("PPCA", adata(counts(3))),
     Raises(ValueError, "PPCA with n_factors=2 needs at least n_factors + 2 cells"))
case(S, "fit-Spex-factors-vs-cells", "Spex.fit", "n_dense=3 + covariate on 4 cells (more factors than cells)",
     lambda c: fit("Spex", adata(counts(4)), {"n_dense": 3}, covariates="grp"), Works(assert_finite))
for name, params in [("PCA", {"n_factors": 0}), ("PPCA", {"n_factors": 2.0}), ("NMF", {"n_factors": True}),
                     ("Spex", {"n_dense": -1})]:
    key = next(iter(params))
    case(S, f"fit-{name}-bad-{key}", f"{name}.fit", f"{key}={params[key]!r}",
         lambda c, m=name, p=params: fit(m, adata(counts()), p), Raises(ValueError, f"{key} must be"))

# ---------------------------------------------------------------------------- degenerate values
S = "fit: degenerate data (constant genes, rank deficiency, extreme scale)"
CONST = "constant (every gene has zero variance)"
ZERO_VARIANCE = "the expression data have zero variance (every gene is constant across the cells)"
case(S, "fit-PCA-constant", "PCA.fit", "all-ones X", lambda c: fit("PCA", adata(np.ones((N, G), np.float32))),
     Raises(ValueError, "PCA: " + ZERO_VARIANCE))
case(S, "fit-PCA-constant-sparse", "PCA.fit", "all-zero CSR X",
     lambda c: fit("PCA", adata(sp.csr_matrix((N, G), dtype=np.float32))), Raises(ValueError, "PCA: " + ZERO_VARIANCE))
case(S, "fit-PCA-one-variable-gene-sparse", "PCA.fit", "CSR X whose only non-zeros are in one gene",
     lambda c: fit("PCA", adata(sp.csr_matrix(np.c_[np.arange(N), np.zeros((N, G - 1))].astype(np.float32)))),
     Works(assert_finite))
for method in ["mle", "em", "map", "vi"]:
    case(S, f"fit-PPCA-{method}-constant", f"PPCA(method={method!r}).fit", "all-ones X",
         lambda c, me=method: fit("PPCA", adata(np.ones((N, G), np.float32)), {"method": me}),
         Raises(ValueError, "PPCA: " + ZERO_VARIANCE))
for name in ["FactorAnalysis", "NMF", "Spex", "Supervised", "Slalom", "VAE", "GMVAE"]:
    case(S, f"fit-{name}-constant", f"{name}.fit", "all-ones X",
         lambda c, m=name: fit(m, adata(np.ones((N, G), np.float32))), Works(assert_finite))
case(S, "fit-Supervised-two-step-constant", "Supervised(two_step=True).fit", "all-ones X",
     lambda c: fit("Supervised", adata(np.ones((N, G), np.float32)), {"two_step": True}),
     Raises(ValueError, "Supervised: " + ZERO_VARIANCE))
ONE_ENTRY = np.zeros((8, 4), np.float32)
ONE_ENTRY[2, 0] = 4.0
case(S, "fit-NMF-rank-deficient-float32", "NMF.fit", "8x4 X with one non-zero entry, n_factors=3 (K > rank)",
     lambda c: fit("NMF", ONE_ENTRY, {"n_factors": 3}), Works(assert_finite))
case(S, "fit-NMF-rank-deficient-float64", "NMF(dtype='float64').fit", "the same X in float64",
     lambda c: fit("NMF", ONE_ENTRY, {"n_factors": 3, "dtype": "float64"}), Works(assert_finite))
TOO_LARGE = "expression data hold values up to 7e+20, too large for float32 arithmetic (at most 1.68e+14 for 12 " \
            "cells x 10 genes: the models sum their squares); log-transform"
for name in MODEL_NAMES:
    case(S, f"fit-{name}-huge-values", f"{name}.fit", "counts x 1e20 (finite in float32, squares are not)",
         lambda c, m=name: fit(m, adata(counts() * np.float32(1e20))), Raises(ValueError, TOO_LARGE))
    case(S, f"fit-{name}-large-values", f"{name}.fit", "counts x 1e13 (just below the limit: must work)",
         lambda c, m=name: fit(m, adata(counts() * np.float32(1e13))), Works(assert_finite))


# ---------------------------------------------------------------------------- negative / non-integer values
S = "fit: negative data (NMF) and count likelihoods (`check_counts`)"
case(S, "fit-NMF-negative", "NMF.fit", "X - 3 (negative values)", lambda c: fit("NMF", adata(counts() - 3)),
     Raises(ValueError, "NMF needs non-negative data but the data have"))
case(S, "fit-NMF-kl-negative-sparse", "NMF(loss='kl').fit", "CSR with a stored -1",
     lambda c: fit("NMF", adata(sp.csr_matrix(np.where(counts() > 3, -1.0, counts()).astype(np.float32))),
                   {"loss": "kl"}), Raises(ValueError, "NMF needs non-negative data"))
case(S, "fit-NMF-kl-non-integer", "NMF(loss='kl').fit", "log1p(counts): KL takes non-integer data by design",
     lambda c: fit("NMF", adata(np.log1p(counts())), {"loss": "kl"}), Works(assert_finite))
for name in ["PCA", "PPCA", "FactorAnalysis", "Spex", "Supervised", "Slalom"]:
    case(S, f"fit-{name}-negative", f"{name}.fit", "X - 3: Gaussian models take centred/scaled data",
         lambda c, m=name: fit(m, adata(counts() - 3)), Works(assert_finite))
case(S, "check_counts-negative", "check_counts", "a -1 among counts",
     lambda c: check_counts(as_matrix(np.array([[1.0, -1.0], [0.0, 2.0]])), "negative binomial"),
     Raises(ValueError, "the negative binomial likelihood needs non-negative counts but the data have negative"))
case(S, "check_counts-non-integer", "check_counts", "1.5 among counts",
     lambda c: check_counts(as_matrix(np.array([[1.5, 1.0], [0.0, 2.0]])), "poisson"),
     Raises(ValueError, "the poisson likelihood needs integer counts but the data have non-integer values"))
case(S, "check_counts-sparse-negative", "check_counts", "CSR with a stored -2",
     lambda c: check_counts(as_matrix(sp.csr_matrix(np.array([[0.0, -2.0], [0.0, 2.0]]))), "poisson"),
     Raises(ValueError, "needs non-negative counts"))
case(S, "check_counts-sparse-non-integer", "check_counts", "CSC with a stored 0.5",
     lambda c: check_counts(as_matrix(sp.csc_matrix(np.array([[0.0, 0.5], [0.0, 2.0]]))), "poisson"),
     Raises(ValueError, "needs integer counts"))
case(S, "check_counts-large-non-integer", "check_counts", "100000.5 among counts",
     lambda c: check_counts(as_matrix(np.array([[100000.5, 3.0], [1.0, 2.0]])), "poisson"),
     Raises(ValueError, "needs integer counts"))
case(S, "check_counts-integer-floats", "check_counts", "float counts 0, 1, 3", lambda c: check_counts(
    as_matrix(np.array([[1.0, 0.0], [3.0, 2.0]])), "poisson"), Works())
case(S, "check_counts-booleans", "check_counts", "bool X (0/1 counts)",
     lambda c: check_counts(as_matrix(np.eye(3, dtype=bool)), "poisson"), Works())

# ---------------------------------------------------------------------------- VAE / GMVAE: likelihoods
SPARSE_FORMATS = [f"{fmt}_{kind}" for fmt in ("csr", "csc", "coo", "lil", "dok", "bsr", "dia")
                  for kind in ("matrix", "array")]
#: SETS under the names as_matrix gives the genes of a bare matrix (gene_0, ...)
SETS_NUMBERED = {k: [f"gene_{GENES.index(g)}" for g in v] for k, v in SETS.items()}
#: what each model gives per new cell
PER_CELL = {"VAE": ("transform", "elbo"), "GMVAE": ("transform", "elbo", "predict"), "Spex": ("transform",)}


def every_sparse_format(name: str) -> bool:
    """Fit model ``name`` to counts in every scipy sparse format; its per-cell methods on the same data must give
    one finite row per cell."""
    kw = {"annotations": SETS_NUMBERED} if name.startswith("Spex") else {}
    for fmt in SPARSE_FORMATS:
        data = getattr(sp, fmt)(counts())
        model = fit(name, data, **kw)
        assert_finite(model)
        for method in PER_CELL[name.split("-")[0]]:
            out = getattr(model, method)(data)
            assert out.shape[0] == N and np.isfinite(out.to_numpy(dtype=float)).all(), (fmt, method)
    return True


def zero_cell(Y: np.ndarray) -> np.ndarray:
    """``Y`` with its first cell's counts set to zero."""
    Y = Y.copy()
    Y[0] = 0
    return Y


def finite_rows(n: int):
    """A check: ``n`` rows, all finite."""
    return Works(lambda out: out.shape[0] == n and np.isfinite(out.to_numpy(dtype=float)).all())


S = "VAE and GMVAE: count likelihoods (`check_data`), every likelihood"
NEEDS = {"negative": "non-negative counts but the data have negative values",
         "non-integer": "integer counts but the data have non-integer values"}
for model in ["VAE", "GMVAE"]:
    new_cells = "elbo" if model == "VAE" else "predict"
    for lik in LIKELIHOODS:
        m = f"{model}-{lik}"
        counts_only = lik in COUNT_LIKELIHOODS

        def refused(problem, lik=lik):
            return Raises(ValueError, f"the {COUNT_LIKELIHOODS[lik]} likelihood needs {NEEDS[problem]}")

        case(S, f"fit-{m}-negative", f"{model}(likelihood={lik!r}).fit", "X - 3",
             lambda c, m=m: fit(m, adata(counts() - 3)), refused("negative") if counts_only
             else Works(assert_finite))
        case(S, f"fit-{m}-non-integer", f"{model}(likelihood={lik!r}).fit", "log1p(counts)",
             lambda c, m=m: fit(m, adata(np.log1p(counts()))), refused("non-integer") if counts_only
             else Works(assert_finite))
        case(S, f"fit-{m}-zero-count-cell", f"{model}(likelihood={lik!r}).fit", "a cell with no counts",
             lambda c, m=m: fit(m, adata(zero_cell(counts()))), Works(assert_finite))
        case(S, f"fit-{m}-all-zero", f"{model}(likelihood={lik!r}).fit", "every count 0",
             lambda c, m=m: fit(m, adata(np.zeros((N, G), np.float32))), Works(assert_finite))
        case(S, f"fit-{m}-sparse-every-format", f"{model}(likelihood={lik!r}).fit + "
             f"{' + '.join(PER_CELL[model])}", "counts in each of the 14 scipy sparse formats",
             lambda c, m=m: every_sparse_format(m), Works())
        case(S, f"transform-{m}-non-integer", f"{model}(likelihood={lik!r}).transform", "log1p(counts)",
             lambda c, m=m: fitted(m).transform(adata(np.log1p(counts()))), refused("non-integer") if counts_only
             else finite_rows(N))
        case(S, f"{new_cells}-{m}-negative", f"{model}(likelihood={lik!r}).{new_cells}", "X - 3",
             lambda c, m=m, f=new_cells: getattr(fitted(m), f)(adata(counts() - 3)),
             refused("negative") if counts_only else finite_rows(N))

S = "VAE and GMVAE: parameters, `elbo`, `predict`"
UNKNOWN_LIKELIHOOD = "unknown likelihood 'bernoulli'; choose one of poisson, nb, zip, zinb, gaussian"
NEURAL_PARAMS = [  # (model, test-id key, parameters, expectation)
    ("VAE", "unknown-likelihood", {"likelihood": "bernoulli"}, Raises(ValueError, UNKNOWN_LIKELIHOOD)),
    ("GMVAE", "unknown-likelihood", {"likelihood": "bernoulli"}, Raises(ValueError, UNKNOWN_LIKELIHOOD)),
    ("VAE", "likelihood-none", {"likelihood": None}, Raises(ValueError, "unknown likelihood None; choose one of")),
    ("VAE", "likelihood-upper-case", {"likelihood": "NB"}, Works(assert_finite)),
    ("VAE", "n-latent-zero", {"n_latent": 0}, Raises(ValueError, "n_latent must be an integer >= 1, got 0")),
    ("VAE", "n-latent-float", {"n_latent": 2.0}, Raises(ValueError, "n_latent must be an integer >= 1, got 2.0")),
    ("VAE", "n-latent-bool", {"n_latent": True}, Raises(ValueError, "n_latent must be an integer >= 1, got True")),
    ("GMVAE", "n-latent-negative", {"n_latent": -1}, Raises(ValueError, "n_latent must be an integer >= 1, got -1")),
    ("GMVAE", "one-cluster", {"n_clusters": 1}, Raises(ValueError, "n_clusters must be an integer >= 2, got 1")),
    ("GMVAE", "n-clusters-string", {"n_clusters": "3"},
     Raises(ValueError, "n_clusters must be an integer >= 2, got '3'")),
    ("GMVAE", "n-clusters-none", {"n_clusters": None},
     Raises(ValueError, "n_clusters must be an integer >= 2, got None")),
    ("GMVAE", "more-clusters-than-cells", {"n_clusters": N + 1},
     Raises(ValueError, "n_clusters=13 needs at least as many cells, but the data have 12; use fewer clusters")),
    ("GMVAE", "more-clusters-than-training-cells", {"n_clusters": N},
     Raises(ValueError, "n_clusters=12 needs at least as many training cells, but 11 are left after the "
                        "validation split")),
    ("GMVAE", "as-many-clusters-as-cells-no-pretraining", {"n_clusters": N, "pretrain_epochs": 0},
     Works(assert_finite)),
    ("GMVAE", "bad-prior-weights", {"prior_weights": "equal"},
     Raises(ValueError, "prior_weights must be 'learned' or 'uniform', got 'equal'")),
    ("GMVAE", "n-init-zero", {"n_init": 0}, Raises(ValueError, "n_init must be an integer >= 1, got 0")),
    ("GMVAE", "n-init-float", {"n_init": 2.0}, Raises(ValueError, "n_init must be an integer >= 1, got 2.0")),
    ("VAE", "batch-norm-batch-size-1", {"batch_norm": True, "batch_size": 1},
     Raises(ValueError, "batch_norm=True needs batch_size >= 2 (batch statistics of one cell are undefined)")),
    ("GMVAE", "batch-norm-batch-size-1", {"batch_norm": True, "batch_size": 1},
     Raises(ValueError, "batch_norm=True needs batch_size >= 2")),
    ("VAE", "validation-leaves-no-cell", {"validation_fraction": 0.99},
     Raises(ValueError, "validation_fraction=0.99 leaves 0 of the 12 cells for training, but 1 are needed")),
    ("GMVAE", "validation-leaves-one-cell-batch-norm", {"validation_fraction": 0.95, "batch_norm": True},
     Raises(ValueError, "validation_fraction=0.95 leaves 1 of the 12 cells for training, but 2 are needed")),
    ("VAE", "validation-fraction-one", {"validation_fraction": 1.0},
     Raises(ValueError, "validation_fraction must be in [0, 1), got 1.0")),
    ("VAE", "no-hidden-layer", {"hidden": ()},
     Raises(ValueError, "hidden must be a non-empty tuple of positive integers")),
]
for model, key, params, expect in NEURAL_PARAMS:
    case(S, f"fit-{model}-{key}", f"{model}.fit", ", ".join(f"{k}={v!r}" for k, v in params.items()),
         lambda c, m=model, p=params: fit(m, adata(counts()), p), expect)
case(S, "fit-VAE-likelihood-normal", "VAE.fit", "likelihood='normal' (another name for 'gaussian') on log data",
     lambda c: fit("VAE", adata(np.log1p(counts())), {"likelihood": "normal"}),
     Works(assert_finite))  # a count likelihood would refuse the log data
case(S, "fit-GMVAE-more-clusters-than-cells-list", "GMVAE.fit", "n_clusters=13 on a 12-cell list of lists",
     lambda c: fit("GMVAE", counts().tolist(), {"n_clusters": N + 1}),
     Raises(ValueError, "n_clusters=13 needs at least as many cells, but the data have 12"))
case(S, "fit-VAE-seed-negative", "VAE.fit", "seed=-1", lambda c: fit("VAE", adata(counts()), seed=-1),
     Raises(ValueError, "seed must be a non-negative integer, got -1"))
case(S, "fit-GMVAE-unknown-layer", "GMVAE.fit", "layer='counts' that adata lacks",
     lambda c: fit("GMVAE", adata(counts()), layer="counts"),
     Raises(ValueError, "layer 'counts' is not in adata.layers"))
for key, bad, call, expect in [
    ("missing-genes", "only G0..G4", lambda: fitted("VAE").elbo(adata(counts()[:, :5], GENES[:5])),
     Raises(ValueError, "5 of the model's 10 genes are missing from the new data (e.g. ['G5', 'G6', 'G7'])")),
    ("nan", "a NaN in X", lambda: fitted("VAE").elbo(adata(with_nan())),
     Raises(ValueError, "expression data contains 1 NaN or infinite values")),
    ("single-cell", "1 new cell", lambda: fitted("VAE").elbo(adata(counts()[:1])), finite_rows(1)),
    ("zero-count-cell", "a cell with no counts", lambda: fitted("VAE").elbo(adata(zero_cell(counts()))),
     finite_rows(N)),
    ("n-samples-zero", "n_samples=0", lambda: fitted("VAE").elbo(adata(counts()), n_samples=0),
     Raises(ValueError, "n_samples must be an integer >= 1, got 0")),
    ("seed-string", "seed='a'", lambda: fitted("VAE").elbo(adata(counts()), seed="a"),
     Raises(ValueError, "seed must be a non-negative integer, got 'a'")),
    ("seed-negative", "seed=-1", lambda: fitted("VAE").elbo(adata(counts()), seed=-1),
     Raises(ValueError, "seed must be a non-negative integer, got -1")),
    ("not-fitted", "a model never fitted", lambda: FACTORIES["VAE"]().elbo(adata(counts())),
     Raises(RuntimeError, "this VAE is not fitted yet; call .fit(adata, ...) first")),
    ("extra-reordered-genes", "genes reversed plus an extra gene: the same ELBO", lambda: np.testing.assert_allclose(
        fitted("VAE").elbo(adata(np.hstack([counts()[:, ::-1], np.ones((N, 1), np.float32)]), GENES[::-1] + ["X"])),
        fitted("VAE").elbo(adata(counts())), rtol=1e-5), Works()),
]:
    case(S, f"elbo-VAE-{key}", "VAE.elbo", bad, lambda c, call=call: call(), expect)
for key, bad, call, expect in [
    ("missing-genes", "only G0..G4", lambda: fitted("GMVAE").predict(adata(counts()[:, :5], GENES[:5])),
     Raises(ValueError, "5 of the model's 10 genes are missing from the new data")),
    ("inf", "an Inf in X", lambda: fitted("GMVAE").predict(adata(with_nan(np.inf))),
     Raises(ValueError, "expression data contains 1 NaN or infinite values")),
    ("single-cell", "1 new cell", lambda: fitted("GMVAE").predict(adata(counts()[:1])), finite_rows(1)),
    ("strings", "X of dtype <U1", lambda: fitted("GMVAE").predict(adata(np.full((N, G), "a"))),
     Raises(ValueError, "must be numeric")),
    ("not-fitted", "a model never fitted", lambda: FACTORIES["GMVAE"]().predict(adata(counts())),
     Raises(RuntimeError, "this GMVAE is not fitted yet; call .fit(adata, ...) first")),
    ("proba-zero-count-cell", "a cell with no counts: probabilities sum to 1",
     lambda: fitted("GMVAE").predict_proba(adata(zero_cell(counts()))),
     Works(lambda p: np.allclose(p.to_numpy().sum(1), 1.0) and p.shape == (N, 2))),
]:
    case(S, f"predict-GMVAE-{key}", "GMVAE.predict" + ("_proba" if key.startswith("proba") else ""), bad,
         lambda c, call=call: call(), expect)

# ---------------------------------------------------------------------------- Spex on counts
S = 'Spex(likelihood="nb"): raw counts'
NB_NEGATIVE = "the negative binomial likelihood needs non-negative counts but the data have negative values"
NB_NON_INTEGER = "the negative binomial likelihood needs integer counts but the data have non-integer values"
NB_STATE = "likelihood='nb' is fitted with the blocked posterior; leave posterior='blocked'"
SPEX_NB = [  # (key, bad input, call, expectation, bug)
    ("negative", "X - 3", lambda c: fit("Spex-nb", adata(counts() - 3)), Raises(ValueError, NB_NEGATIVE), None),
    ("non-integer", "log1p(counts)", lambda c: fit("Spex-nb", adata(np.log1p(counts()))),
     Raises(ValueError, NB_NON_INTEGER), None),
    ("negative-sparse", "CSR with a stored -1", lambda c: fit("Spex-nb", adata(sp.csr_matrix(
        np.where(counts() > 3, -1.0, counts()).astype(np.float32)))), Raises(ValueError, NB_NEGATIVE), None),
    ("zero-count-cell", "a cell with no counts", lambda c: fit("Spex-nb", adata(zero_cell(counts()))),
     Raises(ValueError, "some cells have no counts (library size 0); remove empty cells before fitting"), None),
    ("zero-count-gene", "a gene with no counts",
     lambda c: fit("Spex-nb", adata(np.c_[np.zeros((N, 1), np.float32), counts()[:, 1:]])), Works(assert_finite),
     None),
    ("constant", "all-ones X", lambda c: fit("Spex-nb", adata(np.ones((N, G), np.float32))), Works(assert_finite),
     None),
    ("batch-size", "batch_size=4 (blocks of 4 cells)", lambda c: fit("Spex-nb", adata(counts()), {"batch_size": 4}),
     Works(assert_finite), None),
    ("mean-field", "posterior='mean-field'", lambda c: fit("Spex-nb", adata(counts()), {"posterior": "mean-field"}),
     Raises(ValueError, NB_STATE), None),
    ("covariates", "covariates='grp'", lambda c: fit("Spex-nb", adata(counts()), covariates="grp"),
     Works(assert_finite), None),
    ("sparse-every-format", "counts in each of the 14 scipy sparse formats (fit + transform)",
     lambda c: every_sparse_format("Spex-nb"), Works(), None),
]
for key, bad, call, expect, bug in SPEX_NB:
    case(S, f"fit-Spex-nb-{key}", "Spex(likelihood='nb').fit", bad, call, expect, bug)
SPEX_LIKELIHOOD = ("likelihood must be 'normal' (or 'gaussian': log-normalised data), 'nb' or 'poisson' (raw counts), "
                   "'bernoulli' (0/1 data) or a dict {view: likelihood}, got ")
for value in ["zinb", "NB"]:
    case(S, f"fit-Spex-likelihood-{value}", "Spex.fit", f"likelihood={value!r}",
         lambda c, v=value: fit("Spex", adata(counts()), {"likelihood": v}),
         Raises(ValueError, f"{SPEX_LIKELIHOOD}{value!r}"))
case(S, "fit-Spex-likelihood-gaussian", "Spex.fit", "likelihood='gaussian' (the other name of 'normal')",
     lambda c: fit("Spex", adata(counts()), {"likelihood": "gaussian"}), Works())
SPEX_NB_NEW = [  # (key, bad input, call, expectation, bug)
    ("negative", "X - 3", lambda: fitted("Spex-nb").transform(adata(counts() - 3)), Raises(ValueError, NB_NEGATIVE),
     None),
    ("non-integer", "log1p(counts)", lambda: fitted("Spex-nb").transform(adata(np.log1p(counts()))),
     Raises(ValueError, NB_NON_INTEGER), None),
    ("zero-count-cell", "a cell with no counts", lambda: fitted("Spex-nb").transform(adata(zero_cell(counts()))),
     Raises(ValueError, "some cells have no counts on the model's genes (library size 0); remove them first"), None),
    ("missing-genes", "only G0..G4", lambda: fitted("Spex-nb").transform(adata(counts()[:, :5], GENES[:5])),
     Raises(ValueError, "5 of the model's 10 genes are missing from the new data"), None),
    ("extra-reordered-genes", "genes reversed plus an extra gene", lambda: same_scores("Spex-nb"), Works(), None),
    ("single-cell", "1 new cell", lambda: fitted("Spex-nb").transform(adata(counts()[:1])), finite_rows(1), None),
    ("extra-non-integer-gene", "an extra gene holding 0.5 beside the model's genes",
     lambda: fitted("Spex-nb").transform(adata(np.hstack([counts(), np.full((N, 1), 0.5, np.float32)]),
                                               GENES + ["EXTRA"])), finite_rows(N), None),
]
for key, bad, call, expect, bug in SPEX_NB_NEW:
    case(S, f"transform-Spex-nb-{key}", "Spex(likelihood='nb').transform", bad, lambda c, call=call: call(), expect,
         bug)


# ---------------------------------------------------------------------------- the door itself
S = "`as_matrix` (the door of every fit and transform): containers and dtypes"
case(S, "as_matrix-complex", "as_matrix", "complex128 X",
     lambda c: as_matrix(np.array([[1 + 2j, 3], [4, 5j]])), Raises(ValueError, "numeric"))
case(S, "as_matrix-3d", "as_matrix", "a 2x2x2 array", lambda c: as_matrix(np.zeros((2, 2, 2))),
     Raises(ValueError, "expression data must be 2-D (cells x genes), got shape (2, 2, 2)"))
case(S, "as_matrix-1d", "as_matrix", "a 1-D array", lambda c: as_matrix(np.ones(3)),
     Raises(ValueError, "must be 2-D"))
case(S, "as_matrix-none", "as_matrix", "None", lambda c: as_matrix(None), Raises(ValueError, "must be 2-D"))
case(S, "as_matrix-ragged-list", "as_matrix", "[[1, 2], [3]]", lambda c: as_matrix([[1, 2], [3]]),
     Raises(ValueError, "cannot read expression data of type list"))
case(S, "as_matrix-list-of-lists", "as_matrix", "[[1, 2], [3, 4]]", lambda c: as_matrix([[1, 2], [3, 4]]),
     Works(lambda m: np.testing.assert_array_equal(m.dense(), [[1, 2], [3, 4]])))
case(S, "as_matrix-nullable-int", "as_matrix", "DataFrame of pandas Int64 with a <NA>",
     lambda c: as_matrix(pd.DataFrame({"a": pd.array([1, None], dtype="Int64"), "b": [1, 2]})),
     Raises(ValueError, "expression data must be numeric, got dtype object"))
case(S, "as_matrix-int-column-names", "as_matrix", "DataFrame columns 1 and '1' (equal as strings)",
     lambda c: as_matrix(pd.DataFrame([[1, 2], [3, 4]], columns=[1, "1"])),
     Raises(ValueError, "duplicate gene names in var_names (e.g. ['1'])"))
case(S, "as_matrix-sparse-nan", "as_matrix", "CSR with a stored NaN",
     lambda c: as_matrix(sp.csr_matrix(with_nan())), Raises(ValueError, "contains 1 NaN or infinite values"))
case(S, "as_matrix-sparse-inf-coo", "as_matrix", "COO with a stored -Inf",
     lambda c: as_matrix(sp.coo_matrix(with_nan(-np.inf))), Raises(ValueError, "NaN or infinite"))
case(S, "as_matrix-float16", "as_matrix", "float16 X", lambda c: as_matrix(counts().astype(np.float16)),
     Works(lambda m: np.testing.assert_array_equal(m.dense(), counts())))
case(S, "as_matrix-unknown-layer", "as_matrix", "layer='counts' that adata lacks",
     lambda c: as_matrix(adata(counts()), layer="counts"),
     Raises(ValueError, "layer 'counts' is not in adata.layers (it has [])"))
case(S, "as_matrix-layer-without-anndata", "as_matrix", "layer= with a numpy array",
     lambda c: as_matrix(counts(), layer="counts"), Raises(ValueError, "layer= only applies to AnnData input"))
case(S, "as_matrix-X-none", "as_matrix", "AnnData whose X is None",
     lambda c: as_matrix(ad.AnnData(obs=pd.DataFrame(index=["a", "b"]), var=pd.DataFrame(index=["g"]))),
     Raises(ValueError, "adata.X is empty (None)"))


# ---------------------------------------------------------------------------- sparse input must work
def fit_every_model(data):
    """Fit every model to ``data`` and transform the same data; results must be finite."""
    sets = {"S1": [f"gene_{j}" for j in range(5)], "S2": [f"gene_{j}" for j in range(4, 9)]}
    for name in MODEL_NAMES:
        kw = {"annotations": sets} if name in ("Spex", "Slalom") else {}
        model = fit(name, data, **kw)
        assert_finite(model)
        scores = model.transform(data, **({"covariates": CELL_GROUP} if name == "Supervised" else {}))
        assert scores.shape == (N, model.loadings_.shape[1]) and np.isfinite(scores.to_numpy()).all(), name
    return True


S = "sparse input: every scipy format must work (fit and transform of every model)"
for fmt in ["csr", "csc", "coo", "lil", "dok", "bsr", "dia"]:
    for kind in ("matrix", "array"):
        make = getattr(sp, f"{fmt}_{kind}")
        case(S, f"sparse-{fmt}_{kind}", "every model's fit + transform", f"scipy.sparse.{fmt}_{kind} of counts",
             lambda c, make=make: fit_every_model(make(counts())), Works())


def fit_every_model_anndata(X):
    """Fit every model to an AnnData holding ``X``; transform dense data with the same genes."""
    for name in MODEL_NAMES:
        model = fit(name, adata(X))
        assert_finite(model)
        assert np.isfinite(model.transform(adata(counts())).to_numpy()).all(), name
    return True


case(S, "sparse-anndata-csc", "every model's fit + transform", "AnnData with a CSC X",
     lambda c: fit_every_model_anndata(sp.csc_matrix(counts())), Works())


# ---------------------------------------------------------------------------- transform
def same_scores(name):
    """transform() of extra and reordered genes equals transform() of the fitted genes."""
    model = fitted(name)
    Y = counts()
    extra = adata(np.hstack([Y[:, ::-1], np.ones((N, 1), np.float32)]), GENES[::-1] + ["EXTRA"])
    np.testing.assert_allclose(model.transform(extra).to_numpy(), model.transform(adata(Y)).to_numpy(),
                               rtol=1e-4, atol=1e-4)
    return True


def same_cells_alone(model):
    """transform() of the group-a cells alone equals their rows of transform() of the whole mixed batch."""
    Y, grp = counts(), np.asarray(groups(N))
    mixed = model.transform(adata(Y)).to_numpy()
    alone = model.transform(adata(Y[grp == "a"], obs={"grp": ["a"] * int((grp == "a").sum())})).to_numpy()
    np.testing.assert_allclose(alone, mixed[grp == "a"], rtol=1e-6, atol=1e-8)
    return True


S = "transform (new cells)"
for name in MODEL_NAMES:
    m = name
    case(S, f"transform-{m}-missing-genes", f"{m}.transform", "only G0..G4",
         lambda c, m=m: fitted(m).transform(adata(counts()[:, :5], GENES[:5])),
         Raises(ValueError, "5 of the model's 10 genes are missing from the new data (e.g. ['G5', 'G6', 'G7'])"))
    case(S, f"transform-{m}-nan", f"{m}.transform", "a NaN in X", lambda c, m=m: fitted(m).transform(
        adata(with_nan())), Raises(ValueError, "expression data contains 1 NaN or infinite values"))
    case(S, f"transform-{m}-duplicate-genes", f"{m}.transform", "var_names G0..G9 plus a second G0",
         lambda c, m=m: fitted(m).transform(adata(np.hstack([counts(), counts()[:, :1]]), GENES + ["G0"])),
         Raises(ValueError, "duplicate gene names in var_names"))
    case(S, f"transform-{m}-strings", f"{m}.transform", "X of dtype <U1",
         lambda c, m=m: fitted(m).transform(adata(np.full((N, G), "a"))), Raises(ValueError, "must be numeric"))
    case(S, f"transform-{m}-extra-reordered-genes", f"{m}.transform", "genes reversed plus an extra gene",
         lambda c, m=m: same_scores(m), Works())
    case(S, f"transform-{m}-single-cell", f"{m}.transform", "1 new cell",
         lambda c, m=m: fitted(m).transform(adata(counts()[:1])),
         Works(lambda s: s.shape[0] == 1 and np.isfinite(s.to_numpy()).all()))
    case(S, f"transform-{m}-not-fitted", f"{m}.transform", "a model never fitted",
         lambda c, m=m: FACTORIES[m]().transform(adata(counts())),
         Raises(RuntimeError, f"this {m} is not fitted yet; call .fit(adata, ...) first"))
case(S, "transform-NMF-negative", "NMF.transform", "X - 5", lambda c: fitted("NMF").transform(adata(counts() - 5)),
     Raises(ValueError, "NMF needs non-negative data"))
case(S, "transform-Supervised-two-step", "Supervised(two_step=True).transform", "any data",
     lambda c: fit("Supervised", adata(counts()), {"two_step": True}).transform(adata(counts())),
     Raises(ValueError, "transform is not available for two_step=True"))
for name in ["Spex", "Supervised", "Slalom"]:
    m = name
    case(S, f"transform-{m}-covariates-without-anndata", f"{m}.transform (fitted with covariates='grp')",
         "a DataFrame (no .obs)", lambda c, m=m: fitted(m, True).transform(pd.DataFrame(counts(), columns=GENES)),
         Raises(ValueError, "covariates given by column name need AnnData input"))
    case(S, f"transform-{m}-unseen-level", f"{m}.transform (fitted with covariates='grp')",
         "new cells of groups a/c (c unseen)",
         lambda c, m=m: fitted(m, True).transform(adata(counts(), obs={"grp": groups(N, ("a", "c"))})),
         Raises(ValueError, "covariate 'grp' of the new cells has levels ['c'] the model was not fitted with (it "
                            "knows ['a', 'b'])"))
    case(S, f"transform-{m}-one-group", f"{m}.transform (fitted with covariates='grp')",
         "new cells all of group b", lambda c, m=m: fitted(m, True).transform(
             adata(counts(), obs={"grp": ["b"] * N})), Works(lambda s: np.isfinite(s.to_numpy()).all()))
    case(S, f"transform-{m}-one-group-is-subset", f"{m}.transform (fitted with covariates='grp')",
         "new cells of group a only: scores equal those of the same cells in a mixed batch",
         lambda c, m=m: same_cells_alone(fitted(m, True)), Works())
    case(S, f"transform-{m}-single-cell-with-covariates", f"{m}.transform (fitted with covariates='grp')",
         "1 new cell of group b, after save + load",
         lambda c, m=m: pf.load(fitted(m, True).save(c.tmp / m)).transform(adata(counts()[1:2], obs={"grp": ["b"]})),
         Works(lambda s: s.shape[0] == 1 and np.isfinite(s.to_numpy()).all()))
    case(S, f"transform-{m}-covariate-now-text", f"{m}.transform (fitted with covariates='num')",
         "the numeric covariate given as text", lambda c, m=m: fit(m, adata(counts()), covariates="num").transform(
             adata(counts(), obs={"num": [str(i) for i in range(N)]})),
         Raises(ValueError, "covariate 'num' was numeric when the model was fitted, but the new cells' values are "
                            "object"))

# ---------------------------------------------------------------------------- covariates
S = "fit: covariates (Spex, Supervised, Slalom through `covariate_design`)"
for name in ["Spex", "Supervised", "Slalom"]:
    m = name
    for key, cov, msg in [
        ("wrong-length", np.zeros((5, 1)), "covariates have 5 rows but the data have 12 cells"),
        ("unknown-column", "nope", "covariate 'nope' is not a column of obs"),
        ("single-level", "one", "covariate 'one' has a single level ['x']; it explains nothing, drop it"),
        ("nan-categorical", "gap", "covariate 'gap' has 1 missing values"),
        ("nan-numeric", "numnan", "covariate 'numnan' has 1 missing values"),
        ("nan-array", np.r_[np.nan, np.ones(N - 1)][:, None], "covariate '0' has 1 missing values"),
        ("inf", "numinf", "covariate 'numinf' has infinite values"),
    ]:
        case(S, f"fit-{m}-covariate-{key}", f"{m}.fit", f"covariates={cov!r}" if isinstance(cov, str)
             else f"covariates array of shape {np.shape(cov)}" + (" with a NaN" if key == "nan-array" else ""),
             lambda c, m=m, cov=cov: fit(m, adata(counts()), covariates=cov), Raises(ValueError, msg))
    case(S, f"fit-{m}-covariate-name-without-anndata", f"{m}.fit", "covariates='grp' with a numpy X",
         lambda c, m=m: fit(m, counts(), annotations=None if m == "Supervised" else
                            {k: [f"gene_{GENES.index(g)}" for g in v] for k, v in SETS.items()}, covariates="grp"),
         Raises(ValueError, "covariates given by column name need AnnData input with those columns in .obs"))
    case(S, f"fit-{m}-covariate-numeric-and-bool", f"{m}.fit", "covariates=['num', bool column]",
         lambda c, m=m: fit(m, adata(counts(), obs={"flag": [i % 3 == 0 for i in range(N)]}),
                            covariates=["num", "flag"]), Works(assert_finite))
case(S, "fit-Supervised-no-covariates", "Supervised.fit", "covariates=None",
     lambda c: fit("Supervised", adata(counts()), covariates=None),
     Raises(ValueError, "the supervised model needs covariates="))
case(S, "fit-Supervised-annotations", "Supervised.fit", "annotations=SETS",
     lambda c: fit("Supervised", adata(counts()), annotations=SETS), Raises(ValueError, "takes no gene sets"))
for name in ["Spex", "Supervised", "Slalom"]:
    m = name
    case(S, f"fit-{m}-covariate-listed-twice", f"{m}.fit", "covariates=['grp', 'grp']",
         lambda c, m=m: fit(m, adata(counts()), covariates=["grp", "grp"]),
         Raises(ValueError, "covariate(s) ['grp'] are listed twice; their columns would be identical (collinear)"))
    case(S, f"fit-{m}-covariate-constant-numeric", f"{m}.fit", "a numeric covariate that is constant",
         lambda c, m=m: fit(m, adata(counts()), covariates=np.ones((N, 1))),
         Raises(ValueError, "covariate '0' has a single level [1] (it is constant); it explains nothing, drop it"))
case(S, "fit-Supervised-two-step-collinear", "Supervised(two_step=True).fit", "covariates=['grp', 'grp']",
     lambda c: fit("Supervised", adata(counts()), {"two_step": True}, covariates=["grp", "grp"]),
     Raises(ValueError, "are listed twice; their columns would be identical (collinear)"))
case(S, "fit-Supervised-two-step-collinear-columns", "Supervised(two_step=True).fit",
     "covariates=['grp', 'grp2'], two names for the same grouping",
     lambda c: fit("Supervised", adata(counts(), obs={"grp2": groups(N, ("x", "y"))}), {"two_step": True},
                   covariates=["grp", "grp2"]),
     Raises(ValueError, "are collinear (rank 1 < 2): OLS needs independent columns"))
case(S, "fit-Supervised-two-step-constant-covariate", "Supervised(two_step=True).fit",
     "a numeric covariate that is constant", lambda c: fit("Supervised", adata(counts()), {"two_step": True},
                                                          covariates=np.ones((N, 1))),
     Raises(ValueError, "covariate '0' has a single level [1] (it is constant)"))

# ---------------------------------------------------------------------------- gene sets
S = "gene sets: `GeneSets.read` / `filter` / `to_mask` and `annotations=`"


def write(ctx, name, content) -> Path:
    p = ctx.tmp / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content, encoding="utf-8")
    return p


READS = [
    ("missing-file", lambda c: c.tmp / "nope.gmt",
     Raises(FileNotFoundError, "nope.gmt' does not exist; check the path")),
    ("directory", lambda c: (c.tmp / "x.gmt").mkdir() or c.tmp / "x.gmt", Raises(ValueError, "is a directory")),
    ("unknown-suffix", lambda c: write(c, "a.txt", "S\td\tA\n"), Raises(ValueError, "cannot tell the format of")),
    ("gmt-no-tab", lambda c: write(c, "a.gmt", "S A B\n"), Raises(ValueError, "line 1 has no tab")),
    ("gmt-not-utf8", lambda c: write(c, "a.gmt", b"\xff\xfe\x00\tx\n"), Raises(ValueError, "is not UTF-8 text")),
    ("gmt-empty-name", lambda c: write(c, "a.gmt", "\tdesc\tA\n"), Raises(ValueError, "line 1 has an empty set name")),
    ("gmt-duplicate-name", lambda c: write(c, "a.gmt", "S\td\tA\nS\td\tB\n"),
     Raises(ValueError, "set 'S' occurs on lines 1 and 2 with different genes")),
    ("gmt-duplicate-genes", lambda c: write(c, "a.gmt", "S\td\tA\tA\ta\n"),
     Works(lambda gs: gs["S"] == ("A", "a"))),
    ("json-invalid", lambda c: write(c, "a.json", "{oops"), Raises(ValueError, "is not valid JSON")),
    ("json-list", lambda c: write(c, "a.json", "[1, 2]"), Raises(ValueError, "got a JSON list")),
    ("json-too-deep", lambda c: write(c, "a.json", '{"G": {"S": {"x": ["A"]}}}'),
     Raises(ValueError, "only one level of grouping is supported")),
    ("json-number-gene", lambda c: write(c, "a.json", '{"S": ["A", 3]}'),
     Raises(ValueError, "set 'S' contains 3 (int); gene symbols must be strings")),
    ("json-null-gene", lambda c: write(c, "a.json", '{"S": ["A", null]}'), Raises(ValueError, "contains None")),
    ("json-empty-gene", lambda c: write(c, "a.json", '{"S": ["A", " "]}'),
     Raises(ValueError, "set 'S' contains an empty gene symbol")),
    ("json-string-value", lambda c: write(c, "a.json", '{"S": "A"}'),
     Raises(ValueError, "value of 'S' is a str; expected a list of genes")),
    ("json-name-clash", lambda c: write(c, "a.json", '{"G/S": ["A"], "G": {"S": ["B"]}}'),
     Raises(ValueError, "set name 'G/S' occurs twice")),
    ("gmt-gz-corrupt", lambda c: write(c, "a.gmt.gz", b"\x1f\x8bnot really gzip"),
     Raises(ValueError, "a.gmt.gz is not a valid gzip file (BadGzipFile: Unknown compression method)")),
    ("gmt-gz-truncated", lambda c: write(c, "a.gmt.gz", gzip.compress(b"S\td\tA\tB\n" * 50)[:30]),
     Raises(ValueError, "a.gmt.gz is not a valid gzip file (EOFError: Compressed file ended")),
    ("json-gz-corrupt", lambda c: write(c, "a.json.gz", gzip.compress(b'{"S": ["A"]}')[:-6] + b"\x00" * 6),
     Raises(ValueError, "a.json.gz is not a valid gzip file")),
    ("gmt-gz", lambda c: write(c, "a.gmt.gz", gzip.compress(b"S\td\tA\tB\n")), Works(lambda gs: gs["S"] == ("A", "B"))),
    ("gmt-utf8-bom", lambda c: write(c, "a.gmt", "\ufeffS\td\tA\n"), Works(lambda gs: gs.names == ["S"])),
    ("gmt-gz-utf8-bom", lambda c: write(c, "a.gmt.gz", gzip.compress("\ufeffS\td\tA\n".encode())),
     Works(lambda gs: gs.names == ["S"])),
    ("json-utf8-bom", lambda c: write(c, "a.json", '\ufeff{"S": ["A"]}'), Works(lambda gs: gs.names == ["S"])),
]
case(S, "genesets-read-none", "GeneSets.read", "None instead of a path", lambda c: GeneSets.read(None),
     Raises(TypeError, "expected str, bytes or os.PathLike object, not NoneType"))
for key, path, expect, *bug in READS:
    case(S, f"genesets-read-{key}", "GeneSets.read", key.replace("-", " "),
         lambda c, path=path: GeneSets.read(path(c)), expect, bug[0] if bug else None)
GS = GeneSets({"S": ["A", "a", "B"], "T": ["C"], "U": ["nope"]})
for entry, method in [("filter", lambda v: GS.filter(v, min_size=1)), ("to_mask", GS.to_mask)]:
    for key, var, expect in [
        ("single-string", "A", Raises(ValueError, "var_names is a single string")),
        ("empty", [], Raises(ValueError, "var_names is empty")),
        ("duplicates", ["A", "A", "B"], Raises(ValueError, "var_names contain 1 duplicates (e.g. ['A'])")),
    ]:
        case(S, f"genesets-{entry}-{key}", f"GeneSets.{entry}", f"var_names={var!r}",
             lambda c, method=method, var=var: method(var), expect)
case(S, "genesets-filter-no-match", "GeneSets.filter", "no set matches any var_name",
     lambda c: GS.filter(["X", "Y"], min_size=1),
     Raises(ValueError, "none of the 3 gene sets has between 1 and 500 genes among the data's 2 var_names "
                        "(best match: 0 genes); check that gene identifiers"))
case(S, "genesets-filter-too-small", "GeneSets.filter", "min_size=15 (default) on 3-gene sets",
     lambda c: GS.filter(["A", "B", "C"]), Raises(ValueError, "(best match: 2 genes)"))
case(S, "genesets-filter-case-collision", "GeneSets.filter", "var_names ['A', 'a', 'b']: case-insensitive match",
     lambda c: GS.filter(["A", "a", "b"], min_size=1), Works(lambda gs: gs.to_dict() == {"S": ["A", "a", "b"]}))
case(S, "genesets-filter-case-sensitive", "GeneSets.filter", "the same with case_sensitive=True",
     lambda c: GS.filter(["A", "a", "b"], min_size=1, case_sensitive=True),
     Works(lambda gs: gs.to_dict() == {"S": ["A", "a"]}))
for key, kw, msg in [("min-size", {"min_size": -1}, "min_size must be an integer >= 0, got -1"),
                     ("max-size", {"min_size": 2, "max_size": 1}, "max_size must be an integer >= min_size (2)"),
                     ("min-fraction", {"min_fraction": 2}, "min_fraction must be a number in [0, 1], got 2")]:
    case(S, f"genesets-filter-bad-{key}", "GeneSets.filter", f"{kw}", lambda c, kw=kw: GS.filter(["A"], **kw),
         Raises(ValueError, msg))
case(S, "genesets-filter-empty-collection", "GeneSets.filter", "GeneSets({})",
     lambda c: GeneSets({}).filter(["A"]), Raises(ValueError, "the gene set collection is empty"))
case(S, "genesets-to_mask-no-match", "GeneSets.to_mask", "a set matching no gene",
     lambda c: GS.to_mask(["A", "C"]), Works(lambda mask: not mask["U"].any() and mask.shape == (2, 3)))
case(S, "genesets-to_mask-case-collision", "GeneSets.to_mask", "var_names ['A', 'a']",
     lambda c: GS.to_mask(["A", "a"]), Works(lambda mask: mask["S"].tolist() == [True, True]))
case(S, "genesets-non-string-gene", "GeneSets()", "{'S': ['A', 1]}", lambda c: GeneSets({"S": ["A", 1]}),
     Raises(ValueError, "set 'S' contains 1 (int); gene symbols must be strings"))
case(S, "genesets-string-as-genes", "GeneSets()", "{'S': 'ABC'}", lambda c: GeneSets({"S": "ABC"}),
     Raises(ValueError, "genes of set 'S' must be a list of symbols, got str"))
for name in ["Spex", "Slalom", "NMF"]:
    m = name
    case(S, f"fit-{m}-gene-sets-no-match", f"{m}.fit", "annotations whose genes are all absent",
         lambda c, m=m: fit(m, adata(counts()), {"min_set_size": 2}, annotations={"X": ["nope1", "nope2"]}),
         Raises(ValueError, "none of the 1 gene sets has between 2 and 500 genes"))
    case(S, f"fit-{m}-too-many-gene-sets", f"{m}.fit", "12 sets of 3 genes on 10 genes",
         lambda c, m=m: fit(m, adata(counts()), {"min_set_size": 2},
                            annotations={f"T{i}": [GENES[(i + j) % G] for j in range(3)] for i in range(12)}),
         Raises(ValueError, "12 gene sets exceed(s) min(cells, genes) = 10" if m == "NMF" else "factors"))
    case(S, f"fit-{m}-gene-sets-case-collision", f"{m}.fit", "sets named in another case ('g0', 'G1', 'g2')",
         lambda c, m=m: fit(m, adata(counts()), {"min_set_size": 2}, annotations={"S": ["g0", "G1", "g2"]}),
         Works(assert_finite))
case(S, "fit-Spex-annotations-empty-list", "Spex.fit", "annotations=[]",
     lambda c: fit("Spex", adata(counts()), annotations=[]),
     Raises(ValueError, "annotations is an empty list; pass None to fit without gene sets"))
case(S, "fit-Spex-annotations-int", "Spex.fit", "annotations=5", lambda c: fit("Spex", adata(counts()), annotations=5),
     Raises(ValueError, "annotations must be GeneSets, a dict, a genes x terms DataFrame or a GMT/JSON path, got int"))
case(S, "fit-Slalom-annotations-missing-file", "Slalom.fit", "annotations='/nope.gmt'",
     lambda c: fit("Slalom", adata(counts()), annotations=str(c.tmp / "nope.gmt")),
     Raises(FileNotFoundError, "does not exist; check the path"))
case(S, "fit-NMF-annotations-bad-mask", "NMF.fit", "a genes x terms DataFrame holding 2",
     lambda c: fit("NMF", adata(counts()), annotations=pd.DataFrame({"T": [2] * G}, index=GENES)),
     Raises(ValueError, "mask must hold booleans or 0/1 values"))


# ---------------------------------------------------------------------------- pf.load
def saved(ctx, edit=None, name="PPCA") -> Path:
    """A copy of a saved model, then ``edit(path)``."""
    path = ctx.tmp / "model"
    fitted(name).save(path)
    if edit is not None:
        edit(path)
    return path


def edit_json(fn):
    def edit(path):
        meta = json.loads((path / "model.json").read_text())
        fn(meta)
        (path / "model.json").write_text(json.dumps(meta))
    return edit


def edit_npz(fn, forge=True):
    """Edit the arrays; ``forge``: record them in model.json as model.save would, so that the checks behind the
    checksum are reached."""
    def edit(path):
        with np.load(path / "arrays.npz") as npz:
            arrays = {k: npz[k] for k in npz.files}
        fn(arrays)
        np.savez(path / "arrays.npz", **arrays)
        if forge:
            edit_json(lambda m: m["files"].update({"arrays.npz": manifest(path / "arrays.npz", arrays)}))(path)
    return edit


S = "`pf.load` (saved-model directories)"
LOADS = [
    ("missing-directory", lambda c: c.tmp / "nope", Raises(ValueError, "is not a saved pathfactor model (needs "
                                                                       "model.json and arrays.npz)"), None),
    ("file-not-directory", lambda c: saved(c) / "model.json", Raises(ValueError, "is not a saved pathfactor model"),
     None),
    ("missing-arrays", lambda c: saved(c, lambda p: (p / "arrays.npz").unlink()),
     Raises(ValueError, "needs model.json and arrays.npz"), None),
    ("invalid-json", lambda c: saved(c, lambda p: (p / "model.json").write_text("{oops")),
     Raises(ValueError, "model.json is not valid JSON"), None),
    ("empty-json", lambda c: saved(c, lambda p: (p / "model.json").write_text("")),
     Raises(ValueError, "model.json is not valid JSON"), None),
    ("future-format-version", lambda c: saved(c, edit_json(lambda m: m.update(format_version=3))),
     Raises(ValueError, "holds format 'pathfactor-model' v3, which this pathfactor 0.1.0 cannot read; upgrade "
                        "pathfactor"), None),
    ("old-format-without-checksums", lambda c: saved(c, edit_json(lambda m: m.update(format_version=1))),
     Raises(ValueError, "v1, written by an older pathfactor without checksums"), None),
    ("other-format", lambda c: saved(c, edit_json(lambda m: m.update(format="sklearn-pickle"))),
     Raises(ValueError, "holds format 'sklearn-pickle' v2, not a pathfactor model"), None),
    ("unknown-model", lambda c: saved(c, edit_json(lambda m: m.update(model="Autoencoder2"))),
     Raises(ValueError, "holds an unknown model 'Autoencoder2'; known:"), None),
    ("object-array", lambda c: saved(c, edit_npz(lambda a: a.update(loadings=np.array([None, 1], dtype=object)))),
     Raises(ValueError, "arrays.npz holds non-numeric arrays ['loadings']"), None),
    ("json-not-object", lambda c: saved(c, lambda p: (p / "model.json").write_text("[1]")),
     Raises(ValueError, "model.json holds a JSON list, not the object pathfactor writes"), None),
    ("format-version-string", lambda c: saved(c, edit_json(lambda m: m.update(format_version="2"))),
     Raises(ValueError, "model.json has format_version '2', not an integer version"), None),
    ("missing-key", lambda c: saved(c, edit_json(lambda m: m.pop("var_names"))),
     Raises(ValueError, "model.json lacks the entries ['var_names']; the saved model is corrupted"), None),
    ("wrong-type-entry", lambda c: saved(c, edit_json(lambda m: m.update(factor_names="PPC1"))),
     Raises(ValueError, "model.json has entries of the wrong type: factor_names is a str"), None),
    ("unknown-parameter", lambda c: saved(c, edit_json(lambda m: m["params"].update(bogus=1))),
     Raises(ValueError, "model.json gives PPCA the unknown parameters ['bogus']"), None),
    ("not-utf8-json", lambda c: saved(c, lambda p: (p / "model.json").write_bytes(b"\xff\xfe\x00")),
     Raises(ValueError, "model.json is not valid JSON: 'utf-8' codec can't decode"), None),
    ("corrupt-arrays", lambda c: saved(c, lambda p: (p / "arrays.npz").write_bytes(b"garbage")),
     Raises(ValueError, "arrays.npz has 7 bytes, but model.json records"), None),
    ("truncated-arrays", lambda c: saved(c, lambda p: (p / "arrays.npz").write_bytes(
        (p / "arrays.npz").read_bytes()[:200])), Raises(ValueError, "arrays.npz has 200 bytes, but model.json"), None),
    ("altered-arrays", lambda c: saved(c, edit_npz(lambda a: a["loadings"].__imul__(2), forge=False)),
     Raises(ValueError, "arrays.npz does not match the sha256 checksum in model.json"), None),
    ("nan-array", lambda c: saved(c, edit_npz(lambda a: a["loadings"].__setitem__((0, 0), np.nan))),
     Raises(ValueError, "arrays.npz holds NaN or infinite values in ['loadings']"), None),
    ("string-array", lambda c: saved(c, edit_npz(lambda a: a.update(relevance=np.array(["a", "b"])))),
     Raises(ValueError, "arrays.npz holds non-numeric arrays ['relevance']"), None),
    ("missing-array", lambda c: saved(c, edit_npz(lambda a: a.pop("loadings"))),
     Raises(ValueError, "arrays.npz lacks the arrays ['loadings']"), None),
    ("missing-extra-array", lambda c: saved(c, edit_npz(lambda a: a.pop("extra_mu"))),
     Raises(ValueError, "lacks PPCA's entry 'mu' (model.json 'extra' or arrays.npz 'extra_mu')"), None),
    ("wrong-shape-array", lambda c: saved(c, edit_npz(lambda a: a.update(loadings=a["loadings"][:3]))),
     Raises(ValueError, "arrays.npz holds 'loadings' of shape (3, 2), but model.json describes 12 cells, 10 genes, "
                        "2 factors and 0 covariate columns, so (10, 2)"), None),
]
for key, path, expect, bug in LOADS:
    case(S, f"load-{key}", "pf.load", key.replace("-", " "), lambda c, path=path: pf.load(path(c)), expect, bug)
case(S, "load-roundtrip-every-model", "pf.load", "save + load of every fitted model",
     lambda c: [np.testing.assert_allclose(pf.load(fitted(m).save(c.tmp / m)).transform(adata(counts())).to_numpy(),
                                           fitted(m).transform(adata(counts())).to_numpy(), rtol=1e-5, atol=1e-6)
                for m in MODEL_NAMES], Works())


# ---------------------------------------------------------------------------- the CLI
def make_files(d: Path) -> dict:
    """Input files of the CLI cases."""
    Y = counts(30, 20)
    genes = [f"G{j}" for j in range(20)]
    obs = pd.DataFrame({"grp": groups(30), "one": ["x"] * 30}, index=[f"c{i}" for i in range(30)])
    files = {}

    def h5(name, X):
        p = d / f"{name}.h5ad"
        ad.AnnData(X, obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(p)
        files[name] = p

    h5("ok", Y)
    Yn = Y.copy()
    Yn[0, 0] = np.nan
    h5("nan", Yn)
    h5("const", np.ones_like(Y))
    h5("sparse", sp.csr_matrix(Y))
    h5("logged", np.log1p(Y))
    h5("negative", Y - 3)
    files["garbage"] = d / "garbage.h5ad"
    files["garbage"].write_bytes(b"this is not HDF5")
    files["sets"] = d / "sets.gmt"
    files["sets"].write_text("S1\td\t" + "\t".join(genes[:6]) + "\nS2\td\t" + "\t".join(genes[5:12]) + "\n")
    files["badgz"] = d / "bad.gmt.gz"
    files["badgz"].write_bytes(b"\x1f\x8b\x08 truncated")
    files["nomatch"] = d / "nomatch.gmt"
    files["nomatch"].write_text("S1\td\tfoo\tbar\n")
    return files


S = "the CLI (`main([...])`: exit status 2 and one line `pathfactor: error: ...`)"


def cli_fit(*args):
    return lambda c: cli("fit", *[c.files[a] if isinstance(a, str) and a in c.files else a for a in args],
                         "--out", c.tmp / "out.h5ad", "--quiet")


CLI_FIT = [
    ("missing-input", ["nope.h5ad", "--model", "pca"], "input file 'nope.h5ad' does not exist", None),
    ("directory-input", [".", "--model", "pca"], "is a directory; pass an .h5ad file", None),
    ("garbage-input", ["garbage", "--model", "pca"], "cannot read", None),
    ("nan", ["nan", "--model", "pca"], "expression data contains 1 NaN or infinite values", None),
    ("spex-without-gene-sets", ["ok", "--model", "spex"], "--model spex needs --gene-sets", None),
    ("gene-sets-for-pca", ["ok", "--model", "pca", "--gene-sets", "sets"], "does not use gene sets", None),
    ("gene-sets-missing", ["ok", "--model", "spex", "--gene-sets", "nope.gmt"],
     "gene set file 'nope.gmt' does not exist and is not a bundled collection", None),
    ("gene-sets-no-match", ["ok", "--model", "spex", "--gene-sets", "nomatch", "--min-set-size", "1"],
     "none of the 1 gene sets has between 1 and 500 genes", None),
    ("too-many-factors", ["ok", "--model", "ppca", "--n-factors", "50"], "PPCA with n_factors=50 needs more genes",
     None),
    ("n-factors-zero", ["ok", "--model", "pca", "--n-factors", "0"], "n_factors must be an integer >= 1, got 0", None),
    ("unknown-layer", ["ok", "--model", "pca", "--layer", "counts"], "layer 'counts' is not in adata.layers", None),
    ("covariate-unknown", ["ok", "--model", "supervised", "--covariates", "nope"],
     "covariate 'nope' is not a column of obs", None),
    ("covariate-single-level", ["ok", "--model", "supervised", "--covariates", "one"],
     "covariate 'one' has a single level", None),
    ("supervised-without-covariates", ["ok", "--model", "supervised"], "the supervised model needs covariates=",
     None),
    ("color-by-unknown", ["ok", "--model", "pca", "--report", "rep", "--color-by", "nope"],
     "--color-by 'nope' is not a column of adata.obs", None),
    ("option-not-for-model", ["ok", "--model", "pca", "--fpr", "0.1"], "--fpr do(es) not apply to --model pca", None),
    ("weights-layer-for-pca", ["ok", "--model", "pca", "--weights-layer", "w"], "PCA does not take --weights-layer",
     None),
    ("seed-negative", ["ok", "--model", "ppca", "--n-factors", "2", "--seed", "-1"],
     "seed must be a non-negative integer, got -1", None),
    ("gene-sets-corrupt-gz", ["ok", "--model", "spex", "--gene-sets", "badgz"], "bad.gmt.gz is not a valid gzip file",
     None),
    ("constant-data-ppca", ["const", "--model", "ppca", "--n-factors", "2"], "PPCA: the expression data have zero "
                                                                             "variance", None),
    ("constant-data-ppca-vi", ["const", "--model", "ppca", "--method", "vi", "--n-factors", "2"],
     "PPCA: the expression data have zero variance", None),
    ("constant-data-pca", ["const", "--model", "pca", "--n-factors", "2"],
     "PCA: the expression data have zero variance", None),
    ("device-bogus", ["ok", "--model", "ppca", "--n-factors", "2", "--device", "bogus"], "device", None),
    ("save-model-onto-file", ["ok", "--model", "pca", "--n-factors", "2", "--save-model", "sets"], "sets.gmt", None),
]
for key, args, msg, bug in CLI_FIT:
    case(S, f"cli-fit-{key}", "pathfactor fit", " ".join(map(str, args)),
         lambda c, args=args: cli_fit(*[c.tmp / "rep" if a == "rep" else a for a in args])(c), CliError(msg), bug)
CLI_NEURAL = [  # (key, arguments, expectation)
    ("vae-non-count", ["logged", "--model", "vae", "--likelihood", "nb"],
     CliError("the negative binomial likelihood needs integer counts but the data have non-integer values")),
    ("vae-default-likelihood-non-count", ["logged", "--model", "vae"],
     CliError("the negative binomial likelihood needs integer counts")),
    ("gmvae-zip-non-count", ["logged", "--model", "gmvae", "--likelihood", "zip"],
     CliError("the zero-inflated Poisson likelihood needs integer counts")),
    ("vae-poisson-negative", ["negative", "--model", "vae", "--likelihood", "poisson"],
     CliError("the Poisson likelihood needs non-negative counts but the data have negative values")),
    ("vae-unknown-likelihood", ["ok", "--model", "vae", "--likelihood", "bernoulli"],
     CliError("argument --likelihood: invalid choice: 'bernoulli' for --model vae (choose from", usage=True)),
    ("gmvae-likelihood-upper-case", ["ok", "--model", "gmvae", "--likelihood", "NB"],
     CliError("argument --likelihood: invalid choice: 'NB'", usage=True)),
    ("vae-too-many-latent", ["ok", "--model", "vae", "--n-factors", "20"],
     CliError("n_latent=20 needs fewer latent dimensions than the data's 20 genes")),
    ("vae-n-factors-zero", ["ok", "--model", "vae", "--n-factors", "0"],
     CliError("n_latent must be an integer >= 1, got 0")),
    ("gmvae-one-cluster", ["ok", "--model", "gmvae", "--n-clusters", "1"],
     CliError("n_clusters must be an integer >= 2, got 1")),
    ("gmvae-more-clusters-than-cells", ["ok", "--model", "gmvae", "--n-clusters", "31"],
     CliError("n_clusters=31 needs at least as many cells, but the data have 30")),
    ("n-clusters-for-vae", ["ok", "--model", "vae", "--n-clusters", "3"],
     CliError("--n-clusters do(es) not apply to --model vae")),
    ("likelihood-for-pca", ["ok", "--model", "pca", "--likelihood", "nb"],
     CliError("--likelihood does not apply to --model pca")),
    ("vae-gene-sets", ["ok", "--model", "vae", "--gene-sets", "sets"],
     CliError("--model vae does not use gene sets; drop --gene-sets")),
    ("vae-covariates", ["ok", "--model", "vae", "--covariates", "grp"], CliError("VAE does not take --covariates")),
    ("spex-likelihood-zinb", ["ok", "--model", "spex", "--gene-sets", "sets", "--likelihood", "zinb"],
     CliError("argument --likelihood: invalid choice: 'zinb' for --model spex (choose from normal, gaussian, nb, "
              "poisson, bernoulli", usage=True)),
    ("spex-nb-non-count", ["logged", "--model", "spex", "--gene-sets", "sets", "--min-set-size", "2",
                           "--likelihood", "nb"], CliError("the negative binomial likelihood needs integer counts")),
    ("vae-gaussian-log-data", ["logged", "--model", "vae", "--likelihood", "gaussian", "--n-factors", "2",
                               "--max-epochs", "3"], Works(lambda r: r[0] == 0)),
    ("gmvae-sparse-input", ["sparse", "--model", "gmvae", "--n-clusters", "2", "--n-factors", "2",
                            "--max-epochs", "3"], Works(lambda r: r[0] == 0)),
]
for key, args, expect in CLI_NEURAL:
    case(S, f"cli-fit-{key}", "pathfactor fit", " ".join(args), cli_fit(*args), expect)
case(S, "cli-fit-n-factors-not-int", "pathfactor fit", "--n-factors abc (argparse)",
     cli_fit("ok", "--model", "pca", "--n-factors", "abc"), CliError("argument --n-factors: invalid int value: 'abc'",
                                                                     usage=True))
case(S, "cli-fit-sparse-input", "pathfactor fit", "an .h5ad with a CSR X (must work)",
     cli_fit("sparse", "--model", "nmf", "--n-factors", "2", "--max-epochs", "3"), Works(lambda r: r[0] == 0))
CLI_SIM = [
    ("n-cells-zero", ["ppca", "--n-cells", "0"], "n_cells must be >= 2, got 0", False),
    ("sigma2-negative", ["ppca", "--sigma2", "-1"], "sigma2 must be a finite number > 0, got -1.0", False),
    ("sigma2-nan", ["ppca", "--sigma2", "nan"], "sigma2 must be a finite number > 0, got nan", False),
    ("option-not-taken", ["ppca", "--noise", "0.1"], "simulate ppca does not take --noise", False),
    ("noise-out-of-range", ["annotations", "--noise", "2"], "noise must be a fraction in [0, 1), got 2.0", False),
    ("seed-negative", ["ppca", "--seed", "-1"], "seed must be >= 0, got -1", False),
    ("unknown-kind", ["foo"], "argument KIND: invalid choice: 'foo'", True),
]
for key, args, msg, usage in CLI_SIM:
    case(S, f"cli-simulate-{key}", "pathfactor simulate", " ".join(args),
         lambda c, args=args: cli("simulate", *args, "--out", c.tmp / "sim.h5ad", "--quiet"), CliError(msg, usage))
case(S, "cli-simulate-missing-out", "pathfactor simulate", "no --out (argparse)",
     lambda c: cli("simulate", "ppca", "--quiet"), CliError("the following arguments are required: --out", True))
CLI_REPORT = [
    ("missing-input", "nope.h5ad", [], "input file 'nope.h5ad' does not exist"),
    ("garbage-input", "garbage", [], "cannot read"),
    ("no-results", "ok", [], "adata.uns['spex'] is missing"),
    ("wrong-key", "ok", ["--key", "pca"], "adata.uns['pca'] is missing"),
]
for key, src, extra, msg in CLI_REPORT:
    case(S, f"cli-report-{key}", "pathfactor report", f"{src} {' '.join(extra)}".strip(),
         lambda c, src=src, extra=extra: cli("report", c.files.get(src, src), *extra, "--out", c.tmp / "rep",
                                             "--quiet"), CliError(msg))


def report_color_by(c):
    a = ad.read_h5ad(c.files["ok"])
    fit("PCA", a).write(a)
    a.write_h5ad(c.tmp / "res.h5ad")
    return cli("report", c.tmp / "res.h5ad", "--key", "pf_pca", "--color-by", "nope", "--out", c.tmp / "rep",
               "--quiet")


case(S, "cli-report-color-by-unknown", "pathfactor report", "--color-by nope", report_color_by,
     CliError("color_by='nope' is not a column of adata.obs; available columns: grp, one"))


# ============================================================================ the tests
def run_case(c: Case, ctx: Ctx):
    """The call's result, or the exception it raised."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return c.call(ctx)
    except Exception as err:  # noqa: BLE001 - the expectation judges it
        return err


PARAMS = [pytest.param(c, id=c.id, marks=[pytest.mark.xfail(strict=True, reason=c.bug)] if c.bug else [])
          for c in CASES]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_files(tmp_path_factory.mktemp("bad_input_files"))


@pytest.mark.parametrize("c", PARAMS)
def test_bad_input(c, files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths in the CLI cases (nope.h5ad, .) resolve here
    c.expect.verify(run_case(c, Ctx(tmp_path, files)))


def test_case_ids_are_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})


def test_doc_table_lists_every_case():
    """docs/bad_input.md has one table row per case, first column the test id, and marks every bug."""
    rows = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^\|\s*`([^`]+)`\s*\|", line)
        if match:
            rows[match.group(1)] = line
    ids = {c.id for c in CASES}
    assert not ids - set(rows), f"cases missing from {DOC.name}: {sorted(ids - set(rows))}"
    assert not set(rows) - ids, f"rows of {DOC.name} without a test: {sorted(set(rows) - ids)}"
    for c in CASES:
        assert ("**BUG**" in rows[c.id]) == bool(c.bug), f"{c.id}: BUG marker in the table and bug= disagree"
