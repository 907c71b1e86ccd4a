"""Inception Score (Salimans et al. 2016, arXiv 1606.03498), computed as the ADM evaluator does.

IS = exp(E_x KL(p(y|x) ‖ p(y))), with p(y) the mean prediction of the split. As in openai/guided-diffusion's
``evaluations/evaluator.py::compute_inception_score`` (the evaluator of the Consistency Models paper), the
predictions are cut into consecutive splits of ``split_size`` = 5000 (so 50,000 samples give 10 splits; the last
split may be smaller), the score of each split is computed and the mean over splits is reported. The
predictions are the softmax of the FID Inception's logits (pool_3 times the softmax weights, no bias). Terms
with p(y|x) = 0 contribute 0 (the limit of p log p), so exactly one-hot predictions are allowed.
"""

from __future__ import annotations

import numpy as np

from ..errors import CmkitError

SPLIT_SIZE = 5000  # the evaluator's split_size


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def inception_score(probs: np.ndarray, split_size: int = SPLIT_SIZE) -> float:
    """The mean over consecutive splits of ``split_size`` rows of exp(mean KL(p(y|x) ‖ p(y))); ``probs`` (N, K)
    are class probabilities (rows summing to 1)."""
    p = np.asarray(probs, np.float64)
    if p.ndim != 2 or p.shape[0] == 0 or p.shape[1] < 1:
        raise CmkitError(f"the Inception Score needs class probabilities (N, K), got shape {p.shape}")
    if split_size < 1:
        raise CmkitError(f"split_size must be positive, got {split_size}")
    if not np.isfinite(p).all() or (p < 0).any() or not np.allclose(p.sum(axis=1), 1, atol=1e-4):
        raise CmkitError("the Inception Score needs rows of non-negative probabilities that sum to 1")
    scores = []
    for i in range(0, len(p), split_size):
        part = p[i : i + split_size]
        marginal = part.mean(axis=0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0.0)
        scores.append(np.exp(terms.sum(axis=1).mean()))
    return float(np.mean(scores))


def inception_score_from_logits(logits: np.ndarray, split_size: int = SPLIT_SIZE) -> float:
    """:func:`inception_score` of ``softmax(logits)``."""
    return inception_score(softmax(logits), split_size)


__all__ = ["SPLIT_SIZE", "inception_score", "inception_score_from_logits", "softmax"]
