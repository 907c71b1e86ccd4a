"""Consistency training of a decoder UNet on the released decoder's own discrete schedule.

The consistency decoder (OpenAI 2023, openai/consistencydecoder; docs/decoder.md) evaluates, at an integer timestep t
of the 1024-step cosine schedule (ᾱ_t, σ_t = √(1/ᾱ_t − 1), σ_d = 0.5),

    f_θ(x_t, t) = c_skip(t)·x_t + c_out(t)·F_θ(c_in(t)·x_t ⊕ up(z_norm), t),      x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε

which is EDM's preconditioning (Karras et al. 2022, Table 1) of the VE variable y = x_t/√ᾱ_t = x0 + σ_t·ε.
It was distilled on 64 steps and decodes at multiples of 16 (t = 1008, 512 by default), so training uses
that grid:  t_n = 16·n, n = 0 … 63, with t_0 = 0 (σ_0 = 0.0063) as the data end.

**Objective** (consistency training, Song et al. 2023 Alg. 3, with iCT's θ⁻ = stopgrad(θ), Song & Dhariwal
2023 §3.2, and ECT's shrinking gap, Geng et al. 2024 §3): draw x0 with its latent z, n ~ p(n) over
{1, …, 63}, one ε shared by both points (the unbiased one-sample estimate of the PF-ODE step, CM Thm. 2),
and the lower index m = n − Δ(k):

    L(θ) = λ(t_n) · d( f_θ(x_{t_n}, t_n),  sg[f_θ⁻(x_{t_m}, t_m)] )       if m ≥ 1
    L(θ) = λ(t_n) · d( f_θ(x_{t_n}, t_n),  x0 )                             if m ≤ 0 (boundary f(·, t_0) = x0)

* Δ(k) is ECT's curriculum on the discrete grid: the gap in grid indices shrinks stage by stage
  (``gaps``, equal-length stages over the run), e.g. (64, 16, 4, 1). Δ ≥ 63 makes every target the data x0,
  i.e. the EDM denoising loss, which is ECT's "diffusion pretraining is consistency training with r = 0";
  Δ = 1 is CT between adjacent points of the released decoder's 64-step grid.
* λ(t) = 1/c_out(t)^p with p the homogeneity degree of d (2 for ``l2``, 1 for ``l1``/``pseudo_huber``):
  for ``l2`` this is EDM's λ(σ) = (σ² + σ_d²)/(σ·σ_d)² (Karras et al. 2022 Eq. 8), which makes L a
  unit-scale regression of F_θ onto (target − c_skip·x_{t_n})/c_out at every t, the 1-step point t = 1008
  included (iCT's 1/(σ_{n+1} − σ_n) would weight it ~1/40 and starve one-step decoding).
* p(n) is uniform over the grid (CM's CD/CT sampling), or iCT's discretised lognormal on σ (Eq. 10).
* The target is evaluated under ``torch.no_grad`` (θ⁻ = sg(θ), or a separate EMA module if one is given);
  the UNet has no dropout, so the two passes need no shared masks.

f_θ is ``sampler.f_theta``, the function ``ConsistencyDecoder.decode`` evaluates, so a trained UNet decodes
unchanged; only the clamp is left out during training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..distances import get_distance
from ..errors import CmkitError
from ..schedules import lognormal_index_probs
from ..tensors import append_dims
from .config import DecoderConfig
from .latents import upsample_latents
from .sampler import f_theta
from .schedule import DecoderSchedule

DISTANCE_DEGREE = {"l2": 2, "l1": 1, "pseudo_huber": 1}
INDEX_SAMPLING = ("uniform", "lognormal")


def grid_timesteps(schedule: DecoderSchedule) -> Tensor:
    """t_n = n·T/N for n = 0 … N−1 (N = ``num_distilled_steps`` = 64, T = 1024): 0, 16, …, 1008."""
    space = schedule.num_timesteps // schedule.num_distilled_steps
    return torch.arange(schedule.num_distilled_steps) * space


def check_gaps(gaps: Sequence[int], key: str = "gaps") -> tuple[int, ...]:
    """The curriculum's gaps as a tuple, or one ``CmkitError`` line unless non-increasing integers ≥ 1."""
    gaps = tuple(int(g) for g in gaps)
    if not gaps or min(gaps) < 1 or any(a < b for a, b in zip(gaps, gaps[1:])):
        raise CmkitError(f"{key} must be a non-increasing list of integers ≥ 1, got {list(gaps)}")
    return gaps


def gap_at(step: int, total_steps: int, gaps: Sequence[int]) -> int:
    """ECT-style curriculum: stage ⌊k·S/K⌋ of S equal stages uses gap Δ = gaps[stage] (grid indices)."""
    stage = min(len(gaps) - 1, step * len(gaps) // max(total_steps, 1))
    return int(gaps[stage])


def gather(table: Tensor, t: Tensor, ndim: int) -> Tensor:
    """Per-sample scalars table[t] as (B, 1, …, 1) float32 on t's device."""
    return append_dims(table.to(t.device)[t], ndim)


def consistency_function(
    unet: nn.Module, x_t: Tensor, z_up: Tensor, t: Tensor, schedule: DecoderSchedule, image_channels: int
) -> Tensor:
    """f(x_t, t) = c_skip(t)·x_t + c_out(t)·F(c_in(t)·x_t ⊕ z_up, t)[:, :C_img] with per-sample t (B,).

    :func:`sampler.f_theta <cmkit.decoder.sampler.f_theta>` with the coefficients gathered per sample, unclamped.
    """
    c_in, c_out, c_skip = (gather(getattr(schedule, k), t, x_t.ndim) for k in ("c_in", "c_out", "c_skip"))
    return f_theta(unet, x_t, z_up, t, c_in, c_out, c_skip, image_channels)


def noisy(x0: Tensor, eps: Tensor, t: Tensor, schedule: DecoderSchedule) -> Tensor:
    """x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε (the decoder's VP forward process)."""
    sqrt_ab, sqrt_1mab = (
        gather(getattr(schedule, k), t, x0.ndim) for k in ("sqrt_alpha_bar", "sqrt_one_minus_alpha_bar")
    )
    return sqrt_ab * x0 + sqrt_1mab * eps


@dataclass
class DecoderConsistencyLoss:
    """Per-sample L(θ) of the module docstring. ``loss(unet, x0, z_norm, step=k) -> (B,)``.

    Args:
        config: the decoder config (σ_d, the 1024-step table, the 64-step grid, ×upscale, channels).
        total_steps: K, the length of the run (the curriculum's stages are K/len(gaps) steps each).
        gaps: Δ per stage in grid indices, non-increasing, ≥ 1; (1,) is plain adjacent-point CT.
        distance: ``l2``, ``l1`` or ``pseudo_huber`` (``cmkit.distances``).
        index_sampling: ``uniform`` over n ∈ {1, …, 63} or iCT's ``lognormal`` on σ_{t_n}.
    """

    config: DecoderConfig
    total_steps: int
    gaps: tuple[int, ...] = (64, 16, 4, 1)
    distance: str = "l2"
    index_sampling: str = "uniform"
    P_mean: float = -1.1
    P_std: float = 2.0

    def __post_init__(self) -> None:
        self.gaps = check_gaps(self.gaps)
        if self.distance not in DISTANCE_DEGREE:
            raise CmkitError(f"distance must be one of {sorted(DISTANCE_DEGREE)}, got {self.distance!r}")
        if self.index_sampling not in INDEX_SAMPLING:
            raise CmkitError(f"index_sampling must be one of {INDEX_SAMPLING}, got {self.index_sampling!r}")
        c = self.config
        self.schedule = DecoderSchedule.cosine(c.num_train_timesteps, c.sigma_data, c.num_distilled_steps)
        self.grid = grid_timesteps(self.schedule)
        self.d = get_distance(self.distance)
        self.p = DISTANCE_DEGREE[self.distance]
        if self.index_sampling == "uniform":
            self.probs = torch.ones(len(self.grid) - 1, dtype=torch.float64)
        else:
            self.probs = lognormal_index_probs(self.schedule.sigma[self.grid], self.P_mean, self.P_std)

    def gap(self, step: int) -> int:
        return gap_at(step, self.total_steps, self.gaps)

    def stats(self, step: int) -> dict[str, float]:
        return {"gap": self.gap(step)}

    def sample_indices(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        """n ∈ {1, …, N−1} per sample, drawn from p(n)."""
        return torch.multinomial(self.probs, batch, replacement=True, generator=generator) + 1

    def __call__(
        self,
        unet: nn.Module,
        x0: Tensor,
        z_norm: Tensor,
        *,
        step: int,
        target: nn.Module | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Per-sample loss (B,) for images x0 (B, C_img, H, W) in [−1, 1] and normalised latents z_norm."""
        B, device = x0.shape[0], x0.device
        n = self.sample_indices(B, generator)
        m = n - self.gap(step)
        t_n, t_m = self.grid[n].to(device), self.grid[m.clamp(min=0)].to(device)
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(device)
        z_up = upsample_latents(z_norm, self.config)
        C = self.config.image_channels
        pred = consistency_function(unet, noisy(x0, eps, t_n, self.schedule), z_up, t_n, self.schedule, C)
        tgt = x0.clone()  # the boundary target where m ≤ 0; the target pass runs only where m ≥ 1
        inner = (m >= 1).to(device)
        if inner.any():
            with torch.no_grad():
                x_m = noisy(x0[inner], eps[inner], t_m[inner], self.schedule)
                tgt[inner] = consistency_function(target or unet, x_m, z_up[inner], t_m[inner], self.schedule, C).to(
                    tgt.dtype
                )
        weight = self.schedule.c_out.to(device)[t_n].pow(-self.p)
        return weight * self.d(pred, tgt.detach())
