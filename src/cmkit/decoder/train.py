"""Training a consistency decoder for any latent autoencoder, and the small KL autoencoder to prove it on.

Two stages, each a ``loop.run`` task (progress bar, JSONL log, checkpoints, exact resume):

1. ``train_autoencoder(cfg)``: a ``KLAutoencoder`` (``cmkit.autoencoder``: L1/L2 reconstruction + β·KL,
   Rombach et al. 2022) on images padded to ``image_size``; exports ``model/`` (EMA weights).
2. ``train_decoder(cfg)``: a ``DecoderUNet`` conditioned on the nearest-upsampled, normalised latents
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
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..autoencoder import AutoencoderConfig, KLAutoencoder
from ..datasets import Batches, ImageData, load_dataset
from ..ema import ema_update, make_copy
from ..errors import CmkitError
from ..utils import save_grid
from .config import DecoderConfig
from .decoder import ConsistencyDecoder
from .latents import normalize_latents
from .consistency import DecoderConsistencyLoss
from .loop import LoopSettings, guarded_update, run
from .train_config import AutoencoderTrainConfig, DecoderTrainConfig, check_common, to_dict
from .unet import DecoderUNet

GRID_IMAGES = 8


# --- data ------------------------------------------------------------------------------------------

def pad_images(images: Tensor, size: int) -> Tensor:
    """uint8 (N, C, H, W) → (N, C, size, size), centred on black (0 ↦ −1); e.g. Fashion-MNIST 28 → 32."""
    h, w = images.shape[2:]
    if h > size or w > size:
        raise CmkitError(f"images are {h}×{w}, larger than image_size={size}; set image_size={max(h, w)} or more")
    if (size - h) % 2 or (size - w) % 2:
        raise CmkitError(f"images are {h}×{w}; image_size={size} would pad unevenly "
                         f"(use {h + 2 * ((size - h + 1) // 2)})")
    ph, pw = (size - h) // 2, (size - w) // 2
    return torch.nn.functional.pad(images, (pw, pw, ph, ph), value=0)


def load_images(name: str, root: str, split: str, image_size: int) -> ImageData:
    """A ``cmkit.datasets`` data set padded to image_size (folders and emoji are resized to it instead)."""
    resized = name in ("folder", "emoji")
    data = load_dataset(name, root, split, resolution=image_size if resized else 0)
    return ImageData(pad_images(data.images, image_size), data.labels, data.num_classes)


def crop_images(x: Tensor, h: int, w: int) -> Tensor:
    """Undo ``pad_images``: the centred h×w window."""
    top, left = (x.shape[2] - h) // 2, (x.shape[3] - w) // 2
    return x[:, :, top:top + h, left:left + w]


# --- autoencoder -----------------------------------------------------------------------------------

class AutoencoderTask:
    """The ``loop.Task`` of a KL autoencoder run."""

    name = "autoencoder"

    def __init__(self, cfg: AutoencoderTrainConfig):
        check_common(cfg)
        self.cfg = cfg
        data = load_images(cfg.data, cfg.data_root, "train", cfg.image_size)
        self.model_config = AutoencoderConfig(in_channels=data.shape[0], channels=cfg.channels,
                                              num_res_blocks=cfg.num_res_blocks, latent_channels=cfg.latent_channels,
                                              norm_groups=cfg.norm_groups)
        if cfg.image_size % self.model_config.downsample_factor:
            raise CmkitError(f"image_size={cfg.image_size} is not a multiple of the autoencoder's downsampling "
                             f"factor {self.model_config.downsample_factor} (len(channels) = {len(cfg.channels)})")
        if cfg.reconstruction not in ("l1", "l2"):
            raise CmkitError(f"reconstruction must be 'l1' or 'l2', got {cfg.reconstruction!r}")
        torch.manual_seed(cfg.seed)
        self.model = KLAutoencoder(self.model_config).train()
        self.ema = make_copy(self.model).eval()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.batches = Batches(data, cfg.batch_size, cfg.seed)
        self.grid = data.images[:GRID_IMAGES].float() / 127.5 - 1

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model, "ema": self.ema}

    def train_step(self, step: int) -> dict[str, Any]:
        x, _ = self.batches.get(step)
        loss, terms = self.model.loss(x, self.cfg.kl_weight, self.cfg.reconstruction, self.generator)
        stats = guarded_update(loss.mean(), list(self.model.parameters()), self.optimizer, self.cfg.grad_clip)
        if not stats["skipped"]:
            ema_update(self.ema, self.model, self.cfg.ema_rate)
        return {**stats, **terms}

    def export(self, out: Path, step: int) -> None:
        weights = "ema" if self.cfg.ema_rate > 0 else "model"
        model = self.ema if weights == "ema" else self.model
        model.save_pretrained(out, extra={"recipe": {"step": step, "weights": weights, "train": to_dict(self.cfg)}})

    @torch.no_grad()
    def sample(self, out: Path, step: int) -> None:
        """Originals (top row) and EMA reconstructions D(μ(x)) (bottom row)."""
        recon = self.ema.decode(self.ema.encode(self.grid)).clamp(-1, 1)
        save_grid(torch.cat([self.grid, recon]), out / f"step_{step:06d}_recon.png", nrow=GRID_IMAGES)


def train_autoencoder(cfg: AutoencoderTrainConfig, progress: bool = True) -> dict[str, Any]:
    """Train a KL autoencoder; returns the loop summary. The model is in ``cfg.out_dir/model``."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    task = AutoencoderTask(cfg)
    settings = LoopSettings(cfg.steps, cfg.log_every, cfg.ckpt_every, cfg.sample_every, cfg.resume)
    return run(task, cfg.out_dir, to_dict(cfg), settings, progress)


# --- consistency decoder ---------------------------------------------------------------------------

@torch.no_grad()
def latent_statistics(ae: KLAutoencoder, images: Tensor,
                      batch_size: int = 500) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of μ(x) over images (N, C, H, W) in [−1, 1] (float64 sums)."""
    total = torch.zeros(ae.config.latent_channels, dtype=torch.float64)
    total_sq, count = torch.zeros_like(total), 0
    for i in range(0, len(images), batch_size):
        z = ae.encode(images[i:i + batch_size].float()).double().transpose(0, 1).flatten(1)
        total += z.sum(1)
        total_sq += z.square().sum(1)
        count += z.shape[1]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp(min=0).sqrt().clamp(min=1e-6)
    return tuple(mean.tolist()), tuple(std.tolist())


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


def decoder_config_for(ae: KLAutoencoder, cfg: DecoderTrainConfig, latent_mean: tuple[float, ...],
                       latent_std: tuple[float, ...]) -> DecoderConfig:
    """The ``DecoderConfig`` of a decoder for ``ae``'s latent space (channels, ×f, mean/std, scale 1)."""
    a = ae.config
    dcfg = DecoderConfig(block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
                         in_channels=a.in_channels + a.latent_channels, out_channels=a.in_channels,
                         norm_num_groups=cfg.norm_num_groups, time_embed_dim=cfg.time_embed_dim or None,
                         latent_channels=a.latent_channels, upscale=a.downsample_factor, scaling_factor=1.0,
                         latent_mean=latent_mean, latent_std=latent_std)
    if cfg.image_size % dcfg.pixel_multiple or cfg.image_size % a.downsample_factor:
        raise CmkitError(f"image_size={cfg.image_size} must be a multiple of the decoder UNet's {dcfg.pixel_multiple} "
                         f"(2^(levels−1)) and of the autoencoder's factor {a.downsample_factor}")
    return dcfg


class DecoderTask:
    """The ``loop.Task`` of a consistency-decoder run."""

    name = "decoder"

    def __init__(self, cfg: DecoderTrainConfig):
        check_common(cfg)
        self.cfg = cfg
        self.ae = KLAutoencoder.from_pretrained(cfg.autoencoder)
        data = load_images(cfg.data, cfg.data_root, "train", cfg.image_size)
        if data.shape[0] != self.ae.config.in_channels:
            raise CmkitError(f"data set {cfg.data!r} has {data.shape[0]} channels but the autoencoder "
                             f"{cfg.autoencoder} takes {self.ae.config.in_channels}")
        if cfg.stats_images < 1:
            raise CmkitError(f"stats_images must be at least 1, got {cfg.stats_images}")
        pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(cfg.seed))[:cfg.stats_images]
        mean, std = latent_statistics(self.ae, data.images[pick].float() / 127.5 - 1)
        self.config = decoder_config_for(self.ae, cfg, mean, std)
        self.unet = init_decoder_unet(self.config, cfg.seed).train()
        self.ema = make_copy(self.unet).eval()
        self.loss = DecoderConsistencyLoss(self.config, cfg.steps, cfg.gaps, cfg.distance, cfg.index_sampling)
        self.optimizer = torch.optim.Adam(self.unet.parameters(), lr=cfg.lr)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.batches = Batches(data, cfg.batch_size, cfg.seed)
        self.grid = data.images[:GRID_IMAGES].float() / 127.5 - 1

    def run_config(self) -> dict[str, Any]:
        """The run's config plus the decoder config it implies (so a resume with another autoencoder fails)."""
        return {**to_dict(self.cfg), "decoder_config": self.config.to_dict()}

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.unet, "ema": self.ema}

    def train_step(self, step: int) -> dict[str, Any]:
        x0, _ = self.batches.get(step)
        with torch.no_grad():
            z_norm = normalize_latents(self.ae.encode(x0), self.config)
        loss = self.loss(self.unet, x0, z_norm, step=step, generator=self.generator).mean()
        stats = guarded_update(loss, list(self.unet.parameters()), self.optimizer, self.cfg.grad_clip)
        if not stats["skipped"]:
            ema_update(self.ema, self.unet, self.cfg.ema_rate)
        return {**stats, **self.loss.stats(step)}

    def decoder(self) -> ConsistencyDecoder:
        """The exported network (EMA unless ema_rate = 0) as a ``ConsistencyDecoder`` (shares weights)."""
        return ConsistencyDecoder(self.config, self.ema if self.cfg.ema_rate > 0 else self.unet)

    def export(self, out: Path, step: int) -> None:
        from .weights import save_cmkit

        source = {"trained_by": "cmkit train-decoder", "autoencoder": self.cfg.autoencoder, "step": step,
                  "weights": "ema" if self.cfg.ema_rate > 0 else "model", "train": to_dict(self.cfg)}
        save_cmkit(self.decoder().unet.state_dict(), self.config, out, source=source)

    @torch.no_grad()
    def sample(self, out: Path, step: int) -> None:
        """Rows: originals, the autoencoder's decoder, the consistency decoder at 1 and 2 steps (fixed noise)."""
        z = self.ae.encode(self.grid)
        dec = self.decoder()
        rows = [self.grid, self.ae.decode(z).clamp(-1, 1)]
        for schedule in ((1.0,), (1.0, 0.5)):
            rows.append(dec.decode(z, schedule, torch.Generator().manual_seed(0)))
        save_grid(torch.cat(rows), out / f"step_{step:06d}_ae_cd1_cd2.png", nrow=GRID_IMAGES)


def train_decoder(cfg: DecoderTrainConfig, progress: bool = True) -> dict[str, Any]:
    """Train a consistency decoder on ``cfg.autoencoder``'s latents; the decoder is in ``cfg.out_dir/model``."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    task = DecoderTask(cfg)
    settings = LoopSettings(cfg.steps, cfg.log_every, cfg.ckpt_every, cfg.sample_every, cfg.resume)
    return run(task, cfg.out_dir, task.run_config(), settings, progress)
