"""Fréchet distance between Gaussians fitted to features (FID; Heusel et al. 2017, arXiv 1706.08500).

d² = ||μ₁ − μ₂||² + Tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^{1/2}), computed as in the TTUR code and the ADM evaluator
(``evaluations/evaluator.py::FIDStatistics.frechet_distance``): ``scipy.linalg.sqrtm`` of Σ₁Σ₂; if the
result is not finite, retry with ε·I added to both covariances (ε = 1e-6); drop a negligible imaginary part.
Covariances use ``np.cov(rowvar=False)`` (the unbiased N − 1 estimator) in float64. scipy (``cmkit[metrics]``)
is imported on first use, so that a core install can import this module.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from types import ModuleType

import numpy as np

from ..errors import CmkitError, optional_import


@dataclass(frozen=True)
class FeatureStats:
    """Mean (D,) and covariance (D, D) of a feature set, float64, and the number of vectors behind them."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int = 0


def feature_statistics(features: np.ndarray) -> FeatureStats:
    """μ and Σ of features (N, D), as the reference evaluators compute them (float64, ``np.cov(rowvar=False)``)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise CmkitError(f"features must be (N, D) with N >= 2, got shape {f.shape}")
    return FeatureStats(mu=f.mean(axis=0), sigma=np.cov(f, rowvar=False), n=f.shape[0])


def require_scipy() -> ModuleType:
    """``scipy.linalg``, or a one-line :class:`CmkitError` naming the ``cmkit[metrics]`` extra."""
    return optional_import("scipy.linalg", "metrics", "the Fréchet distance (cmkit eval)")


def _sqrtm(a: np.ndarray) -> np.ndarray:
    linalg = require_scipy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # singular products are handled below, as in TTUR
        return linalg.sqrtm(a)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017, TTUR/ADM numerics)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise CmkitError(
            f"feature statistics do not match: mu {mu1.shape} vs {mu2.shape}, "
            f"sigma {sigma1.shape} vs {sigma2.shape} (different feature extractors?)"
        )
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag)):.3g} in sqrtm(Σ1Σ2)")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def frechet_distance_stats(a: FeatureStats, b: FeatureStats, eps: float = 1e-6) -> float:
    """:func:`frechet_distance` for two :class:`FeatureStats`."""
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma, eps=eps)
