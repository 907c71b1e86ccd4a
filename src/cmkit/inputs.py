"""Checks of user-given values, shared by the command line and the web page: counts, seeds, noise levels,
devices, thread counts, class labels and output paths. Each raises one ``CmkitError`` line that names the option
(``--steps``, ``-o``) and what was expected, before any work starts; an existing output is never replaced
without ``--overwrite``."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from .config import max_threads
from .errors import CmkitError
from .imageio import numbered_paths

#: file types a PNG grid may also be written as (Pillow writes each without extra plugins)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


#: seeds are torch generator seeds; sample i of a command uses seed + i
MAX_SEED = 2**63 - 1


#: upper bounds of counts, far above any useful value; they turn a typo (or 1e20) into one line, not a hang
MAX_STEPS = 10_000  # --steps of a sampler or editor (network evaluations per image)


MAX_IMAGES = 10_000_000  # -n


MAX_BATCH = 1_000_000  # --batch-size


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


def check_threads(threads: int | None, flag: str = "--threads") -> None:
    """``--threads`` must be 0 (torch's default) or a count up to :func:`max_threads`."""
    if threads is None or threads == 0:
        return
    if threads < 0 or threads > max_threads():
        raise CmkitError(
            f"{flag} must be 0 (torch's default) or a positive count up to {max_threads()} "
            f"(4 per CPU here); got {threads}"
        )


def apply_threads(threads: int | None) -> None:
    """Apply ``--threads``: ``torch.set_num_threads`` when it is > 0; checked by :func:`check_threads`."""
    check_threads(threads)
    if not threads:
        return
    import torch

    torch.set_num_threads(threads)


DEVICE_HELP = "auto, cpu, cuda, cuda:N, mps or xpu"


def auto_device() -> str:
    """``--device auto``: the first CUDA GPU when one is visible, else Apple MPS when available, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return "cuda:0"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def check_device(name: str | None, flag: str = "--device") -> str:
    """Check ``--device`` before any work: ``auto`` (``auto_device``) or a torch device name of an available
    accelerator (or cpu).

    Returns the canonical name (``torch.device(name)`` as text). Unknown names, ``meta`` (no data), and
    accelerators that this torch build or machine lacks are each one :class:`CmkitError` line."""
    import torch

    text = "auto" if name is None else str(name)
    if text == "auto":
        return auto_device()
    try:
        dev = torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        raise CmkitError(f"{flag} {text!r} is not a device; expected {DEVICE_HELP}") from None
    if dev.type == "cpu":
        return str(dev)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise CmkitError(f"{flag} {text}: {why}; use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise CmkitError(f"{flag} {text}: there are only {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
        return str(dev)
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise CmkitError(f"{flag} {text}: Apple MPS is not available on this machine; use --device cpu")
        return str(dev)
    if dev.type == "xpu":
        xpu = getattr(torch, "xpu", None)
        if xpu is None or not xpu.is_available():
            raise CmkitError(f"{flag} {text}: no Intel XPU is available; use --device cpu")
        return str(dev)
    if dev.type == "meta":
        raise CmkitError(f"{flag} meta holds no data and cannot run a model; expected {DEVICE_HELP}")
    raise CmkitError(f"{flag} {text}: cmkit does not run on {dev.type!r} devices; expected {DEVICE_HELP}")


def check_int(value: int | None, flag: str, *, minimum: int = 1, maximum: int | None = None) -> None:
    """An integer option in [minimum, maximum] (None: not given, nothing to check)."""
    if value is None:
        return
    if value < minimum:
        what = "positive" if minimum == 1 else "0 or more" if minimum == 0 else f"at least {minimum}"
        raise CmkitError(f"{flag} must be {what}; got {value}")
    if maximum is not None and value > maximum:
        raise CmkitError(f"{flag} must be at most {maximum:,}; got {value}")


def check_float(
    value: float | None,
    flag: str,
    *,
    positive: bool = True,
    low: float | None = None,
    high: float | None = None,
    what: str = "",
) -> None:
    """A finite float option: positive (default) and inside [low, high] when given (``what`` names the bounds)."""
    if value is None:
        return
    if not math.isfinite(value):
        raise CmkitError(f"{flag} must be a finite number; got {value}")
    if positive and value <= 0:
        raise CmkitError(f"{flag} must be positive; got {value:g}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = (
            f"[{low:g}, {high:g}]"
            if low is not None and high is not None
            else f">= {low:g}"
            if low is not None
            else f"<= {high:g}"
        )
        raise CmkitError(f"{flag} {value:g} is outside {what + ' ' if what else ''}{bounds}")


def check_seed(seed: int | None, flag: str = "--seed", count: int = 1) -> None:
    """A seed of torch generators: 0 <= seed and seed + count - 1 <= 2**63 - 1."""
    if seed is None:
        return
    if seed < 0 or seed + max(count, 1) - 1 > MAX_SEED:
        raise CmkitError(f"{flag} must be between 0 and {MAX_SEED - max(count, 1) + 1}; got {seed}")


def check_model_arg(model: str | None, flag: str = "--model") -> None:
    """A non-empty ``--model`` (an empty one would name the current directory)."""
    if model is not None and not str(model).strip():
        raise CmkitError(
            f"{flag} is empty; give a model directory, a run directory or a shipped model name (see `cmkit models`)"
        )


def check_output(
    path: str | None,
    flag: str,
    overwrite: bool,
    *,
    required: bool = False,
    directory: bool = False,
    suffixes: tuple[str, ...] | None = None,
    example: str | None = None,
) -> Path | None:
    """Check an output path before any work; return it as a Path (None: no output wanted).

    ``None`` or ``''`` means "no output" unless ``required``. A file output (``directory=False``) must not be a
    directory, must end in one of ``suffixes`` when given, and is not replaced without ``overwrite``; a directory
    output must not be a file and, when it holds anything, is not replaced without ``overwrite``. Missing parent
    directories are created by the writers, so the nearest existing ancestor must be a writable directory."""
    if path is None or not str(path).strip():
        if required:
            raise CmkitError(f"{flag} is empty; give the output path")
        return None
    p = Path(path).expanduser()
    if len(p.name.encode()) > 255:
        raise CmkitError(f"{flag}: the file name {p.name[:40]}... is longer than 255 bytes")
    if directory:
        if p.exists() and not p.is_dir():
            raise CmkitError(f"{flag} {path} is a file; expected a directory (or a path to create one)")
        if p.is_dir() and any(p.iterdir()) and not overwrite:
            raise CmkitError(f"{path} exists; pass --overwrite to replace it")
    else:
        if p.is_dir():
            example = example or "out" + (suffixes[0] if suffixes else "")
            raise CmkitError(f"{flag} {path} is a directory; expected a file name such as {p / example}")
        if suffixes is not None and p.suffix.lower() not in suffixes:
            raise CmkitError(
                f"{flag} {path}: expected a {' or '.join(suffixes[:3])} file name"
                f"{' (' + ', '.join(suffixes[3:]) + ' also work)' if len(suffixes) > 3 else ''}"
            )
        if (p.exists() or p.is_symlink()) and not overwrite:
            raise CmkitError(f"{path} exists; pass --overwrite to replace it")
    parent = p.parent
    while not parent.exists():
        if parent.is_symlink():
            raise CmkitError(f"{flag} {path}: {parent} is a broken link")
        parent = parent.parent
    if not parent.is_dir():
        raise CmkitError(f"{flag} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CmkitError(f"{flag} {path}: cannot write in {parent} (permission denied)")
    return p


def check_numbered_outputs(out: str | Path, n: int, overwrite: bool, flag: str = "-o") -> None:
    """``check_output`` for each file that ``n`` images written to ``out`` will take
    (``cmkit.imageio.numbered_paths``)."""
    for path in numbered_paths(out, n):
        check_output(str(path), flag, overwrite, required=True, suffixes=IMAGE_SUFFIXES)


def check_distinct_outputs(*outputs: tuple[str, Path | None]) -> None:
    """Refuse two outputs (flag, path) of one command that name the same file (``-o x.png --panel x.png``)."""
    seen: dict[Path, str] = {}
    for flag, p in outputs:
        if p is None:
            continue
        key = Path(os.path.abspath(p))
        if key in seen:
            raise CmkitError(f"{seen[key]} and {flag} both name {p}; give two different files")
        seen[key] = flag


def class_labels(text: str | None, num_classes: int, n: int) -> Any:
    """The (n,) label tensor of ``--class/--classes`` (None: random labels), checked against the model."""
    if not text:
        return None
    if not num_classes:
        raise CmkitError("--class is for class-conditional models; this one is unconditional")
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CmkitError(f"--class expects integer labels like 207 or 0,1,2; got {text!r}") from None
    bad = [v for v in values if not 0 <= v < num_classes]
    if not values or bad:
        raise CmkitError(f"--class labels must lie in [0, {num_classes - 1}] for this model; got {text!r}")
    import torch

    return torch.tensor(values).repeat((n + len(values) - 1) // len(values))[:n]
