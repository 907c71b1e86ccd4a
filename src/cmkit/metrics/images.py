"""Image inputs of the evaluation suite: everything becomes uint8 NHWC, the format of the reference evaluators.

Float images (cmkit's convention: (B, C, H, W) in [-1, 1]) are quantised exactly as samples are written to
PNG/.npz (``round((x + 1) · 127.5)``), so a metric never depends on whether samples went through a file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import CmkitError
from ..imageio import read_npz_images


def as_uint8_nhwc(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """uint8 NHWC (or NHW) arrays/tensors pass through; float NCHW in [-1, 1] are quantised to uint8 NHWC."""
    if isinstance(images, torch.Tensor):
        if images.dtype == torch.uint8:
            images = images.cpu().numpy()
        else:
            x = ((images.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
            if x.ndim != 4:
                raise CmkitError(f"float images must be (N, C, H, W) in [-1, 1], got shape {tuple(x.shape)}")
            images = x.permute(0, 2, 3, 1).numpy()
    a = np.asarray(images)
    if a.dtype != np.uint8:
        raise CmkitError(f"images must be uint8 NHWC (or a float tensor NCHW in [-1, 1]), got dtype {a.dtype}")
    if a.ndim == 3:
        a = a[..., None]
    if a.ndim != 4 or a.shape[-1] not in (1, 3) or a.shape[0] == 0:
        raise CmkitError(f"images must be uint8 NHWC with 1 or 3 channels, got shape {a.shape}")
    return a


def load_images_npz(path: str | Path) -> np.ndarray:
    """Images stored as uint8 NHWC under ``arr_0`` (the format of cmkit and the reference code's samples);
    read by :func:`cmkit.imageio.read_npz_images`: any problem with the file is one :class:`CmkitError` line."""
    return read_npz_images(path, "samples file", square=False)
