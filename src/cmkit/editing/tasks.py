"""Editing tasks built on Algorithm 4: inpainting, colorization, super-resolution, stroke-guided
generation, denoising and interpolation. All take a consistency model ``model(x, sigma) -> x0`` and
images in [-1, 1] of the model's shape (B, C, R, R).

``grid``: the σ levels the model was trained on (``cmkit.schedules.training_grid(cfg)``; None for
continuous-time models such as ECT). Given one, the default σ lists are levels of it
(``default_edit_sigmas``), the starting level of stroke-guided generation and the σ of image interpolation
move to the nearest level, and explicit ``sigmas`` off it are used as given with one warning line. The σ of
``denoise`` is the noise actually in the image and is never moved.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import CmkitError
from ..sampling import NoiseSource, randn
from ..schedules import SIGMA_MAX, SIGMA_MIN, nearest_grid_index, warn_off_grid
from .editor import default_edit_sigmas, edit
from .transforms import LUMA, ColorBasis, Identity, PatchBasis


def model_shape(model: nn.Module) -> tuple[int, int, int] | None:
    """(C, R, R) the model was built for, when its backbone records it."""
    net = getattr(model, "net", None)
    if net is None or not hasattr(net, "img_resolution"):
        return None
    return (net.in_channels, net.img_resolution, net.img_resolution)


def check_images(model: nn.Module, x: Tensor, what: str = "input") -> None:
    """Reject images whose (C, H, W) differ from the model's, with one clear message."""
    shape = model_shape(model)
    if shape is None:
        return
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(shape):
        got = "×".join(map(str, x.shape[1:])) if x.ndim == 4 else str(tuple(x.shape))
        raise CmkitError(
            f"{what} images are {got} but the model expects {'×'.join(map(str, shape))} (channels×height×width)"
        )


def _sigmas(sigmas: Sequence[float] | None, grid: Sequence[float] | None) -> list[float]:
    """The σ list of an Algorithm-4 task: ``sigmas`` as given (warned about when off ``grid``), else the default."""
    if sigmas:
        warn_off_grid(sigmas, grid)
        return list(sigmas)
    return default_edit_sigmas(grid=grid)


def _on_grid(sigma: float, grid: Sequence[float] | None) -> float:
    """The grid level nearest to σ (σ itself without a grid)."""
    return float(grid[nearest_grid_index(sigma, grid)]) if grid is not None else sigma


def inpaint(
    model: nn.Module,
    y: Tensor,
    mask: Tensor,
    sigmas: Sequence[float] | None = None,
    *,
    generator: NoiseSource = None,
    sigma_min: float = SIGMA_MIN,
    grid: Sequence[float] | None = None,
    **cond: Any,
) -> Tensor:
    """Fill the pixels where ``mask`` = 1 (unknown; shape (H, W), (1|B, 1|C, H, W)); keep the others."""
    check_images(model, y)
    if mask.shape[-2:] != y.shape[-2:]:
        raise CmkitError(f"mask is {mask.shape[-2]}×{mask.shape[-1]} but the image is {y.shape[-2]}×{y.shape[-1]}")
    omega = (mask.reshape(1, 1, *mask.shape[-2:]) if mask.ndim == 2 else mask).float()
    return edit(model, y, _sigmas(sigmas, grid), Identity(), omega, generator=generator, sigma_min=sigma_min, **cond)


def colorize(
    model: nn.Module,
    gray: Tensor,
    sigmas: Sequence[float] | None = None,
    *,
    generator: NoiseSource = None,
    sigma_min: float = SIGMA_MIN,
    grid: Sequence[float] | None = None,
    **cond: Any,
) -> Tensor:
    """Colour a grey image: luminance is kept, chroma generated. ``gray`` is (B, 1|3, H, W)."""
    y = to_gray3(gray)
    check_images(model, y)
    A = ColorBasis()
    return edit(
        model, y, _sigmas(sigmas, grid), A, A.unknown_mask(y.shape), generator=generator, sigma_min=sigma_min, **cond
    )


def to_gray3(x: Tensor) -> Tensor:
    """A grey image as 3 equal channels whose luminance equals that of ``x`` (1 or 3 channels)."""
    if x.shape[1] == 1:
        return x.repeat(1, 3, 1, 1)
    if x.shape[1] != 3:
        raise CmkitError(f"expected a grey or RGB image, got {x.shape[1]} channels")
    # L = w·x with w = LUMA / ΣLUMA. Since the weights sum to 1, (L, L, L) has the same luminance coordinate
    # q₁·x = LUMA·x / |LUMA| as x, so colorizing it keeps x's luminance.
    w = torch.tensor(LUMA, dtype=x.dtype, device=x.device)
    return torch.einsum("c,bchw->bhw", w / w.sum(), x)[:, None].repeat(1, 3, 1, 1)


def super_resolve(
    model: nn.Module,
    low: Tensor,
    factor: int,
    sigmas: Sequence[float] | None = None,
    *,
    generator: NoiseSource = None,
    sigma_min: float = SIGMA_MIN,
    grid: Sequence[float] | None = None,
    **cond: Any,
) -> Tensor:
    """×factor super-resolution of ``low`` (B, C, H/p, W/p): patch means are kept, details generated.

    avg_pool(output, p) equals ``low`` up to float error (the consistency check).
    """
    A = PatchBasis(factor)
    y = F.interpolate(low, scale_factor=factor, mode="nearest")
    check_images(model, y, f"low-resolution input ×{factor}: the")
    return edit(
        model, y, _sigmas(sigmas, grid), A, A.unknown_mask(y.shape), generator=generator, sigma_min=sigma_min, **cond
    )


# σ_1 of stroke-guided generation. The paper gives no value (Song et al. 2023, §7.6). On images in [-1, 1] at
# 28-32 px, σ = 20 drowns the strokes (the output ignores the layout) while σ = 5 keeps the layout and
# still replaces the flat tones with texture (docs/images/editing/stroke.png).
STROKE_SIGMA = 5.0


def stroke_guided(
    model: nn.Module,
    strokes: Tensor,
    sigma_start: float = STROKE_SIGMA,
    steps: int = 3,
    sigmas: Sequence[float] | None = None,
    *,
    generator: NoiseSource = None,
    sigma_min: float = SIGMA_MIN,
    grid: Sequence[float] | None = None,
    **cond: Any,
) -> Tensor:
    """SDEdit-like generation from a coarse stroke painting (CM §7.6): x = strokes + σ_1·z, then
    multistep consistency sampling over σ_1 > σ_2 > … (Alg. 4 with A = I and Ω = 1 everywhere).

    With ``grid`` the default levels start at the grid level nearest ``sigma_start`` (the reference's "ts
    starting at the index of t_1") and go down the grid."""
    if sigmas:
        warn_off_grid(sigmas, grid)
    elif grid is not None:
        sigmas = default_edit_sigmas(steps, sigma_min, sigma_start, grid)
    else:
        sigmas = default_edit_sigmas(steps, sigma_min, sigma_start) if steps > 1 else [sigma_start]
    check_images(model, strokes)
    A = Identity()
    return edit(
        model,
        strokes,
        sigmas,
        A,
        torch.ones(1, 1, *strokes.shape[-2:]),
        start=strokes,
        generator=generator,
        sigma_min=sigma_min,
        sigma_max=max(SIGMA_MAX, sigmas[0]),
        **cond,
    )


@torch.no_grad()
def denoise(model: nn.Module, noisy: Tensor, sigma: float, **cond: Any) -> Tensor:
    """One evaluation at the known noise level: clamp(f_θ(y, σ)), valid for σ in [σ_min, σ_max]."""
    check_images(model, noisy)
    return model(noisy, torch.full((noisy.shape[0],), float(sigma), device=noisy.device), **cond).clamp(-1, 1)


def slerp(z1: Tensor, z2: Tensor, alpha: float) -> Tensor:
    """Spherical interpolation of the un-normalised noises z1, z2 (per sample; CM §7.8)."""
    u1, u2 = F.normalize(z1.flatten(1), dim=1), F.normalize(z2.flatten(1), dim=1)
    theta = torch.arccos((u1 * u2).sum(1).clamp(-1, 1)).reshape(-1, *[1] * (z1.ndim - 1))
    if alpha == 0:
        return z1.clone()
    if alpha == 1:
        return z2.clone()
    sin = torch.sin(theta).clamp(min=1e-8)
    return torch.sin((1 - alpha) * theta) / sin * z1 + torch.sin(alpha * theta) / sin * z2


@torch.no_grad()
def interpolate_noise(
    model: nn.Module, z1: Tensor, z2: Tensor, frames: int = 9, sigma_max: float = SIGMA_MAX, **cond: Any
) -> Tensor:
    """One-step samples f(T·slerp(z1, z2, α), T) for α in linspace(0, 1, frames) → (frames, B, C, H, W)."""
    out = []
    for a in torch.linspace(0, 1, frames).tolist():
        z = slerp(z1, z2, a)
        out.append(model(sigma_max * z, torch.full((z.shape[0],), sigma_max, device=z.device), **cond).clamp(-1, 1))
    return torch.stack(out)


@torch.no_grad()
def interpolate_images(
    model: nn.Module,
    x1: Tensor,
    x2: Tensor,
    frames: int = 9,
    sigma: float = 2.0,
    *,
    generator: NoiseSource = None,
    grid: Sequence[float] | None = None,
    **cond: Any,
) -> Tensor:
    """Interpolate two images through their noised versions: n(α) = lerp(x1, x2, α) + σ·slerp(z1, z2, α),
    then one evaluation f(n(α), σ) → (frames, B, C, H, W). With ``grid``, σ is the grid level nearest ``sigma``."""
    sigma = _on_grid(sigma, grid)
    check_images(model, x1)
    check_images(model, x2)
    z1, z2 = randn(x1.shape, generator, x1.device), randn(x1.shape, generator, x1.device)
    out = []
    for a in torch.linspace(0, 1, frames).tolist():
        n = torch.lerp(x1, x2, a) + sigma * slerp(z1, z2, a)
        out.append(denoise(model, n, sigma, **cond))
    return torch.stack(out)
