"""Activation checkpointing of the backbones' blocks (``model.checkpointing``).

Every residual and attention block of the UNet, ADM and EDM networks is a ``Block``. With checkpointing on, a
block keeps only its inputs in the forward pass and recomputes its activations in the backward pass
(``torch.utils.checkpoint``, non-reentrant; the RNG state is replayed, so dropout draws the same masks): the
gradients are the same, peak memory falls to about one block's activations plus the inputs of every block, and a
step costs one more forward pass. It applies only where gradients are recorded; the JVP passes of sCM and MeanFlow
(under ``torch.no_grad``) and sampling are unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


class Block(nn.Module):
    """A network block whose activations can be recomputed in the backward pass instead of stored."""

    checkpointing: bool = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(super().__call__, *args, use_reentrant=False, **kwargs)
        return super().__call__(*args, **kwargs)


def set_checkpointing(model: nn.Module, on: bool = True) -> int:
    """Turn activation checkpointing of every ``Block`` in ``model`` on or off; returns how many blocks it set."""
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for m in blocks:
        m.checkpointing = on
    return len(blocks)


def pixel_attention(
    x: Tensor, qkv: nn.Module, proj: nn.Module, heads: int, layout: str = "three", fp32: bool = False
) -> Tensor:
    """proj(softmax(q·kᵀ/√d)·v) over the H·W pixels of ``x`` (B, C, H, W) → (B, C, H, W), without the residual.

    ``qkv`` (C → 3C) and ``proj`` (C → C) are 1×1 convolutions (``weight`` (out, in, 1, 1), ``bias``), applied here
    as matmuls over (B, HW, C) so that q, k and v reach ``scaled_dot_product_attention`` with the head dimension
    contiguous: PyTorch's fused (flash) kernel then runs on the CPU as well, where strided inputs fall back to the
    math path that materialises the HW × HW matrix (measured on ImageNet-64's ADM: attention 2.8 s → 0.77 s per
    batch of 4 on one thread, and the memory of the matrix). ``layout`` orders qkv's 3C output channels:
    ``"three"`` = (three, heads, head_dim) as ADM and the CM code, ``"interleaved"`` = (heads, head_dim, three) as
    EDM. ``fp32`` computes the attention in fp32 under autocast (EDM). The fused kernel has no forward-mode
    derivative: a JVP through these blocks needs SDPA's math kernel, which ``cmkit.jvp`` selects.
    """
    b, c, h, w = x.shape
    weight, bias = qkv.weight.flatten(1), qkv.bias
    if layout == "interleaved":  # the rows reordered to (three, heads, head_dim)
        weight = weight.view(heads, c // heads, 3, c).permute(2, 0, 1, 3).reshape(3 * c, c)
        bias = None if bias is None else bias.view(heads, c // heads, 3).permute(2, 0, 1).reshape(3 * c)
    elif layout != "three":
        raise ValueError(f"unknown qkv layout {layout!r}; expected 'three' or 'interleaved'")
    pixels = x.flatten(2).transpose(1, 2)  # (B, HW, C)
    q, k, v = F.linear(pixels, _like(weight, x), _like(bias, x)).view(b, h * w, 3, heads, -1).permute(2, 0, 3, 1, 4)
    if fp32:
        q, k, v = q.float(), k.float(), v.float()
    a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, h * w, c).to(x.dtype)
    out = F.linear(a, _like(proj.weight.flatten(1), x), _like(proj.bias, x))
    return out.transpose(1, 2).reshape(b, c, h, w)


def _like(t: Tensor | None, x: Tensor) -> Tensor | None:
    return None if t is None else t.to(x.dtype)
