"""Command-line options shared by several ``cmkit`` commands, declared once here.

``cmkit sample``, ``cmkit eval --model`` and ``cmkit edit`` take the same sampling options
(:func:`add_sampling_options`); every command that writes a result takes ``-o/--out``
(:func:`add_output_option`); every command that runs a network takes ``--threads``
(:func:`add_threads_option`, applied by :func:`apply_threads`). ``--sigmas`` is parsed by
:func:`parse_sigmas` everywhere.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .errors import CmkitError

__all__ = ["parse_sigmas", "add_sampling_options", "add_output_option", "add_threads_option", "add_device_option",
           "apply_threads", "refuse_existing"]

# an argparse.ArgumentParser or one of its argument groups (both have add_argument)
Container = Any


def parse_sigmas(text: str) -> list[float]:
    """'80,0.8' → [80.0, 0.8]. Blank entries are skipped; raises ``CmkitError`` (one line) for anything else
    that is not a list of positive finite numbers. Order and range are checked where the model is known."""
    example = "comma-separated numbers like 80,0.8"
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CmkitError(f"--sigmas expects {example}; got {text!r}") from None
    if not values:
        raise CmkitError(f"--sigmas is empty; give {example}")
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise CmkitError(f"--sigmas values must be positive finite numbers; got {text!r}")
    return values


def add_threads_option(parser: Container) -> None:
    """``--threads N``: torch CPU threads for the work of the command (0: torch's default)."""
    parser.add_argument("--threads", type=int, default=0, metavar="N", help="torch CPU threads (0: torch's default)")


def apply_threads(threads: int | None) -> None:
    """Apply ``--threads``: ``torch.set_num_threads`` when it is > 0; negative values are a user error."""
    if threads is None or threads == 0:
        return
    if threads < 0:
        raise CmkitError(f"--threads must be 0 (torch's default) or a positive count; got {threads}")
    import torch

    torch.set_num_threads(threads)


def add_device_option(parser: Container) -> None:
    """``--device``: where the network runs (default cpu)."""
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")


def add_output_option(parser: Container, *, help: str, required: bool = False, default: str | None = None,
                      metavar: str | None = None, output_alias: bool = False) -> None:
    """``-o/--out`` (dest ``out``) for a command's output; ``output_alias`` also accepts the old ``--output``."""
    flags = ["-o", "--out"] + (["--output"] if output_alias else [])
    kw: dict[str, Any] = {"dest": "out", "help": help, "metavar": metavar}
    if required:
        kw["required"] = True
    else:
        kw["default"] = default
    parser.add_argument(*flags, **kw)


def add_sampling_options(parser: Container, *, group: Container | None = None, sampler: bool = True,
                         batch_size: int | None = None, bf16: bool = True, device: bool = True,
                         threads: bool = True, steps_default: int | None = None,
                         steps_help: str = "number of sampling steps",
                         sigmas_help: str = "explicit comma-separated descending σ list, e.g. 80,0.8 "
                                            "(instead of --steps)",
                         seed_help: str = "random seed (default 0)") -> None:
    """Add the sampling options shared by ``sample``, ``eval --model`` and ``edit``.

    Always: ``--steps``, ``--sigmas`` (parse with :func:`parse_sigmas`) and ``--seed``. Optional groups, for the
    commands that have them: ``--sampler`` (``sampler``), ``--batch-size`` (pass its default as ``batch_size``;
    None leaves it out), ``--bf16``, and the runtime options ``--device`` and ``--threads``. The sampling options
    go into ``group`` when given (an argument group of ``parser``); ``--device``/``--threads`` always go into
    ``parser`` itself since they govern all of the command's work.
    """
    g = group if group is not None else parser
    g.add_argument("--steps", type=int, default=steps_default, help=steps_help)
    g.add_argument("--sigmas", help=sigmas_help)
    if sampler:
        from .generate import SAMPLERS

        g.add_argument("--sampler", choices=SAMPLERS, help="sampler (default: by model)")
    g.add_argument("--seed", type=int, default=0, help=seed_help)
    if batch_size is not None:
        g.add_argument("--batch-size", type=int, default=batch_size, help=f"images per batch (default {batch_size})")
    if bf16:
        g.add_argument("--bf16", action="store_true", help="run the network under bfloat16 autocast (faster on CPU)")
    if device:
        add_device_option(parser)
    if threads:
        add_threads_option(parser)


def refuse_existing(path: str | None, overwrite: bool) -> None:
    """Refuse to replace an existing output file unless --overwrite (checked before any work)."""
    if path and Path(path).exists() and not overwrite:
        raise CmkitError(f"{path} exists; pass --overwrite to replace it")

