"""Scores of a fit against truth or labels: mask F1, factor matching, AUROC, refined annotations."""
from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["active_mask", "mask_f1", "match_factors", "auroc", "refined_annotations", "orient", "factor_r2",
           "membership_probability", "top_gene_share", "one_gene_factors", "ONE_GENE_SHARE"]

#: A gene is active in a factor when |w_gk| > ACTIVE_FRACTION * max_g |w_gk| (the spex-LVM F1 rule).
ACTIVE_FRACTION = 0.1


#: A factor is a one-gene factor when its largest gene holds more than this share of its squared loadings: its
#: score is then mostly that gene's expression (a Heywood case of factor analysis), not a program's
ONE_GENE_SHARE = 0.5


def top_gene_share(W) -> np.ndarray:
    """Each factor's share of its squared loadings held by its largest gene (columns of W, genes x factors): 1 for
    a factor of one gene, 1/G when every gene loads equally; 0 for a factor without loadings."""
    W2 = np.asarray(W, dtype=float) ** 2
    total = W2.sum(axis=0)
    return np.divide(W2.max(axis=0, initial=0.0), total, out=np.zeros_like(total), where=total > 0)


def one_gene_factors(loadings: pd.DataFrame) -> pd.Series:
    """The gene of each one-gene factor (:func:`top_gene_share` above ONE_GENE_SHARE) of ``loadings`` (genes x
    factors), indexed by factor."""
    share = pd.Series(top_gene_share(loadings.to_numpy()), index=loadings.columns)
    return loadings.abs().idxmax()[share > ONE_GENE_SHARE].astype(str)


def active_mask(W, fraction: float = ACTIVE_FRACTION) -> np.ndarray:
    """Boolean genes x factors mask of learned active genes: ``|w_gk| > fraction * max_g |w_gk|``."""
    A = np.abs(np.asarray(W, dtype=float))
    top = A.max(axis=0, keepdims=True)
    return (A > fraction * top) & (top > 0)


def membership_probability(W, W_sd, fraction: float = ACTIVE_FRACTION):
    """Posterior probability that each gene is active in each factor: P(|w_gk| > delta_k) under the marginal
    q(w_gk) = N(m_gk, s_gk^2), with the active-gene threshold delta_k = ``fraction`` * max_g |m_gk| of
    :func:`active_mask` (the threshold is a point estimate; its own uncertainty is left out). Same type and shape
    as ``W`` (a DataFrame stays one)."""
    from scipy.stats import norm

    m, s = np.asarray(W, dtype=float), np.asarray(W_sd, dtype=float)
    if m.shape != s.shape:
        raise ValueError(f"loadings have shape {m.shape} but their sds {s.shape}")
    delta = fraction * np.abs(m).max(axis=0, keepdims=True)
    s = np.maximum(s, 1e-300)
    p = norm.sf((delta - m) / s) + norm.cdf((-delta - m) / s)
    return pd.DataFrame(p, index=W.index, columns=W.columns) if isinstance(W, pd.DataFrame) else p


def mask_f1(true_mask, W, fraction: float = ACTIVE_FRACTION) -> float:
    """F1 of the learned active genes (see :func:`active_mask`) against a true genes x factors mask,
    columns already aligned, computed over all entries."""
    true_mask = np.asarray(true_mask, dtype=bool)
    learned = active_mask(W, fraction)
    if true_mask.shape != learned.shape:
        raise ValueError(f"true mask has shape {true_mask.shape} but loadings have {learned.shape}")
    tp = int((true_mask & learned).sum())
    wrong = int((true_mask ^ learned).sum())                 # false positives + false negatives
    return 2 * tp / (2 * tp + wrong) if tp else 0.0          # scikit-learn's f1_score with zero_division=0


def match_factors(A, B) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Match the columns of ``A`` to those of ``B`` by maximal total absolute correlation (Hungarian).

    Returns (columns of A, columns of B, absolute correlation of each matched pair).
    """
    A, B = np.asarray(A, dtype=float), np.asarray(B, dtype=float)
    A = (A - A.mean(0)) / (A.std(0) + 1e-12)
    B = (B - B.mean(0)) / (B.std(0) + 1e-12)
    corr = np.abs(A.T @ B) / A.shape[0]
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(-corr)
    return rows, cols, corr[rows, cols]


def auroc(scores, labels, positive) -> float:
    """Area under the ROC curve of ``scores`` for ``labels == positive`` against all other cells."""
    y = np.asarray(pd.Series(labels).astype(str) == str(positive))
    if y.all() or not y.any():
        raise ValueError(f"labels must contain {positive!r} and at least one other value")
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, np.asarray(scores, dtype=float)))


def orient(W, annotation=None) -> np.ndarray:
    """Signs (+1/-1 per factor) that make each factor's loadings point up: the summed loading of its
    annotated genes is positive (or, for unannotated factors, its largest loading is positive)."""
    W = np.asarray(W, dtype=float)
    ref = W[np.argmax(np.abs(W), axis=0), np.arange(W.shape[1])]
    if annotation is not None:
        M = np.asarray(annotation, dtype=bool)
        total = (W * M).sum(0)
        ref = np.where(M.any(0) & (total != 0), total, ref)
    return np.where(ref < 0, -1.0, 1.0)


def refined_annotations(loadings: pd.DataFrame, annotation: pd.DataFrame,
                        fraction: float = ACTIVE_FRACTION, loadings_sd: pd.DataFrame | None = None) -> pd.DataFrame:
    """Genes the data add to and remove from each annotated term.

    Rule: a gene is *active* in a factor when ``|w_gk| > fraction * max_g |w_gk|``; *gained* genes are active
    but not annotated, *lost* genes are annotated but not active. Unannotated factors are skipped.
    Returns one row per term: ``term``, ``n_annotated``, ``n_active``, ``gained`` and ``lost`` (lists of genes,
    gained sorted by decreasing |loading|). With ``loadings_sd`` (posterior sds), also ``p_gained`` and
    ``p_lost``: each listed gene's :func:`membership_probability`, in the same order.
    """
    ann = annotation.reindex(index=loadings.index, columns=loadings.columns, fill_value=False).astype(bool)
    active = pd.DataFrame(active_mask(loadings.to_numpy(), fraction), index=loadings.index, columns=loadings.columns)
    prob = None
    if loadings_sd is not None:
        sd = loadings_sd.reindex(index=loadings.index, columns=loadings.columns)
        prob = membership_probability(loadings, sd, fraction)
    rows = []
    for term in loadings.columns:
        if not ann[term].any():
            continue
        strength = loadings[term].abs()
        gained = strength[active[term] & ~ann[term]].sort_values(ascending=False).index.tolist()
        lost = strength[ann[term] & ~active[term]].sort_values().index.tolist()
        row = dict(term=term, n_annotated=int(ann[term].sum()), n_active=int(active[term].sum()),
                   gained=gained, lost=lost)
        if prob is not None:
            row.update(p_gained=[float(prob.at[g, term]) for g in gained], p_lost=[float(prob.at[g, term]) for g in lost])
        rows.append(row)
    columns = ["term", "n_annotated", "n_active", "gained", "lost"]
    return pd.DataFrame(rows, columns=columns + (["p_gained", "p_lost"] if prob is not None else []))


def factor_r2(Y, X, W) -> np.ndarray:
    """Centred R^2 of each factor alone: ``1 - ||Y - x_k w_k^T||^2 / ||Y||^2`` for centred ``Y`` (N x G),
    scores ``X`` (N x K) and loadings ``W`` (G x K), without forming any N x G residual."""
    Y = Y.astype(np.float64) if hasattr(Y, "tocsr") else np.asarray(Y, dtype=np.float64)
    X, W = np.asarray(X, dtype=np.float64), np.asarray(W, dtype=np.float64)
    top = float(abs(Y).max()) if min(Y.shape) > 0 else 0.0
    if 0.0 < top < np.inf:  # R^2 is the same for (c Y, X, c W): work at |Y| <= 1 (c a power of two, exact), so that
        c = 2.0 ** -np.frexp(top)[1]  # no square of tiny or huge data under- or overflows
        Y, W = Y * c, W * c
    total = float((Y.multiply(Y)).sum()) if hasattr(Y, "multiply") else float((Y * Y).sum())
    YW = np.asarray(Y @ W)
    explained = 2 * (X * YW).sum(0) - (X * X).sum(0) * (W * W).sum(0)
    return explained / max(total, 1e-300)
