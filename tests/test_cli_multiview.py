"""`pathfactor fit INPUT.h5mu --model spex`: several views (MuData) in, OUT.h5mu out; per-view --gene-sets and
--likelihood (VIEW:...), --allow-missing, and the one-line errors around them."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from pathfactor.cli import main
from pathfactor.data.genesets import GeneSets

md = pytest.importorskip("mudata")

pytestmark = [pytest.mark.usefixtures("torch_one_thread"),
              pytest.mark.filterwarnings("ignore::FutureWarning"),  # mudata's note on .update() pulling columns
              pytest.mark.filterwarnings("ignore:Spex did not converge")]

N, G_RNA, G_BIN = 120, 30, 12
FAST = ["--max-epochs", "25", "--n-sparse", "2", "--min-set-size", "3", "--quiet"]


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_mudata):
    """A tiny MuData: a Gaussian view 'rna' (with NaN entries) and a 0/1 view 'acc'; the same views without NaN;
    and a GMT of 'rna' genes."""
    d = tmp_path_factory.mktemp("mv")
    paths = {}
    for name, missing in (("missing", True), ("complete", False)):
        path = d / f"{name}.h5mu"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tiny_mudata(missing=missing).write(path)
        paths[name] = path
    gmt = d / "rna.gmt"
    GeneSets({"SET_A": [f"g{j}" for j in range(0, 12)], "SET_B": [f"g{j}" for j in range(10, 24)]}).write_gmt(gmt)
    paths["gmt"] = gmt
    return paths


def test_fit_h5mu_writes_h5mu_and_prints_view_relevance(files, tmp_path, capsys):
    out = tmp_path / "res" / "out.h5mu"
    rc = main(["fit", str(files["missing"]), "--model", "spex", "--gene-sets", f"rna:{files['gmt']}",
               "--likelihood", "rna:normal", "--likelihood", "acc:bernoulli", "--allow-missing", *FAST,
               "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    res = md.read_h5mu(out)
    names = list(res.uns["spex"]["factor_names"])
    assert "SET_A" in names and "SET_B" in names
    assert res.obsm["X_spex"].shape == (N, len(names))
    assert np.isfinite(res.obsm["X_spex"]).all()
    assert res["rna"].varm["spex_loadings"].shape == (G_RNA, len(names))
    assert res["acc"].varm["spex_loadings"].shape == (G_BIN, len(names))
    assert list(res.uns["spex"]["likelihoods"]) == ["normal", "bernoulli"]
    assert np.asarray(res.uns["spex"]["relevance_views"]).shape == (len(names), 2)
    assert "relevance per view" in printed and "acc: bernoulli" in printed
    assert "views rna (30 features), acc (12 features)" in printed


def test_plain_likelihood_applies_to_the_views_not_named(files, tmp_path):
    out = tmp_path / "out.h5mu"
    assert main(["fit", str(files["complete"]), "--likelihood", "normal", "--likelihood", "acc:bernoulli",
                 "--gene-sets", f"rna:{files['gmt']}", *FAST, "--out", str(out)]) == 0
    assert list(md.read_h5mu(out).uns["spex"]["likelihoods"]) == ["normal", "bernoulli"]


def test_nan_without_allow_missing_names_the_flag(files, tmp_path, capsys, one_line_error):
    rc = main(["fit", str(files["missing"]), "--likelihood", "acc:bernoulli", "--gene-sets", f"rna:{files['gmt']}",
               *FAST,
               "--out", str(tmp_path / "out.h5mu")])
    assert rc == 2
    err = one_line_error("--allow-missing", "rna")
    assert "allow_missing=True" not in err


@pytest.mark.parametrize("argv, words", [
    (["--likelihood", "nope:nb"], ["--likelihood", "nope"]),
    (["--likelihood", "rna:zinb"], ["invalid choice", "zinb"]),
    (["--gene-sets", "GMT"], ["VIEW:PATH", "rna"]),
    (["--gene-sets", "nope:GMT"], ["VIEW:PATH"]),
    (["--gene-sets", "hallmark"], ["VIEW:PATH"]),
    (["--out", "OUT.h5ad"], [".h5mu"]),
    (["--model", "pca"], ["--model spex"]),
])
def test_one_line_errors(files, tmp_path, capsys, one_line_error, argv, words):
    argv = [a.replace("GMT", str(files["gmt"])).replace("OUT", str(tmp_path / "out"))
            .replace("REPORT", str(tmp_path / "report")) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out.h5mu")]
    model = [] if "--model" in argv else ["--model", "spex"]
    if "--gene-sets" not in argv and "--model" not in argv:
        argv += ["--gene-sets", f"rna:{files['gmt']}"]
    rc = main(["fit", str(files["complete"]), *model, *argv, "--quiet"])
    assert rc == 2
    one_line_error(*words)
    assert not (tmp_path / "out.h5mu").exists()


def test_view_likelihood_needs_h5mu_and_missing_mudata(files, tmp_path, capsys, one_line_error, monkeypatch):
    h5ad = tmp_path / "one.h5ad"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        md.read_h5mu(files["complete"])["rna"].write_h5ad(h5ad)
    assert main(["fit", str(h5ad), "--likelihood", "rna:nb", "--gene-sets", str(files["gmt"]), "--out", str(tmp_path / "o.h5ad"), "--quiet"]) == 2
    one_line_error("needs a .h5mu input")
    import sys

    monkeypatch.setitem(sys.modules, "mudata", None)  # import mudata -> ImportError
    assert main(["fit", str(files["complete"]), "--gene-sets", f"rna:{files['gmt']}", "--out", str(tmp_path / "o.h5mu"),
                 "--quiet"]) == 2
    one_line_error("reading .h5mu needs the mudata package: pip install mudata")


def test_fit_h5mu_with_report_and_report_of_h5mu(files, tmp_path, capsys):
    out = tmp_path / "out.h5mu"
    rc = main(["fit", str(files["complete"]), "--likelihood", "acc:bernoulli", "--gene-sets", f"rna:{files['gmt']}",
               *FAST, "--out", str(out), "--report", str(tmp_path / "fit_report")])
    assert rc == 0
    assert "report.html" in capsys.readouterr().out
    text = (tmp_path / "fit_report" / "report.html").read_text(encoding="utf-8")
    assert "Factors × views" in text and "SET_A" in text
    assert main(["report", str(out), "--out", str(tmp_path / "rep"), "--quiet"]) == 0
    text = (tmp_path / "rep" / "report.html").read_text(encoding="utf-8")
    assert 'id="views"' in text and "data:image/png;base64," in text
    assert "rna (30 features" in text and "acc (12 features" in text


def test_report_of_h5mu_without_results(files, tmp_path, capsys, one_line_error):
    assert main(["report", str(files["complete"]), "--out", str(tmp_path / "rep"), "--quiet"]) == 2
    one_line_error("mdata.uns['spex']")


def test_view_weights_from_the_shell(files, tmp_path, one_line_error):
    out = tmp_path / "w.h5mu"
    rc = main(["fit", str(files["missing"]), "--model", "spex", "--likelihood", "acc:bernoulli", "--allow-missing",
               "--view-weights", "balanced", *FAST, "--out", str(out)])
    assert rc == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = md.read_h5mu(out)
    weights = np.asarray(res.uns["spex"]["view_weights"], dtype=float)
    assert weights.shape == (2,) and weights[1] > 1 > weights[0]
    for argv, words in ((["--view-weights", "rna:-2"], ["--view-weights", "positive"]),
                        (["--view-weights", "atac:2"], ["view_weights names views", "atac"])):
        rc = main(["fit", str(files["missing"]), "--model", "spex", "--allow-missing", *FAST,
                   "--out", str(tmp_path / "x.h5mu"), *argv])
        assert rc == 2
        one_line_error(*words)
