"""Per-gene Gaussian posteriors q(w_g) = N(m_g, S_g) whose cost follows the weights that are coupled.

The loadings' update has, for every gene, the precision ``P_g = psi_g A + diag(prec_g)`` (A = E[F^T F], shared by
all genes; ``prec_g`` the prior precisions) and linear term ``h_g``. The exact full-covariance update factorises G
D x D matrices per sweep, most of it spent on weights the prior pins near zero (a gene lies in a few of a hundred
gene sets) or that no other weight correlates with.

Family. ``S_g`` is one full block over the gene's *coupled* weights and independent (diagonal) elsewhere. A weight
is coupled when the sum of its squared posterior correlations with the gene's other weights,
``sum_j rho_kj^2 = u_k^2 sum_{j != k} A_kj^2 u_j^2`` with ``u_k^2 = psi_g / P_g,kk``, exceeds ``coupling^2`` (default
coupling 0.02): for small correlations, dropping them costs about half that sum in ELBO (the mutual information
of the weight with the others), so at most about ``coupling^2 / 2`` nats per independent weight. Weights the
prior pins near zero have tiny ``u_k`` and fall outside the blocks; the block holds the weights the data
determine. Blocks are padded with the most coupled of the remaining
weights to sizes in steps of 4, so genes share a batched factorisation; padding only enriches the family.

Within the family the optimal update is closed form: ``S_g`` = the inverse of P_g's block (and 1 / P_g,kk
elsewhere), and the mean m_g = P_g^-1 h_g, which does not depend on the family. The mean is found by preconditioned
conjugate gradients, all genes at once (each product ``P_g v`` is one G x D x D matrix product with A), with
``S_g`` as the preconditioner and the previous mean as the start: every iterate lowers the quadratic the ELBO is
in m_g, so the ELBO rises whatever the number of iterations.

Storage is flat (genes sorted by block size; the blocks' columns and covariances concatenated), so the tensors'
shapes change from sweep to sweep while their names do not (``Task.resizable_state``).
"""
from __future__ import annotations

import torch

__all__ = ["GeneCovariances", "batched_inverse", "coupled_weights", "factorise", "conjugate_gradient_means",
           "BLOCK_STEP"]

#: blocks are padded to multiples of this size, so genes share batched factorisations
BLOCK_STEP = 4


def batched_inverse(P: torch.Tensor):
    """(P^-1, log det P^-1) for a batch of positive definite matrices (jitter once if numerically indefinite)."""
    L, info = torch.linalg.cholesky_ex(P)
    if int(info.max()) > 0:  # numerically indefinite: add jitter and retry once
        eye = torch.eye(P.shape[-1], dtype=P.dtype, device=P.device)
        L = torch.linalg.cholesky(P + 1e-6 * P.diagonal(dim1=1, dim2=2).mean(1)[:, None, None] * eye)
    return torch.cholesky_inverse(L), -2.0 * torch.log(torch.diagonal(L, dim1=1, dim2=2)).sum(1)


class GeneCovariances:
    """Covariances S_g of G genes' D weights in the block family (module docstring).

    ``order``: the genes sorted by block size; ``sizes``: each gene's block size, in that order; ``cols`` and ``S``:
    the blocks' columns (s each) and covariances (s x s each), concatenated in that order; ``block_logdet``: log det
    of each gene's block (by gene); ``var``: the other weights' variances (G x D, 0 inside the block)."""

    def __init__(self, order, sizes, cols, S, block_logdet, var):
        self.order, self.sizes, self.cols, self.S, self.block_logdet, self.var = order, sizes, cols, S, block_logdet, var

    @classmethod
    def full(cls, S: torch.Tensor, logdet: torch.Tensor) -> "GeneCovariances":
        """Every weight in one block (the exact full-covariance posterior), from S (G x D x D)."""
        G, D = S.shape[0], S.shape[1]
        dev = S.device
        order = torch.arange(G, device=dev)
        cols = torch.arange(D, device=dev).repeat(G)
        return cls(order, torch.full((G,), D, device=dev), cols, S.reshape(-1), logdet,
                   torch.zeros(G, D, dtype=S.dtype, device=dev))

    def buckets(self):
        """(genes, cols G_b x s, S G_b x s x s) for each block size s > 0."""
        sizes, counts = torch.unique_consecutive(self.sizes, return_counts=True)
        start_gene = start_col = start_cov = 0
        for s, n in zip(sizes.tolist(), counts.tolist()):
            if s > 0:
                genes = self.order[start_gene:start_gene + n]
                cols = self.cols[start_col:start_col + n * s].view(n, s)
                S = self.S[start_cov:start_cov + n * s * s].view(n, s, s)
                yield genes, cols, S
            start_gene, start_col, start_cov = start_gene + n, start_col + n * s, start_cov + n * s * s

    def is_full(self) -> bool:
        return bool((self.sizes == self.var.shape[1]).all())

    def diag(self) -> torch.Tensor:
        """G x D: Var(w_gk)."""
        out = self.var.clone()
        for genes, cols, S in self.buckets():
            out[genes[:, None], cols] = torch.diagonal(S, dim1=1, dim2=2)
        return out

    def logdet(self) -> torch.Tensor:
        """G: log det S_g."""
        independent = torch.where(self.var > 0, torch.log(self.var.clamp_min(torch.finfo(self.var.dtype).tiny)),
                                  torch.zeros_like(self.var))
        return self.block_logdet + independent.sum(1)

    def weighted_sum(self, weights: torch.Tensor) -> torch.Tensor:
        """sum_g weights_g S_g (D x D)."""
        D = self.var.shape[1]
        out = torch.diag(weights @ self.var)
        flat = out.view(-1)
        for genes, cols, S in self.buckets():
            if S.shape[1] == D:  # every weight (columns in order): one matrix-vector product
                flat += weights[genes] @ S.reshape(len(genes), -1)
                continue
            idx = (cols[:, :, None] * D + cols[:, None, :]).reshape(-1)
            flat.index_add_(0, idx, (weights[genes, None, None] * S).reshape(-1))
        return out

    def _block_entries(self) -> torch.Tensor:
        """The flat (g * D + k) positions of the blocks' weights in a G x D matrix, bucket after bucket in
        ``buckets()`` order (computed once: conjugate gradients apply S every iteration)."""
        cached = getattr(self, "_entries", None)   # a tuple: no part of a task's state (``train._walk``)
        if cached is None or cached[0] is not self.cols or cached[1] is not self.order:
            D = self.var.shape[1]
            parts = [(genes[:, None] * D + cols).reshape(-1) for genes, cols, _ in self.buckets()]
            cached = (self.cols, self.order, torch.cat(parts) if parts else self.cols.new_zeros(0))
            self._entries = cached
        return cached[2]

    def apply(self, R: torch.Tensor) -> torch.Tensor:
        """S_g r_g for every gene (R: G x D): one gather of the blocks' entries, a batched product per block size,
        one scatter back."""
        out = self.var * R
        entries = self._block_entries()
        if not len(entries):
            return out
        r, start, products = R.reshape(-1).index_select(0, entries), 0, []
        for genes, cols, S in self.buckets():
            n, s = cols.shape
            products.append((S @ r[start:start + n * s].view(n, s, 1)).view(-1))
            start += n * s
        return out.view(-1).index_copy_(0, entries, torch.cat(products)).view_as(out)

    def trace_with(self, A: torch.Tensor) -> torch.Tensor:
        """G: tr(A S_g)."""
        D = A.shape[0]
        out = self.var @ torch.diagonal(A)
        for genes, cols, S in self.buckets():
            if S.shape[1] == D:  # every weight (columns in order): one matrix-vector product
                out[genes] = S.reshape(len(genes), -1) @ A.reshape(-1)
            else:  # the block's part, added to the independent weights' (var is 0 inside the block)
                out[genes] = out[genes] + (A[cols[:, :, None], cols[:, None, :]] * S).sum((1, 2))
        return out

    def dense(self) -> torch.Tensor:
        """G x D x D (read only: the full family's own storage, viewed, when it is already in gene order)."""
        G, D = self.var.shape
        if self.S.numel() == G * D * D and bool((self.order == torch.arange(G, device=self.order.device)).all()) \
                and bool((self.cols.view(G, D) == torch.arange(D, device=self.cols.device)).all()):
            return self.S.view(G, D, D)
        out = torch.diag_embed(self.var)
        for genes, cols, S in self.buckets():
            out[genes[:, None, None], cols[:, :, None], cols[:, None, :]] = S
        return out


def coupled_weights(A: torch.Tensor, psi: torch.Tensor, prec: torch.Tensor) -> torch.Tensor:
    """G x D: each weight's sum of squared posterior correlations with the gene's other weights,
    ``sum_{j != k} rho_kj^2 = u_k^2 sum_{j != k} A_kj^2 u_j^2`` with ``u_k^2 = psi_g / P_g,kk`` (one matrix product).
    Treating the weight as independent costs about half of it in ELBO (module docstring)."""
    diag_P = psi[:, None] * torch.diagonal(A)[None, :] + prec
    u2 = psi[:, None] / diag_P
    off = A * A
    off.fill_diagonal_(0)
    return u2 * (u2 @ off)


def factorise(A: torch.Tensor, psi: torch.Tensor, prec: torch.Tensor, score: torch.Tensor, coupling: float,
              inverse=batched_inverse) -> GeneCovariances:
    """The optimal covariances in the block family whose blocks hold the weights with ``score > coupling^2``
    (padded to multiples of :data:`BLOCK_STEP` with the next most coupled weights). ``inverse(P)`` -> (P^-1, log
    det P^-1) for a batch (e.g. run on all CPU threads)."""
    G, D = prec.shape
    dev, dt = prec.device, prec.dtype
    members = (score > coupling**2).sum(1)
    size = torch.clamp(torch.ceil(members / BLOCK_STEP) * BLOCK_STEP, max=D).long()
    size = torch.where(members < 2, torch.zeros_like(size), size)       # one weight alone is independent
    order = torch.argsort(size, stable=True)
    sizes = size[order]
    diag_P = psi[:, None] * torch.diagonal(A)[None, :] + prec
    var = 1.0 / diag_P
    block_logdet = torch.zeros(G, dtype=dt, device=dev)
    cols_parts, S_parts = [], []
    for s in torch.unique(sizes).tolist():
        if s == 0:
            continue
        genes = order[sizes == s]
        cols = torch.topk(score[genes], s, dim=1).indices.sort(1).values  # the most coupled weights
        A_block = A.expand(len(genes), D, D) if s == D else A[cols[:, :, None], cols[:, None, :]]
        P = psi[genes, None, None] * A_block + torch.diag_embed(prec[genes[:, None], cols])
        S, logdet = inverse(P)
        cols_parts.append(cols.reshape(-1))
        S_parts.append(S.reshape(-1))
        block_logdet[genes] = logdet
        var[genes[:, None], cols] = 0.0
    empty_long = torch.zeros(0, dtype=torch.long, device=dev)
    return GeneCovariances(order, sizes, torch.cat(cols_parts) if cols_parts else empty_long,
                           torch.cat(S_parts) if S_parts else torch.zeros(0, dtype=dt, device=dev), block_logdet, var)


def conjugate_gradient_means(A: torch.Tensor, psi: torch.Tensor, prec: torch.Tensor, h: torch.Tensor,
                             start: torch.Tensor, cov: GeneCovariances, rtol: float = 1e-6,
                             max_iter: int = 200) -> torch.Tensor:
    """m_g = P_g^-1 h_g for all genes by conjugate gradients preconditioned with S_g, from ``start``. Each iterate
    lowers 1/2 m^T P m - h^T m for every gene (so the ELBO rises even when stopped early); stops when every gene's
    preconditioned residual sqrt(r^T S r) is below ``rtol`` times sqrt(h^T S h)."""
    psi_col = psi[:, None]
    # row-major: each gene's weights adjacent (h often arrives as a transpose, and a column-major solve runs its
    # row-wise products and dots strided, several times slower)
    h, start = h.contiguous(), start.contiguous()

    def product(V):
        out = (V @ A).mul_(psi_col)
        return out.addcmul_(prec, V)

    def dot(U, V):
        return torch.linalg.vecdot(U, V)

    tiny = torch.finfo(h.dtype).tiny
    x = start.clone()
    r = h - product(x)
    z = cov.apply(r)
    p = z.clone()
    rz = dot(r, z)
    # stop on the preconditioned residual r^T S r (free: CG needs it anyway), relative to h^T S h
    target = rtol**2 * dot(h, cov.apply(h)).clamp_min(tiny)
    for _ in range(max_iter):
        if bool((rz <= target).all()):
            break
        Pp = product(p)
        curvature = dot(p, Pp)
        alpha = torch.where(curvature > 0, rz / curvature.clamp_min(tiny), torch.zeros_like(rz))[:, None]
        x.addcmul_(alpha, p)
        r.addcmul_(alpha, Pp, value=-1.0)
        z = cov.apply(r)
        rz_new = dot(r, z)
        beta = torch.where(rz > 0, rz_new / rz.clamp_min(tiny), torch.zeros_like(rz))[:, None]
        p = z.addcmul_(beta, p)
        rz = rz_new
    return x
