"""Multistep consistency sampling of the decoder, untiled or over blended tiles (docs/decoder.md).

OpenAI ``ConsistencyDecoder.__call__`` in the VP parameterisation (Song et al. 2023, Alg. 1):

    x = 0
    for t in timesteps:                         # default [1008, 512]
        ε   ~ N(0, I)                           # one draw of shape (B, 3, H, W) per step
        x_t = √ᾱ_t · x + √(1 − ᾱ_t) · ε
        F   = net(c_in · x_t ⊕ up8(z_norm), t)[:, :3]
        x   = clamp(c_out · F + c_skip · x_t, −1, 1)   # the x0 estimate; diffusers omits the clamp (§2.1)

The loop state (x, ε, x_t, the tables) stays float32 whatever the network dtype; only the network input is
cast. Tiled decoding runs the same loop, but each step evaluates the network tile by tile and blends the
tiles' x0 estimates into one image before re-noising. The noise of every step is drawn once for the whole
image, in the same order as the untiled decode, so every tile sees exactly the noise values the untiled
decode uses at its pixels, and one tile covering the latent reproduces the untiled result bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..errors import CmkitError
from .config import DecoderConfig
from .latents import upsample_latents
from .schedule import DecoderSchedule
from .tiling import Tile, blend_window, plan_tiles

#: net(input (B, in_channels, h, w) in the network's dtype/layout, integer t) -> (B, out_channels, h, w).
Network = Callable[[Tensor, int], Tensor]


def draw_noise(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Standard normal float32 noise for the whole image, drawn on the generator's device (CPU by default)."""
    noise_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, dtype=torch.float32, device=noise_device).to(device)


def f_theta(
    net: Network,
    x_t: Tensor,
    z_up: Tensor,
    t: int | Tensor,
    c_in: float | Tensor,
    c_out: float | Tensor,
    c_skip: float | Tensor,
    image_channels: int,
    *,
    dtype: torch.dtype | None = None,
    channels_last: bool = False,
    clamp: bool = False,
) -> Tensor:
    """The consistency function f(x_t, t) = c_out · F_θ(c_in · x_t ⊕ z_up, t)[:, :C_img] + c_skip · x_t (§1.4).

    The one implementation behind decoding (:func:`x0_estimate`: integer t, Python-float coefficients) and
    training (``consistency.consistency_function``: per-sample t (B,), coefficients (B, 1, 1, 1)); the
    coefficients are anything that broadcasts against x_t. ``z_up`` is the upsampled normalised latent.
    ``dtype``/``channels_last`` cast only the network input; F_θ comes back in x_t's dtype.
    """
    inp = torch.cat([x_t * c_in, z_up], dim=1)
    if dtype is not None:
        inp = inp.to(dtype)
    if channels_last:
        inp = inp.contiguous(memory_format=torch.channels_last)
    F = net(inp, t)[:, :image_channels].to(x_t.dtype)
    x0 = c_out * F + c_skip * x_t
    return x0.clamp_(-1.0, 1.0) if clamp else x0


def x0_estimate(
    net: Network,
    x_t: Tensor,
    z_norm: Tensor,
    t: int,
    coeffs: dict[str, float],
    config: DecoderConfig,
    dtype: torch.dtype,
    channels_last: bool,
    clamp: bool,
) -> Tensor:
    """:func:`f_theta` at one integer timestep with ``schedule.at(t)``'s coefficients, optionally clamped."""
    return f_theta(
        net,
        x_t,
        upsample_latents(z_norm, config),
        t,
        coeffs["c_in"],
        coeffs["c_out"],
        coeffs["c_skip"],
        config.image_channels,
        dtype=dtype,
        channels_last=channels_last,
        clamp=clamp,
    )


def _blended_x0(
    net: Network,
    x_t: Tensor,
    z_norm: Tensor,
    t: int,
    coeffs: dict[str, float],
    tiles: list[Tile],
    config: DecoderConfig,
    dtype: torch.dtype,
    channels_last: bool,
    clamp: bool,
) -> Tensor:
    """The x0 estimate assembled from overlapping tiles, each weighted by its blending window."""
    acc = torch.zeros_like(x_t)
    weight = torch.zeros((1, 1, *x_t.shape[2:]), dtype=torch.float32, device=x_t.device)
    for tile in tiles:
        py, px = tile.pixels(config.upscale)
        ly, lx = tile.latents()
        x0 = x0_estimate(net, x_t[:, :, py, px], z_norm[:, :, ly, lx], t, coeffs, config, dtype, channels_last, clamp)
        w = blend_window(tile, config.upscale).to(x_t.device)
        acc[:, :, py, px] += w * x0
        weight[:, :, py, px] += w
    return acc.div_(weight)


def check_image_size(h: int, w: int, config: DecoderConfig, what: str = "latent") -> None:
    """The UNet halves the image len(levels)−1 times: sides must be multiples of ``config.pixel_multiple``."""
    m = config.pixel_multiple
    if (h * config.upscale) % m or (w * config.upscale) % m:
        raise CmkitError(
            f"a {h}×{w} {what} gives a {h * config.upscale}×{w * config.upscale} image; "
            f"this decoder needs image sides that are multiples of {m}"
        )


def sample(
    net: Network,
    z_norm: Tensor,
    timesteps: Sequence[int],
    schedule: DecoderSchedule,
    config: DecoderConfig,
    *,
    generator: torch.Generator | None = None,
    clamp: bool = True,
    tile: int | None = None,
    tile_overlap: int | None = None,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    noise: Sequence[Tensor] | None = None,
) -> Tensor:
    """Decode normalised latents (B, 4, h, w) to images (B, 3, 8h, 8w) in float32, [−1, 1] when ``clamp``.

    Args:
        tile, tile_overlap: latent tile side and minimum overlap (default tile // 4); ``None`` = one tile.
        noise: optional per-step noise (float32, (B, 3, H, W) each) instead of drawing from ``generator``.
    """
    B, _, h, w = z_norm.shape
    H, W = h * config.upscale, w * config.upscale
    tiles = None
    if tile is not None:
        tiles = plan_tiles(h, w, tile, tile // 4 if tile_overlap is None else tile_overlap)
        for t_ in tiles:
            check_image_size(t_.y1 - t_.y0, t_.x1 - t_.x0, config, what="latent tile")
    check_image_size(h, w, config)
    if noise is not None and len(noise) != len(timesteps):
        raise CmkitError(f"got {len(noise)} noise tensors for {len(timesteps)} steps")
    shape = (B, config.image_channels, H, W)
    x = torch.zeros(shape, dtype=torch.float32, device=z_norm.device)
    for k, t in enumerate(timesteps):
        coeffs = schedule.at(t)
        eps = noise[k].to(z_norm.device, torch.float32) if noise is not None else draw_noise(shape, generator, x.device)
        x_t = coeffs["sqrt_alpha_bar"] * x + coeffs["sqrt_one_minus_alpha_bar"] * eps
        del eps, x
        if tiles is None or len(tiles) == 1:
            x = x0_estimate(net, x_t, z_norm, t, coeffs, config, dtype, channels_last, clamp)
        else:
            x = _blended_x0(net, x_t, z_norm, t, coeffs, tiles, config, dtype, channels_last, clamp)
    return x
