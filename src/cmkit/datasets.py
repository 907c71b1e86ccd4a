"""Image data sets held in memory as uint8 (N, C, H, W), served as [-1, 1] batches.

Sources: scikit-learn's 8×8 digits (bundled), Fashion-MNIST / MNIST IDX files (default location: the
Debian package ``dataset-fashion-mnist``), colour emoji rendered from Debian's ``fonts-noto-color-emoji``,
an image folder (with captions, for a text-to-image teacher: ``load_captions``), an ``.npz`` of uint8 NHWC images
(``arr_0``, optional labels ``arr_1``), or a shard set on disk
(``cmkit.shards``: data sets too large for memory, read image by image). Batches are a pure function of
(seed, step, rank), which makes resumed and multi-process training exactly reproducible; ``Batches`` can prepare
them ahead in ``torch.utils.data`` worker processes (``data.workers``) without changing them.
"""

from __future__ import annotations

import gzip
import itertools
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from .errors import CmkitError
from .imageio import crop_resize, read_image, read_npz_images
from .shards import ShardSet, image_files

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
EMOJI_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
EMOJI_RANGES = ((0x1F300, 0x1F650), (0x1F680, 0x1F700), (0x1F900, 0x1FA00), (0x1FA70, 0x1FB00), (0x2600, 0x27C0))
HOW_TO_GET = {
    "fashion_mnist": "install it with `apt-get install dataset-fashion-mnist` or set data.root to a folder "
    "holding train-images-idx3-ubyte.gz etc.",
    "mnist": "set data.root to a folder holding the MNIST IDX files (train-images-idx3-ubyte[.gz], ...)",
}


@dataclass
class ImageData:
    """uint8 images (N, C, H, W) and optional integer labels (N,); a captioned set has one caption per image and
    its labels are the image indices (what a batch looks its captions up by)."""

    images: Tensor
    labels: Tensor | None = None
    num_classes: int = 0
    captions: list[str] | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def take(self, idx: Tensor) -> Tensor:
        """uint8 images at the given indices (what ``ShardSet.take`` reads from disk)."""
        return self.images[idx]


# --- readers ---------------------------------------------------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): magic 0x0000 08 ndim, big-endian dims, uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise CmkitError(f"cannot read IDX file {path}: {e}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise CmkitError(f"{path} is not a uint8 IDX file (expected magic 0x00 0x00 0x08 <ndim>)")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data[4 + 4 * ndim :], np.uint8)
    if len(data) < 4 + 4 * ndim or body.size != int(np.prod(dims)):
        raise CmkitError(f"{path}: IDX header says {dims} but the file holds {body.size} values (truncated?)")
    return body.reshape(dims)


def _find(root: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    return None


def load_idx_dataset(name: str, root: str, split: str) -> ImageData:
    """Fashion-MNIST or MNIST from the standard IDX files in ``root``; split 'train' or 'test'."""
    if not root and name == "mnist":
        raise CmkitError(f"data.root is not set; {HOW_TO_GET[name]}")
    base = Path(root or FASHION_MNIST_ROOT)
    if split not in ("train", "test"):
        raise CmkitError(f"unknown split {split!r}; expected 'train' or 'test'")
    prefix = "train" if split == "train" else "t10k"
    img_path = _find(base, f"{prefix}-images-idx3-ubyte")
    lab_path = _find(base, f"{prefix}-labels-idx1-ubyte")
    if img_path is None or lab_path is None:
        raise CmkitError(
            f"{name} not found: expected {prefix}-images-idx3-ubyte[.gz] and "
            f"{prefix}-labels-idx1-ubyte[.gz] in '{base}'; {HOW_TO_GET[name]}"
        )
    images, labels = read_idx(img_path), read_idx(lab_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise CmkitError(f"{img_path}: expected (N, H, W) images and N labels, got {images.shape} and {labels.shape}")
    return ImageData(torch.from_numpy(images.copy())[:, None], torch.from_numpy(labels.astype(np.int64)), 10)


def load_digits() -> ImageData:
    """scikit-learn's 1797 8×8 digits (bundled; 0..16 grey levels rescaled to 0..255)."""
    with resources.files("cmkit").joinpath("assets/digits8x8.npz").open("rb") as f:
        z = np.load(f)
        images, labels = z["images"], z["labels"]
    return ImageData(torch.from_numpy(images)[:, None], torch.from_numpy(labels.astype(np.int64)), 10)


def load_npz(path: str) -> ImageData:
    """uint8 images NHWC (or NHW) under ``arr_0`` (or ``images``), labels optional under ``arr_1``/``labels``.

    Read by :func:`cmkit.imageio.read_npz_images`: an unreadable file, float or other non-uint8 images, other shapes,
    no images or non-square images are one error line each; labels must be N non-negative integers."""
    p = Path(path).expanduser()
    if not str(path).strip() or not p.is_file():
        raise CmkitError(f"npz data set not found: {p} (expected an .npz with uint8 NHWC images under arr_0)")
    a = read_npz_images(p, "npz data set", keys=("arr_0", "images"))
    with np.load(p, allow_pickle=False) as z:
        lab_key = "arr_1" if "arr_1" in z.files else "labels" if "labels" in z.files else None
        try:
            lab = z[lab_key] if lab_key else None
        except (ValueError, OSError, EOFError) as e:
            raise CmkitError(f"{p}: cannot read the labels under {lab_key!r} ({' '.join(str(e).split())})") from None
    labels = None
    if lab is not None:
        if lab.dtype.kind not in "iub" or lab.ndim != 1 or len(lab) != len(a):
            raise CmkitError(
                f"{p}: labels under {lab_key!r} must be {len(a)} integers (one per image), got {lab.dtype} {lab.shape}"
            )
        if len(lab) and lab.min() < 0:
            raise CmkitError(f"{p}: labels under {lab_key!r} must be class indices >= 0, got {int(lab.min())}")
        labels = torch.from_numpy(lab.astype(np.int64))
    images = torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).contiguous()
    return ImageData(images, labels, int(labels.max()) + 1 if labels is not None else 0)


def load_folder(path: str, resolution: int, channels: int) -> ImageData:
    """Every image file under ``path`` (recursively), centre-cropped to a square and resized, decoded into memory
    before training (for large folders, ``cmkit prepare-data folder`` makes a shard set once, in parallel).

    Files are read by :func:`cmkit.imageio.read_image`: a corrupt, truncated, oversized (decompression bomb) or
    32-bit/float file is one error line naming it; 16-bit greys are scaled to 8 bits."""
    from PIL import Image

    if resolution < 1:
        raise CmkitError(f"a folder data set needs the image size: set model.img_resolution (got {resolution})")
    out = []
    for f in image_files(path):
        im = crop_resize(Image.fromarray(read_image(f, "L" if channels == 1 else "RGB", "image")), resolution, "center")
        a = np.asarray(im, np.uint8)
        out.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    return ImageData(torch.from_numpy(np.stack(out)))


#: where the captions of a ``captions`` data set are (``load_captions``)
CAPTIONS_LAYOUT = (
    'metadata.jsonl lines {"file_name": "a.png", "text": "a caption"} at the folder\'s top (Hugging Face '
    "ImageFolder's layout) or a .txt file of the same name beside each image"
)


def read_metadata(path: Path) -> dict[str, str]:
    """file_name → text of an ImageFolder ``metadata.jsonl``; a line that is not such an object is one error line."""
    table = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            table[str(row["file_name"])] = str(row["text"])
        except (ValueError, KeyError, TypeError):
            raise CmkitError(f'{path}:{n}: expected a JSON object with "file_name" and "text"') from None
    return table


def load_captions(path: str, resolution: int, channels: int) -> ImageData:
    """A folder of captioned images (the training data of a text-to-image teacher, e.g. LCM-LoRA on Stable
    Diffusion): the images as ``load_folder`` reads them, each caption from ``CAPTIONS_LAYOUT``. An image without a
    caption is one error line naming it."""
    root = Path(path).expanduser()
    data = load_folder(path, resolution, channels)
    meta = root / "metadata.jsonl"
    table = read_metadata(meta) if meta.is_file() else {}
    captions = []
    for f in image_files(path):
        txt = f.with_suffix(".txt")
        caption = table.get(f.relative_to(root).as_posix())
        if caption is None and txt.is_file():
            caption = txt.read_text(encoding="utf-8").strip()
        if caption is None:
            raise CmkitError(f"no caption for {f}: expected {CAPTIONS_LAYOUT}")
        captions.append(caption)
    return ImageData(data.images, torch.arange(len(captions)), 0, captions)


def render_emoji(font_path: str, size: int = 32) -> np.ndarray:
    """Every colour glyph of the Noto Color Emoji font in EMOJI_RANGES, cropped, centred on white, resized.

    Returns uint8 (N, size, size, 3); code points without a glyph render empty and are skipped.
    """
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(font_path, 109)  # the font's only bitmap strike
    out = []
    for lo, hi in EMOJI_RANGES:
        for cp in range(lo, hi):
            im = Image.new("RGBA", (160, 160), (0, 0, 0, 0))
            ImageDraw.Draw(im).text((10, 10), chr(cp), font=font, embedded_color=True)
            box = im.getbbox()
            if box is None:
                continue
            im = im.crop(box)
            side = max(im.size)
            canvas = Image.new("RGBA", (side, side), (255, 255, 255, 255))
            canvas.alpha_composite(im, ((side - im.width) // 2, (side - im.height) // 2))
            out.append(np.asarray(canvas.convert("RGB").resize((size, size), Image.LANCZOS)))
    return np.stack(out)


def load_emoji(root: str, split: str, resolution: int) -> ImageData:
    """Noto colour emoji rendered at ``resolution`` (Debian ``fonts-noto-color-emoji``); every 10th glyph
    is the held-out ``test`` split. Rendered once and cached under ~/.cache/cmkit."""
    import hashlib
    import os

    font = Path(root or EMOJI_FONT)
    if not font.is_file():
        raise CmkitError(
            f"emoji font not found: {font}; install it with `apt-get install fonts-noto-color-emoji` "
            f"or set data.root to NotoColorEmoji.ttf"
        )
    if split not in ("train", "test"):
        raise CmkitError(f"unknown split {split!r}; expected 'train' or 'test'")
    size = resolution or 32
    key = hashlib.sha1(f"{font.stat().st_size}-{font.stat().st_mtime_ns}-{size}".encode()).hexdigest()[:12]
    cache = Path(os.environ.get("CMKIT_CACHE", Path.home() / ".cache" / "cmkit")) / f"emoji{size}-{key}.npz"
    images = None
    if cache.is_file():
        try:
            images = np.load(cache, allow_pickle=False)["arr_0"]
        except Exception:  # noqa: BLE001 - a damaged cache is rendered again
            images = None
    if images is None:
        images = render_emoji(str(font), size)
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(cache, arr_0=images)
        except OSError:
            pass  # a read-only cache only costs rendering again
    test = np.arange(len(images)) % 10 == 9
    picked = images[test] if split == "test" else images[~test]
    return ImageData(torch.from_numpy(picked).permute(0, 3, 1, 2).contiguous())


SPLIT_DATASETS = ("fashion_mnist", "mnist", "emoji")
DATASETS = ("digits", "fashion_mnist", "mnist", "emoji", "folder", "captions", "npz", "shards")


def load_dataset(
    name: str, root: str = "", split: str = "train", resolution: int = 0, channels: int = 0
) -> ImageData | ShardSet:
    """Load a data set by name (``digits``, ``fashion_mnist``, ``mnist``, ``emoji``, ``folder``, ``npz``) or open
    a shard set (``shards``: nothing is read until a batch asks for its images).

    ``split='test'`` exists for the data sets with a held-out split (``SPLIT_DATASETS``); asking it of another
    one is an error rather than silently training on everything."""
    if split != "train" and name not in SPLIT_DATASETS:
        raise CmkitError(
            f"data set {name!r} has no {split!r} split (only {', '.join(SPLIT_DATASETS)} do); use data.split=train"
        )
    if name == "digits":
        data = load_digits()
    elif name in ("fashion_mnist", "mnist"):
        data = load_idx_dataset(name, root, split)
    elif name == "emoji":
        data = load_emoji(root, split, resolution)
    elif name == "npz":
        data = load_npz(root)
    elif name == "folder":
        data = load_folder(root, resolution, channels or 3)
    elif name == "captions":
        data = load_captions(root, resolution, channels or 3)
    elif name == "shards":
        data = ShardSet(root)
    else:
        raise CmkitError(f"unknown data set {name!r}; expected one of {', '.join(DATASETS)}")
    if resolution and data.shape[1:] != (resolution, resolution):
        raise CmkitError(
            f"data set {name!r} has {data.shape[2]}×{data.shape[1]} images but the model expects "
            f"{resolution}×{resolution}"
            + (f" (set model.img_resolution={data.shape[1]})" if data.shape[1] == data.shape[2] else "")
        )
    if channels and data.shape[0] != channels:
        raise CmkitError(
            f"data set {name!r} has {data.shape[0]} channels but the model expects {channels} "
            f"(set model.in_channels={data.shape[0]})"
        )
    return data


# --- batches ---------------------------------------------------------------------------------------


class Batches:
    """Deterministic batches: batch ``step`` is a function of (seed, step) only; rank r gets its slice.

    ``workers`` > 0 prepares the coming batches in that many ``torch.utils.data`` worker processes (with pinned
    memory for a GPU) while the current step runs; the batches are the same as with ``workers=0``. ``get`` takes
    a microbatch of the rank's batch for gradient accumulation."""

    def __init__(
        self,
        data: ImageData | ShardSet,
        batch_size: int,
        seed: int = 0,
        flip: bool = False,
        rank: int = 0,
        world_size: int = 1,
        workers: int = 0,
        accum: int = 1,
    ):
        if batch_size % (world_size * accum):
            raise CmkitError(
                f"train.batch_size={batch_size} must be divisible by the {world_size} processes × train.accum={accum}"
            )
        if batch_size > len(data):
            raise CmkitError(f"train.batch_size={batch_size} is larger than the data set ({len(data)} images)")
        self.data, self.batch_size, self.seed, self.flip = data, batch_size, seed, flip
        self.rank, self.world_size, self.workers, self.accum = rank, world_size, workers, accum
        self.per_epoch = len(data) // batch_size
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)
        self._cached: tuple[int, tuple[Tensor, Tensor | None]] | None = None
        self._loader: Iterator | None = None
        self._next = -1

    def indices(self, step: int) -> Tensor:
        epoch, j = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(len(self.data), generator=g)
        idx = self._perm[j * self.batch_size : (j + 1) * self.batch_size]
        return idx.chunk(self.world_size)[self.rank]

    def compute(self, step: int) -> tuple[Tensor, Tensor | None]:
        """This rank's batch of ``step`` on the CPU: images in [-1, 1] as float32 (b, C, H, W), labels or None."""
        idx = self.indices(step)
        x = self.data.take(idx).float() / 127.5 - 1
        if self.flip:
            g = torch.Generator().manual_seed(self.seed * 7_919 + step)
            mask = torch.rand(self.batch_size, generator=g).chunk(self.world_size)[self.rank] < 0.5
            x = torch.where(mask[:, None, None, None], x.flip(-1), x)
        labels = self.data.labels[idx] if self.data.labels is not None else None
        return x, labels

    def positions(self, micro: int = 0) -> Tensor:
        """Where the samples of this rank's microbatch ``micro`` sit in the global batch of a step (the keys of
        per-sample noise, ``cmkit.noise``)."""
        per_rank = self.batch_size // self.world_size
        per_micro = per_rank // self.accum
        return torch.arange(per_micro) + self.rank * per_rank + micro * per_micro

    def _rank_batch(self, step: int) -> tuple[Tensor, Tensor | None]:
        if self._cached is not None and self._cached[0] == step:  # the microbatches of a step, a retried step
            return self._cached[1]
        if not self.workers:
            batch = self.compute(step)
        else:
            if self._loader is None or self._next != step:
                self._loader, self._next = self._start_loader(step), step
            batch, self._next = next(self._loader), step + 1
        self._cached = (step, batch)
        return batch

    def _start_loader(self, step: int) -> Iterator:
        loader = torch.utils.data.DataLoader(
            _StepBatches(self),
            batch_size=None,
            sampler=_StepsFrom(step),
            num_workers=self.workers,
            pin_memory=torch.cuda.is_available(),
        )
        return iter(loader)

    def get(self, step: int, device: torch.device | str = "cpu", micro: int = 0) -> tuple[Tensor, Tensor | None]:
        """(images in [-1, 1] as float32 (b, C, H, W), labels (b,) or None) for this rank at ``step``: the whole
        rank batch, or with ``accum`` > 1 its microbatch ``micro``."""
        x, labels = self._rank_batch(step)
        if self.accum > 1:
            x = x.chunk(self.accum)[micro]
            labels = labels.chunk(self.accum)[micro] if labels is not None else None
        blocking = torch.device(device).type != "cuda"
        return x.to(device, non_blocking=not blocking), (
            labels.to(device, non_blocking=not blocking) if labels is not None else None
        )

    def close(self) -> None:
        """Stop the worker processes (a later ``get`` starts them again)."""
        self._loader, self._cached = None, None

    def __getstate__(self) -> dict:  # what a worker process receives: no loader of its own
        return {**self.__dict__, "_loader": None, "_cached": None}


class _StepBatches(torch.utils.data.Dataset):
    """Item ``step`` is the rank's batch of that step (``Batches.compute``), for the worker processes."""

    def __init__(self, batches: Batches):
        self.batches = batches

    def __getitem__(self, step: int) -> tuple[Tensor, Tensor | None]:
        return self.batches.compute(step)


class _StepsFrom(torch.utils.data.Sampler):
    """Steps ``start``, ``start + 1``, … without end (the loop stops asking)."""

    def __init__(self, start: int):
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return itertools.count(self.start)
