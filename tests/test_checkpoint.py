"""Checkpoint and resume: a fit killed mid-way and resumed ends where an uninterrupted one does."""
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

import pathfactor as pf
from pathfactor.data.simulate import noisy_annotations

SCRIPT = """
import sys, time, torch
import pathfactor as pf
from pathfactor.data.simulate import annotation_sets, noisy_annotations
from pathfactor.models import _spex_vi
torch.set_num_threads(1)
sim = noisy_annotations(n_cells=200, n_genes=150, n_factors=4, noise=0.2, n_sparse=1, seed=2)
slow = _spex_vi.SpexVI.epoch
def epoch(self):
    time.sleep(float(sys.argv[2]))
    return slow(self)
_spex_vi.SpexVI.epoch = epoch
m = pf.models.Spex(n_sparse=1, n_dense=1, min_set_size=5, tol=0.0, max_epochs=40, progress=False)
m.fit(sim, annotations=annotation_sets(sim), checkpoint_dir=sys.argv[1], seed=3)
m.save(sys.argv[1] + "-model")
"""


def _run(tmp_path, ckpt, pause):
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(ckpt), str(pause)], cwd=tmp_path)


def test_killed_fit_resumes_to_the_uninterrupted_result(tmp_path):
    whole = tmp_path / "whole"
    assert _run(tmp_path, whole, 0).wait(timeout=300) == 0
    broken = tmp_path / "broken"
    proc = _run(tmp_path, broken, 0.15)
    deadline = time.time() + 120
    while not (broken / "state.json").exists() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    proc.kill()
    proc.wait()
    assert (broken / "state.json").exists() and not (tmp_path / "broken-model").exists(), "killed too late"
    assert _run(tmp_path, broken, 0).wait(timeout=300) == 0
    a, b = pf.load(tmp_path / "whole-model"), pf.load(tmp_path / "broken-model")
    assert len(b.history_) == len(a.history_) == 40
    # equal up to float32 rounding: two fits of the same data already differ in the last bits when torch's
    # vectorised CPU kernels meet differently aligned memory
    pd.testing.assert_frame_equal(a.loadings_, b.loadings_, check_exact=False, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(a.history_, b.history_, rtol=1e-6)


def test_checkpoint_of_another_fit_is_refused(tmp_path):
    small = noisy_annotations(n_cells=60, n_genes=50, n_factors=2, seed=0)
    pf.models.Spex(n_dense=2, max_epochs=5, progress=False).fit(small, checkpoint_dir=tmp_path)
    other = noisy_annotations(n_cells=60, n_genes=70, n_factors=2, seed=0)
    with pytest.raises(ValueError, match="belongs to a different fit"):
        pf.models.Spex(n_dense=2, max_epochs=5, progress=False).fit(other, checkpoint_dir=tmp_path)


def test_checkpoint_files_are_plain_arrays_and_json(tmp_path):
    small = noisy_annotations(n_cells=60, n_genes=50, n_factors=2, seed=0)
    pf.models.Spex(n_dense=2, max_epochs=5, progress=False).fit(small, checkpoint_dir=tmp_path)
    with np.load(tmp_path / "state.npz", allow_pickle=False) as npz:
        assert all(npz[k].dtype != object for k in npz.files)
        assert not any(k.endswith(":Y") for k in npz.files)  # the data are not copied into checkpoints


class _Diverging:
    """A task whose third epoch turns its state and objective to NaN (rebinding a tensor, and writing into a
    torch module in place, as optimisers do)."""

    def __init__(self):
        self.t = 0
        self.theta = torch.zeros(3)
        self.net = torch.nn.Linear(2, 2)

    def epoch(self):
        self.t += 1
        self.theta = self.theta + 1.0 if self.t < 3 else self.theta * float("nan")
        with torch.no_grad():
            self.net.weight.add_(1.0 if self.t < 3 else float("nan"))
        return float(self.theta.sum())


def test_non_finite_objective_stops_and_keeps_the_last_good_state(tmp_path):
    from pathfactor.train import load_state, train

    task = _Diverging()
    weight_after_two = task.net.weight.detach().clone() + 2.0
    with pytest.raises(FloatingPointError, match="keeps its state of epoch 2") as info:
        train(task, max_epochs=10, tol=0.0, progress=False, checkpoint_dir=tmp_path / "ck")
    assert info.value.epoch == 2 and info.value.history == [3.0, 6.0]
    assert task.t == 2 and torch.equal(task.theta, torch.full((3,), 2.0))
    torch.testing.assert_close(task.net.weight.detach(), weight_after_two)
    fresh = _Diverging()
    assert load_state(fresh, tmp_path / "ck")["_history"] == [3.0, 6.0]
    assert torch.equal(fresh.theta, torch.full((3,), 2.0))
