"""Gradient accumulation (train.accum) and per-sample noise (train.noise=per_sample): a step over k microbatches
is the full-batch step, for every method; under DDP it all-reduces once per step."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file

from cmkit.training.loop import Loop

METHODS = {  # preset: the extra settings it needs (teacher, first stage)
    "digits-edm": [],
    "digits-edm-cond": [],
    "digits-cd": ["teacher"],
    "digits-pd": ["teacher"],
    "digits-ct": [],
    "digits-ict": [],
    "digits-ect": ["init"],
    "digits-sct": ["init"],
    "digits-scd": ["teacher"],
    "digits-rcm": ["teacher", "loss.tangent_warmup=0"],  # step 0 is a student step with the DMD term
    "digits-meanflow": [],
    "digits-tcm": ["ect"],
    "digits-cmt": ["teacher", "loss.nfe=2"],  # microbatches of 2 rows hold whole trajectories
}


@pytest.fixture(scope="module")
def ect_run(tmp_path_factory, teacher_dir):
    from cmkit.training.loop import train

    out = tmp_path_factory.mktemp("ect")
    train(tiny_config("digits-ect", out, "train.steps=2", f"train.init_from={teacher_dir}"), progress=False)
    return out


def step_gradient(preset, out, accum, extra):
    cfg = tiny_config(
        preset, out, "train.batch_size=8", f"train.accum={accum}", "train.noise=per_sample", "model.dropout=0", *extra
    )
    loop = Loop(cfg, progress=False)
    loop.optimizer.zero_grad(set_to_none=True)
    loss, _ = loop.accumulate_gradients()
    loop.close()
    return loss, torch.cat([p.grad.flatten() for p in loop.model.parameters() if p.grad is not None])


@pytest.mark.parametrize("preset", list(METHODS))
def test_k_microbatches_give_the_full_batch_gradient(preset, tmp_path, teacher_dir, ect_run, one_thread):
    needs = METHODS[preset]
    extra = [f"train.teacher={teacher_dir}"] if "teacher" in needs else []
    extra += [f"train.init_from={teacher_dir}"] if "init" in needs or "teacher" in needs else []
    extra += [f"train.teacher={ect_run}", f"train.init_from={ect_run}"] if "ect" in needs else []
    extra += [n for n in needs if "=" in n]
    loss1, g1 = step_gradient(preset, tmp_path / "one", 1, extra)
    loss4, g4 = step_gradient(preset, tmp_path / "four", 4, extra)
    assert math.isclose(loss1, loss4, rel_tol=1e-5, abs_tol=1e-7)
    assert g1.abs().max() > 0 and (g1 - g4).abs().max() <= 1e-5 * g1.abs().max()


def test_stream_noise_depends_on_the_split_and_per_sample_noise_does_not(tmp_path):
    """The honest converse: with the default stream noise the microbatches draw other noise than the full batch."""
    grads = {}
    for noise in ("stream", "per_sample"):
        for accum in (1, 2):
            cfg = tiny_config(
                "digits-ict",
                tmp_path / f"{noise}{accum}",
                "train.batch_size=8",
                f"train.accum={accum}",
                f"train.noise={noise}",
            )
            loop = Loop(cfg, progress=False)
            loop.optimizer.zero_grad(set_to_none=True)
            loop.accumulate_gradients()
            loop.close()
            grads[noise, accum] = torch.cat([p.grad.flatten() for p in loop.model.parameters()])
    assert not torch.allclose(grads["stream", 1], grads["stream", 2], rtol=1e-3)
    assert torch.allclose(grads["per_sample", 1], grads["per_sample", 2], rtol=1e-4, atol=1e-7)


def test_a_non_finite_microbatch_skips_the_whole_step(tmp_path):
    loop = Loop(tiny_config("digits-ict", tmp_path / "r", "train.accum=2", "train.batch_size=8"), progress=False)
    before = [p.detach().clone() for p in loop.model.parameters()]
    ema = [p.detach().clone() for p in loop.emas[0].parameters()]
    real = loop.task.loss

    def nan_on_second(net, step, generator, micro=0):
        value, extra = real(net, step, generator, micro)
        return (value * float("nan") if micro == 1 else value), extra

    loop.task.loss = nan_on_second
    stats = loop.train_step()
    loop.close()
    assert stats["skipped"] and loop.step == 0 and loop.skipped == 1
    assert all(torch.equal(a, b) for a, b in zip(before, loop.model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(ema, loop.emas[0].parameters()))
    assert not loop.optimizer.state  # the optimizer never stepped


def test_two_processes_all_reduce_once_per_step_and_equal_one_process_with_microbatches(tmp_path):
    common = [
        "train.steps=3",
        "train.batch_size=16",
        "train.noise=per_sample",
        "train.num_threads=1",
        "model.dropout=0",
        "train.ema_rates=0.9",
    ]
    script = Path(__file__).with_name("ddp_accum.py")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29547",
        str(script),
        str(tmp_path / "ddp"),
        *common,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent)
    assert proc.returncode == 0, proc.stderr[-2500:]
    calls = eval(proc.stdout.split("RESULT ", 1)[1].splitlines()[0].replace('"', ""))  # {1: n, 2: n}
    assert calls[1] == calls[2] > 0  # no_sync: the first microbatch of each step reduces nothing

    single = Loop(tiny_config("digits-ict", tmp_path / "single", "train.accum=2", *common), progress=False)
    single.run()
    ddp = load_file(tmp_path / "ddp" / "accum1" / "checkpoint" / "model.safetensors")
    for k, v in single.model.state_dict().items():
        assert torch.allclose(v, ddp[k], rtol=1e-4, atol=1e-6), k
