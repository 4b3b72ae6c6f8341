"""A saved model on disk: ``model.json`` + ``arrays.npz`` in one directory, written atomically, read back verified.

Format v2. ``model.json`` records, for ``arrays.npz``, its byte size and sha256 and each array's dtype and shape.
:func:`write_model` writes both files into a temporary sibling directory, fsyncs them and renames it into place.
:func:`read_meta` reads the JSON under a size cap and a nesting-depth guard; :func:`array_record` checks the
declared shapes against what the metadata imply (cells, genes, factors, covariates); :func:`read_arrays` checks
the file's size and sha256, then each member's size and ``.npy`` header before reading its data (members must be
stored, not compressed: no zip bomb), and refuses NaN / Inf (NaN only where it means "not estimable",
:data:`NOT_ESTIMABLE`). Nothing is ever unpickled. Every fault is a
``ValueError`` naming the file and the fault. Format v1 (pathfactor before checksums) is refused: save it again.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import shutil
import zipfile
from pathlib import Path

import numpy as np

from .. import __version__

__all__ = ["FORMAT", "FORMAT_VERSION", "MODEL_FILE", "ARRAY_FILE", "MAX_JSON_BYTES", "MAX_JSON_DEPTH",
           "MAX_ARRAYS", "corrupted", "write_model", "manifest", "read_json", "read_meta", "array_record",
           "read_arrays", "expect_shapes", "module_shapes"]

FORMAT = "pathfactor-model"
#: v2: model.json records arrays.npz's size, sha256 and each array's dtype and shape (v1 did not: refused)
FORMAT_VERSION = 2
MODEL_FILE, ARRAY_FILE = "model.json", "arrays.npz"
#: caps on what :func:`read_meta` parses (pathfactor writes a few MB per million cells, 4 levels deep)
MAX_JSON_BYTES, MAX_JSON_DEPTH = 1 << 30, 32
#: caps on what :func:`array_record` accepts: number of arrays, dimensions of one, bytes of an .npy header
MAX_ARRAYS, MAX_NDIM, MAX_HEADER_BYTES = 10_000, 8, 10_000

_DTYPE = re.compile(r"[<>|](b1|[iu][1248]|f[248])\Z")  # bool, integers, floats: nothing that needs unpickling
_NAME = re.compile(r"[A-Za-z0-9_]{1,200}\Z")
_SHA256 = re.compile(r"[0-9a-f]{64}\Z")
_CHUNK = 1 << 20

#: model.json's entries and their JSON types
_META_KEYS = {"model": str, "params": dict, "obs_names": list, "var_names": list, "factor_names": list,
              "factor_kinds": list, "covariate_names": list, "history": list, "extra": dict, "files": dict}
_REQUIRED_ARRAYS = ("scores", "loadings", "relevance")


def corrupted(where, what: str) -> ValueError:
    """The error for a damaged save: ``<where> <what>; the saved model is corrupted or incomplete: save it again``."""
    return ValueError(f"{where} {what}; the saved model is corrupted or incomplete: save it again")


#: the arrays in which NaN is a value, "not estimable": an intervention level of one cell has no sd or lfsr
NOT_ESTIMABLE = frozenset({"extra_effects_sd", "extra_effects_lfsr", "extra_estimates_sd", "extra_gene_effects_sd"})


def _invalid_values(name: str, a: np.ndarray) -> bool:
    """Whether float array ``name`` holds a value no model writes: infinities anywhere, NaN outside NOT_ESTIMABLE."""
    if a.dtype.kind != "f":
        return False
    return bool(np.isinf(a).any()) if name in NOT_ESTIMABLE else not bool(np.isfinite(a).all())


# ---------------------------------------------------------------------------------------------------- write
def write_model(path, meta: dict, arrays: dict[str, np.ndarray]) -> None:
    """Write ``meta`` (plus the record of ``arrays``) and ``arrays`` to directory ``path``, atomically.

    Both files go into ``.<name>.tmp-<random>`` beside ``path``, are fsynced, and the directory is renamed to
    ``path``; an existing model there is first renamed to ``.<name>.old-<random>`` and deleted last. A crash leaves
    the old or the new complete model (between the two renames: the old one under ``.<name>.old-*``, which
    ``pf.load`` points to), at worst with a stray sibling; an exception restores the old model. ``path`` may be
    missing, an empty directory or a saved model; anything else is refused.
    """
    target = Path(os.path.abspath(path))
    if target.is_symlink() or (target.exists() and (not target.is_dir() or {p.name for p in target.iterdir()}
                                                     - {MODEL_FILE, ARRAY_FILE})):
        raise ValueError(f"{target} exists and is not a saved pathfactor model; model.save replaces only a model "
                         "directory (or an empty one): choose another path or remove it")
    for name, a in arrays.items():
        if not _NAME.match(name) or not _DTYPE.match(a.dtype.str):
            raise ValueError(f"cannot save array {name!r} of dtype {a.dtype}: only bool, integer and float arrays "
                             "with names of letters, digits and _ are saved")
        if _invalid_values(name, a):
            raise ValueError(f"cannot save: the model's array {name!r} holds NaN or infinite values")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(target, "tmp")
    tmp.mkdir()
    try:
        with open(tmp / ARRAY_FILE, "wb") as fh:
            np.savez(fh, **arrays)
            _sync(fh)
        meta = {**meta, "files": {ARRAY_FILE: manifest(tmp / ARRAY_FILE, arrays)}}
        with open(tmp / MODEL_FILE, "w", encoding="utf-8") as fh:
            json.dump(meta, fh, indent=1)
            _sync(fh)
        _sync_dir(tmp)
        _move_into_place(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already unless something failed


def manifest(array_file, arrays: dict[str, np.ndarray]) -> dict:
    """model.json's record of ``array_file``, which holds ``arrays``: its size, sha256, each array's dtype and shape."""
    size, digest = _digest(array_file)
    return {"bytes": size, "sha256": digest,
            "arrays": {k: {"dtype": a.dtype.str, "shape": list(a.shape)} for k, a in arrays.items()}}


def _sibling(target: Path, kind: str) -> Path:
    return target.with_name(f".{target.name}.{kind}-{secrets.token_hex(4)}")


def _sync(fh) -> None:
    fh.flush()
    os.fsync(fh.fileno())


def _sync_dir(directory: Path) -> None:
    """fsync a directory (its entries); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _move_into_place(new: Path, target: Path) -> None:
    if target.exists():
        old = _sibling(target, "old")
        os.replace(target, old)
        try:
            os.replace(new, target)
        except BaseException:
            os.replace(old, target)
            raise
        _sync_dir(target.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)
    _sync_dir(target.parent)


def _digest(file) -> tuple[int, str]:
    """(size, sha256 hex) of a path or of an open binary file, read from its start in chunks."""
    if isinstance(file, (str, os.PathLike)):
        with open(file, "rb") as fh:
            return _digest(fh)
    file.seek(0)
    h, size = hashlib.sha256(), 0
    while chunk := file.read(_CHUNK):
        h.update(chunk)
        size += len(chunk)
    return size, h.hexdigest()


# ---------------------------------------------------------------------------------------------------- read
def read_json(file: Path):
    """Parse ``file``: at most ``MAX_JSON_BYTES``, nested at most ``MAX_JSON_DEPTH`` deep."""
    with open(file, "rb") as fh:  # read(n) allocates n bytes up front: ask for no more than the file has
        raw = fh.read(min(os.fstat(fh.fileno()).st_size, MAX_JSON_BYTES) + 1)
    if len(raw) > MAX_JSON_BYTES:
        raise corrupted(file, f"is larger than {MAX_JSON_BYTES} bytes, more than pathfactor reads")
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise corrupted(file, f"is not valid JSON: {err}") from err
    except RecursionError as err:
        raise corrupted(file, f"nests deeper than {MAX_JSON_DEPTH} levels") from err
    stack = [(obj, 1)]
    while stack:  # iterative: no recursion on what was parsed
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise corrupted(file, f"nests deeper than {MAX_JSON_DEPTH} levels")
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return obj


def read_meta(directory: Path) -> dict:
    """model.json, checked: a JSON object of this format and version, with every entry of the right type."""
    meta_file = directory / MODEL_FILE
    meta = read_json(meta_file)
    if not isinstance(meta, dict):
        raise corrupted(meta_file, f"holds a JSON {type(meta).__name__}, not the object pathfactor writes")
    fmt, version = meta.get("format"), meta.get("format_version")
    if fmt != FORMAT:
        raise ValueError(f"{directory} holds format {fmt!r} v{version}, not a pathfactor model (format {FORMAT!r}); "
                         "pf.load reads only directories written by model.save")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise corrupted(meta_file, f"has format_version {version!r}, not an integer version (this pathfactor "
                                   f"writes {FORMAT_VERSION})")
    if version > FORMAT_VERSION:
        raise ValueError(f"{directory} holds format {fmt!r} v{version}, which this pathfactor {__version__} cannot "
                         "read; upgrade pathfactor")
    if version < FORMAT_VERSION:
        raise ValueError(f"{directory} holds format {fmt!r} v{version}, written by an older pathfactor without "
                         f"checksums, which this pathfactor {__version__} does not read (it cannot verify the "
                         "arrays): fit the model and save it again")
    missing = [k for k in _META_KEYS if k not in meta]
    if missing:
        raise corrupted(meta_file, f"lacks the entries {missing}")
    wrong = [k for k, t in _META_KEYS.items() if not isinstance(meta[k], t)]
    if wrong:
        raise corrupted(meta_file, "has entries of the wrong type: "
                                   + ", ".join(f"{k} is a {type(meta[k]).__name__}" for k in wrong))
    for key in ("obs_names", "var_names", "factor_names", "factor_kinds", "covariate_names"):
        if not all(isinstance(v, str) for v in meta[key]):
            raise corrupted(meta_file, f"has non-string entries in {key}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in meta["history"]):
        raise corrupted(meta_file, "has non-numeric entries in history")
    levels = meta.get("covariate_levels")
    if levels is not None and not (isinstance(levels, dict) and all(
            isinstance(v, list) and all(isinstance(x, str) for x in v) for v in levels.values())):
        raise corrupted(meta_file, "has covariate_levels that are not {covariate: [levels]}")
    return meta


def array_record(meta: dict, directory: Path) -> dict:
    """model.json's record of arrays.npz, checked before anything is read: its size and sha256, each array's dtype
    and shape, and the shapes the metadata imply (cells, genes, factors, covariates)."""
    meta_file, array_file = directory / MODEL_FILE, directory / ARRAY_FILE
    record = meta["files"].get(ARRAY_FILE)
    if not (isinstance(record, dict) and isinstance(record.get("bytes"), int) and record["bytes"] >= 0
            and isinstance(record.get("sha256"), str) and _SHA256.match(record["sha256"])
            and isinstance(record.get("arrays"), dict) and len(record["arrays"]) <= MAX_ARRAYS):
        raise corrupted(meta_file, f"has no valid record of {ARRAY_FILE} (files: {{{ARRAY_FILE!r}: {{bytes, sha256, "
                                   f"arrays}}}} with at most {MAX_ARRAYS} arrays)")
    declared, odd = {}, []
    for name, spec in record["arrays"].items():
        shape = spec.get("shape") if isinstance(spec, dict) else None
        if not (_NAME.match(name) and isinstance(shape, list) and len(shape) <= MAX_NDIM
                and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
                and isinstance(spec.get("dtype"), str)):
            raise corrupted(meta_file, f"records array {name[:100]!r} of {ARRAY_FILE} without a valid dtype and "
                                       f"shape (at most {MAX_NDIM} dimensions)")
        if not _DTYPE.match(spec["dtype"]):
            odd.append(name)
        declared[name] = (spec["dtype"], tuple(shape))
    if odd:
        raise corrupted(array_file, f"holds non-numeric arrays {odd}")
    total = sum(np.dtype(dtype).itemsize * math.prod(shape) for dtype, shape in declared.values())
    if total > record["bytes"]:
        raise corrupted(meta_file, f"records {total} bytes of arrays in an {ARRAY_FILE} of {record['bytes']} bytes")
    missing = [k for k in _REQUIRED_ARRAYS if k not in declared]
    if missing:
        raise corrupted(array_file, f"lacks the arrays {missing}")
    N, G = len(meta["obs_names"]), len(meta["var_names"])
    K, C = len(meta["factor_names"]), len(meta["covariate_names"])
    if len(meta["factor_kinds"]) != K:
        raise corrupted(meta_file, f"lists {K} factor names but {len(meta['factor_kinds'])} factor kinds")
    expected = {"scores": (N, K), "loadings": (G, K), "relevance": (K,), "loadings_sd": (G, K),
                "annotation": (G, K), "covariate_effects": (G, C), "covariate_effects_sd": (G, C)}
    for name, shape in expected.items():
        if name in declared and declared[name][1] != shape:
            raise corrupted(array_file, f"holds {name!r} of shape {declared[name][1]}, but model.json describes "
                                        f"{N} cells, {G} genes, {K} factors and {C} covariate columns, so {shape}")
    return {**record, "arrays": declared}


def read_arrays(directory: Path, record: dict) -> dict[str, np.ndarray]:
    """arrays.npz, verified against ``record`` (from :func:`array_record`) before any array is read: the file's
    size and sha256, the zip's members, each member's size and ``.npy`` header; then no NaN / Inf in floats."""
    array_file = directory / ARRAY_FILE
    with open(array_file, "rb") as fh:
        size, digest = _digest(fh)
        if size != record["bytes"]:
            raise corrupted(array_file, f"has {size} bytes, but model.json records {record['bytes']} (truncated, "
                                        "or written by another save)")
        if digest != record["sha256"]:
            raise corrupted(array_file, "does not match the sha256 checksum in model.json (altered, or written by "
                                        "another save)")
        fh.seek(0)
        try:
            with zipfile.ZipFile(fh) as zf:
                members = {info.filename: info for info in zf.infolist()}
                wanted = {f"{name}.npy" for name in record["arrays"]}
                if set(members) != wanted or len(members) != len(zf.infolist()):
                    raise corrupted(array_file, f"holds the members {sorted(members)[:20]}, but model.json records "
                                                f"{sorted(wanted)[:20]}")
                arrays = {name: _read_member(zf, members[f"{name}.npy"], dtype, shape, array_file)
                          for name, (dtype, shape) in record["arrays"].items()}
        except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, OSError) as err:
            raise corrupted(array_file, f"cannot be read ({type(err).__name__}: {err})") from err
    bad = [k for k, a in arrays.items() if _invalid_values(k, a)]
    if bad:
        raise corrupted(array_file, f"holds NaN or infinite values in {bad}")
    return arrays


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, dtype: str, shape: tuple, array_file) -> np.ndarray:
    """One member: its stored size and header must be those model.json declares before its data are read."""
    where = f"{array_file} member {info.filename!r}"
    nbytes = np.dtype(dtype).itemsize * math.prod(shape)
    if not 0 < info.file_size - nbytes <= MAX_HEADER_BYTES:
        raise corrupted(where, f"unpacks to {info.file_size} bytes, but model.json declares a {dtype} array of shape "
                               f"{shape} ({nbytes} bytes and a header)")
    if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
        raise corrupted(where, "is compressed; pathfactor stores arrays uncompressed")
    with zf.open(info) as member:
        try:
            version = np.lib.format.read_magic(member)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                raise ValueError(f".npy format version {version} is not one numpy's savez writes for numbers")
            got_shape, _, got_dtype = read_header(member, max_header_size=MAX_HEADER_BYTES)
        except ValueError as err:
            raise corrupted(where, f"has no valid .npy header ({err})") from err
        if got_shape != shape or got_dtype != np.dtype(dtype) or member.tell() + nbytes != info.file_size:
            raise corrupted(where, f"holds a {got_dtype.str} array of shape {got_shape}, but model.json declares a "
                                   f"{dtype} array of shape {shape}")
    with zf.open(info) as member:  # now known to be what model.json declares
        return np.lib.format.read_array(member, allow_pickle=False, max_header_size=MAX_HEADER_BYTES)


# ---------------------------------------------------------------------------------------------------- extra state
def expect_shapes(arrays: dict[str, np.ndarray], shapes: dict[str, tuple]) -> None:
    """Raise ``ValueError`` unless each ``arrays[name]`` has shape ``shapes[name]`` (a missing one: ``KeyError``)."""
    for name, shape in shapes.items():
        if arrays[name].shape != tuple(shape):
            raise ValueError(f"array {name!r} has shape {arrays[name].shape}, but the model's metadata imply "
                             f"{tuple(shape)}")


def module_shapes(build) -> dict[str, tuple]:
    """The state-dict shapes of the torch module ``build()`` makes, built on torch's meta device: nothing is
    allocated, so parameters from a tampered model.json cannot make it huge."""
    import torch

    with torch.device("meta"):
        module = build()
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}
