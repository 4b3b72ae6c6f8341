"""Tests for the bundled data in pathfactor.data.datasets."""
from __future__ import annotations

from importlib import resources

import numpy as np
import pytest

from pathfactor.data import datasets
from pathfactor.data.genesets import GeneSets


def test_mesc_shape_labels_and_fresh_copy():
    a = datasets.mesc()
    assert a.shape == (182, 6635)
    assert a.X.dtype == np.float32
    stage = a.obs["cell_cycle_stage"]
    assert set(stage.cat.categories) == {"G1", "S", "G2M"}
    assert stage.value_counts().to_dict() == {"G2M": 65, "G1": 59, "S": 58}
    assert a.var_names.is_unique and a.obs_names.is_unique
    # biology sanity check (shared README): Ccnb1 rises G1 < S < G2M
    ccnb1 = a[:, "Ccnb1"].X.ravel()
    means = [ccnb1[(stage == s).to_numpy()].mean() for s in ("G1", "S", "G2M")]
    assert means[0] < means[1] < means[2]
    a.X[:] = 0
    a.obs["new"] = 1
    b = datasets.mesc()
    assert b.X.any() and "new" not in b.obs


def test_gene_sets_bundled():
    assert datasets.available() == ["hallmark", "reactome_mouse"]
    h = datasets.gene_sets("hallmark")
    assert isinstance(h, GeneSets) and len(h) == 50
    assert "HALLMARK_G2M_CHECKPOINT" in h
    r = datasets.gene_sets("reactome_mouse")
    assert len(r) == 30 and len(r.genes) == 1188
    assert "Casp3" in r.genes  # mouse symbols
    with pytest.raises(ValueError, match="hallmark.*reactome_mouse"):
        datasets.gene_sets("kegg")


def test_bundled_sets_usable_on_mesc():
    a = datasets.mesc()
    f = datasets.gene_sets("reactome_mouse").filter(a.var_names, case_sensitive=True)
    assert 0 < len(f) <= 30
    assert datasets.gene_sets("hallmark").filter(a.var_names).match_report["n_sets_kept"] == 44


def test_package_files_present_with_licences():
    files = resources.files("pathfactor.data").joinpath("files")
    names = {p.name for p in files.iterdir()}
    wanted = {
        "buettner2015_mesc_cellcycle.h5ad",
        "hallmark_v7.5.1.gmt",
        "reactome_subset_mouse.gmt",
        "LICENSES.md",
    }
    assert wanted <= names
    lic = files.joinpath("LICENSES.md").read_text()
    for name in wanted - {"LICENSES.md"}:
        assert name in lic
    for term in ("Apache-2.0", "CC BY 4.0", "GPL-2"):
        assert term in lic
    with resources.as_file(files.joinpath("buettner2015_mesc_cellcycle.h5ad")) as path:
        assert path.stat().st_size <= 3_000_000
