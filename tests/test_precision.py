"""fp16 training with dynamic loss scaling (train.fp16, the CM paper's setting) beside bf16."""

import json

import pytest
import torch
from conftest import tiny_config

from cmkit.config import apply_overrides
from cmkit.denoiser_config import Config
from cmkit.errors import CmkitError
from cmkit.training.loop import Loop

FP16 = ["train.fp16=true", "train.log_every=1", "model.model_channels=8", "train.batch_size=16"]


def test_fp16_overflows_skip_the_step_and_halve_the_loss_scale(tmp_path, one_thread):
    loop = Loop(tiny_config("digits-ict", tmp_path / "r", *FP16, "train.steps=6"), progress=False)
    loop.run()
    rows = [json.loads(line) for line in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    skipped = [r for r in rows if r["skipped"] is True]
    assert skipped and all(r["reason"].startswith("fp16 overflow at loss scale") for r in skipped)
    scales = [r["loss_scale"] for r in rows]
    for before, after, row in zip(scales, scales[1:], rows):  # halved after each overflow, kept otherwise
        assert after == (before / 2 if row["skipped"] is True else before)
    assert loop.step == 6 and loop.scaler.get_scale() == scales[-1] < 65536
    assert all(torch.isfinite(p).all() for p in loop.model.parameters())


def test_fp16_resumes_bit_for_bit_with_its_loss_scale(tmp_path, one_thread):
    straight = Loop(tiny_config("digits-edm", tmp_path / "a", *FP16, "train.steps=4"), progress=False)
    straight.run()
    first = Loop(tiny_config("digits-edm", tmp_path / "b", *FP16, "train.steps=4"), progress=False)
    while first.step < 2:
        first.train_step()
    first.save_checkpoint()
    first.close()
    resumed = Loop(
        tiny_config("digits-edm", tmp_path / "b", *FP16, "train.steps=4", "train.resume=true"), progress=False
    )
    assert resumed.scaler.get_scale() == first.scaler.get_scale()
    resumed.run()
    assert resumed.scaler.get_scale() == straight.scaler.get_scale()
    for (k, v), w in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(v, w), k


def test_bf16_and_fp16_together_are_refused():
    with pytest.raises(CmkitError, match="exclude each other"):
        apply_overrides(Config(), ["train.bf16=true", "train.fp16=true"]).validate()
