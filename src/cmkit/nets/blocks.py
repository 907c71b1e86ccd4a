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
from torch import nn
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
