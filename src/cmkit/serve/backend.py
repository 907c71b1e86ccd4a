"""What the page does, without the page: sampling, editing, decoding and reading runs, on cmkit's own API.

Every method takes the plain values a form sends (strings, numbers, uint8 arrays), checks them, and either
returns uint8 images and a one-line summary or raises :class:`~cmkit.errors.CmkitError` with one clear line.
Nothing here imports gradio, so it is tested directly and the UI (``app.py``) stays a thin layer.

Paths typed in the page go through :class:`PathPolicy`: only files under the paths given on the command line
(``--runs``, ``--allow``) can be read, after resolving ``..`` and symbolic links. Shipped models are named, never
given as paths. Models and decoders are loaded once and cached (:class:`Cache`), keyed by their weights file's
modification time, so a run that writes a newer export is reloaded.
"""
from __future__ import annotations

import json
import math
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from ..datasets import SPLIT_DATASETS, load_dataset
from ..decoder.decoder import ConsistencyDecoder
from ..decoder.files import read_latents
from ..decoder.latents import check_latents, resolve_scaled
from ..decoder.schedule import DTYPES, MAX_DECODE_STEPS, parse_schedule, steps_to_schedule
from ..denoiser_config import is_diffusion
from ..editing.editor import default_edit_sigmas
from ..editing.run import TASKS, EditRequest, run_task
from ..editing.transforms import LUMA
from ..errors import CmkitError
from ..formats.model_dir import MODEL_FILE, read_model_dir, resolve_model_dir
from ..formats.run_dir import RunDir
from ..formats.zoo import is_model_name, models_root, shipped_model_dir, shipped_models
from ..generate import multistep_sigmas, sample_images
from ..imageio import from_uint8, make_grid, to_uint8
from ..inputs import check_seed, class_labels, parse_sigmas
from ..load import load_model
from ..schedules import off_grid_note, training_grid


#: the most images one page request generates (a grid of 8×8)
MAX_SAMPLES = 64
#: the most σ levels / sampler steps / decoder steps a page request runs
MAX_PAGE_STEPS = 200
#: side of the image shown for editing: small images are upscaled by an integer factor to about this size
EDIT_DISPLAY = 280
#: interpolation frames
MAX_FRAMES = 16


# --- paths ---------------------------------------------------------------------------------------------

class PathPolicy:
    """The files a request may read: those under ``roots`` (the paths given on the command line).

    A path typed in the page is taken relative to the directory the server started in, resolved (``..`` and
    symbolic links followed) and refused unless it lies under one of the roots."""

    def __init__(self, roots: list[str | Path], base: str | Path | None = None):
        self.base = Path(base or os.getcwd()).resolve()
        self.roots = [self._absolute(r).resolve() for r in roots]

    def _absolute(self, p: str | Path) -> Path:
        p = Path(p).expanduser()
        return p if p.is_absolute() else self.base / p

    def allows(self, path: Path) -> bool:
        return any(path == r or path.is_relative_to(r) for r in self.roots)

    def check(self, text: str | None, what: str) -> Path:
        """The resolved path of ``text`` if a request may read it, else one :class:`CmkitError` line."""
        text = (text or "").strip()
        if not text:
            raise CmkitError(f"{what}: no path given")
        if "\x00" in text:
            raise CmkitError(f"{what}: not a valid path")
        p = self._absolute(text).resolve()
        if not self.allows(p):
            given = ", ".join(map(str, self.roots)) or "none"
            raise CmkitError(f"{what} {text!r} is outside the paths given on the command line ({given}); "
                             "restart `cmkit serve` with --allow PATH to use it")
        return p


# --- caches --------------------------------------------------------------------------------------------

class Cache:
    """A small thread-safe LRU of loaded objects: each key is loaded once, even by concurrent requests."""

    def __init__(self, size: int = 6):
        self.size, self.items, self.lock = size, OrderedDict(), threading.Lock()
        self.loads = 0  # how many times a loader ran (tests check that models are loaded once)

    def get(self, key: Any, load: Callable[[], Any]) -> Any:
        with self.lock:  # loading under the lock: a second request for the same model waits for the first
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
            value = load()
            self.loads += 1
            self.items[key] = value
            while len(self.items) > self.size:
                self.items.popitem(last=False)
            return value


@dataclass
class Loaded:
    """A loaded diffusion or consistency model and what the page shows about it."""

    ref: str
    path: Path
    model: nn.Module
    cfg: Any
    description: str = ""
    grid: list[float] | None = None

    @property
    def resolution(self) -> int:
        return int(self.cfg.model.img_resolution)

    @property
    def channels(self) -> int:
        return int(self.cfg.model.in_channels)

    @property
    def is_cm(self) -> bool:
        return not self.cfg.is_diffusion()  # CM, sCM (TrigFlow) or MeanFlow


@dataclass
class Result:
    """Images of one request (uint8 HWC, display-sized) and a Markdown summary."""

    images: dict[str, np.ndarray] = field(default_factory=dict)
    info: str = ""
    native: np.ndarray | None = None  # the output at the model's own size (uint8 NHWC), for downloading
    extra: dict[str, Any] = field(default_factory=dict)


# --- image helpers -------------------------------------------------------------------------------------

def display_scale(resolution: int, target: int = EDIT_DISPLAY) -> int:
    return max(1, target // max(1, resolution))


def grid_image(x: Tensor | np.ndarray, nrow: int | None = None, scale: int | None = None) -> np.ndarray:
    """A batch in [-1, 1] (or uint8 NHWC) → one uint8 RGB grid, small images upscaled to be visible."""
    a = to_uint8(x) if isinstance(x, Tensor) else x
    scale = scale or max(1, 64 // a.shape[1])
    return make_grid(a, nrow=nrow, scale=scale)


def upscale(a: np.ndarray, s: int) -> np.ndarray:
    """uint8 (H, W[, C]) → nearest ×s, as RGB."""
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return a.repeat(s, 0).repeat(s, 1)


def to_model_image(a: np.ndarray, channels: int, resolution: int, what: str = "the image") -> np.ndarray:
    """An uploaded uint8 image (H, W), (H, W, 3|4) → (R, R, C) for the model, or one error line for a wrong size."""
    if a is None:
        raise CmkitError(f"{what}: no image")
    a = np.asarray(a)
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 3, 4)):
        raise CmkitError(f"{what} has shape {a.shape}; expected a grey or colour image")
    h, w = a.shape[:2]
    if (h, w) != (resolution, resolution):
        raise CmkitError(f"{what} is {w}×{h} pixels but this model works on {resolution}×{resolution} images; "
                         f"upload a {resolution}×{resolution} image")
    if a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.floating) and a.size and float(np.nanmax(a)) <= 1.0:
            a = a * 255.0
        a = np.clip(np.nan_to_num(a.astype(np.float64)), 0, 255).round().astype(np.uint8)
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[2] == 4:
        alpha = a[..., 3:4].astype(np.float64) / 255  # transparent pixels over black, the datasets' background
        a = (a[..., :3] * alpha).round().astype(np.uint8)
    if channels == 1 and a.shape[2] == 3:
        w_ = np.asarray(LUMA, np.float64)
        a = (a.astype(np.float64) @ (w_ / w_.sum())).round().clip(0, 255).astype(np.uint8)[..., None]
    elif channels == 3 and a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return a


def to_tensor(a: np.ndarray) -> Tensor:
    """uint8 (R, R, C) → (1, C, R, R) in [-1, 1]."""
    return from_uint8(a[None])


def downsample(a: np.ndarray, resolution: int) -> np.ndarray:
    """A drawn layer/composite at display size (H, W, C) → float (R, R, C) box averages."""
    from PIL import Image

    a = np.asarray(a)
    if a.ndim == 2:
        a = a[..., None]
    chans = [np.asarray(Image.fromarray(a[..., c].astype(np.uint8)).resize((resolution, resolution), Image.BOX),
                        np.float64) for c in range(a.shape[2])]
    return np.stack(chans, -1)


def mask_from_layers(layers: list[np.ndarray] | None, resolution: int, coverage: float = 0.25) -> np.ndarray:
    """Painted layers (RGBA at display size) → a (R, R) float mask: 1 where a pixel is painted over ≥ ``coverage``."""
    m = np.zeros((resolution, resolution))
    for layer in layers or []:
        layer = np.asarray(layer)
        if layer.ndim != 3 or layer.shape[2] != 4:
            continue
        alpha = downsample(((layer[..., 3] > 0) * 255).astype(np.uint8), resolution)[..., 0] / 255
        m = np.maximum(m, alpha)
    return (m >= coverage).astype(np.float32)


# --- the backend ---------------------------------------------------------------------------------------

class Backend:
    """Models, runs and files of one ``cmkit serve`` process."""

    def __init__(self, runs: str | Path | None = None, allow: list[str | Path] | None = None,
                 base: str | Path | None = None, device: str = "cpu"):
        roots = [p for p in [runs, *(allow or [])] if p]
        self.policy = PathPolicy(roots, base)
        self.runs_root = self.policy.roots[0] if runs else None
        self.device = device
        self.models, self.decoders, self.datasets = Cache(6), Cache(2), Cache(4)

    # models --------------------------------------------------------------------------------------------

    def model_choices(self, consistency_only: bool = False) -> list[str]:
        """Shipped model names, then the runs under --runs whose export samples: diffusion and consistency
        models (kind ``denoiser``), not autoencoders or decoders; ``consistency_only`` also leaves out diffusion
        models (the editing tasks need a one-step generator)."""
        def samples(config_json: Path) -> bool:
            try:
                meta = json.loads(config_json.read_text())
                cfg = meta["config"]
                if meta.get("kind", "denoiser") != "denoiser":
                    return False
                return not (consistency_only and is_diffusion(cfg["model"].get("precond"),
                                                              cfg.get("loss", {}).get("method")))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                return False

        names = [name for name in shipped_models() if samples(models_root() / name / "config.json")]
        names += [str(self.runs_root / run) for run in self.list_runs()
                  if samples(self.runs_root / run / "model" / "config.json")]
        return names

    def model_dir(self, ref: str) -> Path:
        """A shipped name, or an allowed path of a model or run directory → the model directory."""
        ref = (ref or "").strip()
        if not ref:
            raise CmkitError("choose a model: a shipped name (see `cmkit models`) or a model/run directory")
        shipped = shipped_model_dir(ref)
        if shipped is not None:
            return shipped
        if is_model_name(ref) and not self.policy.roots:
            raise CmkitError(f"unknown model {ref!r}: not a shipped model (see `cmkit models`)")
        try:
            path = self.policy.check(ref, "model")
        except CmkitError:
            if is_model_name(ref):
                raise CmkitError(f"unknown model {ref!r}: not a shipped model (see `cmkit models`), nor a directory "
                                 "under the paths given on the command line") from None
            raise
        if not path.exists():
            raise CmkitError(f"unknown model {ref!r}: not a shipped model (see `cmkit models`) and no such directory"
                             if is_model_name(ref) else f"model not found: no directory {ref!r}")
        d = resolve_model_dir(path)
        if not self.policy.allows(d.resolve()):  # a model/ symlinked out of an allowed run
            raise CmkitError(f"model {ref!r} is outside the paths given on the command line")
        return d

    def load(self, ref: str) -> Loaded:
        d = self.model_dir(ref)
        weights = d / MODEL_FILE
        if not weights.is_file():
            raise CmkitError(f"model {ref!r}: missing weights ({weights} not found)")
        key = (str(d.resolve()), weights.stat().st_mtime_ns)

        def load() -> Loaded:
            md = read_model_dir(d, "denoiser")
            model, cfg = load_model(d, device=self.device)
            return Loaded(ref, d, model, cfg, md.meta.get("description", ""), training_grid(cfg))

        return self.models.get(key, load)

    def model_info(self, ref: str) -> dict[str, Any]:
        """What the page shows when a model is chosen: a description and the σ schedules it offers."""
        m = self.load(ref)
        c = m.cfg.model
        info = {"description": m.description, "kind": "consistency model" if m.is_cm else "diffusion (EDM) model",
                "resolution": m.resolution, "channels": m.channels, "num_classes": int(c.num_classes or 0),
                "schedules": {}, "default_steps": 1 if m.is_cm else int(m.cfg.sample.steps)}
        if m.is_cm:
            for k in (1, 2, 4):
                try:
                    info["schedules"][f"{k} step{'s' if k > 1 else ''}"] = multistep_sigmas(m.cfg, k)
                except CmkitError:
                    pass
            own = [float(s) for s in m.cfg.sample.sigmas]
            if len(own) > 1:
                info["schedules"]["published (config)"] = own
        return info

    def teacher_for(self, ref: str) -> str | None:
        """The teacher of a distilled model: its recorded teacher when it can be found, else a shipped EDM model
        of the same data and size; a diffusion model is its own."""
        m = self.load(ref)
        if not m.is_cm:
            return ref
        teacher = str(getattr(m.cfg.train, "teacher", "") or "")
        if teacher:
            name = Path(teacher).name
            if shipped_model_dir(name) is not None:
                return name
            try:
                self.model_dir(teacher)
                return teacher
            except CmkitError:
                pass
        for name in shipped_models():
            try:
                cfg = json.loads((models_root() / name / "config.json").read_text())["config"]
            except (OSError, ValueError, KeyError):
                continue
            if (is_diffusion(cfg["model"].get("precond"), cfg.get("loss", {}).get("method"))
                    and cfg["data"].get("name") == m.cfg.data.name
                    and cfg["model"].get("img_resolution") == m.resolution):
                return name
        return None

    # sampling ------------------------------------------------------------------------------------------

    def sample(self, ref: str, sampler: str = "auto", steps: int | None = None, sigmas: str = "", seed: int = 0,
               n: int = 16, classes: str = "") -> Result:
        n, seed = _int(n, "number of images", 1, MAX_SAMPLES), _int(seed, "seed", 0, 2**62)
        steps = None if steps in (None, "", 0) else _int(steps, "steps", 1, MAX_PAGE_STEPS)
        check_seed(seed, count=n)
        sigma_list = parse_sigmas(sigmas) if (sigmas or "").strip() else None
        if sigma_list and len(sigma_list) > MAX_PAGE_STEPS:
            raise CmkitError(f"at most {MAX_PAGE_STEPS} σ levels; got {len(sigma_list)}")
        m = self.load(ref)
        t0 = time.perf_counter()
        s = sample_images(m.model, m.cfg, n, sampler=None if sampler in ("", "auto", None) else sampler, steps=steps,
                          sigmas=sigma_list, classes=classes or None, seed=seed, batch_size=MAX_SAMPLES,
                          device=self.device, progress=False)
        x, sampler_name, sigma_list, evals = s.images, s.sampler, s.sigmas, s.nfe
        ms = 1000 * (time.perf_counter() - t0) / n
        sig = f", σ = {', '.join(f'{s:.4g}' for s in sigma_list)}" if sampler_name in ("onestep", "multistep") else ""
        info = (f"**{ref}**: {sampler_name}, {evals} network evaluation{'s' if evals > 1 else ''} (NFE){sig}; "
                f"{n} image{'s' if n > 1 else ''}, **{ms:.1f} ms per image**")
        if (sigmas or "").strip() and sampler_name == "multistep":
            note = off_grid_note(sigma_list, m.grid)
            info += f"  \nnote: {note}" if note else ""

        r = Result({"grid": grid_image(x, nrow=min(8, n))}, info, to_uint8(x))
        r.extra.update(nfe=evals, ms_per_image=ms, sampler=sampler_name)
        return r

    def compare(self, ref: str, teacher: str = "", teacher_steps: int = 18, seed: int = 0, n: int = 16) -> Result:
        """The consistency model in one step beside its teacher's Heun sampler, same seeds, with the speed-up."""
        teacher = (teacher or "").strip() or self.teacher_for(ref)
        if not teacher:
            raise CmkitError(f"no teacher found for {ref!r}: choose a diffusion (EDM) model as the teacher")
        if not self.load(ref).is_cm:
            raise CmkitError(f"{ref!r} is a diffusion model: compare a consistency model with it as the teacher")
        if self.load(teacher).is_cm:
            raise CmkitError(f"teacher {teacher!r} is a consistency model; choose a diffusion (EDM) model")
        tsteps = _int(teacher_steps, "teacher steps", 2, MAX_PAGE_STEPS)
        self.sample(ref, "onestep", 1, "", seed, 1)  # warm-up: first calls pay one-time costs, not the method
        self.sample(teacher, "heun", 2, "", seed, 1)
        cm = self.sample(ref, "onestep", 1, "", seed, n)
        te = self.sample(teacher, "heun", tsteps, "", seed, n)
        speed = te.extra["ms_per_image"] / max(cm.extra["ms_per_image"], 1e-9)
        info = (f"consistency model **{ref}**: 1 NFE, {cm.extra['ms_per_image']:.1f} ms/image · teacher "
                f"**{teacher}**: Heun, {te.extra['nfe']} NFE, {te.extra['ms_per_image']:.1f} ms/image · "
                f"**measured speed-up {speed:.0f}×**")
        r = Result({"cm": cm.images["grid"], "teacher": te.images["grid"]}, info)
        r.extra.update(speedup=speed, teacher=teacher)
        return r

    # editing -------------------------------------------------------------------------------------------

    def editable(self, ref: str) -> Loaded:
        m = self.load(ref)
        if not m.is_cm:
            raise CmkitError(f"{ref!r} is a diffusion (EDM) model; editing needs a consistency model")
        return m

    def held_out(self, ref: str, index: int = 0) -> np.ndarray:
        """Image ``index`` of the held-out (test) split of the model's data set, uint8 (R, R, C)."""
        m = self.editable(ref)
        name = m.cfg.data.name
        if name not in SPLIT_DATASETS:
            raise CmkitError(f"the data set of {ref!r} ({name}) has no held-out split; upload an image instead")
        data = self.datasets.get((name, m.resolution, m.channels),
                                 lambda: load_dataset(name, split="test", resolution=m.resolution,
                                                      channels=m.channels))
        index = _int(index, "held-out index", 0, len(data) - 1)
        return data.images[index].permute(1, 2, 0).numpy().astype(np.uint8)

    def check_upload(self, ref: str, image: np.ndarray | None) -> np.ndarray:
        m = self.editable(ref)
        return to_model_image(image, m.channels, m.resolution, "the uploaded image")

    def edit(self, ref: str, task: str, image: np.ndarray | None, layers: list[np.ndarray] | None = None,
             composite: np.ndarray | None = None, *, steps: int | None = None, sigma: float = 0.3,
             sigma_start: float = 5.0, factor: int = 4, frames: int = 9, seed: int = 0, seed2: int = 1,
             image2: np.ndarray | None = None, classes: str = "") -> Result:
        """Run one editing task on ``image`` (uint8 (R, R, C), the model's size) with what was drawn on it, through
        the dispatcher the CLI uses (``cmkit.editing.run``); ``classes`` labels a class-conditional model's image
        (random from the seed when empty)."""
        if task not in TASKS:
            raise CmkitError(f"unknown editing task {task!r}; expected one of {', '.join(TASKS)}")
        m = self.editable(ref)
        req = self._edit_request(m, task, image, layers, composite, steps, sigma, sigma_start, factor, frames,
                                 _int(seed, "seed", 0, 2**62), seed2, image2)
        n = 1 if req.images is None else len(req.images)
        labels = class_labels(classes or None, m.cfg.model.num_classes, n)
        if labels is None and m.cfg.model.num_classes:
            labels = torch.randint(m.cfg.model.num_classes, (n,), generator=torch.Generator().manual_seed(seed))
        req.labels = None if labels is None else labels.to(self.device)
        edited = run_task(m.model, req, (m.channels, m.resolution, m.resolution), m.cfg.model.sigma_max)
        out, R = edited.images, m.resolution
        info = edited.info + (f" (class {', '.join(map(str, labels.tolist()))})" if labels is not None else "")
        if task == "interpolate":
            strip = grid_image(out, nrow=len(out), scale=max(1, 96 // R))
            return Result({"output": strip, "strip": strip}, info, to_uint8(out))
        s = display_scale(R)
        images = {"output": upscale(to_uint8(out)[0], s),
                  "panel": grid_image(torch.cat([t.expand(-1, m.channels, -1, -1).clamp(-1, 1) for t in edited.panel]),
                                      nrow=len(edited.panel), scale=s)}
        if req.mask is not None:
            images["mask"] = upscale((req.mask.cpu().numpy() * 255).astype(np.uint8), s)
        return Result(images, info, to_uint8(out))

    def _edit_request(self, m: Loaded, task: str, image: np.ndarray | None, layers: list[np.ndarray] | None,
                      composite: np.ndarray | None, steps: Any, sigma: Any, sigma_start: Any, factor: Any,
                      frames: Any, seed: int, seed2: Any, image2: np.ndarray | None) -> EditRequest:
        """The page's inputs (an image, the layers drawn on it, the fields of the tab) as an ``EditRequest``."""
        C, R = m.channels, m.resolution
        lo, hi = m.cfg.model.sigma_min, m.cfg.model.sigma_max
        req = EditRequest(task, generator=torch.Generator().manual_seed(seed), grid=m.grid)
        if steps not in (None, "", 0) and task in ("inpaint", "colorize", "superres"):
            req.sigmas = default_edit_sigmas(_int(steps, "steps", 1, MAX_PAGE_STEPS), lo, hi, m.grid)
        if task == "interpolate":
            req.frames = _int(frames, "frames", 2, MAX_FRAMES)
            if image is None:
                req.seeds = (seed, _int(seed2, "second seed", 0, 2**62))
                return req
            if image2 is None:
                raise CmkitError("interpolating images needs a second image")
            req.images2 = to_tensor(to_model_image(image2, C, R, "the second image")).to(self.device)
            req.sigma = _float(sigma if sigma else 2.0, "σ", lo, hi)
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
            painted = to_model_image(np.clip(downsample(np.asarray(composite)[..., :3], R), 0, 255)
                                     .round().astype(np.uint8), C, R, "the stroke painting")
            y = to_tensor(painted).to(self.device)
            req.sigma_start = _float(sigma_start, "σ start", lo, hi)
        elif task == "colorize" and C != 3:
            raise CmkitError("colorization needs a colour (3-channel) model, e.g. emoji-ect")
        elif task == "superres":
            req.factor = _int(factor, "factor", 2, R)
            if R % req.factor:
                raise CmkitError(f"factor {req.factor} does not divide the model's {R}×{R} images")
            y = torch.nn.functional.avg_pool2d(y, req.factor)
        elif task == "denoise":
            req.sigma, req.add_noise = _float(sigma, "σ", lo, hi), True
        req.images = y
        return req

    # decoding ------------------------------------------------------------------------------------------

    def decode(self, latents: str, weights: str, steps: int | None = 2, schedule: str = "", dtype: str = "fp32",
               tile: int | None = None, seed: int = 0) -> Result:
        """Latents file + decoder weights (paths on the server, under the allowed paths) → images."""
        lat_path = self.policy.check(latents, "latents file")
        w_path = self.policy.check(weights, "decoder weights")
        if not w_path.exists():
            raise CmkitError(f"decoder weights not found: {weights}")
        if dtype not in DTYPES:
            raise CmkitError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
        sched = (parse_schedule(schedule) if (schedule or "").strip()
                 else steps_to_schedule(_int(steps or 2, "steps", 1, min(MAX_DECODE_STEPS, MAX_PAGE_STEPS))))
        tile = None if tile in (None, "", 0) else _int(tile, "tile", 1, 4096)
        z = read_latents(lat_path)
        if z.ndim == 3:
            z = z[None]
        stamp = max((p.stat().st_mtime_ns for p in ([w_path] if w_path.is_file() else w_path.iterdir())), default=0)
        dec = self.decoders.get((str(w_path), stamp, dtype),
                                lambda: ConsistencyDecoder.from_pretrained(w_path, device=self.device,
                                                                           dtype=DTYPES[dtype], verify=True))
        check_latents(z, dec.config)
        scaled = resolve_scaled(z, "auto", dec.config.scaling_factor)
        peak = PeakRSS()
        with peak:
            t0 = time.perf_counter()
            x = dec.decode(z, sched, torch.Generator().manual_seed(_int(seed, "seed", 0, 2**62)), tile=tile,
                           tile_overlap=None if tile is None else max(0, tile // 4), scaled=scaled)
            seconds = time.perf_counter() - t0

        info = (f"decoded {tuple(z.shape)} → {tuple(x.shape)} with t = {dec.timesteps(sched)} ({dtype}"
                f"{f', tiles of {tile}' if tile else ''}) in **{seconds:.2f} s**; peak memory {peak.describe()}")
        r = Result({"image": grid_image(x, nrow=min(4, len(x)), scale=max(1, 256 // x.shape[-1]))}, info, to_uint8(x))
        r.extra.update(seconds=seconds, peak_bytes=peak.peak)
        return r

    # runs ----------------------------------------------------------------------------------------------

    def list_runs(self) -> list[str]:
        """Runs under --runs (two levels deep), as paths relative to it, newest first."""
        if self.runs_root is None or not self.runs_root.is_dir():
            return []
        found = []
        for p in sorted(self.runs_root.glob("*")) + sorted(self.runs_root.glob("*/*")):
            inside_run = p.parent != self.runs_root and RunDir(p.parent).is_run()  # e.g. a run's checkpoint/
            if (p.is_dir() and not p.name.startswith(".") and not inside_run and RunDir(p).is_run()
                    and self.policy.allows(p.resolve())):
                found.append(p)
        found.sort(key=lambda p: -_mtime(p))
        return [str(p.relative_to(self.runs_root)) for p in found]

    def run_dir(self, name: str) -> Path:
        if self.runs_root is None:
            raise CmkitError("no runs directory: start `cmkit serve --runs DIR`")
        name = (name or "").strip()
        if not name:
            raise CmkitError("choose a run")
        p = self.policy.check(str(self.runs_root / name) if not Path(name).is_absolute() else name, "run")
        if not (p == self.runs_root or p.is_relative_to(self.runs_root)):
            raise CmkitError(f"run {name!r} is not under {self.runs_root}")
        if not RunDir(p).is_run():
            raise CmkitError(f"{name!r} is not a training run under {self.runs_root}")
        return p

    def run_stamp(self, name: str | None) -> tuple:
        """Changes whenever the Runs tab would show something new: the runs listed, the chosen run's log, samples."""
        runs = tuple(self.list_runs())
        if not name or self.runs_root is None:
            return (runs,)
        try:
            p = self.run_dir(name)
        except CmkitError:
            return (runs, name)
        log = p / "log.jsonl"
        samples = p / "samples"
        return (runs, name, log.stat().st_mtime_ns if log.is_file() else 0, log.stat().st_size if log.is_file() else 0,
                len(list(samples.glob("*.png"))) if samples.is_dir() else 0)

    def run_view(self, name: str) -> dict[str, Any]:
        """Log rows, sample grids over time, config and a status line of one run."""
        from PIL import Image

        run = RunDir(self.run_dir(name))
        rows = run.read_log()
        try:
            config = json.loads(run.config.read_text())
        except (OSError, ValueError):
            config = {}
        total = (config.get("train") or {}).get("steps")
        step = rows[-1].get("step", 0) if rows else 0
        samples = []
        if run.samples.is_dir():
            for f in sorted(run.samples.glob("*.png"))[-24:]:
                try:
                    with Image.open(f) as im:
                        samples.append((np.asarray(im.convert("RGB")), f.stem.replace("_", " ")))
                except OSError:
                    continue
        age = time.time() - run.log.stat().st_mtime if run.log.is_file() else None
        last = rows[-1] if rows else {}
        status = (f"**{name}**: step {step}" + (f" of {total}" if total else "") +
                  (f", loss {last['loss']:.4g}" if isinstance(last.get("loss"), (int, float)) else "") +
                  (f"; log updated {age:.0f} s ago" if age is not None else "; no log yet") +
                  (" (training)" if age is not None and age < 60 and total and step < total else ""))
        return {"rows": rows, "samples": samples, "config": config, "status": status, "step": step}


class PeakRSS:
    """Peak resident memory of this process while the ``with`` block runs (sampled every 5 ms from /proc);
    on a GPU the peak of allocated device memory as well."""

    def __init__(self) -> None:
        self.start = self.peak = self._rss()
        self._stop = threading.Event()

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return 0

    def _watch(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = self._rss()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    def describe(self) -> str:
        mib = 2**20
        return f"{self.peak / mib:.0f} MiB resident (+{max(0, self.peak - self.start) / mib:.0f} MiB during decoding)"


def _mtime(run: Path) -> float:
    """When a run last wrote its log (or config)."""
    times = [(run / f).stat().st_mtime for f in ("log.jsonl", "config.json") if (run / f).is_file()]
    return max(times, default=0.0)


def _int(value: Any, what: str, low: int, high: int) -> int:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise CmkitError(f"{what} must be a whole number; got {value!r}") from None
    if not math.isfinite(f) or f != int(f):
        raise CmkitError(f"{what} must be a whole number; got {value!r}")
    v = int(f)
    if not low <= v <= high:
        raise CmkitError(f"{what} must be between {low} and {high}; got {v}")
    return v


def _float(value: Any, what: str, low: float, high: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise CmkitError(f"{what} must be a number; got {value!r}") from None
    if not math.isfinite(v) or not low <= v <= high:
        raise CmkitError(f"{what} must lie in the model's σ range [{low:g}, {high:g}]; got {value!r}")
    return v
