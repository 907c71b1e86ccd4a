"""Probability-flow ODE solvers dx/dσ = (x - D(x, σ))/σ for training targets: one step from σ=t to σ=t2 (CD
targets, CM Alg. 2) and a whole multistep trajectory (CMT's mid-training targets).

``denoiser`` follows the library convention D(x, sigma, **cond) -> x0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .tensors import append_dims

Denoiser = Callable[..., Tensor]


def euler_step(denoiser: Denoiser, x: Tensor, t: Tensor, t2: Tensor, **cond: Any) -> Tensor:
    """x_{t2} = x_t + (t2 - t)·(x_t - D(x_t, t))/t. With D = x0 (CT) this is x0 + t2·z."""
    t_, t2_ = append_dims(t, x.ndim), append_dims(t2, x.ndim)
    d = (x - denoiser(x, t, **cond)) / t_
    return x + (t2_ - t_) * d


def heun_step(denoiser: Denoiser, x: Tensor, t: Tensor, t2: Tensor, **cond: Any) -> Tensor:
    """Heun (2nd order) step used by the CM reference code (``heun_solver``); requires t2 > 0."""
    t_, t2_ = append_dims(t, x.ndim), append_dims(t2, x.ndim)
    d = (x - denoiser(x, t, **cond)) / t_
    x_mid = x + (t2_ - t_) * d
    d2 = (x_mid - denoiser(x_mid, t2, **cond)) / t2_
    return x + (t2_ - t_) * (d + d2) / 2


SOLVERS = {"euler": euler_step, "heun": heun_step}


def log_sigmas(steps: int, sigma_max: float, sigma_min: float) -> Tensor:
    """``steps`` + 1 levels uniform in log σ (uniform in log-SNR = −2 log σ) from σ_max down to σ_min."""
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), steps + 1, dtype=torch.float64).exp().float()


def dpm_solver_2m(denoiser: Denoiser, x: Tensor, sigmas: Tensor, **cond: Any) -> list[Tensor]:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) on the PF-ODE in σ-space: the states x(σ_0), …, x(σ_n).

    With λ = −log σ and h_i = λ_{i+1} − λ_i, one data-prediction step is x_{i+1} = (σ_{i+1}/σ_i)·x_i +
    (1 − σ_{i+1}/σ_i)·D̂_i, where D̂_0 = D(x_0, σ_0) (first order: the Euler step) and, after it,
    D̂_i = (1 + 1/(2r))·D_i − 1/(2r)·D_{i−1} with r = h_{i−1}/h_i: second order for one evaluation per step.
    ``sigmas`` (descending, all > 0) are shared by the batch.
    """
    states, prev = [x], None
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = denoiser(x, s.expand(x.shape[0]).to(x.device), **cond).to(x.dtype)
        d_hat = d
        if prev is not None:
            r = (torch.log(sigmas[i - 1] / s) / torch.log(s / s_next)).item()
            d_hat = (1 + 1 / (2 * r)) * d - (1 / (2 * r)) * prev
        x = (s_next / s) * x + (1 - s_next / s) * d_hat
        states.append(x)
        prev = d
    return states
