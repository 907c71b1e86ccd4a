"""Sharded training (train.parallel=fsdp, PyTorch's fully_shard) on two CPU processes (gloo): the same weights as
DDP and as one process, exact resume, a normal exported model, and the JVP objective (sCT) under it."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from fsdp_runs import COMMON, CT
from safetensors.torch import load_file

from cmkit.load import load_model
from cmkit.training.loop import Loop


@pytest.fixture(scope="module")
def runs(tmp_path_factory, teacher_dir):
    out = tmp_path_factory.mktemp("fsdp")
    script = Path(__file__).with_name("fsdp_runs.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29557"]
    proc = subprocess.run(
        [*cmd, str(script), str(out), str(teacher_dir)], capture_output=True, text=True, timeout=600, cwd=script.parent
    )
    why = [line for line in proc.stderr.splitlines() if "rror" in line or "xception" in line]
    assert proc.returncode == 0 and "RESULT done" in proc.stdout, "\n".join(why[-20:]) + proc.stderr[-1500:]
    return out


def weights(run, name="model"):
    return load_file(run / "checkpoint" / f"{name}.safetensors")


def close(a, b, rtol=1e-4, atol=1e-6):
    return all(torch.allclose(a[k], b[k], rtol=rtol, atol=atol) for k in a) and a.keys() == b.keys()


def test_fsdp_ends_with_the_weights_of_ddp_and_of_one_process(runs, tmp_path):
    single = Loop(tiny_config("digits-ct", tmp_path / "one", *COMMON, *CT, "train.steps=4"), progress=False)
    single.run()
    one = {k: v for k, v in single.model.state_dict().items()}
    ddp, fsdp = weights(runs / "ct-ddp"), weights(runs / "ct-fsdp")
    assert close(ddp, fsdp) and close(fsdp, one)
    assert close(weights(runs / "ct-ddp", "ema_0.9"), weights(runs / "ct-fsdp", "ema_0.9"))
    assert close(weights(runs / "ct-ddp", "target"), weights(runs / "ct-fsdp", "target"))


def test_an_fsdp_run_resumes_bit_for_bit(runs):
    straight, resumed = runs / "ct-fsdp", runs / "ct-fsdp-resumed"
    for name in ("model", "ema_0.9", "target"):
        a, b = weights(straight, name), weights(resumed, name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    oa, ob = (
        load_file(straight / "checkpoint" / "optimizer.safetensors"),
        load_file(resumed / "checkpoint" / "optimizer.safetensors"),
    )
    assert oa.keys() == ob.keys() and all(torch.equal(oa[k], ob[k]) for k in oa)


def test_an_fsdp_run_exports_a_normal_model_directory(runs):
    model, cfg = load_model(runs / "ct-fsdp")
    ema = weights(runs / "ct-fsdp", "ema_0.9")
    assert cfg.train.parallel == "fsdp"
    assert all(torch.equal(v, ema[k]) for k, v in model.state_dict().items())


def test_the_jvp_objective_under_fsdp_matches_ddp(runs):
    assert close(weights(runs / "sct-ddp"), weights(runs / "sct-fsdp"))
