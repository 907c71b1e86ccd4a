"""``ConsistencyDecoder``: SD latents → images with OpenAI's released consistency decoder (or any of its shape).

The public entry point. Same semantics as openai/consistencydecoder ``ConsistencyDecoder.__call__``
(docs/decoder.md): raw (unscaled) SD-1.x/2.x latents, per-channel normalisation, ×8 nearest
upsampling as conditioning, the 64-step distilled cosine schedule, clamping of every x0 estimate; plus a
``generator``, any schedule length (1 step included), batches, fp32/bf16/fp16, ``channels_last`` and tiling.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ..formats.torchscript import OPENAI_DECODER_SHA256
from .config import DecoderConfig
from .latents import check_latents, normalize_latents
from .sampler import sample
from .schedule import DecoderSchedule
from .unet import DecoderUNet
from .weights import DecoderWeights, load_weights, save_cmkit

DEFAULT_SCHEDULE = (1.0, 0.5)


class ConsistencyDecoder(nn.Module):
    """The decoder UNet (``self.unet``) with its schedule and latent conditioning.

    Example::

        dec = ConsistencyDecoder.from_pretrained("diffusion_pytorch_model.fp16.safetensors", dtype=torch.bfloat16)
        images = dec.decode(latents, generator=torch.Generator().manual_seed(0))   # (B, 3, 8h, 8w) in [-1, 1]
    """

    def __init__(self, config: DecoderConfig | None = None, unet: DecoderUNet | None = None):
        super().__init__()
        self.config = config or (unet.config if unet is not None else DecoderConfig())
        self.unet = unet if unet is not None else DecoderUNet(self.config)
        self.schedule = DecoderSchedule.cosine(
            self.config.num_train_timesteps, self.config.sigma_data, self.config.num_distilled_steps
        )

    @classmethod
    def from_weights(
        cls,
        weights: DecoderWeights,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        channels_last: bool = True,
    ) -> ConsistencyDecoder:
        """Build on the meta device, then take the checked state dict (no random init, no double memory)."""
        with torch.device("meta"):
            unet = DecoderUNet(weights.config)
        unet.load_state_dict(weights.state_dict, strict=True, assign=True)
        return cls(weights.config, unet).prepare(device=device, dtype=dtype, channels_last=channels_last)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        channels_last: bool = True,
        verify: bool = True,
        expected_sha256: str = OPENAI_DECODER_SHA256,
        config: DecoderConfig | None = None,
    ) -> ConsistencyDecoder:
        """Load any supported checkpoint (see ``weights.py``): diffusers safetensors, OpenAI decoder.pt, cmkit."""
        weights = load_weights(path, config=config, verify=verify, expected_sha256=expected_sha256)
        return cls.from_weights(weights, device=device, dtype=dtype, channels_last=channels_last)

    def prepare(
        self, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None, channels_last: bool = True
    ) -> ConsistencyDecoder:
        """Move/cast for inference: eval mode, contiguous float weights, optional channels_last convolutions."""
        self.to(device=device, dtype=dtype)
        for p in self.parameters():
            p.data = p.data.contiguous()
        if channels_last:
            self.to(memory_format=torch.channels_last)
        return self.eval().requires_grad_(False)

    def save_pretrained(self, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Write a cmkit model directory (``config.json`` + ``model.safetensors``, kind ``decoder``)."""
        return save_cmkit(self.unet.state_dict(), self.config, out_dir, dtype=dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.conv_in.weight.device

    @property
    def channels_last(self) -> bool:
        return self.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)

    def timesteps(self, schedule: Sequence[float] = DEFAULT_SCHEDULE) -> list[int]:
        """Integer timesteps of a schedule of fractions: (1.0, 0.5) → [1008, 512] (§1.3 table)."""
        return self.schedule.timesteps(schedule)

    def per_sample_noise(self, latents: Tensor, steps: int, seed: int) -> list[Tensor]:
        """The ``noise`` of ``decode`` with image i's draws from its own generator (seed ``seed + i``), so a
        decoded image does not depend on the batch it is in: ``steps`` tensors (B, C, fh, fw)."""
        c = self.config
        shape = (1, c.image_channels, latents.shape[2] * c.upscale, latents.shape[3] * c.upscale)
        gens = [torch.Generator().manual_seed(seed + i) for i in range(latents.shape[0])]
        return [torch.cat([torch.randn(shape, generator=g) for g in gens]) for _ in range(steps)]

    def latent_decoder(self, schedule: Sequence[float] = DEFAULT_SCHEDULE) -> LatentDecoder:
        """This decoder as a decoder of a latent denoiser's samples (``cmkit.latent.RawDecoder``)."""
        return LatentDecoder(self, tuple(schedule))

    def forward(self, x: Tensor, t: Tensor | int) -> Tensor:
        """The raw network F_θ (B, 7, H, W) → (B, 6, H, W)."""
        return self.unet(x, t)

    @torch.inference_mode()
    def decode(
        self,
        latents: Tensor,
        schedule: Sequence[float] = DEFAULT_SCHEDULE,
        generator: torch.Generator | None = None,
        *,
        clamp: bool = True,
        tile: int | None = None,
        tile_overlap: int | None = None,
        scaled: bool = False,
        noise: Sequence[Tensor] | None = None,
    ) -> Tensor:
        """Raw SD latents (B, 4, h, w) → float32 images (B, 3, 8h, 8w), in [−1, 1] when ``clamp``.

        Args:
            schedule: descending fractions of the 1024-step schedule, (1.0, 0.5) = t 1008, 512; (1.0,) = 1 step.
            generator: RNG for the per-step noise (drawn as float32 on the generator's device).
            clamp: clamp every x0 estimate to [−1, 1] as OpenAI does; ``False`` = diffusers' behaviour.
            tile, tile_overlap: decode in overlapping latent tiles of this side (``tiling.py``).
            scaled: the latents were already multiplied by ``config.scaling_factor`` (a diffusion
                pipeline's ``output_type="latent"``); they are divided back first.
            noise: explicit per-step noise instead of ``generator`` (float32, (B, 3, 8h, 8w) each).
        """
        check_latents(latents, self.config)
        z = latents.to(self.device, torch.float32)
        if scaled:
            z = z / self.config.scaling_factor
        z_norm = normalize_latents(z, self.config)
        return sample(
            self.unet,
            z_norm,
            self.timesteps(schedule),
            self.schedule,
            self.config,
            generator=generator,
            clamp=clamp,
            tile=tile,
            tile_overlap=tile_overlap,
            dtype=self.dtype,
            channels_last=self.channels_last,
            noise=noise,
        )


class LatentDecoder:
    """``ConsistencyDecoder.decode`` with a fixed schedule and per-sample noise: (raw latents, seed) → images, the
    ``RawDecoder`` that ``cmkit.generate`` decodes a latent model's samples with."""

    def __init__(self, decoder: ConsistencyDecoder, schedule: tuple[float, ...]):
        self.decoder, self.schedule = decoder, schedule
        decoder.timesteps(schedule)  # a bad schedule is one error line now, not at the first batch

    def __call__(self, latents: Tensor, seed: int) -> Tensor:
        noise = self.decoder.per_sample_noise(latents, len(self.schedule), seed)
        return self.decoder.decode(latents, self.schedule, noise=noise)

    def __repr__(self) -> str:  # identifies the decoding in a streamed sampling's settings
        weights = float(sum(p.detach().double().abs().sum() for p in self.decoder.parameters()))
        return f"ConsistencyDecoder(schedule={list(self.schedule)}, weights={weights})"
