"""The HTML report and the plot functions on a hand-built results AnnData."""
from __future__ import annotations

import base64
import re

import anndata as ad
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from pathfactor import GeneSets, plot  # noqa: E402
from pathfactor.data import simulate  # noqa: E402
from pathfactor.report import html as report_html  # noqa: E402
from pathfactor.report import results as report_results  # noqa: E402
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


def _check_self_contained(html_path):
    """The report is one file: every image is an embedded PNG, nothing is linked from disk."""
    html = html_path.read_text()
    srcs = re.findall(r'src="([^"]*)"', html)
    assert srcs, "report shows no figures"
    for src in srcs:
        assert src.startswith("data:image/png;base64,"), src[:80]
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in html_path.parent.iterdir()) == ["report.html"]
    return html, srcs


def _section(html: str, name: str) -> str:
    """A factor's section (open or collapsed), from its anchor to the next section."""
    start = html.index(f'id="factor-{name}"')
    ends = [i for i in (html.find("<h3", start), html.find("<details", start + 1), html.find("<h2", start)) if i > 0]
    return html[start:min(ends)]


def _overview_rows(html: str) -> list[list[str]]:
    table = html[html.index('<table class="overview">'):]
    body = table[table.index("<tbody>"):table.index("</tbody>")]
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", body, flags=re.S)
    return [[re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", r, flags=re.S)]
            for r in rows]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """One report rendered for the module (figures are the slow part): (html path, out dir, leaked figures)."""
    out = tmp_path_factory.mktemp("report") / "out"
    before = set(plt.get_fignums())
    path = write_report(make_results(), out, key=KEY, color_by="group", title="Report <script>")
    return path, out, set(plt.get_fignums()) - before


def simulated_results(n_factors: int = 12, seed: int = 0) -> ad.AnnData:
    """Results of a pretend fit on tiny simulated data: the true loadings and scores under pathfactor's keys,
    MSigDB-style names, every factor active, relevance decreasing from 20 % to 0.001 %."""
    sim = simulate.noisy_annotations(n_cells=40, n_genes=60, n_factors=n_factors, n_dense=1, seed=seed)
    sets = simulate.annotation_sets(sim)
    names = [f"HALLMARK_{t.upper()}" for t in sets] + ["dense_0"]
    mask = np.column_stack([sim.var_names.isin(genes) for genes in sets.values()] + [np.zeros(sim.n_vars, bool)])
    sim.obs["group"] = pd.Categorical(np.resize(["c", "a", "b"], sim.n_obs), categories=["c", "a", "b"])
    sim.obsm[f"X_{KEY}"] = sim.obsm["X_true"]
    sim.varm[f"{KEY}_loadings"] = sim.varm["W_true"]
    sim.varm[f"{KEY}_annotation"] = mask
    sim.uns[KEY] = {"model": "Spex", "factor_names": names, "factor_kinds": ["annotated"] * n_factors + ["dense"],
                    "relevance": np.geomspace(0.2, 1e-5, n_factors + 1), "active": np.ones(n_factors + 1, bool),
                    "params": {"n_dense": 1}}
    return sim


def test_report_is_one_self_contained_file(rendered):
    path, out, leaked = rendered
    assert path == out / "report.html"
    html, srcs = _check_self_contained(path)
    # 3 active factors x (loadings, scores) + heatmap + scatter; no UMAP (no X_umap)
    assert len(srcs) == 3 * 2 + 1 + 1
    assert all(len(src) > 2000 for src in srcs)
    for name in ["HALLMARK_G2M_CHECKPOINT", "HALLMARK_HYPOXIA", "dense_0"]:
        assert f'id="factor-{name}"' in html
    assert 'id="factor-HALLMARK_APOPTOSIS"' not in html  # inactive: no section
    assert "<script>" not in html and "Report &lt;script&gt;" in html
    assert "note=&#x27;&lt;b&gt;x&lt;/b&gt;&#x27;" in html  # params escaped too
    assert "60 cells × 40 genes" in html
    assert "Covariate effects" in html and "log_depth" in html
    assert "0.1 ×" in html  # the gained/lost rule is explained
    assert 'id="umap"' not in html and 'id="heatmap"' in html
    assert not leaked, "report leaked figures"


def test_overview_table_lists_every_factor_by_relevance(rendered):
    rows = _overview_rows(rendered[0].read_text())
    #  #, factor, kind, gene set, relevance, active genes, gained, lost, active
    # dense_0 has 5 random loadings, one of them most of its squared loadings: a one-gene factor, tagged
    assert [r[1].rstrip(" ↗") for r in rows] == [NAMES[0], NAMES[1], "dense_0 one gene: GENE_33", NAMES[2]]
    g2m, _, dense, apoptosis = rows
    assert g2m[2:] == ["annotated", "8", "30 %", "8", "1", "1", "yes"]
    assert dense[3] == "—" and dense[4] == "10 %" and dense[6:8] == ["—", "—"]
    assert apoptosis[4] == "1 %" and apoptosis[-1] == "no"


def test_gained_and_lost_genes_listed_for_their_factor(rendered):
    html = rendered[0].read_text()
    g2m = _section(html, "HALLMARK_G2M_CHECKPOINT")
    gained = re.search(r'<td class="gained">(.*?)</td>', g2m).group(1)
    lost = re.search(r"<th>lost[^<]*</th><td>(.*?)</td>", g2m).group(1)
    assert [g.split(" (")[0] for g in gained.split(", ")] == [GAINED]
    assert LOST in lost
    if "posterior probability that the gene is active" in g2m:  # the fixture's model has posterior sds
        assert re.fullmatch(r"\S+ \((0|1)\.\d\d\)", gained)
    assert "8 genes in the data · 8 active genes · 1 gained, 1 lost" in g2m
    hypoxia = _section(html, "HALLMARK_HYPOXIA")
    assert GAINED not in hypoxia
    dense = _section(html, "dense_0")
    assert "Unannotated factor; its 5 active genes" in dense and "GENE_30" in dense and "GENE_00" not in dense


def test_factors_beyond_ten_are_collapsed(figures, tmp_path):
    adata = simulated_results(n_factors=12)
    html = write_report(adata, tmp_path, key=KEY, color_by="group").read_text()
    names = list(adata.uns[KEY]["factor_names"])  # already by relevance
    assert len(_overview_rows(html)) == 13
    for rank, name in enumerate(names):
        if rank < 10:
            assert f'<h3 id="factor-{name}">' in html
        else:
            assert f'<details class="factor" id="factor-{name}">' in html
    assert html.count('<details class="factor"') == 3
    assert [c[0] for c in figures].count("top_loadings") == 13  # every active factor has its figures
    html = write_report(adata, tmp_path, key=KEY, open_factors=2).read_text()
    assert html.count('<details class="factor"') == 11


def test_top_factors_limits_sections(adata, figures, tmp_path):
    html = write_report(adata, tmp_path, key=KEY, top_factors=1).read_text()
    assert html.count('id="factor-') == 1 and 'id="factor-HALLMARK_G2M_CHECKPOINT"' in html
    assert len(_overview_rows(html)) == 4  # the overview still lists every factor


def test_umap_section_iff_umap_exists(adata, figures, tmp_path):
    html = write_report(adata, tmp_path, key=KEY, color_by="group").read_text()
    assert 'id="umap"' not in html and "embedding_panels" not in [c[0] for c in figures]
    adata.obsm["X_umap"] = np.random.default_rng(0).normal(size=(adata.n_obs, 2))
    html = write_report(adata, tmp_path, key=KEY, color_by="group").read_text()
    assert 'id="umap"' in html and 'href="#umap"' in html
    (name, args, kwargs), = [c for c in figures if c[0] == "embedding_panels"]
    assert list(args[1].columns) == [NAMES[0], NAMES[1], "dense_0"]  # the active factors, most relevant first


def test_one_group_order_in_every_figure(figures, tmp_path):
    adata = simulated_results(n_factors=3)
    adata.obsm["X_umap"] = adata.obsm["X_true"][:, :2]
    write_report(adata, tmp_path, key=KEY, color_by="group")
    orders = {(c[0], tuple(c[2]["order"])) for c in figures if "order" in c[2]}
    assert {name for name, _ in orders} == {"factor_scores", "group_heatmap", "embedding_panels", "scores_scatter"}
    assert {order for _, order in orders} == {("c", "a", "b")}  # the categories' order, not sorted


def test_group_order_helper():
    assert plot.group_order(pd.Categorical(["x", "z", "x"], categories=["z", "y", "x"])) == ["z", "x"]
    assert plot.group_order(pd.Series(["b", "a", None, "b"])) == ["a", "b"]
    assert plot.group_order(pd.Series([10, 2, 2])) == [2, 10]  # numbers numerically
    assert list(plot.group_colors(["z", "x"])) == ["z", "x"]


def test_figures_follow_the_given_group_order(adata):
    order = ["T cell", "monocyte", "B cell"]
    groups = adata.obs["group"]
    Z = pd.DataFrame(adata.obsm[f"X_{KEY}"], index=adata.obs_names, columns=NAMES)
    expr = pd.DataFrame(adata.X[:, :6], index=adata.obs_names, columns=adata.var_names[:6])
    before = set(plt.get_fignums())
    violins = plot.factor_scores(Z[NAMES[0]], groups, order=order)
    heat = plot.group_heatmap(expr, groups, order=order, blocks=pd.Series(["f1"] * 3 + ["f2"] * 3, expr.columns))
    scatter = plot.scores_scatter(Z[NAMES[0]], Z[NAMES[1]], groups, order=order)
    fig = plot.embedding_panels(Z.iloc[:, :2].to_numpy(), Z[NAMES[:2]], groups, order=order)
    assert [t.get_text() for t in violins.get_xticklabels()] == order
    assert [t.get_text() for t in heat.get_xticklabels()] == order
    assert [t.get_text() for t in scatter.get_legend().get_texts()] == order
    assert [t.get_text() for t in fig.legends[0].get_texts()] == order
    for num in set(plt.get_fignums()) - before:
        plt.close(num)


def test_relevance_formatting(rendered):
    assert report_html.significant(0.0014) == "0.0014"
    assert report_html.significant(1.4e-05) == "1.4e-05"
    assert report_html.significant(99.6) == "100" and report_html.significant(1234.5) == "1,234"
    assert report_html.relevance_text(0.0014, True) == "0.14 %"
    assert report_html.relevance_text(1e-5, True) == "0.001 %"
    assert report_html.relevance_text(2e-9, True) == "2.0e-07 %"
    assert report_html.relevance_text(0.30, True) == "30 %"
    assert report_html.relevance_text(0.0123, False) == "0.0123"
    html = rendered[0].read_text()
    assert "0.0 %" not in html and "0.0%" not in html


def test_methods_paragraph(adata, figures, tmp_path):
    html = write_report(adata, tmp_path, key=KEY).read_text()
    methods = html[html.index('id="methods"'):]
    assert "version not recorded" in methods and "seed: not recorded" in methods
    assert "convergence not recorded" in methods
    assert "<code>n_iter=100</code>" in methods and "60 cells × 40 genes" in methods and "R²" in methods
    adata.uns[KEY].update(version="0.9.1", seed=7, converged=True, n_epochs=42)
    adata.write_h5ad(tmp_path / "fit.h5ad")  # the values come back as numpy scalars
    methods = write_report(ad.read_h5ad(tmp_path / "fit.h5ad"), tmp_path, key=KEY).read_text()
    assert "pathfactor 0.9.1" in methods and "seed: 7." in methods and "converged after 42 epochs" in methods
    adata.uns[KEY]["converged"] = False
    assert "did not converge within 42 epochs" in write_report(adata, tmp_path, key=KEY).read_text()
    adata.uns[KEY]["genes_left_out"] = np.array(adata.var_names[:15])  # as a fit on var["highly_variable"] leaves
    html = write_report(adata, tmp_path, key=KEY).read_text()
    assert html.count("60 cells × 25 genes fitted (those marked highly_variable of 40") == 2  # header, methods


def test_gene_set_links(adata, figures, tmp_path):
    card = "https://www.gsea-msigdb.org/gsea/msigdb/cards/"
    html = write_report(adata, tmp_path, key=KEY).read_text()
    assert f'href="{card}HALLMARK_G2M_CHECKPOINT"' in html and f'href="{card}HALLMARK_APOPTOSIS"' in html
    assert "cards/dense_0" not in html
    adata.uns[KEY]["gene_set_urls"] = {"HALLMARK_HYPOXIA": "http://example.org/hypoxia"}
    urls = {"HALLMARK_G2M_CHECKPOINT": "https://example.org/g2m?a=1&b=2", "HALLMARK_APOPTOSIS": "javascript:alert(1)"}
    html = write_report(adata, tmp_path, key=KEY, gene_set_urls=urls).read_text()
    assert 'href="https://example.org/g2m?a=1&amp;b=2"' in html and 'href="http://example.org/hypoxia"' in html
    assert "javascript" not in html and f'href="{card}HALLMARK_APOPTOSIS"' in html  # unsafe URL: the card instead
    sets = GeneSets({"dense_0": ["GENE_30"], "HALLMARK_HYPOXIA": ["GENE_08"]},
                    descriptions={"dense_0": "https://example.org/dense", "HALLMARK_HYPOXIA": "not a URL"})
    html = write_report(adata, tmp_path, key=KEY, gene_set_urls=sets).read_text()  # a GMT's descriptions
    assert 'href="https://example.org/dense"' in html and 'href="http://example.org/hypoxia"' not in html
    assert f'href="{card}HALLMARK_HYPOXIA"' in html
    assert report_html.gene_set_url("REACTOME_CELL_CYCLE", {}) == f"{card}REACTOME_CELL_CYCLE"
    assert report_html.gene_set_url("my_set", {}) is None


def test_counts_are_log_normalised_for_the_heatmap(adata):
    adata.X = np.random.default_rng(0).poisson(3, adata.shape).astype(np.float32)
    values, how = report_results.expression(adata, adata.var_names[:3])
    assert "log1p" in how and values.shape == (adata.n_obs, 3) and values.to_numpy().max() < 20
    adata.X = np.abs(adata.X) + 0.5
    assert report_results.expression(adata, adata.var_names[:3])[1] == "adata.X as stored"


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
    html, _ = _check_self_contained(path)
    assert 'id="factor-HALLMARK_G2M_CHECKPOINT"' in html and GAINED in html
    assert "depth (quintile)" in html  # many-valued numbers are grouped in quintiles


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


def test_far_outliers_do_not_squash_the_violins(adata):
    scores = pd.Series(np.r_[np.linspace(-1, 1, adata.n_obs - 1), 80.0], name="f")
    before = set(plt.get_fignums())
    ax = plot.factor_scores(scores, adata.obs["group"])
    assert ax.get_ylim()[1] < 10
    assert any("1 cell off scale" in t.get_text() for t in ax.texts)
    for num in set(plt.get_fignums()) - before:
        plt.close(num)
