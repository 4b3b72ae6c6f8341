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


@pytest.mark.parametrize("model", ["Supervised", "Spex", "NMF", "PPCA"])
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
