"""Per-sample distances d(a, b) -> (B,) for consistency losses.

``l2``/``l1`` are means over C·H·W (``mean_flat`` in the CM code); ``pseudo_huber`` is the iCT metric
sqrt(||a-b||² + c²) - c over the L2 *norm* of all pixels (Song & Dhariwal 2023, Eq. 8), with the
default c = 0.00054·√d; with c = 0 it is the plain L2 norm (ECT on CIFAR-10). ``lpips`` is VGG-LPIPS
(Zhang et al. 2018) with weights loaded from a user-given path.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .lpips import LazyLPIPS

Distance = Callable[[Tensor, Tensor], Tensor]


def l2(a: Tensor, b: Tensor) -> Tensor:
    return (a - b).float().square().flatten(1).mean(1)


def l1(a: Tensor, b: Tensor) -> Tensor:
    return (a - b).float().abs().flatten(1).mean(1)


def default_huber_c(shape: torch.Size | tuple[int, ...]) -> float:
    """iCT's c = 0.00054·√d with d = C·H·W (0.0299 for CIFAR-10, 0.0151 for 28×28×1)."""
    return 0.00054 * math.sqrt(math.prod(shape))


def pseudo_huber(a: Tensor, b: Tensor, c: float | None = None) -> Tensor:
    """sqrt(||a - b||₂² + c²) - c per sample; c=None uses the iCT default, c=0 gives ||a - b||₂."""
    diff = (a - b).float().flatten(1)
    c = default_huber_c(a.shape[1:]) if c is None else c
    if c == 0:
        return torch.linalg.vector_norm(diff, dim=1)  # subgradient 0 at 0, no NaN
    return (diff.square().sum(1) + c * c).sqrt() - c


def get_distance(name: str, huber_c: float | None = None, lpips_weights: str | None = None) -> Distance:
    """Look up a distance by name: ``l2``, ``l1``, ``pseudo_huber`` or ``lpips``."""
    if name == "l2":
        return l2
    if name == "l1":
        return l1
    if name == "pseudo_huber":
        return lambda a, b: pseudo_huber(a, b, huber_c)
    if name == "lpips":
        return LazyLPIPS(lpips_weights)
    raise ValueError(f"unknown distance {name!r}; expected one of l2, l1, pseudo_huber, lpips")
