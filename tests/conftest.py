"""Shared fixtures: tiny configs on the bundled 8×8 digits, and a tiny trained EDM teacher."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "2")
torch.set_num_threads(min(2, torch.get_num_threads()))

TINY = ["model.model_channels=16", "model.channel_mult=1,2", "model.num_blocks=1", "train.batch_size=32",
        "train.log_every=5", "train.sample_every=0", "train.ckpt_every=0", "sample.grid_size=4"]


def tiny_config(preset: str, out_dir, *overrides: str):
    from cmkit.presets import get_config

    return get_config(preset, TINY + [f"train.out_dir={out_dir}", *overrides])


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory):
    """A tiny digits EDM teacher trained for 60 steps (shared by CD/ECT tests)."""
    from cmkit.train import train

    out = tmp_path_factory.mktemp("teacher")
    train(tiny_config("digits-edm", out, "train.steps=60"), progress=False)
    return out


@pytest.fixture
def one_thread():
    """Tiny networks gain nothing from 2 threads, and lose a lot when the CPU is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def check_boundary_and_bf16(cfg) -> None:
    """A consistency model built from ``cfg`` with weights far from zero: f(x, σ_min) = x exactly, and a bf16
    autocast forward returns finite fp32."""
    model = cfg.model.build().eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x, cfg.model.sigma_min), x)  # f(x, σ_min) = x exactly
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x, 2.0)
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
