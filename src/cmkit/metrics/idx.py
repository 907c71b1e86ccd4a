"""A tiny reader for the IDX files of MNIST and Fashion-MNIST (LeCun et al.; Xiao et al. 2017).

Only what the evaluation suite needs: the big-endian IDX header, optional gzip, and the
Fashion-MNIST splits from the location where the Debian package ``dataset-fashion-mnist``
installs them. ``cmkit.datasets`` owns the training-side loaders; this module stays standalone
so the metrics (and the classifier's training script) do not depend on it.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from ..errors import CmkitError

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_ENV = "CMKIT_FMNIST_DIR"
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (``.gz`` or raw) into an array of the shape its header gives."""
    p = Path(path)
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise CmkitError(f"{p}: not an IDX file (bad magic number)")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=_DTYPES[data[2]], offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise CmkitError(f"{p}: IDX header says {shape} but the file holds {arr.size} values")
    return arr.reshape(shape)


def fmnist_dir(root: str | Path | None = None) -> Path:
    """The Fashion-MNIST directory: ``root``, else ``$CMKIT_FMNIST_DIR``, else the Debian location."""
    return Path(root or os.environ.get(FMNIST_ENV) or FMNIST_DIR).expanduser()


def fmnist_available(root: str | Path | None = None) -> bool:
    d = fmnist_dir(root)
    return all((d / f"{s}-images-idx3-ubyte.gz").is_file() for s in ("train", "t10k"))


def load_fmnist(split: str, root: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``split`` ('train' or 'test') as (uint8 NHWC images (N, 28, 28, 1), int64 labels)."""
    if split not in ("train", "test"):
        raise CmkitError(f"unknown Fashion-MNIST split {split!r}; expected 'train' or 'test'")
    d = fmnist_dir(root)
    prefix = "train" if split == "train" else "t10k"
    files = [d / f"{prefix}-images-idx3-ubyte.gz", d / f"{prefix}-labels-idx1-ubyte.gz"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise CmkitError(f"Fashion-MNIST not found: missing {missing[0]} (install the Debian package "
                         f"dataset-fashion-mnist, or set {FMNIST_ENV} to a folder with the IDX .gz files)")
    images, labels = read_idx(files[0]), read_idx(files[1])
    if images.ndim != 3 or images.shape[1:] != (28, 28) or len(labels) != len(images):
        raise CmkitError(f"{files[0]}: expected (N, 28, 28) images with N labels, got {images.shape}, {labels.shape}")
    return images[..., None].copy(), labels.astype(np.int64)
