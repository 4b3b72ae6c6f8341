"""Process groups for data-parallel fits on ``torch.distributed``: each process holds a contiguous shard of the cells.

Spex's updates read the data only through sums over cells (the sufficient statistics ``E[F]^T Y``, ``E[F^T F]``,
``sum_n y_ng^2``, ``sum_n |mu_n|^2``; seed 002, see ``models._spex_vi``). So each process computes its own cells'
factors and their statistics, one ``all_reduce(SUM)`` adds them up, and every process then makes the same global
update: with full batches the fit is exact coordinate ascent, and P processes reach the result of one.

From Python, open a :func:`session` (or call :func:`init`, and :func:`shutdown` when done) in each process, then
``Spex().fit(adata, ...)`` as usual: a fit run inside an initialised process group of more than one process takes
its shard of the cells (``Communicator.shard``) and returns the whole model in every process::

    with pathfactor.distributed.session():
        model = Spex().fit(adata, annotations=sets)

A process group left to the interpreter's exit can abort the process ("terminate called without an active
exception": a communication thread still running while C++ tears the group down), so :func:`init` also registers
:func:`shutdown` to run at exit. The command-line entry under torchrun is :mod:`pathfactor.distributed`.
"""
from __future__ import annotations

import atexit
import logging
import os
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["Communicator", "init", "shutdown", "session", "current", "shard_bounds"]

log = logging.getLogger(__name__)


def shard_bounds(n: int, rank: int, size: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of process ``rank`` of ``size`` over ``n`` cells: contiguous, sizes differ by at
    most one (as ``numpy.array_split``)."""
    base, extra = divmod(int(n), int(size))
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class Communicator:
    """The collectives a data-parallel fit needs, over the default process group."""

    def __init__(self, rank: int, size: int, device: torch.device):
        self.rank, self.size, self.device = int(rank), int(size), torch.device(device)

    def shard(self, n: int) -> tuple[int, int]:
        """This process's rows of ``n`` cells."""
        return shard_bounds(n, self.rank, self.size)

    def reduce(self, stats: dict) -> dict:
        """Sum every entry of ``stats`` (tensors or numbers) over the processes, with one ``all_reduce`` of one
        float64 buffer; returns a dict of the same shapes, dtypes and devices (numbers come back as floats)."""
        flat = [torch.as_tensor(v, dtype=torch.float64).reshape(-1).to(self.device) for v in stats.values()]
        buffer = torch.cat(flat)
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
        out, start = {}, 0
        for (key, value), part in zip(stats.items(), flat):
            piece = buffer[start:start + part.numel()]
            start += part.numel()
            if isinstance(value, torch.Tensor):
                out[key] = piece.reshape(value.shape).to(device=value.device, dtype=value.dtype)
            else:
                out[key] = float(piece.item())
        return out

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every process's rows of ``x`` in rank order (shards may differ in length)."""
        n = torch.tensor([x.shape[0]], dtype=torch.int64, device=self.device)
        sizes = [torch.zeros_like(n) for _ in range(self.size)]
        dist.all_gather(sizes, n)
        top = int(max(int(s) for s in sizes))
        padded = torch.zeros((top, *x.shape[1:]), dtype=x.dtype, device=self.device)
        padded[: x.shape[0]] = x.to(self.device)
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded)
        return torch.cat([p[: int(s)] for p, s in zip(parts, sizes)]).to(x.device)


def current() -> Communicator | None:
    """The communicator of the initialised process group, or ``None`` when there is none or it has one process
    (then a fit runs as usual)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    return Communicator(dist.get_rank(), dist.get_world_size(), device)


def init(backend: str | None = None, timeout_s: float = 1800.0) -> Communicator | None:
    """Join the process group described by ``torchrun``'s environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT``, ``LOCAL_RANK``). ``backend``: ``"gloo"`` (CPU) or ``"nccl"`` (one GPU per process, chosen by
    ``LOCAL_RANK``); default nccl when CUDA is available, else gloo. Returns :func:`current` (``None`` for a
    single process, e.g. when run without torchrun)."""
    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        if "WORLD_SIZE" not in os.environ:
            return None
        raise ValueError(f"environment variables {missing} are not set; launch with torchrun "
                         "(e.g. torchrun --nproc_per_node 2 ...) or set RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT")
    if int(os.environ["WORLD_SIZE"]) == 1:
        return None
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be 'gloo' (CPU) or 'nccl' (GPU), got {backend!r}")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        _register_exit_hook()
        log.info("process %d of %d joined (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return current()


_EXIT_HOOK = False


def _register_exit_hook() -> None:
    global _EXIT_HOOK
    if not _EXIT_HOOK:
        atexit.register(shutdown, wait=False)
        _EXIT_HOOK = True


def shutdown(wait: bool = True) -> None:
    """Leave the process group: with ``wait``, first wait (a barrier) until every process has got here, then
    destroy the group, so that none of its communication threads is still running when the interpreter exits.
    Does nothing without an initialised group, so it is safe to call twice; :func:`init` registers
    ``shutdown(wait=False)`` to run at exit (no barrier there: a peer that failed would never reach it)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if wait and dist.get_world_size() > 1:
        try:
            dist.barrier()
        except Exception as err:  # a peer that died: still take this process's side of the group down
            log.warning("barrier before leaving the process group failed (%s); leaving anyway", err)
    dist.destroy_process_group()


@contextmanager
def session(backend: str | None = None, timeout_s: float = 1800.0):
    """``with session() as comm:`` -- :func:`init` on entry (``comm`` is its result, ``None`` for one process) and
    :func:`shutdown` on exit (after an exception without the barrier, which the other processes may never reach).
    A group that was initialised before the ``with`` is left alone: its owner ends it."""
    owned = not (dist.is_available() and dist.is_initialized())
    comm = init(backend, timeout_s)
    try:
        yield comm
    except BaseException:
        if owned:
            shutdown(wait=False)
        raise
    if owned:
        shutdown()


