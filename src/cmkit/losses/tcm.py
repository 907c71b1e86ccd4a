"""Truncated consistency models (TCM; Lee et al. 2025, ICLR, arXiv 2410.14895): a second stage
after ECT that trains the consistency function only on the truncated range t ≥ t′.

Below t′ the consistency function is the frozen first-stage model f_θ₁ (``train.teacher``, e.g. fmnist-ect), so
the truncated function is f(x, t) = f_θ(x, t) for t ≥ t′ and f_θ₁(x, t) below. Stage 2 then

- samples t ≥ t′ (a Student-t in log σ, TCM's ``--tdist=t``, or ECT's log-normal), truncated to [t′, σ_max];
- pairs it with ECT's r(t) (Δt shrinking per stage); when r < t′ the target is f_θ₁(x_r, r), otherwise
  stopgrad f_θ(x_r, r) with the same noise and dropout mask;
- replaces a fraction ``boundary_prob`` of the batch by the boundary loss at t = t′ against the frozen model,
  f_θ(x_t′, t′) ≈ f_θ₁(x_t′, t′), weighted by ``w_boundary`` (TCM's README: 0.25 and 0.1; t′ = 1).

It needs no JVP. Sampling is the usual σ-list sampling of the stage-2 model (one step from σ_max).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .. import noise
from ..distances import default_huber_c, pseudo_huber
from ..schedules import SIGMA_DATA, SIGMA_MAX, SIGMA_MIN, ect_r_of_t
from ..tensors import append_dims
from .base import paired_passes
from .ect import ECTLoss
from .options import Option, at_least, option, positive, within


def truncated_log_sigma(
    batch: int,
    lo: float,
    hi: float,
    P_mean: float,
    P_std: float,
    df: float | None,
    device: torch.device,
    candidates: int = 1024,
) -> Tensor:
    """σ in [lo, hi] with ln σ ~ P_mean + P_std·T (Student-t with ``df``; ``None``: normal), truncated by
    rejection; a row with no accepted candidate (extremely unlikely) falls back to log-uniform in [lo, hi].

    Student-t draws use Bailey's polar method (Bailey 1994, "Polar generation of random variates with the
    t-distribution"): for (u, v) uniform in the unit disc, w = u² + v², T = u·sqrt(ν(w^(−2/ν) − 1)/w), which needs
    only uniform draws, so it runs on per-sample generators too (``cmkit.noise``)."""
    if df is None:
        x = noise.randn_like(torch.empty(batch, candidates, device=device))
    else:
        uv = noise.rand_like(torch.empty(batch, 2 * candidates, device=device)).double() * 2 - 1  # w^(-2/ν): fp64
        u, w = uv[:, ::2], uv[:, ::2] ** 2 + uv[:, 1::2] ** 2
        inside = (w < 1) & (w > 0)
        w = torch.where(inside, w, torch.full_like(w, 0.5))
        t = u * torch.sqrt(df * torch.expm1(-2 / df * torch.log(w)) / w)
        x = torch.where(inside, t, torch.full_like(w, math.nan)).float()
    log_s = P_mean + P_std * x
    log_lo, log_hi = math.log(lo), math.log(hi)
    ok = (log_s >= log_lo) & (log_s <= log_hi)  # false for NaN (a pair outside the disc)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((batch,), -1, device=device))
    fallback = log_lo + noise.rand(batch, device) * (log_hi - log_lo)
    picked = log_s.gather(1, first.clamp(min=0)[:, None]).squeeze(1)
    return torch.where(first >= 0, picked, fallback).exp()


class TCMLoss(ECTLoss):
    """TCM stage 2 (module docstring): ECT's loss on t ≥ t′ plus the boundary loss against the frozen stage 1.

    Args:
        transition_sigma: t′ in σ units (TCM's ``tcm_transition_t = 1``).
        boundary_prob: fraction of the batch trained on the boundary loss (0.25).
        w_boundary: weight of the boundary loss relative to the consistency loss (0.1).
        time_dist: ``"student_t"`` (TCM) or ``"lognormal"`` (ECT) for ln σ, truncated to [t′, σ_max].
        df: degrees of freedom of the Student-t (TCM's CIFAR-10 setting: 0.01, a nearly log-uniform tail).
        start_stage: ECT's stage to continue from (the first stage's final one), so Δt does not grow again.
    The remaining options are ECT's (``cmkit.losses.ect``).
    """

    needs_teacher = True
    teacher_precond = "cm"
    TIME_DISTS = ("student_t", "lognormal")

    OPTIONS: ClassVar[dict[str, Option]] = {
        "transition_sigma": option(
            "t′: the truncation point in σ (the first stage's model holds below it)", positive()
        ),
        "boundary_prob": option("fraction of the batch on the boundary loss at t′", within(0, 1, high_open=True)),
        "w_boundary": option("weight of the boundary loss", at_least(0)),
        "time_dist": option(
            "σ distribution above t′: Student-t or lognormal ln σ, truncated to [t′, σ_max]", choices=TIME_DISTS
        ),
        "df": option("Student-t degrees of freedom", positive()),
        **ECTLoss.OPTIONS,
    }

    def __init__(
        self,
        transition_sigma: float = 1.0,
        boundary_prob: float = 0.25,
        w_boundary: float = 0.1,
        time_dist: str = "student_t",
        df: float = 0.01,
        start_stage: int = 0,
        total_steps: int = 200_000,
        double_steps: int = 25_000,
        P_mean: float = -1.1,
        P_std: float = 2.0,
        q: float = 2.0,
        k: float = 8.0,
        b: float = 1.0,
        huber_c: float | None = None,
        weighting: str = "inv_dt",
        sigma_min: float = SIGMA_MIN,
        sigma_max: float = SIGMA_MAX,
        sigma_data: float = SIGMA_DATA,
    ):
        super().__init__(
            total_steps,
            double_steps,
            P_mean,
            P_std,
            q,
            k,
            b,
            huber_c,
            weighting,
            start_stage,
            sigma_min,
            sigma_max,
            sigma_data,
        )
        if time_dist not in self.TIME_DISTS:
            raise ValueError(f"unknown TCM time_dist {time_dist!r}; expected student_t or lognormal")
        if not sigma_min < transition_sigma < sigma_max:
            raise ValueError(f"TCM transition_sigma must lie in ({sigma_min}, {sigma_max}), got {transition_sigma}")
        self.t_prime, self.boundary_prob, self.w_boundary = transition_sigma, boundary_prob, w_boundary
        self.time_dist, self.df = time_dist, df
        self._last: dict[str, float] = {}

    def stats(self, step: int) -> dict[str, float]:
        return {**super().stats(step), "t_prime": self.t_prime, **self._last}

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
            raise ValueError("TCM needs the frozen first-stage model (train.teacher)")
        B, nd = x0.shape[0], x0.ndim
        t = truncated_log_sigma(
            B,
            self.t_prime,
            self.sigma_max,
            self.P_mean,
            self.P_std,
            self.df if self.time_dist == "student_t" else None,
            x0.device,
        )
        boundary = noise.rand(B, x0.device) < self.boundary_prob
        t = torch.where(boundary, torch.full_like(t, self.t_prime), t)
        r = ect_r_of_t(t, self.stage(step), self.q, self.k, self.b).clamp(min=self.sigma_min)
        e = noise.randn_like(x0)
        x_t, x_r = x0 + append_dims(t, nd) * e, x0 + append_dims(r, nd) * e
        pred, tgt = paired_passes(model, target or model, (x_t, t), (x_r, r), **cond)
        below = append_dims((r < self.t_prime) & ~boundary, nd)
        with torch.no_grad():  # the frozen stage 1: at r below t′, and at t′ itself for the boundary rows
            frozen = teacher(torch.where(append_dims(boundary, nd), x_t, x_r), torch.where(boundary, t, r), **cond)
        tgt = torch.where(below | append_dims(boundary, nd), frozen, tgt)
        c = default_huber_c(x0.shape[1:]) if self.huber_c is None else self.huber_c
        dist = pseudo_huber(pred, tgt.detach(), c)
        if bool(boundary.any()):  # the distance to the frozen stage 1 at t′ (a fixed target: it must go down)
            self._last = {"boundary": float(dist.detach()[boundary].mean())}
        w = self.weight(dist, t, r)
        return torch.where(boundary, self.w_boundary * w, w)
