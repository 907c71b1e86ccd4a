"""Shard sets: an image data set on disk that training reads batch by batch and never holds in memory.

A shard set is a directory (written once by ``cmkit prepare-data folder|npz``, atomically)::

    index.json           {"format": "cmkit-shards", "version": 1, "count": N, "shape": [C, H, W],
                          "num_classes": K, "classes": [...], "shards": [{"file", "count", "crc32"}, ...]}
    images-00000.npy …   uint8 (n, C, H, W) in numpy's own .npy format (``np.load(f, mmap_mode="r")`` reads one)
    labels.npy           int64 (N,), when the set is labelled

``ShardSet`` reads only the images a batch asks for, with one positioned read (``os.pread``) per image: the
process's resident memory does not grow with the data set (the kernel's page cache holds what is hot), any
number of processes and ``torch.utils.data`` workers read the same files, and each rank reads only its slice
(``cmkit.datasets.Batches``). Opening a set checks every shard's header and size, so a missing, truncated or
corrupt shard is one error line before step 1; ``verify()`` also checks each shard's CRC-32.

``prepare_folder`` turns a folder of images (ImageNet's class-subfolder layout, or LSUN exported as images) into
a shard set in parallel, cropped and resized as the papers did (``cmkit.imageio.crop_resize``).
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from .errors import CmkitError
from .files import atomic_dir, commit_dir, read_json, seal_dir
from .imageio import crop_resize, read_image

FORMAT, VERSION, INDEX, LABELS = "cmkit-shards", 1, "index.json", "labels.npy"
SHARD_BYTES = 256 << 20  #: the size of one shard file (its image count is rounded down)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif"}
HOW_TO_MAKE = "make one with `cmkit prepare-data folder IMAGES -o DIR` or `cmkit prepare-data npz FILE.npz -o DIR`"


def shard_file(i: int) -> str:
    return f"images-{i:05d}.npy"


@dataclass(frozen=True)
class Shard:
    """One .npy file of a shard set: its images are [start, start + count) of the set; data at byte ``offset``."""

    path: Path
    start: int
    count: int
    offset: int
    crc32: int | None


def _npy_data_offset(path: Path, count: int, shape: tuple[int, ...]) -> int:
    """The byte offset of a shard's data, after checking its header (uint8, C order, (count, *shape)) and size."""
    try:
        with open(path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            got, fortran, dtype = read(f)
            offset = f.tell()
    except FileNotFoundError:
        raise CmkitError(f"shard set {path.parent}: shard {path.name} is missing") from None
    except (OSError, ValueError, EOFError, SyntaxError) as e:
        raise CmkitError(f"shard {path} is corrupt: not a readable .npy file ({' '.join(str(e).split())})") from None
    want = (count, *shape)
    if dtype != np.uint8 or fortran or tuple(got) != want:
        raise CmkitError(
            f"shard {path} holds {dtype} {tuple(got)}{' (Fortran order)' if fortran else ''}; "
            f"the set's index.json expects uint8 {want} in C order"
        )
    size, expected = path.stat().st_size, offset + int(np.prod(want))
    if size != expected:
        raise CmkitError(
            f"shard {path} is {'truncated' if size < expected else 'damaged'}: it has {size:,} bytes, "
            f"its header says {expected:,}; prepare the data set again"
        )
    return offset


class ShardSet:
    """A shard set opened for reading: ``len``, ``shape`` (C, H, W), ``labels``, ``num_classes`` and ``take``."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        if not str(root).strip() or not (self.root / INDEX).is_file():
            raise CmkitError(f"no shard set at '{self.root}' (expected a directory with {INDEX}); {HOW_TO_MAKE}")
        index = read_json(self.root / INDEX, "shard set index")
        if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("version") != VERSION:
            raise CmkitError(f"{self.root / INDEX} is not a cmkit shard set index (format {FORMAT} v{VERSION})")
        try:
            self.count, self.shape = int(index["count"]), tuple(int(d) for d in index["shape"])
            self.num_classes, self.classes = int(index.get("num_classes", 0)), list(index.get("classes", []))
            entries = [(str(s["file"]), int(s["count"]), s.get("crc32")) for s in index["shards"]]
        except (KeyError, TypeError, ValueError) as e:
            raise CmkitError(f"{self.root / INDEX} is damaged ({type(e).__name__}: {e})") from None
        if len(self.shape) != 3 or sum(n for _, n, _ in entries) != self.count:
            raise CmkitError(f"{self.root / INDEX} is damaged: shapes or image counts do not add up")
        self.item_bytes = int(np.prod(self.shape))
        self.shards, start = [], 0
        for name, n, crc in entries:
            path = self.root / Path(name).name  # a shard never lies outside its set
            self.shards.append(Shard(path, start, n, _npy_data_offset(path, n, self.shape), crc))
            start += n
        self.starts = np.array([s.start for s in self.shards], np.int64)
        self.labels = self._read_labels() if self.num_classes else None
        self._fds: dict[int, int] = {}
        self._pid = -1

    def _read_labels(self) -> Tensor:
        path = self.root / LABELS
        try:
            lab = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise CmkitError(f"shard set {self.root}: cannot read {LABELS} ({' '.join(str(e).split())})") from None
        if lab.shape != (self.count,) or lab.dtype.kind not in "iu" or (self.count and not 0 <= lab.min()):
            raise CmkitError(f"{path} must hold {self.count} class indices >= 0, got {lab.dtype} {lab.shape}")
        if self.count and lab.max() >= self.num_classes:
            raise CmkitError(f"{path} holds class {int(lab.max())} but index.json says {self.num_classes} classes")
        return torch.from_numpy(lab.astype(np.int64))

    def __len__(self) -> int:
        return self.count

    def __getstate__(self) -> dict:  # for spawned data-loader workers: file descriptors are per process
        return {**self.__dict__, "_fds": {}, "_pid": -1}

    def _fd(self, i: int) -> int:
        if self._pid != os.getpid():  # a forked worker opens its own descriptors
            self._fds, self._pid = {}, os.getpid()
        if i not in self._fds:
            self._fds[i] = os.open(self.shards[i].path, os.O_RDONLY)
        return self._fds[i]

    def take(self, idx: Tensor) -> Tensor:
        """uint8 images (len(idx), C, H, W) at the given indices, read from disk (one ``pread`` per image)."""
        idx_np = np.asarray(idx, np.int64).reshape(-1)
        if idx_np.size and (idx_np.min() < 0 or idx_np.max() >= self.count):
            raise IndexError(f"image index out of range for a shard set of {self.count}")
        out = np.empty((idx_np.size, *self.shape), np.uint8)
        which = np.searchsorted(self.starts, idx_np, side="right") - 1
        for j, (k, s) in enumerate(zip(idx_np, which)):
            shard = self.shards[s]
            pos = shard.offset + (int(k) - shard.start) * self.item_bytes
            data = os.pread(self._fd(int(s)), self.item_bytes, pos)
            if len(data) != self.item_bytes:
                raise CmkitError(f"shard {shard.path} was truncated while training (short read at image {k})")
            out[j] = np.frombuffer(data, np.uint8).reshape(self.shape)
        return torch.from_numpy(out)

    def verify(self) -> None:
        """Check every shard's CRC-32 against the index (reads the whole set once)."""
        for shard in self.shards:
            crc, left = 0, shard.count * self.item_bytes
            with open(shard.path, "rb") as f:
                f.seek(shard.offset)
                while left:
                    chunk = f.read(min(left, 16 << 20))
                    if not chunk:
                        break
                    crc, left = zlib.crc32(chunk, crc), left - len(chunk)
            if shard.crc32 is not None and crc != shard.crc32:
                raise CmkitError(f"shard {shard.path} is corrupt: its CRC-32 does not match index.json")


# --- writing ---------------------------------------------------------------------------------------


def write_shard_set(
    out: str | Path,
    count: int,
    shape: tuple[int, int, int],
    chunks: Iterable[tuple[np.ndarray, np.ndarray | None]],
    classes: list[str] | None = None,
    num_classes: int = 0,
    shard_images: int = 0,
    meta: dict | None = None,
) -> ShardSet:
    """Write ``count`` images of ``shape`` (C, H, W), given as (uint8 (b, C, H, W), labels (b,) or None) chunks,
    as a shard set at ``out``: staged beside it and swapped in complete (``cmkit.files.commit_dir``)."""
    out = Path(out).expanduser()
    item = int(np.prod(shape))
    per = shard_images or max(1, SHARD_BYTES // item)
    sizes = [min(per, count - s) for s in range(0, count, per)]
    tmp = atomic_dir(out)
    labels = np.zeros(count, np.int64) if num_classes else None
    entries, done, it = [], 0, _images(chunks, labels)
    try:
        for i, n in enumerate(sizes):
            arr = np.lib.format.open_memmap(tmp / shard_file(i), "w+", np.uint8, (n, *shape))
            crc = 0
            for j in range(n):
                arr[j] = next(it)
                crc = zlib.crc32(arr[j].tobytes(), crc)
            arr.flush()
            del arr
            entries.append({"file": shard_file(i), "count": n, "crc32": crc})
            done += n
        if next(it, None) is not None:
            raise CmkitError(f"more images than the {count} announced")
        if labels is not None:
            np.save(tmp / LABELS, labels)
        index = {
            "format": FORMAT,
            "version": VERSION,
            "count": count,
            "shape": list(shape),
            "num_classes": num_classes,
            "classes": classes or [],
            "shards": entries,
            **(meta or {}),
        }
        seal_dir(tmp, INDEX, index)
        commit_dir(tmp, out)
    except StopIteration:
        raise CmkitError(f"only {done} images came of the {count} announced") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return ShardSet(out)


def _images(chunks: Iterable[tuple[np.ndarray, np.ndarray | None]], labels: np.ndarray | None) -> Iterator[np.ndarray]:
    """Single images from chunks, filling ``labels`` in order."""
    k = 0
    for images, lab in chunks:
        if labels is not None and lab is not None:
            labels[k : k + len(images)] = lab
        for image in images:
            yield image
            k += 1


def _decode(job: tuple[str, int, int, str]) -> np.ndarray:
    """One image file → uint8 (C, H, W) (a worker of ``prepare_folder``)."""
    from PIL import Image

    path, size, channels, crop = job
    im = crop_resize(Image.fromarray(read_image(path, "L" if channels == 1 else "RGB", "image")), size, crop)
    a = np.asarray(im, np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def image_files(src: str | Path) -> list[Path]:
    """Every image file under ``src`` (recursively), sorted; none is one error line."""
    root = Path(src).expanduser()
    usable = str(src).strip() and root.is_dir()
    files = sorted(f for f in root.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()) if usable else []
    if not files:
        raise CmkitError(f"no images found in folder '{root}' (expected .png/.jpg files, possibly in class subfolders)")
    return files


def folder_labels(root: Path, files: list[Path], how: str) -> tuple[np.ndarray | None, list[str]]:
    """Class labels from the first-level subfolder of each file (ImageNet's ``train/n01440764/*.JPEG``).

    ``how``: ``subfolders`` (required), ``none``, or ``auto`` (subfolders when every image lies in one and there
    are at least two)."""
    if how not in ("auto", "subfolders", "none"):
        raise CmkitError(f"unknown labels {how!r}; expected auto, subfolders or none")
    parts = [f.relative_to(root).parts for f in files]
    nested = all(len(p) > 1 for p in parts)
    names = sorted({p[0] for p in parts}) if nested else []
    if how == "none" or (how == "auto" and len(names) < 2):
        return None, []
    if not nested:
        loose = next(f for f, p in zip(files, parts) if len(p) == 1)
        raise CmkitError(f"labels=subfolders but {loose} is not in a class subfolder of {root}")
    lookup = {n: i for i, n in enumerate(names)}
    return np.array([lookup[p[0]] for p in parts], np.int64), names


def prepare_folder(
    src: str | Path,
    out: str | Path,
    resolution: int,
    channels: int = 3,
    crop: str = "adm",
    labels: str = "auto",
    workers: int = 0,
    progress: bool = True,
    shard_images: int = 0,
) -> ShardSet:
    """A folder of images → a shard set of ``resolution``² uint8 images, decoded by ``workers`` processes
    (0 = one per CPU) in file order, so the result does not depend on the number of workers."""
    if resolution < 1 or channels not in (1, 3):
        raise CmkitError(f"need a resolution >= 1 and 1 or 3 channels, got {resolution} and {channels}")
    root = Path(src).expanduser()
    files = image_files(root)
    y, names = folder_labels(root, files, labels)
    jobs = [(str(f), resolution, channels, crop) for f in files]
    workers = workers or os.cpu_count() or 1
    shape = (channels, resolution, resolution)
    bar = tqdm(total=len(files), disable=not progress, desc="prepare-data", unit="img")

    def chunks(decoded: Iterable[np.ndarray]) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        for k, a in enumerate(decoded):
            bar.update(1)
            yield a[None], (y[k : k + 1] if y is not None else None)

    try:
        if workers == 1:
            return write_shard_set(out, len(files), shape, chunks(map(_decode, jobs)), names, len(names), shard_images)
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            decoded = pool.imap(_decode, jobs, chunksize=16)
            return write_shard_set(out, len(files), shape, chunks(decoded), names, len(names), shard_images)
    finally:
        bar.close()


def shards_from_arrays(out: str | Path, images: np.ndarray, labels: np.ndarray | None = None, **kw) -> ShardSet:
    """uint8 (N, C, H, W) images (and labels) → a shard set, in chunks (``cmkit prepare-data npz``, tests)."""
    n, step = len(images), 4096
    k = int(labels.max()) + 1 if labels is not None and len(labels) else 0
    chunks = ((images[i : i + step], labels[i : i + step] if labels is not None else None) for i in range(0, n, step))
    return write_shard_set(out, n, tuple(images.shape[1:]), chunks, num_classes=k, **kw)
