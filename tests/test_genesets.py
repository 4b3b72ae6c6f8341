"""Tests for pathfactor.data.genesets.GeneSets."""
from __future__ import annotations

import gzip
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pathfactor as pf
from pathfactor.data.genesets import GeneSets

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GS_DIR = SHARED / "genesets"
needs_shared = pytest.mark.skipif(
    not GS_DIR.is_dir(), reason=f"shared real data not found at {SHARED}"
)


@pytest.fixture
def small():
    return GeneSets(
        {"A": ["CCNB1", "CDK1", "MKI67", "CCNB1"], "B": ["ACTB", "GAPDH"], "C": []},
        {"A": "cell cycle"},
    )


# ----------------------------------------------------------------------------- construction
def test_constructor_dedups_keeps_order_and_protocol(small):
    assert small["A"] == ("CCNB1", "CDK1", "MKI67")
    assert len(small) == 3
    assert list(small) == ["A", "B", "C"] == small.names
    assert "B" in small and "Z" not in small
    assert small.sizes.to_dict() == {"A": 3, "B": 2, "C": 0}
    assert small.sizes.dtype.kind == "i"
    assert dict(small.items())["B"] == ("ACTB", "GAPDH")
    assert small.descriptions == {"A": "cell cycle", "B": "", "C": ""}
    r = repr(small)
    assert r.startswith("GeneSets(3 sets") and len(r) < 200
    with pytest.raises(KeyError, match="no gene set named 'Z'"):
        small["Z"]


@pytest.mark.parametrize(
    "sets, match",
    [
        ({"": ["A"]}, "non-empty"),
        ({"  ": ["A"]}, "non-empty"),
        ({1: ["A"]}, "non-empty strings"),
        ({"S": "CCNB1"}, "list of symbols"),
        ({"S": ["A", None]}, "must be strings"),
        ({"S": ["A", ""]}, "empty gene symbol"),
        ({"S\tT": ["A"]}, "tab or newline"),
        ([("S", ["A"])], "mapping"),
    ],
)
def test_constructor_rejects_bad_input(sets, match):
    with pytest.raises(ValueError, match=match):
        GeneSets(sets)


def test_description_for_unknown_set_rejected():
    with pytest.raises(ValueError, match="not one of the gene sets"):
        GeneSets({"A": ["X"]}, {"B": "nope"})


def test_returned_tuples_cannot_mutate_collection(small):
    d = small.to_dict()
    d["A"].append("NEW")
    assert "NEW" not in small["A"]
    assert isinstance(small["A"], tuple)


# ----------------------------------------------------------------------------- I/O
def test_gmt_tolerates_blank_lines_trailing_tabs_crlf(tmp_path):
    p = tmp_path / "x.gmt"
    p.write_bytes(b"S1\tdesc one\tA\tB\t\t\r\n\n   \nS2\t\tC\tA\tC\t\n")
    gs = GeneSets.read_gmt(p)
    assert gs.names == ["S1", "S2"]
    assert gs["S1"] == ("A", "B") and gs["S2"] == ("C", "A")
    assert gs.descriptions == {"S1": "desc one", "S2": ""}


def test_gmt_errors(tmp_path):
    p = tmp_path / "spaces.gmt"
    p.write_text("S1 desc A B C\n")
    with pytest.raises(ValueError, match="line 1 has no tab"):
        GeneSets.read_gmt(p)
    p2 = tmp_path / "dup.gmt"
    p2.write_text("S1\td\tA\nS1\td\tB\n")
    with pytest.raises(ValueError, match="lines 1 and 2"):
        GeneSets.read_gmt(p2)
    p3 = tmp_path / "dupsame.gmt"
    p3.write_text("S1\td\tA\tB\nS1\td\tA\tB\n")
    assert len(GeneSets.read_gmt(p3)) == 1


def test_write_read_roundtrip_plain_and_gz(tmp_path, small):
    for name in ("out.gmt", "out.gmt.gz"):
        p = tmp_path / name
        small.write_gmt(p)
        back = GeneSets.read(p)
        assert back == small
        assert back.descriptions == small.descriptions
    with gzip.open(tmp_path / "out.gmt.gz", "rt") as fh:
        assert fh.readline().startswith("A\tcell cycle\tCCNB1")


@settings(max_examples=25, deadline=None)
@given(
    st.dictionaries(
        st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zs", "Zl", "Zp")), min_size=1, max_size=8),
        st.lists(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9.\-]{0,6}", fullmatch=True), max_size=6),
        max_size=5,
    )
)
def test_roundtrip_property(tmp_path_factory, sets):
    gs = GeneSets(sets)
    p = tmp_path_factory.mktemp("rt") / "x.gmt"
    gs.write_gmt(p)
    assert GeneSets.read_gmt(p) == gs


def test_read_dispatch_and_errors(tmp_path, small):
    with pytest.raises(ValueError, match=r"suffix.*\.gmt"):
        GeneSets.read(tmp_path / "sets.txt")
    missing = tmp_path / "nope.gmt"
    with pytest.raises(FileNotFoundError, match="nope.gmt"):
        GeneSets.read(missing)
    with pytest.raises(FileNotFoundError, match="nope.gmt"):
        GeneSets.read_gmt(missing)
    # json + json.gz
    data = {"flat": ["A", "B"], "grp": {"x": ["C"], "y": ["A", "A"]}, "empty": {}}
    (tmp_path / "s.json").write_text(json.dumps(data))
    with gzip.open(tmp_path / "s.json.gz", "wt") as fh:
        json.dump(data, fh)
    for name in ("s.json", "s.json.gz", "S.JSON"):
        if name == "S.JSON":
            shutil.copy(tmp_path / "s.json", tmp_path / name)
        gs = GeneSets.read(tmp_path / name)
        assert gs.names == ["flat", "grp/x", "grp/y"]
        assert gs["grp/y"] == ("A",)
        assert gs.descriptions["grp/x"] == "grp"


@pytest.mark.parametrize(
    "content, match",
    [
        ("[1, 2]", "JSON object"),
        ('{"a": 3}', "list of genes"),
        ('{"g": {"a": {"b": ["X"]}}}', "one level"),
        ("{not json", "not valid JSON"),
    ],
)
def test_json_errors(tmp_path, content, match):
    p = tmp_path / "bad.json"
    p.write_text(content)
    with pytest.raises(ValueError, match=match):
        GeneSets.read_json(p)


@needs_shared
def test_read_real_files():
    h = GeneSets.read(GS_DIR / "msigdb_h.all.v7.5.1.symbols.gmt")
    assert len(h) == 50 and len(h.genes) == 4383
    assert (h.sizes.min(), h.sizes.max()) == (32, 200)
    assert h.descriptions["HALLMARK_G2M_CHECKPOINT"].startswith("http")

    r = GeneSets.read(GS_DIR / "msigdb_c2.cp.reactome.v4.0.symbols.gmt.gz")
    assert len(r) == 674 and len(r.genes) == 6025

    go = GeneSets.read(GS_DIR / "enrichr_GO_Biological_Process_2021.gmt.gz")
    assert len(go) == 6036
    assert go.descriptions[go.names[0]] == ""  # empty description field
    assert go.names[0].endswith("(GO:0051084)")

    sp = GeneSets.read(GS_DIR / "spectra_default_gene_sets.json")
    raw = json.loads((GS_DIR / "spectra_default_gene_sets.json").read_text())
    assert len(sp) == 181 == sum(len(v) for v in raw.values())
    assert all("/" in n for n in sp.names)
    assert not any(n.startswith("B_GC/") for n in sp.names)  # B_GC is an empty group
    assert "global" in {n.split("/")[0] for n in sp.names}

    # mouse custom list keeps duplicates in the file; we drop them
    fs = GeneSets.read(GS_DIR / "fscLVM_custom_mouse_cellcycle_th2.gmt")
    assert fs.names == ["Cell.cycle", "Th2"]
    assert fs.sizes["Cell.cycle"] <= 593


# ----------------------------------------------------------------------------- combining
def test_union_and_add(small):
    other = GeneSets({"B": ["ACTB", "GAPDH"], "D": ["X"]}, {"B": "housekeeping"})
    u = small + other
    assert u.names == ["A", "B", "C", "D"]
    assert u.descriptions["B"] == "housekeeping"  # filled from the other collection
    assert small.union({"E": ["Y"]}).names[-1] == "E"
    with pytest.raises(ValueError, match=r"\['B'\]"):
        small + GeneSets({"B": ["ACTB"]})


# ----------------------------------------------------------------------------- matching
def test_match_case_insensitive_and_multi_hits():
    gs = GeneSets({"S": ["CCNB1", "ZFP936", "NOPE", "Cdk1"]})
    var = ["Actb", "Zfp936", "Cdk1", "Ccnb1", "ZFP936x", "ZFP936"]
    m = gs.match(var)
    assert m["S"] == ("Ccnb1", "Zfp936", "ZFP936", "Cdk1")
    assert gs.match(var, case_sensitive=True)["S"] == ("ZFP936", "Cdk1")
    assert gs.match(pd.Index(var)).names == ["S"]


def test_match_keeps_empty_sets_and_rejects_bad_var_names(small):
    m = small.match(["Ccnb1"])
    assert m.sizes.to_dict() == {"A": 1, "B": 0, "C": 0}
    with pytest.raises(ValueError, match="single string"):
        small.match("CCNB1")
    with pytest.raises(ValueError, match="empty"):
        small.match([])
    with pytest.raises(ValueError, match="var_names_make_unique"):
        small.match(["A", "A"])


def test_to_mask_alignment_and_dtype(small):
    var = pd.Index(["Gapdh", "x", "Mki67", "ccnb1", "ACTB"])
    mask = small.to_mask(var)
    assert list(mask.index) == list(var)
    assert list(mask.columns) == ["A", "B", "C"]
    assert (mask.dtypes == bool).all()
    expected = np.array(
        [[0, 1, 0], [0, 0, 0], [1, 0, 0], [1, 0, 0], [0, 1, 0]], dtype=bool
    )
    np.testing.assert_array_equal(mask.to_numpy(), expected)
    assert not mask["C"].any()
    cs = small.to_mask(var, case_sensitive=True)
    assert cs.to_numpy().sum() == 1 and cs.loc["ACTB", "B"]
    # from_mask round trip (order of genes follows the mask index)
    back = GeneSets.from_mask(mask)
    assert back["A"] == ("Mki67", "ccnb1") and back["C"] == ()


def test_from_mask_validation():
    m = pd.DataFrame({"T1": [1, 0, 1], "T2": [0, 0, 1]}, index=["g1", "g2", "g3"])
    gs = GeneSets.from_mask(m)
    assert gs.to_dict() == {"T1": ["g1", "g3"], "T2": ["g3"]}
    with pytest.raises(ValueError, match="0/1"):
        GeneSets.from_mask(m * 0.5)
    with pytest.raises(ValueError, match="DataFrame"):
        GeneSets.from_mask(m.to_numpy())
    with pytest.raises(ValueError, match="duplicate term"):
        GeneSets.from_mask(pd.concat([m, m], axis=1))


def test_filter_size_and_fraction(caplog):
    var = [f"G{i}" for i in range(40)]
    gs = GeneSets(
        {
            "small": var[:5],  # 5 matched
            "mid": var[:20],  # 20 matched of 20
            "half": var[:20] + [f"X{i}" for i in range(20)],  # 20 matched of 40
            "big": var[:40],  # 40 matched
        }
    )
    with caplog.at_level(logging.INFO, logger="pathfactor.data.genesets"):
        f = gs.filter(var, min_size=10, max_size=30)
    assert f.names == ["mid", "half"]
    assert "kept 2 of 4 gene sets; 20 of the data's 40 genes" in caplog.text
    assert f.match_report == {
        "n_sets_in": 4, "n_sets_kept": 2, "n_genes_matched": 20, "n_genes_data": 40,
        "dropped": {"small": (5, 5), "big": (40, 40)},
    }
    assert gs.filter(var, min_size=10, max_size=30, min_fraction=0.6).names == ["mid"]
    assert gs.filter(var, min_size=5, max_size=5).names == ["small"]  # bounds inclusive
    assert gs.match_report is None
    for bad in ({"min_size": -1}, {"max_size": 3, "min_size": 5}, {"min_fraction": 1.5}):
        with pytest.raises(ValueError):
            gs.filter(var, **bad)


def test_filter_no_match_error_message():
    gs = GeneSets({f"S{i}": ["CCNB1", "CDK1", "MKI67"] for i in range(50)})
    var = [f"ENSMUSG{i:011d}" for i in range(1998)] + ["Ccnb1", "Cdk1"]
    with pytest.raises(ValueError) as e:
        gs.filter(var)
    msg = str(e.value)
    assert "none of the 50 gene sets has between 15 and 500 genes" in msg
    assert "2000 var_names" in msg and "best match: 2 genes" in msg
    assert "Ensembl" in msg and "min_size" in msg
    with pytest.raises(ValueError, match="raise max_size"):
        gs.filter(["CCNB1", "CDK1", "MKI67"], min_size=1, max_size=2)
    with pytest.raises(ValueError, match="lower min_fraction"):
        GeneSets({"S": ["A", "B", "C", "D"]}).filter(["A"], min_size=1, min_fraction=0.5)
    with pytest.raises(ValueError, match="empty"):
        GeneSets({}).filter(["A"])


@needs_shared
def test_hallmark_matches_mouse_mesc_case_insensitively():
    import anndata as ad

    adata = ad.read_h5ad(SHARED / "buettner2015_mesc_cellcycle.h5ad")
    h = GeneSets.read_gmt(GS_DIR / "msigdb_h.all.v7.5.1.symbols.gmt")
    f = h.filter(adata)  # AnnData accepted for var_names
    g2m = f["HALLMARK_G2M_CHECKPOINT"]
    assert len(g2m) == 78  # of 200 human symbols
    assert {"Mki67", "Aurka", "Plk1"} <= set(g2m)
    assert "Ccnb1" not in g2m  # CCNB1 is not a Hallmark G2M gene (CCNB2 is)
    assert set(g2m) <= set(adata.var_names)
    assert f.match_report["n_sets_kept"] == 44
    assert f.match_report["n_genes_matched"] == 1444
    # case-sensitive matching of human symbols to mouse genes finds (almost) nothing
    with pytest.raises(ValueError, match="best match"):
        h.filter(adata.var_names, case_sensitive=True)
    mask = h.to_mask(adata.var_names)
    assert mask.shape == (adata.n_vars, 50)
    assert mask["HALLMARK_G2M_CHECKPOINT"].sum() == 78
    assert mask.index.equals(adata.var_names)


# ----------------------------------------------------------------------------- merging
def test_merge_similar_hand_built():
    gs = GeneSets(
        {
            "A": list("abcdefghij"),  # 10
            "B": list("abcdefghi"),  # 9, J(A,B)=0.9
            "C": list("abcdefgh") + ["z"],  # 9, J(A,C)=8/11=0.73, J(B,C)=8/10=0.8
            "D": list("vwxy"),
            "E": [],
        },
        {"D": "keep me"},
    )
    m = gs.merge_similar(0.8)
    # A leads, absorbs B (0.9); C is compared with A only (0.73) -> stays
    assert m.names == ["A|B", "C", "D", "E"]
    assert m["A|B"] == tuple("abcdefghij")
    assert m.descriptions["A|B"] == "merged: A, B"
    assert m.descriptions["D"] == "keep me"
    # threshold 0.7: A absorbs B and C; union adds z after A's genes
    m2 = gs.merge_similar(0.7)
    assert m2.names[0] == "A|B|C" and m2["A|B|C"] == tuple("abcdefghij") + ("z",)
    # threshold 1 merges only identical sets; larger set leads even if later
    m3 = GeneSets({"s": ["x"], "L": ["x", "y"], "L2": ["y", "x"]}).merge_similar(1.0)
    assert m3.names == ["s", "L|L2"]
    for bad in (0, 1.5, "0.8"):
        with pytest.raises(ValueError, match="threshold"):
            gs.merge_similar(bad)


def test_jaccard_matrix():
    gs = GeneSets({"A": ["x", "y"], "B": ["y", "z"], "C": ["q"]})
    J = gs.jaccard().toarray()
    np.testing.assert_allclose(J, [[1, 1 / 3, 0], [1 / 3, 1, 0], [0, 0, 1]])


def test_dropped_sets_are_named_in_a_warning_and_the_match_report():
    sets = pf.GeneSets({"big": [f"g{i}" for i in range(20)], "small": ["g0", "g1", "g2"]})
    with pytest.warns(UserWarning, match=r"1 of 2 gene sets were dropped.*small \(3 of 3 genes matched\)"):
        kept = sets.filter([f"g{i}" for i in range(30)], min_size=5)
    assert kept.names == ["big"] and kept.match_report["dropped"] == {"small": (3, 3)}


def test_bundled_collection_by_name_in_fit():
    adata = pf.datasets.mesc()
    m = pf.models.Spex(max_epochs=2, progress=False)
    with pytest.warns(UserWarning):
        m.fit(adata, annotations="hallmark")
    assert "HALLMARK_G2M_CHECKPOINT" in m.loadings_.columns
