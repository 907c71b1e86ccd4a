"""Reference sets for evaluation: statistics (μ, Σ) and features of a data-set split or an ``.npz``.

A reference is given as ``fmnist-test`` / ``fmnist-train`` (the Fashion-MNIST IDX splits), or as an ``.npz``
holding images (uint8 NHWC under ``arr_0``), precomputed statistics, or both, as OpenAI's reference batches
(``VIRTUAL_imagenet64_labeled.npz`` of openai/guided-diffusion's evaluations: ``arr_0`` 10,000 images, ``mu``/
``sigma`` the pool_3 statistics of the whole data set, ``mu_s``/``sigma_s`` the spatial ones for sFID). As in
that evaluator, given statistics win for FID/sFID and the images give the features behind KID and
precision/recall; statistics that are missing are computed from the images. cmkit's own statistics files may
also hold ``features`` (for KID and precision/recall) and ``feature_space`` (the extractor that made them).
Statistics of data-set splits are cached under ``$CMKIT_CACHE`` (default ``~/.cache/cmkit``) keyed by the
extractor's weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import CmkitError
from ..imageio import check_nhwc, check_npz_archive
from .features import FeatureExtractor
from .frechet import FeatureStats, feature_statistics
from .idx import load_fmnist
from .images import as_uint8_nhwc
from .precision_recall import manifold_radii

FMNIST_SPLITS = {"fmnist-test": "test", "fmnist-train": "train"}


@dataclass
class Reference:
    """What a sample set is compared against, in one feature space."""

    name: str
    stats: FeatureStats
    feature_space: str
    features: np.ndarray | None = None  # needed for KID and precision/recall
    spatial: FeatureStats | None = None  # sFID's statistics (FID Inception only)
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


def reference_from_features(
    features: np.ndarray, name: str, feature_space: str, spatial: np.ndarray | FeatureStats | None = None
) -> Reference:
    """A reference from already extracted features (N, D) (and sFID's spatial features or statistics)."""
    if spatial is not None and not isinstance(spatial, FeatureStats):
        spatial = feature_statistics(spatial)
    return Reference(
        name=name,
        stats=feature_statistics(features),
        feature_space=feature_space,
        features=np.asarray(features, np.float64),
        spatial=spatial,
    )


def reference_from_images(
    images: np.ndarray, extractor: FeatureExtractor, name: str = "images", progress: bool = True
) -> Reference:
    """Extract features of ``images`` (uint8 NHWC or float NCHW in [-1, 1]) and fit the reference statistics."""
    feats, extras = extractor.extract_all(images, progress=progress)
    return reference_from_features(feats, name, extractor.name, extras.get("spatial"))


def save_reference(ref: Reference, path: str | Path) -> Path:
    """Write ``mu``, ``sigma``, ``n``, ``feature_space`` (and ``features``, ``mu_s``/``sigma_s`` if known)."""
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {
        "mu": ref.stats.mu,
        "sigma": ref.stats.sigma,
        "n": np.array(ref.n),
        "feature_space": np.array(ref.feature_space),
    }
    if ref.features is not None:
        arrays["features"] = ref.features.astype(np.float32)
    if ref.spatial is not None:
        arrays.update(mu_s=ref.spatial.mu, sigma_s=ref.spatial.sigma)
    np.savez(p, **arrays)
    return p


def _cache_path(split: str, extractor: FeatureExtractor) -> Path | None:
    key = extractor.cache_key
    if key is None or os.environ.get("CMKIT_NO_CACHE"):
        return None
    root = Path(os.environ.get("CMKIT_CACHE") or Path.home() / ".cache" / "cmkit").expanduser()
    return root / "refstats" / f"{split}-{key}.npz"


def _stats_pair(
    data: np.lib.npyio.NpzFile, p: Path, mu_key: str, sigma_key: str, dim: int | None, what: str
) -> FeatureStats | None:
    """(μ, Σ) stored under ``mu_key``/``sigma_key``, checked against ``dim`` features; None when absent."""
    keys = set(data.files)
    if mu_key not in keys and sigma_key not in keys:
        return None
    if mu_key not in keys or sigma_key not in keys:
        have, lack = (mu_key, sigma_key) if mu_key in keys else (sigma_key, mu_key)
        raise CmkitError(f"{p}: has {have!r} but no {lack!r}; {what}statistics need both")
    mu, sigma = np.asarray(data[mu_key]), np.asarray(data[sigma_key])
    if mu.dtype.kind not in "fiu" or sigma.dtype.kind not in "fiu":
        raise CmkitError(f"{p}: {mu_key}/{sigma_key} must be numeric, got {mu.dtype}/{sigma.dtype}")
    d = dim if dim is not None else (mu.shape[0] if mu.ndim == 1 else -1)
    if mu.shape != (d,) or sigma.shape != (d, d):
        want = f"({dim},)/({dim}, {dim}) ({dim}-d {what}features)" if dim is not None else "(D,)/(D, D)"
        raise CmkitError(f"{p}: {mu_key}/{sigma_key} have shapes {mu.shape}/{sigma.shape}, expected {want}")
    mu, sigma = mu.astype(np.float64), sigma.astype(np.float64)
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise CmkitError(f"{p}: {mu_key}/{sigma_key} hold non-finite values")
    return FeatureStats(mu, sigma, int(data["n"]) if "n" in keys and data["n"].shape == () else 0)


def _header_only(p: Path, key: str) -> np.ndarray:
    """A zero-stride stand-in with the shape and dtype of array ``key`` of an ``.npz``, read from its header."""
    import zipfile

    with zipfile.ZipFile(p) as z, z.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            with np.load(p, allow_pickle=False) as data:
                return np.asarray(data[key])
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
    return np.lib.stride_tricks.as_strided(np.zeros(1, dtype), shape, (0,) * len(shape))


def read_reference_npz(
    path: str | Path,
    dim: int | None = None,
    spatial_dim: int | None = None,
    feature_space: str | None = None,
    *,
    images: bool = True,
) -> tuple[FeatureStats | None, FeatureStats | None, np.ndarray | None, np.ndarray | None]:
    """The parts of a reference ``.npz``: (stats, spatial stats, features, images), each None when absent.

    ``dim``/``spatial_dim`` are the feature widths the statistics must have (``mu`` (dim,), ``sigma``
    (dim, dim); ``mu_s``/``sigma_s`` likewise; spatial statistics are ignored when ``spatial_dim`` is None);
    ``feature_space``, when given, must match a stored one. With ``images=False`` the images are checked but not
    returned. A file with neither images nor statistics, or with anything of the wrong shape, is one
    :class:`CmkitError` line."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise CmkitError(f"reference file not found: {p} (give an .npz, fmnist-test or fmnist-train)")
    check_npz_archive(p, "--ref")
    try:
        with np.load(p, allow_pickle=False) as data:
            keys = set(data.files)
            if "feature_space" in keys and feature_space is not None:
                space = str(data["feature_space"])
                if space != feature_space:
                    raise CmkitError(
                        f"{p}: statistics were computed with the {space!r} features, not {feature_space!r}"
                    )
            stats = _stats_pair(data, p, "mu", "sigma", dim, "pool_3 " if spatial_dim else "")
            spatial = _stats_pair(data, p, "mu_s", "sigma_s", spatial_dim, "spatial (sFID) ") if spatial_dim else None
            feats = None
            if "features" in keys:
                feats = np.asarray(data["features"])
                if feats.ndim != 2 or (dim is not None and feats.shape[1] != dim) or feats.dtype.kind != "f":
                    raise CmkitError(
                        f"{p}: 'features' has shape {feats.shape} ({feats.dtype}), expected float "
                        f"(N, {dim if dim is not None else 'D'})"
                    )
                feats = feats.astype(np.float64)
            imgs = None
            if "arr_0" in keys:
                arr = np.asarray(data["arr_0"]) if images else _header_only(p, "arr_0")
                imgs = check_nhwc(arr, f"{p}", square=False, key="arr_0")
    except CmkitError:
        raise
    except (ValueError, OSError, EOFError, KeyError) as e:
        raise CmkitError(f"--ref {p} is not a readable .npz archive ({' '.join(str(e).split())[:200]})") from None
    if stats is None and imgs is None:
        raise CmkitError(
            f"{p}: expected images under 'arr_0' and/or statistics 'mu' and 'sigma' (and 'mu_s', "
            f"'sigma_s' for sFID), found keys {sorted(keys)}"
        )
    return stats, spatial, feats, (imgs if images else None)


def load_reference_npz(path: str | Path, extractor: FeatureExtractor, progress: bool = True) -> Reference:
    """A reference from an ``.npz`` of images (``arr_0``), statistics (``mu``, ``sigma`` [, ``mu_s``,
    ``sigma_s``, ``features``]) or both (OpenAI's reference batches): given statistics are used as they are,
    the images give the features (KID, precision/recall) and any statistics not given."""
    p = Path(path).expanduser()
    spatial_dim = extractor.extra_dims.get("spatial")
    stats, spatial, feats, images = read_reference_npz(p, extractor.dim, spatial_dim, extractor.name)
    if images is not None:
        images = as_uint8_nhwc(images)
        extractor.check_images(images)
        feats, extras = extractor.extract_all(images, progress=progress)
        if spatial is None and "spatial" in extras:
            spatial = feature_statistics(extras["spatial"])
        if stats is None:
            stats = feature_statistics(feats)
    assert stats is not None
    if stats.n == 0 and feats is not None and len(feats):
        stats = FeatureStats(stats.mu, stats.sigma, len(feats))
    return Reference(p.name, stats, extractor.name, feats, spatial)


def load_fmnist_reference(
    split: str, extractor: FeatureExtractor, data_root: str | Path | None = None, progress: bool = True
) -> Reference:
    """Features and statistics of a whole Fashion-MNIST split ('train' or 'test'), cached when possible."""
    name = f"fmnist-{split}"
    cache = _cache_path(split, extractor)
    if cache is not None and cache.is_file():
        with np.load(cache, allow_pickle=False) as data:
            spatial = FeatureStats(data["mu_s"], data["sigma_s"]) if "mu_s" in data.files else None
            if spatial is not None or "spatial" not in extractor.extra_dims:  # else: an older cache, recompute
                return reference_from_features(data["features"].astype(np.float64), name, extractor.name, spatial)
    images, _ = load_fmnist(split, data_root)
    ref = reference_from_images(images, extractor, name, progress)
    if cache is not None:
        try:
            save_reference(ref, cache)
        except OSError:
            pass  # a read-only home only costs recomputation
    return ref


def load_reference(
    spec: str | Path | Reference,
    extractor: FeatureExtractor,
    data_root: str | Path | None = None,
    progress: bool = True,
) -> Reference:
    """Resolve a reference given as a :class:`Reference`, ``fmnist-test``/``fmnist-train``, or an ``.npz`` path."""
    if isinstance(spec, Reference):
        if spec.feature_space != extractor.name:
            raise CmkitError(
                f"reference {spec.name!r} is in the {spec.feature_space!r} feature space, not {extractor.name!r}"
            )
        return spec
    if str(spec) in FMNIST_SPLITS:
        return load_fmnist_reference(FMNIST_SPLITS[str(spec)], extractor, data_root, progress)
    return load_reference_npz(spec, extractor, progress)
