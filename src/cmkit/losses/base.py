"""What every training objective shares: the loss interface, λ(σ) weightings and shared dropout RNG."""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ..schedules import SIGMA_DATA
from ..tensors import get_rng_state, set_rng_state


class Loss(Protocol):
    """A training objective. ``__call__`` returns per-sample losses (B,).

    ``target_mu(step)``: the target network's EMA rate μ, or ``None`` when there is no separate target
    network: the target is stopgrad(θ), the online network evaluated without gradients (iCT, ECT,
    CM CIFAR-10 CD), or there is no second pass at all (EDM). Noise and σ indices come from the global
    torch RNG (seeded per process and saved in every checkpoint), which also drives dropout.
    """

    needs_teacher: bool

    def target_mu(self, step: int) -> float | None: ...

    def stats(self, step: int) -> dict[str, float]: ...

    def __call__(
        self,
        model: nn.Module,
        x0: Tensor,
        *,
        step: int,
        target: nn.Module | None = None,
        teacher: nn.Module | None = None,
        **cond: Any,
    ) -> Tensor: ...


#: λ(σ) names shared by the discrete-time objectives (``weighting``).
WEIGHTINGS = ("uniform", "snr", "snr+1", "karras", "truncated-snr")


def weighting(name: str, sigma: Tensor, sigma_data: float = SIGMA_DATA) -> Tensor:
    """λ(σ) from the CM code's ``get_weightings`` (snr = σ^-2), evaluated at the larger σ."""
    snr = sigma.float() ** -2
    if name == "uniform":
        return torch.ones_like(snr)
    if name == "snr":
        return snr
    if name == "snr+1":
        return snr + 1
    if name == "karras":
        return snr + 1 / sigma_data**2
    if name == "truncated-snr":
        return snr.clamp(min=1)
    raise ValueError(f"unknown weighting {name!r}; expected uniform, snr, snr+1, karras or truncated-snr")


def paired_passes(
    model: nn.Module, target: nn.Module, a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor], **cond: Any
) -> tuple[Tensor, Tensor]:
    """Student f_θ(*a) with gradients and target stopgrad f_θ⁻(*b), with the *same* dropout masks.

    The RNG is restored between the passes, so dropout>0 (iCT, ECT) draws identical masks in both.
    """
    state = get_rng_state(a[0].device)
    pred = model(*a, **cond)
    set_rng_state(a[0].device, state)
    with torch.no_grad():
        tgt = target(*b, **cond)
    return pred, tgt.detach()
