"""`pathfactor fit --model vae|gmvae [--likelihood L] [--n-clusters C]` on a small count file."""
import anndata as ad
import numpy as np
import pytest

from pathfactor import cli
from pathfactor.cli import main


@pytest.fixture(scope="module")
def counts_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 80)
    mu = np.exp(rng.normal(1, 1, (2, 30)))[labels]
    adata = ad.AnnData(rng.poisson(mu).astype(np.float32))
    adata.var_names = [f"g{j}" for j in range(30)]
    adata.obs_names = [f"c{i}" for i in range(80)]
    path = tmp_path_factory.mktemp("counts") / "counts.h5ad"
    adata.write_h5ad(path)
    return path


def one_line_error(capsys, *words):
    err = capsys.readouterr().err.strip()
    assert err.startswith("pathfactor: error: ") and "\n" not in err, err
    for word in words:
        assert word in err, err


@pytest.mark.parametrize("likelihood", ["poisson", "nb", "zip", "zinb"])
def test_fit_vae_with_each_count_likelihood(counts_file, tmp_path, capsys, likelihood):
    out, saved = tmp_path / "vae.h5ad", tmp_path / "model"
    rc = main(["fit", str(counts_file), "--model", "vae", "--likelihood", likelihood, "--n-factors", "3",
               "--max-epochs", "4", "--out", str(out), "--save-model", str(saved), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert "KL (nats)" in capsys.readouterr().out
    res = ad.read_h5ad(out)
    assert res.obsm["X_vae"].shape == (80, 3) and np.isfinite(res.obsm["X_vae"]).all()
    assert res.varm["vae_loadings"].shape == (30, 3)
    assert res.uns["vae"]["params"]["likelihood"] == likelihood
    assert (saved / "model.json").is_file()


def test_fit_gmvae_writes_clusters(counts_file, tmp_path):
    out = tmp_path / "gmvae.h5ad"
    assert main(["fit", str(counts_file), "--model", "gmvae", "--n-clusters", "2", "--n-factors", "2",
                 "--max-epochs", "3", "--out", str(out), "--quiet"]) == 0
    res = ad.read_h5ad(out)
    assert set(res.obs["gmvae_cluster"].astype(int)) <= {0, 1}
    assert res.obsm["gmvae_cluster_probs"].shape == (80, 2)
    assert res.uns["gmvae"]["params"]["n_clusters"] == 2 and res.uns["gmvae"]["params"]["likelihood"] == "nb"


@pytest.mark.parametrize("name", ["gaussian", "normal"])
def test_gaussian_likelihood_on_log_data(counts_file, tmp_path, name):
    logged = ad.read_h5ad(counts_file)
    logged.X = np.log1p(logged.X)
    path = tmp_path / "log.h5ad"
    logged.write_h5ad(path)
    assert main(["fit", str(path), "--model", "vae", "--likelihood", name, "--n-factors", "2",
                 "--max-epochs", "3", "--out", str(tmp_path / "o.h5ad"), "--quiet"]) == 0


def test_bad_input_exits_2_with_one_line(counts_file, tmp_path, capsys):
    out = str(tmp_path / "x.h5ad")
    assert main(["fit", str(counts_file), "--model", "pca", "--likelihood", "nb", "--out", out, "--quiet"]) == 2
    one_line_error(capsys, "--likelihood does not apply to --model pca")
    assert main(["fit", str(counts_file), "--model", "vae", "--n-clusters", "3", "--out", out, "--quiet"]) == 2
    one_line_error(capsys, "--n-clusters", "--model vae")
    logged = ad.read_h5ad(counts_file)
    logged.X = np.log1p(logged.X)
    path = tmp_path / "log.h5ad"
    logged.write_h5ad(path)
    assert main(["fit", str(path), "--model", "vae", "--likelihood", "zinb", "--out", out, "--quiet"]) == 2
    one_line_error(capsys, "needs integer counts")
    assert main(["fit", str(counts_file), "--model", "vae", "--likelihood", "bernoulli", "--out", out]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_model_table_lists_vae_and_gmvae():
    assert {"vae", "gmvae"} <= set(cli.MODELS)
    assert cli.MODELS["gmvae"].options["n_clusters"] == "n_clusters"
