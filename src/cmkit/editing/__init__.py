"""Zero-shot editing with consistency models (CM Algorithm 4): one generic editor and six tasks."""

from __future__ import annotations

from .editor import default_edit_sigmas, edit, replace
from .masks import box_mask, builtin_mask, load_mask
from .tasks import (
    colorize,
    denoise,
    inpaint,
    interpolate_images,
    interpolate_noise,
    slerp,
    stroke_guided,
    super_resolve,
    to_gray3,
)
from .transforms import ColorBasis, Identity, PatchBasis, orthogonal_with_first_column

__all__ = [
    "edit",
    "replace",
    "default_edit_sigmas",
    "inpaint",
    "colorize",
    "super_resolve",
    "stroke_guided",
    "denoise",
    "interpolate_noise",
    "interpolate_images",
    "slerp",
    "to_gray3",
    "Identity",
    "ColorBasis",
    "PatchBasis",
    "orthogonal_with_first_column",
    "builtin_mask",
    "box_mask",
    "load_mask",
]
