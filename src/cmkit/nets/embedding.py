"""Noise-level embeddings, always computed in fp32 or better (sCM / rCM report instabilities otherwise; fp64
inputs stay fp64, which the JVP-vs-finite-difference checks use)."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..tensors import at_least_fp32


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of 1000·c_noise (ADM ``timestep_embedding``, max_period 10000)."""

    def __init__(self, dim: int, max_period: float = 10000.0, scale: float = 1000.0):
        super().__init__()
        half = dim // 2
        self.register_buffer("freqs", torch.exp(-math.log(max_period) * torch.arange(half) / half), persistent=False)
        self.scale = scale

    def forward(self, c_noise: Tensor) -> Tensor:
        args = (self.scale * at_least_fp32(c_noise))[:, None] * self.freqs[None]
        return torch.cat([args.cos(), args.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Gaussian Fourier features [cos 2πWc, sin 2πWc], W ~ N(0, scale²) fixed (NCSN++; iCT uses scale 0.02)."""

    def __init__(self, dim: int, scale: float = 16.0):
        super().__init__()
        self.register_buffer("W", torch.randn(dim // 2) * scale)

    def forward(self, c_noise: Tensor) -> Tensor:
        args = 2 * math.pi * at_least_fp32(c_noise)[:, None] * self.W[None]
        return torch.cat([args.cos(), args.sin()], dim=1)


def make_embedding(kind: str, dim: int, fourier_scale: float, positional_scale: float = 1000.0) -> nn.Module:
    """``positional_scale`` multiplies c_noise before the sinusoids: ADM's 1000, or sCM's 1 for c_noise(t) = t
    (a JVP objective differentiates the embedding in time; 1000·t makes that derivative high-frequency)."""
    if kind == "positional":
        return PositionalEmbedding(dim, scale=positional_scale)
    if kind == "fourier":
        return FourierEmbedding(dim, fourier_scale)
    raise ValueError(f"unknown noise embedding {kind!r}; expected 'positional' or 'fourier'")
