"""Data-parallel fits from the shell: ``pathfactor fit`` with the cells shared among ``torch.distributed`` processes.

Launch one process per device with ``torchrun`` (gloo on CPUs, nccl on GPUs)::

    torchrun --nproc_per_node 2 -m pathfactor.distributed fit data.h5ad --gene-sets hallmark --out result.h5ad

(the arguments of ``pathfactor fit``; process 0 writes the outputs). From Python: ``with
pathfactor.distributed.session(): model.fit(...)`` in each process; the process-group helpers live in
:mod:`pathfactor.parallel` (re-exported here), which the models use without depending on the CLI.
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile

from .parallel import Communicator, current, init, session, shard_bounds, shutdown  # noqa: F401 (re-exported)

__all__ = ["Communicator", "init", "shutdown", "session", "current", "shard_bounds", "main"]


def main(argv=None) -> int:
    """``python -m pathfactor.distributed fit ...`` under torchrun: ``pathfactor fit`` with the cells shared among
    the processes; process 0 writes ``--out``, ``--report`` and ``--save-model`` and prints, the others write
    nowhere."""
    from . import cli

    argv = list(sys.argv[1:] if argv is None else argv)
    with session() as comm:
        return _main(cli, comm, argv)


def _main(cli, comm, argv) -> int:
    if comm is None or comm.rank == 0:
        return cli.main(argv)
    try:
        args = cli.build_parser().parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 1
    logging.getLogger("pathfactor").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp, open(os.devnull, "w") as null:
        args.out = os.path.join(tmp, "out.h5ad")
        args.report = args.save_model = args.color_by = None
        args.quiet = True
        stdout, sys.stdout = sys.stdout, null
        try:
            return int(args.func(args) or 0)
        except cli.INPUT_ERRORS as err:
            print(f"{cli.PROG}: error (process {comm.rank}): {' '.join(str(err).split())}", file=sys.stderr)
            return cli.EXIT_BAD_INPUT
        finally:
            sys.stdout = stdout


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
