"""Sample-quality metrics: Fréchet distance (Heusel et al. 2017), KID (Bińkowski et al. 2018), improved
precision/recall (Kynkäänniemi et al. 2019), the ADM evaluator's Inception Score and sFID, their feature
extractors (FID Inception-v3; the shipped Fashion-MNIST classifier), reference statistics, ``evaluate``, and the
multistep σ schedule search.
"""

from __future__ import annotations

from .evaluate import evaluate, evaluate_images, get_extractor, metrics_from_features, real_floor
from .features import FeatureExtractor
from .fmnist_classifier import FMNIST_LABEL, FMNISTClassifier, FMNISTExtractor, load_classifier
from .frechet import FeatureStats, feature_statistics, frechet_distance, frechet_distance_stats
from .images import as_uint8_nhwc, load_images_npz
from .inception import FID_LABEL, FIDInceptionV3, InceptionExtractor, load_inception, random_inception
from .inception_score import inception_score, inception_score_from_logits
from .kid import kernel_inception_distance, mmd2_unbiased
from .precision_recall import manifold_radii, precision_recall
from .reference import Reference, load_reference, reference_from_features, reference_from_images, save_reference
from .schedule_search import SearchResult, golden_section_search, search_schedule, search_sigma_mid

__all__ = [
    "FID_LABEL",
    "FMNIST_LABEL",
    "FIDInceptionV3",
    "FMNISTClassifier",
    "FMNISTExtractor",
    "FeatureExtractor",
    "FeatureStats",
    "InceptionExtractor",
    "Reference",
    "SearchResult",
    "as_uint8_nhwc",
    "evaluate",
    "evaluate_images",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_stats",
    "get_extractor",
    "golden_section_search",
    "inception_score",
    "inception_score_from_logits",
    "kernel_inception_distance",
    "load_classifier",
    "load_images_npz",
    "load_inception",
    "load_reference",
    "manifold_radii",
    "metrics_from_features",
    "mmd2_unbiased",
    "precision_recall",
    "random_inception",
    "real_floor",
    "reference_from_features",
    "reference_from_images",
    "save_reference",
    "search_schedule",
    "search_sigma_mid",
]
