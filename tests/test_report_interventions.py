"""The report's Interventions section: heatmap of the effects on the factors, the reference, the strongest calls."""
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
from pathfactor.models import Spex  # noqa: E402
from pathfactor.report import sections, write_report  # noqa: E402

KEY = "spex"

pytestmark = pytest.mark.usefixtures("torch_one_thread")  # small fits: two threads stall on busy cores


def results(n_factors: int = 4, levels=("g1", "g2"), effects=None, lfsr=None, as_arrays: bool = False,
            n_cells: int = 30, n_genes: int = 20, seed: int = 0) -> ad.AnnData:
    """A hand-built results AnnData (no fit); with ``effects`` / ``lfsr`` (factors x levels arrays) the
    intervention entries Spex.write leaves, as DataFrames or, ``as_arrays``, as plain arrays."""
    rng = np.random.default_rng(seed)
    names = [f"F{k}" for k in range(n_factors)]
    adata = ad.AnnData(rng.normal(size=(n_cells, n_genes)),
                       obs=pd.DataFrame(index=[f"c{i}" for i in range(n_cells)]),
                       var=pd.DataFrame(index=[f"G{j}" for j in range(n_genes)]))
    adata.obsm[f"X_{KEY}"] = rng.normal(size=(n_cells, n_factors))
    adata.varm[f"{KEY}_loadings"] = rng.normal(size=(n_genes, n_factors))
    adata.uns[KEY] = {"model": "Spex", "factor_names": names, "factor_kinds": ["dense"] * n_factors,
                      "relevance": np.linspace(0.2, 0.01, n_factors), "active": np.ones(n_factors, bool)}
    if effects is not None:
        levels = list(levels)
        sd = np.full_like(effects, 0.1)

        def table(values):
            return np.asarray(values) if as_arrays else pd.DataFrame(values, index=names, columns=levels)

        adata.uns[KEY].update(intervention_effects=table(effects), intervention_effects_sd=table(sd),
                              intervention_effects_lfsr=table(lfsr), intervention_reference="NT",
                              intervention_levels=np.array(levels, dtype=object))
    return adata


def section(html: str) -> str:
    start = html.index('<h2 id="interventions">')
    return html[start:html.index("<h2", start + 1)]


def table_rows(text: str) -> list[list[str]]:
    rows = re.findall(r"<tr>(.*?)</tr>", text, flags=re.S)
    return [[re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", r, flags=re.S)]
            for r in rows if "<td" in r]


def test_section_of_a_fitted_model_after_an_h5ad_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    n, g = 240, 60
    target = rng.choice(["NT", "g1", "g2"], size=n, p=[0.5, 0.25, 0.25])
    X = rng.normal(size=(n, 3))
    X[target == "g1", 0] += 1.5
    mask = np.zeros((g, 3), bool)
    for k in range(3):
        mask[20 * k:20 * (k + 1), k] = True
    Y = X @ (mask * rng.normal(0.8, 0.2, size=mask.shape)).T + rng.normal(size=(n, g))
    adata = ad.AnnData(Y.astype(np.float32), obs=pd.DataFrame({"target": target}, index=[f"c{i}" for i in range(n)]))
    adata.var_names = [f"g{i}" for i in range(g)]
    sets = {f"P{k}": [f"g{i}" for i in range(20 * k, 20 * (k + 1))] for k in range(3)}
    model = Spex(n_sparse=0, min_set_size=5, max_epochs=50, progress=False)
    model.fit(adata, annotations=sets, interventions="target", reference="NT")
    model.write(adata)
    adata.write_h5ad(tmp_path / "fit.h5ad")
    back = ad.read_h5ad(tmp_path / "fit.h5ad")  # DataFrames stay DataFrames, lists become arrays
    assert isinstance(back.uns[KEY]["intervention_levels"], np.ndarray)
    before = set(plt.get_fignums())
    html = write_report(back, tmp_path / "report", key=KEY, color_by="target").read_text()
    assert set(plt.get_fignums()) == before
    assert '<a href="#interventions">Interventions</a>' in html
    assert html.index('id="interventions"') < html.index('id="methods"')
    text = section(html)
    assert "reference level <b>NT</b>" in text
    assert text.count("<img") == 1 and 'src="data:image/png;base64,' in text
    rows = table_rows(text)
    assert rows[0][:2] == ["P0", "g1"]  # the one real effect is the strongest call
    assert float(rows[0][2]) > 0.5 and float(rows[0][4]) < 0.05
    assert "against the reference <b>NT</b>" in html  # header
    assert "reference level NT" in html[html.index('id="methods"'):]


def test_no_section_without_interventions(figures, tmp_path):
    html = write_report(results(), tmp_path).read_text()
    assert 'id="interventions"' not in html and "#interventions" not in html
    assert all(name != "intervention_heatmap" for name, _, _ in figures)


@pytest.mark.parametrize("as_arrays", [False, True])
def test_heatmap_shows_called_factors_most_confident_first(figures, tmp_path, as_arrays):
    effects = np.array([[0.1, 0.0], [0.0, -0.9], [0.8, 0.0], [0.02, 0.01]])
    lfsr = np.array([[0.3, 0.5], [0.4, 1e-6], [0.01, 0.5], [0.2, 0.6]])
    html = write_report(results(effects=effects, lfsr=lfsr, as_arrays=as_arrays), tmp_path).read_text()
    [(_, args, kwargs)] = [c for c in figures if c[0] == "intervention_heatmap"]
    shown, shown_lfsr = args
    assert shown.index.tolist() == ["F1", "F2"] and shown.columns.tolist() == ["g1", "g2"]
    assert shown_lfsr.loc["F1", "g2"] == pytest.approx(1e-6)
    assert kwargs["reference"] == "NT" and kwargs["threshold"] == sections.LFSR_CALL
    rows = table_rows(section(html))
    assert [r[:2] for r in rows] == [["F1", "g2"], ["F2", "g1"]]
    assert rows[0][2] == "-0.90" and rows[1][2] == "+0.80"
    assert '<a href="#factor-F1">F1</a>' in section(html)  # factors with a section are linked


def test_calls_list_the_factors_leading_genes_and_which_way_the_effect_moves_them(figures, tmp_path):
    effects = np.array([[0.0, 0.0], [0.0, -0.9], [0.8, 0.0], [0.0, 0.0]])
    lfsr = np.array([[0.9, 0.9], [0.4, 1e-6], [0.01, 0.9], [0.9, 0.9]])
    adata = results(effects=effects, lfsr=lfsr)
    W = np.zeros((adata.n_vars, 4))
    W[[3, 7, 5, 9], 1] = [2.0, -1.8, 1.5, 0.1]   # F1: G3 and G5 load up, G7 down; G9 is the 4th, not shown
    W[[0, 1], 2] = [-1.0, 0.5]                   # F2: two genes only (a zero loading is no leading gene)
    adata.varm[f"{KEY}_loadings"] = W
    html = write_report(adata, tmp_path).read_text()
    rows = table_rows(section(html))
    assert rows[0][:2] == ["F1", "g2"] and rows[0][5] == "G3 ↓, G7 ↑, G5 ↓"  # an effect of -0.9 lowers G3 and G5
    assert rows[1][:2] == ["F2", "g1"] and rows[1][5] == "G0 ↓, G1 ↑ one gene: G0"  # 1 / 1.25 of F2's loadings
    overview = html[html.index('id="overview"'):html.index("</table>", html.index('id="overview"'))]
    assert overview.count('class="one-gene"') == 1 and "one gene: G0" in overview
    loadings = pd.DataFrame(W, index=adata.var_names, columns=[f"F{k}" for k in range(4)])
    assert sections._leading_genes(loadings, "F1", 0.0) == "G3, G7, G5"  # an effect shrunk to 0 moves no gene
    assert sections._leading_genes(loadings, "F1", np.nan) == "G3, G7, G5"
    assert sections._leading_genes(loadings, "F3", 1.0) == ""  # a factor without loadings


def test_no_calls_and_many_levels(figures, tmp_path):
    rng = np.random.default_rng(1)
    levels = [f"L{i}" for i in range(60)]
    effects = rng.normal(0, 0.01, (12, 60))
    html = write_report(results(n_factors=12, levels=levels, effects=effects, lfsr=np.full((12, 60), 0.4)),
                        tmp_path).read_text()
    [(_, (shown, _), _)] = [c for c in figures if c[0] == "intervention_heatmap"]
    assert shown.shape == (10, sections.MAX_EFFECT_LEVELS)
    text = section(html)
    assert "no intervention moves any factor" in text and "none is a call" in text
    assert len(table_rows(text)) == 10


def test_factor_cap(figures, tmp_path):
    n = 45
    lfsr = np.full((n, 2), 0.5)
    lfsr[:, 0] = np.geomspace(1e-9, 1e-2, n)[::-1]  # every factor called, the last the most confident
    effects = np.where(lfsr < 0.05, 1.0, 0.0)
    write_report(results(n_factors=n, effects=effects, lfsr=lfsr), tmp_path)
    [(_, (shown, _), _)] = [c for c in figures if c[0] == "intervention_heatmap"]
    assert len(shown) == sections.MAX_EFFECT_FACTORS
    assert shown.index[0] == f"F{n - 1}" and shown.index[-1] == f"F{n - sections.MAX_EFFECT_FACTORS}"


def test_plot_marks_calls_and_centres_the_colours():
    effects = pd.DataFrame([[1.2, -0.1], [-0.4, 0.0]], index=["A", "B"], columns=["g1", "g2"])
    lfsr = pd.DataFrame([[0.001, 0.6], [0.02, 0.9]], index=["A", "B"], columns=["g1", "g2"])
    ax = plot.intervention_heatmap(effects, lfsr, reference="NT")
    try:
        low, high = ax.images[0].get_clim()
        assert low == pytest.approx(-high) and high == pytest.approx(1.2)
        marked = np.concatenate([c.get_offsets() for c in ax.collections])
        assert sorted(map(tuple, marked.tolist())) == [(0.0, 0.0), (0.0, 1.0)]  # (level, factor) of the calls
        assert "NT" in ax.get_xlabel()
    finally:
        plt.close(ax.figure)
