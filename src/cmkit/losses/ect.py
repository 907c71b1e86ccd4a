"""Easy Consistency Tuning (Geng et al. 2024, "Consistency Models Made Easy"; ``ECMLoss``).

Continuous t ~ lognormal and r = r(t, stage) with Δt = t - r shrinking at every stage, starting from a
trained diffusion model. The target is f_{sg(θ)}(x_r, r) with the same noise and dropout mask, or the
clean data when r = 0 (the boundary condition enforced through the loss).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .. import noise
from ..distances import default_huber_c, pseudo_huber
from ..schedules import SIGMA_DATA, SIGMA_MAX, SIGMA_MIN, ect_r_of_t
from ..tensors import append_dims
from .base import WEIGHTINGS, paired_passes, weighting
from .options import HUBER_C, P_MEAN, P_STD, TOTAL_STEPS, Option, at_least, option, positive, within


class ECTLoss:
    """L = w(t, r)·(sqrt(||f_θ(x_t, t) - f_sg(x_r, r)||² + c²) - c), w = 1/(t - r) or a shared λ(t)."""

    needs_teacher = False
    WEIGHTINGS = ("inv_dt", *WEIGHTINGS, "snrpk")

    OPTIONS: ClassVar[dict[str, Option]] = {
        "total_steps": TOTAL_STEPS,
        "double_steps": option("steps per stage (the gap Δt shrinks by q each stage)", at_least(1)),
        "start_stage": option("stage to start from (a later stage of ECT, or after mid-training)", within(0, 64)),
        "P_mean": P_MEAN,
        "P_std": P_STD,
        "q": option("gap shrink factor per stage", (lambda v: v > 1, "above 1")),
        "k": option("k of the t → r map", at_least(0)),
        "b": option("b of the t → r map", positive()),
        "huber_c": HUBER_C,
        "weighting": option("λ(t, r): inv_dt (ECT's), the CM weightings, or snrpk (= karras)", choices=WEIGHTINGS),
    }

    def __init__(
        self,
        total_steps: int = 200_000,
        double_steps: int = 25_000,
        P_mean: float = -1.1,
        P_std: float = 2.0,
        q: float = 2.0,
        k: float = 8.0,
        b: float = 1.0,
        huber_c: float | None = None,
        weighting: str = "inv_dt",
        start_stage: int = 0,
        sigma_min: float = SIGMA_MIN,
        sigma_max: float = SIGMA_MAX,
        sigma_data: float = SIGMA_DATA,
    ):
        if weighting not in self.WEIGHTINGS:
            raise ValueError(f"unknown ECT weighting {weighting!r}; expected one of {', '.join(self.WEIGHTINGS)}")
        self.double_steps, self.P_mean, self.P_std = double_steps, P_mean, P_std
        self.q, self.k, self.b, self.huber_c, self.weighting = q, k, b, huber_c, weighting
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data
        self.start_stage = start_stage

    def stage(self, step: int) -> int:
        """``start_stage`` + the stages done: Δt/t at t = 1 is (1 + k·sigmoid(−b))/q^(stage+1) (ECT Eq. 12)."""
        return self.start_stage + step // self.double_steps

    def target_mu(self, step: int) -> float | None:
        return None

    def stats(self, step: int) -> dict[str, float]:
        t1 = ect_r_of_t(torch.tensor([1.0]), self.stage(step), self.q, self.k, self.b)
        return {"stage": self.stage(step), "r/t@1": float(t1)}

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
        B = x0.shape[0]
        t = (noise.randn(B, x0.device) * self.P_std + self.P_mean).exp().clamp(self.sigma_min, self.sigma_max)
        r = ect_r_of_t(t, self.stage(step), self.q, self.k, self.b)
        r = torch.where(r < self.sigma_min, torch.zeros_like(r), r)  # below σ_min the target is the data
        e = noise.randn_like(x0)
        x_t, x_r = x0 + append_dims(t, x0.ndim) * e, x0 + append_dims(r, x0.ndim) * e
        pred, tgt = paired_passes(model, target or model, (x_t, t), (x_r, r.clamp(min=self.sigma_min)), **cond)
        tgt = torch.where(append_dims(r, x0.ndim) > 0, torch.nan_to_num(tgt), x0)
        c = default_huber_c(x0.shape[1:]) if self.huber_c is None else self.huber_c
        return self.weight(pseudo_huber(pred, tgt, c), t, r)

    def weight(self, dist: Tensor, t: Tensor, r: Tensor) -> Tensor:
        """w(t, r)·dist: 1/(t − r) (``inv_dt``) or a shared λ(t); ECT's "snrpk" = 1/σ_d² + 1/t² is "karras"."""
        if self.weighting == "inv_dt":
            return dist / (t - r)
        return dist * weighting("karras" if self.weighting == "snrpk" else self.weighting, t, self.sigma_data)
