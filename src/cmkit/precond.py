"""Preconditioning: turn a raw backbone F_θ into a denoiser ``model(x, sigma, **cond) -> x0``.

Five kinds, one calling convention:

- ``edm``: EDM (Karras et al. 2022, Table 1) for diffusion teachers.
- ``cm``: the boundary-shifted form of Song et al. 2023 (Appendix C; ``get_scalings_for_boundary_condition``)
  for consistency models, which makes f_θ(x, σ_min) = x exactly.
- ``trigflow``: sCM's consistency function f_θ(x_t, t) = cos t·x_t − sin t·σ_d·F_θ(x_t/σ_d, t) (Lu & Song 2025,
  §2), which is EDM's scalings with the output read as −F_θ and c_noise = t
  (``cmkit.trigflow``); f(x, 0) = x exactly. It carries the learned adaptive weighting w_φ(t) (``logvar``).
- ``meanflow``: a two-time flow map of MeanFlow (Geng et al. 2025, arXiv 2505.13447): the
  backbone predicts the average velocity u(z_t, t, r) on the rectified path z_t = (1−t)·x0 + t·ε, with
  t = σ/(1+σ) and z_t = x_σ/(1+σ); as a denoiser x0 = z_t − t·u(z_t, t, 0), and ``flow_map`` jumps t → r.
- ``flowmap``: a two-time flow map in CTM's parameterisation (Kim et al. 2024, Eq. 6), which Align Your Flow
  distils (Sabour et al. 2025): the jump σ → σ_s is a DDIM step with a learned, s-dependent x0 estimate,
  f(x_σ, σ, σ_s) = (σ_s/σ)·x_σ + (1 − σ_s/σ)·g_θ(x_σ, σ, σ_s), and g_θ is EDM's preconditioned denoiser whose
  backbone also sees the target time s = σ_s/(1+σ_s) (a second, zero-initialised time input). So f(x, σ, σ) = x,
  f(x, σ, 0) = g_θ is the consistency function, and a student initialised from an EDM teacher starts with the
  teacher's velocity for every s (the flow-matching limit s → σ).

σ arithmetic always runs in fp32, also under autocast.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from .nets.embedding import PositionalEmbedding
from .schedules import SIGMA_DATA, SIGMA_MAX, SIGMA_MIN
from .tensors import append_dims, as_sigma
from .trigflow import t_from_sigma

Kind = Literal["edm", "cm", "trigflow", "meanflow", "flowmap"]
PRECOND_KINDS = ("edm", "cm", "trigflow", "meanflow", "flowmap")
#: The kinds whose backbone's second input is a time (a two-time flow map), not LCM's guidance scale.
TWO_TIME_KINDS = ("meanflow", "flowmap")


def edm_scalings(sigma: Tensor, sigma_data: float = SIGMA_DATA) -> tuple[Tensor, Tensor, Tensor]:
    """EDM c_skip, c_out, c_in (Karras et al. 2022, Table 1)."""
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma**2 + sigma_data**2).sqrt()
    return c_skip, c_out, c_in


def cm_scalings(
    sigma: Tensor, sigma_data: float = SIGMA_DATA, sigma_min: float = SIGMA_MIN
) -> tuple[Tensor, Tensor, Tensor]:
    """Boundary-shifted c_skip, c_out, c_in (CM Appendix C): c_skip(σ_min) = 1, c_out(σ_min) = 0.

    Note the c_out denominator uses σ, not σ - σ_min, exactly as in the reference code.
    """
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
    c_out = (sigma - sigma_min) * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma**2 + sigma_data**2).sqrt()
    return c_skip, c_out, c_in


def c_noise(sigma: Tensor) -> Tensor:
    """Noise conditioning c_noise(σ) = ln(σ)/4 (EDM); the backbone embeds it (positional or Fourier)."""
    return sigma.clamp(min=1e-20).log() / 4


class AdaptiveWeight(nn.Module):
    """sCM's learned adaptive weighting w_φ(t) (§12.2; EDM2's uncertainty weighting): a linear map of the
    positional embedding of c_noise, zero-initialised (w_φ ≡ 0 at the start). Used only by the loss."""

    def __init__(self, dim: int = 128):
        super().__init__()

        self.emb = PositionalEmbedding(dim)
        self.linear = nn.Linear(dim, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, c_noise: Tensor) -> Tensor:
        with torch.autocast(c_noise.device.type, enabled=False):
            return self.linear(self.emb(c_noise.float())).squeeze(1)


class Precond(nn.Module):
    """A denoiser ``D(x, σ, class_labels=None) -> x0`` built from a backbone ``net(x_in, c_noise, class_labels)``.

    Args:
        net: backbone mapping (B, C, H, W), (B,) [, (B,)] to (B, C, H, W); ``meanflow`` needs one that takes a
            second time (``net(x, c_noise, class_labels, c_noise2)``, built with ``time_inputs=2``). In the other
            kinds such a second input is the guidance scale w the model was distilled for (LCM, Luo et al. 2023,
            §4.2: "ω as an input"); call the denoiser with ``guidance=w`` (B,) or a float.
        kind: ``"edm"`` (diffusion model / teacher), ``"cm"`` (consistency model, f(x, σ_min) = x),
            ``"trigflow"`` (sCM), ``"meanflow"`` or ``"flowmap"`` (two-time flow maps); see the module docstring.
    """

    def __init__(
        self,
        net: nn.Module,
        kind: Kind = "cm",
        sigma_data: float = SIGMA_DATA,
        sigma_min: float = SIGMA_MIN,
        sigma_max: float = SIGMA_MAX,
        time_input: str = "default",
    ):
        super().__init__()
        if kind not in PRECOND_KINDS:
            raise ValueError(f"unknown preconditioning kind {kind!r}; expected one of {', '.join(PRECOND_KINDS)}")
        if time_input not in ("default", "t", "log_sigma"):
            raise ValueError(f"unknown time_input {time_input!r}; expected default, t or log_sigma")
        self.net, self.kind = net, kind
        # trigflow's noise input: sCM's c_noise(t) = t, or EDM's ln(σ)/4 to fine-tune an EDM-trained network
        self.trig_log_sigma = kind == "trigflow" and time_input == "log_sigma"
        self.sigma_data, self.sigma_min, self.sigma_max = sigma_data, sigma_min, sigma_max
        #: a guidance-conditioned model (LCM): the backbone's second scalar input is w
        self.takes_guidance = kind not in TWO_TIME_KINDS and getattr(net, "emb_mlp2", None) is not None
        if kind == "trigflow":
            self.logvar = AdaptiveWeight()

    @property
    def has_extra_input(self) -> bool:
        """The backbone's second scalar input is a condition added to its time embedding (LCM's guidance scale w, or
        a ``flowmap`` model's target time), through a zero-initialised layer that a diffusion teacher lacks; a
        MeanFlow model's second input (t − r) is part of its time instead."""
        return self.takes_guidance or self.kind == "flowmap"

    @property
    def is_flow_map(self) -> bool:
        """A two-time flow map (``meanflow``, ``flowmap``): ``flow_map(x, σ, σ_to)`` jumps between any two levels."""
        return self.kind in TWO_TIME_KINDS

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.kind == "cm":
            return cm_scalings(sigma, self.sigma_data, self.sigma_min)
        return edm_scalings(sigma, self.sigma_data)

    def c_noise(self, sigma: Tensor) -> Tensor:
        """The backbone's noise input: ln(σ)/4 (EDM, CM), or TrigFlow's t = arctan(σ/σ_d)."""
        return self.trig_c_noise(t_from_sigma(sigma, self.sigma_data)) if self.kind == "trigflow" else c_noise(sigma)

    def trig_c_noise(self, t: Tensor) -> Tensor:
        """TrigFlow's c_noise(t): t (sCM §12.2), or ln(σ_d tan t)/4 for a network fine-tuned from EDM."""
        return c_noise(self.sigma_data * torch.tan(t.float())) if self.trig_log_sigma else t.float()

    def forward(
        self,
        x: Tensor,
        sigma: Tensor | float,
        class_labels: Tensor | None = None,
        *,
        param: str = "x0",
        r: Tensor | None = None,
        guidance: Tensor | float | None = None,
    ) -> Any:
        """x: (B, C, H, W) noisy images at level σ; sigma: scalar or (B,). Returns x0 estimates in fp32.

        The training objectives of ``trigflow`` and ``meanflow`` call the network in their own
        parameterisation through this same entry point (so a DDP wrapper sees the call):
        ``param="F"`` (trigflow): x is x_t, sigma is t; returns (F_θ(x_t/σ_d, t), w_φ(t)).
        ``param="u"`` (meanflow): x is z_t, sigma is t and ``r`` the second time; returns u_θ(z_t, t, r).
        ``guidance``: the guidance scale w of a guidance-conditioned model (``takes_guidance``), else None.
        """
        if param == "F" and self.kind == "trigflow":
            return self.trig_F(x, sigma, class_labels), self.logvar(self.trig_c_noise(sigma))
        if param == "u" and self.kind in TWO_TIME_KINDS and r is not None:
            return self.average_velocity(x, sigma, r, class_labels)
        if param != "x0":
            raise ValueError(f"param={param!r} does not apply to a {self.kind} model")
        x = x.float()
        sigma = as_sigma(sigma, x.shape[0], x.device)
        if self.kind in TWO_TIME_KINDS:
            return self.flow_map(x, sigma, torch.zeros_like(sigma), class_labels)
        c_skip, c_out, c_in = (append_dims(c, x.ndim) for c in self.scalings(sigma))
        F = self.net(c_in * x, self.c_noise(sigma), class_labels, *self.guidance_input(guidance, sigma))
        with torch.autocast(x.device.type, enabled=False):
            return c_skip * x + c_out * F.float()

    def guidance_input(self, guidance: Tensor | float | None, sigma: Tensor) -> tuple[Tensor, ...]:
        """The backbone's extra argument: (w,) as a (B,) tensor for a guidance-conditioned model, else ()."""
        if not self.takes_guidance:
            if guidance is not None:
                raise ValueError("this model was not distilled with a guidance input; do not pass guidance")
            return ()
        if guidance is None:
            raise ValueError("this model is conditioned on the guidance scale w: pass guidance=w (a float or (B,))")
        return (as_sigma(guidance, sigma.shape[0], sigma.device),)

    # --- TrigFlow (sCM) ------------------------------------------------------------------------------
    def trig_F(self, x_t: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """sCM's raw network F_θ(x_t/σ_d, t) (the output of ``net`` negated; module docstring)."""
        return -self.net(x_t / self.sigma_data, self.trig_c_noise(t), class_labels).float()

    # --- MeanFlow (two-time flow map) ----------------------------------------------------------------
    def average_velocity(self, z: Tensor, t: Tensor, r: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """u_θ(z_t, t, r): the average velocity from time t back to time r ≤ t on the rectified path. MeanFlow's
        backbone sees (t, t − r); a ``flowmap`` model's is u = (z_t − g_θ)/t (the slope of its DDIM step)."""
        if self.kind == "flowmap":
            tt = append_dims(t.float(), z.ndim)
            sigma, sigma_to = t.float() / (1 - t.float()), r.float() / (1 - r.float())
            return (z.float() - self.flowmap_x0(z / (1 - tt), sigma, sigma_to, class_labels)) / tt
        return self.net(z, t, class_labels, t - r).float()

    def flowmap_x0(self, x: Tensor, sigma: Tensor, sigma_to: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """g_θ(x_σ, σ, σ_s) of a ``flowmap`` model: EDM's c_skip·x + c_out·F_θ(c_in·x, ln σ/4, s) with the target
        time s = σ_s/(1+σ_s) ∈ [0, 1) as the second input (module docstring)."""
        c_skip, c_out, c_in = (append_dims(c, x.ndim) for c in edm_scalings(sigma, self.sigma_data))
        F = self.net(c_in * x, c_noise(sigma), class_labels, sigma_to / (1 + sigma_to))
        with torch.autocast(x.device.type, enabled=False):
            return c_skip * x + c_out * F.float()

    def flow_map(
        self, x: Tensor, sigma: Tensor | float, sigma_to: Tensor | float, class_labels: Tensor | None = None
    ) -> Tensor:
        """The jump x_σ → x_{σ_to}: MeanFlow's z_r = z_t − (t − r)·u(z_t, t, r), in EDM's x_σ = z/(1−t) scaling,
        or a ``flowmap`` model's DDIM step (σ_to/σ)·x + (1 − σ_to/σ)·g_θ(x, σ, σ_to)."""
        x = x.float()
        sigma = as_sigma(sigma, x.shape[0], x.device)
        sigma_to = as_sigma(sigma_to, x.shape[0], x.device)
        if self.kind == "flowmap":  # a DDIM step σ → σ_s with g_θ(x, σ, σ_s) as its x0
            ratio = append_dims(sigma_to / sigma, x.ndim)
            g = self.flowmap_x0(x, sigma, sigma_to, class_labels)
            with torch.autocast(x.device.type, enabled=False):
                return ratio * x + (1 - ratio) * g
        t, r = sigma / (1 + sigma), sigma_to / (1 + sigma_to)
        z = x / append_dims(1 + sigma, x.ndim)
        u = self.average_velocity(z, t, r, class_labels)
        with torch.autocast(x.device.type, enabled=False):
            return (z - append_dims(t - r, x.ndim) * u) * append_dims(1 + sigma_to, x.ndim)
