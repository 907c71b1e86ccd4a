"""Reference statistics, ``evaluate``/``evaluate_images``, the ``cmkit eval`` subcommand and the shipped classifier."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from cmkit.cli.eval import add_cli
from cmkit.errors import CmkitError
from cmkit.metrics import evaluate
from cmkit.metrics.evaluate import evaluate_images
from cmkit.metrics.features import FeatureExtractor
from cmkit.metrics.fmnist_classifier import FMNIST_LABEL, FMNISTExtractor, accuracy, classifier_record, load_classifier
from cmkit.metrics.idx import fmnist_available, load_fmnist
from cmkit.metrics.reference import load_reference, reference_from_images, save_reference

needs_fmnist = pytest.mark.skipif(not fmnist_available(), reason="Fashion-MNIST IDX files not installed")


class PoolExtractor(FeatureExtractor):
    """A tiny deterministic extractor for tests: 4×4 average-pooled pixels (16-d for 16×16 grey images)."""

    name = "pool"
    label = "FD (pooled pixels)"
    dim = 16

    def __init__(self) -> None:
        super().__init__(batch_size=64)

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(batch.float() / 255, 4).flatten(1)


def _images(seed: int, n: int = 300, shift: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(100 + shift, 30, size=(n, 16, 16, 1)), 0, 255).astype(np.uint8)


def test_evaluate_with_reference_from_images_and_npz(tmp_path):
    ex = PoolExtractor()
    ref = reference_from_images(_images(0), ex, "ref", progress=False)
    assert ref.features.shape == (300, 16) and ref.n == 300
    same = evaluate(_images(0), ref, ex, progress=False, kid_subsets=10)
    assert same["fd"] == pytest.approx(0, abs=1e-9) and same["precision"] == 1.0 and same["recall"] == 1.0
    assert same["label"] == "FD (pooled pixels)" and same["n_samples"] == 300
    far = evaluate(_images(1, shift=80), ref, ex, progress=False, kid_subsets=10)
    assert far["fd"] > 1.0 and far["kid_mean"] > 10 * abs(same["kid_mean"]) and far["precision"] < 0.05

    # An .npz of images and an .npz of statistics give the same FD; stats-only means no KID / PR.
    np.savez(tmp_path / "imgs.npz", arr_0=_images(0))
    r_img = load_reference(tmp_path / "imgs.npz", ex, progress=False)
    save_reference(r_img, tmp_path / "stats.npz")
    r_stats = load_reference(tmp_path / "stats.npz", ex)
    np.testing.assert_allclose(r_stats.stats.sigma, ref.stats.sigma)
    with np.load(tmp_path / "stats.npz") as d:
        np.savez(tmp_path / "mu_sigma.npz", mu=d["mu"], sigma=d["sigma"])
    r_ms = load_reference(tmp_path / "mu_sigma.npz", ex)
    res = evaluate(_images(1, shift=80), r_ms, ex, progress=False)
    assert res["fd"] == pytest.approx(far["fd"], rel=1e-6) and res["kid_mean"] is None and res["precision"] is None


def test_reference_errors(tmp_path):
    ex = PoolExtractor()
    np.savez(tmp_path / "wrong_dim.npz", mu=np.zeros(3), sigma=np.eye(3))
    with pytest.raises(CmkitError, match="16-d"):
        load_reference(tmp_path / "wrong_dim.npz", ex)
    np.savez(tmp_path / "other_space.npz", mu=np.zeros(16), sigma=np.eye(16), feature_space="inception")
    with pytest.raises(CmkitError, match="'inception' features"):
        load_reference(tmp_path / "other_space.npz", ex)
    np.savez(tmp_path / "junk.npz", x=np.zeros(3))
    with pytest.raises(CmkitError, match="arr_0"):
        load_reference(tmp_path / "junk.npz", ex)
    with pytest.raises(CmkitError, match="not found"):
        load_reference(tmp_path / "missing.npz", ex)


def test_shipped_classifier_loads_and_records_accuracy():
    model = load_classifier()
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    rec = classifier_record()
    assert rec["test_accuracy"] >= 0.92 and rec["epochs"] > 0 and rec["wall_time_s"] > 0
    ex = FMNISTExtractor()
    feats = ex.extract(np.zeros((3, 28, 28, 1), np.uint8), progress=False)
    assert feats.shape == (3, 128) and feats.dtype == np.float64
    assert ex.label == FMNIST_LABEL and "FID" not in ex.label
    with pytest.raises(CmkitError, match="28×28"):
        ex.extract(np.zeros((2, 32, 32, 3), np.uint8), progress=False)


@needs_fmnist
def test_shipped_classifier_accuracy_on_test_subset():
    images, labels = load_fmnist("test")
    idx = np.random.default_rng(0).choice(len(images), 2000, replace=False)
    assert accuracy(load_classifier(), images[idx], labels[idx]) >= 0.92


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cmkit")
    add_cli(parser.add_subparsers(dest="command"))
    return parser


def test_cli_eval_npz_reference(tmp_path, capsys, one_thread):
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "s.npz", arr_0=rng.integers(0, 256, size=(60, 28, 28, 1), dtype=np.uint8))
    np.savez(tmp_path / "r.npz", arr_0=rng.integers(0, 256, size=(80, 28, 28, 1), dtype=np.uint8))
    args = _parser().parse_args(
        [
            "eval",
            "--samples",
            str(tmp_path / "s.npz"),
            "--ref",
            str(tmp_path / "r.npz"),
            "-o",
            str(tmp_path / "out.json"),
            "--kid-subsets",
            "5",
            "--threads",
            "1",
        ]
    )
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert FMNIST_LABEL in out and "FID" not in out and "floor" in out
    res = json.loads((tmp_path / "out.json").read_text())
    assert res["label"] == FMNIST_LABEL and res["n_samples"] == 60 and res["floor"] is None
    assert res["fd"] > 0 and 0 <= res["precision"] <= 1


def test_cli_eval_errors(tmp_path):
    args = _parser().parse_args(["eval"])
    with pytest.raises(CmkitError, match="--samples"):
        args.func(args)
    np.savez(tmp_path / "bad.npz", images=np.zeros((2, 28, 28, 1), np.uint8))
    args = _parser().parse_args(["eval", "--samples", str(tmp_path / "bad.npz")])
    with pytest.raises(CmkitError, match="arr_0"):
        args.func(args)


@needs_fmnist
def test_evaluate_images_against_fmnist_test_with_floor(monkeypatch, tmp_path):
    monkeypatch.setenv("CMKIT_CACHE", str(tmp_path))
    noise = np.random.default_rng(0).integers(0, 256, size=(500, 28, 28, 1), dtype=np.uint8)
    res_noise = evaluate_images(noise, "fmnist-test", "fmnist", progress=False, kid_subsets=10)
    floor = res_noise["floor"]
    assert floor is not None and floor["n_samples"] == 500 and "train split" in floor["description"]
    assert res_noise["n_reference"] == 10000 and res_noise["label"] == FMNIST_LABEL
    assert floor["precision"] > 0.7 and floor["recall"] > 0.7
    # Noise collapses to one small region of feature space: huge FD and KID, no recall. (Its precision is not
    # asserted: a few large-radius reference outliers can cover such a cluster, a known k-NN weakness.)
    assert res_noise["fd"] > 20 * floor["fd"] and res_noise["kid_mean"] > 20 * floor["kid_mean"]
    assert res_noise["recall"] < 0.05
    assert list(tmp_path.glob("refstats/test-fmnist-*.npz"))  # the split's features were cached
