"""Backbones F_θ(x_in, c_noise, class_labels) -> (B, C, H, W). Build one from a config with ``build_net``."""
from __future__ import annotations

from typing import Any

from torch import nn

from .mlp import MLPNet
from .unet import UNet

ARCHS = {"unet": UNet, "mlp": MLPNet}


def build_net(arch: str, **kwargs: Any) -> nn.Module:
    """Instantiate a backbone by name (``unet`` or ``mlp``) with keyword arguments from the config."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {sorted(ARCHS)}")
    return ARCHS[arch](**kwargs)


__all__ = ["UNet", "MLPNet", "build_net", "ARCHS"]
