"""Nothing is lost at any kill point of a checkpoint commit or a log rewrite, and no command destroys what it
did not create: each crash is simulated by raising at a named step of the commit (``cmkit.files.KILL_POINT``)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file

from cmkit import files
from cmkit.errors import CmkitError
from cmkit.formats.model_dir import save_model_dir
from cmkit.formats.run_dir import RunDir
from cmkit.training.loop import Loop, train

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
@pytest.mark.parametrize(
    "point,nth", [("staged", 3), ("old-moved", 1), ("new-moved", 3), ("old-moved", 2)]
)  # the model/ export of step 4
def test_a_crash_at_any_step_of_a_checkpoint_commit_resumes_bit_for_bit(
    point, nth, straight, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "run"
    monkeypatch.setattr(files, "KILL_POINT", crash_at(point, nth))
    with pytest.raises(Crash):
        train(tiny_config("digits-ct", out, *COMMON), progress=False)
    monkeypatch.setattr(files, "KILL_POINT", None)
    summary = train(tiny_config("digits-ct", out, *COMMON, "train.resume=true"), progress=False)
    assert summary["steps_run"] == 2  # resumed from step 4, the newest complete checkpoint, never from 0
    if point != "new-moved":
        assert "recovered" in capsys.readouterr().err
    assert not any(p.name.endswith((files.TMP, files.OLD)) for p in out.iterdir())
    assert_same(final_state(out), straight)


def test_a_crash_while_a_resume_rewrites_the_log_loses_no_row(straight, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(files, "KILL_POINT", crash_at("new-moved", nth=3))
    with pytest.raises(Crash):
        train(tiny_config("digits-ct", out, *COMMON), progress=False)
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 0.1')  # and a half-written row from the crash
    monkeypatch.setattr(files, "KILL_POINT", crash_at("log-staged"))
    with pytest.raises(Crash):
        Loop(tiny_config("digits-ct", out, *COMMON, "train.resume=true"), progress=False)
    assert len(RunDir(out).read_log()) >= 4  # the log is intact after the crash
    monkeypatch.setattr(files, "KILL_POINT", None)
    train(tiny_config("digits-ct", out, *COMMON, "train.resume=true"), progress=False)
    assert_same(final_state(out), straight)


def test_resume_without_a_checkpoint_warns_and_starts_at_zero(tmp_path, capsys):
    summary = train(tiny_config("digits-ct", tmp_path / "run", "train.steps=2", "train.resume=true"), progress=False)
    assert summary["steps_run"] == 2 and "no checkpoint to resume" in capsys.readouterr().err


def test_training_refuses_a_directory_that_is_not_a_run(tmp_path):
    model = tmp_path / "exported"
    train(tiny_config("digits-ct", tmp_path / "run", "train.steps=1"), progress=False)
    save_model_dir(
        model,
        load_file(tmp_path / "run" / "model" / "model.safetensors"),
        "denoiser",
        json.loads((tmp_path / "run" / "model" / "config.json").read_text())["config"],
    )
    before = (model / "config.json").read_text()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    for target in (model, tmp_path / "other"):
        with pytest.raises(CmkitError, match="not a cmkit run"):
            Loop(tiny_config("digits-ct", target, "train.steps=1"), progress=False)
    assert (model / "config.json").read_text() == before and (tmp_path / "other" / "notes.txt").is_file()


def test_export_never_deletes_what_it_did_not_write(tmp_path, capsys):
    from cmkit.cli.main import main

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

    from cmkit.load import load_model

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
    from cmkit.training.presets import get_config

    with pytest.raises(CmkitError, match="has no held-out split"):
        get_config("digits-ict", ["data.split=test"])
    assert get_config("fmnist-ict", ["data.split=test"]).data.split == "test"


# --- interrupts, the run lock, and damaged runs --------------------------------------------------------

TINY_CLI = [
    "model.model_channels=16",
    "model.channel_mult=1,2",
    "model.num_blocks=1",
    "train.batch_size=32",
    "train.sample_every=0",
    "train.ckpt_every=0",
    "sample.grid_size=4",
    "train.num_threads=1",
]


def _start_training(out, *extra):
    """``cmkit train`` in a child process; returns it once its first log row is written (it is mid-run)."""
    import subprocess
    import sys
    import time

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cmkit",
            "train",
            "--preset",
            "digits-ct",
            "--no-progress",
            "--out",
            str(out),
            *TINY_CLI,
            "train.log_every=1",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not (out / "log.jsonl").is_file() or not (out / "log.jsonl").read_text().strip():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    return proc


@pytest.mark.parametrize("sig, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signal_mid_run_writes_a_checkpoint_and_says_how_to_resume(sig, code, tmp_path):
    import signal

    out = tmp_path / "run"
    proc = _start_training(out, "train.steps=100000")
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] >= 1 and RunDir(out).read_log()[-1]["step"] <= state["step"]
    assert f"resume with: cmkit train --resume {out}" in err and not (out / RunDir.LOCK).exists()
    # the printed command resumes exactly where it stopped
    from cmkit.cli.main import main

    assert main(["train", "--resume", str(out), "--no-progress", f"train.steps={state['step'] + 2}"]) == 0
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == state["step"] + 2


def test_a_second_process_is_refused_while_a_run_trains_and_a_stale_lock_is_taken_over(tmp_path, capsys):
    import signal
    import time

    from cmkit.cli.main import main

    out = tmp_path / "run"
    proc = _start_training(out, "train.steps=100000", "train.ckpt_every=1")
    try:
        while not (out / "checkpoint" / "state.json").is_file():
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        assert main(["train", "--resume", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"being trained by another process (pid {proc.pid} " in err and len(err.strip().splitlines()) == 1
    finally:
        proc.send_signal(signal.SIGKILL)  # killed: no clean-up, the lock file stays behind
        proc.wait()
    assert (out / RunDir.LOCK).is_file()
    cfg = tiny_config("digits-ct", out, "train.resume=true", "train.steps=1000000")
    loop = Loop(cfg, progress=False)  # the kernel dropped the dead process's flock: taken over
    assert f"took over the lock of pid {proc.pid} " in capsys.readouterr().err
    loop.dir.unlock()


def _run_with_a_model(tmp_path):
    out = tmp_path / "run"
    train(tiny_config("digits-ct", out, "train.steps=2", "train.log_every=1"), progress=False)
    return out


def _snapshot(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda out: (out / "checkpoint" / "state.json").unlink(), "state.json is missing"),
        (lambda out: __import__("shutil").rmtree(out / "checkpoint"), "holds a trained model"),
        (
            lambda out: [__import__("shutil").rmtree(out / d) for d in ("checkpoint", "model")],
            "stopped before its first checkpoint",
        ),
    ],
)
@pytest.mark.parametrize("resume", [False, True])
def test_a_damaged_run_is_refused_with_its_files_intact(damage, message, resume, tmp_path):
    out = _run_with_a_model(tmp_path)
    damage(out)
    before = _snapshot(out)
    overrides = ["train.steps=2", "train.log_every=1"] + (["train.resume=true"] if resume else [])
    with pytest.raises(CmkitError, match=message):
        train(tiny_config("digits-ct", out, *overrides), progress=False)
    assert _snapshot(out) == before


def test_a_run_that_never_logged_a_step_starts_again_silently(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    cfg = tiny_config("digits-ct", out, "train.steps=1")
    (out / "config.json").write_text(cfg.to_json())  # a run that failed before its first step
    assert train(cfg, progress=False)["steps_run"] == 1 and capsys.readouterr().err == ""


def test_damaged_run_files_are_one_line_not_internal_errors(tmp_path, capsys):
    """Each damage is a user's error (exit 2, one line naming the file), never an internal error (exit 1)."""
    import shutil

    from safetensors.torch import load_file as load
    from safetensors.torch import save_file

    from cmkit.cli.main import main

    base = _run_with_a_model(tmp_path)

    def damaged(name, change):
        d = tmp_path / name
        shutil.copytree(base, d)
        change(d)
        return d

    def state_with(key, value):
        def change(d):
            s = json.loads((d / "checkpoint" / "state.json").read_text())
            s[key] = value
            (d / "checkpoint" / "state.json").write_text(json.dumps(s))

        return change

    def wrong_moment(d):
        o = load(d / "checkpoint" / "optimizer.safetensors")
        o[sorted(o)[0]] = torch.zeros(3)
        save_file(o, d / "checkpoint" / "optimizer.safetensors")

    def log_dir(d):
        (d / "log.jsonl").unlink()
        (d / "log.jsonl").mkdir()

    def ckpt_file(d):
        shutil.rmtree(d / "checkpoint")
        (d / "checkpoint").write_text("x")

    cases = [
        ("step-str", state_with("step", "3"), "step is '3', expected an integer"),
        ("step-neg", state_with("step", -3), "step is -3"),
        ("opt", wrong_moment, "exp_avg has shape (3,)"),
        ("log", log_dir, "log.jsonl is not a file"),
        ("ckpt", ckpt_file, "checkpoint is a file"),
    ]
    for name, change, message in cases:
        d = damaged(name, change)
        capsys.readouterr()
        assert main(["train", "--resume", str(d), "--no-progress", "train.steps=4"]) == 2, name
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (name, err)
    sigma = damaged("sigma", lambda d: None)
    meta = json.loads((sigma / "model" / "config.json").read_text())
    meta["config"]["model"]["sigma_min"] = 100.0
    (sigma / "model" / "config.json").write_text(json.dumps(meta))
    assert main(["sample", "--model", str(sigma), "-n", "1", "-o", str(tmp_path / "x.png")]) == 2
    assert "expected 0 < sigma_min < sigma_max" in capsys.readouterr().err


def test_resolve_sampler_refuses_a_one_level_ode_grid():
    from cmkit.generate import resolve_sampler
    from cmkit.training.presets import get_config

    with pytest.raises(CmkitError, match="needs at least 2 σ levels"):
        resolve_sampler(get_config("digits-edm"), "heun", 1, None)
    assert len(resolve_sampler(get_config("digits-edm"), "heun", 2, None)) == 3
