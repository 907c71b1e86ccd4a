"""Training objectives. Each returns per-sample losses (B,); ``LossConfig.build`` (cmkit.config) picks one
by method name and passes the options the method takes (its constructor's parameters)."""
from __future__ import annotations

from .base import paired_passes, weighting, Loss
from .cd import CDLoss
from .ct import CTLoss
from .ect import ECTLoss
from .edm import EDMLoss
from .ict import ICTLoss
from .meanflow import MeanFlowLoss
from .pd import PDLoss
from .scm import SCDLoss, SCTLoss
from .tcm import TCMLoss


LOSSES = {"edm": EDMLoss, "cd": CDLoss, "ct": CTLoss, "ict": ICTLoss, "ect": ECTLoss, "pd": PDLoss,
          "sct": SCTLoss, "scd": SCDLoss, "meanflow": MeanFlowLoss, "tcm": TCMLoss}
#: The preconditioning each method trains (``model.precond``).
PRECOND_OF = {"edm": "edm", "pd": "edm", "sct": "trigflow", "scd": "trigflow", "meanflow": "meanflow"}


__all__ = ["Loss", "EDMLoss", "CDLoss", "CTLoss", "ICTLoss", "ECTLoss", "PDLoss", "SCTLoss", "SCDLoss",
           "MeanFlowLoss", "TCMLoss", "LOSSES", "PRECOND_OF",
           "paired_passes", "weighting"]
