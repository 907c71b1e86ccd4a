"""Progressive distillation (Salimans & Ho 2022; ``progdist_losses`` in the CM reference code), in σ-space.

A student denoiser D_θ (EDM-preconditioned, a diffusion model) learns to do in one Euler (DDIM) step what the
teacher does in two: on a Karras grid of N intervals, with t = σ(i/N), t2 = σ((i+½)/N), t3 = σ((i+1)/N),

    x_t2 = Euler_teacher(x_t, t → t2),  x_t3 = Euler_teacher(x_t2, t2 → t3)
    x̂    = x_t − t·(x_t3 − x_t)/(t3 − t)          (the x0 whose Euler step from t lands on x_t3)
    L    = λ(t)·‖D_θ(x_t, t) − x̂‖²

Every ``halve_every`` steps the student becomes the teacher and N halves (N_0 → N_0/2 → … → 1), so after k
stages the student samples in N_0/2^k Euler steps (``sampling.sample_progdist``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .. import noise
from ..schedules import RHO, SIGMA_DATA, SIGMA_MAX, SIGMA_MIN
from ..solvers import euler_step
from ..tensors import append_dims
from .base import WEIGHTINGS, weighting
from .options import Option, at_least, option


class PDLoss:
    """L = λ(t)·mean((D_θ(x_t, t) − x̂)²) with x̂ from two teacher Euler steps (module docstring)."""

    needs_teacher = True
    WEIGHTINGS = WEIGHTINGS

    OPTIONS: ClassVar[dict[str, Option]] = {
        "num_scales": option("N of the first stage (it halves every halve_every steps)", at_least(2)),
        "halve_every": option("steps per stage (then N halves and the student becomes the teacher)", at_least(1)),
        "weighting": option("λ(σ)", choices=WEIGHTINGS),
    }

    def __init__(
        self,
        num_scales: int = 64,
        halve_every: int = 1000,
        weighting: str = "truncated-snr",
        sigma_min: float = SIGMA_MIN,
        sigma_max: float = SIGMA_MAX,
        sigma_data: float = SIGMA_DATA,
        rho: float = RHO,
    ):
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}; expected one of {', '.join(WEIGHTINGS)}")
        self.N0, self.halve_every, self.weighting = num_scales, halve_every, weighting
        self.sigma_min, self.sigma_max, self.sigma_data, self.rho = sigma_min, sigma_max, sigma_data, rho

    def num_scales(self, step: int) -> int:
        """N of the stage that ``step`` belongs to: N_0 halved once per finished stage, at least 1."""
        return max(1, self.N0 >> (step // self.halve_every))

    def stage_ends(self, step: int) -> bool:
        """Whether ``step`` is the last step of a stage (then the student becomes the teacher)."""
        return (step + 1) % self.halve_every == 0 and self.num_scales(step) > 1

    def target_mu(self, step: int) -> float | None:
        return None

    def stats(self, step: int) -> dict[str, float]:
        return {"N": self.num_scales(step)}

    def sigma_at(self, u: Tensor) -> Tensor:
        """σ at fraction u ∈ [0, 1] of the ρ-spaced grid from σ_max (u = 0) to σ_min (u = 1)."""
        hi, lo = self.sigma_max ** (1 / self.rho), self.sigma_min ** (1 / self.rho)
        return (hi + u * (lo - hi)) ** self.rho

    def target(self, teacher: nn.Module, x_t: Tensor, t: Tensor, t2: Tensor, t3: Tensor, **cond: Any) -> Tensor:
        """x̂: the x0 whose Euler step from (x_t, t) lands where two teacher Euler steps t → t2 → t3 do."""
        with torch.no_grad():
            x_t3 = euler_step(teacher, euler_step(teacher, x_t, t, t2, **cond), t2, t3, **cond)
        t_, t3_ = append_dims(t, x_t.ndim), append_dims(t3, x_t.ndim)
        return x_t - t_ * (x_t3 - x_t) / (t3_ - t_)

    def __call__(
        self,
        model: nn.Module,
        x0: Tensor,
        *,
        step: int,
        target: nn.Module | None = None,
        teacher: nn.Module | None = None,
        **cond: Any,
    ) -> Tensor:
        if teacher is None:
            raise ValueError("progressive distillation needs a teacher (set train.teacher=PATH to an EDM model)")
        N = self.num_scales(step)
        i = noise.randint(N, x0.shape[0], x0.device).float()
        t, t2, t3 = (self.sigma_at(v / N) for v in (i, i + 0.5, i + 1))
        x_t = x0 + append_dims(t, x0.ndim) * noise.randn_like(x0)
        x_hat = self.target(teacher, x_t, t, t2, t3, **cond)
        diff = (model(x_t, t, **cond) - x_hat).float().square().flatten(1).mean(1)
        return weighting(self.weighting, t, self.sigma_data) * diff
