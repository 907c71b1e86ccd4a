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

    #: outputs besides the pooled features that :meth:`extract_all` returns, name -> width (the FID Inception:
    #: ``spatial`` for sFID and ``logits`` for the Inception Score); none by default
    extra_dims: dict[str, int] = {}

    def _forward_extras(self, batch: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Features and the :attr:`extra_dims` outputs of a uint8 batch; by default only :meth:`_forward`."""
        return self._forward(batch), {}

    @torch.no_grad()
    def extract(self, images: np.ndarray | Tensor, progress: bool = True) -> np.ndarray:
        """Features (N, dim) float64 of ``images`` (uint8 NHWC, or float NCHW in [-1, 1])."""
        return self.extract_all(images, progress=progress, extras=False)[0]

    @torch.no_grad()
    def extract_all(
        self, images: np.ndarray | Tensor, progress: bool = True, extras: bool = True
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Features (N, dim) float64 and, with ``extras``, the :attr:`extra_dims` outputs (N, width) float32."""
        a = as_uint8_nhwc(images)
        self.check_images(a)
        out = np.empty((a.shape[0], self.dim), dtype=np.float64)
        more = {k: np.empty((a.shape[0], d), dtype=np.float32) for k, d in self.extra_dims.items()} if extras else {}
        with tqdm(
            total=a.shape[0], desc=f"features ({self.name})", unit="img", disable=not progress, leave=False
        ) as bar:
            for i in range(0, a.shape[0], self.batch_size):
                batch = torch.from_numpy(a[i : i + self.batch_size]).to(self.device).permute(0, 3, 1, 2)
                if more:
                    feats, got = self._forward_extras(batch)
                    for k in more:
                        more[k][i : i + batch.shape[0]] = got[k].float().cpu().numpy()
                else:
                    feats = self._forward(batch)
                out[i : i + batch.shape[0]] = feats.double().cpu().numpy()
                bar.update(batch.shape[0])
        return out, more
