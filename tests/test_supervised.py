"""The supervised model of seed 000: Spex machinery with covariates and no gene sets."""
import numpy as np
import pytest

import pathfactor as pf
from pathfactor.data.simulate import ppca_interventions


@pytest.fixture(scope="module")
def sim():
    return ppca_interventions(n_cells=400, n_genes=60, n_factors=2, sigma2=0.5, shift=np.linspace(-2, 2, 60), seed=0)


@pytest.mark.parametrize("posterior", ["blocked", "mean-field"])
def test_recovers_the_intervention_effect(sim, posterior):
    m = pf.models.Supervised(n_factors=2, posterior=posterior, progress=False).fit(sim, covariates="group")
    b = m.covariate_effects_["group=stimulated"].to_numpy()
    assert np.corrcoef(b, sim.var["c_true"])[0, 1] > 0.99
    assert list(m.factor_kinds_) == ["latent", "latent"] and list(m.loadings_.columns) == ["factor_0", "factor_1"]
    # the residual factors carry the latent signal, not the groups
    for k in range(2):
        assert pf.evaluate.auroc(m.factor_scores_.iloc[:, k], sim.obs["group"], "stimulated") < 0.65


def test_needs_covariates_and_takes_no_gene_sets(sim):
    with pytest.raises(ValueError, match="needs covariates"):
        pf.models.Supervised(progress=False).fit(sim)
    with pytest.raises(ValueError, match="takes no gene sets"):
        pf.models.Supervised(progress=False).fit(sim, covariates="group", annotations={"a": ["gene_0"]})
    with pytest.raises(ValueError, match="posterior must be"):
        pf.models.Supervised(posterior="full", progress=False).fit(sim, covariates="group")


def test_save_load_round_trip(sim, tmp_path):
    m = pf.models.Supervised(n_factors=2, progress=False).fit(sim, covariates="group")
    m.save(tmp_path / "sup")
    loaded = pf.load(tmp_path / "sup")
    assert isinstance(loaded, pf.models.Supervised) and loaded.get_params() == m.get_params()
    np.testing.assert_allclose(loaded.transform(sim).to_numpy(), m.transform(sim).to_numpy())
