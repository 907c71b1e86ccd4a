"""TrigFlow (Lu & Song 2025, "Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models", §2)
and its exact correspondence with EDM's σ parameterisation.

TrigFlow noises data as x_t = cos t·x0 + sin t·z with z ~ N(0, σ_d² I), t ∈ [0, π/2]. Dividing by cos t gives
EDM's x_σ = x0 + σ·ε with σ = σ_d·tan t, so every cmkit denoiser ``model(x_σ, σ)`` is a TrigFlow model too:

    t = arctan(σ / σ_d),   x_t = cos t · x_σ,   f_θ(x_t, t) = cos t·x_t − sin t·σ_d·F_θ(x_t/σ_d, t)

and f_θ written in x_σ is c_skip·x_σ − c_out·F_θ with EDM's c_skip = σ_d²/(σ²+σ_d²), c_out = σσ_d/√(σ²+σ_d²),
c_in = 1/√(σ²+σ_d²) (so x_t/σ_d = c_in·x_σ). ``Precond(kind="trigflow")`` therefore uses EDM's scalings with
the backbone's output read as −F_θ and the noise input c_noise(t) = t; the boundary f(x, 0) = x is exact.
All time arithmetic here runs in fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import noise
from .tensors import append_dims


def t_from_sigma(sigma: Tensor, sigma_data: float) -> Tensor:
    """TrigFlow time t = arctan(σ/σ_d) ∈ [0, π/2) of EDM noise level σ."""
    return torch.atan(sigma.float() / sigma_data)


def sigma_from_t(t: Tensor, sigma_data: float) -> Tensor:
    """EDM noise level σ = σ_d·tan t of TrigFlow time t."""
    return sigma_data * torch.tan(t.float())


def x_t_from_x_sigma(x_sigma: Tensor, sigma: Tensor, sigma_data: float) -> Tensor:
    """x_t = cos t · x_σ (x_σ = x0 + σε is EDM's noisy sample)."""
    return append_dims(torch.cos(t_from_sigma(sigma, sigma_data)), x_sigma.ndim) * x_sigma


def velocity_from_denoiser(x_t: Tensor, t: Tensor, x0_hat: Tensor) -> Tensor:
    """The PF-ODE velocity dx_t/dt = (cos t·x_t − D(x_σ, σ)) / sin t from an EDM denoiser's estimate D.

    Derivation: with x_t = cos t·x_σ and EDM's dx_σ/dσ = (x_σ − D)/σ, dσ/dt = σ_d/cos² t. For the exact
    denoiser D = x0 this is cos t·z − sin t·x0, TrigFlow's velocity (sCD's teacher in §12.2).
    """
    t = append_dims(t.float(), x_t.ndim)
    return (torch.cos(t) * x_t.float() - x0_hat.float()) / torch.sin(t)


def lognormal_t(
    batch: int,
    P_mean: float,
    P_std: float,
    sigma_data: float,
    device: torch.device | str,
    generator: torch.Generator | None = None,
) -> Tensor:
    """sCM's proposal (§12.1): τ ~ N(P_mean, P_std²), t = arctan(e^τ / σ_d) — log-normal in σ = σ_d tan t."""
    tau = (
        torch.randn(batch, device=device, generator=generator) if generator is not None else noise.randn(batch, device)
    ) * P_std + P_mean
    return torch.atan(tau.exp() / sigma_data)
