"""Consistency mid-training (CMT; "Consistency Mid-Training", ICLR 2026, arXiv 2509.24526;
sony/cmt ``DPMSolverLoss``).

A cheap stage between the diffusion teacher and consistency training: the teacher solves its PF-ODE from
x_T = x0 + σ_max·ε down to σ_min in ``nfe`` DPM-Solver++(2M) steps on a log-SNR-uniform grid, and the student
learns to map every state of that trajectory, at its own σ, straight to the trajectory's end:

    L = d(f_θ(x_{σ_j}, σ_j), x̂(σ_min)),  j = 0 … nfe−1,

a fixed-grid trajectory map with no target network and no curriculum. The mid-trained student then starts
consistency training (ECT with a small Δt in the paper, ``fmnist-cmt-ect`` here) much closer to a consistency
function than the diffusion model does. The paper measures d with LPIPS; the default here is pseudo-Huber
(cmkit's LPIPS needs user-given weights).

A batch of B rows holds ⌈B/nfe⌉ trajectories of nfe consecutive rows each: row p is the state j = p mod nfe of
trajectory ⌊p/nfe⌋, whose noise, data and labels are those of its first row. So the teacher costs about one
evaluation per row, as in the paper, and a split of the batch into microbatches whose sizes are multiples of
nfe gives the same loss (``train.accum`` with ``train.noise=per_sample``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .. import noise
from ..distances import get_distance
from ..schedules import SIGMA_DATA, SIGMA_MAX, SIGMA_MIN
from ..solvers import dpm_solver_2m, log_sigmas
from .options import DISTANCE, HUBER_C, LPIPS_WEIGHTS, Option, at_least, option


class CMTLoss:
    """L = d(f_θ(x_{σ_j}, σ_j), x̂(σ_min)) over the nfe states of teacher DPM-Solver++(2M) trajectories."""

    needs_teacher = True

    OPTIONS: ClassVar[dict[str, Option]] = {
        "nfe": option("teacher DPM-Solver++(2M) steps per trajectory (rows per trajectory)", at_least(1)),
        "distance": DISTANCE,
        "huber_c": HUBER_C,
        "lpips_weights": LPIPS_WEIGHTS,
    }

    def __init__(
        self,
        nfe: int = 16,
        distance: str = "pseudo_huber",
        huber_c: float | None = None,
        lpips_weights: str | None = None,
        sigma_min: float = SIGMA_MIN,
        sigma_max: float = SIGMA_MAX,
        sigma_data: float = SIGMA_DATA,
    ):
        self.nfe = nfe
        self.sigmas = log_sigmas(nfe, sigma_max, sigma_min)
        self.distance = get_distance(distance, huber_c, lpips_weights)

    def target_mu(self, step: int) -> float | None:
        return None

    def stats(self, step: int) -> dict[str, float]:
        return {"nfe": self.nfe}

    def trajectories(
        self, teacher: nn.Module, x0: Tensor, **cond: Any
    ) -> tuple[Tensor, Tensor, Tensor, dict[str, Any]]:
        """(states x_{σ_j} of row p, σ_j of row p, each row's trajectory end, each row's conditioning)."""
        B, nfe = x0.shape[0], self.nfe
        rows = torch.arange(B, device=x0.device)
        level, lead = rows % nfe, rows - rows % nfe  # row p: state p mod nfe of the trajectory led by its row
        leaders = lead[::nfe]
        eps = noise.randn_like(x0)  # one draw per row keeps the per-sample keys; the leaders' rows are used
        sigmas = self.sigmas.to(x0.device)
        cond_lead = {k: v[leaders] if torch.is_tensor(v) and v.shape[:1] == (B,) else v for k, v in cond.items()}
        with torch.no_grad():
            states = dpm_solver_2m(teacher, x0[leaders] + sigmas[0] * eps[leaders], sigmas, **cond_lead)
        group = rows // nfe
        x_in = torch.stack(states[:-1])[level, group]
        row_cond = {k: v[lead] if torch.is_tensor(v) and v.shape[:1] == (B,) else v for k, v in cond.items()}
        return x_in, sigmas[level], states[-1][group], row_cond

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
            raise ValueError("consistency mid-training needs a teacher (set teacher=PATH to a diffusion model)")
        x_in, sigma, end, row_cond = self.trajectories(teacher, x0, **cond)
        return self.distance(model(x_in, sigma, **row_cond), end.detach())
