"""The benchmark scripts at a tiny size (pathfactor and scikit-learn only; the peers need not be installed)."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import common  # noqa: E402
import peers  # noqa: E402
import scaling  # noqa: E402

from pathfactor.evaluate import mask_f1  # noqa: E402

TINY = "150x200x4"


def test_parse_size():
    assert common.parse_size("1000x2000x20") == (1000, 2000, 20)
    assert common.parse_size(" 10X30x2 ") == (10, 30, 2)
    for bad in ("1000x2000", "ax2x3", "10x5x5", "0x10x2"):
        with pytest.raises(ValueError, match="CELLSxGENESxFACTORS|factors < genes"):
            common.parse_size(bad)


def test_r2_matches_the_direct_formula_across_blocks(monkeypatch):
    rng = np.random.default_rng(0)
    Y = rng.normal(size=(50, 7)).astype(np.float32) + 3.0
    X, W, offset = rng.normal(size=(50, 2)), rng.normal(size=(7, 2)), rng.normal(size=7)
    Y64 = Y.astype(np.float64)
    direct = 1 - ((Y64 - offset - X @ W.T) ** 2).sum() / ((Y64 - Y64.mean(0)) ** 2).sum()
    monkeypatch.setattr(common, "_BLOCK", 8)  # several blocks and a ragged last one
    assert common.r2(Y, X, W, offset) == pytest.approx(direct, rel=1e-10)
    assert common.r2(Y, np.zeros((50, 1)), np.zeros((7, 1)), Y.mean(0)) == pytest.approx(0.0, abs=1e-6)


def test_score_aligned_and_matched_agree_on_a_permuted_truth():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(200, 3))
    W = rng.normal(size=(40, 3)) * (rng.random((40, 3)) < 0.3)
    mask = W != 0
    Y = X @ W.T + 0.1 * rng.normal(size=(200, 40))
    aligned = common.score(common.Fit(0.0, X, W, np.zeros(40), aligned=True), Y, X, mask)
    assert aligned["f1"] == pytest.approx(mask_f1(mask, W), abs=1e-4)
    assert aligned["factor_correlation"] == pytest.approx(1.0)
    order, signs = [2, 0, 1], np.array([-1.0, 1.0, -1.0])
    shuffled = common.Fit(0.0, X[:, order] * signs, W[:, order] * signs, np.zeros(40), aligned=False)
    matched = common.score(shuffled, Y, X, mask)
    assert matched["f1"] == aligned["f1"] and matched["factor_correlation"] == pytest.approx(1.0)
    assert matched["r2"] == pytest.approx(aligned["r2"]) and matched["r2"] > 0.9
    # the same permutation read as aligned scores badly: the alignment matters
    assert common.score(common.Fit(0.0, X[:, order], W[:, order], np.zeros(40), True), Y, X, mask)["f1"] < 0.7


def test_peers_in_process_writes_one_line_per_method(tmp_path, monkeypatch):
    monkeypatch.setitem(peers.PEER_PACKAGES, "muvi.MuVI", "no_such_package_for_this_test")
    out = tmp_path / "peers.jsonl"
    records = peers.main(["--sizes", TINY, "--noise", "0.2", "--threads", "1", "--no-isolate", "--out", str(out),
                          "--methods", "pathfactor.Spex", "pathfactor.PCA", "sklearn.PCA", "sklearn.NMF",
                          "muvi.MuVI"])
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["method"] for r in lines] == [r["method"] for r in records] == [
        "pathfactor.Spex", "pathfactor.PCA", "sklearn.PCA", "sklearn.NMF", "muvi.MuVI"]
    assert len({r["data"] for r in lines}) == 1  # every method saw the same matrix
    spex, pca, skpca, nmf, muvi = lines
    for r in (spex, pca, skpca, nmf):
        assert {"seconds", "peak_rss_mb", "f1", "factor_correlation", "r2", "f1_truth", "f1_annotation"} <= set(r)
        assert (r["n_cells"], r["n_genes"], r["n_factors"], r["noise"]) == (150, 200, 4, 0.2)
        assert 0 <= r["f1"] <= 1 and 0 <= r["factor_correlation"] <= 1 and r["seconds"] >= 0
    # Spex recovers the programs better than its noisy annotation; PCA finds a rotation of them
    assert spex["matching"] == "annotation" and spex["f1"] > spex["f1_annotation"] + 0.1
    assert spex["factor_correlation"] > 0.95
    assert pca["matching"].startswith("hungarian") and pca["r2"] == pytest.approx(skpca["r2"], abs=1e-3)
    assert pca["r2"] >= spex["r2"] - 0.01  # K principal components reconstruct best (least squares)
    assert "skipped" in muvi and "no_such_package_for_this_test" in muvi["skipped"] and "f1" not in muvi


def test_peers_isolated_worker_reports_its_own_peak():
    records = peers.main(["--sizes", TINY, "--threads", "1", "--out", "", "--methods", "sklearn.FactorAnalysis"])
    (record,) = records
    assert record["isolated"] is True and "error" not in record, record
    assert record["peak_rss_mb"] >= record["rss_before_fit_mb"] > 0
    assert record["factor_correlation"] > 0.5


def test_peers_data_file_round_trips_without_anndata(tmp_path):
    from pathfactor.data.simulate import noisy_annotations

    data = peers.Data.from_adata(noisy_annotations(n_cells=30, n_genes=40, n_factors=3, noise=0.2, seed=1))
    data.save(tmp_path / "data.npz")
    back = peers.Data.load(tmp_path / "data.npz")
    assert back.genes == data.genes and back.terms == data.terms and back.sets == data.sets and back.K == 3
    for name in ("Y", "annotation", "X_true", "W_true", "mask_true"):
        np.testing.assert_array_equal(getattr(back, name), getattr(data, name))
    assert back.Y.dtype == np.float32 and back.annotation.dtype == bool
    assert list(back.frame.columns) == data.genes and np.shares_memory(back.frame.to_numpy(), back.Y)


def test_scaling_sweeps_share_the_base_and_draw_the_figure(tmp_path):
    out, fig = tmp_path / "scaling.json", tmp_path / "scaling.png"
    scaling.main(["--base", "120x150x4", "--cells", "80", "120", "--genes", "150", "--factors", "3", "4",
                  "--threads", "1", "--no-isolate", "--out", str(out), "--figure", str(fig)])
    saved = json.loads(out.read_text())
    sizes = [(r["n_cells"], r["n_genes"], r["n_factors"]) for r in saved["records"]]
    assert sizes == [(80, 150, 4), (120, 150, 4), (120, 150, 3)]  # the base runs once
    assert saved["records"][1]["sweeps"] == ["cells", "genes", "factors"]
    assert all(r["method"] == "pathfactor.Spex" and r["f1"] > 0.5 for r in saved["records"])
    assert fig.stat().st_size > 10_000
