"""The shipped models (Fashion-MNIST, one colour emoji, the PD baseline, the latent stack's autoencoder and LCM):
present, loadable by name, documented, and sampling and editing correctly."""

import json

import pytest
import torch

from cmkit.cli.main import main
from cmkit.formats.zoo import shipped_model_dir, shipped_models
from cmkit.load import load_model
from cmkit.metrics.idx import fmnist_available

SHIPPED = ("fmnist-edm", "fmnist-cd", "fmnist-ict", "fmnist-ect", "emoji-ect", "fmnist-tcm")
BASELINES = ("fmnist-pd",)  # progressive distillation (a diffusion model sampled in 1-4 Euler steps)
LATENT = ("fmnist-ae", "fmnist-lcm", "fmnist-cdec")  # the latent stack: autoencoder, LCM, consistency decoder
TRIGFLOW = ("fmnist-rcm",)  # sCM's parameterisation (rCM: sCD with the score regulariser), the best one-step model


def test_the_models_are_shipped_with_recipes_under_40_mb():
    assert set(SHIPPED + BASELINES + LATENT + TRIGFLOW) <= set(shipped_models())
    total = 0
    for name in SHIPPED + BASELINES + LATENT + TRIGFLOW:
        d = shipped_model_dir(name)
        meta = json.loads((d / "config.json").read_text())
        recipe = meta["recipe"]
        assert recipe["steps"] > 0 and recipe["wall_s"] > 0 and "cmkit train --preset" in recipe["note"]
        total += sum(f.stat().st_size for f in d.iterdir())
    assert total < 40 * 2**20


@pytest.mark.parametrize("name", SHIPPED[1:])
def test_shipped_consistency_models_keep_the_boundary_condition(name):
    model, cfg = load_model(name)
    assert cfg.model.precond == "cm"
    C, R = cfg.model.in_channels, cfg.model.img_resolution
    x = torch.rand(2, C, R, R, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        out = model(x, torch.full((2,), cfg.model.sigma_min))
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)


def test_the_best_one_step_model_is_a_trigflow_consistency_model_that_samples_in_one_evaluation():
    """``BEST_ONESTEP`` (the page opens on it) is shipped; fmnist-rcm's f(x, t) = cos t·x − sin t·σ_d·F is exact at
    t = 0 (σ = 0), and one step from σ_max·z is one call of the network and gives images in [-1, 1]."""
    from cmkit.formats.zoo import BEST_ONESTEP
    from cmkit.sampling import sample_multistep

    assert shipped_model_dir(BEST_ONESTEP) is not None
    model, cfg = load_model("fmnist-rcm")
    assert cfg.model.precond == "trigflow" and cfg.loss.score_reg > 0
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(model(x, torch.zeros(2)), x, atol=1e-6, rtol=0)
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    out = sample_multistep(model, (8, 1, 28, 28), [cfg.model.sigma_max], generator=torch.Generator().manual_seed(0))
    assert len(calls) == 1 and out.abs().max() <= 1 and out.std() > 0.2


def test_the_shipped_lcm_samples_each_class_and_scale_through_the_shipped_autoencoder(tmp_path, monkeypatch):
    """``fmnist-lcm`` names the shipped ``fmnist-ae`` (with the same weights as the autoencoder it was trained on):
    its boundary condition holds at every w, and ``cmkit sample --class 7 --guidance 3 --steps 1|2|4`` writes
    28×28 images decoded by it."""
    import numpy as np

    model, cfg = load_model("fmnist-lcm")
    assert cfg.latent.autoencoder == "fmnist-ae" and cfg.latent.crop == 28 and model.takes_guidance
    x = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for w in (1.0, 4.0):
            out = model(x, torch.full((2,), cfg.model.sigma_min), class_labels=torch.tensor([7, 7]), guidance=w)
            torch.testing.assert_close(out, x, atol=1e-5, rtol=0)
    for steps in (1, 2, 4):
        npz = tmp_path / f"s{steps}.npz"
        argv = ["sample", "--model", "fmnist-lcm", "--class", "7", "--guidance", "3", "--steps", str(steps)]
        assert main([*argv, "-n", "4", "-o", "", "--npz", str(npz)]) == 0
        a = np.load(npz)
        assert a["arr_0"].shape == (4, 28, 28, 1) and a["arr_0"].std() > 10 and (a["arr_1"] == 7).all()
    from cmkit.serve.backend import Backend

    monkeypatch.chdir(tmp_path)  # its recorded teacher, runs/fmnist-ldm, is not here
    page = Backend(runs=tmp_path)
    assert page.teacher_for("fmnist-lcm") is None  # the pixel-space fmnist-edm is not its teacher
    # the page's guidance field is the model's w input: w = 3 is what the CLI wrote, w = 1 other images
    three = page.sample("fmnist-lcm", "multistep", 2, "", 0, 4, "7", 3.0)
    assert np.array_equal(three.native, np.load(tmp_path / "s2.npz")["arr_0"])
    assert not np.array_equal(page.sample("fmnist-lcm", "multistep", 2, "", 0, 4, "7", 1.0).native, three.native)


@pytest.mark.skipif(not fmnist_available(), reason="Fashion-MNIST IDX files not installed (make data)")
def test_the_shipped_consistency_decoder_decodes_the_shipped_autoencoders_latents(tmp_path):
    """``fmnist-cdec`` loads by name and, in one step, decodes ``fmnist-ae``'s latents of held-out test images back
    to those images: PSNR on the 28×28 crops above 20 dB (22.6 dB measured on these 64 images, AMD EPYC; the
    autoencoder's own decoder gives 24.8 dB), and far below it for another image's latents (a shuffled batch:
    8.3 dB). ``cmkit sample --decoder fmnist-cdec`` decodes the shipped LCM with it."""
    import numpy as np

    from cmkit.decoder.decoder import ConsistencyDecoder
    from cmkit.latent import crop_images, load_images
    from cmkit.nets.autoencoder import KLAutoencoder

    ae, dec = KLAutoencoder.from_pretrained("fmnist-ae"), ConsistencyDecoder.from_pretrained("fmnist-cdec")
    x = load_images("fashion_mnist", "", "test", 32).images[:64].float() / 127.5 - 1
    with torch.no_grad():
        z = ae.encode(x)
    images = dec.latent_decoder()(z, 0)

    def psnr(a, b):
        mse = (crop_images(a, 28, 28) - crop_images(b, 28, 28)).mul(127.5).pow(2).flatten(1).mean(1)
        return float((10 * torch.log10(255.0**2 / mse)).mean())

    assert psnr(images, x) > 20 and psnr(images, x.roll(1, 0)) < 15
    npz = tmp_path / "s.npz"
    argv = ["sample", "--model", "fmnist-lcm", "--class", "7", "--decoder", "fmnist-cdec", "-n", "2", "-o", ""]
    assert main([*argv, "--npz", str(npz)]) == 0
    assert np.load(npz)["arr_0"].shape == (2, 28, 28, 1)


def test_sample_cli_takes_a_shipped_name(tmp_path):
    out = tmp_path / "s.png"
    assert (
        main(
            [
                "sample",
                "--model",
                "fmnist-cd",
                "--steps",
                "2",
                "-n",
                "4",
                "-o",
                str(out),
                "--npz",
                str(tmp_path / "s.npz"),
            ]
        )
        == 0
    )
    import numpy as np

    a = np.load(tmp_path / "s.npz")["arr_0"]
    assert a.shape == (4, 28, 28, 1) and a.dtype == np.uint8 and a.std() > 10  # real images, not a constant


def test_edit_cli_takes_a_shipped_name(tmp_path, capsys, one_thread):
    out = tmp_path / "strip.png"
    assert (
        main(
            [
                "edit",
                "interpolate",
                "--model",
                "fmnist-cd",
                "--seeds",
                "0,1",
                "--frames",
                "3",
                "--grid",
                str(out),
                "--threads",
                "1",
            ]
        )
        == 0
    )
    assert out.is_file() and f"wrote {out}" in capsys.readouterr().out


def test_the_colour_model_colorizes_keeping_the_luminance():
    """Colorization with the shipped emoji model: the input's luminance is kept exactly (Algorithm 4 with
    the luminance-axis Q) and the model puts colour into the chroma channels, which are zero in the input."""
    from cmkit.editing.tasks import colorize, to_gray3

    model, cfg = load_model("emoji-ect")
    assert cfg.model.in_channels == 3
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    disc = ((xx**2 + yy**2) < 0.6).float()  # a bright disc on black, like an emoji
    gray = to_gray3((disc * 1.6 - 0.8).expand(2, 3, 32, 32) + 0.05 * torch.randn(2, 3, 32, 32, generator=g))
    out = colorize(model, gray, generator=g)
    torch.testing.assert_close(to_gray3(out), gray, atol=1e-4, rtol=0)
    chroma = out - to_gray3(out)
    assert chroma.abs().mean() > 0.02  # not left grey


def test_a_local_path_always_wins_over_a_shipped_name(tmp_path, monkeypatch, capsys):
    """``--model fmnist-cd`` beside a run ./fmnist-cd means that run; one stderr line says so when both exist."""
    import shutil

    from cmkit.errors import CmkitError
    from cmkit.formats.model_dir import resolve_model_dir
    from cmkit.formats.zoo import models_root

    shipped = shipped_model_dir("fmnist-cd")
    monkeypatch.chdir(tmp_path)
    assert resolve_model_dir("fmnist-cd") == shipped and capsys.readouterr().err == ""  # nothing local
    with pytest.raises(CmkitError, match="model not found"):
        resolve_model_dir("./fmnist-cd")  # a path, never a shipped name
    local = tmp_path / "fmnist-cd"
    local.mkdir()  # an existing directory without a model
    with pytest.raises(
        CmkitError, match=f"a local path takes precedence over the shipped model 'fmnist-cd', which is at {shipped}"
    ) as e:
        resolve_model_dir("fmnist-cd")
    assert "\n" not in str(e.value)
    (local / "config.json").write_text("{}")  # a training run that has not written its model yet
    (local / "log.jsonl").write_text("")
    with pytest.raises(CmkitError, match="training run without a model yet.*precedence"):
        resolve_model_dir("fmnist-cd")
    assert main(["sample", "--model", "fmnist-cd", "-n", "1", "-o", str(tmp_path / "x.png")]) == 2
    assert "training run without a model yet" in capsys.readouterr().err
    shutil.copytree(shipped, local / "model")  # the run's exported model
    assert resolve_model_dir("fmnist-cd").resolve() == local / "model"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "using the local fmnist-cd/model" in err and str(shipped) in err
    load_model("fmnist-cd")  # what every --model goes through
    assert "using the local" in capsys.readouterr().err
    assert resolve_model_dir(str(local)) == local / "model" and capsys.readouterr().err == ""  # a path: no note
    monkeypatch.chdir(models_root())  # inside the shipped models' folder: one and the same directory
    assert resolve_model_dir("fmnist-cd") == shipped and capsys.readouterr().err == ""
    assert shipped_model_dir("../models/fmnist-cd") is None and shipped_model_dir("..") is None
