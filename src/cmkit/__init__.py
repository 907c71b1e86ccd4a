"""cmkit: consistency models (CD, CT, iCT, ECT, sCM, MeanFlow, TCM; EDM teachers and progressive distillation),
zero-shot editing and the Consistency Decoder.

Calling convention everywhere: a denoiser/consistency function ``model(x, sigma, **cond) -> x0`` with
x: (B, C, H, W) and sigma: (B,) (or a scalar); samplers take σ values, never grid indices.
"""

from __future__ import annotations

from .denoiser_config import Config
from .errors import CmkitError
from .formats.model_dir import read_model_dir, save_model_dir
from .load import load_model
from .losses import CDLoss, CTLoss, ECTLoss, EDMLoss, ICTLoss, MeanFlowLoss, PDLoss, SCDLoss, SCTLoss, TCMLoss
from .precond import Precond, cm_scalings, edm_scalings
from .sampling import edm_sigmas, per_sample_generators, sample_euler, sample_heun, sample_multistep, sample_onestep
from .schedules import karras_sigmas
from .training.loop import Loop, dry_run, train
from .training.presets import PRESETS, get_config

__version__ = "0.1.0"

__all__ = [
    "Config",
    "CmkitError",
    "Precond",
    "cm_scalings",
    "edm_scalings",
    "karras_sigmas",
    "load_model",
    "read_model_dir",
    "save_model_dir",
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
    "sample_onestep",
    "sample_multistep",
    "sample_heun",
    "sample_euler",
    "edm_sigmas",
    "per_sample_generators",
    "PRESETS",
    "get_config",
    "Loop",
    "train",
    "dry_run",
]
