"""An editing gallery on held-out images: one panel per task (input | mask or transform | output).

``make demo`` writes it with the shipped models (``demo/gallery/TASK.png``), so every task of CM
Algorithm 4 can be looked at on images no model was trained on: the Fashion-MNIST test split for the
grey tasks and the held-out emoji split for colorization.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..imageio import save_grid
from . import tasks
from .masks import builtin_mask

# The column titles of each panel, for the printed index and the README.
COLUMNS = {
    "inpaint": "input | masked (grey = to generate) | output",
    "superres": "ground truth | ×4 low-res input (nearest) | output",
    "stroke": f"ground truth | stroke painting | output (σ_start = {tasks.STROKE_SIGMA:g}, or the nearest level of the "
    "model's training grid, 3 steps)",
    "denoise": "clean | noisy (σ = 0.5) | output (1 evaluation)",
    "interpolate": "rows: image A | 7 interpolated frames | image B",
    "colorize": "ground truth | grey input | output",
}


def stroke_painting(x: Tensor, block: int = 4, levels: int = 4) -> Tensor:
    """A coarse "stroke painting" of ``x``: block averages quantised to a few flat tones (CM §7.6 input)."""
    coarse = F.interpolate(F.avg_pool2d(x, block), scale_factor=block, mode="nearest")
    return (torch.round((coarse + 1) / 2 * (levels - 1)) / (levels - 1) * 2 - 1).clamp(-1, 1)


def _panel(columns: list[Tensor], path: Path) -> Path:
    """Rows = images, columns = stages; grey columns are broadcast to the output's channels."""
    C = max(c.shape[1] for c in columns)
    rows = torch.stack([c.expand(-1, C, -1, -1).clamp(-1, 1) for c in columns], 1).flatten(0, 1)
    return save_grid(rows, path, nrow=len(columns))


def grey_gallery(
    model: nn.Module, x: Tensor, out: Path, seed: int = 0, grid: Sequence[float] | None = None
) -> dict[str, Path]:
    """Inpainting, ×4 super-resolution, stroke-guided generation, denoising and interpolation on ``x``;
    ``grid``: the model's training σ levels (``training_grid(cfg)``), for its default σ lists."""
    R = x.shape[-1]
    written: dict[str, Path] = {}

    def g() -> torch.Generator:
        return torch.Generator().manual_seed(seed)

    mask = builtin_mask("center", R)
    written["inpaint"] = _panel(
        [x, x * (1 - mask), tasks.inpaint(model, x, mask, generator=g(), grid=grid)], out / "inpaint.png"
    )
    if R % 4 == 0:
        low = F.avg_pool2d(x, 4)
        written["superres"] = _panel(
            [
                x,
                F.interpolate(low, scale_factor=4, mode="nearest"),
                tasks.super_resolve(model, low, 4, generator=g(), grid=grid),
            ],
            out / "superres.png",
        )
    strokes = stroke_painting(x)
    stroked = tasks.stroke_guided(model, strokes, tasks.STROKE_SIGMA, 3, generator=g(), grid=grid)
    written["stroke"] = _panel([x, strokes, stroked], out / "stroke.png")
    noisy = x + 0.5 * torch.randn(x.shape, generator=g())
    written["denoise"] = _panel([x, noisy, tasks.denoise(model, noisy, 0.5)], out / "denoise.png")
    a, b = x[0::2][:4], x[1::2][:4]
    frames = tasks.interpolate_images(model, a, b, frames=7, sigma=2.0, generator=g(), grid=grid)  # (7, B, C, H, W)
    strip = torch.cat([a[None], frames, b[None]]).transpose(0, 1).flatten(0, 1)
    written["interpolate"] = save_grid(strip, out / "interpolate.png", nrow=9)
    return written


def colour_gallery(
    model: nn.Module, x: Tensor, out: Path, seed: int = 0, grid: Sequence[float] | None = None
) -> dict[str, Path]:
    """Colorization of the grey versions of the colour images ``x``; ``grid`` as in ``grey_gallery``."""
    gray = tasks.to_gray3(x)
    y = tasks.colorize(model, gray, generator=torch.Generator().manual_seed(seed), grid=grid)
    return {"colorize": _panel([x, gray, y], out / "colorize.png")}


def write_gallery(
    out: str | Path, grey: tuple | None, colour: tuple | None = None, log: Callable[[str], None] = print
) -> dict[str, Path]:
    """Write every panel the given (model, held-out images) or (model, held-out images, training grid) tuples
    allow; returns task → PNG. The grid (``training_grid(cfg)``, None for continuous-time models) puts the
    editors' default σ levels on the levels the model was trained on."""
    out = Path(out)
    written: dict[str, Path] = {}
    if grey is not None:
        model, x, *grid = grey
        written.update(grey_gallery(model, x, out, grid=grid[0] if grid else None))
    if colour is not None:
        model, x, *grid = colour
        written.update(colour_gallery(model, x, out, grid=grid[0] if grid else None))
    for task, path in written.items():
        log(f"  {path}  ({task}: {COLUMNS[task]})")
    return written
