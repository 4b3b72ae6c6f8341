"""Autoencoder (interpretable, seed 001): recovery of a noisy annotation, exact zeros outside the sets, the model
face (transform, save/load, determinism), bad input."""
import numpy as np
import pandas as pd
import pytest
import torch

import pathfactor as pf
from pathfactor.data.simulate import annotation_sets, noisy_annotations
from pathfactor.evaluate import mask_f1
from pathfactor.models.autoencoder import Autoencoder, _AutoencoderTask, _encoder


@pytest.fixture(scope="module")
def sim():
    return noisy_annotations(n_cells=500, n_genes=300, n_factors=6, noise=0.2, seed=0)


@pytest.fixture(scope="module")
def fitted(sim):
    return Autoencoder(n_dense=1, progress=False, min_set_size=5).fit(sim, annotations=annotation_sets(sim))


def test_recovers_the_true_mask_better_than_the_annotation(sim, fitted):
    ann, true = sim.varm["annotation"], sim.varm["mask_true"]
    W = fitted.loadings_.to_numpy()[:, :6]
    assert list(fitted.loadings_.columns) == [f"term_{i}" for i in range(6)] + ["dense_1"]
    assert mask_f1(true, W) > mask_f1(true, ann.astype(float)) + 0.05
    # the off-annotation weights of annotated columns are mostly exactly zero
    assert (W[~ann] == 0).mean() > 0.7
    assert list(fitted.factor_kinds_) == ["annotated"] * 6 + ["dense"]
    assert fitted.annotation_.to_numpy()[:, :6].tolist() == ann.tolist()


def test_loss_decreases_and_relevance_is_r2(fitted):
    h = -np.asarray(fitted.history_)
    assert h[-1] < 0.5 * h[0]
    rel = fitted.relevance_
    assert rel.between(-1, 1).all() and rel[:6].min() > 0.01
    assert fitted.relevance().index[0] in rel.index


def test_orientation_annotated_loadings_point_up(fitted):
    W, ann = fitted.loadings_.to_numpy()[:, :6], fitted.annotation_.to_numpy()[:, :6]
    assert ((W * ann).sum(0) > 0).all()


def test_transform_of_training_data_equals_scores_and_save_load(sim, fitted, tmp_path):
    np.testing.assert_allclose(fitted.transform(sim).to_numpy(), fitted.factor_scores_.to_numpy(), rtol=1e-5, atol=1e-6)
    # genes aligned by name: shuffled columns give the same scores
    df = sim.to_df().iloc[:, ::-1]
    np.testing.assert_allclose(fitted.transform(df).to_numpy(), fitted.factor_scores_.to_numpy(), rtol=1e-5, atol=1e-5)
    fitted.save(tmp_path / "ae")
    back = pf.load(tmp_path / "ae")
    assert isinstance(back, Autoencoder)
    np.testing.assert_allclose(back.transform(sim).to_numpy(), fitted.transform(sim).to_numpy(), rtol=1e-5, atol=1e-6)
    pd.testing.assert_frame_equal(back.loadings_, fitted.loadings_)
    with pytest.raises(ValueError, match="missing"):
        fitted.transform(sim[:, :10])


def test_seeded_fit_is_deterministic(sim):
    kw = dict(progress=False, min_set_size=5, max_epochs=5)
    a = Autoencoder(**kw).fit(sim, annotations=annotation_sets(sim), seed=1)
    b = Autoencoder(**kw).fit(sim, annotations=annotation_sets(sim), seed=1)
    # identical up to float32 rounding (vectorised kernels may sum in another order on differently aligned memory)
    np.testing.assert_allclose(a.loadings_.to_numpy(), b.loadings_.to_numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(a.factor_scores_.to_numpy(), b.factor_scores_.to_numpy(), rtol=1e-4, atol=1e-5)


def test_proximal_operators_in_the_seeds_order():
    """Off-annotation soft threshold on annotated columns, L1 on sparse ones, then group lasso on every column."""
    G = 4
    mask = torch.tensor([[True], [True], [False], [False]])
    W = torch.tensor([[1.0, 0.3, 2.0], [2.0, -2.0, 0.0], [0.05, 1.0, 0.0], [-3.0, 0.0, 0.0]], requires_grad=True)
    task = _AutoencoderTask(torch.zeros(3, G), mask, 1, _encoder(G, (2,), 3), W, lambda0=0.0, lambda_off=1.0,
                            lambda_l1=0.5, lambda_group=1.0, lr=0.1, batch_size=2, generator=torch.Generator())
    task.proximal()
    a = torch.tensor([1.0, 2.0, 0.0, -2.9])          # genes 3, 4 outside the set shrink by 0.1
    s = torch.tensor([0.25, -1.95, 0.95, 0.0])        # sparse column shrinks by 0.05
    d = torch.tensor([2.0, 0.0, 0.0, 0.0])
    expected = torch.stack([v * (1 - 0.1 / v.norm()) for v in (a, s, d)], 1)
    torch.testing.assert_close(W.detach(), expected)


def test_bad_input(sim):
    sets = annotation_sets(sim)
    with pytest.raises(ValueError, match="none of the"):
        Autoencoder(progress=False).fit(sim, annotations={"x": ["NOPE1", "NOPE2"]})
    with pytest.raises(ValueError, match="nothing to fit"):
        Autoencoder(progress=False).fit(sim)
    with pytest.raises(ValueError, match="lambda_off"):
        Autoencoder(lambda_off=-1.0, progress=False).fit(sim, annotations=sets)
    with pytest.raises(ValueError, match="lambda0"):
        Autoencoder(lambda0=-0.1, progress=False).fit(sim, annotations=sets)
    with pytest.raises(ValueError, match="fewer than the data's 300 genes"):
        Autoencoder(n_dense=300, progress=False).fit(sim)
    with pytest.raises(ValueError, match="hidden"):
        Autoencoder(hidden=(0,), progress=False).fit(sim, annotations=sets)
    with pytest.raises(RuntimeError, match="not fitted"):
        Autoencoder().transform(sim)
