"""``cmkit edit TASK --model M --input IMG [...] -o OUT``: the editing tasks from the command line."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import CmkitError

TASKS = ("inpaint", "colorize", "superres", "stroke", "denoise", "interpolate")


def load_images(path: str, channels: int, size: int, index: int | None = None) -> Tensor:
    """PNG/JPEG (one image) or .npz (uint8 NHWC under arr_0; ``index`` picks one) → (B, C, size, size) in [-1, 1]."""
    from PIL import Image

    from ..utils import from_uint8

    p = Path(path)
    if not p.is_file():
        raise CmkitError(f"input image not found: {p}")
    if p.suffix == ".npz":
        a = np.load(p)["arr_0"]
        a = a[index:index + 1] if index is not None else a
    else:
        a = np.asarray(Image.open(p).convert("L" if channels == 1 else "RGB"))[None]
    x = from_uint8(a)
    if x.shape[1] == 3 and channels == 1:
        x = x.mean(1, keepdim=True)
    if x.shape[-2:] != (size, size):
        raise CmkitError(f"{p} holds {x.shape[-1]}×{x.shape[-2]} images but {size}×{size} are expected here")
    if x.shape[1] != channels:
        raise CmkitError(f"{p} has {x.shape[1]} channel(s) but the model expects {channels}")
    return x


def _sigmas(args: argparse.Namespace) -> list[float] | None:
    from .editor import default_edit_sigmas

    if args.sigmas:
        try:
            return [float(v) for v in args.sigmas.split(",")]
        except ValueError:
            raise CmkitError(f"--sigmas expects comma-separated numbers, got {args.sigmas!r}") from None
    return default_edit_sigmas(args.steps) if args.steps else None


def run_edit(args: argparse.Namespace) -> int:
    from ..checkpoint import load_model
    from ..utils import save_grid
    from . import tasks
    from .masks import box_mask, builtin_mask, load_mask

    model, cfg = load_model(args.model)
    if cfg.model.precond != "cm":
        raise CmkitError("editing needs a consistency model (this one is a diffusion/EDM model)")
    C, R = cfg.model.in_channels, cfg.model.img_resolution
    g = torch.Generator().manual_seed(args.seed)
    if Path(args.out).exists() and not args.overwrite:
        raise CmkitError(f"{args.out} exists; pass --overwrite to replace it")
    panel: list[Tensor] = []
    try:
        if args.task == "inpaint":
            y = load_images(args.input, C, R, args.index)
            mask = (load_mask(args.mask, R) if args.mask else box_mask(args.box, R) if args.box
                    else builtin_mask(args.builtin or "center", R))
            out = tasks.inpaint(model, y, mask, _sigmas(args), generator=g)
            panel = [y, y * (1 - mask) - mask, out]
        elif args.task == "colorize":
            y = load_images(args.input, 3, R, args.index) if C == 3 else None
            if y is None:
                raise CmkitError("colorization needs a colour (3-channel) model")
            gray = tasks.to_gray3(y)
            out = tasks.colorize(model, gray, _sigmas(args), generator=g)
            panel = [gray, out]
        elif args.task == "superres":
            low = load_images(args.input, C, R // args.factor, args.index)
            if R % args.factor:
                raise CmkitError(f"the model's {R}×{R} images are not divisible by factor {args.factor}")
            out = tasks.super_resolve(model, low, args.factor, _sigmas(args), generator=g)
            panel = [torch.nn.functional.interpolate(low, scale_factor=args.factor, mode="nearest"), out]
        elif args.task == "stroke":
            y = load_images(args.input, C, R, args.index)
            out = tasks.stroke_guided(model, y, args.sigma or tasks.STROKE_SIGMA, args.steps or 3, generator=g)
            panel = [y, out]
        elif args.task == "denoise":
            y = load_images(args.input, C, R, args.index)
            sigma = args.sigma or 0.3
            if args.add_noise:
                y = y + sigma * torch.randn(y.shape, generator=g)
            out = tasks.denoise(model, y, sigma)
            panel = [y.clamp(-1, 1), out]
        else:  # interpolate
            if args.input:
                if not args.input2:
                    raise CmkitError("interpolating images needs --input and --input2")
                x1, x2 = load_images(args.input, C, R, args.index), load_images(args.input2, C, R, args.index)
                frames = tasks.interpolate_images(model, x1, x2, args.frames, args.sigma or 2.0, generator=g)
            else:
                s = [int(v) for v in args.seeds.split(",")]
                if len(s) != 2:
                    raise CmkitError("--seeds expects two integers, e.g. 0,1")
                z1, z2 = (torch.randn(1, C, R, R, generator=torch.Generator().manual_seed(v)) for v in s)
                frames = tasks.interpolate_noise(model, z1, z2, args.frames)
            out = frames[:, 0]
            save_grid(out, args.out, nrow=args.frames)
            print(f"wrote {args.out} ({args.frames} frames)")
            return 0
    except ValueError as e:  # shape problems surfaced by the editor
        raise CmkitError(str(e)) from None
    save_grid(out, args.out, nrow=max(1, min(8, out.shape[0])))
    print(f"wrote {args.out}")
    if args.panel:
        rows = torch.stack([p.expand(-1, out.shape[1], -1, -1).clamp(-1, 1) for p in panel], 1).flatten(0, 1)
        save_grid(rows, args.panel, nrow=len(panel))
        print(f"wrote {args.panel} (columns: {' | '.join(PANELS[args.task])})")
    return 0


PANELS = {"inpaint": ("input", "masked", "output"), "colorize": ("grey", "output"), "superres": ("low-res", "output"),
          "stroke": ("strokes", "output"), "denoise": ("noisy", "output"), "interpolate": ("frames",)}


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("edit", help="zero-shot editing with a consistency model (CM Algorithm 4)",
                              description="Edit images with no extra training. TASK is one of: " + ", ".join(TASKS) +
                                          ". Inputs must have the model's size (super-resolution: size/factor).")
    p.add_argument("task", choices=TASKS)
    p.add_argument("--model", required=True, help="consistency model directory, run directory or shipped name")
    p.add_argument("--input", help="input image (.png/.jpg) or .npz of uint8 NHWC images")
    p.add_argument("--input2", help="second image (interpolate)")
    p.add_argument("--index", type=int, help="pick one image from an .npz input")
    p.add_argument("-o", "--out", required=True, help="output PNG (the edited images)")
    p.add_argument("--panel", help="also write a side-by-side PNG (input | mask/transform | output)")
    p.add_argument("--mask", help="inpaint: PNG mask, white = generate")
    p.add_argument("--box", help="inpaint: box x0,y0,x1,y1 to generate")
    p.add_argument("--builtin", help="inpaint: built-in mask center|left|right|top|bottom|border (default center)")
    p.add_argument("--factor", type=int, default=4, help="superres: factor p (2, 4, 8)")
    p.add_argument("--sigma", type=float, help="stroke: starting σ (default 5 = tasks.STROKE_SIGMA); denoise: noise level (0.3); "
                                               "interpolate images: σ of the noised versions (2)")
    p.add_argument("--add-noise", action="store_true", help="denoise: add N(0, σ²) noise to a clean input first")
    p.add_argument("--steps", type=int, help="number of σ levels (default 18; stroke default 3)")
    p.add_argument("--sigmas", help="explicit descending σ list, e.g. 80,20,5,1")
    p.add_argument("--seeds", default="0,1", help="interpolate: the two noise seeds")
    p.add_argument("--frames", type=int, default=9, help="interpolate: number of frames")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run_edit)
