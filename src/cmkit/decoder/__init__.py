"""OpenAI's Consistency Decoder for Stable Diffusion 1.x/2.x latents (reference: docs/decoder.md).

* ``ConsistencyDecoder``: ``from_pretrained(path)`` + ``decode(latents, schedule=(1.0, 0.5), generator=None)``.
* ``DecoderUNet`` / ``DecoderConfig``: the 621,277,702-parameter network, or a tiny one (``DecoderConfig.tiny()``).
* ``load_weights`` / ``convert_decoder``: diffusers safetensors, OpenAI's TorchScript ``decoder.pt``, cmkit format.
* ``train.py``: the loop's tasks that train a decoder for any latent autoencoder (``cmkit train --preset
  fmnist-cdec``) and the small KL autoencoder itself (``cmkit.nets.autoencoder``; ``--preset fmnist-ae``).
* ``cli.add_cli(subparsers)``: the ``decode`` and ``convert-decoder`` subcommands.
"""

from __future__ import annotations

from ..formats.torchscript import OPENAI_DECODER_SHA256
from .config import SD_LATENT_MEAN, SD_LATENT_STD, SD_SCALING_FACTOR, DecoderConfig
from .decoder import DEFAULT_SCHEDULE, ConsistencyDecoder
from .schedule import DecoderSchedule, steps_to_schedule
from .unet import DecoderUNet
from .weights import DecoderWeights, convert_decoder, load_weights, save_cmkit

__all__ = [
    "ConsistencyDecoder",
    "DecoderConfig",
    "DecoderSchedule",
    "DecoderUNet",
    "DecoderWeights",
    "DEFAULT_SCHEDULE",
    "OPENAI_DECODER_SHA256",
    "SD_LATENT_MEAN",
    "SD_LATENT_STD",
    "SD_SCALING_FACTOR",
    "convert_decoder",
    "load_weights",
    "save_cmkit",
    "steps_to_schedule",
]
