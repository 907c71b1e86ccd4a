"""Known-answer tests for the sample-quality metrics: Fréchet distance, KID, precision/recall, schedule search."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import linalg

from cmkit.errors import CmkitError
from cmkit.metrics import precision_recall
from cmkit.metrics.frechet import feature_statistics, frechet_distance, frechet_distance_stats
from cmkit.metrics.images import as_uint8_nhwc
from cmkit.metrics.kid import kernel_inception_distance, mmd2_unbiased
from cmkit.metrics.precision_recall import manifold_radii
from cmkit.metrics.schedule_search import golden_section_search, search_schedule, search_sigma_mid


def _random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


# --- Fréchet distance (Heusel et al. 2017) ---------------------------------------------------------------------


def test_fd_identical_sets_is_zero():
    f = np.random.default_rng(0).normal(size=(2000, 16))
    s = feature_statistics(f)
    assert s.mu.shape == (16,) and s.sigma.shape == (16, 16) and s.n == 2000
    assert abs(frechet_distance_stats(s, s)) < 1e-8


def test_fd_diagonal_gaussians_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    v1, v2 = rng.uniform(0.2, 3, size=8), rng.uniform(0.2, 3, size=8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_fd_full_covariances_match_direct_computation():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = _random_spd(rng, 6), _random_spd(rng, 6)
    # Independent route: Tr((Σ1Σ2)^½) = Tr((Σ1^½ Σ2 Σ1^½)^½), via symmetric eigendecompositions.
    w, v = linalg.eigh(s1)
    r1 = v @ np.diag(np.sqrt(w)) @ v.T
    inner = linalg.eigvalsh(r1 @ s2 @ r1)
    direct = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(inner))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(direct, rel=1e-9)


def test_fd_from_samples_of_shifted_gaussians():
    rng = np.random.default_rng(3)
    d, n = 4, 40000
    mu1, mu2 = np.zeros(d), np.full(d, 0.5)
    s1, s2 = np.diag([1.0, 2.0, 0.5, 1.5]), np.diag([1.0, 0.5, 0.5, 3.0])
    x = rng.multivariate_normal(mu1, s1, size=n)
    y = rng.multivariate_normal(mu2, s2, size=n)
    analytic = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(np.diag(s1)) - np.sqrt(np.diag(s2))) ** 2)
    got = frechet_distance_stats(feature_statistics(x), feature_statistics(y))
    assert got == pytest.approx(analytic, rel=0.05)


def test_fd_singular_covariances_use_eps_fallback():
    mu1, mu2 = np.zeros(5), np.arange(5.0)
    zero = np.zeros((5, 5))
    assert frechet_distance(mu1, zero, mu2, zero) == pytest.approx(np.sum(mu2**2), abs=1e-4)


def test_fd_rejects_mismatched_statistics():
    with pytest.raises(CmkitError, match="do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(CmkitError):
        feature_statistics(np.zeros(5))


# --- KID (Bińkowski et al. 2018) --------------------------------------------------------------------------------


def test_mmd2_unbiased_matches_double_sum():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(5, 3)), rng.normal(size=(5, 3)) + 0.3
    k = lambda a, b: (a @ b / 3 + 1) ** 3  # noqa: E731
    m = 5
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    assert mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)


def test_kid_unbiased_on_same_distribution():
    rng = np.random.default_rng(5)
    # Independent small pairs from one distribution: the estimator's mean must be 0 (a biased one is > 0).
    vals = np.array([mmd2_unbiased(rng.normal(size=(20, 8)), rng.normal(size=(20, 8))) for _ in range(400)])
    assert abs(vals.mean()) < 3 * vals.std() / math.sqrt(len(vals))
    x, y = rng.normal(size=(2000, 8)), rng.normal(size=(2000, 8))
    same_mean, same_std = kernel_inception_distance(x, y, n_subsets=20, subset_size=500)
    shift_mean, shift_std = kernel_inception_distance(x, y + 0.5, n_subsets=20, subset_size=500)
    assert abs(same_mean) < 0.01
    assert shift_mean > 0.05 and shift_mean > 10 * shift_std and shift_mean > 20 * abs(same_mean)


def test_kid_deterministic_and_checks_shapes():
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(300, 4)), rng.normal(size=(200, 4))
    assert kernel_inception_distance(x, y, n_subsets=5) == kernel_inception_distance(x, y, n_subsets=5)
    with pytest.raises(CmkitError):
        kernel_inception_distance(x, rng.normal(size=(200, 5)))


# --- Precision / recall (Kynkäänniemi et al. 2019) --------------------------------------------------------------


def test_manifold_radii_match_brute_force():
    f = np.random.default_rng(7).normal(size=(60, 5)).astype(np.float32)
    d = ((f[:, None, :].astype(np.float64) - f[None, :, :]) ** 2).sum(-1)
    expected = np.sort(d, axis=1)[:, 3]  # 3rd neighbour, self excluded
    np.testing.assert_allclose(manifold_radii(f, k=3, batch_size=16), expected, rtol=1e-4, atol=1e-5)


def test_precision_recall_identical_and_far_apart():
    rng = np.random.default_rng(8)
    real = rng.normal(size=(500, 10))
    assert precision_recall(real, real.copy()) == (1.0, 1.0)
    assert precision_recall(real, rng.normal(size=(500, 10)) + 100.0) == (0.0, 0.0)


def test_precision_recall_batching_and_partial_overlap():
    rng = np.random.default_rng(9)
    real = rng.normal(size=(300, 6))
    fake = np.concatenate([real[:150], rng.normal(size=(150, 6)) + 50.0])
    p, r = precision_recall(real, fake, batch_size=1000)
    assert p == pytest.approx(0.5)
    assert precision_recall(real, fake, batch_size=70) == (p, r)
    with pytest.raises(CmkitError):
        precision_recall(real, rng.normal(size=(10, 5)))


# --- images -----------------------------------------------------------------------------------------------------


def test_float_images_quantise_like_uint8_files():
    a = np.random.default_rng(10).integers(0, 256, size=(4, 6, 6, 3), dtype=np.uint8)
    x = torch.from_numpy(a).permute(0, 3, 1, 2).float() / 127.5 - 1
    np.testing.assert_array_equal(as_uint8_nhwc(x), a)
    assert as_uint8_nhwc(a[..., 0]).shape == (4, 6, 6, 1)
    with pytest.raises(CmkitError):
        as_uint8_nhwc(np.zeros((2, 4, 4, 2), np.uint8))


# --- schedule search (CM Sec. 6: search the middle σ on the metric) ---------------------------------------------


def test_golden_section_finds_minimum_of_unimodal_function():
    x, fx = golden_section_search(lambda u: (u - 0.3) ** 2 + 1.0, -1.0, 2.0, iters=40)
    assert x == pytest.approx(0.3, abs=1e-6) and fx == pytest.approx(1.0)


def test_search_sigma_mid_in_log_space():
    calls = []

    def score(sigmas: list[float]) -> float:
        calls.append(list(sigmas))
        return (math.log(sigmas[1]) - math.log(0.8)) ** 2 + abs(math.log(sigmas[1] / 0.8)) * 0.1

    res = search_sigma_mid(score, lo=0.01, hi=40.0, iters=25)
    assert res.sigmas[0] == 80.0 and res.sigmas[1] == pytest.approx(0.8, rel=1e-3)
    assert len(calls) == 27 and len(res.history) == 27
    assert all(c[0] == 80.0 and 0.01 <= c[1] <= 40.0 for c in calls)
    assert res.score == min(s for _, s in res.history)
    with pytest.raises(CmkitError):
        search_sigma_mid(score, lo=5.0, hi=1.0)


def test_search_schedule_coordinatewise_k_step():
    targets = (5.0, 0.5)

    def score(s: list[float]) -> float:
        assert all(a > b for a, b in zip(s, s[1:]))  # never asks for an unordered schedule
        return sum((math.log(v) - math.log(t)) ** 2 for v, t in zip(s[1:], targets))

    res = search_schedule(score, [80.0, 20.0, 2.0], lo=0.002, hi=80.0, iters=30, sweeps=2)
    assert res.sigmas[0] == 80.0
    assert res.sigmas[1] == pytest.approx(5.0, rel=1e-3) and res.sigmas[2] == pytest.approx(0.5, rel=1e-3)
    # An optimum that would break the ordering is clipped at the neighbour.
    res2 = search_schedule(lambda s: (math.log(s[2]) - math.log(30.0)) ** 2, [80.0, 10.0, 1.0], 0.002, 80.0, 20, 1)
    assert res2.sigmas[2] < res2.sigmas[1] and res2.sigmas[2] == pytest.approx(10.0, rel=1e-3)
