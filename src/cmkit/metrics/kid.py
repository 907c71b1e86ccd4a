"""Kernel Inception Distance (Bińkowski et al. 2018, "Demystifying MMD GANs", arXiv 1801.01401).

The unbiased estimator of the squared MMD with the cubic polynomial kernel k(x, y) = (x·y / d + 1)³,
averaged over random subsets, as in the authors' ``polynomial_mmd_averages`` (also used by clean-fid and
torch-fidelity): per subset m = min(subset_size, N₁, N₂) vectors are drawn without replacement from each set;
MMD²_u = Σ_{i≠j} k(xᵢ,xⱼ)/(m(m−1)) + Σ_{i≠j} k(yᵢ,yⱼ)/(m(m−1)) − 2 Σ_{i,j} k(xᵢ,yⱼ)/m².
Reported as the mean and standard deviation over subsets (raw value, not ×1000).
"""

from __future__ import annotations

import numpy as np

from ..errors import CmkitError


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, coef0: float = 1.0) -> np.ndarray:
    """k(x, y) = (x·y / d + 1)^degree for all pairs of rows."""
    return (x @ y.T / x.shape[1] + coef0) ** degree


def mmd2_unbiased(x: np.ndarray, y: np.ndarray, degree: int = 3) -> float:
    """Unbiased MMD² between two equally sized samples (m, D) with the polynomial kernel (Bińkowski et al. 2018)."""
    m = x.shape[0]
    if y.shape[0] != m or m < 2:
        raise CmkitError(f"MMD needs two samples of the same size >= 2, got {x.shape[0]} and {y.shape[0]}")
    k_xx, k_yy, k_xy = polynomial_kernel(x, x, degree), polynomial_kernel(y, y, degree), polynomial_kernel(x, y, degree)
    sum_xx = k_xx.sum() - np.trace(k_xx)
    sum_yy = k_yy.sum() - np.trace(k_yy)
    return float((sum_xx + sum_yy) / (m * (m - 1)) - 2 * k_xy.sum() / (m * m))


def kernel_inception_distance(
    features1: np.ndarray,
    features2: np.ndarray,
    n_subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    seed: int = 0,
) -> tuple[float, float]:
    """KID between feature sets (N₁, D) and (N₂, D): (mean, std) of the unbiased MMD² over random subsets."""
    f1, f2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
        raise CmkitError(f"KID needs feature arrays (N, D) of the same D, got {f1.shape} and {f2.shape}")
    m = min(subset_size, f1.shape[0], f2.shape[0])
    rng = np.random.default_rng(seed)
    values = np.array(
        [
            mmd2_unbiased(
                f1[rng.choice(f1.shape[0], m, replace=False)], f2[rng.choice(f2.shape[0], m, replace=False)], degree
            )
            for _ in range(n_subsets)
        ]
    )
    return float(values.mean()), float(values.std())
