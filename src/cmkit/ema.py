"""Exponential moving averages: evaluation EMAs and the CM target network θ⁻ ← μθ⁻ + (1-μ)θ."""

from __future__ import annotations

import copy

import torch
from torch import nn


def make_copy(model: nn.Module) -> nn.Module:
    """A frozen deep copy (EMA or target network); no gradient ever reaches it."""
    m = copy.deepcopy(model)
    m.requires_grad_(False)
    return m


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, rate: float) -> None:
    """ema ← rate·ema + (1 - rate)·model for parameters; buffers are copied. rate = 0 copies."""
    e_params, m_params = list(ema.parameters()), list(model.parameters())
    if rate == 0:
        torch._foreach_copy_(e_params, [p.detach() for p in m_params])
    else:
        torch._foreach_lerp_(e_params, [p.detach() for p in m_params], 1 - rate)
    for eb, mb in zip(ema.buffers(), model.buffers()):
        eb.copy_(mb)
