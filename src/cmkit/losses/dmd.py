"""rCM's score regulariser: DMD's reverse-divergence term beside sCD's forward-divergence loss (Zheng et al. 2026,
ICLR, "Large Scale Diffusion Distillation via Score-Regularized Continuous-Time Consistency", arXiv 2510.08431).

The term is Distribution Matching Distillation's (Yin et al. 2024, CVPR, "One-step Diffusion with Distribution
Matching Distillation", Eq. 7–8), trained as DMD2 does, with a critic updated more often than the student (Yin et
al. 2024, NeurIPS, "Improved Distribution Matching Distillation", §4.2). In cmkit's calling convention
``D(x_σ, σ) -> x0`` (the TrigFlow pair x_t = cos t·x_σ, σ = σ_d tan t is the same sample):

    generator   x̂0 = G_θ(z): n steps of the student's multistep sampler from σ_max·z, σ_{i+1} = min(σ ~ p_D, σ_i),
                n = 1 … K in turn over the student updates; only the last step keeps its graph (rCM's "backward
                simulation").
    student     σ ~ p_D, x_σ = x̂0 + σ·ε,
                Δ = (D_φ(x_σ, σ) − D_real(x_σ, σ)) / mean|x̂0 − D_real(x_σ, σ)|      (per sample, DMD Eq. 8)
                L_G = mean((x̂0 − sg(x̂0 − Δ))²),   ∂L_G/∂x̂0 = 2Δ/D
    critic      the fake score D_φ (initialised as the teacher) follows the student's distribution by EDM's
                denoising loss on sg(x̂0):  L_φ = λ(σ)·mean((D_φ(sg(x̂0) + σε, σ) − sg(x̂0))²),
                λ(σ) = (σ² + σ_d²)/(σσ_d)²

Δ is, up to a positive per-sample weight, σ²(∇log p_real − ∇log p_fake) of the noised distributions, so −Δ is the
descent direction of KL(p_fake ‖ p_real) (DMD Eq. 7): the mode-seeking term that sharpens one-step samples, where
the consistency loss alone (a forward divergence) spreads mass. The real score is the sCD teacher (guided like it).

Schedule (rCM's ``student_update_freq``): before step H (the tangent warm-up, ``loss.tangent_warmup``) only sCD
trains; from H on, every period of ``critic_steps + 1`` steps has one student step (sCD + w·L_G, the critic
frozen) then ``critic_steps`` critic steps (L_φ alone, the student frozen). The training loop keeps both networks
in one optimizer, the critic's parameter group at ``critic_lr_scale`` × the learning rate (rCM: 0.2), and updates
the student's EMAs only on student steps.

Weight. Here both losses are means over the D pixels: a per-pixel gradient of w·2Δ/D against sCD's 2g/D with
‖g‖_rms ≈ 1. rCM sums over pixels, scales sCM by 100 and normalises g by its L2 norm, which is w = √D/100 in these
units (0.28 at 28×28, about 14 for Wan's 480p latents).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .. import noise
from ..tensors import append_dims, eval_mode
from .base import weighting

#: The real denoiser D_real(x_σ, σ, cond) (sCD's teacher, guided as sCD guides it).
RealDenoiser = Callable[[Tensor, Tensor, dict[str, Any]], Tensor]


class ScoreRegulariser:
    """DMD's reverse-divergence term and its critic (see the module docstring).

    Args:
        weight: w of the student's term (0 leaves sCD alone; build none then).
        critic_steps: critic updates per student update after ``start`` (rCM 4, DMD2 4).
        max_steps: K, the most generator steps of the simulation (rCM 4).
        P_mean, P_std: p_D, the log-normal σ of the student term, the critic and the simulation; P_mean None is
            ln σ_d (rCM's LogNormal(0, 1.6) at σ_d = 1).
        start: the first step of the regulariser (rCM: the tangent warm-up H).
    """

    def __init__(
        self,
        weight: float,
        critic_steps: int = 4,
        max_steps: int = 4,
        P_mean: float | None = None,
        P_std: float = 1.6,
        start: int = 0,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
    ):
        self.weight, self.critic_steps, self.max_steps = weight, critic_steps, max_steps
        self.P_mean = math.log(sigma_data) if P_mean is None else P_mean
        self.P_std, self.start = P_std, start
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data
        self.last: dict[str, float] = {}  # the latest student term and critic loss (logged on every step)

    # --- the schedule -----------------------------------------------------------------------------------
    def active(self, step: int) -> bool:
        return step >= self.start

    def is_critic_step(self, step: int) -> bool:
        """Whether ``step`` trains the critic alone (the student frozen)."""
        return self.active(step) and (step - self.start) % (self.critic_steps + 1) != 0

    def simulation_steps(self, step: int) -> int:
        """n of the generator at ``step``: 1 … K in turn over the student updates, and over the critic updates."""
        k = step - self.start
        student_updates = k // (self.critic_steps + 1)
        count = k - student_updates - 1 if self.is_critic_step(step) else student_updates
        return count % self.max_steps + 1

    # --- the pieces ---------------------------------------------------------------------------------------
    def sample_sigma(self, n: int, device: torch.device) -> Tensor:
        """σ ~ p_D (log-normal), inside the model's range."""
        sigma = (noise.randn(n, device) * self.P_std + self.P_mean).exp()
        return sigma.clamp(self.sigma_min, self.sigma_max)

    def generate(self, model: nn.Module, z: Tensor, n: int, cond: dict[str, Any], grad: bool) -> Tensor:
        """x̂0 after ``n`` steps of the multistep sampler from σ_max·z; with ``grad`` the last step keeps its graph."""
        sigma = torch.full((z.shape[0],), self.sigma_max, device=z.device)
        x = z * self.sigma_max
        for i in range(n):
            with torch.set_grad_enabled(grad and i == n - 1):
                x0 = model(x, sigma, **cond)
            if i < n - 1:
                sigma = torch.minimum(self.sample_sigma(z.shape[0], z.device), sigma)
                x = x0.detach() + append_dims(sigma, x0.ndim) * noise.randn_like(x0)
        return x0

    def student_loss(self, x0_hat: Tensor, real: RealDenoiser, fake: nn.Module, cond: dict[str, Any]) -> Tensor:
        """L_G per sample: its gradient in x̂0 is 2Δ/D, DMD's normalised score difference."""
        sigma = self.sample_sigma(x0_hat.shape[0], x0_hat.device)
        with eval_mode(fake):  # no_grad, and the score, not a dropout draw of it (the teacher is read the same way)
            x_sigma = x0_hat.detach() + append_dims(sigma, x0_hat.ndim) * noise.randn_like(x0_hat)
            D_fake = fake(x_sigma, sigma, **cond).float()
            D_real = real(x_sigma, sigma, cond).float()
            scale = (x0_hat.detach().float() - D_real).abs().flatten(1).mean(1).clamp(min=1e-5)
            delta = (D_fake - D_real) / append_dims(scale, D_real.ndim)
            delta = torch.nan_to_num(delta, nan=0.0, posinf=0.0, neginf=0.0)
        x0_hat = x0_hat.float()
        return (x0_hat - (x0_hat - delta).detach()).pow(2).flatten(1).mean(1)

    def critic_loss(self, x0_hat: Tensor, fake: nn.Module, cond: dict[str, Any]) -> Tensor:
        """L_φ per sample: EDM's denoising loss of the fake score on the student's samples."""
        x0_hat = x0_hat.detach().float()
        sigma = self.sample_sigma(x0_hat.shape[0], x0_hat.device)
        weight = weighting("karras", sigma, self.sigma_data)  # EDM's λ(σ) = (σ² + σ_d²)/(σσ_d)²
        D = fake(x0_hat + append_dims(sigma, x0_hat.ndim) * noise.randn_like(x0_hat), sigma, **cond)
        return weight * (D.float() - x0_hat).pow(2).flatten(1).mean(1)

    # --- one step ---------------------------------------------------------------------------------------
    def __call__(
        self,
        model: nn.Module,
        fake: nn.Module,
        real: RealDenoiser,
        like: Tensor,
        step: int,
        cond: dict[str, Any],
    ) -> Tensor:
        """The regulariser's per-sample loss at an active ``step``: L_φ on a critic step (no graph into the student),
        w·L_G on a student step (no graph into the critic). ``like`` gives the batch's shape and device."""
        n = self.simulation_steps(step)
        z = noise.randn_like(like.float())
        if self.is_critic_step(step):
            with torch.no_grad():
                x0_hat = self.generate(model, z, n, cond, grad=False)
            loss = self.critic_loss(x0_hat, fake, cond)
            self.last["critic_loss"] = float(loss.detach().mean())
            return loss
        x0_hat = self.generate(model, z, n, cond, grad=True)
        loss = self.student_loss(x0_hat, real, fake, cond)
        self.last["dmd"] = float(loss.detach().mean())
        return self.weight * loss


__all__ = ["ScoreRegulariser", "RealDenoiser"]
