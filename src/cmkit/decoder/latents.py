"""The decoder's input: raw SD latents, their checks, normalisation and ×8 conditioning upsampling.

Reference doc §1.1 (the API expects the *unscaled* VAE latent; openai/consistencydecoder#8, #17),
§1.3 (``ldm_transform_latent``) and §6.1–6.2 (input order: image channels first, then the latent).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import CmkitError
from .config import DecoderConfig

#: Raw SD latents have a per-channel std of ≈ 4–6 (≈ 1/0.18215 × 0.76–1.04); scaled ones ≈ 0.8–1.
SCALED_STD_RANGE = (0.4, 1.8)


def check_latents(latents: Tensor, config: DecoderConfig) -> None:
    """Raise a one-line ``CmkitError`` unless ``latents`` is a float (B, C_latent, h, w) tensor with h, w ≥ 1."""
    if not isinstance(latents, Tensor):
        raise CmkitError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
    shape = tuple(latents.shape)
    if latents.ndim == 3 and shape[0] == config.latent_channels:
        raise CmkitError(
            f"latents must be 4-D (batch, {config.latent_channels}, h, w); got 3-D {shape}: "
            "add the batch dimension (latents[None])"
        )
    if latents.ndim != 4:
        raise CmkitError(f"latents must be 4-D (batch, {config.latent_channels}, h, w); got {latents.ndim}-D {shape}")
    if shape[1] != config.latent_channels:
        hint = " (that looks like an image, not a latent)" if shape[1] in (1, 3) else ""
        whose = (
            "SD-1.x/2.x VAE latents"
            if config.latent_channels == 4
            else "the latents of the autoencoder it was trained for"
        )
        if shape[1] == 4 and config.latent_channels != 4:
            hint = " (SD-1.x/2.x VAE latents have 4: decode them with OpenAI's decoder)"
        raise CmkitError(
            f"this decoder takes {config.latent_channels}-channel latents ({whose}); got shape {shape}{hint}"
        )
    if not latents.is_floating_point():
        raise CmkitError(f"latents must be floating point, got {latents.dtype}")
    if min(shape[2:]) < 1 or shape[0] < 1:
        raise CmkitError(f"latents have an empty dimension: {shape}")
    if not torch.isfinite(latents).all():
        raise CmkitError("latents contain NaN or infinite values")


def looks_scaled(latents: Tensor) -> bool:
    """Heuristic for latents already multiplied by the scaling factor (e.g. ``output_type="latent"``).

    The scaling factor is chosen so that scaled latents have unit variance (§1.3's std table: 0.76–1.04),
    so raw SD latents have a per-channel standard deviation of ≈ 4–6. Only decided on ≥ 64 values per
    channel; near-constant latents (std < 0.4) are left undecided (False).
    """
    x = latents.detach().float()
    if x[0, 0].numel() * x.shape[0] < 64:
        return False
    std = x.transpose(0, 1).reshape(x.shape[1], -1).std(dim=1).mean().item()
    lo, hi = SCALED_STD_RANGE
    return lo <= std <= hi


def normalize_latents(latents: Tensor, config: DecoderConfig) -> Tensor:
    """OpenAI ``ldm_transform_latent``: z_norm[:, c] = (z[:, c] · 0.18215 − mean_c) / std_c (§1.3)."""
    mean = torch.tensor(config.latent_mean, dtype=latents.dtype, device=latents.device)[None, :, None, None]
    std = torch.tensor(config.latent_std, dtype=latents.dtype, device=latents.device)[None, :, None, None]
    return (latents * config.scaling_factor - mean) / std


def upsample_latents(z_norm: Tensor, config: DecoderConfig) -> Tensor:
    """Nearest-neighbour ×``upscale`` upsampling of the normalised latent, the decoder's conditioning (§1.4)."""
    return F.interpolate(z_norm, scale_factor=config.upscale, mode="nearest")


def resolve_scaled(latents: torch.Tensor, mode: str, scaling_factor: float) -> bool:
    """Whether to divide the latents by the scaling factor; ``auto`` refuses latents that look pre-scaled.

    With a scaling factor of 1 (decoders trained by ``cmkit train-decoder``) raw and scaled latents coincide.
    """
    if mode != "auto":
        return mode == "scaled"
    if scaling_factor == 1.0:
        return False
    if looks_scaled(latents):
        std = latents.float().std().item()
        raise CmkitError(
            f"these latents look already multiplied by {scaling_factor} (std {std:.2f}, raw SD latents "
            "have std ≈ 5): pass --latents scaled if they come from a pipeline's output_type='latent', "
            "or --latents raw to decode them as they are"
        )
    return False
