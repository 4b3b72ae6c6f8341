"""Inputs that used to end the CLI in a traceback (exit 1): each now prints one line ``pathfactor: error: ...``
and exits 2, or, for data at extreme scales, fits with finite results. Also the data-layer functions behind them
(``read_h5ad``, ``GeneSets.read_json``, ``covariate_design``, ``working_dtype``, ``factor_r2``, ``pathfactor.memory``)
through the Python API."""
from __future__ import annotations

import warnings

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from pathfactor import memory
from pathfactor.cli import main
from pathfactor.data.genesets import GeneSets
from pathfactor.data.inputs import as_matrix, covariate_design, read_h5ad, working_dtype
from pathfactor.evaluate import factor_r2
from pathfactor.models import PCA, PPCA, FactorAnalysis, Spex

pytestmark = pytest.mark.usefixtures("torch_one_thread")

N, G = 30, 20
GENES = [f"G{j}" for j in range(G)]


def one_line_error(capsys, rc: int, *words) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert rc == 2, err
    assert err.startswith("pathfactor: error: "), err
    assert "\n" not in err, err
    assert "Traceback" not in err + captured.out
    for word in words:
        assert word.lower() in err.lower(), err
    return err


def data(scale: float = 1.0, seed: int = 0) -> np.ndarray:
    """Low-rank positive data (two factors plus noise) times ``scale``."""
    rng = np.random.default_rng(seed)
    Y = np.abs(rng.normal(size=(N, 2)) @ rng.normal(size=(2, G)) + 0.3 * rng.normal(size=(N, G)) + 3)
    return (Y * scale).astype(np.float32)


def write(tmp_path, name, X, **obs) -> str:
    frame = pd.DataFrame({"grp": ["a", "b"] * (N // 2), **obs}, index=[f"c{i}" for i in range(N)])
    path = tmp_path / name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ad.AnnData(X, obs=frame, var=pd.DataFrame(index=GENES)).write_h5ad(path)
    return str(path)


@pytest.fixture
def gmt(tmp_path) -> str:
    path = tmp_path / "sets.gmt"
    GeneSets({"S1": GENES[:8], "S2": GENES[6:16]}).write_gmt(path)
    return str(path)


# ============================================================================ A1: HDF5 that is not AnnData
@pytest.fixture
def not_anndata(tmp_path) -> str:
    path = tmp_path / "plain.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=[1, 2, 3])
    return str(path)


@pytest.mark.parametrize("command", ["fit", "report"])
def test_hdf5_that_is_not_anndata(not_anndata, tmp_path, capsys, command):
    extra = ["--model", "pca"] if command == "fit" else []
    out = str(tmp_path / ("out.h5ad" if command == "fit" else "rep"))
    rc = main([command, not_anndata, *extra, "--out", out, "--quiet"])
    one_line_error(capsys, rc, "is an HDF5 file but not AnnData", "top-level keys: x", "write_h5ad")


def test_read_h5ad_names_the_problem(not_anndata, tmp_path):
    with pytest.raises(ValueError, match="not AnnData"):
        read_h5ad(not_anndata)
    broken = tmp_path / "broken.h5ad"  # has obs and var, but they are not AnnData's
    with h5py.File(broken, "w") as f:
        f.create_dataset("obs", data=[1, 2])
        f.create_dataset("var", data=[1, 2])
    with pytest.raises(ValueError, match="cannot read .* as AnnData"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata: "written with a very old version of AnnData"
        read_h5ad(broken)
    with pytest.raises(FileNotFoundError):
        read_h5ad(tmp_path / "nope.h5ad")


# ============================================================================ A2: deeply nested JSON gene sets
@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, '{"a": ' * 100_000 + "1" + "}" * 100_000],
                         ids=["arrays", "objects"])
def test_deeply_nested_json_gene_sets(tmp_path, capsys, text):
    sets = tmp_path / "deep.json"
    sets.write_text(text)
    with pytest.raises(ValueError, match="too deeply"):
        GeneSets.read(sets)
    rc = main(["fit", write(tmp_path, "ok.h5ad", data()), "--model", "spex", "--gene-sets", str(sets),
               "--out", str(tmp_path / "out.h5ad"), "--quiet"])
    one_line_error(capsys, rc, "nests JSON arrays or objects too deeply")


# ============================================================================ A3: numeric covariates at 1e40
@pytest.mark.parametrize("model", ["supervised", "spex", "slalom"])
def test_covariate_too_large_for_float32(tmp_path, capsys, gmt, model):
    big = np.random.default_rng(1).normal(size=N) * 1e40
    path = write(tmp_path, "big.h5ad", data(), big=big)
    sets = ["--gene-sets", gmt, "--min-set-size", "2"] if model != "supervised" else ["--n-factors", "2"]
    rc = main(["fit", path, "--model", model, *sets, "--covariates", "big", "--max-epochs", "5",
               "--out", str(tmp_path / "out.h5ad"), "--quiet"])
    one_line_error(capsys, rc, "covariate 'big' has values up to", "too large for float32", "rescale")


def test_covariate_design_refuses_unsafe_scales():
    obs = pd.DataFrame({"big": np.linspace(-1, 1, N) * 1e40, "tiny": np.linspace(-1, 1, N) * 1e-20,
                        "offset": 1e10 + np.linspace(0, 1e-3, N), "fine": np.linspace(-1, 1, N) * 1e10})
    with pytest.raises(ValueError, match="too large for float32"):
        covariate_design(obs, ["big"], N)
    for col in ("tiny", "offset"):
        with pytest.raises(ValueError, match="varies too little for float32"):
            covariate_design(obs, [col], N)
    Z, names = covariate_design(obs, ["fine"], N)
    assert np.isfinite(Z).all() and names == ["fine"]


# ============================================================================ A4: data at extreme scales
@pytest.mark.parametrize("scale", [1e-25, 1e-40, 1e12])
@pytest.mark.parametrize("args", [["--model", "ppca"], ["--model", "ppca", "--method", "em"],
                                  ["--model", "ppca", "--method", "map"], ["--model", "ppca", "--method", "vi"],
                                  ["--model", "pca"], ["--model", "fa"], ["--model", "nmf"], ["--model", "spex"]],
                         ids=lambda a: "-".join(a[1::2]))
def test_fit_at_extreme_scales(tmp_path, capsys, gmt, args, scale):
    """No traceback and no NaN relevance at any scale as_matrix accepts (its upper limit here is ~7.5e13)."""
    out = tmp_path / "out.h5ad"
    extra = ["--gene-sets", gmt, "--min-set-size", "2", "--max-epochs", "20"] if "spex" in args else \
        ["--n-factors", "2", "--max-epochs", "50"] if args[1] != "pca" else ["--n-factors", "2"]
    rc = main(["fit", write(tmp_path, "x.h5ad", data(scale)), *args, *extra, "--out", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "nan" not in captured.out.lower(), captured.out
    result = ad.read_h5ad(out)
    (scores,) = [k for k in result.obsm if k.startswith("X_")]  # the model's key (spex, pf_pca, ...)
    assert np.isfinite(result.obsm[scores]).all() and np.isfinite(result.varm[f"{scores[2:]}_loadings"]).all()


def test_too_large_values_are_refused_in_one_line(tmp_path, capsys):
    rc = main(["fit", write(tmp_path, "huge.h5ad", data(1e25)), "--model", "ppca", "--n-factors", "2",
               "--out", str(tmp_path / "out.h5ad"), "--quiet"])
    one_line_error(capsys, rc, "too large for float32 arithmetic")


@pytest.mark.parametrize("scale", [1e-25, 1e-40])
def test_scale_equivariant_models_work_at_tiny_scales(scale):
    """PPCA (mle, em), FactorAnalysis and PCA give the same relevance at 1e-25 as at 1, loadings scaled."""
    Y = data()
    for make in (lambda: PPCA(n_factors=2, progress=False), lambda: PPCA(n_factors=2, method="em", progress=False),
                 lambda: FactorAnalysis(n_factors=2, progress=False), lambda: PCA(n_factors=2)):
        one, tiny = make().fit(Y), make().fit((Y.astype(np.float64) * scale).astype(np.float32))
        np.testing.assert_allclose(tiny.relevance_, one.relevance_, rtol=1e-3, atol=1e-4)
        ratio = 1.0 if isinstance(one, PCA) else scale
        np.testing.assert_allclose(tiny.loadings_.to_numpy() / ratio, one.loadings_.to_numpy(), rtol=1e-2, atol=1e-3)


def test_working_dtype():
    tiny, normal = as_matrix(data(1e-25)), as_matrix(data())
    assert working_dtype(tiny, "float32") == "float64"
    assert working_dtype(tiny, np.float32) == np.float64
    import torch

    assert working_dtype(tiny, torch.float32) is torch.float64
    assert working_dtype(normal, torch.float32) is torch.float32
    assert working_dtype(tiny, "float64") == "float64"


def test_factor_r2_is_scale_free():
    rng = np.random.default_rng(0)
    X, W = rng.normal(size=(N, 2)), rng.normal(size=(G, 2))
    Y = X @ W.T + 0.1 * rng.normal(size=(N, G))
    Y -= Y.mean(0)
    want = factor_r2(Y, X, W)
    for scale in (1e-25, 1e-40, 1e12):
        np.testing.assert_allclose(factor_r2(Y * scale, X, W * scale), want, rtol=1e-10)
        sparse = sp.csr_matrix((Y * scale).astype(np.float32))  # float32 squares would underflow
        np.testing.assert_allclose(factor_r2(sparse, X, W * scale), want, rtol=1e-4)


# ============================================================================ A5: a fit whose memory does not fit
def test_memory_check_refuses_in_one_line(tmp_path, capsys, gmt, monkeypatch):
    monkeypatch.setattr(memory, "available_memory", lambda device=None: 2**16)
    rc = main(["fit", write(tmp_path, "ok.h5ad", data()), "--model", "spex", "--gene-sets", gmt,
               "--min-set-size", "2", "--n-dense", "10", "--out", str(tmp_path / "out.h5ad"), "--quiet"])
    err = one_line_error(capsys, rc, "fitting Spex with 14 factors to 30 cells x 20 genes needs about",
                         "64.0 KiB is available", "fewer factors")
    assert not (tmp_path / "out.h5ad").exists(), err


def test_memory_estimates():
    # Spex: ~6 G x D x D arrays dominate; a big Spex on 50k cells x 20k genes x 2000 factors needs terabytes
    assert memory.memory_estimate("Spex", 50_000, 20_000, 2_000) > 6 * 20_000 * 2_000 ** 2 * 4
    assert memory.memory_estimate("Spex", 100, 200, 5, dtype="float64") > memory.memory_estimate("Spex", 100, 200, 5)
    for name in ("PPCA", "FactorAnalysis", "PCA", "NMF", "Slalom", "VAE", "Autoencoder", "Unknown"):
        assert memory.memory_estimate(name, 1000, 2000, 10) >= 1000 * 2000 * 4
    adata = ad.AnnData(data(), obs=pd.DataFrame({"grp": ["a", "b", "c"] * (N // 3)}, index=[f"c{i}" for i in range(N)]),
                       var=pd.DataFrame(index=GENES))
    sets = {"S1": GENES[:8], "S2": GENES[6:16], "small": GENES[:1]}
    model = Spex(n_sparse=1, n_dense=2, min_set_size=2)
    # 2 sets pass the size filter + 3 unannotated factors, 2 covariate columns (3 levels)
    assert memory.fit_memory_estimate(model, adata, annotations=sets, covariates="grp") == \
        memory.memory_estimate("Spex", N, G, 5, 2)
    assert memory.check_fit_memory(model, adata, annotations=sets, available=10**12) is not None
    with pytest.raises(memory.InsufficientMemoryError, match="needs about .* is available") as info:
        memory.check_fit_memory(model, adata, annotations=sets, available=1000)
    assert isinstance(info.value, MemoryError) and isinstance(info.value, ValueError)
    # as many factors as genes: no verdict here, the fit's own shape check says what is wrong
    assert memory.check_fit_memory(PPCA(n_factors=G), adata, available=1) is None
    avail = memory.available_memory()
    assert avail is None or avail > 0
