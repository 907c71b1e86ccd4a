"""Align Your Flow (Sabour, Fidler & Kreis, NeurIPS 2025, arXiv 2506.14603): distil a diffusion teacher into a
two-time flow map with the Eulerian map distillation objective (AYF-EMD), from an autoguided teacher.

A flow map f(x_t, t, s) carries a point of the teacher's probability-flow ODE at time t to its point at time s.
Along the ODE it is constant in t (the Eulerian condition of AYF's Theorem 1, d/dt f(x_t, t, s) = 0 with
d/dt = v·∂_x + ∂_t). With the Euler form f = z_t − (t − s)·u(z_t, t, s) on the rectified path
z_t = (1−t)·x0 + t·ε, that condition is MeanFlow's identity with the teacher's velocity in place of the
single-sample one:

    u(z_t, t, s) = v_φ(z_t, t) − (t − s)·d/dt u(z_t, t, s),   v_φ(z_t, t) = (z_t − D_φ(z_t/(1−t), t/(1−t)))/t

so AYF-EMD regresses u_θ on sg(v_φ − (t − s)·du_θ⁻/dt), the JVP taken along (v_φ, 1, 0). Its gradient is the
continuous-time limit of a consistency loss between f(x_t, t, s) and f(x_{t−dt}, t − dt, s) (s = 0: continuous CM;
s → t: flow matching on the teacher). As in sCM, the JVP term is ramped in over ``tangent_warmup`` steps, and the
loss uses MeanFlow's adaptive normalisation. The teacher D_φ may be autoguided by a weaker model
(``train.autoguide``, ``cmkit.guidance.AutoGuided``), AYF's way to distil a sharper flow than the teacher's.

The student is ``Precond(kind="flowmap")`` (CTM's parameterisation: a DDIM step with a learned x0 estimate
g_θ(x, σ, s)), initialised from the teacher with a zero-initialised target-time input, so at step 0 u_θ(z, t, s)
is the teacher's velocity for every s and the flow-matching half of the loss is already zero.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..tensors import append_dims
from .meanflow import MeanFlowLoss
from .options import Option, at_least, option
from .scm import tangent_ramp


def teacher_velocity(teacher: nn.Module, z: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:
    """v_φ(z_t, t) = (z_t − D_φ(x_σ, σ))/t of an EDM denoiser on the rectified path: σ = t/(1−t), x_σ = z_t/(1−t)."""
    tt = append_dims(t, z.ndim)
    cond = {} if labels is None else {"class_labels": labels}
    with torch.no_grad(), torch.autocast(z.device.type, enabled=False):
        D = teacher(z / (1 - tt), t / (1 - t), **cond).float()
    return (z - D) / tt


class AYFLoss(MeanFlowLoss):
    """AYF-EMD flow-map distillation (module docstring); MeanFlow's options plus ``tangent_warmup``.

    Args:
        tangent_warmup: steps H over which the JVP term of the target ramps in, min(1, step/H) (sCM §4.2's
            tangent warm-up, which AYF adopts).
        The rest as ``MeanFlowLoss``. The defaults were chosen on the exact-teacher Gaussian mixture of
        tests/test_ayf.py (RMS error of the jumps to 0 after 1,000 steps, σ = 0.2 / 1 / 5 / 80): (t, s) logit-normal
        with P_mean = −0.4, P_std = 1.6 (a log-normal σ = t/(1−t) like sCM's; MeanFlow's std 1.0 gave
        0.27 / 0.55 / 0.57 / 0.57, this 0.09 / 0.29 / 0.31 / 0.31) and the adaptive normalisation's power
        p = 0.5 (MeanFlow's p = 1 was those figures; p = 0.5 gave 0.07 / 0.18 / 0.19 / 0.21).
    """

    needs_teacher = True

    OPTIONS: ClassVar[dict[str, Option]] = {
        **MeanFlowLoss.OPTIONS,
        "tangent_warmup": option("steps H of the tangent warm-up min(1, step/H) of the JVP term", at_least(0)),
    }

    def __init__(
        self,
        *args: Any,
        P_mean: float = -0.4,
        P_std: float = 1.6,
        ratio_r_eq_t: float = 0.25,
        ratio_r_eq_0: float = 0.0,
        norm_p: float = 0.5,
        tangent_warmup: int = 0,
        **kwargs: Any,
    ):
        super().__init__(
            *args,
            P_mean=P_mean,
            P_std=P_std,
            ratio_r_eq_t=ratio_r_eq_t,
            ratio_r_eq_0=ratio_r_eq_0,
            norm_p=norm_p,
            **kwargs,
        )
        self.tangent_warmup = tangent_warmup

    def warmup(self, step: int) -> float:
        return tangent_ramp(step, self.tangent_warmup)

    def stats(self, step: int) -> dict[str, float]:
        return {"tangent_warmup": self.warmup(step), **self._last}

    def velocities(
        self,
        model: nn.Module,
        teacher: nn.Module | None,
        x0: Tensor,
        e: Tensor,
        z: Tensor,
        t: Tensor,
        labels: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """(v_φ, v_φ): the teacher's velocity is both the regression target's first term and the JVP direction."""
        if teacher is None:
            raise ValueError("AYF distils a teacher: set train.teacher")
        v = teacher_velocity(teacher, z, t, labels)
        return v, v
