"""Training objectives. Each returns per-sample losses (B,); ``LossConfig.build`` (cmkit.config) picks one
by method name and passes the options the method takes (its constructor's parameters)."""
from __future__ import annotations

from .base import Loss, paired_passes, weighting
from .cd import CDLoss
from .ct import CTLoss
from .ect import ECTLoss
from .edm import EDMLoss
from .ict import ICTLoss
from .pd import PDLoss

LOSSES = {"edm": EDMLoss, "cd": CDLoss, "ct": CTLoss, "ict": ICTLoss, "ect": ECTLoss, "pd": PDLoss}


__all__ = ["Loss", "EDMLoss", "CDLoss", "CTLoss", "ICTLoss", "ECTLoss", "PDLoss", "LOSSES",
           "paired_passes", "weighting"]
