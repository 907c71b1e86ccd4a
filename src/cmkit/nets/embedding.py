"""Noise-level embeddings, always computed in fp32 or better (sCM / rCM report instabilities otherwise; fp64
inputs stay fp64, which the JVP-vs-finite-difference checks use)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..tensors import at_least_fp32


class PositionalEmbedding(nn.Module):
    """Sinusoids [cos, sin] of scale·c_noise·f_i with f_i = max_period^(−i/(half − endpoint)), i < half = dim/2.

    cmkit's networks and ADM (``timestep_embedding``) embed 1000·c_noise (scale 1000, max_period 10000); EDM's
    networks (``PositionalEmbedding`` of NVlabs/edm ``training/networks.py``) their c_noise as given (scale 1),
    DDPM++ with ``endpoint=True`` so that the last frequency is 1/max_period. The frequencies are not weights.
    """

    def __init__(self, dim: int, max_period: float = 10000.0, scale: float = 1000.0, endpoint: bool = False):
        super().__init__()
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half) / (half - int(endpoint)))
        self.register_buffer("freqs", freqs, persistent=False)
        self.scale = scale

    def forward(self, c_noise: Tensor) -> Tensor:
        args = (self.scale * at_least_fp32(c_noise))[:, None] * self.freqs[None]
        return torch.cat([args.cos(), args.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Gaussian Fourier features [cos 2πc·W, sin 2πc·W], W ~ N(0, scale²) fixed (Song et al. 2021's NCSN++;
    iCT uses scale 0.02). ``buffer`` names W in the state dict: EDM's NCSN++ (and so its released pickles) calls it
    ``freqs``, cmkit's networks ``W``."""

    def __init__(self, dim: int, scale: float = 16.0, buffer: str = "W"):
        super().__init__()
        self.buffer = buffer
        self.register_buffer(buffer, torch.randn(dim // 2) * scale)

    def forward(self, c_noise: Tensor) -> Tensor:
        args = at_least_fp32(c_noise)[:, None] * (2 * math.pi * getattr(self, self.buffer))[None]  # EDM's order
        return torch.cat([args.cos(), args.sin()], dim=1)


def make_embedding(kind: str, dim: int, fourier_scale: float, positional_scale: float = 1000.0) -> nn.Module:
    """``positional_scale`` multiplies c_noise before the sinusoids: ADM's 1000, or sCM's 1 for c_noise(t) = t
    (a JVP objective differentiates the embedding in time; 1000·t makes that derivative high-frequency)."""
    if kind == "positional":
        return PositionalEmbedding(dim, scale=positional_scale)
    if kind == "fourier":
        return FourierEmbedding(dim, fourier_scale)
    raise ValueError(f"unknown noise embedding {kind!r}; expected 'positional' or 'fourier'")
