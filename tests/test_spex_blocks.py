"""The block family of q(w_g) (``_spex_blocks``): its operations against dense algebra, the optimal covariances
and conjugate-gradient means against the exact solve, and Spex fits in the family against exact ones."""
import numpy as np
import pytest
import torch

import pathfactor as pf
from pathfactor.data.simulate import annotation_sets, noisy_annotations
from pathfactor.evaluate import mask_f1
from pathfactor.models._spex_blocks import (GeneCovariances, batched_inverse, conjugate_gradient_means,
                                            coupled_weights, factorise)


def _problem(G=40, D=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    F = torch.randn(60, D, generator=g, dtype=torch.float64)
    F[:, 1] += 0.8 * F[:, 0]                                              # two strongly correlated factors
    A = F.T @ F
    psi = torch.rand(G, generator=g, dtype=torch.float64) + 0.5
    prec = torch.where(torch.rand(G, D, generator=g) < 0.6, 1e5, 1.0).double()  # pinned and free weights
    h = torch.randn(G, D, generator=g, dtype=torch.float64)
    P = psi[:, None, None] * A + torch.diag_embed(prec)
    return A, psi, prec, h, P


def test_block_family_operations_match_dense_algebra():
    A, psi, prec, h, P = _problem()
    score = coupled_weights(A, psi, prec)
    cov = factorise(A, psi, prec, score, coupling=0.05)
    assert 0 < int(cov.sizes.max()) < A.shape[0]  # some blocks, not all weights
    S = cov.dense()
    np.testing.assert_allclose(cov.diag(), torch.diagonal(S, dim1=1, dim2=2), rtol=1e-12)
    np.testing.assert_allclose(cov.logdet(), torch.logdet(S), rtol=1e-10)
    w = torch.rand(len(psi), dtype=torch.float64)
    np.testing.assert_allclose(cov.weighted_sum(w), (w[:, None, None] * S).sum(0), rtol=1e-10)
    np.testing.assert_allclose(cov.apply(h), (S @ h.unsqueeze(-1)).squeeze(-1), rtol=1e-10)
    np.testing.assert_allclose(cov.trace_with(A), (S * A).sum((1, 2)), rtol=1e-10)
    # within its block, S_g is the inverse of P_g's block; elsewhere 1 / P_g,kk
    for g in range(len(psi)):
        inside = S[g].abs().sum(1) > torch.diagonal(S[g]).abs() + 0  # rows with off-diagonal entries
        idx = torch.nonzero(inside | (torch.diagonal(S[g]) != 1 / torch.diagonal(P[g]))).ravel()
        if len(idx):
            np.testing.assert_allclose(S[g][idx][:, idx], torch.linalg.inv(P[g][idx][:, idx]), rtol=1e-8)


def test_all_coupled_is_the_exact_posterior_and_none_coupled_is_diagonal():
    A, psi, prec, h, P = _problem()
    everything = factorise(A, psi, prec, torch.ones_like(prec), coupling=0.0)
    np.testing.assert_allclose(everything.dense(), torch.linalg.inv(P), rtol=1e-8, atol=1e-14)
    assert everything.is_full()
    exact, logdet = batched_inverse(P)
    full = GeneCovariances.full(exact, logdet)
    np.testing.assert_allclose(full.logdet(), everything.logdet(), rtol=1e-10)
    assert full.dense().data_ptr() == full.S.data_ptr()  # the full family in gene order: its storage, viewed
    np.testing.assert_array_equal(full.dense(), exact)
    shuffled = GeneCovariances(full.order.flip(0), full.sizes, full.cols, exact.flip(0).reshape(-1), logdet.flip(0),
                               full.var)
    np.testing.assert_array_equal(shuffled.dense(), exact)  # another gene order goes the general way
    nothing = factorise(A, psi, prec, torch.zeros_like(prec), coupling=0.0)
    np.testing.assert_allclose(nothing.dense(), torch.diag_embed(1 / torch.diagonal(P, dim1=1, dim2=2)), rtol=1e-12)


def test_conjugate_gradients_reach_the_exact_means_and_descend_every_step():
    A, psi, prec, h, P = _problem()
    cov = factorise(A, psi, prec, coupled_weights(A, psi, prec), coupling=0.05)
    exact = torch.linalg.solve(P, h.unsqueeze(-1)).squeeze(-1)
    got = conjugate_gradient_means(A, psi, prec, h, torch.zeros_like(h), cov, rtol=1e-12)
    np.testing.assert_allclose(got, exact, rtol=1e-8, atol=1e-12)

    def energy(m):
        return 0.5 * (m.unsqueeze(1) @ P @ m.unsqueeze(-1)).ravel() - (h * m).sum(1)

    previous = energy(torch.zeros_like(h))
    for n in range(1, 6):  # stopped after n iterations: each gene's quadratic only goes down
        m = conjugate_gradient_means(A, psi, prec, h, torch.zeros_like(h), cov, rtol=0.0, max_iter=n)
        now = energy(m)
        assert (now <= previous + 1e-9 * previous.abs()).all()
        previous = now


def test_conjugate_gradients_give_row_major_means_whatever_the_layout_of_h():
    """h often arrives as a transpose (psi * (F^T Y)^T); the solve runs on row-major copies and returns one."""
    A, psi, prec, h, P = _problem()
    cov = factorise(A, psi, prec, coupled_weights(A, psi, prec), coupling=0.05)
    h_columns = h.T.contiguous().T                                       # same values, column-major
    assert not h_columns.is_contiguous()
    got = conjugate_gradient_means(A, psi, prec, h_columns, torch.zeros_like(h_columns), cov, rtol=0.0, max_iter=4)
    assert got.is_contiguous()
    np.testing.assert_allclose(got, conjugate_gradient_means(A, psi, prec, h, torch.zeros_like(h), cov, rtol=0.0,
                                                             max_iter=4), rtol=1e-12)


def test_spex_in_the_block_family_matches_the_exact_fit():
    sim = noisy_annotations(n_cells=300, n_genes=400, n_factors=12, noise=0.2, seed=1)
    sets = annotation_sets(sim)
    truth = sim.varm["mask_true"][:, :12]
    fits = {c: pf.models.Spex(progress=False, min_set_size=1, coupling=c, dtype="float64").fit(sim, annotations=sets)
            for c in (None, 0.3)}
    exact, blocks = fits[None], fits[0.3]
    h = np.asarray(blocks.history_)
    assert (np.diff(h) >= -1e-9 * np.abs(h[1:])).all()              # the ELBO rises in the block family too
    assert abs(blocks.elbo_ - exact.elbo_) < 1e-4 * abs(exact.elbo_)  # and ends where the exact fit does
    f1 = [mask_f1(truth, m.loadings_.to_numpy()[:, :12]) for m in (exact, blocks)]
    assert f1[1] >= f1[0] - 0.01
    a, b = exact.loadings_.to_numpy(), blocks.loadings_.to_numpy()
    corr = [abs(np.corrcoef(a[:, k], b[:, k])[0, 1]) for k in range(a.shape[1])]  # unannotated: sign is free
    assert min(corr) > 0.995


def test_coupling_is_validated():
    with pytest.raises(ValueError, match="coupling"):
        pf.models.Spex(coupling=-1).fit(np.random.default_rng(0).normal(size=(20, 30)))
