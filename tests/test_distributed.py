"""A real two-process torchrun run on CPU (gloo)."""

import json
import shutil
import subprocess
import sys

import torch
from conftest import TINY

from cmkit.load import load_model


def test_two_process_torchrun_training(tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29533",
        "-m",
        "cmkit",
        "train",
        "--preset",
        "digits-ict",
        *TINY,
        "train.steps=4",
        "train.num_threads=1",
        "train.ckpt_every=2",
        f"train.out_dir={out}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Grad strides do not match" not in proc.stderr  # gradients in the layout of DDP's buckets
    summaries = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1, proc.stdout  # one summary, from rank 0: the loss averaged over both ranks
    last = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()][-1]
    assert summaries[0]["steps"] == 4 and summaries[0]["final_loss"] != last["loss"]  # rank 0's own loss differs
    model, cfg = load_model(out)
    assert cfg.train.steps == 4
    assert (out / "checkpoint" / "state.json").read_text().count('"world_size": 2') == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # resuming with a different number of processes is refused with a clear message
    from cmkit.errors import CmkitError
    from cmkit.training.loop import Loop
    from cmkit.training.presets import get_config

    cfg = get_config("digits-ict", TINY + ["train.steps=6", "train.resume=true", f"train.out_dir={out}"])
    try:
        Loop(cfg, progress=False)
    except CmkitError as e:
        assert "2 processes" in str(e)
    else:
        raise AssertionError("resume across world sizes was accepted")
    shutil.rmtree(out)


def test_two_process_torchrun_decoder_training(tmp_path):
    """The autoencoder and the consistency decoder train through the same DDP loop as the denoisers."""
    from cmkit.decoder.decoder import ConsistencyDecoder

    quiet = ["train.num_threads=1", "train.log_every=1", "train.sample_every=0", "train.ckpt_every=0"]
    base = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29534",
        "-m",
        "cmkit",
        "train",
        "--no-progress",
    ]
    for preset, extra in (
        ("digits-ae", [f"train.out_dir={tmp_path / 'ae'}"]),
        (
            "digits-cdec",
            [f"train.out_dir={tmp_path / 'cdec'}", f"model.autoencoder={tmp_path / 'ae'}", "model.stats_images=64"],
        ),
    ):
        proc = subprocess.run(
            base + ["--preset", preset, "train.steps=3", *quiet, *extra], capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        state = (tmp_path / preset.split("-")[1] / "checkpoint" / "state.json").read_text()
        assert '"world_size": 2' in state and '"step": 3' in state
    dec = ConsistencyDecoder.from_pretrained(tmp_path / "cdec")
    assert all(torch.isfinite(p).all() for p in dec.parameters())
