"""CIFAR-10's official archive (``cifar-10-python.tar.gz``, Krizhevsky 2009) → the ``.npz`` the CIFAR-10 presets read.

The archive holds five ``data_batch_N`` pickles and ``test_batch``, each a dict with ``data`` (10000 × 3072 uint8
in CHW order) and ``labels``; ``prepare_cifar10`` writes one ``.npz`` of uint8 NHWC images under ``arr_0`` and
labels under ``arr_1``, what ``data.name=npz`` reads. The pickles are read by ``SafeUnpickler``, which builds only
numpy arrays, dtypes and plain containers; nothing from the file is executed, and nothing is downloaded.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CmkitError
from ..imageio import save_npz

CIFAR10_TRAIN = "data/cifar10-train.npz"  #: where the CIFAR-10 presets look for their data (data.root)
CIFAR10_MEMBERS = {
    "train": [f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)],
    "test": ["cifar-10-batches-py/test_batch"],
}


class SafeUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and plain Python data only: any other global in the stream is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays are expected)")
        if name in ("_reconstruct", "scalar"):
            try:
                from numpy._core import multiarray
            except ImportError:  # numpy < 2
                from numpy.core import multiarray  # type: ignore[no-redef]
            return getattr(multiarray, name)
        if module == "_codecs":
            import codecs

            return codecs.encode
        return getattr(np, name)


def _cifar_batch(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 N×32×32×3, labels int64 N) of one CIFAR-10 batch pickle."""
    try:
        d = SafeUnpickler(io.BytesIO(raw), encoding="bytes").load()
        data, labels = d[b"data"], d[b"labels"]
        images = np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        labels = np.asarray(labels, dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise CmkitError(f"{where} is not a CIFAR-10 batch ({type(e).__name__}: {e})") from None
    if len(labels) != len(images) or labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
        raise CmkitError(f"{where}: {len(images)} images but {len(labels)} labels in 0..9 expected")
    return np.ascontiguousarray(images), labels


def prepare_cifar10(archive: str | Path, out: str | Path, split: str = "train") -> tuple[int, Path]:
    """Write the ``split`` ('train': 50,000 images; 'test': 10,000) of the official archive to ``out`` (.npz)."""
    archive, out = Path(archive).expanduser(), Path(out).expanduser()
    if split not in CIFAR10_MEMBERS:
        raise CmkitError(f"unknown split {split!r}; expected 'train' or 'test'")
    if not archive.is_file():
        raise CmkitError(
            f"CIFAR-10 archive not found: {archive} (the official cifar-10-python.tar.gz from "
            "https://www.cs.toronto.edu/~kriz/cifar.html)"
        )
    images, labels = [], []
    try:
        with tarfile.open(archive, "r:*") as tar:
            for name in CIFAR10_MEMBERS[split]:
                try:
                    member = tar.extractfile(name)
                except KeyError:
                    member = None
                if member is None:
                    raise CmkitError(f"{archive} has no {name}: expected the official cifar-10-python.tar.gz")
                x, y = _cifar_batch(member.read(), f"{archive}:{name}")
                images.append(x)
                labels.append(y)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise CmkitError(f"cannot read {archive}: truncated or not a tar.gz archive ({e})") from None

    x = np.concatenate(images)
    save_npz(x, out, torch.from_numpy(np.concatenate(labels)))
    return len(x), out
