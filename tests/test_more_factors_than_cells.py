"""Annotated models fit more gene sets than cells (a shrinkage prior needs no K < N; f-scLVM fits Reactome to
about 100 cells, spex-LVM 83 sets to 182 cells)."""
import numpy as np
import pytest

import pathfactor as pf
from pathfactor.data.simulate import annotation_sets, noisy_annotations


@pytest.fixture(scope="module")
def sim():
    return noisy_annotations(n_cells=40, n_genes=600, n_factors=50, noise=0.1, seed=0)


@pytest.mark.parametrize("model", [pf.models.Slalom, pf.models.Spex, pf.models.Autoencoder])
def test_fits_50_gene_sets_to_40_cells(sim, model):
    fitted = model(n_sparse=0, min_set_size=1, progress=False).fit(sim, annotations=annotation_sets(sim))
    W = fitted.loadings_.to_numpy()
    assert W.shape == (600, 50) and np.isfinite(W).all()
    assert pf.evaluate.mask_f1(sim.varm["mask_true"], W) > 0.8


def test_covariates_still_need_cells(sim):
    sim = sim.copy()
    sim.obs["batch"] = [f"b{i}" for i in range(sim.n_obs)]  # 39 indicator columns for 40 cells
    with pytest.raises(ValueError, match="covariate columns need fewer"):
        pf.models.Slalom(min_set_size=1, progress=False).fit(sim, annotations=annotation_sets(sim), covariates="batch")
