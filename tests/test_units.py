"""The data's units do not change the factors: x 1000 and x 1e-4 give the same relevance (issue: learned global
scales switched every factor off, and NMF stopped after 3 epochs, when the units changed)."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import units  # noqa: E402

import pathfactor as pf  # noqa: E402
from pathfactor.data.simulate import ppca_interventions  # noqa: E402


@pytest.mark.parametrize("model", ["Supervised", "Spex", "NMF", "PPCA", "PPCA-map", "PPCA-vi"])
def test_relevance_is_the_same_in_other_units(model, torch_one_thread):
    row = units.measure(model)
    assert max(row["max_relative_change"].values()) < 0.05, row


def test_learned_global_scale_keeps_the_factors_at_any_scale(torch_one_thread):
    """The learned tau ~ C+(0, data sd) does not switch factors off when the data are x 1000."""
    data = ppca_interventions(n_cells=200, n_genes=300, n_factors=3, seed=1)
    big = data.copy()
    big.X = big.X * 1000.0
    fits = [pf.models.Supervised(n_factors=3, progress=False).fit(a, covariates="group") for a in (data, big)]
    assert (fits[1].relevance_ > 0.1).sum() == 3
    np.testing.assert_allclose(fits[1].loadings_.abs().to_numpy() / 1000.0, fits[0].loadings_.abs().to_numpy(),
                               rtol=0.05, atol=0.02 * float(fits[0].loadings_.abs().max().max()))
    np.testing.assert_allclose(fits[1].covariate_effects_.to_numpy() / 1000.0, fits[0].covariate_effects_.to_numpy(),
                               rtol=0.05, atol=1e-2)


@pytest.mark.parametrize("scale", [1e-25, 1e-8, 1e10])
def test_spex_and_ppca_fit_data_at_extreme_scales(scale, torch_one_thread):
    """Tiny or huge values (within float32's range) give the same factors: Spex fits Y / u (u a power of two near
    the data's sd) and reports in the data's units; PPCA computes tiny data in float64."""
    from pathfactor.data.simulate import annotation_sets, noisy_annotations

    sim = noisy_annotations(n_cells=150, n_genes=120, n_factors=3, noise=0.2, seed=0)
    scaled = sim.copy()
    scaled.X = (np.asarray(sim.X, dtype=np.float64) * scale).astype(np.float32)
    sets = annotation_sets(sim)
    fits = [pf.models.Spex(n_dense=1, min_set_size=5, progress=False).fit(a, annotations=sets) for a in (sim, scaled)]
    np.testing.assert_allclose(fits[1].relevance_, fits[0].relevance_, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(fits[1].loadings_.to_numpy() / scale, fits[0].loadings_.to_numpy(), rtol=1e-3,
                               atol=1e-4 * np.abs(fits[0].loadings_.to_numpy()).max())
    ppca = [pf.models.PPCA(n_factors=3, method="vi", progress=False).fit(a) for a in (sim, scaled)]
    np.testing.assert_allclose(ppca[1].relevance_, ppca[0].relevance_, rtol=1e-3)
