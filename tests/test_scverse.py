"""pathfactor at home in scanpy: ``pf.tl.<model>``, ``pf.pl.*``, named factors in ``obs``, keys that never
overwrite another tool's, ``pathfactor fit --key``, and one line of scanpy on a fresh ``pathfactor fit`` output."""
from __future__ import annotations

import inspect
import logging

import matplotlib

matplotlib.use("Agg")

import anndata as ad  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import scanpy as sc  # noqa: E402

import pathfactor as pf  # noqa: E402
from pathfactor import cli  # noqa: E402
from pathfactor.data.genesets import GeneSets  # noqa: E402
from pathfactor.models import MODEL_MODULES, model_class  # noqa: E402
from pathfactor.models.anndata_io import N_OBS_FACTORS, SCANPY_KEYS, names  # noqa: E402

pytestmark = [pytest.mark.usefixtures("torch_one_thread"),
              pytest.mark.filterwarnings("ignore::pathfactor.train.ConvergenceWarning")]

N_CELLS, N_GENES = 80, 60
SETS = {"PROG_A": [f"g{i}" for i in range(0, 15)], "PROG_B": [f"g{i}" for i in range(15, 30)],
        "PROG_C": [f"g{i}" for i in range(30, 45)]}


def tiny(seed: int = 0) -> ad.AnnData:
    """80 cells x 60 genes of counts from 3 programs of 15 genes each; X = log1p(counts), layers["counts"],
    obs["group"], and a (random) obsm["X_umap"] as if sc.tl.umap had run."""
    rng = np.random.default_rng(seed)
    X = rng.gamma(2.0, 1.0, size=(N_CELLS, 3))
    W = np.zeros((N_GENES, 3))
    for k in range(3):
        W[15 * k:15 * (k + 1), k] = rng.uniform(1.0, 2.0, 15)
    counts = rng.poisson(np.exp(0.5 + 0.3 * X @ W.T)).astype(np.float32)
    obs = pd.DataFrame({"group": pd.Categorical(rng.choice(["a", "b"], N_CELLS))},
                       index=[f"c{i}" for i in range(N_CELLS)])
    adata = ad.AnnData(np.log1p(counts), obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(N_GENES)]))
    adata.layers["counts"] = counts
    adata.obsm["X_umap"] = rng.normal(size=(N_CELLS, 2)).astype(np.float32)
    return adata


#: tool -> its arguments on the tiny data (few epochs, no progress bars)
ARGS = {
    "spex": dict(gene_sets=SETS, min_set_size=5, n_dense=1, max_epochs=20, progress=False),
    "supervised": dict(covariates=["group"], n_factors=2, max_epochs=20, progress=False),
    "slalom": dict(gene_sets=SETS, min_set_size=5, max_epochs=20, progress=False),
    "autoencoder": dict(gene_sets=SETS, min_set_size=5, max_epochs=10, progress=False),
    "nmf": dict(gene_sets=SETS, min_set_size=5, n_factors=4, max_epochs=20, progress=False),
    "pca": dict(n_factors=3),
    "ppca": dict(n_factors=3, progress=False),
    "factor_analysis": dict(n_factors=3, max_epochs=20, progress=False),
    "vae": dict(layer="counts", n_latent=2, max_epochs=3, progress=False),
    "gmvae": dict(layer="counts", n_latent=2, n_clusters=2, max_epochs=3, progress=False),
}


@pytest.fixture(scope="module")
def spexed():
    """The tiny data with a Spex result under the default key, and the model."""
    adata = tiny()
    model = pf.tl.spex(adata, **ARGS["spex"])
    return adata, model


def roundtrip(adata, tmp_path, name="rt.h5ad") -> ad.AnnData:
    adata.write_h5ad(tmp_path / name)
    return ad.read_h5ad(tmp_path / name)


# ============================================================================ pf.tl.<model>
def test_a_tool_per_model_generated_from_the_table():
    assert list(pf.tl.TOOLS) == list(ARGS)
    assert sorted(pf.tl.TOOLS.values()) == sorted(cli.MODELS)
    for name in pf.tl.TOOLS:
        tool = getattr(pf.tl, name)
        assert tool.__name__ == name and "copy=True" in tool.__doc__
        assert list(inspect.signature(tool).parameters) == ["adata", "gene_sets", "key_added", "copy", "layer",
                                                            "covariates", "seed", "params"]


@pytest.mark.parametrize("name", list(ARGS))
def test_tool_fits_and_writes_named_factors(name, tmp_path):
    adata = tiny()
    model = getattr(pf.tl, name)(adata, **ARGS[name])
    key = model.key
    assert type(model).__name__ == cli.MODELS[pf.tl.TOOLS[name]].load().__name__
    assert adata.obsm[f"X_{key}"].shape == (N_CELLS, len(model.factor_kinds_))
    meta = adata.uns[key]
    assert meta["model"] == type(model).__name__ and meta["n_epochs"] == len(model.history_)
    top = model.relevance(active_only=True).index[:N_OBS_FACTORS].tolist()
    assert meta["obs_factors"] == top and meta["obs_columns"] == [f"{key}_{f}" for f in top]
    for f in top:
        np.testing.assert_allclose(adata.obs[f"{key}_{f}"], model.factor_scores_[f], rtol=1e-6, atol=1e-6)
    if getattr(model, "converged_", None) is not None:
        assert meta["converged"] == bool(model.converged_)
    if getattr(model, "seed_", None) is not None:
        assert meta["seed"] == model.seed_
    else:
        assert "seed" not in meta
    back = roundtrip(adata, tmp_path)
    assert names(back.uns[key]["obs_columns"]) == meta["obs_columns"]
    assert names(back.uns[key]["factor_names"]) == list(model.factor_scores_.columns)
    scores = pf.tl.scores(back, key)
    assert scores.shape == (N_CELLS, len(model.factor_kinds_)) and list(scores.var_names) == meta["factor_names"]
    np.testing.assert_allclose(scores.X, model.factor_scores_.to_numpy(), rtol=1e-5, atol=1e-5)


def test_gene_sets_given_to_a_model_without_them_is_an_error():
    adata = tiny()
    for name in ("pca", "ppca", "factor_analysis", "vae", "gmvae", "supervised"):
        with pytest.raises(ValueError, match="does not use gene sets"):
            getattr(pf.tl, name)(adata, gene_sets=SETS)
    with pytest.raises(ValueError, match="does not take covariates"):
        pf.tl.pca(adata, covariates=["group"])
    with pytest.raises(TypeError, match=r"unexpected parameter\(s\) \['n_sprase'\]"):
        pf.tl.spex(adata, gene_sets=SETS, n_sprase=2)
    with pytest.raises(TypeError, match="needs an AnnData"):
        pf.tl.pca(adata.X)
    assert list(adata.uns) == [] and list(adata.obsm) == ["X_umap"]


def test_copy_returns_the_modified_copy_and_leaves_the_original_untouched():
    adata = tiny()
    before = adata.copy()
    out = pf.tl.ppca(adata, n_factors=2, copy=True, progress=False)
    assert isinstance(out, ad.AnnData) and out is not adata
    assert "X_ppca" in out.obsm and "ppca" in out.uns and "ppca_PPC1" in out.obs
    assert list(adata.obsm) == ["X_umap"] and list(adata.uns) == [] and list(adata.varm) == []
    assert list(adata.obs.columns) == ["group"]
    np.testing.assert_array_equal(adata.X, before.X)
    model = pf.tl.ppca(adata, n_factors=2, progress=False)  # copy=False: the model, adata modified
    assert isinstance(model, pf.models.PPCA) and "X_ppca" in adata.obsm


def test_key_added_is_respected():
    adata = tiny()
    model = pf.tl.spex(adata, key_added="hallmarks", **ARGS["spex"])
    assert model.key == "spex"
    assert "X_hallmarks" in adata.obsm and "hallmarks_loadings" in adata.varm and "hallmarks" in adata.uns
    assert "X_spex" not in adata.obsm and "spex" not in adata.uns
    assert "hallmarks_PROG_A" in adata.obs.columns and not any(c.startswith("spex_") for c in adata.obs.columns)


def test_params_reach_the_constructor_and_fit():
    adata = tiny()
    model = pf.tl.ppca(adata, n_factors=2, method="em", max_epochs=5, device="cpu", seed=3, progress=False)
    assert (model.n_factors, model.method, model.max_epochs) == (2, "em", 5)
    assert adata.uns["ppca"]["params"]["method"] == "em"


# ============================================================================ keys: never over another tool's
def test_default_keys_are_not_scanpys():
    assert pf.models.PCA.key == "pf_pca"
    for name in MODEL_MODULES:
        assert model_class(name).key not in SCANPY_KEYS, name


def test_pca_leaves_scanpys_pca_alone():
    adata = tiny()
    sc.pp.pca(adata, n_comps=3)
    x_pca, pcs = adata.obsm["X_pca"].copy(), adata.varm["PCs"].copy()
    uns_pca = {k: v for k, v in adata.uns["pca"].items()}
    model = pf.tl.pca(adata, n_factors=3)
    assert model.key == "pf_pca" and "X_pf_pca" in adata.obsm and "pf_pca_loadings" in adata.varm
    np.testing.assert_array_equal(adata.obsm["X_pca"], x_pca)
    np.testing.assert_array_equal(adata.varm["PCs"], pcs)
    assert set(adata.uns["pca"]) == set(uns_pca) and "model" not in adata.uns["pca"]
    np.testing.assert_array_equal(adata.uns["pca"]["variance_ratio"], uns_pca["variance_ratio"])
    with pytest.raises(ValueError, match=r"adata.uns\['pca'\] exists and is not a pathfactor result.*key="):
        pf.tl.pca(adata, n_factors=3, key_added="pca")
    with pytest.raises(ValueError, match=r"adata.uns\['pca'\].*key="):
        model.write(adata, key="pca")
    np.testing.assert_array_equal(adata.obsm["X_pca"], x_pca)


@pytest.mark.parametrize("foreign", ["uns", "obsm", "varm", "obs"])
def test_write_refuses_a_key_another_tool_wrote(foreign):
    adata = tiny()
    model = pf.models.PPCA(n_factors=2, progress=False).fit(adata)
    if foreign == "uns":
        adata.uns["mine"] = {"params": {"n_comps": 2}}
        what = r"adata.uns\['mine'\]"
    elif foreign == "obsm":
        adata.obsm["X_mine"] = np.zeros((N_CELLS, 2))
        what = r"adata.obsm\['X_mine'\]"
    elif foreign == "varm":
        adata.varm["mine_loadings"] = np.zeros((N_GENES, 2))
        what = r"adata.varm\['mine_loadings'\]"
    else:
        adata.obs[f"mine_{model.relevance().index[0]}"] = 1.0
        what = r"adata.obs already has the column"
    snapshot = adata.copy()
    with pytest.raises(ValueError, match=what + ".*another tool wrote it.*key="):
        model.write(adata, key="mine")
    assert list(adata.obs.columns) == list(snapshot.obs.columns) and set(adata.obsm) == set(snapshot.obsm)
    assert set(adata.uns) == set(snapshot.uns) and set(adata.varm) == set(snapshot.varm)
    if foreign != "obs":  # pf.tl refuses before fitting
        with pytest.raises(ValueError, match=what):
            pf.tl.ppca(adata, n_factors=2, key_added="mine", progress=False)
    model.write(adata, key="mine2")  # another key is fine


def test_overwriting_a_pathfactor_result_is_logged_and_leaves_nothing_stale(spexed, caplog, tmp_path):
    adata = spexed[0].copy()
    adata = roundtrip(adata, tmp_path)  # the previous result as read from an h5ad file
    old_columns = names(adata.uns["spex"]["obs_columns"])
    with caplog.at_level(logging.INFO, logger="pathfactor"):
        model = pf.tl.ppca(adata, n_factors=2, key_added="spex", progress=False)
    assert "overwriting the previous pathfactor result under key 'spex' (Spex)" in caplog.text
    assert adata.uns["spex"]["model"] == "PPCA" and adata.obsm["X_spex"].shape == (N_CELLS, 2)
    assert "spex_annotation" not in adata.varm and "spex_loadings_sd" not in adata.varm
    assert not set(old_columns) & set(adata.obs.columns)
    assert [c for c in adata.obs.columns if c.startswith("spex_")] == [f"spex_{f}" for f in
                                                                      model.relevance(active_only=True).index]


# ============================================================================ reading back, scanpy plots
def test_scores_anndata_works_with_scanpy(spexed):
    adata, model = spexed
    scores = pf.tl.scores(adata, "spex")
    assert list(scores.var.columns) == ["kind", "relevance", "active", "obs_column"]
    assert list(scores.obs.columns) == list(adata.obs.columns) and "X_umap" in scores.obsm
    scores.obs["group"] = "changed"  # a copy: the original is untouched
    assert (adata.obs["group"] != "changed").all()
    factor = model.relevance().index[-1]  # also a factor without an obs column
    axes = sc.pl.umap(scores, color=factor, show=False)
    assert axes is not None
    assert pf.tl.scores(adata).shape == scores.shape  # the only result: key=None finds it
    plt.close("all")


def test_top_components_for_sc_pl_embedding(spexed):
    adata, model = spexed
    components = pf.tl.top_components(adata, "spex")
    order = list(model.factor_scores_.columns)
    top = model.relevance(active_only=True).index[:2]
    assert components == ",".join(str(order.index(f) + 1) for f in top)
    ax = sc.pl.embedding(adata, basis="spex", components=components, show=False)
    assert ax is not None
    plt.close("all")


def test_pl_wrappers(spexed):
    adata, model = spexed
    top = model.relevance(active_only=True).index[0]
    ax = pf.pl.relevance(adata, key="spex")
    assert [t.get_text() for t in ax.get_yticklabels()][0] == top
    ax = pf.pl.top_loadings(adata, top, key="spex", top=5)
    assert ax.get_title() == f"Top genes of {top}"
    assert pf.pl.top_loadings(adata, f"spex_{top}").get_title() == f"Top genes of {top}"  # by obs column
    ax = pf.pl.factor_scores(adata, top, groupby="group")
    assert [t.get_text() for t in ax.get_xticklabels()] and ax.get_xlabel() == "group"
    fig = pf.pl.umap(adata, key="spex", n=2)
    assert isinstance(fig, matplotlib.figure.Figure)
    titles = [a.get_title().replace("\n", "") for a in fig.axes if a.get_visible() and a.get_title()]
    assert titles == list(model.relevance(active_only=True).index[:2])
    fig = pf.pl.umap(adata, factors=[top], groupby="group")
    assert len([a for a in fig.axes if a.get_visible() and a.get_title()]) == 2
    with pytest.raises(KeyError, match="not a factor"):
        pf.pl.factor_scores(adata, "NOPE")
    no_umap = adata.copy()
    del no_umap.obsm["X_umap"]
    with pytest.raises(KeyError, match=r"adata.obsm\['X_umap'\] is missing"):
        pf.pl.umap(no_umap)
    plt.close("all")


# ============================================================================ the command line
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("scverse")
    tiny().write_h5ad(d / "tiny.h5ad")
    GeneSets(SETS).write_gmt(d / "sets.gmt")
    return d


def test_one_line_of_scanpy_colours_a_umap_by_a_named_factor(files, tmp_path):
    """THE acceptance test: a fresh `pathfactor fit` output, read back, and one line of scanpy."""
    out = tmp_path / "out.h5ad"
    assert cli.main(["fit", str(files / "tiny.h5ad"), "--model", "spex", "--gene-sets", str(files / "sets.gmt"),
                     "--min-set-size", "5", "--max-epochs", "20", "--out", str(out), "--quiet"]) == 0
    adata = ad.read_h5ad(out)
    factor = names(adata.uns["spex"]["obs_factors"])[0]
    sc.pl.umap(adata, color=f"spex_{factor}", show=False)
    sc.pl.umap(adata, color=[f"spex_{f}" for f in SETS], show=False)  # every set is among the top 10
    plt.close("all")


def test_cli_fit_key_and_report_key(files, tmp_path):
    out, rep = tmp_path / "out.h5ad", tmp_path / "rep"
    assert cli.main(["fit", str(files / "tiny.h5ad"), "--model", "ppca", "--n-factors", "2", "--key", "myrun",
                     "--out", str(out), "--report", str(rep), "--quiet"]) == 0
    adata = ad.read_h5ad(out)
    assert "X_myrun" in adata.obsm and "myrun" in adata.uns and "X_ppca" not in adata.obsm
    assert "myrun_PPC1" in adata.obs.columns and (rep / "report.html").is_file()
    assert cli.main(["report", str(out), "--key", "myrun", "--out", str(tmp_path / "rep2"), "--quiet"]) == 0


def test_cli_fit_pca_next_to_scanpys_pca(files, tmp_path, capsys):
    adata = ad.read_h5ad(files / "tiny.h5ad")
    sc.pp.pca(adata, n_comps=3)
    src, out = tmp_path / "with_pca.h5ad", tmp_path / "out.h5ad"
    adata.write_h5ad(src)
    assert cli.main(["fit", str(src), "--model", "pca", "--n-factors", "2", "--out", str(out), "--quiet"]) == 0
    res = ad.read_h5ad(out)
    np.testing.assert_array_equal(res.obsm["X_pca"], adata.obsm["X_pca"])
    np.testing.assert_array_equal(res.varm["PCs"], adata.varm["PCs"])
    assert "model" not in res.uns["pca"] and res.uns["pf_pca"]["model"] == "PCA"
    capsys.readouterr()
    assert cli.main(["fit", str(src), "--model", "pca", "--n-factors", "2", "--key", "pca", "--out",
                     str(tmp_path / "bad.h5ad"), "--quiet"]) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("pathfactor: error: adata.uns['pca'] exists") and "--key" in err and "\n" not in err.strip()
    assert not (tmp_path / "bad.h5ad").exists()
