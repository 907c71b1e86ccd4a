"""The decoder's noise schedule: cosine ᾱ over 1024 steps, 64-step distilled grid, EDM preconditioning.

Reference doc §1.3 ("Constants and schedule"), transcribing openai/consistencydecoder ``__init__``,
``round_timesteps`` and the schedule loop of ``__call__``. The tables are float32 and bit-identical to
diffusers' ``ConsistencyDecoderScheduler`` (§2.2), which parity with diffusers needs.

    ᾱ_t     = cumprod(1 − β),  β from betas_for_alpha_bar(1024, cos²((t + 0.008)/1.008 · π/2), max_beta 0.999)
    σ_t     = √(1/ᾱ_t − 1)                  (σ of the VE variable x_t/√ᾱ_t = x0 + σ ε)
    c_skip  = √(1/ᾱ) · σ_d² / (σ² + σ_d²)
    c_out   = σ σ_d / √(σ² + σ_d²)
    c_in    = √(1/ᾱ) / √(σ² + σ_d²)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import CmkitError


def cosine_betas(num_timesteps: int = 1024, max_beta: float = 0.999) -> Tensor:
    """β_i = min(1 − ᾱ(t_{i+1})/ᾱ(t_i), max_beta) with the cosine ᾱ (s = 0.008), float32 (§1.3)."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
        for i in range(num_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float32, device="cpu")  # CPU even under a meta device context


@dataclass(frozen=True)
class DecoderSchedule:
    """Per-timestep float32 tables indexed by the integer timestep t ∈ [0, num_timesteps)."""

    sqrt_alpha_bar: Tensor
    sqrt_one_minus_alpha_bar: Tensor
    sigma: Tensor
    c_skip: Tensor
    c_out: Tensor
    c_in: Tensor
    num_distilled_steps: int

    @classmethod
    def cosine(
        cls, num_timesteps: int = 1024, sigma_data: float = 0.5, num_distilled_steps: int = 64
    ) -> DecoderSchedule:
        """The tables in the same float32 operation order as OpenAI and diffusers (bitwise equal)."""
        alpha_bar = torch.cumprod(1.0 - cosine_betas(num_timesteps), dim=0)
        sigma = torch.sqrt(1.0 / alpha_bar - 1)
        sqrt_recip = torch.sqrt(1.0 / alpha_bar)
        return cls(
            sqrt_alpha_bar=torch.sqrt(alpha_bar),
            sqrt_one_minus_alpha_bar=torch.sqrt(1.0 - alpha_bar),
            sigma=sigma,
            c_skip=sqrt_recip * sigma_data**2 / (sigma**2 + sigma_data**2),
            c_out=sigma * sigma_data / (sigma**2 + sigma_data**2) ** 0.5,
            c_in=sqrt_recip / (sigma**2 + sigma_data**2) ** 0.5,
            num_distilled_steps=num_distilled_steps,
        )

    @property
    def num_timesteps(self) -> int:
        return self.sigma.numel()

    def rounded_timesteps(self) -> Tensor:
        """OpenAI ``round_timesteps(arange(T), T, 64, truncate_start=False)``: t ↦ (⌊t/16⌋ + 1)·16, T ↦ T − 16.

        The result takes the 63 values {16, 32, …, 1008}; a rounded 0 (never hit) would become 16.
        """
        T, space = self.num_timesteps, self.num_timesteps // self.num_distilled_steps
        t = (torch.arange(T) // space + 1) * space
        t[t == T] -= space
        t[t == 0] += space
        return t

    def timesteps(self, schedule: Sequence[float]) -> list[int]:
        """Schedule fractions s ∈ [0, 1] → integer timesteps ``ts[int((T − 1)·s)]``; (1.0, 0.5) → [1008, 512]."""
        if len(schedule) == 0:
            raise CmkitError("the decoding schedule is empty; give at least one fraction, e.g. (1.0,)")
        rounded = self.rounded_timesteps()
        out = []
        for s in schedule:
            s = float(s)
            if not 0.0 <= s <= 1.0:
                raise CmkitError(f"schedule fractions must lie in [0, 1], got {s} (the default is 1.0, 0.5)")
            out.append(int(rounded[int((self.num_timesteps - 1) * s)]))
        return out

    def at(self, t: int) -> dict[str, float]:
        """The scalars used at timestep t, as Python floats holding the exact float32 values."""
        return {
            name: float(getattr(self, name)[t])
            for name in ("sqrt_alpha_bar", "sqrt_one_minus_alpha_bar", "sigma", "c_skip", "c_out", "c_in")
        }


def steps_to_schedule(steps: int) -> tuple[float, ...]:
    """N evenly spaced fractions from 1: 1 → (1.0,), 2 → (1.0, 0.5), 4 → (1.0, 0.75, 0.5, 0.25)."""
    if steps < 1:
        raise CmkitError(f"--steps must be at least 1, got {steps}")
    return tuple(1.0 - i / steps for i in range(steps))


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


MAX_DECODE_STEPS = 1024  # the decoder's number of timesteps


def parse_schedule(text: str) -> tuple[float, ...]:
    """'1.0,0.5' → (1.0, 0.5): fractions of the decoder's timesteps, finite, in (0, 1] and strictly decreasing."""
    try:
        values = tuple(float(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise CmkitError(f"--schedule must be comma-separated fractions like 1.0,0.5; got {text!r}") from None
    if not values:
        raise CmkitError("--schedule is empty; give fractions like 1.0,0.5")
    if not all(math.isfinite(v) and 0 < v <= 1 for v in values):
        raise CmkitError(f"--schedule fractions must be finite numbers in (0, 1] like 1.0,0.5; got {text!r}")
    if any(b >= a for a, b in zip(values, values[1:])):
        raise CmkitError(f"--schedule fractions must decrease, each step to less noise (e.g. 1.0,0.5); got {text!r}")
    if len(values) > MAX_DECODE_STEPS:
        raise CmkitError(f"--schedule has {len(values)} fractions; at most {MAX_DECODE_STEPS} (one per timestep)")
    return values
