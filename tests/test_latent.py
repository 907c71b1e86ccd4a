"""Denoisers in an autoencoder's latent space (``cmkit.latent``): the standardisation, decoding, training through the
loop with its statistics recorded and resumed, sampling through the autoencoder or a consistency decoder, and the
one-line errors. A 12-step digits autoencoder (8×8 → 2×4×4) and tiny denoisers; seconds on a CPU.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image

from cmkit.cli.main import main
from cmkit.datasets import load_dataset
from cmkit.decoder.decoder import ConsistencyDecoder
from cmkit.errors import CmkitError
from cmkit.generate import sample_images
from cmkit.latent import LatentSpace, crop_images, latent_statistics, pad_images
from cmkit.load import load_denoiser
from cmkit.nets.autoencoder import KLAutoencoder
from cmkit.serve.backend import Backend
from cmkit.training.loop import train

QUIET = ["log_every=2", "ckpt_every=0", "sample_every=0", "num_threads=1"]
LATENT = ["model.in_channels=2", "model.img_resolution=4", "latent.image_size=8", "train.steps=4"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 12-step digits autoencoder, a 12-step consistency decoder for it, and a 4-step class-conditional latent
    EDM teacher on its latents."""
    root = tmp_path_factory.mktemp("latent")
    for cmd, preset, name, extra in (
        ("train-autoencoder", "digits-ae", "ae", []),
        ("train-decoder", "digits-cdec", "cdec", [f"autoencoder={root / 'ae'}"]),
    ):
        args = [cmd, "--preset", preset, "--no-progress", "steps=12", *QUIET, *extra, f"out_dir={root / name}"]
        assert main(args) == 0
    cfg = tiny_config("digits-edm-cond", root / "ldm", *LATENT, f"latent.autoencoder={root / 'ae'}")
    train(cfg, progress=False)
    return root


def digits(n: int = 64) -> torch.Tensor:
    return load_dataset("digits").images[:n].float() / 127.5 - 1


def test_standardised_latents_have_mean_0_and_std_sigma_data_and_decode_through_the_autoencoder(runs):
    """z = σ_data·(μ(x) − mean)/std has per-channel mean 0 and std σ_data on the images the statistics come from;
    to_raw inverts it; decode = crop(clamp(D(raw)))."""
    ae = KLAutoencoder.from_pretrained(runs / "ae")
    x = digits(300)
    mean, std = latent_statistics(ae, x, batch_size=70)
    _, cfg = load_denoiser(runs / "ldm")
    cfg.latent.mean, cfg.latent.std = mean, std
    space = LatentSpace.load(cfg)
    z = space.encode(x)
    per_channel = z.transpose(0, 1).flatten(1)
    assert per_channel.mean(1).abs().max() < 1e-5
    assert torch.allclose(per_channel.std(1, unbiased=False), torch.full((2,), cfg.model.sigma_data), atol=1e-5)
    assert torch.allclose(space.to_raw(z), ae.encode(x), atol=1e-5)
    assert torch.equal(space.decode(z), ae.decode(space.to_raw(z)).clamp(-1, 1))
    space.crop = 6
    assert torch.equal(space.decode(z), crop_images(ae.decode(space.to_raw(z)).clamp(-1, 1), 6, 6))


def test_pad_then_crop_is_the_identity_and_pads_with_black():
    u8 = torch.randint(1, 256, (3, 1, 28, 28), dtype=torch.uint8)
    padded = pad_images(u8, 32)
    assert padded.shape == (3, 1, 32, 32) and padded[:, :, :2].eq(0).all() and padded[:, :, :, -2:].eq(0).all()
    assert torch.equal(crop_images(padded, 28, 28), u8)


def test_a_latent_run_records_its_statistics_and_samples_images(runs):
    """The run measures the latent mean/std on its data and writes them into the model's config; sampling decodes
    (4×4 latents → 8×8 digits); the training loss's batches are the standardised latents."""
    saved = json.loads((runs / "ldm" / "model" / "config.json").read_text())["config"]["latent"]
    ae = KLAutoencoder.from_pretrained(runs / "ae")
    pick = torch.randperm(1797, generator=torch.Generator().manual_seed(0))[:1797]
    mean, std = latent_statistics(ae, digits(1797)[pick])
    assert np.allclose(saved["mean"], mean, atol=1e-6) and np.allclose(saved["std"], std, atol=1e-6)
    assert saved["crop"] == 0  # digits are 8×8 already: nothing to crop
    model, cfg = load_denoiser(runs / "ldm")
    s = sample_images(model, cfg, 3, sampler="heun", steps=3, classes="1", progress=False)
    assert s.images.shape == (3, 1, 8, 8) and s.images.min() >= -1 and s.images.max() <= 1


def test_a_latent_run_resumes_with_the_statistics_it_measured(runs, tmp_path):
    """The statistics are measured once: a resume takes them from the run's config instead of measuring again
    (which could differ in the last bits on another thread count) and is not refused as a change of settings."""
    out = tmp_path / "ldm"
    base = [*LATENT, f"latent.autoencoder={runs / 'ae'}", "train.ckpt_every=2"]
    train(tiny_config("digits-edm-cond", out, *base, "train.steps=2"), progress=False)
    first = json.loads((out / "config.json").read_text())["latent"]
    assert len(first["mean"]) == 2
    train(tiny_config("digits-edm-cond", out, *base, "train.steps=4", "train.resume=true"), progress=False)
    assert json.loads((out / "config.json").read_text())["latent"] == first
    assert json.loads((out / "log.jsonl").read_text().splitlines()[-1])["step"] == 4


def test_a_consistency_decoder_decodes_each_sample_from_its_own_seed(runs):
    """``--decoder``: image i's decoder noise comes from seed + i, so it does not depend on the batch it is in; the
    result differs from the autoencoder's decoding."""
    model, cfg = load_denoiser(runs / "ldm")
    dec = ConsistencyDecoder.from_pretrained(runs / "cdec", channels_last=False).latent_decoder((1.0, 0.5))
    kw = dict(sampler="heun", steps=3, classes="2", progress=False)
    whole = sample_images(model, cfg, 3, decoder=dec, batch_size=3, **kw).images
    split = sample_images(model, cfg, 3, decoder=dec, batch_size=2, **kw).images
    assert torch.allclose(whole, split, atol=1e-6)
    assert not torch.allclose(whole, sample_images(model, cfg, 3, batch_size=3, **kw).images, atol=1e-3)


def test_cli_samples_a_latent_model_through_either_decoder(runs, tmp_path):
    out = tmp_path / "s.npz"
    common = ["sample", "--model", str(runs / "ldm"), "-n", "2", "--steps", "3", "-o", str(tmp_path / "g.png")]
    assert main([*common, "--npz", str(out)]) == 0
    assert np.load(out)["arr_0"].shape == (2, 8, 8, 1)
    assert (
        main(
            [
                *common,
                "--npz",
                str(tmp_path / "c.npz"),
                "--decoder",
                str(runs / "cdec"),
                "--decoder-steps",
                "2",
                "--overwrite",
            ]
        )
        == 0
    )
    assert np.load(tmp_path / "c.npz")["arr_0"].shape == (2, 8, 8, 1)


def test_latent_shape_and_decoder_errors_are_one_line(runs, tmp_path, capsys):
    ae = f"latent.autoencoder={runs / 'ae'}"
    with pytest.raises(CmkitError, match=r"needs model.in_channels=2 model.img_resolution=4 \(got 1, 8\)"):
        train(tiny_config("digits-edm-cond", tmp_path / "a", "latent.image_size=8", ae), progress=False)
    with pytest.raises(CmkitError, match="latent.autoencoder: .*model not found"):
        train(tiny_config("digits-edm-cond", tmp_path / "b", *LATENT, "latent.autoencoder=nowhere"), progress=False)
    with pytest.raises(CmkitError, match="latent.mean and latent.std"):
        tiny_config("digits-edm-cond", tmp_path / "c", *LATENT, ae, "latent.mean=0.1").validate()
    model, cfg = load_denoiser(runs / "ldm")
    pixel = tiny_config("digits-edm-cond", tmp_path / "d")
    dec = ConsistencyDecoder.from_pretrained(runs / "cdec").latent_decoder((1.0,))
    with pytest.raises(CmkitError, match="this model works on pixels"):
        sample_images(pixel.model.build(), pixel, 1, decoder=dec, progress=False)
    code = main(
        ["sample", "--model", str(runs / "ldm"), "-n", "1", "--decoder", str(tmp_path), "-o", str(tmp_path / "x.png")]
    )
    assert code != 0 and capsys.readouterr().err.strip().count("\n") == 0


def test_editing_a_latent_model_is_one_line(runs, tmp_path, capsys):
    """The editing tasks' masks and transforms act on pixels: a latent consistency model is refused (CLI, page)."""
    cm = tmp_path / "lcm"
    shutil.copytree(runs / "ldm" / "model", cm)
    meta = json.loads((cm / "config.json").read_text())
    meta["config"]["model"]["precond"], meta["config"]["loss"] = "cm", {"method": "ct"}
    (cm / "config.json").write_text(json.dumps(meta))
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "in.png")
    args = ["edit", "denoise", "--model", str(cm), "--input", str(tmp_path / "in.png"), "--sigma", "0.5"]
    assert main([*args, "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "this is a latent model" in err and err.count("\n") == 0
    with pytest.raises(CmkitError, match="this is a latent model"):
        Backend(runs=tmp_path).editable(str(cm))


def test_the_page_samples_a_latent_model_as_images(runs):
    """The Sample tab shows a latent model's decoded images and describes them, not its latents."""
    b = Backend(runs=runs)
    info = b.model_info(str(runs / "ldm"))
    assert (info["resolution"], info["channels"]) == (8, 1)
    r = b.sample(str(runs / "ldm"), sampler="heun", steps=3, n=2, classes="3")
    assert r.native.shape == (2, 8, 8, 1)


def test_export_names_another_autoencoder_only_if_it_holds_the_same_weights(runs, tmp_path, capsys):
    """A latent model is shipped naming a shipped autoencoder (``cmkit export --autoencoder``) instead of the path it
    was trained with: the same samples through a copy of the same weights; an autoencoder with other weights (an fp16
    copy) would break the model's measured latent statistics and is refused in one line, writing nothing."""
    copy = tmp_path / "ae-copy"
    assert main(["export", str(runs / "ae"), "-o", str(copy)]) == 0
    out = tmp_path / "ldm"
    assert main(["export", str(runs / "ldm"), "-o", str(out), "--autoencoder", str(copy)]) == 0
    model, cfg = load_denoiser(out)
    assert cfg.latent.autoencoder == str(copy)
    a = sample_images(model, cfg, 2, steps=3, progress=False).images
    b = sample_images(*load_denoiser(runs / "ldm"), 2, steps=3, progress=False).images
    assert torch.equal(a, b)
    fp16 = tmp_path / "ae-fp16"
    assert main(["export", str(runs / "ae"), "-o", str(fp16), "--fp16"]) == 0
    capsys.readouterr()
    code = main(["export", str(runs / "ldm"), "-o", str(tmp_path / "x"), "--autoencoder", str(fp16)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "holds other weights" in err and "\n" not in err and not (tmp_path / "x").exists()
    code = main(["export", str(runs / "ae"), "-o", str(tmp_path / "y"), "--autoencoder", str(copy)])
    assert code == 2 and "is not a latent model" in capsys.readouterr().err


def test_latent_samples_are_decoded_unclamped(runs):
    """Latents are not images: the sampler's clamp to [−1, 1] (right for pixels) is off for a latent model, whose
    standardised latents reach past ±2σ_data. The images are the decoder's output of the unclamped Heun sample."""
    from cmkit.sampling import edm_sigmas, per_sample_generators, sample_heun

    model, cfg = load_denoiser(runs / "ldm")
    n, c = 6, cfg.model
    labels = torch.full((n,), 3)
    sigmas = edm_sigmas(3, c.sigma_min, c.sigma_max)
    z = sample_heun(
        model, (n, 2, 4, 4), sigmas, generator=per_sample_generators(range(n)), clip=False, class_labels=labels
    )
    assert z.abs().max() > 1  # so a clamp would change the images
    want = LatentSpace.load(cfg).decode(z)
    got = sample_images(model, cfg, n, sampler="heun", steps=3, classes="3", progress=False).images
    torch.testing.assert_close(got, want)


def test_a_student_adopts_its_latent_teachers_space_or_is_refused(runs, tmp_path):
    """LCM from the latent teacher: the student takes the teacher's recorded standardisation (not a re-measurement:
    here on another number of images, which would differ); a pixel-space student of a latent teacher, and a latent
    student on another autoencoder, are one error line each."""
    teacher = json.loads((runs / "ldm" / "model" / "config.json").read_text())["config"]["latent"]
    ae = f"latent.autoencoder={runs / 'ae'}"
    teach = (f"train.teacher={runs / 'ldm'}", "train.steps=2", *QUIET[:3])
    distil = (*teach, f"train.init_from={runs / 'ldm'}")
    student = tmp_path / "lcm"
    train(tiny_config("digits-lcm", student, *LATENT[:3], ae, "latent.stats_images=7", *distil), progress=False)
    got = json.loads((student / "model" / "config.json").read_text())["config"]["latent"]
    assert (got["mean"], got["std"], got["crop"]) == (teacher["mean"], teacher["std"], teacher["crop"])
    with pytest.raises(CmkitError, match="is a latent model and this run is not"):
        train(tiny_config("digits-lcm", tmp_path / "p", *teach, "train.init_from="), progress=False)
    other = tmp_path / "ae2"
    assert (
        main(["train-autoencoder", "--preset", "digits-ae", "--no-progress", "steps=1", *QUIET, f"out_dir={other}"])
        == 0
    )
    with pytest.raises(CmkitError, match="holds other weights than"):
        train(
            tiny_config("digits-lcm", tmp_path / "q", *LATENT[:3], f"latent.autoencoder={other}", *distil),
            progress=False,
        )
