"""What the loop (``cmkit.training.loop``) needs from one kind of run: the ``Task`` protocol, and the ``Context``
(device, rank, world size) every task is built with. The tasks are ``cmkit.training.denoiser.DenoiserTask`` and
the autoencoder and decoder tasks of ``cmkit.training.decoder``; ``cmkit.training.kinds`` maps kinds to them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Context:
    """Where a task runs: its device and its place among the processes."""

    device: torch.device
    rank: int = 0
    world: int = 1


class Task(Protocol):
    """What the loop needs from one kind of run.

    Optional, for a task whose exported network is not the trained module itself (a LoRA run):
    ``export_module(model) -> nn.Module`` (what the model directory holds) and ``export_files(model)`` (safetensors
    files written beside it: name → tensors). Optional, for a task that trains a second network (rCM's fake
    score): ``param_groups() -> list[dict]`` (further optimizer groups; ``lr_scale`` multiplies the step's lr) and
    ``trains_model(step) -> bool`` (False on a step that updates only those: the model's EMAs stay)."""

    name: str  # progress-bar label
    model: nn.Module  # the trained (online) network θ

    @staticmethod
    def build_model(cfg: Any) -> nn.Module:
        """The freshly initialised network of a config (no data, no weights files)."""
        ...

    @staticmethod
    def build_loss(cfg: Any) -> Any:
        """The loss object of a config (no data, no weights files)."""
        ...

    def loss(
        self, net: nn.Module, step: int, generator: torch.Generator, micro: int = 0
    ) -> tuple[Tensor, dict[str, float]]:
        """Mean loss of this process's batch at ``step``, or of its microbatch ``micro`` of ``train.accum``
        (``net`` is ``model``, DDP-wrapped when distributed), and extra values to log."""
        ...

    def after_update(self, step: int) -> None:
        """Work after a successful update and the EMAs (e.g. a target network); ``step`` is the one just done."""
        ...

    def extra_modules(self) -> dict[str, nn.Module]:
        """Modules besides the model and its EMAs that a checkpoint must hold (e.g. ``target``)."""
        ...

    def export_config(self) -> tuple[str, dict[str, Any], dict[str, Any]]:
        """(kind, model config, extra config.json entries) of the exported model directory."""
        ...

    def sample(self, model: nn.Module, out: Path, step: int) -> None:
        """Write sample grids of ``model`` (the first EMA) into ``out``."""
        ...
