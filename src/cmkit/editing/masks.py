"""Inpainting masks (1 = unknown, to be generated): built-in shapes, boxes and PNG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import CmkitError
from ..imageio import read_image

BUILTIN = ("center", "left", "right", "top", "bottom", "border")


def builtin_mask(name: str, size: int) -> Tensor:
    """(size, size) masks: centre square of half the side, half planes, or a border (outpainting)."""
    m = torch.zeros(size, size)
    q, h = size // 4, size // 2
    if name == "center":
        m[q : q + h, q : q + h] = 1
    elif name == "left":
        m[:, :h] = 1
    elif name == "right":
        m[:, h:] = 1
    elif name == "top":
        m[:h] = 1
    elif name == "bottom":
        m[h:] = 1
    elif name == "border":
        m[:] = 1
        m[q : q + h, q : q + h] = 0
    else:
        raise CmkitError(f"unknown built-in mask {name!r}; expected one of {', '.join(BUILTIN)}")
    return m


def box_mask(box: str, size: int) -> Tensor:
    """A box 'x0,y0,x1,y1' in pixels (x1, y1 exclusive) marked unknown."""
    try:
        x0, y0, x1, y1 = (int(v) for v in box.split(","))
    except ValueError:
        raise CmkitError(f"--box expects four integers x0,y0,x1,y1; got {box!r}") from None
    if not (0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size):
        raise CmkitError(f"box {box} is empty or outside the {size}×{size} image")
    m = torch.zeros(size, size)
    m[y0:y1, x0:x1] = 1
    return m


def load_mask(path: str | Path, size: int) -> Tensor:
    """A PNG mask: white (>= 128) = generate, black = keep. Must be size×size (read by :func:`read_image`:
    a missing, corrupt, oversized or wrongly sized file is one error line)."""
    a = read_image(path, "L", "mask", size=size)
    return torch.from_numpy((a >= 128).astype(np.float32))
