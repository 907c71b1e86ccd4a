import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import TINY

from cmkit.cli.main import main
from cmkit.training.presets import PRESETS


def test_presets_listing(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in PRESETS)
    assert "3.55" in out and "2.83" in out  # published FIDs appear in descriptions


@pytest.fixture(scope="module")
def autoencoders(tmp_path_factory):
    """Untrained autoencoders shaped like the autoencoder presets: a decoder preset's dry run reads their config."""
    from cmkit.nets.autoencoder import AutoencoderConfig, KLAutoencoder
    from cmkit.training.presets import get_config

    root = tmp_path_factory.mktemp("ae")
    for name in [n for n, p in PRESETS.items() if p.kind == "autoencoder"]:
        m = get_config(name).model
        KLAutoencoder(
            AutoencoderConfig(m.in_channels, m.channels, m.num_res_blocks, m.latent_channels, m.norm_groups)
        ).save_pretrained(root / name)
    return root


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_dry_runs_and_builds_model_loss_optimizer(preset, capsys, autoencoders, request):
    extra = [f"model.autoencoder={autoencoders / preset.replace('-cdec', '-ae')}"] if preset.endswith("-cdec") else []
    if PRESETS[preset].values.get("model.arch") == "diffusers":  # the user's pipeline: a tiny one here
        extra = [f"train.teacher={request.getfixturevalue('sd_pipeline_dir')}"]
    from cmkit.training.presets import get_config, missing_inputs

    missing = missing_inputs(get_config(preset, extra))  # a teacher run, data or LPIPS file not made here
    assert main(["train", "--preset", preset, "--dry-run", *extra]) == (2 if missing else 0)
    captured = capsys.readouterr()
    cfg = json.loads(captured.out)  # the config is printed and the network built either way
    assert cfg["train"]["out_dir"] == f"runs/{preset}"
    assert "parameters, loss" in captured.err and "optimizer" in captured.err
    if missing:  # one line naming each missing file and the command that makes it
        line = captured.err.strip().splitlines()[-1]
        assert line.startswith("cmkit: error:") and "input file(s) missing" in line
        assert all(m.split(":")[0].split("=")[-1] in line for m in missing), (missing, line)


@pytest.mark.parametrize(
    "override,msg",
    [
        ("loss.method=foo", "config key loss.method: 'foo' is not one of edm, cd, ct, ict, ect"),
        ("loss.method=ictt", "did you mean ict?"),
        ("model.arch=vit", "config key model.arch: 'vit' is not one of unet, mlp"),
        ("loss.mu=0.5", "loss.mu is not an option of method 'ict'"),
        ("loss.solver=heun", "loss.solver is not an option of method 'ict'"),
        ("loss.weighting=karras", "loss.weighting is not an option of method 'ict'"),
        ("loss.method=ct loss.weighting=inv_dt", "loss.weighting='inv_dt' is not a weighting of method 'ct'"),
        ("model.precond=edm", "loss.method=ict needs model.precond=cm"),
        ("data.name=digits model.num_classes=3", None),  # digits has 10 classes: allowed
        ("data.name=digits model.num_classes=11", "model.num_classes=11 but data set 'digits' has 10 classes"),
        ("data.name=emoji model.num_classes=2", "model.num_classes=2 but data set 'emoji' has no labels"),
        ("train.teacher=runs/x", "train.teacher is only used by loss.method=cd"),
        ("train.ema_rates=1.5", "train.ema_rates must lie in [0, 1)"),
        ("sample.sigmas=0.8,80", "sample.sigmas must decrease"),
        ("model.attn_resolutions=3", "model.attn_resolutions [3] are never reached"),
    ],
)
def test_config_errors_are_one_line_before_any_data_is_loaded(override, msg, capsys):
    # data.root points nowhere: a config error must be reported before the data is looked at
    args = ["train", "--preset", "digits-ict", "data.name=npz", "data.root=/nonexistent.npz", *override.split()]
    code = main(args + ["--dry-run"])
    err = capsys.readouterr().err.strip()
    if msg is None:
        assert code == 0
        return
    assert code == 2 and msg in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert main(args + ["train.out_dir=/nonexistent/run"]) == 2  # the same line when training, not a data error
    assert msg in capsys.readouterr().err


def test_method_options_reach_the_loss():
    from cmkit.training.presets import get_config

    cfg = get_config("digits-cd", ["model.sigma_data=0.3", "loss.weighting=karras", "loss.num_scales=7"])
    loss = cfg.loss.build(cfg.model, cfg.train.steps)
    assert loss.sigma_data == 0.3 and len(loss.sigmas) == 7 and loss.weighting == "karras"
    ect = get_config("digits-ect", ["model.sigma_data=0.3", "loss.weighting=snrpk"])
    t = __import__("torch").tensor([0.5, 2.0])
    from cmkit.losses.base import weighting

    assert ect.loss.build(ect.model, 10).sigma_data == 0.3
    assert __import__("torch").allclose(weighting("karras", t, 0.3), 1 / t**2 + 1 / 0.3**2)


def test_dry_run_applies_overrides(capsys):
    assert main(["train", "--preset", "digits-ict", "lr=3e-4", "model.channel_mult=1,2,2", "--dry-run"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["train"]["lr"] == 3e-4 and cfg["model"]["channel_mult"] == [1, 2, 2]
    assert main(["train", "--preset", "digits-ict", "lr=3e-4", "--dry-run", "train.steps=7"]) == 0  # after flags
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["train"]["lr"] == 3e-4 and cfg["train"]["steps"] == 7
    assert main(["train", "--preset", "digits-ict", "--dry-run", "--bogus"]) == 2


@pytest.mark.parametrize(
    "args,msg",
    [
        (["train", "--preset", "nope"], "unknown preset"),
        (["train", "--preset", "digits-ict", "trian.lr=1"], "unknown config key 'trian.lr'"),
        (["train", "--preset", "digits-ict", "train.steps=ten"], "cannot read 'ten' as int"),
        (["sample", "--model", "/nonexistent/model"], "model not found"),
    ],
)
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
    assert main(["sample", "--model", str(run), "--sigmas", "0.5,80", "-o", str(tmp_path / "x.png")]) == 2
    assert "decreasing" in capsys.readouterr().err


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "cmkit", "--help"], capture_output=True, text=True, check=True).stdout
    assert "train" in out and "sample" in out and "presets" in out
