"""Training objectives. Each returns per-sample losses (B,); ``build_loss`` picks one by method name."""
from __future__ import annotations

from typing import Any

from .base import Loss, paired_passes, weighting
from .cd import CDLoss
from .ct import CTLoss
from .ect import ECTLoss
from .edm import EDMLoss
from .ict import ICTLoss

LOSSES = {"edm": EDMLoss, "cd": CDLoss, "ct": CTLoss, "ict": ICTLoss, "ect": ECTLoss}


def build_loss(method: str, **kwargs: Any) -> Loss:
    """Instantiate the loss for ``method`` (edm, cd, ct, ict, ect) with options from the config."""
    if method not in LOSSES:
        raise ValueError(f"unknown method {method!r}; expected one of {sorted(LOSSES)}")
    return LOSSES[method](**kwargs)


__all__ = ["Loss", "EDMLoss", "CDLoss", "CTLoss", "ICTLoss", "ECTLoss", "LOSSES", "build_loss",
           "paired_passes", "weighting"]
