"""The files a researcher downloads, turned into what the paper presets read: the official CIFAR-10 archive (built
here in its format) and the official LPIPS + VGG16 weights (built here with their key layouts)."""

from __future__ import annotations

import io
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cmkit.cli.main import main
from cmkit.errors import CmkitError
from cmkit.formats.cifar10 import prepare_cifar10
from cmkit.lpips import convert_lpips


def _batch(rng, n: int) -> dict:
    """A CIFAR-10 batch as the official pickles hold it: bytes keys, data N×3072 uint8 (CHW), labels a list."""
    return {
        b"batch_label": b"training batch",
        b"labels": rng.integers(0, 10, n).tolist(),
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [b"x.png"] * n,
    }


def _archive(path, batches: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, raw in batches.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))


@pytest.fixture
def cifar(tmp_path):
    rng = np.random.default_rng(0)
    content = {f"data_batch_{i}": _batch(rng, 7) for i in range(1, 6)} | {"test_batch": _batch(rng, 5)}
    path = tmp_path / "cifar-10-python.tar.gz"
    _archive(path, {k: pickle.dumps(v, protocol=2) for k, v in content.items()})
    return path, content


def test_cifar10_archive_becomes_the_presets_npz(cifar, tmp_path, monkeypatch, capsys):
    path, content = cifar
    monkeypatch.chdir(tmp_path)
    assert main(["prepare-data", "cifar10", str(path)]) == 0
    z = np.load(tmp_path / "data" / "cifar10-train.npz")
    first = content["data_batch_1"]
    assert z["arr_0"].shape == (35, 32, 32, 3) and z["arr_0"].dtype == np.uint8
    # pixel (row 2, column 5) of image 0: the official layout is 1024 red, 1024 green, 1024 blue values
    assert list(z["arr_0"][0, 2, 5]) == [first[b"data"][0, c * 1024 + 2 * 32 + 5] for c in range(3)]
    assert z["arr_1"].tolist() == sum((content[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    assert main(["prepare-data", "cifar10", str(path), "--split", "test"]) == 0
    assert np.load(tmp_path / "data" / "cifar10-test.npz")["arr_0"].shape == (5, 32, 32, 3)
    # the preset finds it where it looks by default, and its dry run no longer names it
    capsys.readouterr()
    assert main(["train", "--preset", "cifar10-edm", "--dry-run"]) == 0
    from cmkit.datasets import load_dataset

    assert len(load_dataset("npz", "data/cifar10-train.npz")) == 35


def test_cifar10_bad_archives_are_one_line(cifar, tmp_path):
    path, content = cifar
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(path.read_bytes()[:300])
    evil = tmp_path / "evil.tar.gz"

    class Run:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    _archive(
        evil,
        {
            **{f"data_batch_{i}": pickle.dumps(content["data_batch_1"], protocol=2) for i in range(1, 5)},
            "data_batch_5": pickle.dumps(Run(), protocol=2),
        },
    )
    partial = tmp_path / "partial.tar.gz"
    _archive(partial, {"data_batch_1": pickle.dumps(content["data_batch_1"], protocol=2)})
    for archive, message in [
        (truncated, "truncated or not a tar.gz"),
        (evil, "refusing to load posix.system"),
        (partial, "has no cifar-10-batches-py/data_batch_2"),
        (tmp_path / "none.tar.gz", "archive not found"),
    ]:
        with pytest.raises(CmkitError, match=message):
            prepare_cifar10(archive, tmp_path / "out.npz")
    assert not (tmp_path / "out.npz").exists()


# --- LPIPS ---------------------------------------------------------------------------------------------

VGG = [64, 64, "P", 128, 128, "P", 256, 256, 256, "P", 512, 512, 512, "P", 512, 512, 512]


def _official_files(tmp_path):
    """torchvision's VGG16 state dict layout (features.{i}, classifier.{j}) and the lpips package's heads
    (lin{k}.model.1.weight, 1×C×1×1), random values, saved with torch.save as both projects do."""
    g = torch.Generator().manual_seed(0)
    vgg, cin, i = {}, 3, 0
    for v in VGG:
        if v == "P":
            i += 1
            continue
        vgg[f"features.{i}.weight"] = torch.randn(v, cin, 3, 3, generator=g) * (2 / (9 * cin)) ** 0.5
        vgg[f"features.{i}.bias"] = torch.randn(v, generator=g) * 0.01
        cin, i = v, i + 2
    vgg["classifier.0.weight"] = torch.randn(8, 4, generator=g)  # stands for the unused classifier
    heads = {
        f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for k, c in enumerate((64, 128, 256, 512, 512))
    }
    torch.save(vgg, tmp_path / "vgg16-397923af.pth")
    torch.save(heads, tmp_path / "vgg.pth")
    return vgg, heads


def _reference_lpips(vgg, heads, a, b):
    """LPIPS as the CM code computes it (piq, replace_pooling=True), written from the raw official tensors."""

    def taps(x):
        x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
        x = ((x + 1) / 2 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
            [0.229, 0.224, 0.225]
        ).view(1, 3, 1, 1)
        out, i, conv = [], 0, 0
        for v in VGG:
            if v == "P":
                x, i = F.avg_pool2d(x, 2), i + 1
                continue
            x, i, conv = (
                F.relu(F.conv2d(x, vgg[f"features.{i}.weight"], vgg[f"features.{i}.bias"], padding=1)),
                i + 2,
                conv + 1,
            )
            if conv in (2, 4, 7, 10, 13):  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
                out.append(x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    return sum(
        (heads[f"lin{k}.model.1.weight"] * (fa - fb).pow(2)).sum(1).mean((1, 2))
        for k, (fa, fb) in enumerate(zip(taps(a), taps(b)))
    )


def test_lpips_from_the_official_files_equals_the_reference(tmp_path, capsys):
    from cmkit.lpips import LPIPS

    vgg, heads = _official_files(tmp_path)
    out = tmp_path / "lpips.safetensors"
    assert (
        main(
            [
                "convert-lpips",
                "--lpips",
                str(tmp_path / "vgg.pth"),
                "--vgg",
                str(tmp_path / "vgg16-397923af.pth"),
                "-o",
                str(out),
            ]
        )
        == 0
    )
    net = LPIPS.from_file(out)
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        ours, ref = net(a, b), _reference_lpips(vgg, heads, a, b)
    assert ours.shape == (2,) and (ours > 0).all()
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6)
    assert torch.equal(net(a, a), torch.zeros(2))


def test_lpips_bad_files_are_one_line(tmp_path):
    from cmkit.lpips import LPIPS

    vgg, heads = _official_files(tmp_path)
    torch.save({**heads, "lin4.model.1.weight": torch.zeros(1, 64, 1, 1)}, tmp_path / "short.pth")
    torch.save({k: v.long() for k, v in heads.items()}, tmp_path / "ints.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    cases = [
        ("short.pth", "wrongly shaped"),
        ("ints.pth", "dtype torch.int64"),
        ("list.pth", "not a state dict"),
        ("junk.pth", "cannot read LPIPS heads"),
        ("none.pth", "not found"),
    ]
    for name, message in cases:
        with pytest.raises(CmkitError, match=message):
            convert_lpips(tmp_path / name, tmp_path / "vgg16-397923af.pth")
    with pytest.raises(CmkitError, match="missing features"):
        convert_lpips(tmp_path / "vgg.pth", tmp_path / "vgg.pth")  # the heads file given as VGG16
    for name, message in [
        ("junk.pth", "cannot read LPIPS weights"),
        ("list.pth", "not a state dict"),
        ("none.safetensors", "LPIPS weights not found"),
    ]:
        with pytest.raises(CmkitError, match=message):
            LPIPS.from_file(tmp_path / name)
