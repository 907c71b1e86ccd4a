"""Samplers. Consistency models: one-step and multistep (CM Alg. 1) over a list of σ values.
Diffusion models (teachers, baselines): EDM Heun (Karras et al. 2022, Alg. 1), Euler, and progressive
distillation's DDIM steps; two-time flow maps (MeanFlow): jumps between σ levels. ``SAMPLERS`` names them all.

Every sampler takes ``noise`` sources as a ``torch.Generator``, or a list of per-sample generators
(``per_sample_generators(seeds)``) so that a sample never depends on the batch it was drawn in.
Models follow the convention ``model(x, sigma, **cond) -> x0``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import Tensor, nn

from .schedules import SIGMA_MAX, SIGMA_MIN, karras_sigmas
from .solvers import euler_step, heun_step
from .tensors import append_dims

NoiseSource = Union[torch.Generator, Sequence[torch.Generator], None]


def per_sample_generators(seeds: Sequence[int], device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One generator per sample (the reference code's ``determ-indiv`` mode)."""
    return [torch.Generator(device).manual_seed(int(s)) for s in seeds]


def randn(shape: Sequence[int], generator: NoiseSource = None, device: str | torch.device = "cpu") -> Tensor:
    """Standard normal noise of ``shape`` (B, ...), from one generator or from B per-sample generators."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} per-sample generators for a batch of {shape[0]}")
        return torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=g.device) for g in generator]).to(device)
    gen_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=gen_device).to(device)


def validate_sigmas(sigmas: Sequence[float], sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX) -> list[float]:
    """Check a multistep σ list: non-empty, strictly decreasing, inside [σ_min, σ_max]."""
    s = [float(v) for v in sigmas]
    if not s:
        raise ValueError("the σ list is empty; give at least one noise level, e.g. [80]")
    if any(a <= b for a, b in zip(s, s[1:])):
        raise ValueError(f"σ values must be strictly decreasing (σ_0 = σ_max first), got {s}")
    if s[0] > sigma_max * (1 + 1e-6) or s[-1] < sigma_min * (1 - 1e-6):
        raise ValueError(f"σ values must lie in [{sigma_min}, {sigma_max}], got {s}")
    return s


@torch.no_grad()
def sample_onestep(
    model: nn.Module,
    shape: Sequence[int],
    *,
    generator: NoiseSource = None,
    sigma_max: float = SIGMA_MAX,
    device: str | torch.device = "cpu",
    clip: bool = True,
    **cond: Any,
) -> Tensor:
    """x = f_θ(σ_max·z, σ_max): exactly one network evaluation (CM Sec. 3)."""
    z = randn(shape, generator, device)
    x = model(sigma_max * z, torch.full((shape[0],), sigma_max, device=device), **cond)
    return x.clamp(-1, 1) if clip else x


@torch.no_grad()
def sample_multistep(
    model: nn.Module,
    shape: Sequence[int],
    sigmas: Sequence[float],
    *,
    generator: NoiseSource = None,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    device: str | torch.device = "cpu",
    clip: bool = True,
    callback: Callable[[int, Tensor], None] | None = None,
    **cond: Any,
) -> Tensor:
    """Multistep consistency sampling (CM Alg. 1) with len(sigmas) network evaluations.

    x = σ_0·z; for each σ_j: x̂0 = clamp(f(x, σ_j)); x = x̂0 + sqrt(σ_{j+1}² - σ_min²)·z_j.
    ``sigmas`` are σ values, e.g. [80, 0.82] for a 2-step sampler (never grid indices).
    """
    s = validate_sigmas(sigmas, sigma_min, sigma_max)
    x = s[0] * randn(shape, generator, device)
    for j, sigma in enumerate(s):
        x0 = model(x, torch.full((shape[0],), sigma, device=device), **cond)
        x0 = x0.clamp(-1, 1) if clip else x0
        if callback is not None:
            callback(j, x0)
        if j + 1 < len(s):
            x = x0 + math.sqrt(s[j + 1] ** 2 - sigma_min**2) * randn(shape, generator, device)
    return x0


def edm_sigmas(steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = 7.0) -> Tensor:
    """EDM sampling grid: ``steps`` Karras levels plus a trailing 0 (``get_sigmas_karras``)."""
    return torch.cat([karras_sigmas(steps, sigma_min, sigma_max, rho), torch.zeros(1)])


@torch.no_grad()
def sample_heun(
    denoiser: nn.Module,
    shape: Sequence[int],
    sigmas: Tensor | Sequence[float],
    *,
    generator: NoiseSource = None,
    device: str | torch.device = "cpu",
    clip: bool = True,
    clip_denoised: bool = False,
    **cond: Any,
) -> Tensor:
    """Deterministic EDM Heun sampler (Karras et al. 2022, Alg. 1); 2·(len(sigmas)-1) - 1 evaluations
    when ``sigmas`` ends with 0 (18 levels + 0 → 35 NFE).

    ``clip`` clamps the returned sample to [-1, 1]. ``clip_denoised`` (default **False**) also clamps every
    denoised estimate D(x, σ) to [-1, 1] before it enters the ODE step. EDM's own sampler (and its published
    FIDs) does not clamp; the CM reference code's ``karras_sample`` does by default (``clip_denoised=True``,
    also when it samples its EDM teachers). The default keeps EDM's sampler, with which cmkit's teacher figures
    and benchmarks were made."""
    return _ode_sample(denoiser, shape, sigmas, generator, device, clip, clip_denoised, heun=True, **cond)


@torch.no_grad()
def sample_euler(
    denoiser: nn.Module,
    shape: Sequence[int],
    sigmas: Tensor | Sequence[float],
    *,
    generator: NoiseSource = None,
    device: str | torch.device = "cpu",
    clip: bool = True,
    clip_denoised: bool = False,
    **cond: Any,
) -> Tensor:
    """Euler sampler for the PF-ODE; len(sigmas) - 1 evaluations. ``clip`` and ``clip_denoised`` (default
    False) as in ``sample_heun``."""
    return _ode_sample(denoiser, shape, sigmas, generator, device, clip, clip_denoised, heun=False, **cond)


def _ode_sample(
    denoiser: nn.Module,
    shape: Sequence[int],
    sigmas: Tensor | Sequence[float],
    generator: NoiseSource,
    device: str | torch.device,
    clip: bool,
    clip_denoised: bool,
    heun: bool,
    **cond: Any,
) -> Tensor:
    s = torch.as_tensor(sigmas, dtype=torch.float32).tolist()
    if any(a <= b for a, b in zip(s, s[1:])):
        raise ValueError(f"σ values must be strictly decreasing, got {s}")
    D = _clamped(denoiser) if clip_denoised else denoiser
    B = shape[0]
    x = s[0] * randn(shape, generator, device)
    for t, t2 in zip(s, s[1:]):
        step = heun_step if heun and t2 > 0 else euler_step  # EDM Alg. 1: the last step, to σ = 0, is Euler
        x = step(D, x, torch.full((B,), t, device=device), torch.full((B,), t2, device=device), **cond)
    return x.clamp(-1, 1) if clip else x


def _clamped(denoiser: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """D(x, σ) clamped to [-1, 1] (the CM reference code's ``clip_denoised``)."""

    def clamped(x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        return denoiser(x, sigma, **cond).clamp(-1, 1)

    return clamped


@torch.no_grad()
def sample_progdist(
    denoiser: nn.Module,
    shape: Sequence[int],
    steps: int,
    *,
    generator: NoiseSource = None,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    device: str | torch.device = "cpu",
    clip: bool = True,
    **cond: Any,
) -> Tensor:
    """A progressively distilled model's sampler (``sample_progdist`` of the CM code): ``steps`` Euler steps
    down the (steps + 1)-level Karras grid from σ_max to σ_min, i.e. ``steps`` network evaluations."""
    return sample_euler(
        denoiser,
        shape,
        karras_sigmas(steps + 1, sigma_min, sigma_max),
        generator=generator,
        device=device,
        clip=clip,
        **cond,
    )


@torch.no_grad()
def sample_flowmap(
    model: nn.Module,
    shape: Sequence[int],
    sigmas: Sequence[float],
    *,
    generator: NoiseSource = None,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    device: str | torch.device = "cpu",
    clip: bool = True,
    **cond: Any,
) -> Tensor:
    """Deterministic flow-map sampling of a two-time model (MeanFlow or AYF, ``Precond(kind="meanflow")`` or
    ``"flowmap"``): from
    x = σ_0·z, jump σ_j → σ_{j+1} with ``model.flow_map`` and finally to 0, len(sigmas) evaluations and no
    fresh noise (MeanFlow's multistep sampler; the 1-step case is x0 = z_1 − u(z_1, 1, 0))."""
    s = validate_sigmas(sigmas, sigma_min, sigma_max)
    if not getattr(model, "is_flow_map", False):
        raise ValueError("the flowmap sampler needs a two-time model (model.precond=meanflow or flowmap)")
    flow_map = model.flow_map
    x = s[0] * randn(shape, generator, device)
    for sigma, sigma_to in zip(s, s[1:] + [0.0]):
        x = flow_map(x, sigma, sigma_to, **cond)
    return x.clamp(-1, 1) if clip else x


@dataclass(frozen=True)
class Sampler:
    """One entry of the sampler registry: which models it samples and what it costs."""

    models: str  # "consistency" (one- or two-time CMs), "diffusion" (EDM denoisers) or "flowmap"
    nfe: Callable[[int], int]  # network evaluations per image for ``steps``
    help: str


#: Every sampler by name, in one place (the CLI's --sampler, the config's sample.sampler and the web page read it).
SAMPLERS: dict[str, Sampler] = {
    "onestep": Sampler("consistency", lambda steps: 1, "one evaluation from σ_max (CM Algorithm 1 with N = 1)"),
    "multistep": Sampler("consistency", lambda steps: steps, "CM Algorithm 1 over a descending σ list"),
    "heun": Sampler("diffusion", lambda steps: 2 * steps - 1, "EDM's deterministic 2nd-order sampler (Algorithm 1)"),
    "euler": Sampler("diffusion", lambda steps: steps, "first-order probability-flow ODE steps"),
    "progdist": Sampler("diffusion", lambda steps: steps, "progressive distillation's DDIM student steps"),
    "flowmap": Sampler("flowmap", lambda steps: steps, "MeanFlow's two-time jumps σ_j → σ_{j+1}"),
}
SAMPLER_NAMES = tuple(SAMPLERS)


def nfe(sampler: str, steps: int) -> int:
    """Network evaluations of a sampler setting: onestep 1, multistep ``steps``, heun 2·steps-1, euler and
    progdist and flowmap ``steps``."""
    return SAMPLERS[sampler].nfe(steps)


def random_labels(n: int, num_classes: int, generator: NoiseSource, device: str | torch.device) -> Tensor:
    """Uniform class labels; per-sample generators give per-sample labels."""
    if isinstance(generator, (list, tuple)):
        return torch.stack([torch.randint(num_classes, (), generator=g) for g in generator]).to(device)
    return torch.randint(num_classes, (n,), generator=generator).to(device)


__all__ = [
    "sample_onestep",
    "sample_multistep",
    "sample_heun",
    "sample_euler",
    "sample_progdist",
    "sample_flowmap",
    "edm_sigmas",
    "per_sample_generators",
    "randn",
    "validate_sigmas",
    "nfe",
    "random_labels",
    "append_dims",
]
