"""Per-gene posterior probability of membership in a program, beside gained and lost genes."""
import numpy as np
import pandas as pd
import pytest

import pathfactor as pf
from pathfactor.data.simulate import annotation_sets, noisy_annotations
from pathfactor.evaluate import membership_probability


def test_probability_matches_sampling_and_limits():
    rng = np.random.default_rng(0)
    m = rng.normal(0, 1, (30, 2))
    s = rng.uniform(0.05, 0.8, (30, 2))
    p = membership_probability(m, s)
    delta = 0.1 * np.abs(m).max(0)
    draws = m[None] + s[None] * rng.standard_normal((100_000, 30, 2))
    np.testing.assert_allclose(p, (np.abs(draws) > delta).mean(0), atol=0.01)
    certain = membership_probability(np.array([[1.0], [0.0], [0.05]]), np.array([[1e-9], [1e-9], [1e-9]]))
    np.testing.assert_allclose(certain.ravel(), [1.0, 0.0, 0.0], atol=1e-12)
    frame = membership_probability(pd.DataFrame(m, columns=["a", "b"]), pd.DataFrame(s, columns=["a", "b"]))
    assert list(frame.columns) == ["a", "b"]
    with pytest.raises(ValueError, match="shape"):
        membership_probability(m, s[:3])


@pytest.fixture(scope="module")
def fitted():
    sim = noisy_annotations(n_cells=300, n_genes=400, n_factors=4, noise=0.25, seed=3)
    model = pf.models.Spex(n_sparse=0, min_set_size=1, progress=False).fit(sim, annotations=annotation_sets(sim))
    return sim, model


def test_spex_probabilities_separate_true_from_false_members(fitted):
    sim, model = fitted
    prob = model.membership_probability().to_numpy()
    truth, ann = sim.varm["mask_true"], sim.varm["annotation"]
    assert prob.shape == truth.shape and ((prob >= 0) & (prob <= 1)).all()
    assert np.median(prob[truth & ann]) > 0.9          # annotated and real
    assert np.median(prob[~truth & ann]) < 0.1         # annotated but false: the data drop them
    assert np.median(prob[truth & ~ann]) > 0.5         # real but missing from the set: gained
    table = model.refined_annotations()
    row = table.iloc[0]
    assert len(row["p_gained"]) == len(row["gained"]) and len(row["p_lost"]) == len(row["lost"])
    assert all(p > 0.5 for p in row["p_gained"]) and all(p < 0.5 for p in row["p_lost"])


def test_models_without_posterior_sds_say_so():
    sim = noisy_annotations(n_cells=60, n_genes=40, n_factors=2, seed=0)
    model = pf.models.NMF(n_factors=2, progress=False).fit(np.abs(sim.X))
    with pytest.raises(ValueError, match="no posterior sds"):
        model.membership_probability()


def test_top_gene_share_tells_a_one_gene_factor_from_a_program():
    from pathfactor.evaluate import ONE_GENE_SHARE, one_gene_factors, top_gene_share

    W = np.zeros((10, 3))
    W[:, 0] = 1.0                         # a program: every gene alike
    W[2, 1], W[5, 1] = 3.0, 0.5           # one gene: 9 / 9.25 of the squared loadings
    np.testing.assert_allclose(top_gene_share(W), [0.1, 9 / 9.25, 0.0])  # a factor without loadings: 0
    assert (top_gene_share(W) > ONE_GENE_SHARE).tolist() == [False, True, False]
    loadings = pd.DataFrame(W, index=[f"G{g}" for g in range(10)], columns=["program", "one", "empty"])
    assert one_gene_factors(loadings).to_dict() == {"one": "G2"}
