"""Consistency mid-training (CMT) against closed forms: the teacher's DPM-Solver++(2M) trajectories on a Gaussian,
whose PF-ODE is solved exactly, and a one-step map trained on the Gaussian mixture with the exact teacher."""

import math

import pytest
import torch
from exact_teacher import check_mixture_samples, three_gaussians, train_exact

from cmkit.losses.cmt import CMTLoss
from cmkit.nets.mlp import MLPNet
from cmkit.precond import Precond
from cmkit.solvers import dpm_solver_2m, euler_step, log_sigmas
from cmkit.toy import GaussianMixture

MEAN, STD = torch.tensor([[0.3, -0.2, 0.5]]), 0.4


def gaussian() -> GaussianMixture:
    return GaussianMixture(MEAN, torch.tensor([1.0]), STD).double()


def exact_flow(x, sigma, sigma_end):
    """The PF-ODE of N(m, s²I) in closed form: x(σ') = m + sqrt((s² + σ'²)/(s² + σ²))·(x(σ) − m)."""
    m = MEAN.reshape(1, -1, 1, 1).to(x)
    scale = ((STD**2 + sigma_end**2) / (STD**2 + sigma**2)) ** 0.5
    return m + scale.reshape(-1, 1, 1, 1) * (x - m) if torch.is_tensor(scale) else m + scale * (x - m)


def test_log_sigmas_are_uniform_in_log_snr():
    s = log_sigmas(16, 80.0, 0.002)
    assert len(s) == 17 and s[0].item() == pytest.approx(80.0) and s[-1].item() == pytest.approx(0.002)
    steps = torch.log(s[:-1] / s[1:])
    assert torch.allclose(steps, torch.full_like(steps, math.log(80 / 0.002) / 16), rtol=1e-5)


def test_dpm_solver_2m_is_second_order_and_euler_first():
    """Doubling the steps divides DPM-Solver++(2M)'s global error by about 4 and Euler's by about 2."""
    gm = gaussian()
    x_T = MEAN.reshape(1, 3, 1, 1).double() + 80 * torch.randn(6, 3, 1, 1, generator=torch.Generator().manual_seed(0))
    want = exact_flow(x_T, 80.0, 0.002)

    def euler(denoiser, x, sigmas):
        for s, s2 in zip(sigmas[:-1], sigmas[1:]):
            x = euler_step(denoiser, x, s.expand(len(x)), s2.expand(len(x)))
        return x

    errors = {}
    for n in (32, 64, 128):
        sigmas = log_sigmas(n, 80.0, 0.002).double()
        errors["2m", n] = (dpm_solver_2m(gm, x_T, sigmas)[-1] - want).abs().max().item()
        errors["euler", n] = (euler(gm, x_T, sigmas) - want).abs().max().item()
    for n in (32, 64):
        assert 3.3 < errors["2m", n] / errors["2m", 2 * n] < 4.7
        assert 1.7 < errors["euler", n] / errors["euler", 2 * n] < 2.3
    assert errors["2m", 128] < 1e-3


def test_cmt_rows_are_trajectory_states_and_their_end():
    """Row p holds state p mod nfe of trajectory ⌊p/nfe⌋ at its σ, and every row's target is its trajectory's end:
    the exact flow carries each state to that end (up to the solver's error), and the exact consistency function
    has a near-zero loss where the identity map does not."""
    gm, nfe = gaussian(), 64
    loss = CMTLoss(nfe=nfe, distance="l2")
    x0 = gm.sample(150).double()  # 3 trajectories, the last one partial (22 rows)
    x_in, sigma, end, _ = loss.trajectories(gm, x0)
    grid = log_sigmas(nfe, 80.0, 0.002)
    rows = torch.arange(150)
    assert torch.equal(sigma, grid[rows % nfe])
    assert torch.equal(end[rows // nfe * nfe], end)  # one end per trajectory
    assert not torch.allclose(end[0], end[nfe])  # and different trajectories
    carried = exact_flow(x_in, sigma.double(), 0.002)
    assert (carried - end).abs().max() < 0.02
    exact_f = lambda x, s, **_: exact_flow(x, s.double(), 0.002)  # noqa: E731
    identity = lambda x, s, **_: x  # noqa: E731
    assert loss(exact_f, x0, step=0, teacher=gm).max() < 1e-4
    assert loss(identity, x0, step=0, teacher=gm).mean() > 1.0


def test_cmt_needs_a_teacher():
    with pytest.raises(ValueError, match="needs a teacher"):
        CMTLoss(nfe=4)(lambda x, s: x, torch.zeros(4, 2, 1, 1), step=0)


def test_cmt_with_exact_teacher_gives_a_one_step_sampler_of_the_mixture(seed, bound):
    """One- and two-step samples of a map mid-trained on the exact mixture teacher land on its components in
    the right proportions (the same check as CD's in test_toy_cd). Measured with ``scripts/bound_spread.py``
    (seeds 0–5 × 1 and 2 threads, 12 runs): proportions within 0.003–0.0098 of the weights (bound 0.03: margin
    ≥ 3.1×), component means within 0.012–0.024 (bound 0.06: ≥ 2.5×), max component std 0.143–0.181 (bound 0.28:
    ≥ 1.55×; the true std is 0.08)."""
    torch.manual_seed(seed)
    gm = three_gaussians()
    model = Precond(MLPNet(1, 2, hidden=96, depth=3, positional_scale=1.0), "cm")
    loss = CMTLoss(nfe=16, distance="l2")
    ema = train_exact(model, lambda step: loss(model, gm.sample(512), step=step, teacher=gm), 800, 0.99)
    check_mixture_samples(bound, ema, gm)
