"""Latent files in (.npy / .pt / .safetensors) and decoded PNGs out, for the CLI.

``.pt`` files are read with ``torch.load(weights_only=True)``, ``.npy`` without pickles: no user file runs code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import CmkitError
from ..imageio import save_grid, save_images

LATENT_KEYS = ("latents", "latent", "z", "sample")
LATENT_SUFFIXES = (".npy", ".pt", ".pth", ".safetensors")


def _pick(tensors: dict[str, Tensor], path: Path) -> Tensor:
    """The latent tensor of a file holding several: the only one, or the one under a usual name."""
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    for key in LATENT_KEYS:
        if key in tensors:
            return tensors[key]
    raise CmkitError(
        f"{path}: holds {len(tensors)} tensors {sorted(tensors)[:5]}; "
        f"store one tensor or name it one of {list(LATENT_KEYS)}"
    )


def read_latents(path: str | Path) -> Tensor:
    """A latent tensor from .npy, .pt/.pth (a tensor or a dict of tensors) or .safetensors."""
    path = Path(path)
    if not path.is_file():
        raise CmkitError(f"{path}: no such latent file (expected {', '.join(LATENT_SUFFIXES)})")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return torch.from_numpy(np.load(path, allow_pickle=False))
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return _pick(load_file(str(path)), path)
        if suffix in (".pt", ".pth"):
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, Tensor):
                return obj
            if isinstance(obj, dict) and obj and all(isinstance(v, Tensor) for v in obj.values()):
                return _pick(obj, path)
            raise CmkitError(f"{path}: holds a {type(obj).__name__}, expected a tensor or a dict of tensors")
    except CmkitError:
        raise
    except Exception as e:  # numpy / torch / safetensors parse errors
        raise CmkitError(f"{path}: unreadable {suffix} file ({type(e).__name__}: {e})") from None
    raise CmkitError(f"{path}: unsupported latent file type {suffix!r}; expected {', '.join(LATENT_SUFFIXES)}")


def write_images(images: Tensor, out: str | Path, grid: bool = False) -> list[Path]:
    """Images in [−1, 1] → PNG: ``out`` itself for one image (or a grid), else ``out_0.png``, ``out_1.png`` …"""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise CmkitError(f"{out}: the output must be a .png file")
    if grid and images.shape[0] > 1:
        return [save_grid(images, out, scale=1)]
    return save_images(images, out)
