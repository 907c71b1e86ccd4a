"""A frozen autoencoder's latent space as a denoiser's data space: latent diffusion (Rombach et al. 2022, LDM) and
latent consistency models (Luo et al. 2023, LCM) train cmkit's denoisers on latents z instead of pixels x.

- **Encode** (training): images are padded to the autoencoder's side (``pad_images``, e.g. Fashion-MNIST 28 → 32),
  encoded to the posterior mean μ(x) and standardised per channel to the preconditioning's σ_data, as EDM2 does
  for Stable Diffusion's latents (Karras et al. 2024, §5: latents scaled to the data's assumed std σ_data = 0.5,
  where SD's own recipe multiplies by one scalar 0.18215):

      z = σ_data · (μ(x) − mean_c) / std_c

  mean_c, std_c are measured once on the training images (``latent_statistics``) and recorded in the model's
  config (``latent.mean``, ``latent.std``), so sampling needs no data.
- **Decode** (sampling): z ↦ z·std_c/σ_data + mean_c, the raw latent, goes through the autoencoder's own decoder
  D(z) or any decoder of raw latents (a consistency decoder trained for this autoencoder, ``cmkit.decoder``),
  is clamped to [−1, 1] and cropped back to the data's side (``latent.crop``).

The denoiser itself never knows: it is an ordinary ``model(z, sigma, **cond) -> z0`` on (C, h, w) latents.
A Stable Diffusion pipeline's ``vae/`` is such an autoencoder too (``DiffusersVAE``): its UNet's latents
scaling_factor·(μ − shift_factor) are the standardisation above with fixed mean and std (``vae_standardisation``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .datasets import ImageData, load_dataset
from .denoiser_config import Config
from .errors import CmkitError
from .files import read_safetensors
from .formats.diffusers_dir import is_diffusers_vae, load_diffusers_vae
from .formats.model_dir import read_model_dir
from .nets.autoencoder import AutoencoderConfig, KLAutoencoder
from .shards import ShardSet

#: A decoder of raw latents: (latents (B, C, h, w), seed of the first image) → images in [−1, 1] at the
#: autoencoder's side; image i of the batch draws any noise it needs from seed ``seed + i``.
RawDecoder = Callable[[Tensor, int], Tensor]


def pad_images(images: Tensor, size: int) -> Tensor:
    """uint8 (N, C, H, W) → (N, C, size, size), centred on black (0 ↦ −1); e.g. Fashion-MNIST 28 → 32."""
    h, w = images.shape[2:]
    if h > size or w > size:
        raise CmkitError(f"images are {h}×{w}, larger than image_size={size}; set image_size={max(h, w)} or more")
    if (size - h) % 2 or (size - w) % 2:
        raise CmkitError(
            f"images are {h}×{w}; image_size={size} would pad unevenly (use {h + 2 * ((size - h + 1) // 2)})"
        )
    ph, pw = (size - h) // 2, (size - w) // 2
    return torch.nn.functional.pad(images, (pw, pw, ph, ph), value=0)


def load_images(name: str, root: str, split: str, image_size: int) -> ImageData | ShardSet:
    """A ``cmkit.datasets`` data set padded to image_size (folders and emoji are resized to it instead; a shard
    set, read from disk batch by batch, must hold image_size² images already)."""
    if name == "shards":
        return load_dataset(name, root, split, resolution=image_size)
    resized = name in ("folder", "captions", "emoji")
    data = load_dataset(name, root, split, resolution=image_size if resized else 0)
    return ImageData(pad_images(data.images, image_size), data.labels, data.num_classes, data.captions)


def crop_images(x: Tensor, h: int, w: int) -> Tensor:
    """Undo ``pad_images``: the centred h×w window."""
    top, left = (x.shape[2] - h) // 2, (x.shape[3] - w) // 2
    return x[:, :, top : top + h, left : left + w]


@torch.no_grad()
def latent_statistics(
    ae: KLAutoencoder, images: Tensor, batch_size: int = 500
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of μ(x) over images (N, C, H, W) in [−1, 1] (float64 sums)."""
    total = torch.zeros(ae.config.latent_channels, dtype=torch.float64)
    total_sq, count = torch.zeros_like(total), 0
    for i in range(0, len(images), batch_size):
        z = ae.encode(images[i : i + batch_size].float()).double().transpose(0, 1).flatten(1).cpu()
        total += z.sum(1)
        total_sq += z.square().sum(1)
        count += z.shape[1]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp(min=0).sqrt().clamp(min=1e-6)
    return tuple(mean.tolist()), tuple(std.tolist())


def sample_statistics(
    ae: KLAutoencoder, data: ImageData | ShardSet, n: int, seed: int, device: str | torch.device = "cpu"
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``latent_statistics`` on ``n`` uint8 training images drawn without replacement with ``seed``."""
    pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n]
    return latent_statistics(ae, data.take(pick).float().to(device) / 127.5 - 1)


def check_image_channels(data: ImageData | ShardSet, ae: KLAutoencoder, data_name: str, ae_path: str) -> None:
    """The data set's images must have the autoencoder's input channels: one error line."""
    if data.shape[0] != ae.config.in_channels:
        raise CmkitError(
            f"data set {data_name!r} has {data.shape[0]} channels but the autoencoder {ae_path} "
            f"takes {ae.config.in_channels}"
        )


def autoencoder_config(path: str, key: str = "latent.autoencoder") -> AutoencoderConfig:
    """The config of the autoencoder at ``path`` (model/run directory or shipped name; the setting ``key``), one
    error line if there is none."""
    try:
        return AutoencoderConfig.from_dict(read_model_dir(path, "autoencoder").config)
    except CmkitError as e:
        raise CmkitError(f"{key}: {e}; train one first (e.g. `cmkit train --preset fmnist-ae`)") from None


def same_autoencoder(a: str, b: str) -> bool:
    """Whether two autoencoders (model/run directories or shipped names) hold the same weights, exactly: a latent
    model's standardisation was measured with one and holds for it only. A pipeline's ``vae/`` (diffusers) is
    compared by its weights too."""
    if Path(a).expanduser().resolve() == Path(b).expanduser().resolve():
        return True
    if is_diffusers_vae(a) or is_diffusers_vae(b):
        if not (is_diffusers_vae(a) and is_diffusers_vae(b)):
            return False
        ta, tb = load_diffusers_vae(a).state_dict(), load_diffusers_vae(b).state_dict()
    else:
        wa, wb = read_model_dir(a, "autoencoder").weights, read_model_dir(b, "autoencoder").weights
        if wa.resolve() == wb.resolve():
            return True
        ta, tb = read_safetensors(wa), read_safetensors(wb)
    return ta.keys() == tb.keys() and all(ta[k].shape == tb[k].shape and torch.equal(ta[k], tb[k]) for k in ta)


def adopt_teacher_space(cfg: Config, teacher: Config, teacher_path: str) -> None:
    """A distilled student works in its teacher's space: pixels for a pixel teacher; for a latent teacher, an
    autoencoder with the same weights and the teacher's recorded standardisation and crop, adopted rather than
    measured again (a re-measurement could differ). Anything else is one error line."""
    lat, tlat = cfg.latent, teacher.latent
    if cfg.model.arch == "diffusers" and not lat.autoencoder:  # a copy of the teacher's UNet: the teacher's space
        lat.autoencoder, lat.image_size = tlat.autoencoder, tlat.image_size
    if bool(lat.autoencoder) != bool(tlat.autoencoder):
        fix = f"latent.autoencoder={tlat.autoencoder}" if tlat.autoencoder else "no latent.autoencoder"
        raise CmkitError(
            f"teacher {teacher_path} is a {'latent' if tlat.autoencoder else 'pixel-space'} model and this run "
            f"is not: a student works in its teacher's space ({fix})"
        )
    if not lat.autoencoder:
        return
    if not same_autoencoder(lat.autoencoder, tlat.autoencoder):
        raise CmkitError(
            f"latent.autoencoder={lat.autoencoder} holds other weights than {tlat.autoencoder}, the autoencoder of "
            f"teacher {teacher_path}: a student works in its teacher's latent space"
        )
    if lat.mean and (tuple(lat.mean), tuple(lat.std)) != (tuple(tlat.mean), tuple(tlat.std)):
        raise CmkitError(
            f"latent.mean/std {list(lat.mean)}/{list(lat.std)} differ from those of teacher {teacher_path} "
            f"({list(tlat.mean)}/{list(tlat.std)}): leave them unset to adopt the teacher's"
        )
    lat.mean, lat.std = tuple(tlat.mean), tuple(tlat.std)
    lat.crop = lat.crop or tlat.crop


def check_latent_shape(cfg: Config, ae: AutoencoderConfig) -> None:
    """The denoiser's (in_channels, img_resolution) must be the latent's (C, image_size / f): one error line."""
    m, lat = cfg.model, cfg.latent
    f = ae.downsample_factor
    if lat.image_size % f:
        raise CmkitError(
            f"latent.image_size={lat.image_size} is not a multiple of the autoencoder's downsampling factor {f}"
        )
    want = (ae.latent_channels, lat.image_size // f)
    if (m.in_channels, m.img_resolution) != want:
        raise CmkitError(
            f"a denoiser of {lat.autoencoder}'s latents ({lat.image_size}×{lat.image_size} images → "
            f"{want[0]}×{want[1]}×{want[1]}) needs model.in_channels={want[0]} model.img_resolution={want[1]} "
            f"(got {m.in_channels}, {m.img_resolution})"
        )


class DiffusersVAE(nn.Module):
    """A diffusers ``AutoencoderKL`` (a Stable Diffusion pipeline's ``vae/``) behind the interface ``LatentSpace``
    uses: ``encode(x)`` = the posterior mean μ(x), ``decode(raw)`` = images in [−1, 1], ``config.latent_channels``.
    Its UNet's latents z = scaling_factor·(μ − shift_factor) are this standardisation with mean = shift_factor and
    std = σ_data/scaling_factor (``vae_standardisation``)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    @property
    def config(self) -> Any:
        return self.vae.config

    def encode(self, x: Tensor) -> Tensor:
        return self.vae.encode(x.to(self.vae.dtype)).latent_dist.mean.float()

    def decode(self, raw: Tensor) -> Tensor:
        return self.vae.decode(raw.to(self.vae.dtype)).sample.float()


def vae_standardisation(vae_config: Any, channels: int, sigma_data: float) -> tuple[tuple[float, ...], ...]:
    """(mean, std) per channel under which ``LatentSpace`` maps a diffusers VAE's raw latents to its UNet's:
    z = scaling_factor·(μ − shift_factor) (diffusers' defaults 0.18215 and none)."""
    scale = float(getattr(vae_config, "scaling_factor", None) or 0.18215)
    shift = float(getattr(vae_config, "shift_factor", None) or 0.0)
    return (shift,) * channels, (sigma_data / scale,) * channels


@dataclass
class LatentSpace:
    """The autoencoder and the standardisation of a latent denoiser (module docstring)."""

    ae: KLAutoencoder | DiffusersVAE
    mean: Tensor  # (C,) raw-latent mean per channel
    std: Tensor  # (C,) raw-latent std per channel
    sigma_data: float
    crop: int = 0  # side the decoded images are cropped to (0: the autoencoder's side)

    @classmethod
    def load(cls, cfg: Config, device: str | torch.device = "cpu") -> LatentSpace | None:
        """The latent space of a run or model config; None for a pixel-space denoiser."""
        lat = cfg.latent
        if not lat.autoencoder:
            return None
        if is_diffusers_vae(lat.autoencoder):  # a text-to-image pipeline's vae/ (its config holds the scaling)
            return cls.from_autoencoder(cfg, DiffusersVAE(load_diffusers_vae(lat.autoencoder)).to(device))
        check_latent_shape(cfg, autoencoder_config(lat.autoencoder))
        return cls.from_autoencoder(cfg, KLAutoencoder.from_pretrained(lat.autoencoder, device=device))

    @classmethod
    def from_autoencoder(cls, cfg: Config, ae: KLAutoencoder | DiffusersVAE) -> LatentSpace:
        """The latent space of ``cfg`` around an autoencoder already loaded (on its device)."""
        lat, device = cfg.latent, next(ae.parameters()).device
        c = ae.config.latent_channels
        mean, std = (lat.mean, lat.std) if lat.mean else ((0.0,) * c, (1.0,) * c)
        if len(mean) != c or len(std) != c:
            raise CmkitError(f"latent.mean and latent.std need {c} values (the latent channels), got {mean}, {std}")
        t = dict(dtype=torch.float32, device=device)
        return cls(ae, torch.tensor(mean, **t), torch.tensor(std, **t), cfg.model.sigma_data, lat.crop)

    def _view(self, v: Tensor) -> Tensor:
        return v.view(1, -1, 1, 1)

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Images in [−1, 1] at the autoencoder's side → standardised latents z = σ_data·(μ(x) − mean)/std."""
        return self.sigma_data * (self.ae.encode(x) - self._view(self.mean)) / self._view(self.std)

    def to_raw(self, z: Tensor) -> Tensor:
        """Standardised latents → the autoencoder's raw latents (what its decoder and a consistency decoder take)."""
        return z.float() * self._view(self.std) / self.sigma_data + self._view(self.mean)

    @torch.no_grad()
    def decode(self, z: Tensor, decoder: RawDecoder | None = None, seed: int = 0) -> Tensor:
        """Standardised latents → images in [−1, 1], cropped to ``crop``; ``decoder`` replaces the autoencoder's
        own decoder (e.g. a consistency decoder; image i draws its noise from ``seed + i``)."""
        raw = self.to_raw(z)
        x = (decoder(raw, seed) if decoder is not None else self.ae.decode(raw)).float().clamp(-1, 1)
        return crop_images(x, self.crop, self.crop) if self.crop else x


__all__ = [
    "DiffusersVAE",
    "LatentSpace",
    "RawDecoder",
    "autoencoder_config",
    "check_image_channels",
    "check_latent_shape",
    "crop_images",
    "latent_statistics",
    "load_images",
    "adopt_teacher_space",
    "pad_images",
    "same_autoencoder",
    "sample_statistics",
    "vae_standardisation",
]
