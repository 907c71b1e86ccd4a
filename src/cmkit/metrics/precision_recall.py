"""Improved precision and recall (Kynkäänniemi et al. 2019, arXiv 1904.06991), k-NN manifold estimator.

As in the ADM evaluator's ``ManifoldEstimator`` (used by the Consistency Models code): the manifold of a set
is the union of balls around its points whose radius is the distance to the k-th nearest neighbour in the same
set (k = 3, the point itself excluded, no radius clamping). Precision is the fraction of samples that fall in the
reference manifold; recall is the fraction of reference points that fall in the sample manifold. Pairwise squared
distances ||u||² − 2u·v + ||v||² are computed in row × column blocks so that memory stays bounded.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import CmkitError


def _sq_dists(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    d = u.square().sum(1, keepdim=True) - 2 * u @ v.T + v.square().sum(1)[None]
    return d.clamp_min_(0)


def manifold_radii(features: np.ndarray, k: int = 3, batch_size: int = 5000) -> np.ndarray:
    """Squared distance from each row to its k-th nearest other row, (N,)."""
    f = torch.as_tensor(np.asarray(features), dtype=torch.float32)
    if f.shape[0] <= k:
        raise CmkitError(f"precision/recall with k={k} needs more than {k} vectors, got {f.shape[0]}")
    radii = torch.empty(f.shape[0])
    for i in range(0, f.shape[0], batch_size):
        rows = f[i : i + batch_size]
        d = torch.cat([_sq_dists(rows, f[j : j + batch_size]) for j in range(0, f.shape[0], batch_size)], dim=1)
        radii[i : i + batch_size] = d.topk(k + 1, dim=1, largest=False).values[:, k]  # index 0: the point itself
    return radii.numpy()


def _coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, batch_size: int) -> np.ndarray:
    """For each point, whether it lies in some ball (centre, radius) (squared distances, <= as in ADM)."""
    inside = torch.zeros(points.shape[0], dtype=torch.bool)
    for i in range(0, points.shape[0], batch_size):
        rows = points[i : i + batch_size]
        for j in range(0, centres.shape[0], batch_size):
            d = _sq_dists(rows, centres[j : j + batch_size])
            inside[i : i + batch_size] |= (d <= radii[None, j : j + batch_size]).any(dim=1)
    return inside.numpy()


def precision_recall(
    real_features: np.ndarray,
    fake_features: np.ndarray,
    k: int = 3,
    batch_size: int = 5000,
    real_radii: np.ndarray | None = None,
) -> tuple[float, float]:
    """(precision, recall) of ``fake_features`` against ``real_features`` (Kynkäänniemi et al. 2019, k = 3).

    ``real_radii`` may pass precomputed :func:`manifold_radii` of the real set (they depend only on it and k).
    """
    real = torch.as_tensor(np.asarray(real_features), dtype=torch.float32)
    fake = torch.as_tensor(np.asarray(fake_features), dtype=torch.float32)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise CmkitError(
            f"precision/recall need feature arrays (N, D) of the same D, got {tuple(real.shape)} "
            f"and {tuple(fake.shape)}"
        )
    if real_radii is None:
        real_radii = manifold_radii(real.numpy(), k, batch_size)
    if len(real_radii) != real.shape[0]:
        raise CmkitError(f"got {len(real_radii)} radii for {real.shape[0]} real feature vectors")
    fake_radii = torch.from_numpy(manifold_radii(fake.numpy(), k, batch_size))
    precision = _coverage(fake, real, torch.as_tensor(real_radii, dtype=torch.float32), batch_size).mean()
    recall = _coverage(real, fake, fake_radii, batch_size).mean()
    return float(precision), float(recall)
