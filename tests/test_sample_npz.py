"""Streamed, distributed sampling for evaluation (cmkit sample --npz, under torchrun): the same file whatever the
number of processes and the batch size, in bounded memory, resumable."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import tiny_config

import cmkit.generate as generate_module
from cmkit.cli.main import main
from cmkit.generate import sample_images, sample_to_npz
from cmkit.imageio import to_uint8
from cmkit.load import load_model
from cmkit.training.loop import train


@pytest.fixture(scope="module")
def cond_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("cond")
    train(tiny_config("digits-edm-cond", out, "train.steps=2"), progress=False)
    return out


def test_two_processes_write_the_file_one_process_writes(cond_model, tmp_path):
    common = ["sample", "--model", str(cond_model), "-n", "10", "--steps", "2", "--device", "cpu", "--threads", "1"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29551"]
    proc = subprocess.run(
        [*cmd, "-m", "cmkit", *common, "--batch-size", "3", "--npz", str(tmp_path / "two.npz"), "-o", ""],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("wrote") == 1  # rank 0 reports
    assert main([*common, "--batch-size", "4", "--npz", str(tmp_path / "one.npz"), "-o", ""]) == 0
    two, one = np.load(tmp_path / "two.npz"), np.load(tmp_path / "one.npz")
    assert two["arr_0"].shape == (10, 8, 8, 1) and np.array_equal(two["arr_0"], one["arr_0"])
    assert np.array_equal(two["arr_1"], one["arr_1"]) and len(set(one["arr_1"].tolist())) > 1
    model, cfg = load_model(cond_model)
    direct = sample_images(model, cfg, 10, steps=2, progress=False)  # the in-memory path draws the same images
    assert np.array_equal(to_uint8(direct.images), one["arr_0"]) and np.array_equal(direct.labels.numpy(), one["arr_1"])
    assert not (tmp_path / "one.npz.parts").exists() and not (tmp_path / "two.npz.parts").exists()


def test_an_interrupted_sampling_keeps_its_parts_and_draws_only_the_rest(cond_model, tmp_path, monkeypatch):
    model, cfg = load_model(cond_model)
    real, calls = generate_module.generate, []

    def failing(*args, **kwargs):
        calls.append(args[6])  # the seed of the part
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(generate_module, "generate", failing)
    with pytest.raises(KeyboardInterrupt):
        sample_to_npz(model, cfg, 10, tmp_path / "s.npz", steps=2, batch_size=3, progress=False)
    assert len(list((tmp_path / "s.npz.parts").glob("part-*.npz"))) == 2 and not (tmp_path / "s.npz").exists()
    monkeypatch.setattr(generate_module, "generate", real)
    drawn = []
    monkeypatch.setattr(generate_module, "generate", lambda *a, **k: drawn.append(a[6]) or real(*a, **k))
    sample_to_npz(model, cfg, 10, tmp_path / "s.npz", steps=2, batch_size=3, progress=False)
    assert drawn == [6, 9]  # the parts at images 6.. and 9..; 0.. and 3.. were kept
    full = sample_to_npz(model, cfg, 10, tmp_path / "t.npz", steps=2, batch_size=5, progress=False, grid=4)
    assert np.array_equal(np.load(tmp_path / "s.npz")["arr_0"], np.load(tmp_path / "t.npz")["arr_0"])
    assert full.images.shape == (4, 1, 8, 8)


def test_under_torchrun_sample_needs_an_npz(cond_model, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["sample", "--model", str(cond_model), "-n", "2", "-o", "x.png", "--device", "cpu"]) == 2
    assert "--npz" in capsys.readouterr().err


def test_eval_under_torchrun_shares_the_sampling_and_gives_the_one_process_figures(tmp_path):
    args = ["eval", "--model", "fmnist-cd", "-n", "12", "--steps", "1", "--no-floor", "--kid-subsets", "2"]
    args += ["--batch-size", "5", "--device", "cpu", "--threads", "1"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29553"]
    proc = subprocess.run(
        [*cmd, "-m", "cmkit", *args, "-o", str(tmp_path / "two.json")], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert main([*args, "-o", str(tmp_path / "one.json")]) == 0
    two, one = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("two", "one"))
    # the same images; the features differ only by the thread count's summation order (torchrun sets 1 thread)
    assert two["n_samples"] == 12 and two["fd"] == pytest.approx(one["fd"], rel=1e-6)
    assert two["kid_mean"] == pytest.approx(one["kid_mean"], rel=1e-5, abs=1e-9)
    assert not (tmp_path / "two.json.samples.npz").exists()
