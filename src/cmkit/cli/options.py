"""Command-line options shared by several ``cmkit`` commands, declared once here.

``cmkit sample``, ``cmkit eval --model`` and ``cmkit edit`` take the same sampling options
(:func:`add_sampling_options`); every command that writes a result takes ``-o/--out``
(:func:`add_output_option`); every command that runs a network takes ``--threads``
(:func:`add_threads_option`) and ``--device`` (:func:`add_device_option`). The values are checked by
``cmkit.inputs``, which the web page shares.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from .. import distributed as dist
from ..decoder.decoder import ConsistencyDecoder, LatentDecoder
from ..decoder.schedule import steps_to_schedule
from ..errors import CmkitError
from ..generate import Samples, sample_images, sample_to_npz
from ..inputs import DEVICE_HELP, parse_sigmas
from ..load import load_denoiser
from ..sampling import SAMPLERS

__all__ = ["add_sampling_options", "add_output_option", "add_threads_option", "add_device_option", "add_class_option"]


# an argparse.ArgumentParser or one of its argument groups (both have add_argument)
Container = Any


def _sampling_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of ``sample_images`` / ``sample_to_npz`` from the options of ``add_sampling_options``
    (a bad σ list is one line here, before any loading)."""
    return dict(
        sampler=args.sampler,
        steps=args.steps,
        sigmas=parse_sigmas(args.sigmas) if args.sigmas else None,
        classes=args.classes,
        seed=args.seed,
        batch_size=args.batch_size,
        device=args.device,
        bf16=args.bf16,
        guidance=getattr(args, "guidance", None),
        prompts=getattr(args, "prompt", None),
    )


def sample_from_args(args: argparse.Namespace) -> Samples:
    """``--model`` and the sampling options of ``add_sampling_options`` → images (``cmkit sample``, ``cmkit eval``)."""
    options = _sampling_options(args)
    model, cfg = load_denoiser(args.model, device=args.device)
    return sample_images(model, cfg, args.n, decoder=latent_decoder_from_args(args), **options)


#: the images of the preview grid a streamed sampling (``--npz``) writes with ``-o``
PREVIEW_IMAGES = 256


def sample_npz_from_args(args: argparse.Namespace, npz: Path, grid: int = 0) -> Samples:
    """``--model`` and the sampling options → ``npz``, streamed in bounded memory and, under ``torchrun``, spread
    over the processes (``cmkit.generate.sample_to_npz``; each process on its own GPU). The returned images are
    the first ``grid`` (rank 0)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _, _, device = dist.init()
        if args.device.startswith("cuda") or device.type == "cpu":
            args.device = str(device)
    options = _sampling_options(args)
    model, cfg = load_denoiser(args.model, device=args.device)
    return sample_to_npz(model, cfg, args.n, npz, grid=grid, decoder=latent_decoder_from_args(args), **options)


def latent_decoder_from_args(args: argparse.Namespace) -> LatentDecoder | None:
    """``--decoder DIR --decoder-steps N`` → the consistency decoder of a latent model's samples, or None."""
    path = getattr(args, "decoder", None)
    if not path:
        return None
    if args.decoder_steps < 1:
        raise CmkitError(f"--decoder-steps must be at least 1, got {args.decoder_steps}")
    decoder = ConsistencyDecoder.from_pretrained(path, device=args.device, channels_last=False)
    return decoder.latent_decoder(steps_to_schedule(args.decoder_steps))


def add_threads_option(parser: Container) -> None:
    """``--threads N``: torch CPU threads for the work of the command (0: torch's default)."""
    parser.add_argument("--threads", type=int, default=0, metavar="N", help="torch CPU threads (0: torch's default)")


def add_device_option(parser: Container) -> None:
    """``--device``: where the network runs (default auto: a GPU when there is one); see :func:`check_device`."""
    parser.add_argument(
        "--device",
        default="auto",
        help=f"torch device: {DEVICE_HELP} (default auto: CUDA when available, else MPS, else cpu)",
    )


def add_output_option(
    parser: Container,
    *,
    help: str,
    required: bool = False,
    default: str | None = None,
    metavar: str | None = None,
    output_alias: bool = False,
) -> None:
    """``-o/--out`` (dest ``out``) for a command's output; ``output_alias`` also accepts the old ``--output``."""
    flags = ["-o", "--out"] + (["--output"] if output_alias else [])
    kw: dict[str, Any] = {"dest": "out", "help": help, "metavar": metavar}
    if required:
        kw["required"] = True
    else:
        kw["default"] = default
    parser.add_argument(*flags, **kw)


def add_sampling_options(
    parser: Container,
    *,
    group: Container | None = None,
    sampler: bool = True,
    batch_size: int | None = None,
    bf16: bool = True,
    device: bool = True,
    threads: bool = True,
    steps_default: int | None = None,
    steps_help: str = "number of sampling steps",
    sigmas_help: str = "explicit comma-separated descending σ list, e.g. 80,0.8 (instead of --steps)",
    seed_help: str = "random seed (default 0)",
) -> None:
    """Add the sampling options shared by ``sample``, ``eval --model`` and ``edit``.

    Always: ``--steps``, ``--sigmas`` (parse with :func:`parse_sigmas`) and ``--seed``. Optional groups, for the
    commands that have them: ``--sampler`` and ``--guidance`` (``sampler``), ``--batch-size`` (pass its default
    as ``batch_size``; None leaves it out), ``--bf16``, and the runtime options ``--device`` and ``--threads``.
    The sampling options go into ``group`` when given (an argument group of ``parser``); ``--device``/``--threads``
    always go into ``parser`` itself since they govern all of the command's work.
    """
    g = group if group is not None else parser
    g.add_argument("--steps", type=int, default=steps_default, help=steps_help)
    g.add_argument("--sigmas", help=sigmas_help)
    if sampler:
        g.add_argument("--sampler", choices=SAMPLERS, help="sampler (default: by model)")
        g.add_argument(
            "--guidance",
            type=float,
            metavar="W",
            help="guidance scale w: the input of a guidance-distilled (LCM) model (default: the model's "
            "sample.guidance), or classifier-free guidance of a class-conditional diffusion model trained with "
            "label dropout (default 1: unguided; each step then costs two network evaluations)",
        )
        g.add_argument(
            "--prompt",
            action="append",
            metavar="TEXT",
            help="a text-to-image pipeline directory (Stable Diffusion, LCM): the prompt; repeat it for several, "
            "cycled over the images (needs transformers: pip install 'cmkit[sd]')",
        )
        g.add_argument(
            "--decoder",
            metavar="DIR",
            help="a latent model (latent.autoencoder): decode its samples with this consistency decoder (a "
            "`cmkit train --preset fmnist-cdec` run or model directory) instead of the autoencoder's decoder",
        )
        g.add_argument(
            "--decoder-steps",
            type=int,
            default=1,
            metavar="N",
            help="steps of the consistency decoder (default 1; evenly spaced fractions of its schedule)",
        )
    g.add_argument("--seed", type=int, default=0, help=seed_help)
    if batch_size is not None:
        g.add_argument("--batch-size", type=int, default=batch_size, help=f"images per batch (default {batch_size})")
    if bf16:
        g.add_argument("--bf16", action="store_true", help="run the network under bfloat16 autocast (faster on CPU)")
    if device:
        add_device_option(parser)
    if threads:
        add_threads_option(parser)


def add_class_option(parser: Container) -> None:
    """``--class 207`` (every image) or ``--classes 0,1,2`` (cycled over the images) for class-conditional models."""
    parser.add_argument(
        "--class",
        "--classes",
        dest="classes",
        metavar="C[,C...]",
        help="class label(s) of a class-conditional model: one for every image, or a list cycled "
        "over them (default: random labels from the seeds)",
    )
