import pytest
import torch

from cmkit.nets.unet import UNet
from cmkit.precond import Precond
from cmkit.sampling import (
    edm_sigmas,
    per_sample_generators,
    sample_euler,
    sample_heun,
    sample_multistep,
    sample_onestep,
    validate_sigmas,
)
from cmkit.toy import GaussianMixture


def model_cm():
    torch.manual_seed(0)
    m = Precond(UNet(8, 1, model_channels=16, channel_mult=(1, 2), num_blocks=1), "cm").eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


class CountingModel(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x, sigma, **cond):
        self.calls += 1
        return self.inner(x, sigma, **cond)


def test_onestep_equals_f_of_sigma_max_z_with_one_evaluation():
    m = CountingModel(model_cm())
    out = sample_onestep(m, (4, 1, 8, 8), generator=torch.Generator().manual_seed(3))
    z = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    assert m.calls == 1
    assert torch.equal(out, m.inner(80 * z, torch.full((4,), 80.0)).clamp(-1, 1))


def test_multistep_number_of_evaluations_and_single_level_equals_onestep():
    m = CountingModel(model_cm())
    sample_multistep(m, (2, 1, 8, 8), [80, 5, 0.5], generator=torch.Generator().manual_seed(0))
    assert m.calls == 3
    a = sample_multistep(m, (2, 1, 8, 8), [80], generator=torch.Generator().manual_seed(1))
    b = sample_onestep(m, (2, 1, 8, 8), generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_seeded_determinism():
    m = model_cm()
    a = sample_multistep(m, (3, 1, 8, 8), [80, 0.8], generator=torch.Generator().manual_seed(7))
    b = sample_multistep(m, (3, 1, 8, 8), [80, 0.8], generator=torch.Generator().manual_seed(7))
    c = sample_multistep(m, (3, 1, 8, 8), [80, 0.8], generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_per_sample_seeds_make_samples_independent_of_batch_size():
    m = model_cm()
    full = sample_multistep(m, (6, 1, 8, 8), [80, 0.8], generator=per_sample_generators(range(6)))
    parts = [
        sample_multistep(m, (k, 1, 8, 8), [80, 0.8], generator=per_sample_generators(range(s, s + k)))
        for s, k in ((0, 2), (2, 1), (3, 3))
    ]
    assert torch.allclose(full, torch.cat(parts), atol=1e-5)


@pytest.mark.parametrize("bad", [[], [0.5, 80], [80, 80], [100, 1], [80, 0.001]])
def test_sigma_list_validation(bad):
    with pytest.raises(ValueError):
        validate_sigmas(bad)


def test_heun_with_exact_denoiser_recovers_mixture():
    gm = GaussianMixture(torch.tensor([[-0.6, -0.6], [0.6, -0.6], [0.0, 0.7]]), torch.tensor([0.5, 0.3, 0.2]), 0.08)
    x = sample_heun(gm, (3000, 2, 1, 1), edm_sigmas(18), generator=torch.Generator().manual_seed(0))
    props = torch.bincount(gm.assign(x), minlength=3).float() / 3000
    assert torch.allclose(props, gm.weights, atol=0.03)
    for k in range(3):
        xk = x[gm.assign(x) == k].flatten(1)
        assert torch.allclose(xk.mean(0), gm.means[k], atol=0.02)
        assert xk.std(0).max() < 0.1  # true std 0.08
    # Euler with the same grid is worse but still lands on the components
    y = sample_euler(gm, (500, 2, 1, 1), edm_sigmas(40), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(torch.bincount(gm.assign(y), minlength=3).float() / 500, gm.weights, atol=0.07)


def test_bf16_generation_stays_close_to_fp32_and_fp32_state():
    """bf16 autocast changes only the network's arithmetic: outputs are fp32 and near the fp32 samples."""
    from cmkit.denoiser_config import Config
    from cmkit.generate import generate

    cfg = Config()
    cfg.model.img_resolution, cfg.model.in_channels = 8, 1
    m = model_cm()
    a, _ = generate(m, cfg, 5, "multistep", [80.0, 0.8], 2, seed=3, batch_size=2, progress=False)
    b, _ = generate(m, cfg, 5, "multistep", [80.0, 0.8], 2, seed=3, batch_size=5, progress=False, bf16=True)
    assert b.dtype == torch.float32
    err = (a - b).abs().max().item()
    assert 0 < err < 0.05  # bf16 really ran (not bit-equal) and stays within a few grey levels


def _ode_reference(denoiser, shape, sigmas, generator, heun):
    """The Heun/Euler samplers as they were before clip_denoised existed (EDM Alg. 1, final clamp only)."""
    from cmkit.solvers import euler_step, heun_step

    s = torch.as_tensor(sigmas, dtype=torch.float32).tolist()
    x = s[0] * torch.randn(shape, generator=generator)
    for t, t2 in zip(s, s[1:]):
        step = heun_step if heun and t2 > 0 else euler_step
        x = step(denoiser, x, torch.full((shape[0],), t), torch.full((shape[0],), t2))
    return x.clamp(-1, 1)


class Overshooting(torch.nn.Module):
    """An EDM-like denoiser whose estimates leave [-1, 1] (a mixture denoiser scaled by 3)."""

    def __init__(self, gm):
        super().__init__()
        self.gm = gm

    def forward(self, x, sigma, **cond):
        return 3 * self.gm(x, sigma)


@pytest.mark.parametrize("fn,heun", [(sample_heun, True), (sample_euler, False)])
def test_heun_euler_default_is_unchanged_and_clip_denoised_clamps_every_estimate(fn, heun):
    gm = GaussianMixture(torch.tensor([[-0.6, -0.6], [0.6, -0.6], [0.0, 0.7]]), torch.tensor([0.5, 0.3, 0.2]), 0.08)
    d = Overshooting(gm)
    shape, sigmas = (64, 2, 1, 1), edm_sigmas(6)
    default = fn(d, shape, sigmas, generator=torch.Generator().manual_seed(0))
    assert torch.equal(default, _ode_reference(d, shape, sigmas, torch.Generator().manual_seed(0), heun))
    assert torch.equal(default, fn(d, shape, sigmas, generator=torch.Generator().manual_seed(0), clip_denoised=False))
    clipped = fn(d, shape, sigmas, generator=torch.Generator().manual_seed(0), clip_denoised=True)
    clamped_d = lambda x, s, **c: d(x, s).clamp(-1, 1)  # noqa: E731
    assert torch.equal(clipped, _ode_reference(clamped_d, shape, sigmas, torch.Generator().manual_seed(0), heun))
    raw = [
        fn(d, shape, sigmas, generator=torch.Generator().manual_seed(0), clip=False, clip_denoised=c) for c in (0, 1)
    ]
    assert raw[0].abs().max() > 1.5 and raw[1].abs().max() <= 1 + 1e-6  # estimates in [-1, 1]: so is the ODE's end
