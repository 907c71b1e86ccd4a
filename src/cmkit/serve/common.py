"""What every tab of the page shares: limits, path checks, the model cache, results, image conversions and the
checks of form values (each one ``CmkitError`` line)."""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from torch import Tensor, nn

from ..editing.transforms import LUMA
from ..errors import CmkitError
from ..imageio import from_uint8, make_grid, to_uint8
from ..latent import autoencoder_config

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
            raise CmkitError(
                f"{what} {text!r} is outside the paths given on the command line ({given}); "
                "restart `cmkit serve` with --allow PATH to use it"
            )
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
        """The side of the images the model gives (a latent model's decoded and cropped images, not its latents)."""
        lat = self.cfg.latent
        return int(lat.crop or lat.image_size) if lat.autoencoder else int(self.cfg.model.img_resolution)

    @property
    def channels(self) -> int:
        lat = self.cfg.latent
        return autoencoder_config(lat.autoencoder).in_channels if lat.autoencoder else int(self.cfg.model.in_channels)

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
        raise CmkitError(
            f"{what} is {w}×{h} pixels but this model works on {resolution}×{resolution} images; "
            f"upload a {resolution}×{resolution} image"
        )
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
    chans = [
        np.asarray(Image.fromarray(a[..., c].astype(np.uint8)).resize((resolution, resolution), Image.BOX), np.float64)
        for c in range(a.shape[2])
    ]
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


def run_mtime(run: Path) -> float:
    """When a run last wrote its log (or config)."""
    times = [(run / f).stat().st_mtime for f in ("log.jsonl", "config.json") if (run / f).is_file()]
    return max(times, default=0.0)


def as_int(value: Any, what: str, low: int, high: int) -> int:
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


def as_float(value: Any, what: str, low: float, high: float, range_name: str = "the model's σ range") -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise CmkitError(f"{what} must be a number; got {value!r}") from None
    if not math.isfinite(v) or not low <= v <= high:
        raise CmkitError(f"{what} must lie in {range_name} [{low:g}, {high:g}]; got {value!r}")
    return v
