"""Sample-quality evaluation: FD, KID and precision/recall of samples against a reference, plus the real-vs-real floor.

FD (Heusel et al. 2017), KID (Bińkowski et al. 2018) and improved precision/recall with k = 3
(Kynkäänniemi et al. 2019) are computed in one feature space; the result carries that space's label
("FID" for Inception pool_3, "FD (Fashion-MNIST classifier features)" for the project's classifier). In the FID
Inception's space the result also has the ADM evaluator's Inception Score (``inception_score``) and sFID
(``sfid``, the Fréchet distance of the mixed_6/conv spatial features; needs the reference's spatial statistics:
``mu_s``/``sigma_s`` or images); elsewhere they are None. The floor is
the same metrics for real images that the model never saw as samples: for a Fashion-MNIST reference, the same
number of images from the other split, so that a model's number can be read against what real data scores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CmkitError
from .features import FeatureExtractor
from .fmnist_classifier import FMNISTExtractor
from .frechet import feature_statistics, frechet_distance_stats, require_scipy
from .idx import load_fmnist
from .images import as_uint8_nhwc
from .inception import InceptionExtractor
from .inception_score import inception_score_from_logits
from .kid import kernel_inception_distance
from .precision_recall import precision_recall
from .reference import FMNIST_SPLITS, Reference, load_reference

FEATURE_SPACES = ("fmnist", "inception")


def extractor_class(features: str) -> type[FeatureExtractor]:
    """The extractor class of the feature space ``features`` (its ``dim``/``extra_dims``, without weights)."""
    if features == "fmnist":
        return FMNISTExtractor
    if features == "inception":
        return InceptionExtractor
    raise CmkitError(f"unknown feature space {features!r}; expected one of {', '.join(FEATURE_SPACES)}")


def get_extractor(
    features: str = "fmnist",
    *,
    inception_weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    batch_size: int | None = None,
) -> FeatureExtractor:
    """The feature extractor named ``features`` ('fmnist' or 'inception')."""
    kwargs: dict[str, Any] = {"device": device}
    if batch_size:
        kwargs["batch_size"] = batch_size
    if features == "fmnist":
        return FMNISTExtractor(**kwargs)
    if features == "inception":
        return InceptionExtractor(inception_weights, **kwargs)
    raise CmkitError(f"unknown feature space {features!r}; expected one of {', '.join(FEATURE_SPACES)}")


def metrics_from_features(
    features: np.ndarray,
    reference: Reference,
    *,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    k: int = 3,
    seed: int = 0,
    extras: dict[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """fd, kid_mean, kid_std, precision, recall, inception_score, sfid of sample features (N, D) against
    ``reference``.

    KID and precision/recall need the reference's features; they are None when only (μ, Σ) are known. The
    Inception Score needs ``extras['logits']``, sFID ``extras['spatial']`` and the reference's spatial statistics.
    """
    extras = extras or {}
    out: dict[str, Any] = {
        "n_samples": int(len(features)),
        "n_reference": int(reference.n),
        "fd": frechet_distance_stats(feature_statistics(features), reference.stats),
        "kid_mean": None,
        "kid_std": None,
        "precision": None,
        "recall": None,
        "inception_score": None,
        "sfid": None,
    }
    if "logits" in extras:
        out["inception_score"] = inception_score_from_logits(extras["logits"])
    if "spatial" in extras and reference.spatial is not None:
        out["sfid"] = frechet_distance_stats(feature_statistics(extras["spatial"]), reference.spatial)
    if reference.features is not None:
        out["kid_mean"], out["kid_std"] = kernel_inception_distance(
            features, reference.features, n_subsets=kid_subsets, subset_size=kid_subset_size, seed=seed
        )
        out["precision"], out["recall"] = precision_recall(
            reference.features, features, k=k, real_radii=reference.radii(k)
        )
    return out


def evaluate(
    samples: np.ndarray | torch.Tensor,
    reference: Reference,
    extractor: FeatureExtractor,
    *,
    progress: bool = True,
    **kwargs: Any,
) -> dict[str, Any]:
    """Metrics of ``samples`` (uint8 NHWC or float NCHW in [-1, 1]) against ``reference`` in ``extractor``'s space.

    Returns {label, feature_space, reference, n_samples, n_reference, fd, kid_mean, kid_std, precision, recall,
    inception_score, sfid}.
    """
    if reference.feature_space != extractor.name:
        raise CmkitError(
            f"reference {reference.name!r} is in the {reference.feature_space!r} feature space, not {extractor.name!r}"
        )
    feats, extras = extractor.extract_all(samples, progress=progress)
    return {
        "label": extractor.label,
        "feature_space": extractor.name,
        "reference": reference.name,
        **metrics_from_features(feats, reference, extras=extras, **kwargs),
    }


def floor_images(
    reference_name: str, n: int, data_root: str | Path | None = None, seed: int = 0
) -> tuple[np.ndarray, str] | None:
    """Real images to score against a Fashion-MNIST reference split: ``n`` random images of the other split.

    Returns (images, description), or None when the reference is not a Fashion-MNIST split.
    """
    if reference_name not in FMNIST_SPLITS:
        return None
    other = "train" if FMNIST_SPLITS[reference_name] == "test" else "test"
    images, _ = load_fmnist(other, data_root)
    m = min(n, len(images))
    idx = np.sort(np.random.default_rng(seed).choice(len(images), m, replace=False))
    return images[idx], f"Fashion-MNIST {other} split ({m} images) vs {reference_name}"


def real_floor(
    reference: Reference,
    extractor: FeatureExtractor,
    n: int,
    *,
    data_root: str | Path | None = None,
    progress: bool = True,
    **kwargs: Any,
) -> dict[str, Any] | None:
    """The real-vs-real floor for ``n`` samples: the other Fashion-MNIST split scored against ``reference``."""
    picked = floor_images(reference.name, n, data_root)
    if picked is None:
        return None
    images, description = picked
    result = evaluate(images, reference, extractor, progress=progress, **kwargs)
    result["description"] = description
    return result


def evaluate_images(
    images: np.ndarray | torch.Tensor,
    ref: str | Path | Reference = "fmnist-test",
    features: str | FeatureExtractor = "fmnist",
    *,
    inception_weights: str | Path | None = None,
    floor: bool = True,
    data_root: str | Path | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    **kwargs: Any,
) -> dict[str, Any]:
    """Everything ``cmkit eval`` reports for a set of images: metrics against ``ref`` and the real-vs-real floor.

    ``images``: uint8 NHWC (or float NCHW in [-1, 1]); ``ref``: 'fmnist-test', 'fmnist-train', an ``.npz`` path,
    or a :class:`Reference`; ``features``: 'fmnist', 'inception' or an extractor. Extra keyword arguments go to
    :func:`metrics_from_features` (kid_subsets, kid_subset_size, k, seed). The result is the :func:`evaluate`
    dict with ``floor`` (the same metrics for real images, or None where no floor is defined) added.
    """
    require_scipy()  # fail before any feature extraction when the metrics extra is missing
    extractor = (
        features
        if isinstance(features, FeatureExtractor)
        else get_extractor(features, inception_weights=inception_weights, device=device)
    )
    images = as_uint8_nhwc(images)
    extractor.check_images(images)
    reference = load_reference(ref, extractor, data_root, progress)
    result = evaluate(images, reference, extractor, progress=progress, **kwargs)
    result["floor"] = (
        real_floor(reference, extractor, len(images), data_root=data_root, progress=progress, **kwargs)
        if floor
        else None
    )
    return result
