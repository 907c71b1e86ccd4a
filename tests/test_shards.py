"""Shard sets (cmkit.shards): data sets read from disk batch by batch, prepared from image folders; the batches,
resume and memory of training on them."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image

from cmkit.cli.main import main
from cmkit.datasets import Batches, load_dataset
from cmkit.errors import CmkitError
from cmkit.imageio import crop_resize
from cmkit.shards import ShardSet, prepare_folder, shards_from_arrays
from cmkit.training.loop import Loop


@pytest.fixture
def digit_shards(tmp_path):
    """The bundled digits as a shard set of several small shards."""
    d = load_dataset("digits")
    return shards_from_arrays(tmp_path / "digits", d.images.numpy(), d.labels.numpy(), shard_images=500)


def test_a_shard_set_serves_the_same_batches_as_the_data_in_memory(digit_shards):
    d = load_dataset("digits")
    assert len(digit_shards) == len(d) and digit_shards.shape == (1, 8, 8) and len(digit_shards.shards) == 4
    assert digit_shards.num_classes == 10 and torch.equal(digit_shards.labels, d.labels)
    idx = torch.tensor([1796, 0, 499, 500, 1000, 3])  # across shard boundaries, in any order
    assert torch.equal(digit_shards.take(idx), d.images[idx])
    digit_shards.verify()
    for rank in range(2):
        memory = Batches(d, 64, seed=5, flip=True, rank=rank, world_size=2)
        disk = Batches(digit_shards, 64, seed=5, flip=True, rank=rank, world_size=2, workers=2)
        for step in [0, 1, 1, 2, 30, 29, 100]:  # in order, repeated (a skipped step) and out of order (a resume)
            (x, y), (x2, y2) = memory.get(step), disk.get(step)
            assert torch.equal(x, x2) and torch.equal(y, y2), (rank, step)
        disk.close()


def test_microbatches_tile_the_rank_batch(digit_shards):
    full = Batches(digit_shards, 64, seed=1, rank=1, world_size=2)
    micro = Batches(digit_shards, 64, seed=1, rank=1, world_size=2, accum=4)
    x, y = full.get(7)
    parts = [micro.get(7, micro=m) for m in range(4)]
    assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
    assert torch.equal(torch.cat([micro.positions(m) for m in range(4)]), torch.arange(32, 64))
    with pytest.raises(CmkitError, match="divisible by the 2 processes × train.accum=3"):
        Batches(digit_shards, 64, world_size=2, accum=3)


def _shard_file(root):
    return root / "images-00001.npy"


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda r: _shard_file(r).unlink(), "images-00001.npy is missing"),
        (lambda r: _shard_file(r).write_bytes(_shard_file(r).read_bytes()[:-10]), "is truncated"),
        (lambda r: _shard_file(r).write_bytes(b"\x93NUMPY garbage"), "is corrupt"),
        (lambda r: (r / "index.json").write_text("{"), "cannot read shard set index"),
        (lambda r: (r / "index.json").unlink(), "no shard set at"),
        (lambda r: np.save(r / "labels.npy", np.arange(3)), "must hold 1797 class indices"),
    ],
)
def test_a_damaged_shard_set_is_one_error_line(digit_shards, damage, message):
    damage(digit_shards.root)
    with pytest.raises(CmkitError, match=message) as e:
        ShardSet(digit_shards.root)
    assert "\n" not in str(e.value)


def test_verify_finds_a_changed_byte(digit_shards):
    f = _shard_file(digit_shards.root)
    raw = bytearray(f.read_bytes())
    raw[-5] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(CmkitError, match="CRC-32 does not match"):
        ShardSet(digit_shards.root).verify()


def test_adm_crop_is_box_halving_then_the_centre(tmp_path):
    """ADM's center_crop_arr on a 64×96 image at 32: one box halving (2×2 means) to 32×48, no resize, the centre."""
    a = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    got = np.asarray(crop_resize(Image.fromarray(a), 32, "adm")).astype(int)
    means = a.reshape(32, 2, 48, 2, 3).astype(float).mean(axis=(1, 3))
    assert got.shape == (32, 32, 3) and np.abs(got - means[:, 8:40]).max() <= 1
    centre = np.asarray(crop_resize(Image.fromarray(a[:, 16:80]), 64, "center"))
    assert np.array_equal(centre, a[:, 16:80])  # already the square at its size: unchanged


def _image_folder(root, sizes=((40, 50), (64, 31), (33, 33), (90, 70))):
    rng = np.random.default_rng(1)
    for cls in ("n01", "n02"):
        (root / cls).mkdir(parents=True)
        for i, (h, w) in enumerate(sizes):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / cls / f"{cls}_{i}.png")
    return root


def test_prepare_folder_is_parallel_deterministic_and_labelled(tmp_path):
    src = _image_folder(tmp_path / "train")
    one = prepare_folder(src, tmp_path / "one", 16, workers=1, progress=False, shard_images=3)
    two = prepare_folder(src, tmp_path / "two", 16, workers=2, progress=False, shard_images=3)
    everything = torch.arange(8)
    assert torch.equal(one.take(everything), two.take(everything)) and len(one.shards) == 3
    assert one.classes == ["n01", "n02"] and one.labels.tolist() == [0] * 4 + [1] * 4
    files = sorted(src.rglob("*.png"))
    expected = np.asarray(crop_resize(Image.open(files[5]).convert("RGB"), 16, "adm")).transpose(2, 0, 1)
    assert np.array_equal(one.take(torch.tensor([5]))[0].numpy(), expected)


def test_prepare_data_cli_writes_a_shard_set_and_refuses_to_replace_others(tmp_path, capsys):
    src = _image_folder(tmp_path / "imgs")
    out = tmp_path / "set"
    assert main(["prepare-data", "folder", str(src), "-o", str(out), "--resolution", "8", "--workers", "1"]) == 0
    assert "8 images" in capsys.readouterr().out and ShardSet(out).shape == (3, 8, 8)
    assert main(["prepare-data", "folder", str(src), "-o", str(out), "--resolution", "8"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["prepare-data", "folder", str(src), "-o", str(src / "n01"), "--overwrite"]) == 2
    assert "not a shard set" in capsys.readouterr().err and len(list((src / "n01").iterdir())) == 4
    (src / "n01" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    assert main(["prepare-data", "folder", str(src), "-o", str(tmp_path / "x"), "--workers", "2"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cmkit")]
    assert len(errors) == 1 and "bad.png" in errors[0] and not (tmp_path / "x").exists()
    np.savez(tmp_path / "a.npz", arr_0=np.zeros((5, 4, 4, 3), np.uint8), arr_1=np.arange(5))
    assert main(["prepare-data", "npz", str(tmp_path / "a.npz"), "-o", str(tmp_path / "n")]) == 0
    assert ShardSet(tmp_path / "n").num_classes == 5


def test_training_on_shards_with_workers_and_microbatches_resumes_bit_for_bit(digit_shards, tmp_path):
    common = [
        "train.steps=6",
        "data.flip=true",
        "train.ema_rates=0.9",
        "data.name=shards",
        f"data.root={digit_shards.root}",
        "data.workers=2",
        "train.accum=2",
        "train.noise=per_sample",
    ]
    straight = Loop(tiny_config("digits-ict", tmp_path / "a", *common), progress=False)
    straight.run()
    first = Loop(tiny_config("digits-ict", tmp_path / "b", *common), progress=False)
    for _ in range(3):
        first.train_step()
    first.save_checkpoint()
    first.close()
    resumed = Loop(tiny_config("digits-ict", tmp_path / "b", *common, "train.resume=true"), progress=False)
    resumed.run()
    for a, b in [(straight.model, resumed.model), (straight.emas[0], resumed.emas[0])]:
        for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(v, w), k


MEMORY_RUN = """
import json, sys, torch
from conftest import tiny_config
from cmkit.training.loop import Loop
torch.set_num_threads(1)
cfg = tiny_config("digits-ict", sys.argv[2], "data.name=shards", "data.root=" + sys.argv[1], "train.steps=10",
                  "model.img_resolution=16", "model.in_channels=3", "model.num_classes=0", "data.workers=1")
loop = Loop(cfg, progress=False)
loop.run()
status = dict(l.split(":", 1) for l in open("/proc/self/status") if ":" in l)
print(json.dumps({"peak_kb": int(status["VmHWM"].split()[0])}))
"""


def _peak_rss_kb(shards, out) -> int:
    proc = subprocess.run(
        [sys.executable, "-c", MEMORY_RUN, str(shards), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd="tests",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_kb"]


def test_training_on_a_set_larger_than_its_memory_keeps_resident_memory_flat(tmp_path):
    """Training on 256,000 images of 16×16×3 (188 MB) peaks within 40 MB of the same run on 1,000 images: the data
    set is never loaded (held in memory, it alone would add 188 MB to the process)."""
    rng = np.random.default_rng(0)
    n, shape = 256_000, (3, 16, 16)
    small = shards_from_arrays(tmp_path / "small", rng.integers(0, 256, (1000, *shape), dtype=np.uint8))
    big_images = np.lib.format.open_memmap(tmp_path / "big.npy", "w+", np.uint8, (n, *shape))
    for i in range(0, n, 32_000):
        big_images[i : i + 32_000] = rng.integers(0, 256, (32_000, *shape), dtype=np.uint8)
    big = shards_from_arrays(tmp_path / "big", big_images)
    del big_images
    (tmp_path / "big.npy").unlink()
    data_mb = n * np.prod(shape) / 2**20
    base, grown = _peak_rss_kb(small.root, tmp_path / "r1"), _peak_rss_kb(big.root, tmp_path / "r2")
    assert (grown - base) / 1024 < 40 < data_mb / 4, (base, grown, data_mb)
