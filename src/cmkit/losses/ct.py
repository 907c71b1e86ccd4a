"""Consistency training (Song et al. 2023, Alg. 3) with the adaptive N(k), μ(k) of the reference code."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor, nn

from .. import noise
from ..distances import get_distance
from ..schedules import RHO, SIGMA_DATA, SIGMA_MAX, SIGMA_MIN, ct_adaptive_schedule, karras_sigmas
from ..tensors import append_dims
from .base import WEIGHTINGS, paired_passes, weighting
from .options import (
    DISTANCE,
    HUBER_C,
    LPIPS_WEIGHTS,
    S0,
    S1,
    S1_AT_LEAST_S0,
    TOTAL_STEPS,
    Option,
    option,
    within,
)


class CTLoss:
    """L = λ(t)·d(f_θ(x0 + t·z, t), f_θ⁻(x0 + t2·z, t2)): CD with the Euler step and D = x0."""

    needs_teacher = False
    WEIGHTINGS = WEIGHTINGS

    OPTIONS: ClassVar[dict[str, Option]] = {
        "total_steps": TOTAL_STEPS,
        "s0": S0,
        "s1": S1,
        "mu0": option("initial target EMA rate μ0", within(0, 1, low_open=True, high_open=True)),
        "distance": DISTANCE,
        "weighting": option("λ(σ), at the larger σ", choices=WEIGHTINGS),
        "huber_c": HUBER_C,
        "lpips_weights": LPIPS_WEIGHTS,
    }
    RULES = (S1_AT_LEAST_S0,)

    def __init__(
        self,
        total_steps: int = 800_000,
        s0: int = 2,
        s1: int = 150,
        mu0: float = 0.9,
        distance: str = "l2",
        weighting: str = "uniform",
        huber_c: float | None = None,
        lpips_weights: str | None = None,
        sigma_min: float = SIGMA_MIN,
        sigma_max: float = SIGMA_MAX,
        sigma_data: float = SIGMA_DATA,
        rho: float = RHO,
    ):
        self.K, self.s0, self.s1, self.mu0 = total_steps, s0, s1, mu0
        self.grid = (sigma_min, sigma_max, rho)
        self.weighting, self.sigma_data = weighting, sigma_data
        self.distance = get_distance(distance, huber_c, lpips_weights)

    def schedule(self, step: int) -> tuple[int, float]:
        return ct_adaptive_schedule(step, self.K, self.s0, self.s1, self.mu0)

    def target_mu(self, step: int) -> float | None:
        return self.schedule(step)[1]

    def stats(self, step: int) -> dict[str, float]:
        N, mu = self.schedule(step)
        return {"N": N, "mu": mu}

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
        N, _ = self.schedule(step)
        sigmas = karras_sigmas(N, *self.grid).to(x0.device)
        i = noise.randint(N - 1, x0.shape[0], x0.device)
        t, t2 = sigmas[i], sigmas[i + 1]
        z = noise.randn_like(x0)
        x_t, x_t2 = x0 + append_dims(t, x0.ndim) * z, x0 + append_dims(t2, x0.ndim) * z
        pred, tgt = paired_passes(model, target or model, (x_t, t), (x_t2, t2), **cond)
        return weighting(self.weighting, t, self.sigma_data) * self.distance(pred, tgt)
