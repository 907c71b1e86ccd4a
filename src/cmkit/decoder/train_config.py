"""Configs and presets of ``cmkit train-autoencoder`` and ``cmkit train-decoder``, with ``key=value`` overrides.

Each config is one flat dataclass (keys are the field names: ``steps=2000``, ``channels=16,32,64``).
Presets are sized for a 2-core CPU: ``fmnist-ae`` / ``fmnist-cdec`` (Fashion-MNIST padded to 32×32, a
latent of 2 channels at 8×8) and ``digits-ae`` / ``digits-cdec`` (scikit-learn's bundled 8×8 digits, seconds).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from ..config import _coerce, parse_overrides
from ..errors import CmkitError


@dataclass
class RunConfig:
    """What every run of these two trainers has: its data, and the settings of the training loop."""

    data: str = "fashion_mnist"
    data_root: str = ""
    image_size: int = 32              # images are padded with black (−1) to this side
    steps: int = 6000
    batch_size: int = 64
    lr: float = 1e-3
    grad_clip: float = 1.0
    ema_rate: float = 0.999           # exported weights; 0 = export the online weights
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 1000
    sample_every: int = 1000
    num_threads: int = 0
    resume: bool = False
    out_dir: str = ""                 # "" = runs/PRESET


@dataclass
class AutoencoderTrainConfig(RunConfig):
    """A KL autoencoder run (``cmkit.autoencoder``): the network and its objective."""

    channels: tuple[int, ...] = (16, 32, 64)
    num_res_blocks: int = 1
    latent_channels: int = 2
    norm_groups: int = 8
    reconstruction: str = "l1"        # l1 | l2
    kl_weight: float = 1e-3           # β, nats per pixel


@dataclass
class DecoderTrainConfig(RunConfig):
    """A consistency-decoder run (``consistency.py``) on the latents of a trained autoencoder."""

    autoencoder: str = "runs/fmnist-ae"
    block_out_channels: tuple[int, ...] = (16, 32, 32, 32)
    layers_per_block: int = 1
    norm_num_groups: int = 8
    time_embed_dim: int = 0           # 0 = 4 · block_out_channels[0]
    gaps: tuple[int, ...] = (64, 16, 4, 1)
    distance: str = "l2"              # l2 | l1 | pseudo_huber
    index_sampling: str = "uniform"   # uniform | lognormal
    stats_images: int = 5000          # training images for the latent mean/std
    steps: int = 5000
    lr: float = 2e-4


@dataclass(frozen=True)
class Preset:
    description: str
    values: dict[str, Any]


AE_PRESETS: dict[str, Preset] = {
    "fmnist-ae": Preset("KL autoencoder, Fashion-MNIST padded to 32×32 → 2×8×8 latents (f = 4), CPU", {}),
    "digits-ae": Preset("KL autoencoder, 8×8 digits → 2×4×4 latents (f = 2); a smoke run of seconds",
                        dict(data="digits", image_size=8, channels=(8, 16), norm_groups=4, steps=300,
                             batch_size=32, ckpt_every=100, sample_every=100, log_every=10)),
}
DECODER_PRESETS: dict[str, Preset] = {
    "fmnist-cdec": Preset("consistency decoder for fmnist-ae latents (4-level UNet 16–32 wide, 0.48M parameters), "
                          "CPU", {}),
    "digits-cdec": Preset("consistency decoder for digits-ae latents (2-level UNet 8–16 wide); seconds",
                          dict(autoencoder="runs/digits-ae", data="digits", image_size=8, block_out_channels=(8, 16),
                               norm_num_groups=4, stats_images=500, steps=300, batch_size=32, ckpt_every=100,
                               sample_every=100, log_every=10)),
}

C = TypeVar("C", bound=RunConfig)


def set_field(cfg: C, key: str, value: Any) -> None:
    """Set one field from a string (or a value), with its declared type; unknown keys suggest the closest."""
    names = [f.name for f in dataclasses.fields(cfg)]
    if key not in names:
        close = difflib.get_close_matches(key, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; valid keys: {', '.join(names)}"
        raise CmkitError(f"unknown config key {key!r}{hint}")
    hint_type = typing.get_type_hints(type(cfg))[key]
    setattr(cfg, key, _coerce(key, value, hint_type))


def apply_overrides(cfg: C, overrides: list[str]) -> C:
    """``key=value`` strings, in order."""
    for key, value in parse_overrides(overrides, "steps=2000"):
        set_field(cfg, key, value)
    return cfg


def _resolve(presets: dict[str, Preset], cls: type[C], name: str, overrides: list[str]) -> C:
    if name not in presets:
        close = difflib.get_close_matches(name, list(presets), n=2)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise CmkitError(f"unknown preset {name!r}; expected one of {', '.join(presets)}{hint}")
    cfg = cls()
    for key, value in presets[name].values.items():
        set_field(cfg, key, value)
    cfg = apply_overrides(cfg, overrides)
    if not cfg.out_dir:
        cfg.out_dir = f"runs/{name}"
    return cfg


def autoencoder_config(preset: str = "fmnist-ae", overrides: list[str] | None = None) -> AutoencoderTrainConfig:
    """The ``AutoencoderTrainConfig`` of a preset with overrides (out_dir defaults to runs/PRESET)."""
    return _resolve(AE_PRESETS, AutoencoderTrainConfig, preset, overrides or [])


def decoder_config(preset: str = "fmnist-cdec", overrides: list[str] | None = None) -> DecoderTrainConfig:
    """The ``DecoderTrainConfig`` of a preset with overrides (out_dir defaults to runs/PRESET)."""
    return _resolve(DECODER_PRESETS, DecoderTrainConfig, preset, overrides or [])


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """JSON-ready dict (tuples as lists)."""
    return json.loads(json.dumps(asdict(cfg)))


def check_common(cfg: RunConfig) -> None:
    """One-line errors for loop settings that cannot work."""
    for key in ("steps", "batch_size", "log_every", "image_size"):
        if getattr(cfg, key) < 1:
            raise CmkitError(f"{key} must be at least 1, got {getattr(cfg, key)}")
    if cfg.lr <= 0:
        raise CmkitError(f"lr must be positive, got {cfg.lr}")
    if not 0 <= cfg.ema_rate < 1:
        raise CmkitError(f"ema_rate must lie in [0, 1), got {cfg.ema_rate}")
