"""The one training engine: epochs, early stopping on the objective, progress bar, device, seeds, checkpoints.

A model hands the engine an object with ``epoch() -> float`` (one pass over the data that returns the objective
to maximise, e.g. the ELBO); closed-form (CAVI) and gradient models alike. The engine decides when to stop.

Checkpoints: with ``checkpoint_dir`` the engine saves the task's whole state (every tensor, array and number it
holds, found by walking its attributes; the data tensors named in ``task.checkpoint_exclude`` are left out) and
its own (objective history, epoch, random generators) every ``checkpoint_every`` epochs, atomically (write, then
rename), as ``state.npz`` (arrays) + ``state.json`` (numbers) — never pickle. A later call with the same directory
and a task built the same way resumes from there and ends where an uninterrupted run would.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

__all__ = ["resolve_device", "seed_everything", "one_thread", "Trainable", "TrainResult", "train", "save_state",
           "load_state"]

log = logging.getLogger(__name__)


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


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, numpy and torch; return a torch generator for the model's own draws."""
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    random.seed(int(seed))
    np.random.seed(int(seed) % 2**32)
    torch.manual_seed(int(seed))
    return torch.Generator().manual_seed(int(seed))


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


class Trainable(Protocol):
    def epoch(self) -> float:
        """Run one pass over the data and return the objective to maximise."""


@dataclass
class TrainResult:
    history: list[float] = field(default_factory=list)
    converged: bool = False
    n_epochs: int = 0


def _walk(obj, prefix: str, exclude: frozenset, seen: set):
    """(name, owner, attribute, value) for every tensor, array, number or generator reachable from ``obj``."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    for attr, value in vars(obj).items():
        name = f"{prefix}{attr}"
        if name in exclude or attr.startswith("__"):
            continue
        if isinstance(value, (torch.Tensor, np.ndarray, torch.Generator)) or (
                isinstance(value, (int, float, bool)) and not isinstance(value, type)):
            yield name, obj, attr, value
        elif hasattr(value, "__dict__") and not isinstance(value, (type, torch.nn.Module)) and \
                type(value).__module__.startswith("pathfactor"):
            yield from _walk(value, f"{name}.", exclude, seen)


def save_state(task, path, extra: dict | None = None) -> None:
    """Write the task's state to ``path/state.npz`` + ``path/state.json`` atomically."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    arrays, numbers = {}, dict(extra or {})
    for name, _, _, value in _walk(task, "", frozenset(getattr(task, "checkpoint_exclude", ())), set()):
        if isinstance(value, torch.Generator):
            arrays[f"generator:{name}"] = value.get_state().numpy()
        elif isinstance(value, torch.Tensor):
            arrays[f"tensor:{name}"] = value.detach().cpu().numpy()
        elif isinstance(value, np.ndarray):
            arrays[f"array:{name}"] = value
        else:
            numbers[name] = value
    tmp_npz, tmp_json = path / "state.npz.tmp", path / "state.json.tmp"
    with open(tmp_npz, "wb") as fh:
        np.savez(fh, **arrays)
    tmp_json.write_text(json.dumps(numbers))
    os.replace(tmp_npz, path / "state.npz")  # arrays first: a state.json always has its arrays beside it
    os.replace(tmp_json, path / "state.json")


def load_state(task, path) -> dict | None:
    """Restore a state written by :func:`save_state` into ``task``; returns the saved numbers, or None if
    ``path`` holds no checkpoint."""
    path = Path(path)
    if not (path / "state.json").is_file():
        return None
    numbers = json.loads((path / "state.json").read_text())
    with np.load(path / "state.npz", allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    current = list(_walk(task, "", frozenset(getattr(task, "checkpoint_exclude", ())), set()))
    for name, _, _, value in current:
        key = f"tensor:{name}" if isinstance(value, torch.Tensor) else f"array:{name}"
        if isinstance(value, (torch.Tensor, np.ndarray)) and (key not in arrays or arrays[key].shape != tuple(value.shape)):
            raise ValueError(f"the checkpoint in {path} belongs to a different fit ({name} differs); "
                             "use another checkpoint directory or delete this one")
    for name, owner, attr, value in current:
        if isinstance(value, torch.Generator):
            value.set_state(torch.from_numpy(arrays[f"generator:{name}"]))
        elif isinstance(value, torch.Tensor):  # same memory layout as the live tensor, so sums run in the same order
            restored = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=value.device)
            restored.copy_(torch.from_numpy(arrays[f"tensor:{name}"]))
            setattr(owner, attr, restored)
        elif isinstance(value, np.ndarray):
            setattr(owner, attr, arrays[f"array:{name}"])
        elif name in numbers:
            setattr(owner, attr, numbers[name])
    return numbers


class _LastGood:
    """The task's state before an epoch, to put back if that epoch's objective is not finite. Tensors are held
    by reference (the tasks' updates rebind attributes to new tensors rather than write into them); torch
    modules, which optimisers change in place, are copied."""

    def __init__(self, task):
        exclude = frozenset(getattr(task, "checkpoint_exclude", ()))
        self.values = [(owner, attr, value) for _, owner, attr, value in _walk(task, "", exclude, set())
                       if not isinstance(value, torch.Generator)]
        self.modules = {attr: {k: v.detach().clone() for k, v in value.state_dict().items()}
                        for attr, value in vars(task).items() if isinstance(value, torch.nn.Module)}

    def restore(self, task) -> None:
        for owner, attr, value in self.values:
            setattr(owner, attr, value)
        for attr, state in self.modules.items():
            getattr(task, attr).load_state_dict(state)


def train(task: Trainable, max_epochs: int = 200, tol: float = 1e-5, patience: int = 2,
          progress: bool = True, desc: str = "fit", checkpoint_dir=None, checkpoint_every: int = 5) -> TrainResult:
    """Call ``task.epoch()`` until the relative change of the objective stays below ``tol`` for ``patience``
    epochs in a row, or ``max_epochs`` is reached. A NaN or infinite objective stops with a ``FloatingPointError``
    after putting the task back to its state before that epoch (the last good one; also written to
    ``checkpoint_dir`` when given, so a fit can resume from it); the error carries ``history`` and ``epoch``.
    With ``checkpoint_dir``, resume from a checkpoint there and save one every ``checkpoint_every`` epochs."""
    if max_epochs < 1:
        raise ValueError(f"max_epochs must be at least 1, got {max_epochs}")
    result, calm = TrainResult(), 0
    if checkpoint_dir is not None:
        saved = load_state(task, checkpoint_dir)
        if saved is not None:
            result.history, calm = list(saved["_history"]), int(saved["_calm"])
            result.n_epochs = len(result.history)
            log.info("%s: resumed from %s at epoch %d", desc, checkpoint_dir, result.n_epochs)
    with _flush_denormal():
        return _epochs(task, result, calm, max_epochs, tol, patience, progress, desc, checkpoint_dir,
                       checkpoint_every)


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


def _epochs(task, result: TrainResult, calm: int, max_epochs: int, tol: float, patience: int, progress: bool,
            desc: str, checkpoint_dir, checkpoint_every: int) -> TrainResult:
    bar = tqdm(range(result.n_epochs, max_epochs), desc=desc, disable=not progress, leave=False)
    done = result.n_epochs > 0 and calm >= patience
    for _ in ([] if done else bar):
        last_good = _LastGood(task)
        value = float(task.epoch())
        if not math.isfinite(value):
            bar.close()
            last_good.restore(task)
            where = ""
            if checkpoint_dir is not None:
                save_state(task, checkpoint_dir, {"_history": result.history, "_calm": calm})
                where = f"; that state is saved in {checkpoint_dir}"
            err = FloatingPointError(
                f"the objective became {value} at epoch {result.n_epochs + 1}; the fit keeps its state of epoch "
                f"{result.n_epochs} (the last finite objective){where}. The data may hold extreme values (scale "
                "or log-transform them) or the model is mis-specified for them"
            )
            err.history, err.epoch = list(result.history), result.n_epochs
            raise err
        previous = result.history[-1] if result.history else None
        result.history.append(value)
        result.n_epochs += 1
        if previous is not None:
            change = abs(value - previous) / max(abs(previous), 1.0)
            calm = calm + 1 if change < tol else 0
            bar.set_postfix(objective=f"{value:.4g}", change=f"{change:.1e}")
        if checkpoint_dir is not None and (result.n_epochs % checkpoint_every == 0 or calm >= patience):
            save_state(task, checkpoint_dir, {"_history": result.history, "_calm": calm})
        if calm >= patience:
            break
    result.converged = calm >= patience
    bar.close()
    log.info("%s: %d epochs, objective %.6g, converged=%s", desc, result.n_epochs, result.history[-1], result.converged)
    return result
