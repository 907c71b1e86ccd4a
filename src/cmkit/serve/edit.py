"""The Edit tab: the six editing tasks on a held-out or uploaded image and what was drawn on it."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..datasets import SPLIT_DATASETS, load_dataset
from ..editing.editor import default_edit_sigmas
from ..editing.run import LATENT_EDIT, TASKS, EditRequest, edit_labels, run_task
from ..errors import CmkitError
from ..imageio import to_uint8
from .common import (
    MAX_FRAMES,
    MAX_PAGE_STEPS,
    Loaded,
    Result,
    as_float,
    as_int,
    display_scale,
    downsample,
    grid_image,
    mask_from_layers,
    to_model_image,
    to_tensor,
    upscale,
)


class EditTab:
    """The Edit tab's work; a part of ``Backend``, which holds the models."""

    def editable(self, ref: str) -> Loaded:
        m = self.load(ref)
        if not m.is_cm:
            raise CmkitError(f"{ref!r} is a diffusion (EDM) model; editing needs a consistency model")
        if m.cfg.latent.autoencoder:
            raise CmkitError(f"{ref!r}: {LATENT_EDIT}")
        return m

    def held_out(self, ref: str, index: int = 0) -> np.ndarray:
        """Image ``index`` of the held-out (test) split of the model's data set, uint8 (R, R, C)."""
        m = self.editable(ref)
        name = m.cfg.data.name
        if name not in SPLIT_DATASETS:
            raise CmkitError(f"the data set of {ref!r} ({name}) has no held-out split; upload an image instead")
        data = self.datasets.get(
            (name, m.resolution, m.channels),
            lambda: load_dataset(name, split="test", resolution=m.resolution, channels=m.channels),
        )
        index = as_int(index, "held-out index", 0, len(data) - 1)
        return data.images[index].permute(1, 2, 0).numpy().astype(np.uint8)

    def check_upload(self, ref: str, image: np.ndarray | None) -> np.ndarray:
        m = self.editable(ref)
        return to_model_image(image, m.channels, m.resolution, "the uploaded image")

    def edit(
        self,
        ref: str,
        task: str,
        image: np.ndarray | None,
        layers: list[np.ndarray] | None = None,
        composite: np.ndarray | None = None,
        *,
        steps: int | None = None,
        sigma: float = 0.3,
        sigma_start: float = 5.0,
        factor: int = 4,
        frames: int = 9,
        seed: int = 0,
        seed2: int = 1,
        image2: np.ndarray | None = None,
        classes: str = "",
    ) -> Result:
        """Run one editing task on ``image`` (uint8 (R, R, C), the model's size) with what was drawn on it, through
        the dispatcher the CLI uses (``cmkit.editing.run``); ``classes`` labels a class-conditional model's image
        (random from the seed when empty)."""
        if task not in TASKS:
            raise CmkitError(f"unknown editing task {task!r}; expected one of {', '.join(TASKS)}")
        m = self.editable(ref)
        req = self._edit_request(
            m,
            task,
            image,
            layers,
            composite,
            steps,
            sigma,
            sigma_start,
            factor,
            frames,
            as_int(seed, "seed", 0, 2**62),
            seed2,
            image2,
        )
        n = 1 if req.images is None else len(req.images)
        labels = edit_labels(classes, m.cfg.model.num_classes, n, seed)
        req.labels = None if labels is None else labels.to(self.device)
        edited = run_task(m.model, req, (m.channels, m.resolution, m.resolution), m.cfg.model.sigma_max)
        out, R = edited.images, m.resolution
        info = edited.info + (f" (class {', '.join(map(str, labels.tolist()))})" if labels is not None else "")
        if task == "interpolate":
            strip = grid_image(out, nrow=len(out), scale=max(1, 96 // R))
            return Result({"output": strip, "strip": strip}, info, to_uint8(out))
        s = display_scale(R)
        images = {
            "output": upscale(to_uint8(out)[0], s),
            "panel": grid_image(
                torch.cat([t.expand(-1, m.channels, -1, -1).clamp(-1, 1) for t in edited.panel]),
                nrow=len(edited.panel),
                scale=s,
            ),
        }
        if req.mask is not None:
            images["mask"] = upscale((req.mask.cpu().numpy() * 255).astype(np.uint8), s)
        return Result(images, info, to_uint8(out))

    def _edit_request(
        self,
        m: Loaded,
        task: str,
        image: np.ndarray | None,
        layers: list[np.ndarray] | None,
        composite: np.ndarray | None,
        steps: Any,
        sigma: Any,
        sigma_start: Any,
        factor: Any,
        frames: Any,
        seed: int,
        seed2: Any,
        image2: np.ndarray | None,
    ) -> EditRequest:
        """The page's inputs (an image, the layers drawn on it, the fields of the tab) as an ``EditRequest``."""
        C, R = m.channels, m.resolution
        lo, hi = m.cfg.model.sigma_min, m.cfg.model.sigma_max
        req = EditRequest(task, generator=torch.Generator().manual_seed(seed), grid=m.grid)
        if steps not in (None, "", 0) and task in ("inpaint", "colorize", "superres"):
            req.sigmas = default_edit_sigmas(as_int(steps, "steps", 1, MAX_PAGE_STEPS), lo, hi, m.grid)
        if task == "interpolate":
            req.frames = as_int(frames, "frames", 2, MAX_FRAMES)
            if image is None:
                req.seeds = (seed, as_int(seed2, "second seed", 0, 2**62))
                return req
            if image2 is None:
                raise CmkitError("interpolating images needs a second image")
            req.images2 = to_tensor(to_model_image(image2, C, R, "the second image")).to(self.device)
            req.sigma = as_float(sigma if sigma else 2.0, "σ", lo, hi)
        if image is None:
            raise CmkitError("no input image: load a held-out image or upload one first")
        y = to_tensor(to_model_image(image, C, R, "the input image")).to(self.device)
        if task == "inpaint":
            mask = mask_from_layers(layers, R)
            if not mask.any():
                raise CmkitError("draw the region to fill on the image first (the mask is empty)")
            req.mask = torch.from_numpy(mask).to(self.device)
        elif task == "stroke":
            if composite is None:
                raise CmkitError("paint strokes on the canvas first")
            painted = to_model_image(
                np.clip(downsample(np.asarray(composite)[..., :3], R), 0, 255).round().astype(np.uint8),
                C,
                R,
                "the stroke painting",
            )
            y = to_tensor(painted).to(self.device)
            req.sigma_start = as_float(sigma_start, "σ start", lo, hi)
        elif task == "colorize" and C != 3:
            raise CmkitError("colorization needs a colour (3-channel) model, e.g. emoji-ect")
        elif task == "superres":
            req.factor = as_int(factor, "factor", 2, R)
            if R % req.factor:
                raise CmkitError(f"factor {req.factor} does not divide the model's {R}×{R} images")
            y = torch.nn.functional.avg_pool2d(y, req.factor)
        elif task == "denoise":
            req.sigma, req.add_noise = as_float(sigma, "σ", lo, hi), True
        req.images = y
        return req
