"""Consistency distillation (Song et al. 2023, Alg. 2; ``consistency_losses`` in the CM code)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .. import noise
from ..distances import get_distance
from ..schedules import RHO, SIGMA_DATA, SIGMA_MAX, SIGMA_MIN, karras_sigmas
from ..solvers import SOLVERS
from ..tensors import append_dims
from .base import WEIGHTINGS, paired_passes, weighting
from .options import DISTANCE, HUBER_C, LPIPS_WEIGHTS, Option, at_least, option, within


class CDLoss:
    """L = λ(t)·d(f_θ(x_t, t), f_θ⁻(x̂_{t2}, t2)), x̂_{t2} one teacher ODE step (Heun/Euler) from x_t.

    i ~ U{0..N-2} on the top-down Karras grid (or a discrete teacher's own timesteps, ``grid="teacher"``);
    t = σ(i), t2 = σ(i+1). μ = 0 means the target is stopgrad(θ) (CIFAR-10 CD); μ = 0.95 is the ImageNet-64 /
    LSUN setting.
    """

    needs_teacher = True
    WEIGHTINGS = WEIGHTINGS

    OPTIONS: ClassVar[dict[str, Option]] = {
        "num_scales": option("N of the Karras σ grid", at_least(2)),
        "mu": option("target EMA rate μ (0: stopgrad θ)", within(0, 1, high_open=True)),
        "solver": option("the teacher's ODE step between adjacent σ", choices=("heun", "euler")),
        "grid": option(
            "σ grid: karras (N Karras levels in [σ_min, σ_max]) or teacher (N of a discrete-time teacher's own "
            "timesteps, diffusers' trailing spacing, and its t = 0: LCM's skipping-step grid)",
            choices=("karras", "teacher"),
        ),
        "distance": DISTANCE,
        "weighting": option("λ(σ), at the larger σ", choices=WEIGHTINGS),
        "huber_c": HUBER_C,
        "lpips_weights": LPIPS_WEIGHTS,
    }

    def __init__(
        self,
        num_scales: int = 18,
        mu: float = 0.0,
        solver: str = "heun",
        grid: str = "karras",
        distance: str = "l2",
        weighting: str = "uniform",
        huber_c: float | None = None,
        lpips_weights: str | None = None,
        sigma_min: float = SIGMA_MIN,
        sigma_max: float = SIGMA_MAX,
        sigma_data: float = SIGMA_DATA,
        rho: float = RHO,
    ):
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; expected one of {sorted(SOLVERS)}")
        if grid not in ("karras", "teacher"):
            raise ValueError(f"unknown grid {grid!r}; expected karras or teacher")
        self.sigmas = karras_sigmas(num_scales, sigma_min, sigma_max, rho)
        self.grid, self.num_scales = grid, num_scales
        self.mu, self.solver, self.weighting, self.sigma_data = mu, SOLVERS[solver], weighting, sigma_data
        self.distance = get_distance(distance, huber_c, lpips_weights)

    def grid_sigmas(self, teacher: nn.Module, device: torch.device) -> Tensor:
        """The σ grid, decreasing: Karras levels, or (``grid="teacher"``) a discrete teacher's N timesteps
        t = T−1, …, T/N−1 (``DiscreteVPDenoiser.grid_sigmas``) and its t = 0, where the student's boundary is."""
        if self.grid == "karras":
            return self.sigmas.to(device)
        if not hasattr(teacher, "grid_sigmas"):
            raise ValueError("loss.grid=teacher needs a discrete-time teacher (a diffusers/DDPM model directory)")
        top = teacher.grid_sigmas(self.num_scales)[:-1]
        return torch.cat([top, top.new_tensor([teacher.sigma_min])]).to(device)

    def target_mu(self, step: int) -> float | None:
        return self.mu if self.mu > 0 else None

    def stats(self, step: int) -> dict[str, float]:
        return {"N": len(self.sigmas), "mu": self.mu}

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
            raise ValueError("consistency distillation needs a teacher (set teacher=PATH to an EDM model)")
        sigmas = self.grid_sigmas(teacher, x0.device)
        i = noise.randint(len(sigmas) - 1, x0.shape[0], x0.device)
        t, t2 = sigmas[i], sigmas[i + 1]
        x_t = x0 + append_dims(t, x0.ndim) * noise.randn_like(x0)
        with torch.no_grad():
            x_t2 = self.solver(teacher, x_t, t, t2, **cond)
        pred, tgt = paired_passes(model, target or model, (x_t, t), (x_t2, t2), **cond)
        return weighting(self.weighting, t, self.sigma_data) * self.distance(pred, tgt)
