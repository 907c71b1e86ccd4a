"""The generic zero-shot editor: CM Algorithm 4 (Song et al. 2023, Appendix D).

Given a reference y, an orthogonal A, the mask Ω of unknown coefficients and descending σ_1 > … > σ_N:

    y ← A⁻¹[(Ay)⊙(1−Ω)]                  (the known part only)
    x ~ N(start, σ_1² I)                  (start = y by default; stroke-guided generation starts at the strokes)
    for n = 1 … N:
        if n > 1: x ← x + sqrt(σ_n² − σ_min²)·z
        x ← clamp(f_θ(x, σ_n));  x ← A⁻¹[(Ay)⊙(1−Ω) + (Ax)⊙Ω]

After every step, and so in the output, the known coefficients equal the reference's exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ..errors import CmkitError
from ..sampling import NoiseSource, randn, validate_sigmas
from ..schedules import SIGMA_MAX, SIGMA_MIN, grid_levels, karras_sigmas, nearest_grid_index


class Transform(Protocol):
    def forward(self, x: Tensor) -> Tensor: ...

    def inverse(self, c: Tensor) -> Tensor: ...


def replace(transform: Transform, known: Tensor, x: Tensor, omega: Tensor) -> Tensor:
    """A⁻¹[(A y)⊙(1−Ω) + (A x)⊙Ω] with ``known`` = A y already computed."""
    return transform.inverse(known * (1 - omega) + transform.forward(x) * omega)


def default_edit_sigmas(
    steps: int | None = None,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    grid: Sequence[float] | None = None,
) -> list[float]:
    """``steps`` descending σ levels from ``sigma_max`` down, without σ_min (a step at σ_min is the identity).

    Without ``grid``: the first ``steps`` (default 18) levels of a (steps + 1)-level Karras grid from
    ``sigma_max`` to ``sigma_min``. With ``grid``, the σ levels the model was trained on
    (``cmkit.schedules.training_grid``), the same spacing taken on the grid: it starts at the level nearest
    ``sigma_max`` (index i0) and takes the levels at indices round(linspace(i0, N − 1, steps + 1)) but the last;
    the default ``steps`` is every level from i0 down but σ_min (N − 1 levels from σ_max, as the CM notebook
    edits with all 18 levels of its CIFAR-10 CD grid). More steps than the grid holds is a ``CmkitError``.
    """
    if grid is None:
        steps = 18 if steps is None else steps
        return karras_sigmas(steps + 1, sigma_min, sigma_max).tolist()[:-1]
    grid = [float(g) for g in grid]
    i0 = nearest_grid_index(sigma_max, grid)
    available = len(grid) - 1 - i0
    steps = available if steps is None else steps
    if not 1 <= steps <= available:
        raise CmkitError(
            f"{steps} editing σ levels do not fit on the {len(grid)}-level grid this model was trained "
            f"on from σ = {grid[i0]:.4g} down (at most {available}); give explicit σ values "
            f"(--sigmas) to edit off the grid"
        )
    return grid_levels(grid, steps + 1, i0, len(grid) - 1)[:-1]


@torch.no_grad()
def edit(
    model: nn.Module,
    y: Tensor,
    sigmas: Sequence[float],
    transform: Transform,
    omega: Tensor,
    *,
    start: Tensor | None = None,
    generator: NoiseSource = None,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    clip: bool = True,
    callback: Callable[[int, Tensor], None] | None = None,
    **cond: Any,
) -> Tensor:
    """Run Algorithm 4. y: (B, C, H, W) in [-1, 1]; omega broadcastable to y (1 = unknown coefficient)."""
    s = validate_sigmas(sigmas, sigma_min, sigma_max)
    if omega.shape[-2:] != y.shape[-2:]:
        raise ValueError(f"mask of shape {tuple(omega.shape)} does not match images of shape {tuple(y.shape)}")
    omega = omega.to(y)
    known = transform.forward(y) * (1 - omega)
    y_known = transform.inverse(known)
    x0 = start if start is not None else y_known
    x = x0 + s[0] * randn(y.shape, generator, y.device)
    for n, sigma in enumerate(s):
        if n > 0:
            x = x + math.sqrt(sigma**2 - sigma_min**2) * randn(y.shape, generator, y.device)
        x = model(x, torch.full((y.shape[0],), sigma, device=y.device), **cond)
        x = x.clamp(-1, 1) if clip else x
        x = replace(transform, known, x, omega)
        if callback is not None:
            callback(n, x)
    return x
