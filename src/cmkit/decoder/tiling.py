"""Overlapping latent tiles and their blending windows, for decoding in memory bounded by the tile size.

The decoder is fully convolutional (no attention), so its activation memory grows with the pixel
count (§3.3: +1.6 GiB at 256², +5.2 GiB at 512², ~20 GiB extrapolated at 1024²), and diffusers has no
tiled decode (§2.1, §4 issue 3). Tiles are laid out in latent space, evenly spaced so that neighbours
overlap by at least ``overlap`` latents; each tile's x0 estimate is weighted by a window that is 1 inside
and falls off as sin² / cos² across each overlap with a neighbour (the two weights sum to 1 there), so
seams are blended, never cut. §6.9 warns that tiling cannot be exact: GroupNorm statistics and the
receptive field are per tile; ``sampler.py`` keeps the noise identical to the untiled decode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import CmkitError


@dataclass(frozen=True)
class Tile:
    """A latent-space window [y0, y1) × [x0, x1) and the overlaps with its neighbours (in latents)."""

    y0: int
    y1: int
    x0: int
    x1: int
    top: int = 0
    bottom: int = 0
    left: int = 0
    right: int = 0

    def pixels(self, upscale: int) -> tuple[slice, slice]:
        return slice(self.y0 * upscale, self.y1 * upscale), slice(self.x0 * upscale, self.x1 * upscale)

    def latents(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y1), slice(self.x0, self.x1)


def spans(size: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """Evenly spaced windows of length ``min(tile, size)`` covering [0, size), neighbours overlapping by at least
    ``overlap``."""
    if tile >= size:
        return [(0, size)]
    n = math.ceil((size - overlap) / (tile - overlap))
    starts = [round(i * (size - tile) / (n - 1)) for i in range(n)]
    return [(s, s + tile) for s in starts]


def plan_tiles(h: int, w: int, tile: int, overlap: int) -> list[Tile]:
    """The tile grid for an h×w latent; one tile (the whole latent) when it fits."""
    if tile < 1 or overlap < 0 or overlap >= tile:
        raise CmkitError(f"need tile >= 1 and 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
    rows, cols = spans(h, tile, overlap), spans(w, tile, overlap)
    tiles = []
    for i, (y0, y1) in enumerate(rows):
        for j, (x0, x1) in enumerate(cols):
            tiles.append(
                Tile(
                    y0,
                    y1,
                    x0,
                    x1,
                    top=rows[i - 1][1] - y0 if i > 0 else 0,
                    bottom=y1 - rows[i + 1][0] if i + 1 < len(rows) else 0,
                    left=cols[j - 1][1] - x0 if j > 0 else 0,
                    right=x1 - cols[j + 1][0] if j + 1 < len(cols) else 0,
                )
            )
    return tiles


def ramp(n: int) -> Tensor:
    """sin²(π/2 · (p + ½)/n), p = 0…n−1: rises from ≈0 to ≈1; ramp(n) + ramp(n).flip(0) = 1."""
    p = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return torch.sin(p * math.pi / 2) ** 2


def window_1d(length: int, before: int, after: int) -> Tensor:
    """Weights along one axis of a tile: ramps over the overlaps with the previous/next tile, 1 elsewhere."""
    w = torch.ones(length, dtype=torch.float64)
    if before:
        w[:before] *= ramp(before)
    if after:
        w[length - after :] *= ramp(after).flip(0)
    return w


def blend_window(tile: Tile, upscale: int) -> Tensor:
    """The (1, 1, th, tw) float32 pixel-space weight of a tile; windows of neighbours sum to 1 on overlaps."""
    wy = window_1d((tile.y1 - tile.y0) * upscale, tile.top * upscale, tile.bottom * upscale)
    wx = window_1d((tile.x1 - tile.x0) * upscale, tile.left * upscale, tile.right * upscale)
    return (wy[:, None] * wx[None, :]).float()[None, None]
