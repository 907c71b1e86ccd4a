"""Backbones F_θ(x_in, c_noise, class_labels) -> (B, C, H, W). Build one from a config with ``build_net``."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from .adm import ADMUNet
from .edm import DDPMpp, DhariwalUNet, NCSNpp
from .mlp import MLPNet
from .unet import UNet

ARCHS = {"unet": UNet, "mlp": MLPNet, "adm": ADMUNet, "ddpmpp": DDPMpp, "ncsnpp": NCSNpp, "dhariwal": DhariwalUNet}


def build_net(arch: str, **kwargs: Any) -> nn.Module:
    """Instantiate a backbone by name (``unet``, ``mlp``, ``adm``, or EDM's ``ddpmpp``, ``ncsnpp``, ``dhariwal``) with
    the config options it takes."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {sorted(ARCHS)}")
    params = inspect.signature(ARCHS[arch]).parameters
    return ARCHS[arch](**{k: v for k, v in kwargs.items() if k in params})


__all__ = ["UNet", "MLPNet", "ADMUNet", "DDPMpp", "NCSNpp", "DhariwalUNet", "build_net", "ARCHS"]
