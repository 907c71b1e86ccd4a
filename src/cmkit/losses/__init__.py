"""Training objectives, one file per method. Each returns per-sample losses (B,) and declares its options in
``OPTIONS`` beside its constructor (``cmkit.losses.options``); ``LossConfig`` (cmkit.denoiser_config) is derived
from those declarations and builds the loss of ``LOSSES[method]``. A new method is a new file here and a row in
``LOSSES`` (and in ``PRECOND_OF`` when it trains another preconditioning than the CM one)."""

from __future__ import annotations

from .ayf import AYFLoss
from .base import Loss, paired_passes, weighting
from .cd import CDLoss
from .cmt import CMTLoss
from .ct import CTLoss
from .ect import ECTLoss
from .edm import EDMLoss
from .ict import ICTLoss
from .lcm import LCMLoss
from .meanflow import MeanFlowLoss
from .pd import PDLoss
from .scm import SCDLoss, SCTLoss
from .tcm import TCMLoss

LOSSES = {
    "edm": EDMLoss,
    "cd": CDLoss,
    "ct": CTLoss,
    "ict": ICTLoss,
    "ect": ECTLoss,
    "pd": PDLoss,
    "sct": SCTLoss,
    "scd": SCDLoss,
    "meanflow": MeanFlowLoss,
    "tcm": TCMLoss,
    "cmt": CMTLoss,
    "lcm": LCMLoss,
    "ayf": AYFLoss,
}
#: The preconditioning each method trains (``model.precond``).
PRECOND_OF = {"edm": "edm", "pd": "edm", "sct": "trigflow", "scd": "trigflow", "meanflow": "meanflow", "ayf": "flowmap"}


__all__ = [
    "Loss",
    "EDMLoss",
    "CDLoss",
    "CTLoss",
    "ICTLoss",
    "ECTLoss",
    "PDLoss",
    "SCTLoss",
    "SCDLoss",
    "MeanFlowLoss",
    "TCMLoss",
    "CMTLoss",
    "LCMLoss",
    "AYFLoss",
    "LOSSES",
    "PRECOND_OF",
    "paired_passes",
    "weighting",
]
