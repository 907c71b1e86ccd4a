"""Directional (time) derivatives of a network for the continuous-time objectives (sCM, MeanFlow).

``directional_derivative(fn, primals, tangents)`` returns ``(fn(*primals), d/dh fn(primals + h·tangents)|_{h=0})``
with one of two methods, chosen per run (``loss.jvp``):

- ``"jvp"``: forward-mode AD (``torch.func.jvp``), exact. Attention runs the math SDPA kernel, which has
  forward-mode derivatives (the fused flash/flex kernels do not: pytorch #165517, #154332).
- ``"fd"``: a central difference (f(p + h·v) − f(p − h·v)) / 2h, as FastGen's ``use_jvp_finite_diff``;
  two plain forward passes, O(h²) truncation error, for backbones or kernels without forward-mode AD.

Both run in fp32 with autocast off whatever the run's precision (the tangents, and the time arithmetic they
carry, lose too much in bf16), and without building an autograd graph:
the objectives use the derivative only inside a stop-gradient target. Keeping the trainable pass outside the
transform is also what keeps DDP's gradient synchronisation intact (``torch.func`` bypasses DDP's hooks;
py-meanflow's caveat): the network evaluated here is always the bare module, never the DDP wrapper.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import Literal

import torch
from torch import Tensor

from .tensors import at_least_fp32, get_rng_state, set_rng_state

JVPMode = Literal["jvp", "fd"]
JVP_MODES = ("jvp", "fd")


def math_attention() -> ExitStack:
    """A context that restricts SDPA to the math kernel (forward-mode AD support)."""
    stack = ExitStack()
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
    except ImportError:  # older torch: the CPU default already has forward-mode derivatives
        pass
    return stack


def directional_derivative(
    fn: Callable[..., Tensor],
    primals: Sequence[Tensor],
    tangents: Sequence[Tensor],
    mode: JVPMode = "jvp",
    fd_step: float = 1e-4,
) -> tuple[Tensor, Tensor]:
    """``(fn(*primals), J_fn(primals)·tangents)`` in fp32 (fp64 inputs stay fp64), without gradients.

    Args:
        fn: a function of tensors (e.g. ``lambda x, t: net(x, t)``), deterministic given the global RNG
            state (dropout masks are replayed by the callers for the fd passes).
        primals, tangents: matching tensors; both are cast to fp32.
        mode: ``"jvp"`` (forward-mode AD) or ``"fd"`` (central difference with step ``fd_step``).
    """
    if mode not in JVP_MODES:
        raise ValueError(f"unknown derivative mode {mode!r}; expected 'jvp' or 'fd'")
    primals = tuple(at_least_fp32(p.detach()) for p in primals)
    tangents = tuple(at_least_fp32(v.detach()) for v in tangents)
    device = primals[0].device.type
    with torch.no_grad(), torch.autocast(device, enabled=False), math_attention():
        if mode == "jvp":
            out, dout = torch.func.jvp(fn, primals, tangents)
            return out, dout

        state = get_rng_state(primals[0].device)  # the same dropout masks in all three passes
        out = fn(*primals)
        set_rng_state(primals[0].device, state)
        plus = fn(*(p + fd_step * v for p, v in zip(primals, tangents)))
        set_rng_state(primals[0].device, state)
        minus = fn(*(p - fd_step * v for p, v in zip(primals, tangents)))
        return out, (plus - minus) / (2 * fd_step)
