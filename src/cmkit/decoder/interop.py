"""diffusers interoperability (optional extra ``cmkit[diffusers]``; diffusers is imported lazily).

* ``from_diffusers(model)``: a ``ConsistencyDecoderVAE`` (or its ``decoder_unet``) → ``ConsistencyDecoder``.
  The parameter names are identical (``unet.py``), so this is a config translation plus a state-dict copy.
* ``DiffusersDecoderAdapter``: a cmkit decoder behind the ``vae.decode(z, generator=..., return_dict=...)``
  interface that diffusers pipelines call (``vae.decode(latents / vae.config.scaling_factor, ...)``), with
  cmkit's schedules, clamping and tiling. Reference doc §2.1 ("Use in SD pipelines").
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import CmkitError, optional_import
from .config import DecoderConfig
from .decoder import DEFAULT_SCHEDULE, ConsistencyDecoder
from .schedule import steps_to_schedule
from .unet import DecoderUNet


def from_diffusers(
    model: nn.Module, *, dtype: torch.dtype | None = None, channels_last: bool = True
) -> ConsistencyDecoder:
    """Copy a diffusers ``ConsistencyDecoderVAE`` / ``UNet2DModel`` into a cmkit ``ConsistencyDecoder``."""
    cfg_dict = dict(getattr(model, "config", {}) or {})
    if not cfg_dict:
        raise CmkitError(
            f"{type(model).__name__} has no diffusers config; expected ConsistencyDecoderVAE or UNet2DModel"
        )
    config = DecoderConfig.from_diffusers(cfg_dict)
    unet_module = getattr(model, "decoder_unet", model)
    with torch.device("meta"):
        unet = DecoderUNet(config)
    state = {k: v.detach().clone() for k, v in unet_module.state_dict().items()}
    unet.load_state_dict(state, strict=True, assign=True)
    return ConsistencyDecoder(config, unet).prepare(dtype=dtype, channels_last=channels_last)


class DiffusersDecoderAdapter(nn.Module):
    """A ``ConsistencyDecoder`` that a diffusers pipeline can use as its ``vae`` for decoding.

    ``decode`` receives *raw* latents (pipelines divide by ``vae.config.scaling_factor`` first), as
    ``ConsistencyDecoderVAE.decode`` does, and returns ``DecoderOutput(sample=...)`` in the latents' dtype.
    Encoding is not provided: keep the SD VAE for image-to-image pipelines.
    """

    def __init__(
        self,
        decoder: ConsistencyDecoder,
        *,
        schedule: Sequence[float] = DEFAULT_SCHEDULE,
        clamp: bool = True,
        tile: int | None = None,
        tile_overlap: int | None = None,
    ):
        super().__init__()
        self.decoder = decoder
        self.schedule, self.clamp, self.tile, self.tile_overlap = tuple(schedule), clamp, tile, tile_overlap
        cfg = decoder.config
        levels = max(1, cfg.upscale.bit_length() - 1)
        self.config = SimpleNamespace(
            scaling_factor=cfg.scaling_factor,
            latent_channels=cfg.latent_channels,
            block_out_channels=[0] * (levels + 1),
            force_upcast=False,
            shift_factor=None,
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.device

    def decode(
        self,
        z: Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
        num_inference_steps: int | None = None,
    ) -> Any:
        """diffusers' ``ConsistencyDecoderVAE.decode`` signature; ``num_inference_steps`` picks N even steps."""
        optional_import("diffusers", "diffusers", "DiffusersDecoderAdapter")
        try:
            from diffusers.models.autoencoders.vae import DecoderOutput
        except ImportError:  # diffusers < 0.26
            from diffusers.models.vae import DecoderOutput

        schedule = self.schedule if num_inference_steps is None else steps_to_schedule(num_inference_steps)
        sample = self.decoder.decode(
            z, schedule, generator, clamp=self.clamp, tile=self.tile, tile_overlap=self.tile_overlap
        ).to(z.dtype)
        return DecoderOutput(sample=sample) if return_dict else (sample,)

    def encode(self, *_: Any, **__: Any) -> Any:
        raise CmkitError("the consistency decoder only decodes; keep the pipeline's SD VAE for encoding")
