"""The feature-extractor interface shared by the Inception (FID) and Fashion-MNIST classifier feature spaces.

``extract(images)`` takes uint8 NHWC images (array or tensor) or float NCHW tensors in [-1, 1] and returns
(N, D) float64 features, computed in batches under ``torch.no_grad`` with a tqdm progress bar.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .images import as_uint8_nhwc


class FeatureExtractor(ABC):
    """A frozen network mapping images to feature vectors.

    Subclasses set ``name`` (CLI id), ``label`` (how a Fréchet distance in this space must be reported),
    ``dim``, and implement :meth:`_forward` on a uint8 NCHW batch already on ``device``.
    """

    name: str = ""
    label: str = ""
    dim: int = 0

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 200) -> None:
        self.device = torch.device(device)
        self.batch_size = batch_size

    @property
    def cache_key(self) -> str | None:
        """A string identifying the weights (for caching reference statistics), or None if not cacheable."""
        return None

    def check_images(self, images: np.ndarray) -> None:
        """Raise CmkitError if uint8 NHWC ``images`` are not valid input for this extractor."""

    @abstractmethod
    def _forward(self, batch: Tensor) -> Tensor:
        """uint8 (B, C, H, W) on ``self.device`` -> (B, dim) float features."""

    @torch.no_grad()
    def extract(self, images: np.ndarray | Tensor, progress: bool = True) -> np.ndarray:
        """Features (N, dim) float64 of ``images`` (uint8 NHWC, or float NCHW in [-1, 1])."""
        a = as_uint8_nhwc(images)
        self.check_images(a)
        out = np.empty((a.shape[0], self.dim), dtype=np.float64)
        with tqdm(total=a.shape[0], desc=f"features ({self.name})", unit="img", disable=not progress,
                  leave=False) as bar:
            for i in range(0, a.shape[0], self.batch_size):
                batch = torch.from_numpy(a[i:i + self.batch_size]).to(self.device).permute(0, 3, 1, 2)
                out[i:i + batch.shape[0]] = self._forward(batch).double().cpu().numpy()
                bar.update(batch.shape[0])
        return out
