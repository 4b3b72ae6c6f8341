"""Data-parallel Spex: two CPU processes (gloo) reach the one-process result; the pieces behind it."""
import os
import socket
import subprocess
import sys
import textwrap

import anndata as ad
import numpy as np
import pytest
import torch

import pathfactor as pf
from pathfactor.data.simulate import annotation_sets, noisy_annotations
from pathfactor.distributed import shard_bounds
from pathfactor.models._spex_vi import SpexVI

#: each process fits these (name, read backed?, Spex parameters, fit covariates) and saves the results
FITS = [
    ("memory", False, dict(n_sparse=1, n_dense=1), None),
    ("backed", True, dict(n_sparse=1, posterior="mean-field"), "batch"),
    ("blocked-covariates", False, dict(n_sparse=1), "batch"),
    ("minibatch", True, dict(n_sparse=1, batch_size=64), None),
]

WORKER = textwrap.dedent("""
    import sys
    import anndata as ad, numpy as np, torch
    torch.set_num_threads(1)
    import pathfactor as pf
    from pathfactor import distributed
    from pathfactor.data.simulate import annotation_sets
    from test_distributed import FITS, PARAMS
    comm = distributed.init()
    path, out = sys.argv[1], sys.argv[2]
    sets = annotation_sets(ad.read_h5ad(path))
    results = {}
    for name, backed, params, covariates in FITS:
        data = ad.read_h5ad(path, backed="r" if backed else None)
        m = pf.models.Spex(**{**PARAMS, **params}).fit(data, annotations=sets, covariates=covariates, seed=2)
        results.update({f"{name}/W": m.loadings_.to_numpy(), f"{name}/X": m.factor_scores_.to_numpy(),
                        f"{name}/elbo": np.array(m.history_), f"{name}/r2": m.relevance_.to_numpy()})
    np.savez(f"{out}-{comm.rank}-of-{comm.size}.npz", **results)
    distributed.shutdown()  # barrier, then destroy the group: no gloo thread left to abort the exit
""")

PARAMS = dict(min_set_size=3, dtype="float64", max_epochs=25, tol=0.0, progress=False)


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def sim_path(tmp_path_factory):
    sim = noisy_annotations(n_cells=201, n_genes=100, n_factors=3, noise=0.2, n_sparse=1, seed=6)  # odd: uneven shards
    sim.obs["batch"] = np.where(np.arange(201) % 3 == 0, "a", "b")
    path = tmp_path_factory.mktemp("dist") / "sim.h5ad"
    sim.write_h5ad(path)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_shards_cover_the_cells_once():
    for n in (1, 7, 10, 201):
        for size in (1, 2, 3):
            bounds = [shard_bounds(n, r, size) for r in range(size)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            sizes = [b - a for a, b in bounds]
            assert max(sizes) - min(sizes) <= 1


def test_two_processes_reach_the_one_process_result(sim_path, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port, out = _free_port(), tmp_path / "fit"
    env = dict(os.environ, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, str(script), str(sim_path), str(out)], env=dict(env, RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    try:
        logs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    ranks = [np.load(f"{out}-{r}-of-2.npz") for r in range(2)]

    sets = annotation_sets(ad.read_h5ad(sim_path))
    for name, backed, params, covariates in FITS:
        # every process returns the same, whole model
        for key in ("W", "X", "elbo", "r2"):
            np.testing.assert_array_equal(ranks[0][f"{name}/{key}"], ranks[1][f"{name}/{key}"])
        assert ranks[0][f"{name}/X"].shape[0] == 201
        one = pf.models.Spex(**{**PARAMS, **params}).fit(ad.read_h5ad(sim_path), annotations=sets,
                                                         covariates=covariates, seed=2)
        if "batch_size" in params:
            # each process deals its own cells into batches, so the path differs from one process's; but memoized
            # VI's ELBO is exact (monotone) and both reach the full-batch optimum
            elbo = ranks[0][f"{name}/elbo"]
            assert np.isfinite(elbo).all() and np.diff(elbo).min() >= -1e-9 * abs(elbo[-1])
            assert abs(elbo[-1] - one.history_[-1]) <= 1e-5 * abs(one.history_[-1])
            W = one.loadings_.to_numpy()
            assert np.abs(ranks[0][f"{name}/W"] - W).max() <= 1e-2 * np.abs(W).max()
            continue
        for key, value in (("W", one.loadings_), ("X", one.factor_scores_), ("elbo", one.history_),
                           ("r2", one.relevance_)):
            got, want = ranks[0][f"{name}/{key}"], np.asarray(value, dtype=float)
            assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), (name, key)


def test_reduce_hook_with_one_process_changes_nothing():
    """SpexVI with an identity all-reduce (a group of one) is SpexVI without one."""
    sim = noisy_annotations(n_cells=120, n_genes=60, n_factors=2, seed=1)
    Y = torch.tensor(sim.X, dtype=torch.float64)
    Y = Y - Y.mean(0)
    Z = torch.zeros(120, 0, dtype=torch.float64)
    s = torch.ones(60, 3, dtype=torch.float64)
    X0 = torch.randn(120, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    plain = SpexVI(Y, Z, s, X0, tau=1.0)
    hooked = SpexVI(Y, Z, s, X0, tau=1.0, reduce=lambda stats: dict(stats))
    for _ in range(5):
        assert plain.epoch() == pytest.approx(hooked.epoch(), rel=1e-12)
    torch.testing.assert_close(plain.M, hooked.M)


