"""Latent consistency distillation (LCM: Luo et al. 2023, "Latent Consistency Models", Alg. 1, eq. 9–10).

Consistency distillation of a classifier-free-guided teacher with the guidance scale as an input of the student.
For each example a scale w ~ U[w_min, w_max] is drawn; the teacher's ODE step from t_{n+k} to t_n is taken with
the guided denoiser

    D_w(x, σ, c) = D(x, σ, ∅) + w·(D(x, σ, c) − D(x, σ, ∅))

(``cmkit.guidance``; LCM writes ε̃ = (1+ω)·ε_c − ω·ε_∅, so w = 1 + ω, and diffusers' LCM pipeline passes
ω = guidance_scale − 1), and the student f_θ(x_{t_{n+k}}, t_{n+k}, c, w) is pulled to its EMA target
f_θ⁻(x̂_{t_n}, t_n, c, w) at the same w. The model takes w as a second scalar input (``model.time_inputs=2``:
``Precond(..., guidance=w)``), so one network samples every scale in [w_min, w_max] at 1–4 steps.

LCM's DDIM solver is the Euler step of the probability-flow ODE in σ-space (x = z/√ᾱ; DDIM's update is exactly
x_{t2} = x_t + (t2 − t)·(x_t − D)/t there), so ``solver="euler"`` is LCM's; its skipping step k is the spacing of
the grid: LCM's 50 of a 1,000-step teacher's timesteps (k = 20) are ``grid="teacher"`` with ``num_scales=50``
(a diffusers teacher, ``cmkit.discrete_vp``), or ``num_scales`` Karras levels for a σ-space (EDM) teacher.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .. import noise
from ..guidance import guided, guided_text
from ..tensors import append_dims
from .base import paired_passes, weighting
from .cd import CDLoss
from .options import Option, option, within


class LCMLoss(CDLoss):
    """L = λ(t)·d(f_θ(x_t, t, c, w), f_θ⁻(x̂_{t2}, t2, c, w)), x̂_{t2} one step of the w-guided teacher from x_t."""

    OPTIONS: ClassVar[dict[str, Option]] = {
        **CDLoss.OPTIONS,
        "guidance_min": option("smallest guidance scale w drawn per example (LCM: 1 + ω_min)", within(0, 30)),
        "guidance_max": option("largest guidance scale w drawn per example (LCM: 1 + ω_max)", within(0, 30)),
    }

    def __init__(
        self,
        *args: Any,
        guidance_min: float = 1.0,
        guidance_max: float = 4.0,
        num_scales: int = 50,
        mu: float = 0.95,
        solver: str = "euler",
        **kwargs: Any,
    ):
        if not guidance_min <= guidance_max:
            raise ValueError(f"need guidance_min ≤ guidance_max, got {guidance_min} and {guidance_max}")
        super().__init__(*args, num_scales=num_scales, mu=mu, solver=solver, **kwargs)
        self.guidance_min, self.guidance_max = guidance_min, guidance_max

    def stats(self, step: int) -> dict[str, float]:
        return {**super().stats(step), "w_min": self.guidance_min, "w_max": self.guidance_max}

    def draw_guidance(self, n: int, device: torch.device) -> Tensor:
        """w ~ U[w_min, w_max], one per example."""
        return self.guidance_min + (self.guidance_max - self.guidance_min) * noise.rand(n, device)

    def __call__(
        self,
        model: nn.Module,
        x0: Tensor,
        *,
        step: int,
        target: nn.Module | None = None,
        teacher: nn.Module | None = None,
        class_labels: Tensor | None = None,
        encoder_hidden_states: Tensor | None = None,
        null_text: Tensor | None = None,
        **cond: Any,
    ) -> Tensor:
        """``class_labels`` (the null label is the unconditional branch), or a text model's prompt embeddings
        ``encoder_hidden_states`` with the empty prompt's ``null_text`` (1, L, D) as that branch. A student without a
        guidance input (LCM-LoRA on Stable Diffusion) is pulled to the guided teacher at the w drawn per example
        all the same, as LCM-LoRA trains."""
        if teacher is None:
            raise ValueError("LCM distils a teacher: set teacher=PATH to a class-conditional diffusion model")
        if (class_labels is None) == (encoder_hidden_states is None):
            raise ValueError(
                "LCM distils classifier-free guidance: it needs class labels (a class-conditional run) or prompt "
                "embeddings (a text model), one of the two"
            )
        if encoder_hidden_states is not None and null_text is None:
            raise ValueError("a text teacher is guided with the empty prompt: pass its embedding as null_text")
        sigmas = self.grid_sigmas(teacher, x0.device)
        i = noise.randint(len(sigmas) - 1, x0.shape[0], x0.device)
        t, t2 = sigmas[i], sigmas[i + 1]
        w = self.draw_guidance(x0.shape[0], x0.device)
        x_t = x0 + append_dims(t, x0.ndim) * noise.randn_like(x0)

        def teacher_w(x: Tensor, sigma: Tensor) -> Tensor:
            if class_labels is not None:
                return guided(teacher, x, sigma, class_labels, w)
            return guided_text(teacher, x, sigma, encoder_hidden_states, null_text, w)

        with torch.no_grad():
            x_t2 = self.solver(teacher_w, x_t, t, t2)
        given = {"class_labels": class_labels} if class_labels is not None else {}
        given |= {"encoder_hidden_states": encoder_hidden_states} if encoder_hidden_states is not None else {}
        takes_w = getattr(getattr(model, "module", model), "takes_guidance", True)  # (a DDP wrapper's module)
        given |= {"guidance": w} if takes_w else {}
        pred, tgt = paired_passes(model, target or model, (x_t, t), (x_t2, t2), **given, **cond)
        return weighting(self.weighting, t, self.sigma_data) * self.distance(pred, tgt)
