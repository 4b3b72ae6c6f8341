"""The HTML report of a multi-view (MuData) Spex result: loadings per view, the "Factors x views" heatmap."""
from __future__ import annotations

import base64
import re
import warnings

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

import pathfactor as pf  # noqa: E402
from pathfactor import plot  # noqa: E402
from pathfactor.cli import main  # noqa: E402
from pathfactor.report import results as report_results  # noqa: E402
from pathfactor.report import write_report  # noqa: E402

md = pytest.importorskip("mudata")

pytestmark = [pytest.mark.usefixtures("torch_one_thread"),
              pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore:Spex did not converge")]

N, G_RNA, G_BIN = 120, 30, 12


@pytest.fixture(scope="module")
def fitted(tiny_mudata):
    mdata = tiny_mudata()
    model = pf.models.Spex(n_sparse=3, likelihood={"rna": "normal", "acc": "bernoulli"}, max_epochs=40,
                           progress=False).fit(mdata, allow_missing=True)
    model.write(mdata)
    return mdata


def _images(text: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([^"]+)"', text)]


def test_load_reads_the_views(fitted):
    res = report_results.load(fitted, "spex")
    names = list(fitted.uns["spex"]["factor_names"])
    assert res.views is not None and res.views.names == ["rna", "acc"]
    assert res.views.likelihoods == {"rna": "normal", "acc": "bernoulli"}
    assert res.scores.shape == (N, len(names))
    assert res.views.loadings["rna"].shape == (G_RNA, len(names))
    assert res.views.loadings["acc"].shape == (G_BIN, len(names))
    assert res.loadings.shape == (G_RNA + G_BIN, len(names)) and "acc:p0" in res.loadings.index
    assert res.views.relevance.shape == (len(names), 2)
    assert res.is_r2
    active = report_results.view_active(res)
    assert active.shape == res.loadings.shape


def test_report_has_factors_x_views(fitted, tmp_path):
    path = write_report(fitted, tmp_path, color_by="group")
    text = path.read_text(encoding="utf-8")
    assert 'id="views"' in text and "Factors × views" in text
    section = text[text.index('id="views"'):]
    section = section[:section.index("<h2", 5)]
    assert "data:image/png;base64," in section and "MOFA" in section
    images = _images(text)
    assert images and all(b.startswith(b"\x89PNG") for b in images)
    for view in ("rna", "acc"):
        assert f"{view} (" in text  # in the header: each view's features
        assert f"<th>{view}</th>" in text  # a factor's active features per view
    assert "bernoulli" in text
    assert "left out for several views" in text  # the per-group heatmap's one-line note
    assert 'id="factors"' in text and 'id="methods"' in text


def test_missing_view_loadings_is_named(fitted, tmp_path):
    mdata = fitted.copy()
    del mdata["acc"].varm["spex_loadings"]
    with pytest.raises(ValueError, match=r"mdata\['acc'\]\.varm\['spex_loadings'\]"):
        write_report(mdata, tmp_path)


def test_views_heatmap_rows_and_labels():
    rel = pd.DataFrame(np.random.default_rng(1).uniform(0, 0.3, (25, 3)), index=[f"F{i}" for i in range(25)],
                       columns=["a", "b", "c"])
    ax = plot.views_heatmap(rel, top=20)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]
    rows = [t.get_text() for t in ax.get_yticklabels()]
    assert len(rows) == 20 and rows[0] == rel.max(axis=1).idxmax()
    assert len(ax.texts) == 20 * 3
    matplotlib.pyplot.close(ax.figure)


def test_cli_report_of_h5mu(fitted, tmp_path, capsys):
    path = tmp_path / "fitted.h5mu"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fitted.write(path)
    assert main(["report", str(path), "--out", str(tmp_path / "rep"), "--quiet"]) == 0
    text = (tmp_path / "rep" / "report.html").read_text(encoding="utf-8")
    assert "Factors × views" in text and "rna" in text and "acc" in text
