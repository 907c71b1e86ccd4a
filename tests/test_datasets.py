import gzip

import numpy as np
import pytest
import torch

from cmkit.datasets import Batches, load_dataset, load_npz, read_idx
from cmkit.errors import CmkitError


def write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_round_trip_and_fashion_mnist_layout(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (5, 28, 28)).astype(np.uint8)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", imgs)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(5))
    assert np.array_equal(read_idx(tmp_path / "t10k-images-idx3-ubyte.gz"), imgs)
    data = load_dataset("fashion_mnist", str(tmp_path), "test")
    assert data.images.shape == (5, 1, 28, 28) and data.labels.tolist() == [0, 1, 2, 3, 4]
    assert torch.equal(data.images[:, 0], torch.from_numpy(imgs))


def test_missing_and_malformed_data_give_clear_errors(tmp_path):
    with pytest.raises(CmkitError, match="dataset-fashion-mnist"):
        load_dataset("fashion_mnist", str(tmp_path), "train")
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03\x00\x00\x00\x09")
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(9))
    with pytest.raises(CmkitError, match="truncated"):
        load_dataset("fashion_mnist", str(tmp_path), "train")
    with pytest.raises(CmkitError, match="unknown data set"):
        load_dataset("cifar11")


def test_npz_loader_and_shape_checks(tmp_path):
    np.savez(tmp_path / "a.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8), arr_1=np.array([0, 1, 2, 1]))
    data = load_npz(str(tmp_path / "a.npz"))
    assert data.images.shape == (4, 3, 8, 8) and data.num_classes == 3
    np.savez(tmp_path / "b.npz", arr_0=np.zeros((4, 8, 8, 3), np.float32))
    with pytest.raises(CmkitError, match="uint8"):
        load_npz(str(tmp_path / "b.npz"))
    with pytest.raises(CmkitError, match="expects 28"):
        load_dataset("npz", str(tmp_path / "a.npz"), resolution=28)


def test_digits_bundled_and_scaled():
    data = load_dataset("digits")
    assert data.images.shape == (1797, 1, 8, 8) and data.images.max() == 255
    x, y = Batches(data, 64).get(0)
    assert x.min() >= -1 and x.max() <= 1 and y.shape == (64,)


def test_batches_deterministic_and_split_across_ranks():
    data = load_dataset("digits")
    single = Batches(data, 8, seed=3, flip=True)
    ranks = [Batches(data, 8, seed=3, flip=True, rank=r, world_size=2) for r in range(2)]
    for step in (0, 5, 300):  # 300 crosses an epoch boundary
        x, _ = single.get(step)
        parts = torch.cat([r.get(step)[0] for r in ranks])
        assert torch.equal(x, parts) and torch.equal(x, Batches(data, 8, seed=3, flip=True).get(step)[0])
    assert not torch.equal(single.get(0)[0], single.get(1)[0])
