"""sCM: continuous-time consistency training and distillation with TrigFlow (Lu & Song 2025, ICLR; "Simplifying,
Stabilizing and Scaling Continuous-Time Consistency Models"; Algorithm 1).

    x0 ~ D, z ~ N(0, σ_d² I), t = arctan(e^τ/σ_d) with τ ~ N(P_mean, P_std²), x_t = cos t·x0 + sin t·z
    dx_t/dt = cos t·z − sin t·x0                 (sCT)   |   the teacher's PF-ODE velocity   (sCD)
    J = cos t·sin t·σ_d·dF_θ⁻/dt = jvp(F_θ⁻, (x_t/σ_d, t), (cos t·sin t·dx_t/dt, cos t·sin t·σ_d))
    g = −cos² t·(σ_d·F_θ⁻ − dx_t/dt) − r·(cos t·sin t·x_t + J),   r = min(1, step/H)   (tangent warm-up)
    g ← g / (‖g‖_rms + c)                          (tangent normalisation)
    L = e^{w_φ(t)}·mean((F_θ − F_θ⁻ − g)²) − w_φ(t)     (θ⁻ = stopgrad θ: no EMA target)

The gradient of mean((F_θ − F_θ⁻ − g)²) at θ⁻ = θ is −(2/D)·gᵀ∂F_θ/∂θ: the continuous-time consistency
gradient, with a regression form that autograd handles and DDP synchronises (the trainable pass runs through
the DDP wrapper; the JVP runs on the bare module without a graph, ``cmkit.jvp``). The trainable pass and the
JVP pass share their dropout masks. ‖g‖_rms = ‖g‖/√D (FastGen normalises the same way), so c = 0.1 does not
depend on the image size. The model is ``Precond(kind="trigflow")``: F_θ is the negated backbone output.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .. import noise
from ..guidance import guided
from ..jvp import JVP_MODES, directional_derivative
from ..schedules import SIGMA_DATA, SIGMA_MAX, SIGMA_MIN
from ..tensors import append_dims, get_rng_state, set_rng_state
from ..trigflow import lognormal_t, sigma_from_t, velocity_from_denoiser
from .dmd import ScoreRegulariser
from .options import FD_STEP, JVP, P_MEAN, P_STD, Option, at_least, option, positive, within


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module under a DDP wrapper (for the graph-free JVP pass)."""
    return getattr(model, "module", model)


def rms(x: Tensor) -> Tensor:
    """Per-sample root-mean-square over all but the batch dimension, shaped to broadcast against x."""
    return append_dims(x.float().pow(2).flatten(1).mean(1).sqrt(), x.ndim)


def tangent_ramp(step: int, warmup_steps: int) -> float:
    """sCM's tangent warm-up (§4.2): the weight min(1, step/H) of the tangent's JVP term; 1 when H = 0."""
    return min(1.0, step / warmup_steps) if warmup_steps > 0 else 1.0


class SCTLoss:
    """sCT: continuous-time consistency training from data (dx_t/dt = cos t·z − sin t·x0); see the module docstring.

    Args:
        P_mean, P_std: the log-normal proposal of σ = σ_d tan t (sCM Table 3: −1.0, 1.6).
        tangent_warmup: H, the steps over which r = min(1, step/H) ramps the second tangent term in (10k).
        tangent_c: c of the tangent normalisation g/(‖g‖_rms + c) (0.1); ``tangent_clip`` > 0 clips g to
            [−clip, clip] instead (sCM Fig. 5a compares both).
        jvp: ``"jvp"`` (forward-mode AD) or ``"fd"`` (central difference with step ``fd_step``).
        adaptive_weight: learn w_φ(t) (the model's ``logvar``); False uses w ≡ 0.
    """

    needs_teacher = False

    OPTIONS: ClassVar[dict[str, Option]] = {
        "P_mean": P_MEAN,
        "P_std": P_STD,
        "tangent_warmup": option("steps H of the tangent warm-up r = min(1, step/H)", at_least(0)),
        "tangent_c": option("c of the tangent normalisation g/(‖g‖_rms + c)", positive()),
        "tangent_clip": option("> 0: clip g to [-clip, clip] instead of normalising", at_least(0)),
        "jvp": JVP,
        "fd_step": FD_STEP,
        "adaptive_weight": option("learn the weighting w_φ(t) (sCM's adaptive weighting)"),
    }

    def __init__(
        self,
        P_mean: float = -1.0,
        P_std: float = 1.6,
        tangent_warmup: int = 10_000,
        tangent_c: float = 0.1,
        tangent_clip: float = 0.0,
        jvp: str = "jvp",
        fd_step: float = 1e-4,
        adaptive_weight: bool = True,
        sigma_min: float = SIGMA_MIN,
        sigma_max: float = SIGMA_MAX,
        sigma_data: float = SIGMA_DATA,
    ):
        if jvp not in JVP_MODES:
            raise ValueError(f"unknown jvp mode {jvp!r}; expected 'jvp' or 'fd'")
        self.P_mean, self.P_std, self.tangent_warmup = P_mean, P_std, tangent_warmup
        self.tangent_c, self.tangent_clip, self.jvp, self.fd_step = tangent_c, tangent_clip, jvp, fd_step
        self.adaptive_weight = adaptive_weight
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data
        self.t_range = tuple(math.atan(s / sigma_data) for s in (sigma_min, sigma_max))  # [σ_min, σ_max] as t
        self._last: dict[str, float] = {}

    def target_mu(self, step: int) -> float | None:
        return None

    def warmup(self, step: int) -> float:
        return tangent_ramp(step, self.tangent_warmup)

    def stats(self, step: int) -> dict[str, float]:
        return {"tangent_warmup": self.warmup(step), **self._last}

    def sample_t(self, x0: Tensor) -> Tensor:
        """t from the log-normal proposal, kept inside the model's σ range [σ_min, σ_max]."""
        return lognormal_t(x0.shape[0], self.P_mean, self.P_std, self.sigma_data, x0.device).clamp(*self.t_range)

    def velocity(
        self, x0: Tensor, z: Tensor, x_t: Tensor, t: Tensor, teacher: nn.Module | None, cond: dict[str, Any]
    ) -> Tensor:
        """dx_t/dt: the conditional velocity cos t·z − sin t·x0 (sCT)."""
        t = append_dims(t, x0.ndim)
        return torch.cos(t) * z - torch.sin(t) * x0

    def tangent(self, step: int, x_t: Tensor, t: Tensor, dxdt: Tensor, F_minus: Tensor, J: Tensor) -> Tensor:
        """g of §12.2 (before normalisation), all in fp32."""
        cos, sin = (append_dims(f(t), x_t.ndim) for f in (torch.cos, torch.sin))
        return -(cos**2) * (self.sigma_data * F_minus - dxdt) - self.warmup(step) * (cos * sin * x_t + J)

    def normalise(self, g: Tensor) -> Tensor:
        if self.tangent_clip > 0:
            return g.clamp(-self.tangent_clip, self.tangent_clip)
        return g / (rms(g) + self.tangent_c)

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
        sd = self.sigma_data
        x0 = x0.float()
        t = self.sample_t(x0)
        z = noise.randn_like(x0) * sd
        x_t = append_dims(torch.cos(t), x0.ndim) * x0 + append_dims(torch.sin(t), x0.ndim) * z
        with torch.no_grad():
            dxdt = self.velocity(x0, z, x_t, t, teacher, cond).float()
        labels = cond.get("class_labels")
        state = get_rng_state(x0.device)  # the trainable pass and the JVP pass see the same dropout masks
        F_theta, w = model(x_t, t, labels, param="F")  # through the DDP wrapper: synchronised gradients
        set_rng_state(x0.device, state)
        cs = append_dims(torch.cos(t) * torch.sin(t), x0.ndim)
        F_minus, J = directional_derivative(
            lambda xs, tt: bare.trig_F(xs * sd, tt, labels),
            (x_t / sd, t),
            (cs * dxdt, torch.cos(t) * torch.sin(t) * sd),
            self.jvp,
            self.fd_step,
        )
        g = self.tangent(step, x_t, t, dxdt, F_minus, J)
        self._last = {"g_rms": float(rms(g).mean())}
        g = self.normalise(g)
        mse = (F_theta.float() - F_minus - g).pow(2).flatten(1).mean(1)
        if not self.adaptive_weight:
            return mse + 0 * w  # w_φ stays in the graph (DDP expects every parameter to get a gradient)
        return torch.exp(w) * mse - w


class SCDLoss(SCTLoss):
    """sCD: continuous-time consistency distillation; dx_t/dt is the EDM teacher's PF-ODE velocity at (x_t, t),
    (cos t·x_t − D(x_t/cos t, σ_d tan t)) / sin t (``cmkit.trigflow.velocity_from_denoiser``). sCM Table 4
    trains sCD with no dropout; the rest is sCT's.

    ``guidance`` w ≠ 1 distils a class-conditional teacher with classifier-free guidance: D is the guided
    denoiser D_∅ + w·(D_c − D_∅) (``cmkit.guidance``; the teacher needs label-dropout training).

    ``score_reg`` > 0 is rCM (Zheng et al. 2026): sCD plus DMD's reverse-divergence term, with a fake-score critic
    that the training task makes from the teacher and passes as ``fake_score`` (``cmkit.losses.dmd``; from step
    ``tangent_warmup`` on, ``score_critic_steps`` critic steps follow each student step).
    """

    needs_teacher = True

    OPTIONS: ClassVar[dict[str, Option]] = {
        **SCTLoss.OPTIONS,
        "guidance": option("classifier-free guidance scale w of the teacher (1: none)", within(0, 20)),
        "score_reg": option("rCM: weight of the DMD score regulariser (0: plain sCD)", at_least(0)),
        "score_critic_steps": option("rCM: fake-score (critic) updates per student update", at_least(1)),
        "score_sim_steps": option("rCM: most generator steps K simulated for the regulariser", at_least(1)),
        "score_P_mean": option("rCM: mean of the regulariser's lognormal ln σ (None: ln σ_d)"),
        "score_P_std": option("rCM: std of the regulariser's lognormal ln σ", positive()),
        "critic_lr_scale": option("rCM: the critic's learning rate as a multiple of train.lr", positive()),
    }

    def __init__(
        self,
        *args: Any,
        guidance: float = 1.0,
        score_reg: float = 0.0,
        score_critic_steps: int = 4,
        score_sim_steps: int = 4,
        score_P_mean: float | None = None,
        score_P_std: float = 1.6,
        critic_lr_scale: float = 0.2,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.guidance, self.score_reg, self.critic_lr_scale = guidance, score_reg, critic_lr_scale
        self.regulariser = (
            ScoreRegulariser(
                score_reg,
                score_critic_steps,
                score_sim_steps,
                score_P_mean,
                score_P_std,
                start=self.tangent_warmup,
                sigma_min=self.sigma_min,
                sigma_max=self.sigma_max,
                sigma_data=self.sigma_data,
            )
            if score_reg > 0
            else None
        )

    def trains_model(self, step: int) -> bool:
        """False on rCM's critic steps: the student is frozen (no gradient, no EMA update)."""
        return self.regulariser is None or not self.regulariser.is_critic_step(step)

    def stats(self, step: int) -> dict[str, float]:
        """sCT's values; with the regulariser, also the latest student step's DMD term and critic loss (a log row
        falls on one step of either kind; its ``loss`` is that step's)."""
        if self.regulariser is None or not self.regulariser.active(step):
            return super().stats(step)
        phase = {"critic_step": float(self.regulariser.is_critic_step(step))}
        return {**super().stats(step), **self.regulariser.last, **phase}

    def denoise(self, teacher: nn.Module, x_sigma: Tensor, sigma: Tensor, cond: dict[str, Any]) -> Tensor:
        """The teacher's D(x_σ, σ), guided at ``guidance`` (fp32, outside autocast)."""
        labels = cond.get("class_labels")
        if self.guidance != 1.0 and labels is None:
            raise ValueError("loss.guidance needs a class-conditional model and data with labels")
        with torch.autocast(x_sigma.device.type, enabled=False):
            if self.guidance == 1.0:
                return teacher(x_sigma.float(), sigma.float(), **cond)
            return guided(teacher, x_sigma.float(), sigma.float(), labels, self.guidance)

    def velocity(
        self, x0: Tensor, z: Tensor, x_t: Tensor, t: Tensor, teacher: nn.Module | None, cond: dict[str, Any]
    ) -> Tensor:
        if teacher is None:
            raise ValueError("sCD needs a teacher (train.teacher)")
        x_sigma = x_t / append_dims(torch.cos(t), x_t.ndim)
        return velocity_from_denoiser(x_t, t, self.denoise(teacher, x_sigma, sigma_from_t(t, self.sigma_data), cond))

    def __call__(
        self,
        model: nn.Module,
        x0: Tensor,
        *,
        step: int,
        target: nn.Module | None = None,
        teacher: nn.Module | None = None,
        fake_score: nn.Module | None = None,
        **cond: Any,
    ) -> Tensor:
        reg = self.regulariser
        if reg is None or not reg.active(step):
            return super().__call__(model, x0, step=step, target=target, teacher=teacher, **cond)
        if fake_score is None or teacher is None:
            raise ValueError("loss.score_reg needs the teacher and its fake-score copy (the training task makes it)")
        real = lambda x, s, c: self.denoise(teacher, x, s, c)  # noqa: E731
        if reg.is_critic_step(step):
            return reg(model, fake_score, real, x0, step, cond)
        consistency = super().__call__(model, x0, step=step, target=target, teacher=teacher, **cond)
        return consistency + reg(model, fake_score, real, x0, step, cond)
