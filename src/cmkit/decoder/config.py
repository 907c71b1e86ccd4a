"""Configuration of the Consistency Decoder network and of its latent space.

The defaults are OpenAI's released decoder (openai/consistencydecoder, 2023), as ported to diffusers'
``ConsistencyDecoderVAE`` (its constants, architecture and config table; docs/decoder.md).
``DecoderConfig.tiny()`` keeps the whole topology (4 levels, ×8 latent upsampling) at a width a test can run.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from ..config import dataclass_from_dict
from ..errors import CmkitError

#: SD-1.x/2.x VAE latent scale: OpenAI multiplies the *raw* latent by this itself (§1.3).
SD_SCALING_FACTOR = 0.18215
#: Per-channel statistics of scaled SD latents used by ``ldm_transform_latent`` (§1.3).
SD_LATENT_MEAN = (0.38862467, 0.02253063, 0.07381133, -0.0171294)
SD_LATENT_STD = (0.9654121, 1.0440036, 0.76147926, 0.77022034)


@dataclass(frozen=True)
class DecoderConfig:
    """Shape of the decoder UNet (diffusers ``UNet2DModel`` names) plus the latent conditioning.

    Args:
        block_out_channels: widths of the UNet levels; OpenAI: (320, 640, 1024, 1024).
        layers_per_block: residual blocks per down level (up levels have one more).
        in_channels: image channels + latent channels (3 + 4 = 7).
        out_channels: 6; only the first ``image_channels`` are the prediction F_θ (§1.4).
        norm_num_groups, norm_eps: GroupNorm of every block (32, 1e-5).
        num_train_timesteps: size of the learned timestep table ``nn.Embedding(1024, 320)``.
        time_embed_dim: width of the time MLP; ``None`` = 4 · block_out_channels[0] (1280).
        latent_channels: channels of the latent (4 for SD).
        upscale: latent → pixel factor of the nearest-neighbour conditioning upsampling (8 for SD).
        scaling_factor, latent_mean, latent_std: ``z_norm = (z · scaling_factor − mean_c) / std_c``.
        num_distilled_steps: the 64-step grid the decoder was distilled on (timesteps 16, 32, …, 1008).
        sigma_data: σ_d of the EDM preconditioning (0.5).
    """

    block_out_channels: tuple[int, ...] = (320, 640, 1024, 1024)
    layers_per_block: int = 3
    in_channels: int = 7
    out_channels: int = 6
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    num_train_timesteps: int = 1024
    time_embed_dim: int | None = None
    latent_channels: int = 4
    upscale: int = 8
    scaling_factor: float = SD_SCALING_FACTOR
    latent_mean: tuple[float, ...] = SD_LATENT_MEAN
    latent_std: tuple[float, ...] = SD_LATENT_STD
    num_distilled_steps: int = 64
    sigma_data: float = 0.5

    def __post_init__(self) -> None:
        self._check_types()
        for name in ("block_out_channels", "latent_mean", "latent_std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.in_channels <= self.latent_channels:
            raise CmkitError(f"in_channels ({self.in_channels}) must exceed latent_channels ({self.latent_channels})")
        if len(self.latent_mean) != self.latent_channels or len(self.latent_std) != self.latent_channels:
            raise CmkitError(f"latent_mean/latent_std need {self.latent_channels} values each")
        for ch in self.block_out_channels:
            if ch % self.norm_num_groups:
                raise CmkitError(f"width {ch} is not divisible by norm_num_groups={self.norm_num_groups}")

    def _check_types(self) -> None:
        """Every field of the type it must have (a hand-edited or damaged config.json is one line, not a
        TypeError or ZeroDivisionError further on)."""

        def number(v: Any, integer: bool) -> bool:
            ok = isinstance(v, int) if integer else isinstance(v, (int, float)) and math.isfinite(v)
            return ok and not isinstance(v, bool) and v > 0

        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "time_embed_dim" and v is None:
                continue
            if f.name in ("block_out_channels", "latent_mean", "latent_std"):
                integer = f.name == "block_out_channels"
                ok = (
                    isinstance(v, (list, tuple))
                    and len(v) > 0
                    and all(
                        number(x, integer)
                        if (integer or f.name == "latent_std")
                        else isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                        for x in v
                    )
                )
                want = (
                    "a non-empty list of positive integers"
                    if integer
                    else "a list of positive finite numbers"
                    if f.name == "latent_std"
                    else "a list of finite numbers"
                )
            else:
                integer = f.name not in ("norm_eps", "scaling_factor", "sigma_data")
                ok, want = number(v, integer), "a positive integer" if integer else "a positive finite number"
            if not ok:
                raise CmkitError(f"decoder config: {f.name} is {v!r}; expected {want}")

    @property
    def image_channels(self) -> int:
        """Channels of the noisy image x_t fed first to the network (3)."""
        return self.in_channels - self.latent_channels

    @property
    def temb_dim(self) -> int:
        return self.time_embed_dim or 4 * self.block_out_channels[0]

    @property
    def pixel_multiple(self) -> int:
        """Image sides must be multiples of this (one halving per level below the top)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def tiny(cls, **overrides: Any) -> DecoderConfig:
        """The full topology at width 8/16: 4 levels, ×8 upsampling; ~110k parameters."""
        base = dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4)
        return cls(**{**base, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DecoderConfig:
        return dataclass_from_dict(cls, d, "decoder")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_diffusers(cls, d: dict[str, Any]) -> DecoderConfig:
        """From a diffusers ``config.json``: a ``ConsistencyDecoderVAE`` one (``decoder_*`` keys) or a
        ``UNet2DModel`` one.

        Checks the settings cmkit does not make configurable (block types, attention, time embedding).
        """
        vae = "decoder_block_out_channels" in d
        get = (lambda k, default=None: d.get("decoder_" + k, default)) if vae else d.get
        fixed = {"time_embedding_type": "learned", "resnet_time_scale_shift": "scale_shift", "add_attention": False}
        for key, want in fixed.items():
            have = get(key, want)
            if have != want:
                raise CmkitError(f"diffusers config has {key}={have!r}; the consistency decoder needs {want!r}")
        for key, want in (("down_block_types", "ResnetDownsampleBlock2D"), ("up_block_types", "ResnetUpsampleBlock2D")):
            types = get(key) or [want]
            if any(t != want for t in types):
                raise CmkitError(f"diffusers config has {key}={types}; the consistency decoder needs {want}")
        cfg = dict(
            block_out_channels=tuple(get("block_out_channels")),
            layers_per_block=get("layers_per_block", 3),
            in_channels=get("in_channels", 7),
            out_channels=get("out_channels", 6),
            norm_num_groups=get("norm_num_groups", 32),
            norm_eps=get("norm_eps", 1e-5),
            num_train_timesteps=get("num_train_timesteps", 1024),
        )
        if not vae and d.get("time_embedding_dim") is not None:
            cfg["time_embed_dim"] = d["time_embedding_dim"]
        if vae:
            cfg["scaling_factor"] = d.get("scaling_factor", SD_SCALING_FACTOR)
            cfg["latent_channels"] = d.get("latent_channels", 4)
            # diffusers upsamples by 2^(len(block_out_channels)-1) where block_out_channels = the *encoder*'s.
            enc = d.get("block_out_channels") or d.get("encoder_block_out_channels") or (0,) * 4
            cfg["upscale"] = 2 ** (len(enc) - 1)
        return cls(**cfg)
