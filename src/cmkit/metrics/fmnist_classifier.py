"""A small CNN classifier for 28×28 Fashion-MNIST whose penultimate layer is a feature space.

Trained by ``scripts/train_fmnist_classifier.py`` on the training split; the fp16 weights and a
JSON record (test accuracy, epochs, wall time) ship in ``cmkit/assets``. Distances computed in this
space are a Fréchet distance on classifier features, in the spirit of FID (Heusel et al. 2017) but
not comparable to it: always label them ``FD (Fashion-MNIST classifier features)``, never "FID".
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import CmkitError
from .features import FeatureExtractor

ASSETS = Path(__file__).resolve().parent.parent / "assets"
WEIGHTS = ASSETS / "fmnist_classifier.safetensors"
RECORD = ASSETS / "fmnist_classifier.json"
FEATURE_DIM = 128
NUM_CLASSES = 10


def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class FMNISTClassifier(nn.Module):
    """Three conv blocks (32, 64, 128+128 channels; BN, ReLU, max-pool, dropout), a 128-d feature layer, 10 logits.

    Input: (B, 1, 28, 28) floats in [-1, 1]. ``features(x)`` is the post-ReLU 128-d penultimate layer.
    About 0.33 M parameters; the body is kept narrow at 28×28 so that it trains in minutes on 2 CPU cores.
    """

    def __init__(self, feature_dim: int = FEATURE_DIM, dropout: float = 0.3) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *_conv(1, 32),
            nn.MaxPool2d(2),  # 14×14
            *_conv(32, 64),
            nn.MaxPool2d(2),
            nn.Dropout(0.1),  # 7×7
            *_conv(64, 128),
            *_conv(128, 128),
            nn.MaxPool2d(2),
            nn.Dropout(0.1),  # 3×3
            nn.Flatten(),
        )
        self.embed = nn.Sequential(
            nn.Linear(128 * 3 * 3, feature_dim, bias=False), nn.BatchNorm1d(feature_dim), nn.ReLU(inplace=True)
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, NUM_CLASSES))

    def features(self, x: Tensor) -> Tensor:
        return self.embed(self.body(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def load_classifier(path: str | Path | None = None) -> FMNISTClassifier:
    """The shipped classifier (or one at ``path``), in float32 eval mode with gradients off."""
    from safetensors.torch import load_file

    p = Path(path) if path else WEIGHTS
    if not p.is_file():
        raise CmkitError(f"Fashion-MNIST classifier weights not found: {p} (run scripts/train_fmnist_classifier.py)")
    model = FMNISTClassifier()
    state = {k: v.float() for k, v in load_file(str(p)).items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CmkitError(f"{p}: not a cmkit Fashion-MNIST classifier state dict ({str(e).splitlines()[0]})") from e
    return model.eval().requires_grad_(False)


def classifier_record(path: str | Path | None = None) -> dict:
    """The JSON written next to the weights by the training script (accuracy, epochs, wall time)."""
    p = Path(path) if path else RECORD
    return json.loads(p.read_text()) if p.is_file() else {}


@torch.no_grad()
def accuracy(model: nn.Module, images_uint8: np.ndarray, labels: np.ndarray, batch_size: int = 1000) -> float:
    """Top-1 accuracy on uint8 NHWC (N, 28, 28, 1) images."""
    correct = 0
    for i in range(0, len(images_uint8), batch_size):
        x = torch.from_numpy(images_uint8[i : i + batch_size]).permute(0, 3, 1, 2).float() / 127.5 - 1
        pred = model(x).argmax(1).numpy()
        correct += int((pred == labels[i : i + batch_size]).sum())
    return correct / len(images_uint8)


FMNIST_LABEL = "FD (Fashion-MNIST classifier features)"


class FMNISTExtractor(FeatureExtractor):
    """128-d penultimate features of the shipped Fashion-MNIST classifier (28×28 grey images only).

    Fréchet distances in this space are labelled ``FD (Fashion-MNIST classifier features)``, never "FID".
    """

    name = "fmnist"
    label = FMNIST_LABEL
    dim = FEATURE_DIM

    def __init__(
        self, weights: str | Path | None = None, *, device: str | torch.device = "cpu", batch_size: int = 500
    ) -> None:
        super().__init__(device, batch_size)
        self._weights = Path(weights) if weights else WEIGHTS
        self.model = load_classifier(self._weights).to(self.device)
        self._digest: str | None = None

    @property
    def cache_key(self) -> str | None:
        if self._digest is None:
            self._digest = hashlib.sha256(self._weights.read_bytes()).hexdigest()[:16]
        return f"fmnist-{self._digest}"

    def check_images(self, images: np.ndarray) -> None:
        if images.shape[1:] != (28, 28, 1):
            raise CmkitError(
                f"the Fashion-MNIST classifier features need 28×28 grey images (N, 28, 28, 1), "
                f"got {images.shape}; use --features inception for other images"
            )

    def _forward(self, batch: Tensor) -> Tensor:
        return self.model.features(batch.float() / 127.5 - 1)
