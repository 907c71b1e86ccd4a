"""Improved consistency training (Song & Dhariwal 2023, "Improved Techniques for Training CMs").

Changes from CT: no EMA teacher (θ⁻ = stopgrad θ), pseudo-Huber metric (Eq. 8), λ(σ_i) = 1/(σ_{i+1} - σ_i),
discretised lognormal σ sampling (Eq. 10), exponential N(k) curriculum (Eq. 11), dropout mask shared
between the two passes.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor, nn

from .. import noise
from ..distances import get_distance
from ..schedules import RHO, SIGMA_MAX, SIGMA_MIN, ict_num_scales, karras_sigmas, lognormal_index_probs
from ..tensors import append_dims
from .base import paired_passes
from .options import (
    DISTANCE,
    HUBER_C,
    LPIPS_WEIGHTS,
    P_MEAN,
    P_STD,
    S0,
    S1,
    S1_AT_LEAST_S0,
    TOTAL_STEPS,
    Option,
)


class ICTLoss:
    """L = 1/(σ_{i+1} - σ_i) · d(f_θ(x0 + σ_{i+1}z, σ_{i+1}), f_{sg(θ)}(x0 + σ_i z, σ_i)), i ~ lognormal."""

    needs_teacher = False

    OPTIONS: ClassVar[dict[str, Option]] = {
        "total_steps": TOTAL_STEPS,
        "s0": S0,
        "s1": S1,
        "P_mean": P_MEAN,
        "P_std": P_STD,
        "distance": DISTANCE,
        "huber_c": HUBER_C,
        "lpips_weights": LPIPS_WEIGHTS,
    }
    RULES = (S1_AT_LEAST_S0,)

    def __init__(
        self,
        total_steps: int = 400_000,
        s0: int = 10,
        s1: int = 1280,
        P_mean: float = -1.1,
        P_std: float = 2.0,
        distance: str = "pseudo_huber",
        huber_c: float | None = None,
        lpips_weights: str | None = None,
        sigma_min: float = SIGMA_MIN,
        sigma_max: float = SIGMA_MAX,
        rho: float = RHO,
    ):
        self.K, self.s0, self.s1 = total_steps, s0, s1
        self.P_mean, self.P_std = P_mean, P_std
        self.grid = (sigma_min, sigma_max, rho)
        self.distance = get_distance(distance, huber_c, lpips_weights)
        self._cache: dict[int, tuple[Tensor, Tensor]] = {}

    def target_mu(self, step: int) -> float | None:
        return None

    def stats(self, step: int) -> dict[str, float]:
        return {"N": ict_num_scales(step, self.K, self.s0, self.s1)}

    def grid_and_probs(self, N: int) -> tuple[Tensor, Tensor]:
        """Ascending Karras grid σ_1 < … < σ_N and the lognormal probabilities of its N-1 intervals."""
        if N not in self._cache:
            asc = karras_sigmas(N, *self.grid).flip(0)
            self._cache[N] = (asc, lognormal_index_probs(asc, self.P_mean, self.P_std))
        return self._cache[N]

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
        asc, probs = self.grid_and_probs(ict_num_scales(step, self.K, self.s0, self.s1))
        i = noise.choice(probs, x0.shape[0]).to(x0.device)
        asc = asc.to(x0.device)
        s_lo, s_hi = asc[i], asc[i + 1]
        z = noise.randn_like(x0)
        x_hi, x_lo = x0 + append_dims(s_hi, x0.ndim) * z, x0 + append_dims(s_lo, x0.ndim) * z
        pred, tgt = paired_passes(model, target or model, (x_hi, s_hi), (x_lo, s_lo), **cond)
        return self.distance(pred, tgt) / (s_hi - s_lo)
