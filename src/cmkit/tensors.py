"""Tensor helpers every layer uses: broadcasting σ over a batch, fp32 promotion, and the RNG state that drives
dropout (captured and restored so that a student and its target, or a JVP's primal and tangent passes, see the
same dropout masks), and the evaluation-mode context in which a network is read rather than trained."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


def append_dims(x: Tensor, ndim: int) -> Tensor:
    """Append trailing singleton dims so that a (B,) tensor broadcasts against (B, C, H, W)."""
    if x.ndim > ndim:
        raise ValueError(f"cannot broadcast a {x.ndim}-d tensor to {ndim} dims")
    return x.reshape(*x.shape, *([1] * (ndim - x.ndim)))


def at_least_fp32(x: Tensor) -> Tensor:
    """x in fp32, or in its own dtype when that is wider (fp64 stays fp64: the JVP-vs-difference checks use it)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def as_sigma(sigma: Tensor | float, batch: int, device: torch.device) -> Tensor:
    """σ as a float32 tensor of shape (B,), the form used at every API boundary."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=device)
    if sigma.ndim == 0:
        sigma = sigma.expand(batch)
    if sigma.shape != (batch,):
        raise ValueError(f"sigma must be a scalar or shape ({batch},), got {tuple(sigma.shape)}")
    return sigma


def get_rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    """Capture the RNG that drives dropout on ``device`` (CPU, plus CUDA when used), so that a student and its
    target see the same dropout masks, as the CM code's paired passes do."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def set_rng_state(device: torch.device, state: tuple[Tensor, Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode (no dropout draw) under ``torch.no_grad``; its train/eval flag is restored after."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was)
