"""Training a consistency decoder for a cmkit autoencoder: objective, targets, round trips, CLI, errors.

Tiny networks on the bundled 8×8 digits; every test runs in a few seconds on a CPU.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from cmkit.cli.main import main
from cmkit.decoder.config import DecoderConfig
from cmkit.decoder.consistency import DecoderConsistencyLoss, consistency_function, gap_at, grid_timesteps, noisy
from cmkit.decoder.decoder import ConsistencyDecoder
from cmkit.decoder.latents import normalize_latents, resolve_scaled, upsample_latents
from cmkit.decoder.sampler import x0_estimate
from cmkit.errors import CmkitError
from cmkit.latent import crop_images, latent_statistics, pad_images
from cmkit.nets.autoencoder import AutoencoderConfig, KLAutoencoder, kl_divergence
from cmkit.training.decoder import DecoderTask, init_decoder_unet
from cmkit.training.loop import train
from cmkit.training.presets import get_config
from cmkit.training.task import Context

TINY_DEC = DecoderConfig(
    block_out_channels=(8, 16),
    layers_per_block=1,
    in_channels=3,
    out_channels=1,
    norm_num_groups=4,
    latent_channels=2,
    upscale=2,
    scaling_factor=1.0,
    latent_mean=(0.1, -0.2),
    latent_std=(0.5, 2.0),
)
TINY_AE = AutoencoderConfig(in_channels=1, channels=(8, 16), latent_channels=2, norm_groups=4)
QUIET = ["log_every=2", "ckpt_every=0", "sample_every=0", "num_threads=1"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: tiny networks gain nothing from two, and a busy machine makes two much slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def digits_batch(n: int = 16) -> torch.Tensor:
    from cmkit.datasets import load_dataset

    return load_dataset("digits").images[:n].float() / 127.5 - 1


def batch_and_latents(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return digits_batch(), torch.randn(16, 2, 4, 4, generator=g)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 12-step digits autoencoder and a 12-step consistency decoder on its latents, trained through the CLI."""
    root = tmp_path_factory.mktemp("dectrain")
    assert (
        main(
            [
                "train-autoencoder",
                "--preset",
                "digits-ae",
                "--no-progress",
                "steps=12",
                *QUIET,
                f"out_dir={root / 'ae'}",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "train-decoder",
                "--preset",
                "digits-cdec",
                "--no-progress",
                "steps=12",
                *QUIET,
                f"autoencoder={root / 'ae'}",
                f"out_dir={root / 'cdec'}",
            ]
        )
        == 0
    )
    return root


# --- the objective ---------------------------------------------------------------------------------


def test_grid_is_the_released_64_step_grid_and_the_gap_shrinks_by_stage():
    loss = DecoderConsistencyLoss(TINY_DEC, total_steps=100)
    assert grid_timesteps(loss.schedule).tolist() == list(range(0, 1024, 16))
    assert [gap_at(k, 100, (64, 16, 4, 1)) for k in (0, 24, 25, 50, 75, 99, 500)] == [64, 64, 16, 4, 1, 1, 1]
    n = loss.sample_indices(10_000, torch.Generator().manual_seed(0))
    assert n.min() == 1 and n.max() == 63  # the upper point is never the boundary t_0 = 0
    lognormal = DecoderConsistencyLoss(TINY_DEC, 100, index_sampling="lognormal")
    assert abs(float(lognormal.probs.sum()) - 1) < 1e-5 and len(lognormal.probs) == 63


def test_consistency_function_is_the_decoders_x0_estimate():
    """Training evaluates f_θ exactly as ConsistencyDecoder.decode does (per-sample t; the clamp left out)."""
    unet = init_decoder_unet(TINY_DEC).eval()
    loss = DecoderConsistencyLoss(TINY_DEC, 10)
    x0, z = batch_and_latents()
    x_t = noisy(x0, torch.randn_like(x0), torch.full((16,), 512), loss.schedule)
    t = torch.tensor([512] * 8 + [1008] * 8)
    with torch.no_grad():
        f = consistency_function(unet, x_t, upsample_latents(z, TINY_DEC), t, loss.schedule, 1)
        for half, tt in ((slice(0, 8), 512), (slice(8, 16), 1008)):
            ref = x0_estimate(
                unet, x_t[half], z[half], tt, loss.schedule.at(tt), TINY_DEC, torch.float32, False, clamp=False
            )
            torch.testing.assert_close(f[half], ref, rtol=1e-5, atol=1e-6)


def test_denoising_stage_targets_the_data_with_edm_weighting():
    """Gap ≥ 63: L = (1/c_out(t_n)²)·mean((f_θ(x_{t_n}) − x0)²), computed by hand with the same draws."""
    unet = init_decoder_unet(TINY_DEC)
    loss = DecoderConsistencyLoss(TINY_DEC, 10, gaps=(64,))
    x0, z = batch_and_latents()
    got = loss(unet, x0, z, step=0, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    n = loss.sample_indices(16, g)
    eps = torch.randn(x0.shape, generator=g)
    t = loss.grid[n]
    f = consistency_function(unet, noisy(x0, eps, t, loss.schedule), upsample_latents(z, TINY_DEC), t, loss.schedule, 1)
    want = (f - x0).square().flatten(1).mean(1) / loss.schedule.c_out[t].square()
    torch.testing.assert_close(got, want)


def test_target_network_gets_no_gradient_and_stopgrad_equals_a_frozen_copy():
    x0, z = batch_and_latents()
    unet = init_decoder_unet(TINY_DEC)
    target = copy.deepcopy(unet)
    loss = DecoderConsistencyLoss(TINY_DEC, 10, gaps=(1,))
    a = loss(unet, x0, z, step=0, target=target, generator=torch.Generator().manual_seed(1)).mean()
    a.backward()
    assert all(p.grad is None for p in target.parameters())
    grads_with_copy = [p.grad.clone() for p in unet.parameters()]
    assert sum(g.abs().sum() for g in grads_with_copy) > 0
    unet.zero_grad(set_to_none=True)
    b = loss(unet, x0, z, step=0, generator=torch.Generator().manual_seed(1)).mean()  # θ⁻ = sg(θ)
    b.backward()
    assert torch.equal(a.detach(), b.detach())
    for g1, p in zip(grads_with_copy, unet.parameters()):
        torch.testing.assert_close(p.grad, g1)  # the target pass contributes no gradient


@pytest.mark.parametrize("gaps, ratio", [((64,), 0.6), ((1,), 0.9)])
def test_decoder_loss_goes_down_on_a_fixed_batch(gaps, ratio, seed, bound):
    """30 Adam steps on one batch lower the consistency loss. Measured with ``scripts/bound_spread.py`` (seeds
    0–4 × 1 and 2 threads): loss ratio 0.40–0.44 at gap 64 (bound 0.6: margin 1.37×) and 0.69–0.78 at gap 1
    (bound 0.9: margin 1.16×; with 0.8 it was 1.03×, and 60 steps did not lower it: 0.67–0.77)."""
    torch.manual_seed(seed)
    x0, z = batch_and_latents(seed)
    unet = init_decoder_unet(TINY_DEC)
    loss = DecoderConsistencyLoss(TINY_DEC, 10, gaps=gaps)
    opt = torch.optim.Adam(unet.parameters(), lr=3e-3)

    def value() -> float:
        with torch.no_grad():
            return float(loss(unet, x0, z, step=0, generator=torch.Generator().manual_seed(7)).mean())

    before = value()
    for k in range(30):
        opt.zero_grad()
        loss(unet, x0, z, step=0, generator=torch.Generator().manual_seed(1000 * seed + k)).mean().backward()
        opt.step()
    bound("loss after 30 steps / before", value() / before, ratio)


def test_autoencoder_loss_goes_down_and_kl_is_the_closed_form(seed, bound):
    """Measured with ``scripts/bound_spread.py`` (seeds 0–4 × 1 and 2 threads): the reconstruction loss falls to
    0.30–0.38 of its first value in 40 steps (bound 0.6: margin 1.59×); the KL term is checked in closed form."""
    torch.manual_seed(seed)
    ae = KLAutoencoder(TINY_AE)
    x = digits_batch(32)
    opt = torch.optim.Adam(ae.parameters(), lr=3e-3)
    first = None
    for k in range(40):
        loss, terms = ae.loss(x, kl_weight=1e-3, generator=torch.Generator().manual_seed(1000 * seed + k))
        first = first or terms["rec"]
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
    bound("reconstruction loss at step 40 / step 1", terms["rec"] / first, 0.6)
    mean, logvar = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    # ½(1 + 1 − 1 − 0) + ½(0 + e² − 1 − 2)
    torch.testing.assert_close(kl_divergence(mean, logvar), torch.tensor([0.5 + 0.5 * (torch.e**2 - 3)]))


# --- save / load round trips -------------------------------------------------------------------------


def test_autoencoder_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    ae = KLAutoencoder(TINY_AE).eval()
    ae.save_pretrained(tmp_path / "ae")
    back = KLAutoencoder.from_pretrained(tmp_path / "ae")
    assert back.config == ae.config
    x = digits_batch(4)
    with torch.no_grad():
        assert torch.equal(back.encode(x), ae.encode(x))
        assert torch.equal(back.decode(ae.encode(x)), ae.decode(ae.encode(x)))
    assert json.loads((tmp_path / "ae" / "config.json").read_text())["kind"] == "autoencoder"


def test_trained_decoder_loads_into_consistency_decoder_and_decodes(runs):
    ae = KLAutoencoder.from_pretrained(runs / "ae")
    dec = ConsistencyDecoder.from_pretrained(runs / "cdec" / "model", channels_last=False)
    c = dec.config
    assert (c.latent_channels, c.upscale, c.scaling_factor, c.image_channels) == (2, 2, 1.0, 1)
    x = digits_batch(5)
    z = ae.encode(x)
    for schedule in ((1.0,), (1.0, 0.5)):
        images = dec.decode(z, schedule, torch.Generator().manual_seed(0))
        assert images.shape == (5, 1, 8, 8) and images.abs().max() <= 1
    # the saved decoder is the run's EMA network, bit for bit
    task = DecoderTask(
        get_config("digits-cdec", [f"autoencoder={runs / 'ae'}", "steps=12"]), Context(torch.device("cpu"))
    )
    from cmkit.files import load_safetensors

    load_safetensors(task.model, runs / "cdec" / "checkpoint" / "ema_0.999.safetensors")
    assert task.config == c  # same latent statistics recomputed from the same autoencoder and data
    same = ConsistencyDecoder(c, task.model).decode(z, (1.0, 0.5), torch.Generator().manual_seed(0))
    assert torch.equal(same, dec.decode(z, (1.0, 0.5), torch.Generator().manual_seed(0)))
    # latent normalisation uses the autoencoder's own statistics
    mean, std = latent_statistics(ae, (task.batches.data.images.float() / 127.5 - 1)[:500])
    assert len(mean) == 2 and all(s > 0 for s in std)
    z_norm = normalize_latents(z, c)
    torch.testing.assert_close(
        z_norm, (z - torch.tensor(c.latent_mean)[:, None, None]) / torch.tensor(c.latent_std)[:, None, None]
    )
    log = [json.loads(line) for line in (runs / "cdec" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 6, 8, 10, 12] and {"loss", "gap", "grad_norm"} <= set(log[0])
    assert list((runs / "cdec" / "samples").glob("*.png"))


def test_latent_statistics_are_per_channel_mean_and_std():
    torch.manual_seed(0)
    ae = KLAutoencoder(TINY_AE).eval()
    x = digits_batch(40)
    mean, std = latent_statistics(ae, x, batch_size=7)
    z = ae.encode(x).transpose(0, 1).flatten(1).double()
    torch.testing.assert_close(torch.tensor(mean, dtype=torch.float64), z.mean(1))
    torch.testing.assert_close(torch.tensor(std, dtype=torch.float64), z.std(1, unbiased=False))


def test_resume_is_exact(tmp_path):
    from safetensors.torch import load_file

    ae = ["steps=6", *QUIET]
    train(get_config("digits-ae", ae + [f"out_dir={tmp_path / 'ae'}"]), progress=False)
    # the autoencoder: 3 steps, then a resumed run to 6, ends bit for bit where the straight run does
    half = [*QUIET, f"out_dir={tmp_path / 'ae_resumed'}"]
    train(get_config("digits-ae", half + ["steps=3"]), progress=False)
    train(get_config("digits-ae", half + ["steps=6", "resume=true"]), progress=False)
    for name in ("model", "ema_0.999"):
        a = load_file(tmp_path / "ae" / "checkpoint" / f"{name}.safetensors")
        b = load_file(tmp_path / "ae_resumed" / "checkpoint" / f"{name}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), name
    # one curriculum stage: the stage lengths scale with `steps`, which differs between the two legs
    dec = [f"autoencoder={tmp_path / 'ae'}", *QUIET, "gaps=2"]
    train(get_config("digits-cdec", dec + ["steps=6", f"out_dir={tmp_path / 'straight'}"]), progress=False)
    train(get_config("digits-cdec", dec + ["steps=3", f"out_dir={tmp_path / 'resumed'}"]), progress=False)
    with pytest.raises(CmkitError, match="already holds a training run"):
        train(get_config("digits-cdec", dec + ["steps=6", f"out_dir={tmp_path / 'resumed'}"]), progress=False)
    with pytest.raises(CmkitError, match=r"differ from the run's: train\.lr"):
        train(
            get_config("digits-cdec", dec + ["steps=6", "lr=1e-3", "resume=true", f"out_dir={tmp_path / 'resumed'}"]),
            progress=False,
        )
    # the curriculum's stage length depends on steps: resume with the same total
    train(
        get_config("digits-cdec", dec + ["steps=6", "resume=true", f"out_dir={tmp_path / 'resumed'}"]), progress=False
    )
    for name in ("model", "ema_0.999"):
        a = load_file(tmp_path / "straight" / "checkpoint" / f"{name}.safetensors")
        b = load_file(tmp_path / "resumed" / "checkpoint" / f"{name}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), name


# --- data and user errors ------------------------------------------------------------------------------


def test_pad_and_crop_images():
    u8 = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    padded = pad_images(u8, 32)
    assert padded.shape == (3, 1, 32, 32) and padded[:, :, :2].eq(0).all()
    assert torch.equal(crop_images(padded, 28, 28), u8)
    with pytest.raises(CmkitError, match="unevenly"):
        pad_images(u8, 31)
    with pytest.raises(CmkitError, match="larger"):
        pad_images(u8, 16)


def test_bad_input_gives_one_line_cmkit_errors(tmp_path, runs, capsys):
    with pytest.raises(CmkitError, match="did you mean steps"):
        get_config("digits-cdec", ["stepz=3"])
    with pytest.raises(CmkitError, match="unknown preset"):
        get_config("cifar-ae")
    with pytest.raises(CmkitError, match="cannot read"):
        get_config("digits-cdec", ["steps=many"])
    with pytest.raises(CmkitError, match="non-increasing"):
        DecoderConsistencyLoss(TINY_DEC, 10, gaps=(1, 4))
    with pytest.raises(CmkitError, match="distance"):
        DecoderConsistencyLoss(TINY_DEC, 10, distance="lpips")
    with pytest.raises(CmkitError, match="model not found"):
        KLAutoencoder.from_pretrained(tmp_path)
    with pytest.raises(CmkitError, match="multiple"):
        train(get_config("digits-ae", ["channels=8,8,8,8,8", f"out_dir={tmp_path / 'x'}"]))
    with pytest.raises(CmkitError, match=r"\(batch, 1, H, W\)"):
        KLAutoencoder(TINY_AE).encode(torch.zeros(2, 3, 8, 8))
    dec = ConsistencyDecoder.from_pretrained(runs / "cdec" / "model")
    with pytest.raises(CmkitError, match="takes 2-channel latents"):
        dec.decode(torch.zeros(1, 4, 4, 4))
    assert (
        main(
            [
                "train-decoder",
                "--preset",
                "digits-cdec",
                f"autoencoder={tmp_path / 'none'}",
                f"out_dir={tmp_path / 'y'}",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("cmkit: error:") and "\n" not in err
    assert main(["train-decoder", "--preset", "digits-cdec", "--dry-run", "steps=7", f"autoencoder={runs / 'ae'}"]) == 0
    assert json.loads(capsys.readouterr().out)["train"]["steps"] == 7


def test_unit_scaling_factor_latents_are_never_refused_as_prescaled():
    z = torch.randn(2, 2, 16, 16)  # std ≈ 1 looks "scaled" for SD, but scale 1 means raw == scaled
    assert resolve_scaled(z, "auto", 1.0) is False
    with pytest.raises(CmkitError, match="already multiplied"):
        resolve_scaled(z, "auto", 0.18215)


def test_cli_decodes_latents_of_a_grey_decoder_to_png_files(runs, tmp_path):
    """`cmkit decode` with a trained one-channel decoder writes one grey PNG per latent (no --grid needed)."""
    import numpy as np
    from PIL import Image

    z = KLAutoencoder.from_pretrained(runs / "ae").encode(digits_batch(2)).detach()
    np.save(tmp_path / "z.npy", z.numpy())
    out = tmp_path / "img.png"
    assert (
        main(
            [
                "decode",
                str(tmp_path / "z.npy"),
                "--weights",
                str(runs / "cdec" / "model"),
                "-o",
                str(out),
                "--steps",
                "1",
            ]
        )
        == 0
    )
    for i in range(2):
        img = np.asarray(Image.open(tmp_path / f"img_{i}.png"))
        assert img.shape == (8, 8) and img.dtype == np.uint8


def test_cli_encode_then_decode_round_trip(runs, tmp_path, capsys):
    """`cmkit encode` writes the autoencoder's posterior means (what `cmkit decode` reads) for an image or an .npz,
    in each latent format; a wrong-size image and a decoder with other latent channels are one line each."""
    import numpy as np

    from cmkit.imageio import save_npz

    x = digits_batch(3)
    save_npz(x, tmp_path / "x.npz")
    ae = KLAutoencoder.from_pretrained(runs / "ae")
    with torch.no_grad():
        expected = ae.encode(torch.from_numpy(np.load(tmp_path / "x.npz")["arr_0"]).permute(0, 3, 1, 2) / 127.5 - 1)
    for suffix in (".npy", ".pt", ".safetensors"):
        z_file = tmp_path / f"z{suffix}"
        assert main(["encode", str(tmp_path / "x.npz"), "--autoencoder", str(runs / "ae"), "-o", str(z_file)]) == 0
        from cmkit.decoder.files import read_latents

        torch.testing.assert_close(read_latents(z_file), expected)
    assert (
        main(
            [
                "decode",
                str(tmp_path / "z.npy"),
                "--weights",
                str(runs / "cdec" / "model"),
                "-o",
                str(tmp_path / "back.png"),
                "--steps",
                "1",
            ]
        )
        == 0
    )
    assert [(tmp_path / f"back_{i}.png").is_file() for i in range(3)] == [True] * 3
    capsys.readouterr()
    from PIL import Image

    Image.fromarray(np.full((6, 6), 255, np.uint8)).save(tmp_path / "small.png")
    assert (
        main(
            [
                "encode",
                str(tmp_path / "small.png"),
                "--autoencoder",
                str(runs / "ae"),
                "--pad-to",
                "8",
                "-o",
                str(tmp_path / "small.npy"),
            ]
        )
        == 0
    )
    padded = torch.full((1, 1, 8, 8), -1.0)
    padded[..., 1:7, 1:7] = 1.0
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "small.npy")), ae.encode(padded))
    Image.fromarray(np.zeros((7, 7), np.uint8)).save(tmp_path / "odd.png")
    assert (
        main(["encode", str(tmp_path / "odd.png"), "--autoencoder", str(runs / "ae"), "-o", str(tmp_path / "odd.npy")])
        == 2
    )
    err = capsys.readouterr().err
    assert "multiples of the downsampling factor" in err and len(err.strip().splitlines()) == 1
    np.save(tmp_path / "four.npy", np.zeros((1, 4, 4, 4), np.float32))  # SD-shaped latents, a 2-channel decoder
    assert (
        main(
            [
                "decode",
                str(tmp_path / "four.npy"),
                "--weights",
                str(runs / "cdec" / "model"),
                "-o",
                str(tmp_path / "four.png"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "takes 2-channel latents" in err and "SD-1.x/2.x VAE latents have 4" in err


def test_cli_encode_with_a_diffusers_vae(tmp_path):
    """A diffusers AutoencoderKL directory (Stable Diffusion's vae/, here tiny and random) encodes to its own
    posterior mean, unscaled."""
    import numpy as np
    from diffusers import AutoencoderKL
    from PIL import Image

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
    ).eval()
    vae.save_pretrained(tmp_path / "pipe" / "vae")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    assert (
        main(
            ["encode", str(tmp_path / "in.png"), "--autoencoder", str(tmp_path / "pipe"), "-o", str(tmp_path / "z.npy")]
        )
        == 0
    )
    x = torch.from_numpy(np.asarray(Image.open(tmp_path / "in.png"))).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        expected = vae.encode(x).latent_dist.mean
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "z.npy")), expected, rtol=1e-5, atol=1e-5)
