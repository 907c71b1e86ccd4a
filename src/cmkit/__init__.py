"""cmkit: Consistency Models (CD, CT, iCT, ECT), zero-shot editing and the Consistency Decoder.

Calling convention everywhere: a denoiser/consistency function ``model(x, sigma, **cond) -> x0`` with
x: (B, C, H, W) and sigma: (B,) (or a scalar); samplers take σ values, never grid indices.
"""
from __future__ import annotations

from .checkpoint import load_model, read_model_dir, save_model_dir
from .config import Config
from .errors import CmkitError
from .losses import CDLoss, CTLoss, ECTLoss, EDMLoss, ICTLoss
from .precond import Precond, cm_scalings, edm_scalings
from .presets import PRESETS, get_config
from .sampling import (edm_sigmas, per_sample_generators, sample_euler, sample_heun, sample_multistep,
                       sample_onestep)
from .schedules import karras_sigmas
from . import train as _train_module  # the submodule loaded first: its later imports leave `cmkit.train` alone,
from .loop import Loop, dry_run, train  # which is this function (a first import after it would rebind the name)

del _train_module

__version__ = "0.1.0"

__all__ = ["Config", "CmkitError", "Precond", "cm_scalings", "edm_scalings", "karras_sigmas",
           "load_model", "read_model_dir", "save_model_dir", "CDLoss", "CTLoss", "ICTLoss", "ECTLoss", "EDMLoss",
           "sample_onestep", "sample_multistep", "sample_heun", "sample_euler", "edm_sigmas",
           "per_sample_generators", "PRESETS", "get_config", "Loop", "train", "dry_run"]
