"""The FID Inception-v3 pipeline with random weights (the real weights cannot be downloaded here)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cmkit.errors import CmkitError
from cmkit.metrics.evaluate import get_extractor
from cmkit.metrics.inception import WEIGHTS_ENV, FIDInceptionV3, InceptionExtractor, load_inception, random_inception


@pytest.fixture(scope="module")
def net() -> FIDInceptionV3:
    return random_inception(seed=0)


def test_state_dict_layout_matches_pytorch_fid_weights(net):
    sd = net.state_dict()
    # torchvision's inception_v3 has 27,161,264 parameters; without AuxLogits (3,326,696) and with the
    # TF graph's 1008 classes instead of 1000 (+16,392) that is the FID network's 23,850,960.
    assert sum(p.numel() for p in net.parameters()) == 23_850_960
    expected = {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Conv2d_4a_3x3.bn.running_var": (192,),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_5d.branch5x5_2.conv.weight": (64, 48, 5, 5),
        "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
        "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
        "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
        "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
        "Mixed_7c.branch_pool.bn.running_mean": (192,),
        "fc.weight": (1008, 2048),
        "fc.bias": (1008,),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any(k.startswith("AuxLogits") for k in sd)
    assert len([k for k in sd if not k.endswith("num_batches_tracked")]) == 472


def test_random_weights_features_shape_and_determinism(net):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(2, 28, 28, 1), dtype=np.uint8)
    ex = InceptionExtractor(model=net, batch_size=2)
    f1 = ex.extract(images, progress=False)
    assert f1.shape == (2, 2048) and f1.dtype == np.float64 and np.isfinite(f1).all()
    assert (f1 >= 0).all() and f1.std() > 0 and not np.allclose(f1[0], f1[1])
    # Deterministic and batch-independent: the same images as float NCHW in [-1, 1], one per batch.
    x = torch.from_numpy(images[:1]).permute(0, 3, 1, 2).float() / 127.5 - 1
    ex1 = InceptionExtractor(model=net, batch_size=1)
    np.testing.assert_allclose(ex1.extract(x, progress=False), f1[:1], rtol=1e-4, atol=1e-6)
    assert ex.label == "FID" and ex.cache_key is None


def test_missing_weights_give_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    with pytest.raises(CmkitError) as e:
        get_extractor("inception")
    msg = str(e.value)
    assert "\n" not in msg and WEIGHTS_ENV in msg and "--inception-weights" in msg
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "nope.pth"))
    with pytest.raises(CmkitError, match="not found"):
        load_inception()


def test_weights_file_round_trip_and_bad_file(net, monkeypatch, tmp_path):
    # A file laid out like pytorch-fid's (plain tensors, no num_batches_tracked) loads strictly.
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "pt_inception.pth"
    torch.save(state, path)
    monkeypatch.setenv(WEIGHTS_ENV, str(path))
    loaded = load_inception()
    assert torch.equal(loaded.Mixed_7c.branch_pool.conv.weight, net.Mixed_7c.branch_pool.conv.weight)
    assert InceptionExtractor().cache_key.startswith("inception-")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(CmkitError, match="not the FID Inception state dict"):
        load_inception(tmp_path / "bad.pth")
