"""``pathfactor fit --interventions COL --reference LEVEL|COL=LEVEL`` and ``pf.tl.*(interventions=, reference=)``."""
from __future__ import annotations

import json

import anndata as ad
import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

import pathfactor as pf  # noqa: E402
from pathfactor.cli import _parse_reference, main  # noqa: E402

N_CELLS, N_GENES, N_SETS, SET_SIZE = 200, 60, 3, 20

pytestmark = pytest.mark.usefixtures("torch_one_thread")  # small fits: two threads stall on busy cores


def perturbed(seed: int = 0) -> tuple[ad.AnnData, dict]:
    """Cells with a guide target (NT the most frequent; g1 raises program P0) and a stimulation (STIM the most
    frequent), and the programs' gene sets."""
    rng = np.random.default_rng(seed)
    target = rng.choice(["NT", "g1", "g2"], size=N_CELLS, p=[0.5, 0.25, 0.25])
    stim = rng.choice(["CTRL", "STIM"], size=N_CELLS, p=[0.3, 0.7])
    X = rng.normal(size=(N_CELLS, N_SETS))
    X[target == "g1", 0] += 1.5
    mask = np.zeros((N_GENES, N_SETS), bool)
    for k in range(N_SETS):
        mask[k * SET_SIZE:(k + 1) * SET_SIZE, k] = True
    W = mask * rng.normal(0.8, 0.2, size=mask.shape)
    Y = X @ W.T + rng.normal(size=(N_CELLS, N_GENES)) + 0.5 * (stim == "STIM")[:, None]
    adata = ad.AnnData(Y.astype(np.float32), obs=pd.DataFrame({"target": target, "stim": stim},
                                                              index=[f"c{i}" for i in range(N_CELLS)]))
    adata.var_names = [f"g{i}" for i in range(N_GENES)]
    sets = {f"P{k}": [f"g{i}" for i in range(k * SET_SIZE, (k + 1) * SET_SIZE)] for k in range(N_SETS)}
    return adata, sets


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("interventions")
    adata, sets = perturbed()
    adata.write_h5ad(d / "data.h5ad")
    (d / "sets.json").write_text(json.dumps(sets))
    return str(d / "data.h5ad"), str(d / "sets.json")


def spex_args(files, out, *extra):
    h5ad, sets = files
    return ["fit", h5ad, "--gene-sets", sets, "--n-sparse", "0", "--min-set-size", "5", "--max-epochs", "50",
            "--out", str(out), "--quiet", *extra]


def test_spex_interventions_written_and_reference_printed(files, tmp_path, capsys):
    out = tmp_path / "fit.h5ad"
    rc = main(spex_args(files, out, "--interventions", "target", "--reference", "NT", "--covariates", "stim"))
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "reference level of 'target': NT (given)" in captured.out
    assert "reference level of 'stim': STIM (most frequent)" in captured.out  # a bare level is the interventions'
    res = ad.read_h5ad(out)
    uns = res.uns["spex"]
    assert str(uns["intervention_reference"]) == "NT"
    assert list(uns["intervention_levels"]) == ["g1", "g2"]
    for name in ("intervention_effects", "intervention_effects_sd", "intervention_effects_lfsr"):
        table = uns[name]
        assert isinstance(table, pd.DataFrame) and table.shape == (N_SETS, 2)
        assert list(table.columns) == ["g1", "g2"]
    assert res.varm["spex_gene_effects"].shape == (N_GENES, 2)
    assert res.varm["spex_gene_effects_sd"].shape == (N_GENES, 2)
    effects, lfsr = uns["intervention_effects"], uns["intervention_effects_lfsr"]
    assert effects.loc["P0", "g1"] > 0.5 and lfsr.loc["P0", "g1"] < 0.05  # g1 raises P0


def test_supervised_takes_interventions_without_covariates(files, tmp_path, capsys):
    out = tmp_path / "fit.h5ad"
    rc = main(["fit", files[0], "--model", "supervised", "--n-factors", "2", "--max-epochs", "30",
               "--interventions", "target", "--reference", "target=g2", "--out", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "reference level of 'target': g2 (given)" in captured.out
    uns = ad.read_h5ad(out).uns["supervised"]
    assert str(uns["intervention_reference"]) == "g2"
    assert list(uns["intervention_levels"]) == ["NT", "g1"]


def test_column_references_and_defaults(files, tmp_path, capsys):
    out = tmp_path / "fit.h5ad"
    rc = main(["fit", files[0], "--model", "supervised", "--n-factors", "2", "--max-epochs", "30",
               "--interventions", "target", "--covariates", "stim", "--reference", "stim=CTRL", "--out", str(out),
               "--quiet"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "reference level of 'target': NT (most frequent)" in printed
    assert "reference level of 'stim': CTRL (given)" in printed
    assert list(ad.read_h5ad(out).uns["supervised"]["covariate_names"]) == ["stim=STIM"]


@pytest.mark.parametrize("extra, words", [
    (["--interventions", "target", "--reference", "XX"], ["'XX'", "target"]),
    (["--interventions", "guide"], ["--interventions", "'guide'", "not a column"]),
    (["--interventions", "target", "--reference", "NT", "--reference", "stim=CTRL", "--covariates", "stim"],
     ["--reference", "COL=LEVEL"]),
    (["--interventions", "target", "--reference", "NT", "--reference", "g1"], ["--reference", "one"]),
    (["--interventions", "target", "--reference", "batch=NT"], ["'batch'", "neither"]),
    (["--reference", "NT"], ["--reference", "--interventions"]),
])
def test_bad_interventions_input_is_one_line(files, tmp_path, capsys, extra, words, one_line_error):
    assert main(spex_args(files, tmp_path / "fit.h5ad", *extra)) == 2
    one_line_error(*words)
    assert not (tmp_path / "fit.h5ad").exists()


@pytest.mark.parametrize("model, flag", [("pca", "--interventions"), ("slalom", "--reference")])
def test_model_without_interventions_is_refused(files, tmp_path, capsys, model, flag, one_line_error):
    h5ad, sets = files
    extra = (["--interventions", "target"] if flag == "--interventions" else
             ["--gene-sets", sets, "--covariates", "stim", "--reference", "CTRL"])
    assert main(["fit", h5ad, "--model", model, *extra, "--out", str(tmp_path / "fit.h5ad"), "--quiet"]) == 2
    one_line_error("does not take", flag)


def test_parse_reference():
    assert _parse_reference(None) is None
    assert _parse_reference(["NT"]) == "NT"
    assert _parse_reference(["target=NT", "stim=CTRL"]) == {"target": "NT", "stim": "CTRL"}
    assert _parse_reference(["target=a=b"]) == {"target": "a=b"}  # split at the first "="
    for bad in (["NT", "g1"], ["NT", "stim=CTRL"], ["=NT"], ["target="], ["target=a", "target=b"]):
        with pytest.raises(ValueError):
            _parse_reference(bad)


def test_tools_pass_interventions_and_reference():
    adata, sets = perturbed()
    model = pf.tl.spex(adata, gene_sets=sets, n_sparse=0, min_set_size=5, max_epochs=30, progress=False,
                       interventions="target", reference="g1")
    assert model.intervention_reference_ == "g1"
    assert str(adata.uns["spex"]["intervention_reference"]) == "g1"
    pf.tl.supervised(adata, n_factors=2, max_epochs=20, progress=False, covariates=["stim"],
                     interventions="target", reference={"stim": "CTRL"})
    assert adata.uns["supervised"]["intervention_reference"] == "NT"
    assert list(adata.uns["supervised"]["covariate_names"]) == ["stim=STIM"]
    with pytest.raises(ValueError, match="does not take interventions"):
        pf.tl.pca(adata, n_factors=2, interventions="target")


def test_fit_prints_what_each_level_moves(tmp_path, capsys):
    """stdout names, per level, how many factors it moves and the largest of them."""
    from pathfactor.cli import _intervention_lines

    class Fitted:
        intervention_reference_ = "NT"
        intervention_effects_ = pd.DataFrame({"g1": [1.5, 0.01], "g2": [0.0, -0.02], "g3": [30.0, 0.0]},
                                             index=["P0", "P1"])
        intervention_effects_lfsr_ = pd.DataFrame({"g1": [1e-9, 0.6], "g2": [0.9, 0.7], "g3": [np.nan, np.nan]},
                                                  index=["P0", "P1"])
        loadings_ = pd.DataFrame({"P0": [1.0, 1.0, 0.5], "P1": [1.0, 1.0, 1.0]}, index=["SAT1", "A", "B"])  # programs

    lines = _intervention_lines(Fitted())
    assert lines == ["g1 vs NT: 1 factor(s) moved at lfsr < 0.05 (largest: P0 +1.50)",
                     "g2 vs NT: 0 factor(s) moved at lfsr < 0.05", "g3 vs NT: no lfsr (a single cell)"]
    one_gene = Fitted()
    one_gene.loadings_ = pd.DataFrame({"P0": [2.0, 0.1, 0.1], "P1": [1.0, 1.0, 1.0]}, index=["SAT1", "A", "B"])
    assert _intervention_lines(one_gene)[0] == "g1 vs NT: 1 factor(s) moved at lfsr < 0.05 (largest: P0 +1.50 [one " \
                                               "gene: SAT1])"
    lines = _intervention_lines(Fitted(), max_levels=1)  # many levels: those that move the most, and a summary
    assert lines == ["g1 vs NT: 1 factor(s) moved at lfsr < 0.05 (largest: P0 +1.50)",
                     "... and 2 more levels, 0 of them moving a factor at lfsr < 0.05 (every level is in the "
                     "output's intervention_effects_lfsr)"]
