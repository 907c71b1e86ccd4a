"""A small KL-regularised convolutional autoencoder (the latent space a consistency decoder is trained for).

The LDM "KL-f" autoencoder of Rombach et al. 2022 (§3, App. G) at a CPU-sized width, without the
perceptual and adversarial terms: an encoder E maps an image x (B, C_img, H, W) in [−1, 1] to a diagonal
Gaussian posterior q(z|x) = N(μ(x), diag exp(logvar(x))) with ``latent_channels`` channels at 1/f of the
resolution, f = 2^(len(channels) − 1); a decoder D maps z back to pixels. Training minimises

    L(x) = d(x, D(z)) + β · KL(q(z|x) ‖ N(0, I)) / (C_img·H·W),       z = μ + exp(logvar/2)·ε, ε ~ N(0, I)
    KL  = ½ Σ (μ² + exp(logvar) − 1 − logvar)                       (Kingma & Welling 2014, App. B)

with d the per-pixel L1 or L2 mean, so β is in nats per pixel (LDM uses β ≈ 1e-6 per latent element
against a summed reconstruction loss). ``encode`` returns the posterior mean, as OpenAI's consistency
decoder expects (``vae.encode(x).latent_dist.mean``); ``decode`` is the autoencoder's own decoder.

Saved as a cmkit model directory (``config.json`` + ``model.safetensors``, kind ``autoencoder``; no pickles).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import dataclass_from_dict
from ..errors import CmkitError
from ..files import load_safetensors
from ..formats.model_dir import read_model_dir, save_model_dir

LOGVAR_RANGE = (-30.0, 20.0)  # LDM's DiagonalGaussianDistribution clamp


@dataclass(frozen=True)
class AutoencoderConfig:
    """Shape of the autoencoder.

    Args:
        in_channels: image channels (1 for Fashion-MNIST, 3 for RGB).
        channels: widths per resolution level; the latent is at 1/2^(len(channels)−1) of the image side.
        num_res_blocks: residual blocks per level (encoder and decoder).
        latent_channels: C of the latent z (B, C, H/f, W/f).
        norm_groups: GroupNorm groups (must divide every width).
    """

    in_channels: int = 1
    channels: tuple[int, ...] = (32, 64, 128)
    num_res_blocks: int = 1
    latent_channels: int = 2
    norm_groups: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if not self.channels or min(self.channels) < 1 or self.in_channels < 1 or self.latent_channels < 1:
            raise CmkitError(f"autoencoder widths and channel counts must be positive, got {self}")
        bad = [c for c in self.channels if c % self.norm_groups]
        if bad:
            raise CmkitError(f"autoencoder widths {bad} are not divisible by norm_groups={self.norm_groups}")

    @property
    def downsample_factor(self) -> int:
        """f: image side / latent side."""
        return 2 ** (len(self.channels) - 1)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AutoencoderConfig:
        return dataclass_from_dict(cls, d, "autoencoder")


class ResBlock(nn.Module):
    """GN → SiLU → conv3×3 → GN → SiLU → conv3×3, plus a (1×1 if the width changes) skip."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Encoder(nn.Module):
    """x (B, C_img, H, W) → (μ, logvar), each (B, C_latent, H/f, W/f); stride-2 convolutions downsample."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch, g = cfg.channels, cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i, c in enumerate(ch):
            cin = ch[max(i - 1, 0)]
            layers += [ResBlock(cin if j == 0 else c, c, g) for j in range(cfg.num_res_blocks)]
            if i < len(ch) - 1:
                layers.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        layers.append(ResBlock(ch[-1], ch[-1], g))
        self.blocks = nn.Sequential(*layers)
        self.norm_out = nn.GroupNorm(g, ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.conv_out(F.silu(self.norm_out(self.blocks(self.conv_in(x)))))
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)


class Decoder(nn.Module):
    """z (B, C_latent, h, w) → image (B, C_img, f·h, f·w); nearest ×2 upsampling + conv3×3."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch, g = cfg.channels[::-1], cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        layers: list[nn.Module] = [ResBlock(ch[0], ch[0], g)]
        for i, c in enumerate(ch):
            cin = ch[max(i - 1, 0)]
            layers += [ResBlock(cin if j == 0 else c, c, g) for j in range(cfg.num_res_blocks)]
            if i < len(ch) - 1:
                layers += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(c, c, 3, padding=1)]
        self.blocks = nn.Sequential(*layers)
        self.norm_out = nn.GroupNorm(g, ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], cfg.in_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        return self.conv_out(F.silu(self.norm_out(self.blocks(self.conv_in(z)))))


def kl_divergence(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(μ, diag e^logvar) ‖ N(0, I)) per sample = ½ Σ (μ² + e^logvar − 1 − logvar), shape (B,)."""
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


class KLAutoencoder(nn.Module):
    """``encode(x) -> μ`` (raw latents), ``decode(z) -> x̂``, ``posterior(x) -> (μ, logvar)``, ``loss(x)``."""

    def __init__(self, config: AutoencoderConfig | None = None):
        super().__init__()
        self.config = config or AutoencoderConfig()
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)

    def check_images(self, x: Tensor) -> None:
        """One-line ``CmkitError`` unless x is a float (B, C_img, H, W) batch with sides divisible by f."""
        c, f = self.config.in_channels, self.config.downsample_factor
        if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] != c or not x.is_floating_point():
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise CmkitError(f"the autoencoder takes float images (batch, {c}, H, W) in [-1, 1]; got {shape}")
        if x.shape[2] % f or x.shape[3] % f:
            raise CmkitError(f"image sides {tuple(x.shape[2:])} must be multiples of the downsampling factor {f}")

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """q(z|x): mean and clamped log-variance."""
        self.check_images(x)
        return self.encoder(x)

    def encode(self, x: Tensor) -> Tensor:
        """The posterior mean μ(x): the raw latent a consistency decoder consumes."""
        return self.posterior(x)[0]

    def decode(self, z: Tensor) -> Tensor:
        """The autoencoder's own decoder D(z) (unclamped)."""
        c = self.config.latent_channels
        if not isinstance(z, Tensor) or z.ndim != 4 or z.shape[1] != c:
            shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise CmkitError(f"the autoencoder decodes latents (batch, {c}, h, w); got {shape}")
        return self.decoder(z)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(D(z), μ, logvar) with z = μ + exp(logvar/2)·ε drawn by the reparameterisation trick."""
        mean, logvar = self.posterior(x)
        noise_device = generator.device if generator is not None else mean.device
        eps = torch.randn(mean.shape, generator=generator, device=noise_device, dtype=mean.dtype).to(mean.device)
        return self.decoder(mean + (0.5 * logvar).exp() * eps), mean, logvar

    def loss(
        self, x: Tensor, kl_weight: float = 1e-3, reconstruction: str = "l1", generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        """Per-sample L(x) = d(x, D(z)) + β·KL/(C·H·W) (module docstring) and its two terms as floats."""
        return self.loss_from(x, *self(x, generator), kl_weight, reconstruction)

    @staticmethod
    def loss_from(
        x: Tensor, recon: Tensor, mean: Tensor, logvar: Tensor, kl_weight: float = 1e-3, reconstruction: str = "l1"
    ) -> tuple[Tensor, dict[str, float]]:
        """``loss`` from the outputs of a forward pass (so that the pass can run through a DDP wrapper)."""
        if reconstruction not in ("l1", "l2"):
            raise CmkitError(f"reconstruction loss must be 'l1' or 'l2', got {reconstruction!r}")
        diff = (recon - x).flatten(1)
        rec = diff.abs().mean(1) if reconstruction == "l1" else diff.square().mean(1)
        kl = kl_divergence(mean, logvar) / x[0].numel()
        loss = rec + kl_weight * kl
        return loss, {"rec": float(rec.detach().mean()), "kl": float(kl.detach().mean())}

    def save_pretrained(self, out_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write a model directory (``cmkit.formats.model_dir.save_model_dir``, kind ``autoencoder``)."""
        return save_model_dir(out_dir, self, "autoencoder", self.config.to_dict(), extra)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: torch.device | str = "cpu") -> KLAutoencoder:
        """Load a model directory or a training run's ``model/``; eval mode, frozen."""
        d = read_model_dir(path, "autoencoder")
        model = cls(AutoencoderConfig.from_dict(d.config))
        load_safetensors(model, d.weights)  # strict, one-line errors for missing/unexpected/mis-shaped tensors
        return model.to(device).eval().requires_grad_(False)
