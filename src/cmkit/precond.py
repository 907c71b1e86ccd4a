"""Preconditioning: turn a raw backbone F_θ into a denoiser ``model(x, sigma, **cond) -> x0``.

EDM (Karras et al. 2022, Table 1) for diffusion teachers, and the boundary-shifted form of
Song et al. 2023 (Appendix C; ``get_scalings_for_boundary_condition``) for consistency models, which
makes f_θ(x, σ_min) = x exactly. σ arithmetic always runs in fp32, also under autocast.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from .schedules import SIGMA_DATA, SIGMA_MAX, SIGMA_MIN
from .utils import append_dims, as_sigma

Kind = Literal["edm", "cm"]


def edm_scalings(sigma: Tensor, sigma_data: float = SIGMA_DATA) -> tuple[Tensor, Tensor, Tensor]:
    """EDM c_skip, c_out, c_in (Karras et al. 2022, Table 1)."""
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma**2 + sigma_data**2).sqrt()
    return c_skip, c_out, c_in


def cm_scalings(sigma: Tensor, sigma_data: float = SIGMA_DATA, sigma_min: float = SIGMA_MIN) -> tuple[Tensor, Tensor, Tensor]:
    """Boundary-shifted c_skip, c_out, c_in (CM Appendix C): c_skip(σ_min) = 1, c_out(σ_min) = 0.

    Note the c_out denominator uses σ, not σ - σ_min, exactly as in the reference code.
    """
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
    c_out = (sigma - sigma_min) * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma**2 + sigma_data**2).sqrt()
    return c_skip, c_out, c_in


def c_noise(sigma: Tensor) -> Tensor:
    """Noise conditioning c_noise(σ) = ln(σ)/4 (EDM); the backbone embeds it (positional or Fourier)."""
    return sigma.clamp(min=1e-20).log() / 4


class Precond(nn.Module):
    """A denoiser ``D(x, σ, class_labels=None) -> x0`` built from a backbone ``net(x_in, c_noise, class_labels)``.

    Args:
        net: backbone mapping (B, C, H, W), (B,) [, (B,)] to (B, C, H, W).
        kind: ``"edm"`` (diffusion model / teacher) or ``"cm"`` (consistency model, f(x, σ_min) = x).
    """

    def __init__(self, net: nn.Module, kind: Kind = "cm", sigma_data: float = SIGMA_DATA,
                 sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX):
        super().__init__()
        if kind not in ("edm", "cm"):
            raise ValueError(f"unknown preconditioning kind {kind!r}; expected 'edm' or 'cm'")
        self.net, self.kind = net, kind
        self.sigma_data, self.sigma_min, self.sigma_max = sigma_data, sigma_min, sigma_max

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.kind == "cm":
            return cm_scalings(sigma, self.sigma_data, self.sigma_min)
        return edm_scalings(sigma, self.sigma_data)

    def forward(self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None) -> Tensor:
        """x: (B, C, H, W) noisy images at level σ; sigma: scalar or (B,). Returns x0 estimates in fp32."""
        x = x.float()
        sigma = as_sigma(sigma, x.shape[0], x.device)
        c_skip, c_out, c_in = (append_dims(c, x.ndim) for c in self.scalings(sigma))
        F = self.net(c_in * x, c_noise(sigma), class_labels)
        with torch.autocast(x.device.type, enabled=False):
            return c_skip * x + c_out * F.float()
