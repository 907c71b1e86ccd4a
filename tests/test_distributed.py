"""A real two-process torchrun run on CPU (gloo)."""
import shutil
import subprocess
import sys

import torch

from cmkit.checkpoint import load_model

from conftest import TINY


def test_two_process_torchrun_training(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "cmkit", "train", "--preset", "digits-ict", *TINY, "train.steps=4", "train.num_threads=1",
           "train.ckpt_every=2", f"train.out_dir={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    model, cfg = load_model(out)
    assert cfg.train.steps == 4
    assert (out / "checkpoint" / "state.json").read_text().count('"world_size": 2') == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # resuming with a different number of processes is refused with a clear message
    from cmkit.errors import CmkitError
    from cmkit.presets import get_config
    from cmkit.train import Trainer

    cfg = get_config("digits-ict", TINY + ["train.steps=6", "train.resume=true", f"train.out_dir={out}"])
    try:
        Trainer(cfg, progress=False)
    except CmkitError as e:
        assert "2 processes" in str(e)
    else:
        raise AssertionError("resume across world sizes was accepted")
    shutil.rmtree(out)
