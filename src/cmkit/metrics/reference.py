"""Reference sets for evaluation: statistics (μ, Σ) and features of a data-set split or an ``.npz``.

A reference is given as ``fmnist-test`` / ``fmnist-train`` (the Fashion-MNIST IDX splits), or as an ``.npz``
holding either images (uint8 NHWC under ``arr_0``, as the ADM reference batches and cmkit samples) or
precomputed statistics ``mu``, ``sigma`` (optionally ``features`` for KID and precision/recall, and
``feature_space`` naming the extractor that made them). Statistics of data-set splits are cached under
``$CMKIT_CACHE`` (default ``~/.cache/cmkit``) keyed by the extractor's weights.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import CmkitError
from .features import FeatureExtractor
from .frechet import FeatureStats, feature_statistics
from .idx import load_fmnist
from .precision_recall import manifold_radii

FMNIST_SPLITS = {"fmnist-test": "test", "fmnist-train": "train"}


@dataclass
class Reference:
    """What a sample set is compared against, in one feature space."""

    name: str
    stats: FeatureStats
    feature_space: str
    features: np.ndarray | None = None  # needed for KID and precision/recall
    _radii: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def radii(self, k: int = 3) -> np.ndarray:
        """k-NN radii of the reference features (computed once per k; Kynkäänniemi et al. 2019)."""
        if self.features is None:
            raise CmkitError(f"reference {self.name!r} holds only mu/sigma; precision/recall need its features")
        if k not in self._radii:
            self._radii[k] = manifold_radii(self.features, k)
        return self._radii[k]

    @property
    def n(self) -> int:
        return self.stats.n if self.stats.n else (0 if self.features is None else len(self.features))


def reference_from_features(features: np.ndarray, name: str, feature_space: str) -> Reference:
    """A reference from already extracted features (N, D)."""
    return Reference(name=name, stats=feature_statistics(features), feature_space=feature_space,
                     features=np.asarray(features, np.float64))


def reference_from_images(images: np.ndarray, extractor: FeatureExtractor, name: str = "images",
                          progress: bool = True) -> Reference:
    """Extract features of ``images`` (uint8 NHWC or float NCHW in [-1, 1]) and fit the reference statistics."""
    return reference_from_features(extractor.extract(images, progress=progress), name, extractor.name)


def save_reference(ref: Reference, path: str | Path) -> Path:
    """Write ``mu``, ``sigma``, ``n``, ``feature_space`` (and ``features`` if known) to an ``.npz``."""
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {"mu": ref.stats.mu, "sigma": ref.stats.sigma, "n": np.array(ref.n),
                                     "feature_space": np.array(ref.feature_space)}
    if ref.features is not None:
        arrays["features"] = ref.features.astype(np.float32)
    np.savez(p, **arrays)
    return p


def _cache_path(split: str, extractor: FeatureExtractor) -> Path | None:
    key = extractor.cache_key
    if key is None or os.environ.get("CMKIT_NO_CACHE"):
        return None
    root = Path(os.environ.get("CMKIT_CACHE") or Path.home() / ".cache" / "cmkit").expanduser()
    return root / "refstats" / f"{split}-{key}.npz"


def load_reference_npz(path: str | Path, extractor: FeatureExtractor, progress: bool = True) -> Reference:
    """A reference from an ``.npz`` of statistics (``mu``, ``sigma`` [, ``features``]) or of images (``arr_0``)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise CmkitError(f"reference file not found: {p} (give an .npz, fmnist-test or fmnist-train)")
    with np.load(p, allow_pickle=False) as data:
        keys = set(data.files)
        if {"mu", "sigma"} <= keys:
            space = str(data["feature_space"]) if "feature_space" in keys else extractor.name
            if space != extractor.name:
                raise CmkitError(f"{p}: statistics were computed with the {space!r} features, not {extractor.name!r}")
            mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
            if mu.shape != (extractor.dim,) or sigma.shape != (extractor.dim, extractor.dim):
                raise CmkitError(f"{p}: mu/sigma have shapes {mu.shape}/{sigma.shape}, but the {extractor.name!r} "
                                 f"features are {extractor.dim}-d")
            feats = data["features"].astype(np.float64) if "features" in keys else None
            n = int(data["n"]) if "n" in keys else (0 if feats is None else len(feats))
            return Reference(p.name, FeatureStats(mu, sigma, n), space, feats)
        if "arr_0" in keys:
            images = data["arr_0"]
        else:
            raise CmkitError(f"{p}: expected images under 'arr_0' or statistics 'mu' and 'sigma', "
                             f"found keys {sorted(keys)}")
    return reference_from_images(images, extractor, p.name, progress)


def load_fmnist_reference(split: str, extractor: FeatureExtractor, data_root: str | Path | None = None,
                          progress: bool = True) -> Reference:
    """Features and statistics of a whole Fashion-MNIST split ('train' or 'test'), cached when possible."""
    name = f"fmnist-{split}"
    cache = _cache_path(split, extractor)
    if cache is not None and cache.is_file():
        with np.load(cache, allow_pickle=False) as data:
            return reference_from_features(data["features"].astype(np.float64), name, extractor.name)
    images, _ = load_fmnist(split, data_root)
    ref = reference_from_images(images, extractor, name, progress)
    if cache is not None:
        try:
            save_reference(ref, cache)
        except OSError:
            pass  # a read-only home only costs recomputation
    return ref


def load_reference(spec: str | Path | Reference, extractor: FeatureExtractor, data_root: str | Path | None = None,
                   progress: bool = True) -> Reference:
    """Resolve a reference given as a :class:`Reference`, ``fmnist-test``/``fmnist-train``, or an ``.npz`` path."""
    if isinstance(spec, Reference):
        if spec.feature_space != extractor.name:
            raise CmkitError(f"reference {spec.name!r} is in the {spec.feature_space!r} feature space, "
                             f"not {extractor.name!r}")
        return spec
    if str(spec) in FMNIST_SPLITS:
        return load_fmnist_reference(FMNIST_SPLITS[str(spec)], extractor, data_root, progress)
    return load_reference_npz(spec, extractor, progress)
