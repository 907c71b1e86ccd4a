"""MeanFlow (Geng et al. 2025, "Mean Flows for One-step Generative Modeling", arXiv 2505.13447, Algorithm 1)
and the improved-MeanFlow tangent (iMF, arXiv 2512.02012) as an option.

On the rectified path z_t = (1−t)·x0 + t·ε (ε ~ N(0, I)), the conditional velocity is v = ε − x0 and the
average velocity from t back to r, u(z_t, t, r) = 1/(t−r)·∫_r^t v dτ, satisfies the MeanFlow identity

    u(z_t, t, r) = v(z_t, t) − (t − r)·d/dt u(z_t, t, r),   d/dt = v·∂_z + ∂_t   (the JVP with tangents (v, 1, 0))

Training regresses u_θ(z_t, t, r) on u_tgt = sg(v − (t − r)·du_θ/dt) with the adaptive loss normalisation
L = ‖Δ‖² / sg(‖Δ‖² + c)^p (p = 1, c = 0.01). (t, r) are logit-normal, sorted so r ≤ t, and a fraction
``ratio_r_eq_t`` of the batch has r = t (then the target is plain flow matching, u = v).

iMF (``imf=true``) takes the JVP along the model's own marginal velocity v_θ⁻ = u_θ⁻(z_t, t, t) instead of the
single-sample v (a lower-variance tangent); the regression target stays the conditional v (iMF's "v-loss").

The trainable pass runs through the DDP wrapper; the JVP runs graph-free on the bare module (``cmkit.jvp``),
so DDP synchronises every gradient (py-meanflow's ``torch.func`` caveat does not apply). The model is
``Precond(kind="meanflow")`` on a two-time backbone (``model.time_inputs=2``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .. import noise
from ..jvp import JVP_MODES, directional_derivative
from ..schedules import SIGMA_DATA, SIGMA_MAX, SIGMA_MIN
from ..tensors import append_dims, get_rng_state, set_rng_state
from .options import FD_STEP, JVP, P_MEAN, P_STD, Option, at_least, option, positive, within
from .scm import unwrap


def meanflow_target(v: Tensor, t: Tensor, r: Tensor, dudt: Tensor) -> Tensor:
    """u_tgt = v − (t − r)·du/dt (MeanFlow Eq. 6 with the JVP's total derivative)."""
    return v - append_dims((t - r).clamp(min=0), v.ndim) * dudt


class MeanFlowLoss:
    """MeanFlow's objective (module docstring).

    Args:
        P_mean, P_std: the logit-normal proposal of t and r (MeanFlow's ImageNet setting: −0.4, 1.0).
        ratio_r_eq_t: fraction of the batch with r = t (MeanFlow's best: 0.75, i.e. 25% r ≠ t).
        ratio_r_eq_0: fraction of the batch with r = 0: the one-step jump itself, where the loss is sCM's
            continuous-time consistency loss (0 in MeanFlow; AYF trains both ends of its map).
        norm_p, norm_c: the adaptive loss normalisation ‖Δ‖² / sg(‖Δ‖² + c)^p.
        imf: take the JVP along the model's marginal velocity (improved MeanFlow).
        jvp: ``"jvp"`` (forward-mode AD) or ``"fd"`` (central difference with step ``fd_step``).
    """

    needs_teacher = False

    OPTIONS: ClassVar[dict[str, Option]] = {
        "P_mean": P_MEAN,
        "P_std": P_STD,
        "ratio_r_eq_t": option("fraction of the batch with r = t (plain flow matching)", within(0, 1)),
        "ratio_r_eq_0": option("fraction of the batch with r = 0 (the one-step jump)", within(0, 1)),
        "norm_p": option("power p of the adaptive loss normalisation", at_least(0)),
        "norm_c": option("constant c of the adaptive loss normalisation", positive()),
        "imf": option("improved MeanFlow: the tangent from the model's own velocity"),
        "jvp": JVP,
        "fd_step": FD_STEP,
    }

    def __init__(
        self,
        P_mean: float = -0.4,
        P_std: float = 1.0,
        ratio_r_eq_t: float = 0.75,
        ratio_r_eq_0: float = 0.0,
        norm_p: float = 1.0,
        norm_c: float = 0.01,
        imf: bool = False,
        jvp: str = "jvp",
        fd_step: float = 1e-4,
        sigma_min: float = SIGMA_MIN,
        sigma_max: float = SIGMA_MAX,
        sigma_data: float = SIGMA_DATA,
    ):
        if jvp not in JVP_MODES:
            raise ValueError(f"unknown jvp mode {jvp!r}; expected 'jvp' or 'fd'")
        if ratio_r_eq_t + ratio_r_eq_0 > 1:
            raise ValueError(f"ratio_r_eq_t + ratio_r_eq_0 must be at most 1, got {ratio_r_eq_t} + {ratio_r_eq_0}")
        self.P_mean, self.P_std, self.ratio_r_eq_t, self.ratio_r_eq_0 = P_mean, P_std, ratio_r_eq_t, ratio_r_eq_0
        self.norm_p, self.norm_c, self.imf, self.jvp, self.fd_step = norm_p, norm_c, imf, jvp, fd_step
        # the model's σ range as times t = σ/(1+σ) of the rectified path
        self.t_min, self.t_max = sigma_min / (1 + sigma_min), sigma_max / (1 + sigma_max)
        self._last: dict[str, float] = {}

    def target_mu(self, step: int) -> float | None:
        return None

    def stats(self, step: int) -> dict[str, float]:
        return dict(self._last)

    def warmup(self, step: int) -> float:
        """The weight of the target's JVP term (1 for MeanFlow; AYF ramps it in like sCM's tangent warm-up)."""
        return 1.0

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
        """(v, the JVP's direction): the conditional velocity ε − x0 for both (MeanFlow)."""
        v = e - x0
        return v, v

    def sample_times(self, batch: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """(t, r): two logit-normal draws sorted so r ≤ t; r = t for a fraction ``ratio_r_eq_t`` and r = 0 for a
        fraction ``ratio_r_eq_0`` (one uniform draw decides both, so ``ratio_r_eq_0 = 0`` changes nothing)."""
        a, b = (torch.sigmoid(noise.randn(batch, device) * self.P_std + self.P_mean) for _ in range(2))
        t, r = torch.maximum(a, b), torch.minimum(a, b)
        u = noise.rand(batch, device)
        r = torch.where(u < self.ratio_r_eq_t, t, r)
        r = torch.where((u >= self.ratio_r_eq_t) & (u < self.ratio_r_eq_t + self.ratio_r_eq_0), torch.zeros_like(r), r)
        t = t.clamp(self.t_min, self.t_max)
        return t, r.clamp(min=0).minimum(t)

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
        bare = unwrap(target or model)
        labels = cond.get("class_labels")
        x0 = x0.float()
        t, r = self.sample_times(x0.shape[0], x0.device)
        e = noise.randn_like(x0)
        tt = append_dims(t, x0.ndim)
        z = (1 - tt) * x0 + tt * e
        v, direction = self.velocities(bare, teacher, x0, e, z, t, labels)
        state = get_rng_state(x0.device)  # the trainable pass and the JVP pass see the same dropout masks
        u = model(z, t, labels, param="u", r=r)  # through the DDP wrapper: synchronised gradients
        set_rng_state(x0.device, state)
        if self.imf:
            with torch.no_grad():
                direction = bare.average_velocity(z, t, t, labels)
            set_rng_state(x0.device, state)
        _, dudt = directional_derivative(
            lambda zz, t_, r_: bare.average_velocity(zz, t_, r_, labels),
            (z, t, r),
            (direction, torch.ones_like(t), torch.zeros_like(r)),
            self.jvp,
            self.fd_step,
        )
        u_tgt = meanflow_target(v, t, r, self.warmup(step) * dudt)
        sq = (u.float() - u_tgt).pow(2).flatten(1).sum(1)
        self._last = {"mse": float(sq.detach().mean()) / x0[0].numel()}
        return sq / (sq.detach() + self.norm_c).pow(self.norm_p)
