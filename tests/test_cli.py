import json
import subprocess
import sys

import numpy as np
import pytest

from cmkit.cli import main
from cmkit.presets import PRESETS

from conftest import TINY


def test_presets_listing(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in PRESETS)
    assert "3.55" in out and "2.83" in out  # published FIDs appear in descriptions


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_dry_runs(preset, capsys):
    assert main(["train", "--preset", preset, "--dry-run"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["train"]["out_dir"] == f"runs/{preset}"


def test_dry_run_applies_overrides(capsys):
    assert main(["train", "--preset", "digits-ict", "lr=3e-4", "model.channel_mult=1,2,2", "--dry-run"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["train"]["lr"] == 3e-4 and cfg["model"]["channel_mult"] == [1, 2, 2]


@pytest.mark.parametrize("args,msg", [
    (["train", "--preset", "nope"], "unknown preset"),
    (["train", "--preset", "digits-ict", "trian.lr=1"], "unknown config key 'trian.lr'"),
    (["train", "--preset", "digits-ict", "train.steps=ten"], "cannot read 'ten' as int"),
    (["sample", "--model", "/nonexistent/model"], "model not found"),
])
def test_bad_input_gives_one_clear_line(args, msg, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_train_then_sample_png_and_npz(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--preset", "digits-ict", *TINY, "train.steps=2", "--out", str(run)]) == 0
    png, npz = tmp_path / "s.png", tmp_path / "s.npz"
    assert main(["sample", "--model", str(run), "-n", "5", "--steps", "2", "-o", str(png), "--npz", str(npz)]) == 0
    arr = np.load(npz)["arr_0"]
    assert png.stat().st_size > 0 and arr.shape == (5, 8, 8, 1) and arr.dtype == np.uint8
    capsys.readouterr()
    assert main(["sample", "--model", str(run), "-n", "2", "-o", str(png)]) == 2  # no silent overwrite
    assert "exists" in capsys.readouterr().err
    assert main(["sample", "--model", str(run), "--sigmas", "0.5,80", "-o", ""]) == 2


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "cmkit", "--help"], capture_output=True, text=True, check=True).stdout
    assert "train" in out and "sample" in out and "presets" in out
