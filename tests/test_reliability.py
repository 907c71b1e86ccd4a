"""Nothing is lost at any kill point of a checkpoint commit or a log rewrite, and no command destroys what it
did not create: each crash is simulated by raising at a named step of the commit (``checkpoint.KILL_POINT``)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from cmkit import checkpoint
from cmkit.checkpoint import RunDir, save_model_dir
from cmkit.errors import CmkitError
from cmkit.loop import Loop, train

from conftest import tiny_config

COMMON = ["train.steps=6", "train.ckpt_every=2", "train.log_every=1", "train.ema_rates=0.9", "model.dropout=0.1"]
TIMING = ("wall_s", "img_per_s")


class Crash(Exception):
    pass


def crash_at(point: str, nth: int = 1):
    """A KILL_POINT hook that raises at the ``nth`` time ``point`` is reached."""
    seen = {"n": 0}

    def hook(name: str) -> None:
        if name == point:
            seen["n"] += 1
            if seen["n"] == nth:
                raise Crash(point)
    return hook


def final_state(out):
    ckpt = out / "checkpoint"
    files = sorted(p.name for p in ckpt.glob("*.safetensors") if p.name != "rng.safetensors")
    log = [{k: v for k, v in row.items() if k not in TIMING} for row in RunDir(out).read_log()]
    return {f: load_file(ckpt / f) for f in files}, log


def assert_same(a, b):
    (wa, la), (wb, lb) = a, b
    assert wa.keys() == wb.keys()
    for f in wa:
        assert all(torch.equal(wa[f][k], wb[f][k]) for k in wa[f]), f
    assert la == lb


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    train(tiny_config("digits-ct", out, *COMMON), progress=False)
    return final_state(out)


# the step-4 checkpoint commit: commits run checkpoint, model/ at step 2, then checkpoint at step 4 (the first
# commit that has an old copy to move aside)
@pytest.mark.parametrize("point,nth", [("staged", 3), ("old-moved", 1), ("new-moved", 3),
                                       ("old-moved", 2)])  # the model/ export of step 4
def test_a_crash_at_any_step_of_a_checkpoint_commit_resumes_bit_for_bit(point, nth, straight, tmp_path, monkeypatch,
                                                                          capsys):
    out = tmp_path / "run"
    monkeypatch.setattr(checkpoint, "KILL_POINT", crash_at(point, nth))
    with pytest.raises(Crash):
        train(tiny_config("digits-ct", out, *COMMON), progress=False)
    monkeypatch.setattr(checkpoint, "KILL_POINT", None)
    summary = train(tiny_config("digits-ct", out, *COMMON, "train.resume=true"), progress=False)
    assert summary["steps_run"] == 2  # resumed from step 4, the newest complete checkpoint, never from 0
    if point != "new-moved":
        assert "recovered" in capsys.readouterr().err
    assert not any(p.name.endswith((checkpoint.TMP, checkpoint.OLD)) for p in out.iterdir())
    assert_same(final_state(out), straight)


def test_a_crash_while_a_resume_rewrites_the_log_loses_no_row(straight, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(checkpoint, "KILL_POINT", crash_at("new-moved", nth=3))
    with pytest.raises(Crash):
        train(tiny_config("digits-ct", out, *COMMON), progress=False)
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 0.1')  # and a half-written row from the crash
    monkeypatch.setattr(checkpoint, "KILL_POINT", crash_at("log-staged"))
    with pytest.raises(Crash):
        Loop(tiny_config("digits-ct", out, *COMMON, "train.resume=true"), progress=False)
    assert len(RunDir(out).read_log()) >= 4  # the log is intact after the crash
    monkeypatch.setattr(checkpoint, "KILL_POINT", None)
    train(tiny_config("digits-ct", out, *COMMON, "train.resume=true"), progress=False)
    assert_same(final_state(out), straight)


def test_resume_without_a_checkpoint_warns_and_starts_at_zero(tmp_path, capsys):
    summary = train(tiny_config("digits-ct", tmp_path / "run", "train.steps=2", "train.resume=true"), progress=False)
    assert summary["steps_run"] == 2 and "no checkpoint to resume" in capsys.readouterr().err


def test_training_refuses_a_directory_that_is_not_a_run(tmp_path):
    model = tmp_path / "exported"
    train(tiny_config("digits-ct", tmp_path / "run", "train.steps=1"), progress=False)
    save_model_dir(model, load_file(tmp_path / "run" / "model" / "model.safetensors"), "denoiser",
                   json.loads((tmp_path / "run" / "model" / "config.json").read_text())["config"])
    before = (model / "config.json").read_text()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    for target in (model, tmp_path / "other"):
        with pytest.raises(CmkitError, match="not a cmkit run"):
            Loop(tiny_config("digits-ct", target, "train.steps=1"), progress=False)
    assert (model / "config.json").read_text() == before and (tmp_path / "other" / "notes.txt").is_file()


def test_export_never_deletes_what_it_did_not_write(tmp_path, capsys):
    from cmkit.cli import main

    run = tmp_path / "run"
    train(tiny_config("digits-ct", run, "train.steps=1"), progress=False)
    user = tmp_path / "dir"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    sibling = tmp_path / "dir.tmp"
    sibling.mkdir()
    assert main(["export", str(run), "-o", str(user), "--overwrite"]) == 2
    assert "holds other files (notes.txt)" in capsys.readouterr().err
    assert main(["export", str(run), "-o", str(run), "--overwrite"]) == 2  # the run's own directory
    assert RunDir(run).has_checkpoint() and (user / "notes.txt").is_file() and sibling.is_dir()
    assert main(["export", str(run), "-o", str(tmp_path / "m")]) == 0
    assert main(["export", str(run), "-o", str(tmp_path / "m"), "--overwrite", "--fp16"]) == 0  # a model dir: ok
    assert sibling.is_dir()


def test_divergence_stops_after_max_skipped_and_logs_each_skip(tmp_path):
    loop = Loop(tiny_config("digits-ct", tmp_path / "run", "train.steps=50", "train.max_skipped=3"), progress=False)
    real = loop.task.loss
    loop.task.loss = lambda *a, **k: (real(*a, **k)[0] * float("nan"), {}) if loop.step >= 2 else real(*a, **k)
    with pytest.raises(CmkitError, match="3 consecutive steps with non-finite loss after step 2"):
        loop.run()
    skips = [r for r in RunDir(tmp_path / "run").read_log() if r.get("skipped") is True]
    assert [r["step"] for r in skips] == [3, 3, 3] and all(r["reason"] == "non-finite loss" for r in skips)


def test_a_damaged_checkpoint_is_one_line(tmp_path):
    out = tmp_path / "run"
    train(tiny_config("digits-ct", out, "train.steps=2"), progress=False)
    (out / "checkpoint" / "state.json").write_text("[1, 2")
    with pytest.raises(CmkitError, match="cannot read checkpoint state"):
        Loop(tiny_config("digits-ct", out, "train.steps=4", "train.resume=true"), progress=False)
    (out / "checkpoint" / "state.json").write_text("[]")
    with pytest.raises(CmkitError, match="damaged"):
        Loop(tiny_config("digits-ct", out, "train.steps=4", "train.resume=true"), progress=False)


def test_weights_that_would_sample_silently_wrong_are_refused(tmp_path):
    from safetensors.torch import save_file

    from cmkit.checkpoint import load_model

    out = tmp_path / "run"
    train(tiny_config("digits-ct", out, "train.steps=1"), progress=False)
    weights = out / "model" / "model.safetensors"
    sd = load_file(weights)
    key = next(k for k, v in sd.items() if v.is_floating_point())
    for bad, msg in ((sd[key] * float("nan"), "non-finite"), (sd[key].to(torch.int32), "dtype torch.int32")):
        save_file({**sd, key: bad}, weights)
        with pytest.raises(CmkitError, match=msg):
            load_model(out)


def test_a_test_split_is_refused_for_data_sets_without_one():
    from cmkit.presets import get_config

    with pytest.raises(CmkitError, match="has no held-out split"):
        get_config("digits-ict", ["data.split=test"])
    assert get_config("fmnist-ict", ["data.split=test"]).data.split == "test"
