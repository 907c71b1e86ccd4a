"""A discrete-time VP diffusion model (DDPM, Stable Diffusion, any diffusers UNet) as a σ-space denoiser.

DDPM-family models are trained on z_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε for integer timesteps t = 0 … T−1, with the
schedule's ``alphas_cumprod`` ᾱ_t, and predict ε, v = √ᾱ·ε − √(1−ᾱ)·x0 or x0 itself. The same process in
cmkit's σ-space (EDM, Karras et al. 2022, §2 and Table 1 "VP") is x = x0 + σ·ε with

    σ_t = √((1 − ᾱ_t)/ᾱ_t),   x = z_t/√ᾱ_t = z_t·√(1 + σ²),

so ``DiscreteVPDenoiser`` gives the denoiser D(x, σ) = x0 of cmkit's calling convention:

    model input  z = x/√(1+σ²) at timestep t(σ),
    ε-prediction D = x − σ·ε̂,
    v-prediction D = x/(1+σ²) − σ/√(1+σ²)·v̂,
    x0-prediction D = x̂0.

The timestep t(σ) for a σ that is not one of the T table values:

- ``lookup="interp"`` (default): a fractional t, linear in ln σ between the two neighbouring table entries
  (k-diffusion's ``DiscreteSchedule.sigma_to_t``, diffusers' ``_sigma_to_t`` under ``use_karras_sigmas``);
  diffusers' UNets embed a float timestep like an integer one.
- ``lookup="nearest"``: the integer t whose σ_t is nearest in ln σ (k-diffusion's ``quantize=True``).

Both give the table's t exactly at a table σ, where D equals diffusers' ``scheduler.step(...).pred_original_sample``.
The input scaling always uses the σ given. σ outside [σ_0, σ_{T−1}] uses the end timestep. A zero-terminal-SNR
schedule (ᾱ_{T−1} = 0, σ = ∞) has its last ᾱ raised to 2⁻²⁴, as diffusers' Euler schedulers do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Literal

import torch
from torch import Tensor, nn

from .errors import CmkitError
from .formats.diffusers_dir import fresh_unet, read_schedule
from .tensors import append_dims, as_sigma

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
LOOKUPS = ("interp", "nearest")
Lookup = Literal["interp", "nearest"]


def sigmas_of(alphas_cumprod: Tensor) -> Tensor:
    """σ_t = √((1−ᾱ_t)/ᾱ_t) for every table timestep (float64; ᾱ clamped to [2⁻²⁴, 1])."""
    ac = alphas_cumprod.detach().to("cpu", torch.float64).clamp(2.0**-24, 1.0)
    return ((1 - ac) / ac).sqrt()


def check_prediction_type(prediction_type: str, where: str = "prediction_type") -> str:
    """``prediction_type`` if diffusers names it (epsilon, v_prediction, sample), else one error line."""
    if prediction_type not in PREDICTION_TYPES:
        raise CmkitError(f"{where}={prediction_type!r} is not a prediction type; expected one of {PREDICTION_TYPES}")
    return prediction_type


def x0_from_output(output: Tensor, x: Tensor, sigma: Tensor, prediction_type: str) -> Tensor:
    """x0 from the network output in σ-space: ε → x − σ·ε̂, v → x/(1+σ²) − σ·v̂/√(1+σ²), sample → x̂0."""
    s = append_dims(sigma, x.ndim)
    if prediction_type == "epsilon":
        return x - s * output
    if prediction_type == "v_prediction":
        return x / (1 + s**2) - s / (1 + s**2).sqrt() * output
    return output


class DiscreteVPDenoiser(nn.Module):
    """D(x, σ, **cond) → x0 for a network ``unet(z, t, **cond)`` trained on a discrete VP schedule.

    ``unet`` is a diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` (its ``.sample`` or first output is used) or
    any callable with that signature. Conditioning passes through by name: ``class_labels`` (``UNet2DModel``'s class
    embedding), ``encoder_hidden_states`` (text), ``timestep_cond`` (LCM's guidance embedding). A network that also
    predicts its variance (2·C output channels, "learned_range") has the second half dropped, as diffusers'
    schedulers do.
    """

    def __init__(
        self,
        unet: nn.Module | Callable[..., Any],
        alphas_cumprod: Tensor,
        prediction_type: str = "epsilon",
        lookup: Lookup = "interp",
    ):
        super().__init__()
        if lookup not in LOOKUPS:
            raise CmkitError(f"lookup={lookup!r}: expected one of {LOOKUPS}")
        self.unet = unet
        self.prediction_type = check_prediction_type(prediction_type)
        self.lookup = lookup
        self.prompt_encoder: nn.Module | None = None  # a pipeline's text encoder (``cmkit.prompts``), set by the loader
        table = sigmas_of(torch.as_tensor(alphas_cumprod))
        if table.ndim != 1 or len(table) < 2 or bool((table[1:] <= table[:-1]).any()):
            raise CmkitError(
                "alphas_cumprod must be a strictly decreasing 1-d table of at least 2 timesteps "
                f"(got shape {tuple(table.shape)})"
            )
        self.register_buffer("log_sigmas", table.log().float(), persistent=False)
        self.sigma_min, self.sigma_max = float(table[0]), float(table[-1])

    @property
    def sigmas(self) -> Tensor:
        """σ_t of the T table timesteps, increasing with t."""
        return self.log_sigmas.exp()

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """The timestep of each σ: fractional (``interp``, linear in ln σ) or the nearest integer (``nearest``)."""
        ls = self.log_sigmas
        log_sigma = sigma.float().clamp(min=1e-30).log().clamp(float(ls[0]), float(ls[-1]))
        if self.lookup == "nearest":
            return (log_sigma[:, None] - ls[None]).abs().argmin(dim=1)
        hi = torch.searchsorted(ls, log_sigma).clamp(1, len(ls) - 1)
        lo = hi - 1
        frac = (log_sigma - ls[lo]) / (ls[hi] - ls[lo])
        return lo.float() + frac.clamp(0, 1)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """σ at a (fractional) timestep, linear in ln σ between table entries (the inverse of ``sigma_to_t``)."""
        t = t.float().clamp(0, len(self.log_sigmas) - 1)
        lo = t.floor().long().clamp(max=len(self.log_sigmas) - 2)
        frac = t - lo
        return (self.log_sigmas[lo] * (1 - frac) + self.log_sigmas[lo + 1] * frac).exp()

    def forward(self, x: Tensor, sigma: Tensor | float, **cond: Any) -> Tensor:
        x = x.float()
        sigma = as_sigma(sigma, x.shape[0], x.device)
        z = x / append_dims((1 + sigma**2).sqrt(), x.ndim)
        cond = {k: v for k, v in cond.items() if v is not None}
        if self.text_conditioned and "encoder_hidden_states" not in cond:
            raise CmkitError(
                "this is a text-conditioned UNet (cross-attention): it needs prompts (cmkit sample --prompt TEXT, "
                "sample_images(prompts=[...]), from a pipeline directory with its tokenizer/ and text_encoder/) "
                "or their embeddings as encoder_hidden_states="
            )
        out = self.unet(z.to(self.net_dtype()), self.sigma_to_t(sigma), **cond)
        out = out.sample if hasattr(out, "sample") else out[0] if isinstance(out, tuple) else out
        if out.shape[1] == 2 * x.shape[1]:
            out = out[:, : x.shape[1]]  # learned variance ("learned_range"): the first half is the prediction
        return x0_from_output(out.float(), x, sigma, self.prediction_type)

    @property
    def text_conditioned(self) -> bool:
        """A UNet with cross-attention (Stable Diffusion's ``UNet2DConditionModel``)."""
        config = getattr(self.unet, "config", None)
        return bool(getattr(config, "cross_attention_dim", None)) if config is not None else False

    def net_dtype(self) -> torch.dtype:
        """The dtype of the network's weights (an fp16 UNet gets fp16 inputs; σ arithmetic stays fp32)."""
        param = next(self.unet.parameters(), None) if isinstance(self.unet, nn.Module) else None
        return param.dtype if param is not None and param.is_floating_point() else torch.float32

    def grid_sigmas(self, steps: int, spacing: str = "trailing") -> Tensor:
        """``steps`` table σ values, decreasing, plus a trailing 0: a sampling grid on the training timesteps
        (diffusers' ``timestep_spacing``: ``trailing`` starts at t = T−1, ``leading`` at (steps−1)·⌊T/steps⌋)."""
        T = len(self.log_sigmas)
        if not 1 <= steps <= T:
            raise CmkitError(f"steps must be between 1 and {T} (the training timesteps), got {steps}")
        if spacing == "trailing":
            t = torch.arange(T, 0, -T / steps).round().long() - 1
        elif spacing == "leading":
            t = (torch.arange(steps) * (T // steps)).flip(0)
        else:
            raise CmkitError(f"spacing={spacing!r}: expected trailing or leading")
        return torch.cat([self.sigmas[t], torch.zeros(1)])


# --- latent consistency models (LCM) -------------------------------------------------------------------


def guidance_embedding(omega: Tensor, dim: int) -> Tensor:
    """LCM's embedding of the guidance strength ω (Luo et al. 2023, §4.2; diffusers'
    ``get_guidance_scale_embedding``): [sin(1000ω·f_i), cos(1000ω·f_i)], f_i = 10000^(−i/(dim/2 − 1)), zero-padded
    to ``dim``. LCM embeds ω = w − 1 for the classifier-free-guidance scale w (D_∅ + w(D_c − D_∅))."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    angles = (omega.float() * 1000.0)[:, None] * freqs.to(omega.device)[None]
    emb = torch.cat([angles.sin(), angles.cos()], dim=1)
    return torch.nn.functional.pad(emb, (0, dim % 2))


class LCMDenoiser(DiscreteVPDenoiser):
    """A latent consistency model from diffusers (``LCMScheduler``; e.g. LCM-Dreamshaper) as cmkit's consistency
    model f(x, σ, guidance=w, **cond) in σ-space.

    LCM's consistency function (diffusers' ``LCMScheduler.step``, its ``denoised``) at timestep t:

        f = c_out(t)·x̂0 + c_skip(t)·z_t,   c_skip = σ_d²/((s·t)² + σ_d²),   c_out = s·t/√((s·t)² + σ_d²),

    σ_d = 0.5, s = ``timestep_scaling`` (10), z_t = x/√(1+σ²) the VP sample and x̂0 the network's prediction as
    ``DiscreteVPDenoiser`` reads it. A UNet with ``time_cond_proj_dim`` takes the guidance scale w as
    ``timestep_cond`` = ``guidance_embedding(w − 1)`` (``takes_guidance``); one without (an LCM-LoRA'd UNet) takes
    none. k-step sampling in σ-space is LCM's multistep loop: the pipeline's re-noising
    √ᾱ'·f + √(1−ᾱ')·ε is f + σ'·ε after division by √ᾱ'.
    """

    sigma_data = 0.5

    def __init__(
        self,
        unet: nn.Module | Callable[..., Any],
        alphas_cumprod: Tensor,
        prediction_type: str = "epsilon",
        timestep_scaling: float = 10.0,
        guidance_dim: int = 0,
    ):
        super().__init__(unet, alphas_cumprod, prediction_type)
        self.timestep_scaling, self.guidance_dim = float(timestep_scaling), int(guidance_dim)

    @property
    def takes_guidance(self) -> bool:
        return self.guidance_dim > 0

    def boundary(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(c_skip, c_out) at timestep t (diffusers' ``get_scalings_for_boundary_condition_discrete``)."""
        st = t.float() * self.timestep_scaling
        d2 = self.sigma_data**2
        return d2 / (st**2 + d2), st / (st**2 + d2).sqrt()

    def forward(self, x: Tensor, sigma: Tensor | float, guidance: Tensor | float | None = None, **cond: Any) -> Tensor:
        x = x.float()
        sigma = as_sigma(sigma, x.shape[0], x.device)
        if self.takes_guidance:
            if guidance is None:
                raise CmkitError("this LCM takes its guidance scale w as an input: pass guidance=w (e.g. 8.5)")
            w = torch.as_tensor(guidance, dtype=torch.float32, device=x.device).expand(x.shape[0])
            cond["timestep_cond"] = guidance_embedding(w - 1, self.guidance_dim).to(self.net_dtype())
        elif guidance is not None:
            raise CmkitError("this LCM has no guidance input (no time_cond_proj_dim): sample it without guidance")
        x0 = super().forward(x, sigma, **cond)
        t = self.sigma_to_t(sigma)
        c_skip, c_out = (append_dims(c, x.ndim) for c in self.boundary(t))
        return c_out * x0 + c_skip * x / append_dims((1 + sigma**2).sqrt(), x.ndim)


#: the width of LCM's guidance embedding (``time_cond_proj_dim`` of LCM-Dreamshaper and diffusers' LCM scripts)
LCM_GUIDANCE_DIM = 256


def lcm_student(path: str, guidance_input: bool = False, checkpointing: bool = False) -> LCMDenoiser:
    """The student of latent consistency distillation from the diffusers model at ``path`` (``model.arch=diffusers``):
    an ``LCMDenoiser`` over a fresh copy of its UNet on its noise schedule, weights not yet loaded
    (``train.init_from`` loads the teacher's). With ``guidance_input`` the UNet gets LCM's w input
    (``time_cond_proj_dim`` = 256, Luo et al. 2023, §4.2); without it (LCM-LoRA) guidance is distilled at the one
    w drawn per example and sampling takes no w. ``checkpointing`` is diffusers' gradient checkpointing."""
    if not Path(path).expanduser().is_dir():
        raise CmkitError(
            f"model.diffusers={path} (train.teacher unless set) not found: expected a local diffusers pipeline "
            "directory (model_index.json, unet/, scheduler/, …; e.g. Stable Diffusion 1.5) or UNet directory"
        )
    with torch.device("cpu"):  # the σ table is data, also when the network is built on the meta device (dry run)
        unet_dir, alphas, prediction_type, scheduler_config = read_schedule(path)
    dim = LCM_GUIDANCE_DIM if guidance_input else 0
    unet = fresh_unet(unet_dir, time_cond_proj_dim=dim or None)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    scaling = float(scheduler_config.get("timestep_scaling", 10.0))
    with torch.device("cpu"):
        return LCMDenoiser(unet, alphas, prediction_type, scaling, dim)
