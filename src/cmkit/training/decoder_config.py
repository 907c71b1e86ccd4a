"""Run configs of the KL autoencoder and of the consistency decoder trained on its latents.

Both are ``cmkit.config.RunConfig`` s with the shared ``data`` and ``train`` sections, so overrides,
validation, presets (``cmkit.training.presets``: ``fmnist-ae``, ``fmnist-cdec``, ``digits-ae``, ``digits-cdec``), the
loop and the run directory are those of every other run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from ..config import DataConfig, DataName, RunConfig, TrainConfig, require
from ..decoder.consistency import check_gaps


@dataclass
class ImageDataConfig(DataConfig):
    """``DataConfig`` plus the side the images are padded to (black, −1); folders and emoji are resized."""

    name: DataName = "fashion_mnist"
    image_size: int = 32  # images are padded to this side

    def check(self) -> None:
        super().check()
        require(self.image_size >= 1, f"data.image_size must be at least 1, got {self.image_size}")


def _train(**values) -> TrainConfig:
    """The loop settings of these runs: Adam, clipping at 1, one EMA of 0.999."""
    base = dict(
        steps=6000,
        lr=1e-3,
        optimizer="adam",
        grad_clip=1.0,
        ema_rates=(0.999,),
        log_every=50,
        ckpt_every=1000,
        sample_every=1000,
    )
    return TrainConfig(**{**base, **values})


@dataclass
class AutoencoderModelConfig:
    """``cmkit.nets.autoencoder.AutoencoderConfig`` as a config section."""

    in_channels: int = 1  # image channels (1 for Fashion-MNIST and digits, 3 for RGB)
    channels: tuple[int, ...] = (16, 32, 64)  # widths per level; the latent is at 1/2^(levels-1)
    num_res_blocks: int = 1  # residual blocks per level
    latent_channels: int = 2  # C of the latent
    norm_groups: int = 8  # GroupNorm groups (divide every width)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)


@dataclass
class AutoencoderLossConfig:
    reconstruction: Literal["l1", "l2"] = "l1"  # per-pixel reconstruction distance
    kl_weight: float = 1e-3  # β, nats per pixel


@dataclass
class AutoencoderRunConfig(RunConfig):
    """A KL autoencoder run (``cmkit.nets.autoencoder``)."""

    kind: ClassVar[str] = "autoencoder"
    model: AutoencoderModelConfig = field(default_factory=AutoencoderModelConfig)
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    loss: AutoencoderLossConfig = field(default_factory=AutoencoderLossConfig)
    train: TrainConfig = field(default_factory=_train)

    def validate(self) -> None:
        super().validate()
        self.data.check()
        m, size = self.model, self.data.image_size
        require(bool(m.channels) and min(m.channels) >= 1, f"model.channels must be positive, got {list(m.channels)}")
        require(
            size % m.downsample_factor == 0,
            f"data.image_size={size} is not a multiple of the autoencoder's downsampling factor "
            f"{m.downsample_factor} (len(model.channels) = {len(m.channels)})",
        )
        bad = [c for c in m.channels if c % m.norm_groups]
        require(not bad, f"model.channels {bad} are not divisible by model.norm_groups={m.norm_groups}")
        require(self.loss.kl_weight >= 0, f"loss.kl_weight must be 0 or more, got {self.loss.kl_weight}")


@dataclass
class DecoderModelConfig:
    """The decoder UNet and the autoencoder whose latents condition it."""

    autoencoder: str = "fmnist-ae"  # a trained autoencoder (model or run directory, or the shipped name)
    block_out_channels: tuple[int, ...] = (16, 32, 32, 32)  # widths of the UNet levels
    layers_per_block: int = 1  # residual blocks per down level
    norm_num_groups: int = 8  # GroupNorm groups
    time_embed_dim: int = 0  # 0 = 4 · block_out_channels[0]
    stats_images: int = 5000  # training images for the latent mean/std


@dataclass
class DecoderLossConfig:
    gaps: tuple[int, ...] = (64, 16, 4, 1)  # Δ per curriculum stage, grid indices, non-increasing
    distance: Literal["l2", "l1", "pseudo_huber"] = "l2"  # d of the consistency loss
    index_sampling: Literal["uniform", "lognormal"] = "uniform"  # p(n) over the 64-step grid


@dataclass
class DecoderRunConfig(RunConfig):
    """A consistency-decoder run (``consistency.py``) on the latents of a trained autoencoder."""

    kind: ClassVar[str] = "decoder"
    model: DecoderModelConfig = field(default_factory=DecoderModelConfig)
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    loss: DecoderLossConfig = field(default_factory=DecoderLossConfig)
    train: TrainConfig = field(default_factory=lambda: _train(steps=5000, lr=2e-4))

    def validate(self) -> None:
        super().validate()

        self.data.check()
        m = self.model
        require(m.stats_images >= 1, f"model.stats_images must be at least 1, got {m.stats_images}")
        require(bool(m.autoencoder), "model.autoencoder is not set (a directory from `cmkit train --preset fmnist-ae`)")
        check_gaps(self.loss.gaps, "loss.gaps")
        bad = [c for c in m.block_out_channels if c % m.norm_num_groups]
        require(
            not bad, f"model.block_out_channels {bad} are not divisible by model.norm_num_groups={m.norm_num_groups}"
        )
