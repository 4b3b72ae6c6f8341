"""The HTML report and the plot functions on a hand-built results AnnData."""
from __future__ import annotations

import re

import anndata as ad
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from pathfactor import plot  # noqa: E402
from pathfactor.report import write_report  # noqa: E402

KEY = "spex"
NAMES = ["HALLMARK_G2M_CHECKPOINT", "HALLMARK_HYPOXIA", "HALLMARK_APOPTOSIS", "dense_0"]
GAINED = "GENE_39"  # strong in HALLMARK_G2M_CHECKPOINT but not annotated
LOST = "GENE_07"  # annotated in HALLMARK_G2M_CHECKPOINT but near-zero loading


def make_results(n_cells: int = 60, n_genes: int = 40, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    genes = [f"GENE_{i:02d}" for i in range(n_genes)]
    annotation = np.zeros((n_genes, 4), dtype=bool)
    for k in range(3):
        annotation[8 * k:8 * k + 8, k] = True
    W = rng.normal(0, 0.01, (n_genes, 4))
    W[annotation] = rng.uniform(0.6, 1.0, annotation.sum())
    W[7, 0] = 0.001
    W[39, 0] = 0.9
    W[30:35, 3] = rng.normal(0, 1, 5)
    groups = np.repeat(["T cell", "B cell", "monocyte"], n_cells // 3)
    Z = rng.normal(size=(n_cells, 4))
    Z[groups == "B cell", 0] += 3
    adata = ad.AnnData(X=Z @ W.T + rng.normal(0, 0.1, (n_cells, n_genes)),
                       obs=pd.DataFrame({"group": pd.Categorical(groups), "depth": rng.uniform(1, 5, n_cells)},
                                        index=[f"cell{i}" for i in range(n_cells)]),
                       var=pd.DataFrame(index=genes))
    adata.obsm[f"X_{KEY}"] = Z
    adata.varm[f"{KEY}_loadings"] = W
    adata.varm[f"{KEY}_loadings_sd"] = np.full_like(W, 0.05)
    adata.varm[f"{KEY}_annotation"] = annotation
    adata.varm[f"{KEY}_covariate_effects"] = rng.normal(0, 0.3, (n_genes, 2))
    adata.uns[KEY] = {"model": "spex", "factor_names": NAMES, "factor_kinds": ["annotated"] * 3 + ["dense"],
                      "relevance": [0.30, 0.20, 0.01, 0.10], "active": [True, True, False, True],
                      "covariate_names": ["batch", "log_depth"], "params": {"n_iter": 100, "note": "<b>x</b>"}}
    return adata


@pytest.fixture
def adata():
    return make_results()


def _check_links(html_path):
    html = html_path.read_text()
    srcs = re.findall(r'src="([^"]+)"', html)
    assert srcs, "report links no figures"
    for src in srcs:
        assert not src.startswith("/"), src
        assert (html_path.parent / src).is_file(), src
    return html, srcs


def _section(html: str, name: str) -> str:
    start = html.index(f"{name} <span")
    end = html.find("<h2>", start)
    return html[start:end]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """One report rendered for the module (figures are the slow part): (html path, out dir, leaked figures)."""
    out = tmp_path_factory.mktemp("report") / "out"
    before = set(plt.get_fignums())
    path = write_report(make_results(), out, key=KEY, color_by="group", title="Report <script>")
    return path, out, set(plt.get_fignums()) - before


def test_report_writes_html_and_linked_figures(rendered):
    path, out, leaked = rendered
    assert path == out / "report.html"
    html, srcs = _check_links(path)
    # relevance + 3 active factors x (loadings, scores) + scatter
    assert len(srcs) == 1 + 3 * 2 + 1
    assert all((out / src).stat().st_size > 1000 for src in srcs)
    for name in ["HALLMARK_G2M_CHECKPOINT", "HALLMARK_HYPOXIA", "dense_0"]:
        assert f"{name} <span" in html
    assert "HALLMARK_APOPTOSIS <span" not in html  # inactive: no section
    assert "<script>" not in html and "Report &lt;script&gt;" in html
    assert "&lt;b&gt;x&lt;/b&gt;" in html  # params escaped too
    assert "60 cells × 40 genes" in html
    assert "Covariate effects" in html and "log_depth" in html
    assert "0.1 ×" in html  # the gained/lost rule is explained
    assert not leaked, "report leaked figures"


def test_gained_and_lost_genes_listed_for_their_factor(rendered):
    html = rendered[0].read_text()
    g2m = _section(html, "HALLMARK_G2M_CHECKPOINT")
    gained = re.search(r'<td class="gained">(.*?)</td>', g2m).group(1)
    lost = re.search(r"<th>lost[^<]*</th><td>(.*?)</td>", g2m).group(1)
    assert gained.split(", ") == [GAINED]
    assert LOST in lost
    hypoxia = _section(html, "HALLMARK_HYPOXIA")
    assert GAINED not in hypoxia
    dense = _section(html, "dense_0")
    assert "Unannotated factor; its 5 active genes" in dense and "GENE_30" in dense and "GENE_00" not in dense


def test_top_factors_limits_sections(adata, tmp_path):
    html = write_report(adata, tmp_path, key=KEY, top_factors=1).read_text()
    assert html.count("<span class=\"kind\"") == 1 and "HALLMARK_G2M_CHECKPOINT <span" in html


def test_bad_color_by_lists_columns(adata, tmp_path):
    with pytest.raises(ValueError, match=r"celltype.*group.*depth"):
        write_report(adata, tmp_path, key=KEY, color_by="celltype")


@pytest.mark.parametrize("drop", ["uns", "obsm", "varm", "relevance"])
def test_missing_results_raise(adata, tmp_path, drop):
    if drop == "uns":
        del adata.uns[KEY]
    elif drop == "obsm":
        del adata.obsm[f"X_{KEY}"]
    elif drop == "varm":
        del adata.varm[f"{KEY}_loadings"]
    else:
        del adata.uns[KEY]["relevance"]
    with pytest.raises(ValueError, match=r"missing.*write\(adata\)"):
        write_report(adata, tmp_path, key=KEY)
    with pytest.raises(ValueError, match="'other'"):
        write_report(adata, tmp_path, key="other")


def test_works_after_h5ad_round_trip(adata, tmp_path):
    adata.write_h5ad(tmp_path / "fit.h5ad")
    back = ad.read_h5ad(tmp_path / "fit.h5ad")
    assert not isinstance(back.uns[KEY]["factor_names"], list)  # arrays after the round trip
    path = write_report(back, tmp_path / "rt", key=KEY, color_by="depth", top_factors=2)
    html, _ = _check_links(path)
    assert "HALLMARK_G2M_CHECKPOINT <span" in html and GAINED in html


def test_plot_functions_return_axes(adata):
    W = pd.DataFrame(adata.varm[f"{KEY}_loadings"], index=adata.var_names, columns=NAMES)
    ann = pd.DataFrame(adata.varm[f"{KEY}_annotation"], index=adata.var_names, columns=NAMES)
    Z = pd.DataFrame(adata.obsm[f"X_{KEY}"], index=adata.obs_names, columns=NAMES)
    rel = pd.Series(adata.uns[KEY]["relevance"], index=NAMES)
    kinds = pd.Series(adata.uns[KEY]["factor_kinds"], index=NAMES)
    before = set(plt.get_fignums())
    axes = [plot.relevance(rel, kinds), plot.relevance(rel, top=2),
            plot.top_loadings(W[NAMES[0]], ann[NAMES[0]]), plot.top_loadings(W["dense_0"], top=5),
            plot.factor_scores(Z[NAMES[0]], adata.obs["group"]), plot.factor_scores(Z[NAMES[0]]),
            plot.scores_scatter(Z[NAMES[0]], Z[NAMES[1]], adata.obs["group"]),
            plot.scores_scatter(Z[NAMES[0]], Z[NAMES[1]], adata.obs["depth"]),
            plot.scores_scatter(Z[NAMES[0]], Z[NAMES[1]])]
    for ax in axes:
        assert isinstance(ax, matplotlib.axes.Axes)
    # the relevance bars: most relevant on top, only `top` of them
    assert [t.get_text() for t in axes[1].get_yticklabels()] == NAMES[:2]
    # the gained gene is among the top loadings and the strongest lost gene is appended
    labels = [t.get_text() for t in axes[2].get_yticklabels()]
    assert GAINED in labels and LOST in labels
    legend = [t.get_text() for t in axes[2].get_legend().get_texts()]
    assert any(t.startswith("gained") for t in legend) and any(t.startswith("lost") for t in legend)
    # violins sorted by median: the B cells (shifted up) come first
    assert axes[4].get_xticklabels()[0].get_text() == "B cell"
    ordered_groups = pd.Series(pd.Categorical(adata.obs["group"], categories=["T cell", "monocyte", "B cell"],
                                              ordered=True))
    ordered = plot.factor_scores(Z[NAMES[0]], ordered_groups)
    assert [t.get_text() for t in ordered.get_xticklabels()] == ["T cell", "monocyte", "B cell"]
    fig, ax = plt.subplots()
    assert plot.factor_scores(Z[NAMES[0]], adata.obs["group"], ax=ax) is ax
    for num in set(plt.get_fignums()) - before:
        plt.close(num)
