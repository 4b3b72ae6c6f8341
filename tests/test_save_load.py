"""model.save is atomic and pf.load verifies: every damaged, mixed-up or tampered directory is a ValueError.

Tiny data (20 cells x 12 genes, a few epochs): each fit takes well under a second.
"""
import io
import json
import os
import tracemalloc
import zipfile

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import pathfactor as pf
from pathfactor.models import NMF, PPCA, VAE, Autoencoder, FactorAnalysis, Spex
from pathfactor.models import persist
from pathfactor.models.persist import manifest

pytestmark = pytest.mark.usefixtures("torch_one_thread")

GENES = [f"G{j}" for j in range(12)]
SETS = {"S1": GENES[:5], "S2": GENES[4:9]}
FACTORIES = {
    "PPCA": lambda: PPCA(n_factors=2, max_epochs=5, progress=False),
    "FactorAnalysis": lambda: FactorAnalysis(n_factors=2, max_epochs=5, progress=False),
    "NMF": lambda: NMF(n_factors=2, max_epochs=5, progress=False),
    "Spex": lambda: Spex(n_dense=1, min_set_size=2, max_epochs=3, progress=False),
    "Autoencoder": lambda: Autoencoder(n_dense=2, hidden=(8,), max_epochs=3, progress=False),
    "VAE": lambda: VAE(n_latent=2, hidden=(8,), kl_warmup=1, max_epochs=3, progress=False),
}
NEURAL = ["Autoencoder", "VAE"]


def data(seed: int = 0) -> ad.AnnData:
    X = np.random.default_rng(seed).poisson(3.0, size=(20, len(GENES))).astype(np.float32)
    return ad.AnnData(X, obs=pd.DataFrame(index=[f"c{i}" for i in range(20)]), var=pd.DataFrame(index=GENES))


def fit(name: str, seed: int = 0):
    kw = {"annotations": SETS} if name == "Spex" else {}
    return FACTORIES[name]().fit(data(seed), **kw)


@pytest.fixture(scope="module")
def fits():
    """Two fits of each model, to data of the same shape but other values."""
    return {name: (fit(name, 0), fit(name, 1)) for name in FACTORIES}


@pytest.fixture(params=list(FACTORIES))
def saved(request, fits, tmp_path):
    """(model name, directory of its first fit, saved afresh)."""
    name = request.param
    return name, fits[name][0].save(tmp_path / "model")


# ------------------------------------------------------------------------------------------------ helpers
def refused(path, fragment: str) -> str:
    with pytest.raises(ValueError) as info:
        pf.load(path)
    message = str(info.value)
    assert fragment in message, message
    return message


def damaged(path, fragment: str) -> None:
    """pf.load refuses ``path`` with ``fragment``, naming the directory and saying what to do."""
    message = refused(path, fragment)
    assert str(path) in message and message.endswith("save it again"), message


def read_npz(path) -> dict:
    with np.load(path / "arrays.npz", allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def edit_meta(path, fn) -> None:
    meta = json.loads((path / "model.json").read_text())
    fn(meta)
    (path / "model.json").write_text(json.dumps(meta))


def forge(path, record=None, arrays=None) -> None:
    """Record arrays.npz in model.json as model.save would (a consistent forgery: checksums pass)."""
    record = record or manifest(path / "arrays.npz", arrays if arrays is not None else read_npz(path))
    edit_meta(path, lambda m: m["files"].update({"arrays.npz": record}))


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def transformed(model):
    return model.transform(data(0)).to_numpy()


# ------------------------------------------------------------------------------------------------ round trip
def test_round_trip(saved, fits):
    name, path = saved
    model, loaded = fits[name][0], pf.load(path)
    assert type(loaded) is type(model) and loaded.get_params() == json.loads(json.dumps(model.get_params()))
    pd.testing.assert_frame_equal(loaded.loadings_, model.loadings_)
    pd.testing.assert_frame_equal(loaded.factor_scores_, model.factor_scores_)
    np.testing.assert_allclose(transformed(loaded), transformed(model), rtol=1e-5, atol=1e-6)
    assert sorted(os.listdir(path.parent)) == ["model"]  # no temporary directory left behind


def test_json_records_size_checksum_dtype_and_shape(saved):
    _, path = saved
    meta, arrays = json.loads((path / "model.json").read_text()), read_npz(path)
    assert meta["format_version"] == persist.FORMAT_VERSION == 2
    assert meta["files"]["arrays.npz"] == manifest(path / "arrays.npz", arrays)
    assert meta["files"]["arrays.npz"]["bytes"] == (path / "arrays.npz").stat().st_size


def test_save_over_a_saved_model_replaces_it(fits, tmp_path):
    first, second = fits["PPCA"]
    first.save(tmp_path / "m")
    second.save(tmp_path / "m")
    pd.testing.assert_frame_equal(pf.load(tmp_path / "m").loadings_, second.loadings_)
    assert sorted(os.listdir(tmp_path)) == ["m"]


def test_save_refuses_to_replace_what_is_not_a_model(fits, tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("mine")
    (tmp_path / "f").write_text("mine")
    for target in (tmp_path / "d", tmp_path / "f"):
        with pytest.raises(ValueError, match="exists and is not a saved pathfactor model"):
            fits["PPCA"][0].save(target)
    assert (tmp_path / "d" / "notes.txt").read_text() == (tmp_path / "f").read_text() == "mine"


def test_save_refuses_non_finite_arrays(fits, tmp_path):
    model = fit("PPCA")
    model.loadings_.iloc[0, 0] = np.nan
    with pytest.raises(ValueError, match="'loadings' holds NaN or infinite values"):
        model.save(tmp_path / "m")
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------------ damaged files
def test_arrays_of_another_fit_are_refused(saved, fits, tmp_path):
    name, path = saved
    other = fits[name][1].save(tmp_path / "other")
    assert read_npz(other)["loadings"].shape == read_npz(path)["loadings"].shape
    (path / "arrays.npz").write_bytes((other / "arrays.npz").read_bytes())
    damaged(path, "arrays.npz does not match the sha256 checksum in model.json")


def test_truncated_arrays_are_refused(saved):
    _, path = saved
    raw = (path / "arrays.npz").read_bytes()
    (path / "arrays.npz").write_bytes(raw[: len(raw) // 2])
    damaged(path, f"arrays.npz has {len(raw) // 2} bytes, but model.json records {len(raw)}")


def test_flipped_byte_is_refused(saved):
    _, path = saved
    raw = bytearray((path / "arrays.npz").read_bytes())
    raw[len(raw) // 3] ^= 0x01
    (path / "arrays.npz").write_bytes(bytes(raw))
    damaged(path, "does not match the sha256 checksum")


@pytest.mark.parametrize("forged", [False, True], ids=["checksum", "forged-checksum"])
def test_nan_is_refused(saved, forged):
    _, path = saved
    arrays = read_npz(path)
    arrays["loadings"][0, 0] = np.nan
    np.savez(path / "arrays.npz", **arrays)
    if forged:  # the checksum passes: the finiteness check must catch it on its own
        forge(path, arrays=arrays)
        damaged(path, "arrays.npz holds NaN or infinite values in ['loadings']")
    else:
        damaged(path, "does not match the sha256 checksum")


def test_zip_bomb_member_is_refused_before_decompressing(saved):
    """A 64 MiB member deflated to a few kB, recorded with a consistent checksum: refused from its declared size."""
    _, path = saved
    arrays = read_npz(path)
    n = 8 << 20  # float64s
    with zipfile.ZipFile(path / "arrays.npz", "w") as zf:
        for k, a in arrays.items():
            if k != "scores":
                zf.writestr(f"{k}.npy", npy(a))
        info = zipfile.ZipInfo("scores.npy")
        info.compress_type = zipfile.ZIP_DEFLATED
        with zf.open(info, "w") as fh:
            np.lib.format.write_array_header_1_0(fh, {"descr": "<f8", "fortran_order": False, "shape": (n,)})
            for _ in range(64):
                fh.write(bytes(1 << 20))
    assert (path / "arrays.npz").stat().st_size < 1 << 20
    forge(path, arrays=arrays)  # model.json declares the honest shapes
    tracemalloc.start()
    try:
        damaged(path, "member 'scores.npy' unpacks to 67108992 bytes, but model.json declares a <f8 array of shape")
        assert tracemalloc.get_traced_memory()[1] < 8 << 20  # nothing was decompressed
    finally:
        tracemalloc.stop()


def test_huge_declared_array_is_refused_before_reading(fits, tmp_path):
    path = fits["PPCA"][0].save(tmp_path / "m")
    record = manifest(path / "arrays.npz", read_npz(path))
    record["arrays"]["extra_mu"]["shape"] = [200_000_000]  # 1.6 GB, in a file of a few kB
    forge(path, record)
    damaged(path, "bytes of arrays in an arrays.npz of")


def test_compressed_member_is_refused(fits, tmp_path):
    path = fits["PPCA"][0].save(tmp_path / "m")
    arrays = read_npz(path)
    with zipfile.ZipFile(path / "arrays.npz", "w") as zf:
        for k, a in arrays.items():
            zf.writestr(f"{k}.npy", npy(a), compress_type=zipfile.ZIP_DEFLATED if k == "relevance" else None)
    forge(path, arrays=arrays)
    damaged(path, "member 'relevance.npy' is compressed; pathfactor stores arrays uncompressed")


def test_declared_shapes_must_match_the_metadata(fits, tmp_path):
    path = fits["PPCA"][0].save(tmp_path / "m")
    edit_meta(path, lambda m: m["files"]["arrays.npz"]["arrays"]["scores"].update(shape=[20, 3]))
    damaged(path, "arrays.npz holds 'scores' of shape (20, 3), but model.json describes 20 cells, 12 genes, 2 factors")


def test_member_header_must_match_the_json(fits, tmp_path):
    path = fits["PPCA"][0].save(tmp_path / "m")
    arrays = read_npz(path)
    record = manifest(path / "arrays.npz", arrays)
    arrays["extra_mu"] = arrays["extra_mu"].astype(np.int64)  # same size, other dtype
    np.savez(path / "arrays.npz", **arrays)
    forge(path, {**manifest(path / "arrays.npz", arrays), "arrays": record["arrays"]})
    damaged(path, "member 'extra_mu.npy' holds a <i8 array of shape (12,), but model.json declares a <f8 array")


def test_extra_state_of_the_wrong_shape_is_refused(fits, tmp_path):
    path = fits["FactorAnalysis"][0].save(tmp_path / "m")
    arrays = read_npz(path)
    arrays["extra_Psi"] = arrays["extra_Psi"][:5]
    np.savez(path / "arrays.npz", **arrays)
    forge(path, arrays=arrays)
    damaged(path, "array 'Psi' has shape (5,), but the model's metadata imply (12,)")


# ------------------------------------------------------------------------------------------------ tampered JSON
@pytest.mark.parametrize("name", NEURAL)
@pytest.mark.parametrize("hidden", [4_000_000, [4_000_000_000], [8] * 100_000], ids=["wide", "wider", "deep"])
def test_huge_hidden_is_refused_without_building_it(fits, tmp_path, name, hidden):
    path = fits[name][0].save(tmp_path / "m")
    edit_meta(path, lambda m: m["params"].update(hidden=hidden))
    tracemalloc.start()
    try:
        message = refused(path, "does not hold a valid")
        assert tracemalloc.get_traced_memory()[1] < 64 << 20
    finally:
        tracemalloc.stop()
    assert "hidden" in message and message.endswith("save it again")


def test_huge_latent_size_is_refused(fits, tmp_path):
    path = fits["VAE"][0].save(tmp_path / "m")
    edit_meta(path, lambda m: m["params"].update(n_latent=3_000_000_000))
    damaged(path, "the saved network does not match the model's parameters")


@pytest.mark.parametrize("where", ["top", "params"])
def test_deeply_nested_json_is_refused(fits, tmp_path, where):
    path = fits["PPCA"][0].save(tmp_path / "m")
    deep = "[" * 100_000 + "]" * 100_000
    text = (path / "model.json").read_text().replace('"params": {', f'"params": {{"x": {deep}, ', 1)
    (path / "model.json").write_text(deep if where == "top" else text)
    damaged(path, "model.json nests deeper than 32 levels")


def test_moderately_nested_json_is_refused(fits, tmp_path):
    path = fits["PPCA"][0].save(tmp_path / "m")
    edit_meta(path, lambda m: m["extra"].update(x=json.loads("[" * 200 + "]" * 200)))
    damaged(path, "model.json nests deeper than 32 levels")


def test_oversized_json_is_refused(fits, tmp_path, monkeypatch):
    path = fits["PPCA"][0].save(tmp_path / "m")
    monkeypatch.setattr(persist, "MAX_JSON_BYTES", 1000)
    damaged(path, "model.json is larger than 1000 bytes")


def test_old_format_without_checksums_is_refused(fits, tmp_path):
    path = fits["PPCA"][0].save(tmp_path / "m")
    edit_meta(path, lambda m: (m.update(format_version=1), m.pop("files")))
    message = refused(path, "v1, written by an older pathfactor without checksums")
    assert message.endswith("fit the model and save it again")


# ------------------------------------------------------------------------------------------------ missing files
@pytest.mark.parametrize("missing", ["model.json", "arrays.npz", "directory"])
def test_missing_files_are_refused(fits, tmp_path, missing):
    path = fits["PPCA"][0].save(tmp_path / "m")
    if missing == "directory":
        path = tmp_path / "nope"
    else:
        (path / missing).unlink()
    refused(path, "is not a saved pathfactor model (needs model.json and arrays.npz)")


# ------------------------------------------------------------------------------------------------ crashes
def failing_replace(monkeypatch, fail_calls: set[int]):
    """os.replace raising OSError on the given calls (1-based)."""
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) in fail_calls:
            raise OSError(f"simulated crash at rename {len(calls)}")
        return real(src, dst)

    monkeypatch.setattr(persist.os, "replace", replace)
    return calls


@pytest.mark.parametrize("fail_at", [1, 2], ids=["renaming-old-aside", "moving-new-in"])
def test_failed_rename_keeps_the_previous_model(fits, tmp_path, monkeypatch, fail_at):
    old, new = fits["PPCA"]
    path = old.save(tmp_path / "m")
    failing_replace(monkeypatch, {fail_at})
    with pytest.raises(OSError, match="simulated crash"):
        new.save(path)
    monkeypatch.undo()
    pd.testing.assert_frame_equal(pf.load(path).loadings_, old.loadings_)
    assert sorted(os.listdir(tmp_path)) == ["m"]


def test_crash_between_the_renames_leaves_the_previous_model_aside(fits, tmp_path, monkeypatch):
    """The new model moving in fails and so does the roll-back (as if the process died): pf.load says where the
    previous model is, and it is complete."""
    old, new = fits["PPCA"]
    path = old.save(tmp_path / "m")
    calls = failing_replace(monkeypatch, {2, 3})
    with pytest.raises(OSError, match="simulated crash"):
        new.save(path)
    monkeypatch.undo()
    aside = calls[0][1]
    message = refused(path, f"an interrupted save left the previous model in {aside}: rename it back")
    assert "is not a saved pathfactor model" in message
    os.replace(aside, path)
    pd.testing.assert_frame_equal(pf.load(path).loadings_, old.loadings_)


def test_crash_while_writing_keeps_the_previous_model(fits, tmp_path, monkeypatch):
    old, new = fits["PPCA"]
    path = old.save(tmp_path / "m")

    def fsync(fd):
        raise OSError("simulated crash while writing")

    monkeypatch.setattr(persist.os, "fsync", fsync)
    with pytest.raises(OSError, match="simulated crash"):
        new.save(path)
    monkeypatch.undo()
    pd.testing.assert_frame_equal(pf.load(path).loadings_, old.loadings_)
    assert sorted(os.listdir(tmp_path)) == ["m"]


def test_a_fresh_process_loads_a_model_whose_class_it_has_not_imported(fits, tmp_path):
    """Model classes import on first use: ``load`` finds the saved model's class by name, and the registry lists
    every built-in model once asked for."""
    import subprocess
    import sys

    name = sorted(fits)[0]
    model = fits[name][0]
    model.save(tmp_path / "m")
    code = ("import sys, pathfactor as pf; m = pf.load(sys.argv[1]); "
            "print(type(m).__name__, len(pf.models.REGISTRY))")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    loaded, registered = done.stdout.split()
    assert loaded == type(model).__name__
    assert int(registered) == 10
