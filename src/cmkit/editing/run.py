"""The six editing tasks behind one dispatcher: ``cmkit edit`` and the web page both call ``run_task``.

Each surface turns its own inputs (files and flags; an upload and what was drawn on it) into an ``EditRequest``
of tensors at the model's size; ``run_task`` runs the task of ``cmkit.editing.tasks`` (CM Algorithm 4 and §7.6–7.8)
with the class labels of a class-conditional model and returns the output, the columns of a side-by-side panel
and one line saying what was done.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import CmkitError
from ..inputs import class_labels
from . import tasks

#: why a latent model (``latent.autoencoder``) cannot be edited: the tasks' masks and transforms act on pixels
LATENT_EDIT = (
    "editing works on pixels and this is a latent model (latent.autoencoder): its masks and transforms would act on "
    "latents; edit with a pixel-space consistency model"
)


@dataclass(frozen=True)
class EditTask:
    """What a task does (the CLI's help) and the columns of its panel."""

    help: str
    panel: tuple[str, ...]


TASKS: dict[str, EditTask] = {
    "inpaint": EditTask(
        "fill a masked region (--mask PNG, --box or --builtin), keeping the rest exactly", ("input", "masked", "output")
    ),
    "colorize": EditTask("colour a greyscale image, keeping its luminance (needs a colour model)", ("grey", "output")),
    "superres": EditTask("upscale a size/factor image by --factor, keeping its patch averages", ("low-res", "output")),
    "stroke": EditTask(
        "turn a coarse stroke painting into an image (SDEdit-like, from --sigma-start)", ("strokes", "output")
    ),
    "denoise": EditTask("remove Gaussian noise of a known level --sigma in one evaluation", ("noisy", "output")),
    "interpolate": EditTask("frames between two noise seeds or between two images", ()),
}


@dataclass
class EditRequest:
    """One editing task's inputs, tensors in [-1, 1] on the model's device.

    ``images``: the input (B, C, R, R) of every task but ``superres``, where it is the low-resolution image
    (B, C, R/factor, R/factor), and ``interpolate`` between noises, where it is None. ``labels``: (B,) class labels
    of a class-conditional model (None for an unconditional one)."""

    task: str
    images: Tensor | None = None
    images2: Tensor | None = None  # interpolate: the second image
    mask: Tensor | None = None  # inpaint: 1 where pixels are unknown, (H, W) or (1|B, 1|C, H, W)
    sigmas: Sequence[float] | None = None  # inpaint, colorize, superres, stroke: the σ list (None: the default)
    steps: int = 3  # stroke: σ levels from sigma_start when no σ list is given
    sigma: float = 2.0  # denoise: the noise level; interpolate images: the noise added
    sigma_start: float = tasks.STROKE_SIGMA
    factor: int = 4  # superres
    frames: int = 9  # interpolate
    add_noise: bool = False  # denoise: add N(0, σ²) noise first (a clean input made noisy)
    seeds: tuple[int, int] = (0, 1)  # interpolate between the noises of these seeds when images is None
    labels: Tensor | None = None
    generator: torch.Generator | None = None
    grid: Sequence[float] | None = None  # the model's training σ grid: default σ lists lie on it


@dataclass
class Edited:
    images: Tensor  # the output (B, C, R, R), or the interpolation frames (frames, C, R, R)
    panel: list[Tensor]  # the panel's columns, named by TASKS[task].panel (none for interpolate)
    info: str  # one line saying what was done


def edit_labels(classes: str | None, num_classes: int, n: int, seed: int) -> Tensor | None:
    """The class labels of ``n`` edited images: None for an unconditional model, else ``classes`` ("3" or "0,1,2",
    cycled over the images), or random labels drawn from ``seed`` when it is empty (the CLI and the page alike)."""
    labels = class_labels(classes or None, num_classes, n)
    if labels is None and num_classes:
        labels = torch.randint(num_classes, (n,), generator=torch.Generator().manual_seed(seed))
    return labels


def run_task(model: nn.Module, req: EditRequest, shape: tuple[int, int, int], sigma_max: float) -> Edited:
    """Run ``req.task`` on ``model`` (a consistency model of image shape (C, R, R) and largest σ ``sigma_max``)."""
    if req.task not in TASKS:
        raise CmkitError(f"unknown editing task {req.task!r}; expected one of {', '.join(TASKS)}")
    if req.task != "interpolate" and req.images is None:
        raise CmkitError(f"{req.task} needs an input image")
    cond = {"class_labels": req.labels} if req.labels is not None else {}
    with torch.no_grad():
        return _RUNNERS[req.task](model, req, shape, sigma_max, cond)


def _inpaint(model: nn.Module, req: EditRequest, shape: tuple[int, int, int], sigma_max: float, cond: dict) -> Edited:
    y, mask = req.images, req.mask
    if mask is None or not bool(mask.any()):
        raise CmkitError("the mask is empty: mark the region to fill")
    out = tasks.inpaint(model, y, mask, req.sigmas, generator=req.generator, grid=req.grid, **cond)
    unknown = int(mask.expand_as(y[:1, :1]).sum())
    return Edited(
        out,
        [y, y * (1 - mask) + mask, out],  # the masked view: the region to fill in white
        f"inpainted {unknown} of {y.shape[-1] * y.shape[-2]} pixels; the others are the input's, unchanged",
    )


def _colorize(model: nn.Module, req: EditRequest, shape: tuple[int, int, int], sigma_max: float, cond: dict) -> Edited:
    if shape[0] != 3:
        raise CmkitError("colorization needs a colour (3-channel) model, e.g. emoji-ect")
    gray = tasks.to_gray3(req.images)
    out = tasks.colorize(model, gray, req.sigmas, generator=req.generator, grid=req.grid, **cond)
    return Edited(out, [gray, out], "colorized: the luminance is the input's")


def _superres(model: nn.Module, req: EditRequest, shape: tuple[int, int, int], sigma_max: float, cond: dict) -> Edited:
    low, f = req.images, req.factor
    out = tasks.super_resolve(model, low, f, req.sigmas, generator=req.generator, grid=req.grid, **cond)
    shown = torch.nn.functional.interpolate(low, scale_factor=f, mode="nearest")
    return Edited(out, [shown, out], f"×{f} super-resolution of the {low.shape[-1]}×{low.shape[-2]} input")


def _stroke(model: nn.Module, req: EditRequest, shape: tuple[int, int, int], sigma_max: float, cond: dict) -> Edited:
    out = tasks.stroke_guided(
        model, req.images, req.sigma_start, req.steps, req.sigmas, generator=req.generator, grid=req.grid, **cond
    )
    return Edited(out, [req.images, out], f"stroke-guided generation from σ = {req.sigma_start:g}")


def _denoise(model: nn.Module, req: EditRequest, shape: tuple[int, int, int], sigma_max: float, cond: dict) -> Edited:
    noisy = req.images
    if req.add_noise:
        noisy = noisy + req.sigma * torch.randn(noisy.shape, generator=req.generator).to(noisy.device)
    out = tasks.denoise(model, noisy, req.sigma, **cond)
    return Edited(out, [noisy.clamp(-1, 1), out], f"denoised N(0, {req.sigma:g}²) noise in one evaluation")


def _interpolate(
    model: nn.Module, req: EditRequest, shape: tuple[int, int, int], sigma_max: float, cond: dict
) -> Edited:
    if req.images is None:
        z1, z2 = (torch.randn(1, *shape, generator=torch.Generator().manual_seed(s)) for s in req.seeds)
        device = next(model.parameters()).device
        frames = tasks.interpolate_noise(model, z1.to(device), z2.to(device), req.frames, sigma_max, **cond)
        return Edited(frames[:, 0], [], f"{req.frames} frames between seeds {req.seeds[0]} and {req.seeds[1]}")
    if req.images2 is None:
        raise CmkitError("interpolating images needs a second image")
    if len(req.images) != len(req.images2):
        raise CmkitError(
            f"the first input holds {len(req.images)} image(s) but the second {len(req.images2)}; give as many"
        )
    frames = tasks.interpolate_images(
        model, req.images, req.images2, req.frames, req.sigma, generator=req.generator, grid=req.grid, **cond
    )
    return Edited(frames[:, 0], [], f"{req.frames} frames between the two images")


_RUNNERS = {
    "inpaint": _inpaint,
    "colorize": _colorize,
    "superres": _superres,
    "stroke": _stroke,
    "denoise": _denoise,
    "interpolate": _interpolate,
}
