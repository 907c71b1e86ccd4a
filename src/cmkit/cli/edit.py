"""``cmkit edit TASK``: the zero-shot editing tasks from the command line, one sub-command per task.

    cmkit edit inpaint     --model M --input IMG [--mask PNG | --box x0,y0,x1,y1 | --builtin center] -o OUT.png
    cmkit edit colorize    --model M --input IMG -o OUT.png
    cmkit edit superres    --model M --input LOW --factor 4 -o OUT.png
    cmkit edit stroke      --model M --input STROKES [--sigma-start 5] [--steps 3] -o OUT.png
    cmkit edit denoise     --model M --input NOISY [--sigma 0.3] [--add-noise] -o OUT.png
    cmkit edit interpolate --model M (--seeds 0,1 | --input A --input2 B [--sigma 2]) [--frames 9] --grid STRIP.png

Outputs are data: ``-o OUT.png`` writes the edited images at the model's resolution (one image: OUT.png; several:
OUT_0.png, OUT_1.png, ...), ``--npz OUT.npz`` writes them as uint8 NHWC (labels in arr_1), so either can be the
next command's --input; ``--grid`` writes them as one enlarged grid to look at, and ``--panel`` (all but
interpolate) a side-by-side PNG of input and output. Every task takes --index (one image of an .npz input),
--seed, --device, --threads, --overwrite and, for class-conditional models, --class (as ``cmkit sample``: one
label, or a list cycled over the images; random labels from --seed otherwise); inpaint, colorize, superres and
stroke take --steps/--sigmas (σ levels).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..editing.editor import default_edit_sigmas
from ..editing.masks import BUILTIN, box_mask, builtin_mask, load_mask
from ..editing.run import LATENT_EDIT, TASKS, EditRequest, edit_labels, run_task
from ..editing.tasks import STROKE_SIGMA
from ..errors import CmkitError
from ..imageio import from_uint8, read_image, read_npz_images, save_grid, save_images, save_npz
from ..inputs import (
    IMAGE_SUFFIXES,
    MAX_STEPS,
    apply_threads,
    check_device,
    check_distinct_outputs,
    check_float,
    check_int,
    check_model_arg,
    check_numbered_outputs,
    check_output,
    check_seed,
    check_threads,
    class_labels,
    parse_sigmas,
)
from ..load import load_model
from ..sampling import validate_sigmas
from ..schedules import training_grid
from .options import add_class_option, add_device_option, add_output_option, add_sampling_options, add_threads_option


def load_images(
    path: str,
    channels: int,
    size: int,
    index: int | None = None,
    what: str = "input image",
    flag: str = "--input",
    device: str | torch.device = "cpu",
) -> Tensor:
    """PNG/JPEG (one image) or .npz (uint8 NHWC under arr_0; ``index`` picks one) → (B, C, size, size) in [-1, 1].

    Every problem (missing, corrupt, 16-bit handled, float arrays, wrong shape or size, ``index`` out of range) is
    one :class:`CmkitError` line (:func:`cmkit.imageio.read_image`, :func:`cmkit.imageio.read_npz_images`)."""
    p = Path(path)
    if p.suffix.lower() == ".npz":
        a = read_npz_images(p, what)
        if index is not None:
            if not 0 <= index < len(a):
                raise CmkitError(
                    f"--index {index} is out of range: {p} holds {len(a)} image(s) (indices 0..{len(a) - 1})"
                )
            a = a[index : index + 1]
        if a.shape[1:3] != (size, size):
            raise CmkitError(f"{flag} {p} holds {a.shape[2]}×{a.shape[1]} images but {size}×{size} are expected here")
    else:
        if index not in (None, 0):
            raise CmkitError(f"--index {index}: {p} is a single image (--index picks one image of an .npz input)")
        a = read_image(p, "L" if channels == 1 else "RGB", what, size=size)[None]
    x = from_uint8(a)
    if x.shape[1] == 3 and channels == 1:
        x = x.mean(1, keepdim=True)
    if x.shape[1] == 1 and channels == 3:
        x = x.expand(-1, 3, -1, -1).contiguous()  # grey → RGB, as Pillow converts a grey PNG
    return x.to(device)


def _sigma_list(args: argparse.Namespace) -> list[float] | None:
    """σ levels of an Algorithm-4 task: --sigmas as given, else --steps levels of the Karras grid, else None
    (the task's default, 18 levels)."""
    if args.sigmas:
        return parse_sigmas(args.sigmas)
    return default_edit_sigmas(args.steps, grid=args.grid) if args.steps else None


#: the most frames `edit interpolate` writes in its one-row strip
MAX_FRAMES = 1000


def _check_args(args: argparse.Namespace) -> None:
    """Everything that can be checked before loading the model: outputs, inputs, numbers, σ lists."""
    check_threads(args.threads)
    check_model_arg(args.model)
    args.device = check_device(args.device)
    out = check_output(args.out, "-o", args.overwrite, suffixes=IMAGE_SUFFIXES)
    grid = check_output(args.grid_png, "--grid", args.overwrite, suffixes=IMAGE_SUFFIXES)
    npz = check_output(args.npz, "--npz", args.overwrite, suffixes=(".npz",))
    panel = check_output(getattr(args, "panel", None), "--panel", args.overwrite, suffixes=IMAGE_SUFFIXES)
    if not (out or grid or npz or panel):
        raise CmkitError(
            "nothing to write: give -o OUT.png, --npz OUT.npz, --grid GRID.png"
            + (" or --panel PANEL.png" if hasattr(args, "panel") else "")
        )
    check_distinct_outputs(("-o", out), ("--grid", grid), ("--npz", npz), ("--panel", panel))
    for flag, path in (
        ("--input", args.input),
        ("--input2", getattr(args, "input2", None)),
        ("--mask", getattr(args, "mask", None)),
    ):
        if path is not None and not Path(path).is_file():
            what = "mask file" if flag == "--mask" else "input image"
            raise CmkitError(f"{what} not found: {path}" + (" (a directory)" if path and Path(path).is_dir() else ""))
    check_int(args.index, "--index", minimum=0)
    check_seed(args.seed)
    if hasattr(args, "steps"):
        check_int(args.steps, "--steps", maximum=MAX_STEPS)
        if args.sigmas:
            parse_sigmas(args.sigmas)
    check_int(getattr(args, "factor", None), "--factor")
    for flag in ("sigma", "sigma_start"):
        check_float(getattr(args, flag, None), "--" + flag.replace("_", "-"))
    if hasattr(args, "frames"):
        check_int(args.frames, "--frames", minimum=2, maximum=MAX_FRAMES)
    if getattr(args, "builtin", None) is not None and args.builtin not in BUILTIN:
        raise CmkitError(f"unknown built-in mask {args.builtin!r}; expected one of {', '.join(BUILTIN)}")
    if args.task == "interpolate" and not args.input:
        if getattr(args, "input2", None):
            raise CmkitError("interpolating images needs --input and --input2")
        _seeds(args)


def _seeds(args: argparse.Namespace) -> list[int]:
    """The two noise seeds of ``edit interpolate --seeds A,B``."""
    text = args.seeds or "0,1"
    try:
        s = [int(v) for v in text.split(",")]
    except ValueError:
        s = []
    if len(s) != 2:
        raise CmkitError(f"--seeds expects two integers, e.g. 0,1; got {text!r}")
    for v in s:
        check_seed(v, "--seeds")
    return s


def _check_with_model(args: argparse.Namespace, cfg: Any) -> None:
    """The checks that need the model's σ range and image size, right after loading it and before any work."""
    c = cfg.model
    lo, hi = c.sigma_min, c.sigma_max
    what = "the model's σ range"
    if getattr(args, "sigmas", None):
        try:
            validate_sigmas(parse_sigmas(args.sigmas), lo, hi)
        except ValueError as e:
            raise CmkitError(f"--sigmas: {e}") from None
    if args.task == "stroke" and not args.sigmas:
        check_float(args.sigma_start, "--sigma-start", low=lo, high=hi, what=what)
    if args.task == "denoise" or (args.task == "interpolate" and args.input):
        check_float(args.sigma, "--sigma", low=lo, high=hi, what=what)
    if args.task == "superres":
        R = c.img_resolution
        if args.factor > R or R % args.factor:
            divisors = [d for d in range(2, R + 1) if R % d == 0]
            raise CmkitError(
                f"--factor {args.factor} does not divide the model's {R}×{R} images; "
                f"choose one of {', '.join(map(str, divisors))}"
            )


def _labels(args: argparse.Namespace, n: int) -> Tensor | None:
    """The class labels of ``n`` edited images: None for an unconditional model, else --class (cycled over the
    images), or random labels drawn from --seed when it is not given."""
    labels = edit_labels(args.classes, args.num_classes, n, args.seed)
    if labels is not None and not args.classes:
        print(f"class-conditional model: random class labels {labels.tolist()} (choose them with --class)")
    return labels


def _request(args: argparse.Namespace, C: int, R: int) -> EditRequest:
    """The task's inputs from the files and flags."""
    task, dev = args.task, args.device
    sigmas = _sigma_list(args) if task in ("inpaint", "colorize", "superres") else None
    req = EditRequest(task, sigmas=sigmas, generator=torch.Generator().manual_seed(args.seed), grid=args.grid)
    if task == "superres":
        req.images, req.factor = load_images(args.input, C, R // args.factor, args.index, device=dev), args.factor
    elif task == "interpolate":
        if args.input or args.input2:
            if not (args.input and args.input2):
                raise CmkitError("interpolating images needs --input and --input2")
            req.images = load_images(args.input, C, R, args.index, device=dev)
            req.images2 = load_images(args.input2, C, R, args.index, flag="--input2", device=dev)
            if len(req.images) != len(req.images2):
                raise CmkitError(
                    f"--input holds {len(req.images)} image(s) but --input2 holds {len(req.images2)}; "
                    "give as many (or pick one of each with --index)"
                )
            req.sigma = args.sigma
        else:
            req.seeds = tuple(_seeds(args))
        req.frames = args.frames
    else:
        req.images = load_images(args.input, 3 if task == "colorize" else C, R, args.index, device=dev)
    if task == "inpaint":
        req.mask = (
            load_mask(args.mask, R)
            if args.mask
            else box_mask(args.box, R)
            if args.box
            else builtin_mask(args.builtin or "center", R)
        ).to(dev)
    elif task == "stroke":
        req.sigma_start, req.steps = args.sigma_start, args.steps
        req.sigmas = parse_sigmas(args.sigmas) if args.sigmas else None
    elif task == "denoise":
        req.sigma, req.add_noise = args.sigma, args.add_noise
    n = 1 if req.images is None else len(req.images)
    labels = _labels(args, n)
    req.labels = labels.to(dev) if labels is not None else None
    return req


def write_outputs(args: argparse.Namespace, out: Tensor, panel: list[Tensor], labels: Tensor | None) -> None:
    """-o (the images at the model's size, numbered when several), --npz, --grid and --panel. Every file is
    checked before the first is written, so nothing is half-written or replaced without --overwrite."""
    files = []
    if args.out:
        check_numbered_outputs(args.out, len(out), args.overwrite)
        files = save_images(out, args.out)
        print(
            f"wrote {files[0]}"
            + (
                f" … {files[-1].name} ({len(files)} images, {out.shape[-1]}×{out.shape[-2]})"
                if len(files) > 1
                else f" ({out.shape[-1]}×{out.shape[-2]})"
            )
        )
    if args.npz:
        save_npz(out, args.npz, labels)
        print(f"wrote {args.npz} ({len(out)} images, uint8 NHWC)")
    if args.grid_png:
        save_grid(out, args.grid_png, nrow=len(out) if args.task == "interpolate" else max(1, min(8, len(out))))
        print(f"wrote {args.grid_png}")
    if getattr(args, "panel", None):
        rows = torch.stack([p.cpu().expand(-1, out.shape[1], -1, -1).clamp(-1, 1) for p in panel], 1).flatten(0, 1)
        save_grid(rows, args.panel, nrow=len(panel))
        print(f"wrote {args.panel} (columns: {' | '.join(TASKS[args.task].panel)})")


def run_edit(args: argparse.Namespace) -> int:
    """Handler of ``cmkit edit TASK``: check the arguments, load the model, run the task, write the outputs."""
    _check_args(args)
    apply_threads(args.threads)
    model, cfg = load_model(args.model, device=args.device)
    if cfg.is_diffusion():
        raise CmkitError("editing needs a consistency model (this one is a diffusion model)")
    if cfg.latent.autoencoder:
        raise CmkitError(LATENT_EDIT)
    _check_with_model(args, cfg)
    args.num_classes = cfg.model.num_classes
    class_labels(args.classes, args.num_classes, 1)  # --class for an unconditional model or out of range: now

    args.grid = training_grid(cfg)  # default σ lists lie on the grid the model was trained on
    C, R = cfg.model.in_channels, cfg.model.img_resolution
    try:
        req = _request(args, C, R)
        edited = run_task(model, req, (C, R, R), cfg.model.sigma_max)
    except ValueError as e:  # shape problems surfaced by the editor
        raise CmkitError(str(e)) from None
    out, panel = edited.images, edited.panel
    write_outputs(args, out.cpu(), panel, None if req.labels is None else req.labels.cpu())
    return 0


INPUT_HELP = "input image (.png/.jpg) or .npz of uint8 NHWC images, of the model's size"


def _add_common(
    p: argparse.ArgumentParser,
    task: str,
    *,
    input_help: str | None = INPUT_HELP,
    panel: bool = True,
    sigmas: bool = True,
    steps: int | None = None,
    steps_help: str = "number of σ levels, spaced on the model's training "
    "grid (default: every level of that grid but σ_min), or on an 18-level Karras grid for models "
    "without one (ECT, sCM, MeanFlow; default 18)",
    sigmas_help: str = "explicit descending σ list, e.g. 80,20,5,1 (overrides --steps)",
) -> None:
    """The options the tasks share: model, input, index, out, panel, seed, steps/sigmas, threads, overwrite.

    ``input_help=None`` leaves --input to the task (interpolate: an alternative to --seeds); ``panel=False`` and
    ``sigmas=False`` leave out --panel and --steps/--sigmas for the tasks that have no use for them."""
    p.add_argument("--model", required=True, help="consistency model directory, run directory or shipped name")
    if input_help is not None:
        p.add_argument("--input", required=True, metavar="IMG", help=input_help)
    p.add_argument("--index", type=int, help="pick one image from an .npz input (default: all of them)")
    add_output_option(
        p,
        metavar="OUT.png",
        help="the edited images at the model's size: OUT.png for one image, OUT_0.png, OUT_1.png, ... "
        "for several (usable as the next --input)",
    )
    p.add_argument(
        "--npz",
        metavar="OUT.npz",
        help="also write the edited images as uint8 NHWC (arr_0; class labels in arr_1), usable as the next --input",
    )
    p.add_argument(
        "--grid",
        dest="grid_png",
        metavar="GRID.png",
        help="also write the images as one enlarged grid to look at (interpolate: one row of frames)",
    )
    if panel:
        p.add_argument(
            "--panel",
            metavar="PANEL.png",
            help=f"also write a side-by-side PNG (columns: {' | '.join(TASKS[task].panel)})",
        )
    if sigmas:
        add_sampling_options(
            p,
            sampler=False,
            batch_size=None,
            bf16=False,
            device=True,
            threads=True,
            steps_default=steps,
            steps_help=steps_help,
            sigmas_help=sigmas_help,
            seed_help="seed of the noise (default 0)",
        )
    else:
        p.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0)")
        add_device_option(p)
        add_threads_option(p)
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    add_class_option(p)
    p.set_defaults(func=run_edit)


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``cmkit edit`` and its task sub-commands."""
    p = subparsers.add_parser(
        "edit",
        help="zero-shot editing with a consistency model (CM Algorithm 4)",
        description="Edit images with a consistency model and no extra training (CM Algorithm 4).\n"
        "Inputs must have the model's size (superres: size/factor).\n"
        "`cmkit edit TASK --help` shows the options of one task.",
        epilog="examples:\n"
        "  cmkit edit inpaint --model fmnist-cd --input img.png --builtin center -o out.png --panel p.png\n"
        "  cmkit edit superres --model fmnist-cd --input low7x7.png --factor 4 -o out.png\n"
        "  cmkit edit interpolate --model fmnist-cd --seeds 0,1 --frames 9 --grid strip.png",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="task", required=True, metavar="TASK", title="tasks")

    def task(name: str, description: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=TASKS[name].help, description=description)

    for add in (_add_inpaint, _add_colorize, _add_superres, _add_stroke, _add_denoise, _add_interpolate):
        add(task)


def _add_inpaint(task: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """``cmkit edit inpaint`` and its options."""
    s = task(
        "inpaint",
        "Inpainting: generate the pixels under a mask (white = generate) and keep the others "
        "exactly. The mask is a PNG (--mask), a box (--box) or a built-in shape (--builtin, default "
        "center).",
    )
    _add_common(s, "inpaint")
    m = s.add_mutually_exclusive_group()
    m.add_argument("--mask", metavar="PNG", help="PNG mask of the model's size, white (>= 128) = generate")
    m.add_argument("--box", metavar="x0,y0,x1,y1", help="box to generate, in pixels (x1, y1 exclusive)")
    m.add_argument(
        "--builtin", metavar="NAME", help="built-in mask: center|left|right|top|bottom|border (default center)"
    )


def _add_colorize(task: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """``cmkit edit colorize`` and its options."""
    s = task(
        "colorize",
        "Colorization: a colour model fills in the chroma of a greyscale version of the input "
        "(colour or grey); the luminance is kept exactly.",
    )
    _add_common(s, "colorize")


def _add_superres(task: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """``cmkit edit superres`` and its options."""
    s = task(
        "superres",
        "Super-resolution: the input is the model's size divided by --factor; the output keeps "
        "its factor×factor patch averages exactly.",
    )
    _add_common(s, "superres", input_help="low-resolution image (.png/.jpg) or .npz, of the model's size / --factor")
    s.add_argument("--factor", type=int, default=4, help="upscaling factor p (2, 4, 8; default 4)")


def _add_stroke(task: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """``cmkit edit stroke`` and its options."""
    s = task(
        "stroke",
        "Stroke-guided generation (SDEdit-like): the stroke painting is noised to --sigma-start, "
        "then --steps consistency steps go down from there.",
    )
    _add_common(
        s,
        "stroke",
        input_help="stroke painting (.png/.jpg) or .npz, of the model's size",
        steps=3,
        steps_help="number of σ levels from --sigma-start down (default 3)",
        sigmas_help="explicit descending σ list, e.g. 5,1.5 (overrides --sigma-start and --steps)",
    )
    s.add_argument(
        "--sigma-start",
        type=float,
        default=STROKE_SIGMA,
        help=f"σ the strokes are noised to (default {STROKE_SIGMA:g})",
    )
    s.add_argument(
        "--sigma", dest="sigma_start", type=float, default=STROKE_SIGMA, help=argparse.SUPPRESS
    )  # the old spelling, still accepted


def _add_denoise(task: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """``cmkit edit denoise`` and its options."""
    s = task("denoise", "Denoising: one evaluation of the consistency function at the known noise level --sigma.")
    _add_common(
        s,
        "denoise",
        sigmas=False,
        input_help="noisy image (.png/.jpg) or .npz (a clean one with --add-noise), of the model's size",
    )
    s.add_argument("--sigma", type=float, default=0.3, help="noise level of the input (default 0.3)")
    s.add_argument("--add-noise", action="store_true", help="add N(0, σ²) noise to a clean input first")


def _add_interpolate(task: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """``cmkit edit interpolate`` and its options."""
    s = task(
        "interpolate",
        "Interpolation: one-step samples along the slerp between two noise seeds (--seeds), "
        "or between two images through their noised versions (--input, --input2, --sigma). "
        "Writes one row of --frames images.",
    )
    _add_common(s, "interpolate", input_help=None, panel=False, sigmas=False)
    src = s.add_mutually_exclusive_group()
    src.add_argument("--seeds", metavar="A,B", help="the two noise seeds (default 0,1)")
    src.add_argument("--input", metavar="A", help="first image (.png/.jpg or .npz); needs --input2")
    s.add_argument("--input2", metavar="B", help="second image")
    s.add_argument("--frames", type=int, default=9, help="number of frames (default 9)")
    s.add_argument("--sigma", type=float, default=2.0, help="images: σ of their noised versions (default 2)")
