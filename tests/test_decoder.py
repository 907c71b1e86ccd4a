"""Consistency Decoder: network size, schedule constants, OpenAI decoding semantics, dtypes and input checks."""

from __future__ import annotations

import math

import pytest
import torch

from cmkit.decoder.config import DecoderConfig
from cmkit.decoder.decoder import ConsistencyDecoder
from cmkit.decoder.latents import looks_scaled, normalize_latents
from cmkit.decoder.schedule import DecoderSchedule, steps_to_schedule
from cmkit.decoder.testing import random_decoder, raw_latents
from cmkit.decoder.unet import DecoderUNet
from cmkit.errors import CmkitError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_full_size_parameter_count_matches_release():
    """621,277,702 parameters, and the per-module counts of reference §1.6, built on the meta device."""
    with torch.device("meta"):
        net = DecoderUNet(DecoderConfig())
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(net) == 621_277_702
    assert [count(net.conv_in), count(net.time_proj), count(net.time_embedding)] == [20_480, 327_680, 2_050_560]
    assert [count(b) for b in net.down_blocks] == [10_659_840, 34_426_880, 83_132_672, 64_512_000]
    assert count(net.mid_block) == 43_008_000
    assert [count(b) for b in net.up_blocks] == [153_669_632, 149_736_704, 63_521_408, 16_193_920]
    assert [count(net.conv_norm_out), count(net.conv_out)] == [640, 17_286]
    assert net.time_proj.weight.shape == (1024, 320) and net.conv_in.in_channels == 7 and net.conv_out.out_channels == 6
    assert not any("attn" in name or "attention" in name for name, _ in net.named_modules())


def test_schedule_constants_match_reference_table():
    """§1.3 numeric table at t = 1008 and 512, ᾱ_1023, max β and the 63 distilled timesteps."""
    s = DecoderSchedule.cosine()
    table = {
        1008: (0.0228269, 0.999739, 43.7966, 1.00020, 0.499967, 0.00570895),
        512: (0.701657, 0.712515, 1.01548, 1.25912, 0.448572, 0.278100),
    }
    for t, values in table.items():
        c = s.at(t)
        got = (c["sqrt_alpha_bar"], c["sqrt_one_minus_alpha_bar"], c["sigma"], c["c_in"], c["c_out"], c["c_skip"])
        assert got == pytest.approx(values, rel=2e-5)
    assert float(s.sqrt_alpha_bar[1023] ** 2) == pytest.approx(2.3162e-9, rel=1e-3)
    assert sorted(set(s.rounded_timesteps().tolist())) == list(range(16, 1009, 16))
    assert s.timesteps([1.0, 0.75, 0.5, 0.25, 0.0]) == [1008, 768, 512, 256, 16]
    assert steps_to_schedule(1) == (1.0,) and steps_to_schedule(2) == (1.0, 0.5)
    # c_skip·√ᾱ → 1 and c_out → 0 only as σ → 0: no boundary condition at t = 16 (§1.3)
    assert 0.9 < s.at(16)["c_skip"] * s.at(16)["sqrt_alpha_bar"] < 1.0


def test_schedule_rejects_bad_fractions():
    with pytest.raises(CmkitError, match=r"\[0, 1\]"):
        DecoderSchedule.cosine().timesteps([1.5])
    with pytest.raises(CmkitError, match="empty"):
        DecoderSchedule.cosine().timesteps([])


def openai_reference_decode(dec: ConsistencyDecoder, latents: torch.Tensor, schedule, generator) -> torch.Tensor:
    """A literal transcription of openai/consistencydecoder ``__call__`` (§1.4) around cmkit's network."""
    betas = []
    ab = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for i in range(1024):
        betas.append(min(1 - ab((i + 1) / 1024) / ab(i / 1024), 0.999))
    alphas_cumprod = torch.cumprod(1.0 - torch.tensor(betas), dim=0)
    sqrt_ab, sqrt_1mab = torch.sqrt(alphas_cumprod), torch.sqrt(1.0 - alphas_cumprod)
    sigmas = torch.sqrt(1.0 / alphas_cumprod - 1)
    recip = torch.sqrt(1.0 / alphas_cumprod)
    c_skip = recip * 0.25 / (sigmas**2 + 0.25)
    c_out = sigmas * 0.5 / (sigmas**2 + 0.25) ** 0.5
    c_in = recip / (sigmas**2 + 0.25) ** 0.5
    space = torch.div(1024, 64, rounding_mode="floor")
    ts = (torch.div(torch.arange(1024), space, rounding_mode="floor") + 1) * space
    ts[ts == 1024] -= space
    means = [0.38862467, 0.02253063, 0.07381133, -0.0171294]
    stds = [0.9654121, 1.0440036, 0.76147926, 0.77022034]
    z = latents * 0.18215
    features = torch.stack([(z[:, i] - means[i]) / stds[i] for i in range(4)], dim=1)
    x_start = torch.zeros(features.shape[0], 3, 8 * features.shape[2], 8 * features.shape[3])
    for i in [int((1024 - 1) * s) for s in schedule]:
        t = ts[i].item()
        noise = torch.randn(x_start.shape, dtype=x_start.dtype, generator=generator)
        x_start = sqrt_ab[t] * x_start + sqrt_1mab[t] * noise
        inp = torch.cat([c_in[t] * x_start, torch.nn.functional.interpolate(features, scale_factor=8.0)], dim=1)
        with torch.no_grad():
            out = dec.unet(inp, torch.tensor([t] * features.shape[0]))
        model_output, _ = torch.split(out, 3, dim=1)
        x_start = (c_out[t] * model_output + c_skip[t] * x_start).clamp(-1, 1)
    return x_start


@pytest.mark.parametrize("schedule", [(1.0,), (1.0, 0.5), (1.0, 0.75, 0.5, 0.25)])
def test_decode_equals_openai_reference_loop(schedule):
    dec = random_decoder(seed=3)
    z = raw_latents(2, 4, 6, seed=1)
    ref = openai_reference_decode(dec, z, schedule, torch.Generator().manual_seed(7))
    out = dec.decode(z, schedule, torch.Generator().manual_seed(7))
    assert out.shape == (2, 3, 32, 48) and out.dtype == torch.float32
    assert (out - ref).abs().max().item() <= 1e-6
    assert out.min() >= -1 and out.max() <= 1


def test_clamp_matters_and_generator_is_deterministic():
    dec = random_decoder(seed=3)
    z = raw_latents(1, 4, 4, seed=2)
    a = dec.decode(z, generator=torch.Generator().manual_seed(0), clamp=False)
    b = dec.decode(z, generator=torch.Generator().manual_seed(0), clamp=False)
    c = dec.decode(z, generator=torch.Generator().manual_seed(1), clamp=False)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.abs().max() > 1  # random weights leave [-1, 1] without the clamp (reference §3.2)


def test_one_step_decode_is_the_x0_estimate_of_pure_noise():
    dec = random_decoder(seed=4)
    z = raw_latents(1, 4, 4, seed=3)
    eps = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    out = dec.decode(z, (1.0,), noise=[eps], clamp=False)
    c = dec.schedule.at(1008)
    x_t = c["sqrt_one_minus_alpha_bar"] * eps
    cond = torch.nn.functional.interpolate(normalize_latents(z, dec.config), scale_factor=8)
    with torch.no_grad():
        F = dec.unet(torch.cat([c["c_in"] * x_t, cond], 1), 1008)[:, :3]
    torch.testing.assert_close(out, c["c_out"] * F + c["c_skip"] * x_t, rtol=0, atol=1e-6)


def test_batched_decode_equals_per_sample_decodes():
    dec = random_decoder(seed=5)
    z = raw_latents(3, 4, 5, seed=4)
    noise = [torch.randn(3, 3, 32, 40, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    batched = dec.decode(z, noise=noise)
    for i in range(3):
        single = dec.decode(z[i : i + 1], noise=[n[i : i + 1] for n in noise])
        torch.testing.assert_close(batched[i : i + 1], single, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 0.1), (torch.float16, 0.02)])
def test_low_precision_and_channels_last(dtype, atol):
    z = raw_latents(1, 4, 4, seed=6)
    ref = random_decoder(seed=6).decode(z, generator=torch.Generator().manual_seed(0))
    cl = random_decoder(seed=6, channels_last=True)
    assert cl.channels_last
    out_cl = cl.decode(z, generator=torch.Generator().manual_seed(0))
    assert (out_cl - ref).abs().max().item() < 1e-4
    low = random_decoder(seed=6, dtype=dtype, channels_last=True)
    assert low.dtype == dtype
    out = low.decode(z.to(dtype), generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - ref).abs().mean().item() < atol


def test_latent_shape_errors_are_one_clear_line():
    dec = random_decoder()
    with pytest.raises(CmkitError, match=r"4-D .* got 3-D \(4, 8, 8\).*latents\[None\]"):
        dec.decode(torch.zeros(4, 8, 8))
    with pytest.raises(CmkitError, match=r"takes 4-channel latents .* \(1, 3, 8, 8\).*image"):
        dec.decode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(CmkitError, match="floating point"):
        dec.decode(torch.zeros(1, 4, 8, 8, dtype=torch.int64))
    with pytest.raises(CmkitError, match="NaN"):
        dec.decode(torch.full((1, 4, 2, 2), float("nan")))
    for err in (CmkitError("x"),):
        assert "\n" not in str(err)


def test_scaled_latents_are_detected():
    raw = raw_latents(1, 16, 16, seed=0)
    assert not looks_scaled(raw)
    assert looks_scaled(raw * 0.18215)
    assert not looks_scaled(torch.zeros(1, 4, 16, 16))  # undecidable: left alone
    dec = random_decoder()
    a = dec.decode(raw[:, :, :4, :4], generator=torch.Generator().manual_seed(0))
    b = dec.decode(raw[:, :, :4, :4] * 0.18215, generator=torch.Generator().manual_seed(0), scaled=True)
    assert (a - b).abs().max().item() < 1e-5


def test_training_path_matches_inference_path_and_has_gradients():
    """With gradients on, the blocks avoid in-place ops; the output is the same and backpropagates."""
    dec = random_decoder(seed=8)
    dec.unet.requires_grad_(True)
    x = torch.randn(2, 7, 32, 24, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([1008, 512])
    with torch.inference_mode():
        fast = dec.unet(x, t)
    with torch.enable_grad():
        out = dec.unet(x, t)
        out.square().mean().backward()
    assert torch.equal(out.detach(), fast)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in dec.unet.parameters())
