"""One probability-flow ODE step dx/dσ = (x - D(x, σ))/σ from σ=t to σ=t2, for CD targets (CM Alg. 2).

``denoiser`` follows the library convention D(x, sigma, **cond) -> x0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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
