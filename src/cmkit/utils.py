"""Small shared helpers: broadcasting, images <-> tensors, grids and .npz output."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


def append_dims(x: Tensor, ndim: int) -> Tensor:
    """Append trailing singleton dims so that a (B,) tensor broadcasts against (B, C, H, W)."""
    if x.ndim > ndim:
        raise ValueError(f"cannot broadcast a {x.ndim}-d tensor to {ndim} dims")
    return x.reshape(*x.shape, *([1] * (ndim - x.ndim)))


def as_sigma(sigma: Tensor | float, batch: int, device: torch.device) -> Tensor:
    """σ as a float32 tensor of shape (B,), the form used at every API boundary."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=device)
    if sigma.ndim == 0:
        sigma = sigma.expand(batch)
    if sigma.shape != (batch,):
        raise ValueError(f"sigma must be a scalar or shape ({batch},), got {tuple(sigma.shape)}")
    return sigma


def to_uint8(x: Tensor) -> np.ndarray:
    """Images in [-1, 1], (B, C, H, W) -> uint8 NHWC, quantised as in the reference code."""
    x = ((x.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def from_uint8(a: np.ndarray) -> Tensor:
    """uint8 NHWC (or NHW) -> float (B, C, H, W) in [-1, 1]."""
    if a.ndim == 3:
        a = a[..., None]
    return torch.from_numpy(np.array(a, copy=True)).permute(0, 3, 1, 2).float() / 127.5 - 1


def make_grid(images: np.ndarray, nrow: int | None = None, pad: int = 2, scale: int = 1) -> np.ndarray:
    """Tile uint8 NHWC images into one uint8 HWC image (grey images become RGB)."""
    n, h, w, c = images.shape
    if c == 1:
        images = np.repeat(images, 3, axis=3)
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    ncol = int(math.ceil(n / nrow))
    grid = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = images[i]
    if scale > 1:
        grid = grid.repeat(scale, 0).repeat(scale, 1)
    return grid


def save_grid(x: Tensor | np.ndarray, path: str | Path, nrow: int | None = None, scale: int | None = None) -> Path:
    """Save a batch (tensor in [-1, 1] or uint8 NHWC) as a PNG grid; small images are upscaled to be visible."""
    from PIL import Image

    images = to_uint8(x) if isinstance(x, Tensor) else x
    if scale is None:
        scale = max(1, 64 // images.shape[1])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(make_grid(images, nrow=nrow, scale=scale)).save(path)
    return path


def save_npz(x: Tensor | np.ndarray, path: str | Path, labels: Tensor | None = None) -> Path:
    """Save samples as uint8 NHWC under ``arr_0`` (and labels under ``arr_1``), the reference format."""
    images = to_uint8(x) if isinstance(x, Tensor) else x
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"arr_0": images}
    if labels is not None:
        arrays["arr_1"] = labels.cpu().numpy()
    np.savez(path, **arrays)
    return path


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (``platform.processor()`` is empty on Linux), for benchmark records."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
