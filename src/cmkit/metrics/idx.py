"""Fashion-MNIST splits for the evaluation suite, as uint8 NHWC arrays (reads through ``cmkit.datasets``).

The location is ``root``, else ``$CMKIT_FMNIST_DIR``, else where the Debian package
``dataset-fashion-mnist`` installs the IDX files.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..datasets import FASHION_MNIST_ROOT, load_idx_dataset

FMNIST_ENV = "CMKIT_FMNIST_DIR"


def fmnist_dir(root: str | Path | None = None) -> Path:
    """The Fashion-MNIST directory: ``root``, else ``$CMKIT_FMNIST_DIR``, else the Debian location."""
    return Path(root or os.environ.get(FMNIST_ENV) or FASHION_MNIST_ROOT).expanduser()


def fmnist_available(root: str | Path | None = None) -> bool:
    d = fmnist_dir(root)
    return all((d / f"{s}-images-idx3-ubyte.gz").is_file() for s in ("train", "t10k"))


def load_fmnist(split: str, root: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``split`` ('train' or 'test') as (uint8 NHWC images (N, 28, 28, 1), int64 labels)."""
    data = load_idx_dataset("fashion_mnist", str(fmnist_dir(root)), split)
    return data.images.permute(0, 2, 3, 1).numpy().copy(), data.labels.numpy()
