"""The kinds of training run, in one table: each kind's config class and the task the loop runs for it.

A run config names its kind (``Config.kind == "denoiser"``; the autoencoder and consistency-decoder runs of
``cmkit.training.decoder_config``); presets, ``--resume`` and the loop look the kind up here and nowhere else.
The kinds are the kinds of model directory a run exports (``cmkit.formats.model_dir.MODEL_KINDS``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import RunConfig
from ..denoiser_config import Config
from ..errors import CmkitError
from .decoder import AutoencoderTask, DecoderTask
from .decoder_config import AutoencoderRunConfig, DecoderRunConfig
from .denoiser import DenoiserTask


@dataclass(frozen=True)
class RunKind:
    """One kind of run: its config class and its ``Task`` class (``cmkit.training.task``)."""

    config: type[RunConfig]
    task: type


RUN_KINDS: dict[str, RunKind] = {
    "denoiser": RunKind(Config, DenoiserTask),
    "autoencoder": RunKind(AutoencoderRunConfig, AutoencoderTask),
    "decoder": RunKind(DecoderRunConfig, DecoderTask),
}


def run_kind(kind: str) -> RunKind:
    """The entry of ``kind``, or one error line naming the kinds."""
    if kind not in RUN_KINDS:
        raise CmkitError(f"unknown kind of run {kind!r}; expected one of {', '.join(RUN_KINDS)}")
    return RUN_KINDS[kind]
