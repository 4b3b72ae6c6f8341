"""The one training engine: epochs, early stopping, the best state, progress bar, device, seeds, checkpoints.

A model hands the engine a :class:`Task`: ``epoch() -> float`` runs one pass over the data and returns the
objective to maximise (an ELBO, a log-likelihood, minus a loss); closed-form (CAVI) and gradient models alike.
The engine decides when to stop.

The state contract. ``Task.state_dict()`` holds everything an epoch changes -- tensors, arrays, numbers, torch
modules, optimisers, random generators, found by walking the task's attributes (the data, named in
``state_exclude``, are left out) -- and ``load_state_dict`` puts it back. The engine uses it for three things:
rolling back an epoch whose objective is not finite (a copy taken before the epoch), keeping the best epoch's
state (``keep_best``), and checkpoints.

Checkpoints (``checkpoint_dir``): every ``checkpoint_every`` epochs the task's state and the engine's own go to
``state-<hash>.npz`` (arrays) + ``state.json`` (everything else, the arrays file's sha256 and a fingerprint of
the fit). Each file is written to a temporary name, flushed and renamed, ``state.json`` last, so a crash leaves
the old or the new checkpoint whole -- never pickle. A later call with the same directory resumes only if the
fingerprint (model, parameters, data shape, hashes of the cell and gene names and of the per-gene sums,
pathfactor version) matches, and the file is intact and finite; anything else is a ``ValueError`` naming the
file and what differs.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import io
import json
import logging
import math
import os
import random
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

__all__ = ["resolve_device", "seed_everything", "keeps_global_random_state", "one_thread", "Task", "TrainResult",
           "train", "fingerprint", "save_state", "load_state", "ConvergenceWarning"]

log = logging.getLogger(__name__)


class ConvergenceWarning(UserWarning):
    """A fit stopped at ``max_epochs`` while its objective was still moving by more than ``tol``."""

#: checkpoint format (state.json's "format" and "format_version")
CHECKPOINT_FORMAT, CHECKPOINT_VERSION = "pathfactor-checkpoint", 2
#: largest state.json read back (the arrays live in the .npz)
MAX_CHECKPOINT_JSON = 64 * 2**20


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` -> the first CUDA GPU if one is present, else the CPU; anything else as torch reads it."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {device!r}; use 'auto', 'cpu' or 'cuda' (e.g. 'cuda:1')") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but no CUDA GPU is available; use device='cpu' or 'auto'")
    return dev


# ============================================================================ random state
def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, numpy and torch; return a torch generator for the model's own draws. Fits call it inside
    :func:`keeps_global_random_state`, so the caller's generators are put back afterwards."""
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    random.seed(int(seed))
    np.random.seed(int(seed) % 2**32)
    torch.manual_seed(int(seed))
    return torch.Generator().manual_seed(int(seed))


@contextlib.contextmanager
def _global_random_state_kept():
    python, numpy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_initialized() else []):
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy)


def keeps_global_random_state(method):
    """Decorate a model's ``fit`` / ``transform``: whatever it seeds or draws, the caller's Python, numpy and
    torch global generators are as they were when it returns (or raises)."""
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        with _global_random_state_kept():
            return method(*args, **kwargs)
    return wrapper


@contextlib.contextmanager
def one_thread(device: torch.device, enabled: bool = True):
    """Run many small tensor operations on one CPU thread (restoring the caller's setting after). An operation on
    a G-vector is too small to share between threads, and the fork/join of every one stalls when the cores are
    busy (measured on 2 shared cores: 12 ms for the log of 6635 numbers with 2 threads, 6 us with one)."""
    if device.type != "cpu" or not enabled:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


# ============================================================================ the state contract
_NUMBER = (int, float, bool, str, type(None), np.integer, np.floating, np.bool_)


def _walk(obj, prefix: str, exclude: frozenset, seen: set):
    """(name, owner, attribute, value) for every piece of state reachable from ``obj``'s attributes: tensors,
    arrays, numbers, lists of numbers, generators, torch modules, optimisers, and (recursively) pathfactor's own
    helper objects such as the priors."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    for attr, value in vars(obj).items():
        name = f"{prefix}{attr}"
        if name in exclude or attr.startswith("__") or isinstance(value, type):
            continue
        if isinstance(value, (torch.Tensor, np.ndarray, torch.Generator, torch.nn.Module, torch.optim.Optimizer,
                              *_NUMBER)):
            yield name, obj, attr, value
        elif isinstance(value, (list, tuple)) and all(isinstance(v, _NUMBER) for v in value):
            yield name, obj, attr, value
        elif hasattr(value, "__dict__") and type(value).__module__.startswith("pathfactor"):
            yield from _walk(value, f"{name}.", exclude, seen)


def _copied(value, copy_tensors: bool):
    if isinstance(value, torch.Tensor):
        return value.detach().clone() if copy_tensors else value
    if isinstance(value, np.ndarray):
        return value.copy() if copy_tensors else value
    if isinstance(value, torch.Generator):
        return value.get_state()
    if isinstance(value, torch.nn.Module):
        return {k: v.detach().clone() for k, v in value.state_dict().items()}
    if isinstance(value, torch.optim.Optimizer):
        return copy.deepcopy(value.state_dict())
    if isinstance(value, (list, tuple)):
        return list(value)
    return value


class Task:
    """Base of every training task: ``epoch()`` and the state contract.

    Subclasses name their data (attributes that no epoch changes) in ``state_exclude``; everything else the
    walk finds is state. ``rebinds_state = True`` promises that epochs only rebind attributes to new tensors and
    never write into them in place (true of the closed-form tasks), so a rollback copy may hold references
    (free) instead of copies of large posterior covariances. ``objective_scale``: how many observations the
    objective sums over when it is a log-likelihood or ELBO in nats (its changes are then compared per
    observation, which no change of the data's units alters); ``None`` for a loss, whose changes are relative.
    """

    state_exclude: tuple[str, ...] = ()
    rebinds_state: bool = False
    #: state tensors whose shape may change from epoch to epoch (restored at their saved shape)
    resizable_state: tuple[str, ...] = ()
    objective_scale: float | None = None

    def epoch(self) -> float:  # pragma: no cover - every task defines it
        raise NotImplementedError

    def _state_items(self):
        return list(_walk(self, "", frozenset(self.state_exclude), set()))

    def state_dict(self, copy: bool = True) -> dict:
        """``{name: value}`` of the task's state; modules, optimisers and generators always as copies, tensors and
        arrays as copies unless ``copy=False`` (references: valid only while nothing writes into them)."""
        return {name: _copied(value, copy) for name, _, _, value in self._state_items()}

    def load_state_dict(self, state: dict) -> None:
        """Put back a state from :meth:`state_dict` (or a checkpoint). Parameters that an optimiser holds are
        written in place (the optimiser keeps working on them); other tensors are replaced, in the live tensor's
        memory layout (so later sums run in the same order and a resumed fit is bit-identical)."""
        items = self._state_items()
        names = {name for name, *_ in items}
        if names != set(state):
            differ = sorted(names ^ set(state))
            raise ValueError(f"the state belongs to a different task ({', '.join(differ[:5])} differ)")
        for name, owner, attr, live in items:
            saved = state[name]
            if isinstance(live, torch.Generator):
                live.set_state(torch.as_tensor(saved, dtype=torch.uint8))
            elif isinstance(live, (torch.nn.Module, torch.optim.Optimizer)):
                live.load_state_dict(copy.deepcopy(saved))
            elif isinstance(live, torch.Tensor) and isinstance(saved, (torch.Tensor, np.ndarray)):
                saved = torch.as_tensor(saved)
                if name in self.resizable_state and tuple(saved.shape) != tuple(live.shape):
                    setattr(owner, attr, saved.to(dtype=live.dtype, device=live.device).clone())
                    continue
                if tuple(saved.shape) != tuple(live.shape):
                    raise ValueError(f"the state belongs to a different task ({name} has shape "
                                     f"{tuple(saved.shape)}, not {tuple(live.shape)})")
                if live.requires_grad:
                    with torch.no_grad():
                        live.copy_(saved)
                else:
                    restored = torch.empty_strided(live.shape, live.stride(), dtype=live.dtype, device=live.device)
                    restored.copy_(saved)
                    setattr(owner, attr, restored)
            elif isinstance(saved, torch.Tensor):
                setattr(owner, attr, saved.clone())
            elif isinstance(saved, np.ndarray):
                setattr(owner, attr, saved.copy())
            elif isinstance(live, tuple):
                setattr(owner, attr, tuple(saved))
            else:
                setattr(owner, attr, list(saved) if isinstance(saved, list) else saved)


@dataclass
class TrainResult:
    history: list[float] = field(default_factory=list)
    converged: bool = False
    n_epochs: int = 0
    #: with ``keep_best``: the 1-based epoch whose state the task holds at the end (0: none tracked)
    best_epoch: int = 0


# ============================================================================ checkpoints
def fingerprint(model, *, n_cells: int, n_genes: int, obs_names, var_names, gene_sums, **extra) -> dict:
    """What a checkpoint belongs to: the model class and parameters, the data's shape, hashes of the cell and
    gene names and of the per-gene sums (rounded to float32), the pathfactor version, and ``extra`` (e.g. the
    seed, the factor names, the covariate columns), as JSON-able values."""
    from . import __version__

    def digest(values) -> str:
        return hashlib.sha256("\x1f".join(map(str, values)).encode()).hexdigest()[:16]

    sums = np.ascontiguousarray(np.asarray(gene_sums, dtype=np.float64).astype(np.float32))
    return {"model": type(model).__name__, "params": json.loads(json.dumps(model.get_params(), default=str)),
            "shape": [int(n_cells), int(n_genes)], "cells": digest(obs_names), "genes": digest(var_names),
            "gene_sums": hashlib.sha256(sums.tobytes()).hexdigest()[:16], "pathfactor": __version__,
            **json.loads(json.dumps(extra, default=str))}


def _encode(value, arrays: dict, path: str):
    """A JSON skeleton of ``value`` whose tensors and arrays are moved into ``arrays``."""
    if isinstance(value, torch.Tensor):
        arrays[path] = value.detach().cpu().numpy()
        return {"tensor": path}
    if isinstance(value, np.ndarray):
        arrays[path] = value
        return {"array": path}
    if isinstance(value, dict):
        return {"dict": [[k, _encode(v, arrays, f"{path}/{i}")] for i, (k, v) in enumerate(value.items())]}
    if isinstance(value, (list, tuple)):
        kind = "list" if isinstance(value, list) else "tuple"
        return {kind: [_encode(v, arrays, f"{path}/{i}") for i, v in enumerate(value)]}
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return {"float": repr(value)}
    return {"value": value}


def _decode(node, arrays: dict):
    (kind, body), = node.items()
    if kind == "tensor":
        return torch.from_numpy(arrays[body])
    if kind == "array":
        return arrays[body]
    if kind == "dict":
        return {k: _decode(v, arrays) for k, v in body}
    if kind in ("list", "tuple"):
        items = [_decode(v, arrays) for v in body]
        return items if kind == "list" else tuple(items)
    if kind == "float":
        return float(body)
    return body


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_state(task: Task, path, extra: dict | None = None, fingerprint: dict | None = None) -> None:
    """Write the task's state (and the engine's numbers ``extra``) to the checkpoint directory ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    skeleton = {name: _encode(value, arrays, f"s{i}") for i, (name, value) in enumerate(task.state_dict(copy=False).items())}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    blob = buffer.getvalue()
    sha = hashlib.sha256(blob).hexdigest()
    array_file = f"state-{sha[:16]}.npz"
    _write_atomic(path / array_file, blob)
    meta = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, "fingerprint": fingerprint or {},
            "arrays": array_file, "sha256": sha, "bytes": len(blob), "state": skeleton,
            "engine": _encode(dict(extra or {}), {}, "e")}
    _write_atomic(path / "state.json", json.dumps(meta).encode())
    for old in path.glob("state-*.npz"):  # the previous checkpoint's arrays, now that state.json moved on
        if old.name != array_file:
            old.unlink(missing_ok=True)


def _refuse(where, what: str) -> ValueError:
    return ValueError(f"checkpoint {where} {what}; delete it or use another checkpoint directory")


def _read_checkpoint(path: Path, expected: dict | None) -> tuple[dict, dict]:
    """state.json checked (format, fingerprint) and its arrays (size, sha256, finite) -> (meta, arrays)."""
    meta_file = path / "state.json"
    if meta_file.stat().st_size > MAX_CHECKPOINT_JSON:
        raise _refuse(meta_file, "is larger than any checkpoint pathfactor writes")
    try:
        meta = json.loads(meta_file.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise _refuse(meta_file, f"is not valid JSON ({type(err).__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise _refuse(meta_file, "is not a pathfactor checkpoint")
    if meta.get("format_version") != CHECKPOINT_VERSION:
        raise _refuse(meta_file, f"has format version {meta.get('format_version')!r}, this pathfactor reads "
                                 f"{CHECKPOINT_VERSION}")
    saved = meta.get("fingerprint")
    if expected is not None and saved != json.loads(json.dumps(expected)):
        saved = saved if isinstance(saved, dict) else {}
        differ = [k for k in sorted(set(saved) | set(expected)) if saved.get(k) != expected.get(k)]
        def pair(k):
            there, now = repr(saved.get(k)), repr(expected.get(k))
            return f"{k}: {there} there, {now} now" if len(there) + len(now) < 120 else f"{k} differ"
        detail = "; ".join(pair(k) for k in differ[:3])
        raise _refuse(path, f"belongs to a different fit ({detail})")
    name = meta.get("arrays")
    if not isinstance(name, str) or "/" in name or not name.startswith("state-"):
        raise _refuse(meta_file, "names no arrays file")
    array_file = path / name
    if not array_file.is_file():
        raise _refuse(array_file, "is missing")
    if array_file.stat().st_size != meta.get("bytes"):
        raise _refuse(array_file, f"has {array_file.stat().st_size} bytes, not the {meta.get('bytes')} written "
                                  "(truncated?)")
    blob = array_file.read_bytes()
    if hashlib.sha256(blob).hexdigest() != meta.get("sha256"):
        raise _refuse(array_file, "does not match its checksum (corrupted)")
    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as err:
        raise _refuse(array_file, f"cannot be read ({type(err).__name__})") from None
    bad = [k for k, a in arrays.items() if a.dtype.kind == "f" and not np.isfinite(a).all()]
    if bad:
        raise _refuse(array_file, "holds NaN or infinite values")
    return meta, arrays


def load_state(task: Task, path, fingerprint: dict | None = None) -> dict | None:
    """Restore a checkpoint written by :func:`save_state` into ``task``; returns the engine's saved numbers, or
    None if ``path`` holds no checkpoint. ``fingerprint``: what the checkpoint must belong to."""
    path = Path(path)
    if not (path / "state.json").is_file():
        return None
    meta, arrays = _read_checkpoint(path, fingerprint)
    try:
        state = {name: _decode(node, arrays) for name, node in meta["state"].items()}
        engine = _decode(meta["engine"], {})
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise _refuse(path / "state.json", f"is malformed ({type(err).__name__}: {err})") from None
    try:
        task.load_state_dict(state)
    except ValueError as err:
        raise _refuse(path, str(err).replace("the state ", "")) from None
    except (KeyError, TypeError, RuntimeError) as err:
        raise _refuse(path, f"does not fit this task ({type(err).__name__}: {err})") from None
    return engine


# ============================================================================ the loop
def train(task: Task, max_epochs: int = 200, tol: float = 1e-5, patience: int = 2, progress: bool = True,
          desc: str = "fit", checkpoint_dir=None, checkpoint_every: int = 5, fingerprint: dict | None = None,
          warmup: int = 0, keep_best: bool = False) -> TrainResult:
    """Call ``task.epoch()`` until the objective stops changing or ``max_epochs`` is reached.

    Convergence: the change of the objective is below ``tol`` for ``patience`` epochs in a row, the change
    measured per observation (``task.objective_scale``) for likelihoods, relative to the objective for losses --
    both independent of the data's units. ``warmup``: the first epochs never count (e.g. a KL warm-up).
    ``keep_best``: stop when the best objective has not improved by ``tol`` for ``patience`` epochs, and end with
    the task in its best epoch's state (``best_epoch``).

    A run that reaches ``max_epochs`` without converging (and ``tol > 0``) warns with a :class:`ConvergenceWarning`.
    A NaN or infinite objective stops with a ``FloatingPointError`` after putting the task back to its state
    before that epoch (the last good one; also written to ``checkpoint_dir`` when given, so a fit can resume from
    it); the error carries ``history`` and ``epoch``. With ``checkpoint_dir``, resume from a checkpoint there
    (refused unless it carries this ``fingerprint``) and save one every ``checkpoint_every`` epochs.
    """
    if max_epochs < 1:
        raise ValueError(f"max_epochs must be at least 1, got {max_epochs}")
    loop = _Loop(task, tol, patience, warmup, keep_best, checkpoint_dir, checkpoint_every, fingerprint)
    if checkpoint_dir is not None:
        loop.resume()
    with _flush_denormal():
        return loop.run(max_epochs, progress, desc)


@contextlib.contextmanager
def _flush_denormal():
    """Treat subnormal floats as zero while training. Shrinkage priors drive many posterior variances towards
    1e-38 and below, and arithmetic on subnormals is 10-100x slower on CPUs (a fit slowed from 2 s to 16 s an
    epoch); their values are far below any tolerance. torch has no getter, so the default (off) is restored."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


class _Loop:
    """The engine's own state: history, the count of calm epochs, the best objective and its state."""

    def __init__(self, task, tol, patience, warmup, keep_best, checkpoint_dir, checkpoint_every, fingerprint):
        self.task, self.tol, self.patience, self.warmup, self.keep_best = task, tol, patience, warmup, keep_best
        self.checkpoint_dir, self.checkpoint_every, self.fingerprint = checkpoint_dir, checkpoint_every, fingerprint
        self.result, self.calm = TrainResult(), 0
        self.best, self.best_state = -math.inf, None

    def numbers(self) -> dict:
        return {"history": self.result.history, "calm": self.calm, "best": self.best,
                "best_epoch": self.result.best_epoch}

    def save(self) -> None:
        save_state(self.task, self.checkpoint_dir, self.numbers(), self.fingerprint)

    def resume(self) -> None:
        saved = load_state(self.task, self.checkpoint_dir, self.fingerprint)
        if saved is None:
            return
        try:
            self.result.history = [float(v) for v in saved["history"]]
            self.calm, self.best = int(saved["calm"]), float(saved["best"])
            self.result.best_epoch = int(saved["best_epoch"])
        except (KeyError, TypeError, ValueError) as err:
            raise _refuse(Path(self.checkpoint_dir) / "state.json", f"lacks the engine's numbers ({err})") from None
        if not all(math.isfinite(v) for v in self.result.history):
            raise _refuse(Path(self.checkpoint_dir) / "state.json", "holds a non-finite objective")
        self.result.n_epochs = len(self.result.history)
        if self.keep_best and self.result.best_epoch:  # the checkpoint holds the latest state, not the best
            self.best_state = None
            log.warning("resumed a keep-best fit: the best state before epoch %d is not in the checkpoint; the "
                        "fit keeps the best of the epochs from here on", self.result.n_epochs)
            self.best, self.result.best_epoch = -math.inf, 0
        log.info("resumed from %s at epoch %d", self.checkpoint_dir, self.result.n_epochs)

    def change(self, value: float, previous: float) -> float:
        """|value - previous| per observation (likelihoods) or relative to |previous| (losses)."""
        scale = self.task.objective_scale if getattr(self.task, "objective_scale", None) else abs(previous)
        diff = abs(value - previous)
        return diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)

    def run(self, max_epochs: int, progress: bool, desc: str) -> TrainResult:
        task, result = self.task, self.result
        bar = tqdm(range(result.n_epochs, max_epochs), desc=desc, disable=not progress, leave=False)
        done = result.n_epochs > 0 and self.calm >= self.patience
        for _ in ([] if done else bar):
            before = task.state_dict(copy=not getattr(task, "rebinds_state", False))
            value = float(task.epoch())
            if not math.isfinite(value):
                bar.close()
                self.roll_back(before, value)
            result.history.append(value)
            result.n_epochs += 1
            if result.n_epochs > self.warmup:
                self.step(value)
                bar.set_postfix(objective=f"{value:.4g}")
            if self.checkpoint_dir is not None and (result.n_epochs % self.checkpoint_every == 0
                                                    or self.calm >= self.patience):
                self.save()
            if self.calm >= self.patience:
                break
        bar.close()
        result.converged = self.calm >= self.patience
        if self.keep_best and self.best_state is not None:
            task.load_state_dict(self.best_state)
        log.info("%s: %d epochs, objective %.6g, converged=%s", desc, result.n_epochs, result.history[-1],
                 result.converged)
        if not result.converged and self.tol > 0 and result.n_epochs > self.warmup:
            how = "per observation" if getattr(task, "objective_scale", None) else "relative"
            warnings.warn(f"{desc} did not converge in {result.n_epochs} epochs (the objective's {how} change stayed "
                          f"above tol={self.tol:g}); raise max_epochs", ConvergenceWarning, stacklevel=3)
        return result

    def step(self, value: float) -> None:
        """Count calm epochs: plain (the objective barely moved) or keep-best (the best barely improved)."""
        if self.keep_best:
            improved = value > self.best and (self.best == -math.inf or self.change(value, self.best) >= self.tol)
            if value > self.best:
                self.best, self.result.best_epoch = value, self.result.n_epochs
                self.best_state = self.task.state_dict()
            self.calm = 0 if improved else self.calm + 1
            return
        history = self.result.history
        if len(history) - 1 > self.warmup:
            self.calm = self.calm + 1 if self.change(value, history[-2]) < self.tol else 0

    def roll_back(self, before: dict, value: float) -> None:
        self.task.load_state_dict(before)
        n = self.result.n_epochs
        where = ""
        if self.checkpoint_dir is not None:
            self.save()
            where = f"; that state is saved in {self.checkpoint_dir}"
        err = FloatingPointError(
            f"the objective became {value} at epoch {n + 1}; the fit keeps its state of epoch {n} (the last finite "
            f"objective){where}. The data may hold extreme values (scale or log-transform them) or the model is "
            "mis-specified for them")
        err.history, err.epoch = list(self.result.history), n
        raise err
