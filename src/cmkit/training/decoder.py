"""Training a consistency decoder for any latent autoencoder, and the small KL autoencoder to prove it on.

Two stages, each a task of the one training loop (``cmkit.training.loop``; ``cmkit train --preset fmnist-ae`` then
``cmkit train --preset fmnist-cdec``):

1. ``AutoencoderTask``: a ``KLAutoencoder`` (``cmkit.nets.autoencoder``: L1/L2 reconstruction + β·KL,
   Rombach et al. 2022) on images padded to ``image_size``; exports ``model/`` (EMA weights).
2. ``DecoderTask``: a ``DecoderUNet`` conditioned on the nearest-upsampled, normalised latents
   μ(x) of that (frozen) autoencoder, trained by consistency training on the released decoder's own
   schedule (``consistency.py``: iCT/ECT-style CT between points of the 64-step grid of the cosine
   1024-step schedule). Its ``DecoderConfig`` carries the autoencoder's latent space instead of SD's:
   ``latent_channels`` = C, ``upscale`` = f, ``scaling_factor`` = 1 and ``latent_mean``/``latent_std`` =
   the per-channel mean/std of μ(x) over ``stats_images`` training images, so
   ``z_norm = (z − mean_c)/std_c`` as in OpenAI's ``ldm_transform_latent``. ``model/`` is a cmkit
   decoder directory: ``ConsistencyDecoder.from_pretrained(run/"model").decode(ae.encode(x), schedule=(1.0,))``.

The learned timestep table ``nn.Embedding(1024, C0)`` starts from the sinusoidal embedding of t
(Vaswani et al. 2017; the fixed DDPM embedding, Ho et al. 2020) instead of N(0, 1) rows, so that nearby
timesteps start out similar.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..datasets import Batches
from ..decoder.config import DecoderConfig
from ..decoder.consistency import DecoderConsistencyLoss
from ..decoder.decoder import ConsistencyDecoder
from ..decoder.latents import normalize_latents
from ..decoder.unet import DecoderUNet
from ..errors import CmkitError
from ..imageio import save_grid
from ..latent import autoencoder_config, check_image_channels, load_images, sample_statistics
from ..nets.autoencoder import AutoencoderConfig, KLAutoencoder
from .decoder_config import AutoencoderRunConfig, DecoderRunConfig
from .task import Context

GRID_IMAGES = 8


# --- autoencoder -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AutoencoderLoss:
    """``KLAutoencoder.loss_from`` with the run's β and reconstruction distance."""

    kl_weight: float
    reconstruction: str

    def __call__(self, x: Tensor, recon: Tensor, mean: Tensor, logvar: Tensor) -> tuple[Tensor, dict[str, float]]:
        return KLAutoencoder.loss_from(x, recon, mean, logvar, self.kl_weight, self.reconstruction)


class AutoencoderTask:
    """The loop's task for an ``AutoencoderRunConfig`` run."""

    name = "autoencoder"

    @staticmethod
    def build_model(cfg: AutoencoderRunConfig) -> KLAutoencoder:
        m = cfg.model
        return KLAutoencoder(
            AutoencoderConfig(m.in_channels, m.channels, m.num_res_blocks, m.latent_channels, m.norm_groups)
        )

    @staticmethod
    def build_loss(cfg: AutoencoderRunConfig) -> AutoencoderLoss:
        return AutoencoderLoss(cfg.loss.kl_weight, cfg.loss.reconstruction)

    def __init__(self, cfg: AutoencoderRunConfig, ctx: Context):
        self.cfg, self.ctx = cfg, ctx
        data = load_images(cfg.data.name, cfg.data.root, cfg.data.split, cfg.data.image_size)
        if data.shape[0] != cfg.model.in_channels:
            raise CmkitError(
                f"data set {cfg.data.name!r} has {data.shape[0]} channels; set model.in_channels={data.shape[0]}"
            )
        self.model = self.build_model(cfg).to(ctx.device)
        self.objective = self.build_loss(cfg)
        t = cfg.train
        self.batches = Batches(
            data, t.batch_size, t.seed, cfg.data.flip, ctx.rank, ctx.world, cfg.data.workers, t.accum
        )
        self.grid = data.take(torch.arange(GRID_IMAGES)).float() / 127.5 - 1

    def loss(
        self, net: nn.Module, step: int, generator: torch.Generator, micro: int = 0
    ) -> tuple[Tensor, dict[str, float]]:
        x, _ = self.batches.get(step, self.ctx.device, micro)
        loss, terms = self.objective(x, *net(x, generator))
        return loss.mean(), terms

    def after_update(self, step: int) -> None:
        pass

    def extra_modules(self) -> dict[str, nn.Module]:
        return {}

    def export_config(self) -> tuple[str, dict[str, Any], dict[str, Any]]:
        return "autoencoder", self.model.config.to_dict(), {"recipe": {"train": self.cfg.to_dict()}}

    def sample(self, model: nn.Module, out: Path, step: int) -> None:
        """Originals (top row) and EMA reconstructions D(μ(x)) (bottom row)."""
        grid = self.grid.to(self.ctx.device)
        recon = model.decode(model.encode(grid)).clamp(-1, 1)
        save_grid(torch.cat([grid, recon]), out / f"step_{step:06d}_recon.png", nrow=GRID_IMAGES)


# --- consistency decoder ---------------------------------------------------------------------------


def sinusoidal_table(num_timesteps: int, dim: int) -> Tensor:
    """e(t) = [sin(t·ω_i), cos(t·ω_i)], ω_i = 10000^(−i/(dim/2)) (Vaswani et al. 2017), zero-padded to dim."""
    half = dim // 2
    omega = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / max(half, 1))
    angles = torch.arange(num_timesteps, dtype=torch.float64)[:, None] * omega[None]
    table = torch.cat([angles.sin(), angles.cos(), torch.zeros(num_timesteps, dim - 2 * half, dtype=torch.float64)], 1)
    return table.float()


def init_decoder_unet(config: DecoderConfig, seed: int = 0) -> DecoderUNet:
    """A ``DecoderUNet`` with PyTorch's default init and a sinusoidal timestep table."""
    torch.manual_seed(seed)
    unet = DecoderUNet(config)
    with torch.no_grad():
        unet.time_proj.weight.copy_(sinusoidal_table(config.num_train_timesteps, config.block_out_channels[0]))
    return unet


def decoder_config_for(
    a: AutoencoderConfig,
    cfg: DecoderRunConfig,
    latent_mean: tuple[float, ...] | None = None,
    latent_std: tuple[float, ...] | None = None,
) -> DecoderConfig:
    """The ``DecoderConfig`` of a decoder for autoencoder ``a``'s latent space (channels, ×f, mean/std, scale 1);
    the statistics default to 0 and 1 (for a dry run: they are measured on the data)."""
    m, size = cfg.model, cfg.data.image_size
    dcfg = DecoderConfig(
        block_out_channels=m.block_out_channels,
        layers_per_block=m.layers_per_block,
        in_channels=a.in_channels + a.latent_channels,
        out_channels=a.in_channels,
        norm_num_groups=m.norm_num_groups,
        time_embed_dim=m.time_embed_dim or None,
        latent_channels=a.latent_channels,
        upscale=a.downsample_factor,
        scaling_factor=1.0,
        latent_mean=latent_mean or (0.0,) * a.latent_channels,
        latent_std=latent_std or (1.0,) * a.latent_channels,
    )
    if size % dcfg.pixel_multiple or size % a.downsample_factor:
        raise CmkitError(
            f"data.image_size={size} must be a multiple of the decoder UNet's {dcfg.pixel_multiple} "
            f"(2^(levels−1)) and of the autoencoder's factor {a.downsample_factor}"
        )
    return dcfg


class DecoderTask:
    """The loop's task for a ``DecoderRunConfig`` run."""

    name = "decoder"

    @staticmethod
    def dry_config(cfg: DecoderRunConfig) -> DecoderConfig:
        """The decoder config for the autoencoder's latent space (its config.json, not its weights) with the
        latent statistics left at 0 and 1 (they are measured on the data when the run starts)."""
        return decoder_config_for(autoencoder_config(cfg.model.autoencoder, "model.autoencoder"), cfg)

    @classmethod
    def build_model(cls, cfg: DecoderRunConfig) -> DecoderUNet:
        return DecoderUNet(cls.dry_config(cfg))

    @classmethod
    def build_loss(cls, cfg: DecoderRunConfig, config: DecoderConfig | None = None) -> DecoderConsistencyLoss:
        return DecoderConsistencyLoss(
            config or cls.dry_config(cfg), cfg.train.steps, cfg.loss.gaps, cfg.loss.distance, cfg.loss.index_sampling
        )

    def __init__(self, cfg: DecoderRunConfig, ctx: Context):
        self.cfg, self.ctx = cfg, ctx
        t, device = cfg.train, ctx.device
        self.ae = KLAutoencoder.from_pretrained(cfg.model.autoencoder, device=device)
        data = load_images(cfg.data.name, cfg.data.root, cfg.data.split, cfg.data.image_size)
        check_image_channels(data, self.ae, cfg.data.name, cfg.model.autoencoder)
        mean, std = sample_statistics(self.ae, data, cfg.model.stats_images, t.seed, device)
        self.config = decoder_config_for(self.ae.config, cfg, mean, std)
        self.model = init_decoder_unet(self.config, t.seed).to(device)
        self.objective = self.build_loss(cfg, self.config)
        self.batches = Batches(
            data, t.batch_size, t.seed, cfg.data.flip, ctx.rank, ctx.world, cfg.data.workers, t.accum
        )
        self.grid = data.take(torch.arange(GRID_IMAGES)).float().to(device) / 127.5 - 1

    def loss(
        self, net: nn.Module, step: int, generator: torch.Generator, micro: int = 0
    ) -> tuple[Tensor, dict[str, float]]:
        x0, _ = self.batches.get(step, self.ctx.device, micro)
        with torch.no_grad():
            z_norm = normalize_latents(self.ae.encode(x0), self.config)
        loss = self.objective(net, x0, z_norm, step=step, target=self.model, generator=generator)
        return loss.mean(), self.objective.stats(step)

    def after_update(self, step: int) -> None:
        pass

    def extra_modules(self) -> dict[str, nn.Module]:
        return {}

    def export_config(self) -> tuple[str, dict[str, Any], dict[str, Any]]:
        source = {
            "trained_by": "cmkit train --preset (decoder)",
            "autoencoder": self.cfg.model.autoencoder,
            "train": self.cfg.to_dict(),
        }
        return "decoder", self.config.to_dict(), {"source": source}

    def sample(self, model: nn.Module, out: Path, step: int) -> None:
        """Rows: originals, the autoencoder's decoder, the consistency decoder at 1 and 2 steps (fixed noise)."""
        z = self.ae.encode(self.grid)
        dec = ConsistencyDecoder(self.config, model)
        rows = [self.grid, self.ae.decode(z).clamp(-1, 1)]
        for schedule in ((1.0,), (1.0, 0.5)):
            rows.append(dec.decode(z, schedule, torch.Generator().manual_seed(0)))
        save_grid(torch.cat(rows), out / f"step_{step:06d}_ae_cd1_cd2.png", nrow=GRID_IMAGES)
