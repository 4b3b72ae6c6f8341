"""The one training engine: epochs, early stopping on the objective, progress bar, device and seeds.

A model hands the engine an object with ``epoch() -> float`` (one pass over the data that returns the objective
to maximise, e.g. the ELBO); closed-form (CAVI) and gradient models alike. The engine decides when to stop.
"""
from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

__all__ = ["resolve_device", "seed_everything", "Trainable", "TrainResult", "train"]

log = logging.getLogger(__name__)


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` -> the first CUDA GPU if one is present, else the CPU; anything else as torch reads it."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
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


class Trainable(Protocol):
    def epoch(self) -> float:
        """Run one pass over the data and return the objective to maximise."""


@dataclass
class TrainResult:
    history: list[float] = field(default_factory=list)
    converged: bool = False
    n_epochs: int = 0


def train(task: Trainable, max_epochs: int = 200, tol: float = 1e-5, patience: int = 2,
          progress: bool = True, desc: str = "fit") -> TrainResult:
    """Call ``task.epoch()`` until the relative change of the objective stays below ``tol`` for ``patience``
    epochs in a row, or ``max_epochs`` is reached. A NaN or infinite objective stops with a ``FloatingPointError``."""
    if max_epochs < 1:
        raise ValueError(f"max_epochs must be at least 1, got {max_epochs}")
    result, calm = TrainResult(), 0
    bar = tqdm(range(max_epochs), desc=desc, disable=not progress, leave=False)
    for _ in bar:
        value = float(task.epoch())
        if not math.isfinite(value):
            bar.close()
            raise FloatingPointError(
                f"the objective became {value} at epoch {result.n_epochs + 1}; the data may hold extreme values "
                "(scale or log-transform them) or the model is mis-specified for them"
            )
        previous = result.history[-1] if result.history else None
        result.history.append(value)
        result.n_epochs += 1
        if previous is not None:
            change = abs(value - previous) / max(abs(previous), 1.0)
            calm = calm + 1 if change < tol else 0
            bar.set_postfix(objective=f"{value:.4g}", change=f"{change:.1e}")
            if calm >= patience:
                result.converged = True
                break
    bar.close()
    log.info("%s: %d epochs, objective %.6g, converged=%s", desc, result.n_epochs, result.history[-1], result.converged)
    return result
