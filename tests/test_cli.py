"""The ``pathfactor`` command line, run in-process through ``main([...])`` (and once as ``python -m pathfactor``)."""
from __future__ import annotations

import subprocess
import sys

import anndata as ad
import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from pathfactor import cli  # noqa: E402
from pathfactor.cli import main  # noqa: E402
from pathfactor.data import simulate  # noqa: E402
from pathfactor.data.genesets import GeneSets  # noqa: E402

N_CELLS, N_GENES, N_FACTORS = 200, 300, 5


@pytest.fixture(scope="module")
def sim_files(tmp_path_factory):
    """A simulated `annotations` data set and its annotation as a GMT file."""
    d = tmp_path_factory.mktemp("sim")
    h5ad = d / "sim.h5ad"
    assert main(["simulate", "annotations", "--out", str(h5ad), "--n-cells", str(N_CELLS), "--n-genes",
                 str(N_GENES), "--n-factors", str(N_FACTORS), "--noise", "0.1", "--seed", "1", "--quiet"]) == 0
    gmt = d / "annotation.gmt"
    GeneSets(simulate.annotation_sets(ad.read_h5ad(h5ad))).write_gmt(gmt)
    return h5ad, gmt


def test_simulate_writes_truth(sim_files):
    h5ad, _ = sim_files
    adata = ad.read_h5ad(h5ad)
    assert adata.shape == (N_CELLS, N_GENES)
    assert adata.obsm["X_true"].shape == (N_CELLS, N_FACTORS)
    assert adata.varm["W_true"].shape == (N_GENES, N_FACTORS)
    assert adata.varm["annotation"].shape == (N_GENES, N_FACTORS)
    assert adata.uns["simulation"]["noise"] == pytest.approx(0.1)


def test_fit_with_report_and_saved_model(sim_files, tmp_path, capsys):
    h5ad, gmt = sim_files
    out, report, saved = tmp_path / "out" / "fit.h5ad", tmp_path / "report", tmp_path / "model"
    rc = main(["fit", str(h5ad), "--model", "spex", "--gene-sets", str(gmt), "--min-set-size", "5",
               "--max-epochs", "30", "--out", str(out), "--report", str(report), "--save-model", str(saved),
               "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "R^2" in printed and "term_" in printed
    res = ad.read_h5ad(out)
    names = GeneSets.read(gmt).names + ["sparse_1", "sparse_2"]  # Spex's default: 2 unannotated sparse factors
    assert list(res.uns["spex"]["factor_names"]) == names
    assert res.obsm["X_spex"].shape == (N_CELLS, len(names))
    assert res.varm["spex_loadings"].shape == (N_GENES, len(names))
    assert len(res.uns["spex"]["relevance"]) == len(names)
    assert np.isfinite(res.obsm["X_spex"]).all()
    assert (report / "report.html").is_file()
    assert (saved / "model.json").is_file() and (saved / "arrays.npz").is_file()


def test_fit_with_covariates(tmp_path, capsys, one_line_error):
    data, out = tmp_path / "ppca.h5ad", tmp_path / "fit.h5ad"
    assert main(["simulate", "ppca", "--out", str(data), "--n-cells", "120", "--n-genes", "60", "--n-factors", "2",
                 "--sigma2", "0.3", "--quiet"]) == 0
    rc = main(["fit", str(data), "--gene-sets", "hallmark", "--n-dense", "2", "--covariates", "group",
               "--max-epochs", "20", "--out", str(out), "--quiet"])
    # the bundled human Hallmark sets match none of the simulated gene names
    assert rc == 2
    one_line_error("none of the")
    gmt = tmp_path / "sets.gmt"
    GeneSets({"first": [f"gene_{i}" for i in range(20)]}).write_gmt(gmt)
    rc = main(["fit", str(data), "--gene-sets", str(gmt), "--n-dense", "2", "--covariates", "group",
               "--max-epochs", "20", "--out", str(out), "--quiet"])
    assert rc == 0
    res = ad.read_h5ad(out)
    assert list(res.uns["spex"]["covariate_names"]) == ["group=stimulated"]
    assert res.varm["spex_covariate_effects"].shape == (60, 1)
    # the shift c = 2 per gene is recovered as the stimulated group's effect
    assert np.median(res.varm["spex_covariate_effects"]) == pytest.approx(2.0, abs=0.3)
    assert list(res.uns["spex"]["factor_names"]) == ["first", "sparse_1", "sparse_2", "dense_1", "dense_2"]


def test_fit_counts_in_blocks_of_cells(tmp_path, capsys, one_line_error):
    """--batch-size reaches the model: NB-Spex in blocks of cells fits the counts; a model without minibatches
    refuses it in one line."""
    counts = simulate.droplet_counts(n_cells=200, n_genes=80, n_programs=2, set_size=20, low=0.5, high=2.0, seed=0)
    data, out, gmt = tmp_path / "counts.h5ad", tmp_path / "fit.h5ad", tmp_path / "sets.gmt"
    counts.write_h5ad(data)
    GeneSets(simulate.annotation_sets(counts)).write_gmt(gmt)
    rc = main(["fit", str(data), "--gene-sets", str(gmt), "--likelihood", "nb", "--batch-size", "64",
               "--min-set-size", "5", "--max-epochs", "5", "--out", str(out), "--quiet"])
    assert rc == 0
    res = ad.read_h5ad(out)
    assert res.uns["spex"]["params"]["batch_size"] == 64
    assert np.isfinite(res.obsm["X_spex"]).all()
    rc = main(["fit", str(data), "--model", "pca", "--batch-size", "64", "--out", str(out), "--quiet"])
    assert rc == 2
    one_line_error("--batch-size", "not apply to --model pca")


# ----------------------------------------------------------------------------- bad input
def test_missing_input_file(tmp_path, capsys, one_line_error):
    rc = main(["fit", str(tmp_path / "nope.h5ad"), "--gene-sets", "hallmark", "--out", str(tmp_path / "o.h5ad")])
    assert rc == 2
    one_line_error("nope.h5ad", "does not exist")


def test_missing_gene_set_file(sim_files, tmp_path, capsys, one_line_error):
    h5ad, _ = sim_files
    rc = main(["fit", str(h5ad), "--gene-sets", str(tmp_path / "sets.gmt"), "--out", str(tmp_path / "o.h5ad"),
               "--quiet"])
    assert rc == 2
    one_line_error("sets.gmt", "does not exist")


def test_gene_sets_matching_nothing(sim_files, tmp_path, capsys, one_line_error):
    h5ad, _ = sim_files
    gmt = tmp_path / "human.gmt"
    GeneSets({"CELL_CYCLE": ["CCNB1", "CDK1", "MKI67", "TOP2A", "BUB1", "PLK1"]}).write_gmt(gmt)
    rc = main(["fit", str(h5ad), "--gene-sets", str(gmt), "--min-set-size", "5", "--out", str(tmp_path / "o.h5ad"),
               "--quiet"])
    assert rc == 2
    one_line_error("none of the 1 gene sets", "best match: 0 genes")
    assert not (tmp_path / "o.h5ad").exists()


def test_unknown_covariate_and_color_by(sim_files, tmp_path, capsys, one_line_error):
    h5ad, gmt = sim_files
    base = ["fit", str(h5ad), "--gene-sets", str(gmt), "--min-set-size", "5", "--out", str(tmp_path / "o.h5ad"),
            "--quiet"]
    assert main(base + ["--covariates", "batch"]) == 2
    one_line_error("'batch'", "not a column of obs")
    assert main(base + ["--report", str(tmp_path / "r"), "--color-by", "celltype"]) == 2
    one_line_error("'celltype'", "not a column")
    assert not (tmp_path / "o.h5ad").exists()


def test_nan_in_data(sim_files, tmp_path, capsys, one_line_error):
    h5ad, gmt = sim_files
    adata = ad.read_h5ad(h5ad)
    adata.X[3, 7] = np.nan
    bad = tmp_path / "nan.h5ad"
    adata.write_h5ad(bad)
    rc = main(["fit", str(bad), "--gene-sets", str(gmt), "--min-set-size", "5", "--out", str(tmp_path / "o.h5ad"),
               "--quiet"])
    assert rc == 2
    one_line_error("NaN")


def test_not_an_h5ad_file(tmp_path, capsys, one_line_error):
    bad = tmp_path / "text.h5ad"
    bad.write_text("not hdf5\n")
    assert main(["report", str(bad), "--out", str(tmp_path / "r"), "--quiet"]) == 2
    one_line_error("cannot read")


def test_report_without_results(sim_files, tmp_path, capsys, one_line_error):
    h5ad, _ = sim_files
    assert main(["report", str(h5ad), "--out", str(tmp_path / "r"), "--quiet"]) == 2
    one_line_error("uns['spex']")


def test_simulate_rejects_options_the_simulator_lacks(tmp_path, capsys, one_line_error):
    assert main(["simulate", "ppca", "--noise", "0.2", "--out", str(tmp_path / "p.h5ad"), "--quiet"]) == 2
    one_line_error("--noise")
    assert not (tmp_path / "p.h5ad").exists()


def test_bad_arguments_exit_2(capsys):
    assert main(["fit"]) == 2
    assert "usage" in capsys.readouterr().err
    assert main(["simulate", "nonsense", "--out", "x.h5ad"]) == 2
    assert main(["fit", "x.h5ad", "--model", "nonsense", "--out", "y.h5ad"]) == 2


def test_model_table_rejects_inapplicable_options():
    # every model-specific flag must map onto some constructor argument of the model that declares it
    for name, spec in cli.MODELS.items():
        params = cli.inspect.signature(spec.load().__init__).parameters
        assert set(spec.options.values()) <= set(params), name
        assert set(spec.options) <= set(cli.MODEL_OPTIONS), name


def test_python_m_help():
    proc = subprocess.run([sys.executable, "-m", "pathfactor", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    for command in ("demo", "fit", "simulate", "report"):
        assert command in proc.stdout


# ----------------------------------------------------------------------------- the demo (~30 s)
def test_demo(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    line = next(ln for ln in printed.splitlines() if ln.startswith("AUROC"))
    auc = float(line.rsplit(":", 1)[1])
    assert auc > 0.75, printed
    assert "HALLMARK_G2M_CHECKPOINT" in printed and "elapsed" in printed
    assert (out / "mesc_spex.h5ad").is_file()
    assert (out / "report.html").is_file()
    res = ad.read_h5ad(out / "mesc_spex.h5ad")
    assert "HALLMARK_G2M_CHECKPOINT" in list(res.uns["spex"]["factor_names"])


def test_help_imports_no_heavy_library_and_lists_every_simulator():
    """`pathfactor --help` starts fast: the package loads its submodules lazily and the CLI imports no torch,
    scanpy or anndata to build its parser (median <= 1 s is the target; imports are what cost)."""
    import subprocess

    from pathfactor.cli import SIMULATOR_KINDS
    from pathfactor.data.simulate import SIMULATORS

    assert SIMULATOR_KINDS == sorted(SIMULATORS)
    code = ("import sys; from pathfactor.cli import main; main(['fit', '--help']); "
            "heavy = [m for m in ('torch', 'scanpy', 'anndata', 'numpy', 'pandas') if m in sys.modules]; "
            "print('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out and "--gene-sets" in out
    assert "(default: spex 0, slalom 0, autoencoder 0)" in " ".join(out.split())  # each model's own default
