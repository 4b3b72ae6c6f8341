"""Checkpoint and resume: a fit killed mid-way and resumed ends where an uninterrupted one does."""
import hashlib
import io
import json
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

import pathfactor as pf
from pathfactor.data.simulate import noisy_annotations
from pathfactor.train import Task, load_state, train

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


def _spex(**kw):
    return pf.models.Spex(n_dense=2, max_epochs=5, progress=False, **kw)


@pytest.fixture
def small():
    return noisy_annotations(n_cells=60, n_genes=50, n_factors=2, seed=0)


def test_checkpoint_of_another_fit_is_refused(tmp_path, small):
    _spex().fit(small, checkpoint_dir=tmp_path)
    other = noisy_annotations(n_cells=60, n_genes=70, n_factors=2, seed=0)
    with pytest.raises(ValueError, match="belongs to a different fit"):
        _spex().fit(other, checkpoint_dir=tmp_path)


def test_checkpoint_of_other_data_of_the_same_shape_is_refused(tmp_path, small):
    _spex().fit(small, checkpoint_dir=tmp_path)
    other = noisy_annotations(n_cells=60, n_genes=50, n_factors=2, seed=1)  # same names, same shape
    assert list(other.obs_names) == list(small.obs_names) and list(other.var_names) == list(small.var_names)
    with pytest.raises(ValueError, match="different fit.*gene_sums"):
        _spex().fit(other, checkpoint_dir=tmp_path)
    renamed = small.copy()
    renamed.obs_names = [f"other{i}" for i in range(renamed.n_obs)]
    with pytest.raises(ValueError, match="different fit.*cells"):
        _spex().fit(renamed, checkpoint_dir=tmp_path)


def test_checkpoint_of_other_settings_is_refused(tmp_path, small):
    _spex().fit(small, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="different fit.*params"):
        _spex(slab_out=1e-2).fit(small, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="different fit.*seed"):
        _spex().fit(small, checkpoint_dir=tmp_path, seed=7)
    _spex().fit(small, checkpoint_dir=tmp_path)  # the same fit resumes


def _corrupt_checkpoint(tmp_path, small, how):
    _spex().fit(small, checkpoint_dir=tmp_path)
    meta = json.loads((tmp_path / "state.json").read_text())
    arrays = tmp_path / meta["arrays"]
    blob = bytearray(arrays.read_bytes())
    if how == "truncated":
        arrays.write_bytes(bytes(blob[: len(blob) // 2]))
    elif how == "bit flip":
        blob[len(blob) // 2] ^= 0x10
        arrays.write_bytes(bytes(blob))
    elif how in ("nan", "nan, forged checksum"):
        with np.load(arrays) as npz:
            values = {k: npz[k] for k in npz.files}
        key = next(k for k, v in values.items() if v.dtype.kind == "f" and v.size > 1)
        values[key] = values[key].copy()
        values[key].flat[0] = np.nan
        buffer = io.BytesIO()
        np.savez(buffer, **values)
        arrays.write_bytes(buffer.getvalue())
        if how == "nan, forged checksum":
            meta["sha256"] = hashlib.sha256(buffer.getvalue()).hexdigest()
            meta["bytes"] = len(buffer.getvalue())
            (tmp_path / "state.json").write_text(json.dumps(meta))
    elif how == "json":
        (tmp_path / "state.json").write_text("{" * 100_000)
    elif how == "missing arrays":
        arrays.unlink()


@pytest.mark.parametrize("how, message", [("truncated", "truncated"), ("bit flip", "checksum"),
                                          ("nan", "checksum|truncated"), ("nan, forged checksum", "NaN"),
                                          ("json", "not valid JSON"), ("missing arrays", "missing")])
def test_corrupted_checkpoint_is_refused(tmp_path, small, how, message):
    _corrupt_checkpoint(tmp_path, small, how)
    with pytest.raises(ValueError, match=message) as info:
        _spex().fit(small, checkpoint_dir=tmp_path)
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)


def test_cli_refuses_another_fits_checkpoint_in_one_line(tmp_path, small, capsys):
    from pathfactor.cli import main

    a, b = tmp_path / "a.h5ad", tmp_path / "b.h5ad"
    small.write_h5ad(a)
    other = noisy_annotations(n_cells=60, n_genes=50, n_factors=2, seed=1)
    other.write_h5ad(b)
    args = ["--model", "spex", "--gene-sets", str(tmp_path / "sets.gmt"), "--n-dense", "2", "--max-epochs", "6",
            "--checkpoint", str(tmp_path / "ck"), "--quiet", "--min-set-size", "2"]
    from pathfactor.data.simulate import annotation_sets

    pf.GeneSets(annotation_sets(small)).write_gmt(tmp_path / "sets.gmt")
    assert main(["fit", str(a), "--out", str(tmp_path / "ra.h5ad"), *args]) == 0
    capsys.readouterr()
    assert main(["fit", str(b), "--out", str(tmp_path / "rb.h5ad"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pathfactor: error: checkpoint") and "different fit" in err[0]


def test_checkpoint_files_are_plain_arrays_and_json(tmp_path, small):
    _spex().fit(small, checkpoint_dir=tmp_path)
    meta = json.loads((tmp_path / "state.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["state.json", meta["arrays"]])
    with np.load(tmp_path / meta["arrays"], allow_pickle=False) as npz:
        assert all(npz[k].dtype != object for k in npz.files)
    assert not any(name in ("Y", "Z", "data") or name.startswith("data.") for name in meta["state"])
    assert meta["fingerprint"]["model"] == "Spex" and meta["fingerprint"]["shape"] == [60, 50]


# ---------------------------------------------------------------------------- the state contract
class _Diverging(Task):
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
    task = _Diverging()
    weight_after_two = task.net.weight.detach().clone() + 2.0
    with pytest.raises(FloatingPointError, match="keeps its state of epoch 2") as info:
        train(task, max_epochs=10, tol=0.0, progress=False, checkpoint_dir=tmp_path / "ck")
    assert info.value.epoch == 2 and info.value.history == [3.0, 6.0]
    assert task.t == 2 and torch.equal(task.theta, torch.full((3,), 2.0))
    torch.testing.assert_close(task.net.weight.detach(), weight_after_two)
    fresh = _Diverging()
    assert load_state(fresh, tmp_path / "ck")["history"] == [3.0, 6.0]
    assert torch.equal(fresh.theta, torch.full((3,), 2.0))
    torch.testing.assert_close(fresh.net.weight.detach(), weight_after_two)


def _poisoned(task_class, after: int):
    """Make ``task_class.epoch`` write NaN into its state (in place) and return NaN on epoch ``after + 1``; return
    the list that collects copies of the state after every good epoch."""
    good, real = [], task_class.epoch

    def epoch(self):
        value = real(self)
        if len(good) == after:
            for name, value_ in self.state_dict(copy=False).items():
                if isinstance(value_, torch.Tensor) and value_.is_floating_point() and value_.numel():
                    with torch.no_grad():
                        value_.view(-1)[0] = float("nan")
            for p in getattr(self, "encoder", torch.nn.Linear(1, 1)).parameters():
                with torch.no_grad():
                    p.view(-1)[0] = float("nan")
            return float("nan")
        good.append(self.state_dict())
        return value
    return good, epoch


def _same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        elif isinstance(a[k], dict) and k != "optimizer":
            for name in a[k]:
                assert torch.equal(a[k][name], b[k][name]), (k, name)


@pytest.mark.parametrize("model", ["nmf", "autoencoder"])
def test_nan_rollback_of_in_place_models_restores_the_last_good_epoch(model, monkeypatch, torch_one_thread):
    from pathfactor.models import autoencoder, nmf

    sim = noisy_annotations(n_cells=80, n_genes=60, n_factors=2, seed=0)
    if model == "nmf":
        cls, est = nmf._MultiplicativeUpdates, pf.models.NMF(n_factors=3, max_epochs=20, tol=0.0, progress=False)
        sim.X = np.abs(sim.X)
    else:
        cls = autoencoder._AutoencoderTask
        est = pf.models.Autoencoder(n_dense=2, max_epochs=20, tol=0.0, progress=False, batch_size=32)
    good, epoch = _poisoned(cls, after=3)
    captured = {}
    real_load = cls.load_state_dict

    def load(self, state):
        real_load(self, state)
        captured["after"] = self.state_dict()

    monkeypatch.setattr(cls, "epoch", epoch)
    monkeypatch.setattr(cls, "load_state_dict", load)
    with pytest.raises(FloatingPointError, match="keeps its state of epoch 3"):
        est.fit(sim)
    _same_state(captured["after"], good[-1])
    if model == "autoencoder":  # the optimiser's moments are back too
        restored, kept = captured["after"]["optimizer"]["state"], good[-1]["optimizer"]["state"]
        for i in kept:
            assert torch.equal(restored[i]["exp_avg"], kept[i]["exp_avg"])


def test_state_dict_round_trip_continues_identically(torch_one_thread):
    """A task put back to an earlier state (modules, optimiser, generator included) repeats the same epochs."""
    from pathfactor.models import autoencoder

    sim = noisy_annotations(n_cells=80, n_genes=60, n_factors=2, seed=0)
    tasks = []
    real = autoencoder._AutoencoderTask.epoch

    def epoch(self):
        tasks.append(self)
        return real(self)

    autoencoder._AutoencoderTask.epoch = epoch
    try:
        pf.models.Autoencoder(n_dense=2, max_epochs=2, tol=0.0, progress=False).fit(sim)
    finally:
        autoencoder._AutoencoderTask.epoch = real
    task = tasks[-1]
    state = task.state_dict()
    first = [real(task) for _ in range(3)]
    task.load_state_dict(state)
    again = [real(task) for _ in range(3)]
    assert first == again


def test_keep_best_ends_in_the_best_state():
    class Bumpy(Task):
        def __init__(self):
            self.t, self.x = 0, torch.zeros(1)

        def epoch(self):
            self.t += 1
            self.x = torch.tensor([float([1, 5, 3, 2, 4, 1, 0][self.t - 1])])
            return float(self.x)

    task = Bumpy()
    result = train(task, max_epochs=7, tol=1e-3, patience=3, progress=False, keep_best=True)
    assert result.best_epoch == 2 and float(task.x) == 5.0 and result.converged and result.n_epochs == 5


def test_convergence_does_not_depend_on_the_data_units():
    """Relative changes of a loss: the same epochs whatever the units (the old floor of 1 stopped small losses)."""
    sim = noisy_annotations(n_cells=80, n_genes=60, n_factors=2, seed=0)
    Y = np.abs(sim.X)
    fits = [pf.models.NMF(n_factors=3, progress=False).fit(Y * s) for s in (1.0, 2.0**-13, 1e-4, 1e3)]
    epochs = [len(m.history_) for m in fits]
    assert epochs[0] == epochs[1] > 3  # a power of two changes no digit
    # 1e-4 and 1e3 round values differently, and how near tol the last epochs sit depends on the CPU's arithmetic:
    # a few epochs either way, never the handful that an absolute floor gave small losses
    assert all(abs(e - epochs[0]) <= 0.1 * epochs[0] for e in epochs), epochs
    np.testing.assert_array_equal(fits[1].relevance_, fits[0].relevance_)  # a power of two changes no digit
    for m in fits[2:]:
        np.testing.assert_allclose(m.relevance_, fits[0].relevance_, rtol=0.02)


@pytest.mark.parametrize("model", ["Spex", "NMF", "PPCA", "VAE", "Autoencoder"])
def test_fit_leaves_the_callers_random_state_alone(model):
    import random

    sim = noisy_annotations(n_cells=40, n_genes=30, n_factors=2, seed=0)
    data = np.round(np.abs(sim.X) * 3) if model == "VAE" else (np.abs(sim.X) if model == "NMF" else sim)
    kw = {"Spex": dict(n_dense=2), "NMF": dict(n_factors=2), "PPCA": dict(n_factors=2, method="em"),
          "VAE": dict(n_latent=2), "Autoencoder": dict(n_dense=2)}[model]
    random.seed(11), np.random.seed(11), torch.manual_seed(11)
    expected = (random.random(), np.random.rand(), float(torch.rand(1)))
    random.seed(11), np.random.seed(11), torch.manual_seed(11)
    getattr(pf.models, model)(max_epochs=3, progress=False, **kw).fit(data, seed=5)
    assert (random.random(), np.random.rand(), float(torch.rand(1))) == expected


def test_unconverged_fit_warns_the_python_user(small):
    from pathfactor.train import ConvergenceWarning

    with pytest.warns(ConvergenceWarning, match="Spex did not converge in 2 epochs.*raise max_epochs"):
        pf.models.Spex(n_dense=2, max_epochs=2, progress=False).fit(small)
