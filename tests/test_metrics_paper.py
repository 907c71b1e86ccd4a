"""The CM paper's evaluation (the ADM evaluator's metrics): Inception Score and sFID known answers, the spatial
feature slice of the FID Inception, and OpenAI-style reference batches (images, statistics, or both)."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch

from cmkit.cli.eval import _check_reference_npz, add_cli
from cmkit.errors import CmkitError
from cmkit.metrics import evaluate
from cmkit.metrics.features import FeatureExtractor
from cmkit.metrics.frechet import frechet_distance
from cmkit.metrics.inception import SPATIAL_DIM, InceptionExtractor, random_inception
from cmkit.metrics.inception_score import inception_score, inception_score_from_logits, softmax
from cmkit.metrics.reference import load_reference

# --- Inception Score -------------------------------------------------------------------------------------


def test_inception_score_known_answers():
    assert inception_score(np.full((100, 10), 0.1)) == pytest.approx(1.0, abs=1e-12)  # uniform: no information
    k = 4
    one_hot = np.eye(k)[np.arange(100) % k]  # confident and evenly spread over K classes: IS = K
    assert inception_score(one_hot) == pytest.approx(k, rel=1e-12)
    # By hand: p1 = (1, 0), p2 = (½, ½); p(y) = (¾, ¼); KL1 = ln 4/3, KL2 = ½ ln(2/3) + ½ ln 2 = ½ ln 4/3
    assert inception_score(np.array([[1.0, 0.0], [0.5, 0.5]])) == pytest.approx((4 / 3) ** 0.75, rel=1e-12)
    # All mass on one class: IS 1 however confident
    assert inception_score(np.eye(5)[np.zeros(50, int)]) == pytest.approx(1.0)


def test_inception_score_is_the_mean_over_splits_of_5000_as_in_the_evaluator():
    first = np.eye(3)[np.zeros(5000, int)]  # one class: IS 1
    second = np.eye(3)[1 + np.arange(5000) % 2]  # two classes evenly: IS 2
    probs = np.concatenate([first, second])
    assert inception_score(probs) == pytest.approx(1.5)  # (1 + 2) / 2, not the unsplit 2^1.5
    assert inception_score(probs, split_size=len(probs)) == pytest.approx(2**1.5)
    # 50,000 samples are 10 splits; a short last split counts as one
    assert inception_score(np.eye(2)[np.arange(5001) % 2]) == pytest.approx((2 + 1) / 2)


def test_inception_score_from_logits_and_bad_input():
    logits = np.random.default_rng(0).normal(size=(40, 7)) * 3
    p = softmax(logits)
    np.testing.assert_allclose(p.sum(1), 1)
    assert inception_score_from_logits(logits) == pytest.approx(inception_score(p))
    assert inception_score_from_logits(np.zeros((8, 1008))) == pytest.approx(1.0)
    for bad in (np.ones((3, 2)), np.zeros((0, 3)), np.full((2, 2), np.nan), np.array([[1.5, -0.5]])):
        with pytest.raises(CmkitError):
            inception_score(bad)


# --- sFID ------------------------------------------------------------------------------------------------


def _exact(mean: np.ndarray, cov: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n vectors whose sample mean and (N − 1) covariance are exactly ``mean`` and ``cov``."""
    w = np.random.default_rng(seed).normal(size=(n, len(mean)))
    w -= w.mean(0)
    w = w @ np.linalg.inv(np.linalg.cholesky(np.cov(w, rowvar=False))).T  # whitened: identity covariance
    return mean + w @ np.linalg.cholesky(cov).T


def test_frechet_distance_closed_form_on_gaussians():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    m1, m2 = rng.normal(size=6), rng.normal(size=6)
    # Commuting covariances Q diag(a) Qᵀ, Q diag(b) Qᵀ: d² = |m1 − m2|² + Σ (a + b − 2 √(ab))
    expected = np.sum((m1 - m2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    got = frechet_distance(m1, q @ np.diag(a) @ q.T, m2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(m1, np.diag(a), m1, np.diag(a)) == pytest.approx(0, abs=1e-9)


class ToyExtractor(FeatureExtractor):
    """A deterministic extractor with the Inception's extra outputs: 16-d pooled pixels, 4-d 'spatial'
    features (2×2 pooled) and 3 'logits'; ``spatial`` may be replaced by fixed vectors for known statistics."""

    name = "toy"
    label = "FD (toy)"
    dim = 16
    extra_dims = {"spatial": 4, "logits": 3}

    def __init__(self, spatial: np.ndarray | None = None) -> None:
        super().__init__(batch_size=7)
        self.fixed = spatial
        self.seen = 0

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(batch.float() / 255, 4).flatten(1)

    def _forward_extras(self, batch):
        x = batch.float() / 255
        spatial = torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)
        if self.fixed is not None:
            spatial = torch.from_numpy(self.fixed[self.seen : self.seen + len(batch)])
        self.seen += len(batch)
        logits = torch.stack([x.mean((1, 2, 3)), x.std((1, 2, 3)), x[:, :, 0, 0].mean(1)], 1) * 10
        return self._forward(batch), {"spatial": spatial, "logits": logits}


def _images(seed: int, n: int = 60, shift: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(100 + shift, 30, size=(n, 16, 16, 1)), 0, 255).astype(np.uint8)


def test_sfid_is_the_frechet_distance_of_the_spatial_features_against_mu_s_sigma_s(tmp_path):
    n, d = 60, 4
    mean_s, var_s = np.array([1.0, -2.0, 0.5, 3.0]), np.array([0.5, 2.0, 1.0, 4.0])
    mean_r, var_r = np.array([0.0, -1.0, 0.5, 1.0]), np.array([1.0, 1.0, 2.0, 1.0])
    spatial = _exact(mean_s, np.diag(var_s), n, seed=1)
    ex = ToyExtractor(spatial)
    ref_images = _images(0)
    np.savez(tmp_path / "ref.npz", arr_0=ref_images, mu_s=mean_r, sigma_s=np.diag(var_r))
    ref = load_reference(tmp_path / "ref.npz", ToyExtractor(), progress=False)
    ex.seen = 0
    res = evaluate(_images(1), ref, ex, progress=False, kid_subsets=5, kid_subset_size=20)
    closed = np.sum((mean_s - mean_r) ** 2) + np.sum(var_s + var_r - 2 * np.sqrt(var_s * var_r))
    assert res["sfid"] == pytest.approx(closed, rel=1e-6)  # features are kept in float32, as the evaluator
    assert res["inception_score"] >= 1.0 and res["fd"] > 0 and res["precision"] is not None
    assert d == ex.extra_dims["spatial"]


# --- the FID Inception's extra outputs -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def net():
    net = random_inception(seed=0)
    with torch.no_grad():
        net.fc.bias.normal_()  # a bias the Inception Score must not use
    return net


def test_spatial_features_are_the_first_7_channels_of_mixed_6d_branch1x1_in_nhwc_order(net):
    images = np.random.default_rng(0).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    seen = {}
    hook = net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: seen.setdefault("out", o.detach()))
    try:
        feats, extras = InceptionExtractor(model=net, batch_size=2).extract_all(images, progress=False)
    finally:
        hook.remove()
    out = seen["out"]  # mixed_6/conv: the ReLU output of Mixed_6d's 1×1 branch
    assert out.shape == (2, 192, 17, 17) and (out >= 0).all()
    spatial = extras["spatial"]
    assert spatial.shape == (2, SPATIAL_DIM) == (2, 7 * 17 * 17) and spatial.dtype == np.float32
    expected = out[:, :7].permute(0, 2, 3, 1).reshape(2, -1).numpy()  # TF's spatial[..., :7], flattened HWC
    np.testing.assert_allclose(spatial, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(spatial[:, :7], out[:, :7, 0, 0].numpy(), rtol=1e-5, atol=1e-6)  # channels fastest
    assert not np.allclose(spatial, out[:, :7].reshape(2, -1).numpy())  # not the NCHW flattening
    # The pool_3 features are unchanged, and the IS logits are pool_3 @ Wᵀ without the bias (as the evaluator)
    np.testing.assert_allclose(feats, InceptionExtractor(model=net).extract(images, progress=False), rtol=1e-5)
    w = net.fc.weight.double().numpy()
    np.testing.assert_allclose(extras["logits"], feats @ w.T, rtol=1e-4, atol=1e-4)
    assert extras["logits"].shape == (2, 1008)


# --- reference batches -----------------------------------------------------------------------------------------


def _stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return x.mean(0), np.cov(x, rowvar=False)


def test_reference_batch_with_images_only_stats_only_and_both(tmp_path):
    ex = ToyExtractor()
    ref_images, samples = _images(0), _images(1, shift=20)
    feats, extras = ex.extract_all(ref_images, progress=False)
    mu, sigma = _stats(feats)
    mu_s, sigma_s = _stats(extras["spatial"].astype(np.float64))

    np.savez(tmp_path / "images.npz", arr_0=ref_images)
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    # "both", as VIRTUAL_imagenet64_labeled.npz: data-set statistics (here shifted, so we can see they win)
    np.savez(
        tmp_path / "both.npz",
        arr_0=ref_images,
        arr_1=np.arange(60),
        mu=mu + 0.1,
        sigma=sigma,
        mu_s=mu_s + 0.1,
        sigma_s=sigma_s,
    )
    results = {}
    for name in ("images", "stats", "both"):
        ref = load_reference(tmp_path / f"{name}.npz", ex, progress=False)
        results[name] = evaluate(samples, ref, ex, progress=False, kid_subsets=5, kid_subset_size=20)
    img, st, both = results["images"], results["stats"], results["both"]
    assert st["fd"] == pytest.approx(img["fd"], rel=1e-9) and st["sfid"] == pytest.approx(img["sfid"], rel=1e-9)
    assert img["precision"] is not None and img["kid_mean"] is not None
    assert st["precision"] is None and st["kid_mean"] is None  # no reference features without images
    # the stored statistics are used, not the images' own
    s_feats, s_extras = ex.extract_all(samples, progress=False)
    assert both["fd"] == pytest.approx(frechet_distance(*_stats(s_feats), mu + 0.1, sigma), rel=1e-9)
    assert both["sfid"] == pytest.approx(
        frechet_distance(*_stats(s_extras["spatial"].astype(np.float64)), mu_s + 0.1, sigma_s), rel=1e-9
    )
    assert both["fd"] != pytest.approx(img["fd"], rel=1e-3)
    assert both["precision"] == img["precision"] and both["recall"] == img["recall"]  # the images give P/R
    assert img["inception_score"] == st["inception_score"] == both["inception_score"] > 1  # samples only


@pytest.mark.parametrize(
    "arrays, match",
    [
        (dict(labels=np.arange(3)), "arr_0.*mu.*found keys"),
        (dict(mu=np.zeros(3), sigma=np.eye(3)), r"shapes \(3,\)/\(3, 3\), expected \(16,\)"),
        (dict(mu=np.zeros(16), sigma=np.eye(15)), "sigma have shapes"),
        (dict(mu=np.zeros(16)), "has 'mu' but no 'sigma'"),
        (dict(mu=np.zeros(16), sigma=np.eye(16), mu_s=np.zeros(4), sigma_s=np.eye(5)), "mu_s/sigma_s"),
        (dict(mu=np.zeros(16), sigma=np.eye(16), sigma_s=np.eye(4)), "has 'sigma_s' but no 'mu_s'"),
        (dict(arr_0=np.zeros((2, 16, 16, 3), np.float32)), "float32"),
        (dict(arr_0=np.zeros((2, 3, 16, 16), np.uint8)), "NCHW"),
        (dict(mu=np.full(16, np.nan), sigma=np.eye(16)), "non-finite"),
    ],
)
def test_reference_batch_errors_are_one_line(tmp_path, arrays, match):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(CmkitError, match=match) as e:
        load_reference(tmp_path / "bad.npz", ToyExtractor(), progress=False)
    assert "\n" not in str(e.value)


def test_eval_checks_a_reference_batch_for_the_inception_space_before_any_work(tmp_path):
    # OpenAI's layout: pool statistics 2048-d, spatial 2023-d
    np.savez(
        tmp_path / "ok.npz",
        mu=np.zeros(2048),
        sigma=np.eye(2048),
        mu_s=np.zeros(2023),
        sigma_s=np.eye(2023),
        arr_0=np.zeros((4, 64, 64, 3), np.uint8),
    )
    _check_reference_npz(tmp_path / "ok.npz", "inception")
    np.savez(tmp_path / "wrong.npz", mu=np.zeros(2048), sigma=np.eye(2048), mu_s=np.zeros(2048), sigma_s=np.eye(2048))
    with pytest.raises(CmkitError, match=r"mu_s/sigma_s have shapes \(2048,\)/\(2048, 2048\), expected \(2023,\)"):
        _check_reference_npz(tmp_path / "wrong.npz", "inception")
    with pytest.raises(CmkitError, match="expected \\(128,\\)"):  # the same file in the classifier's space
        _check_reference_npz(tmp_path / "ok.npz", "fmnist")


def test_cli_eval_reports_is_and_sfid_against_a_virtual_reference_batch(net, tmp_path, capsys):
    """``cmkit eval --features inception --ref VIRTUAL_….npz``: the evaluator's five numbers (random weights)."""
    from safetensors.torch import save_file

    weights = tmp_path / "inception.safetensors"
    save_file(
        {k: v.contiguous() for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}, str(weights)
    )
    rng = np.random.default_rng(0)
    ref_images = rng.integers(0, 256, size=(8, 32, 32, 3), dtype=np.uint8)
    ex = InceptionExtractor(model=net, batch_size=8)
    feats, extras = ex.extract_all(ref_images, progress=False)
    np.savez(
        tmp_path / "VIRTUAL_toy.npz",
        arr_0=ref_images,
        mu=feats.mean(0),
        sigma=np.cov(feats, rowvar=False),
        mu_s=extras["spatial"].mean(0),
        sigma_s=np.cov(extras["spatial"], rowvar=False),
    )
    np.savez(tmp_path / "samples.npz", arr_0=ref_images[::-1].copy())
    parser = argparse.ArgumentParser(prog="cmkit")
    add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "eval",
            "--samples",
            str(tmp_path / "samples.npz"),
            "--ref",
            str(tmp_path / "VIRTUAL_toy.npz"),
            "--features",
            "inception",
            "--inception-weights",
            str(weights),
            "--kid-subsets",
            "2",
            "-o",
            str(tmp_path / "r.json"),
        ]
    )
    assert args.func(args) == 0
    out = capsys.readouterr().out
    for row in ("FID", "IS", "sFID", "precision", "recall"):
        assert any(line.split()[:1] == [row] or line.startswith(row) for line in out.splitlines()), (row, out)
    res = json.loads((tmp_path / "r.json").read_text())
    # the same images in another order: FID and sFID 0 (up to sqrtm), precision and recall 1
    assert abs(res["fd"]) < 1e-3 and abs(res["sfid"]) < 1e-3 and res["precision"] == res["recall"] == 1.0
    assert res["inception_score"] == pytest.approx(inception_score_from_logits(extras["logits"]), rel=1e-4)
    assert math.isfinite(res["inception_score"]) and res["inception_score"] >= 1
