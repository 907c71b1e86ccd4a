import math

import pytest
import torch

from cmkit.schedules import ct_adaptive_schedule, ect_r_of_t, ict_num_scales, karras_sigmas, lognormal_index_probs


def test_karras_grid_endpoints_and_reference_values():
    s = karras_sigmas(18)
    assert s[0].item() == 80.0 and s[-1].item() == torch.tensor(0.002, dtype=torch.float32).item()
    assert torch.all(s[:-1] > s[1:])
    ref = [
        80,
        57.59,
        40.79,
        28.37,
        19.35,
        12.91,
        8.40,
        5.32,
        3.26,
        1.92,
        1.09,
        0.585,
        0.296,
        0.140,
        0.060,
        0.023,
        0.0075,
        0.002,
    ]  # CM reference §1.1 (N = 18)
    for got, want in zip(s.tolist(), ref):
        assert got == pytest.approx(want, rel=0.02, abs=5e-4)


def test_karras_published_middle_points():
    # 2-step middle points quoted in the reference (grid formula on the training grid).
    assert karras_sigmas(40)[22].item() == pytest.approx(1.3824, rel=1e-3)
    assert karras_sigmas(201)[106].item() == pytest.approx(1.9128, rel=1e-3)
    assert karras_sigmas(40)[17].item() == pytest.approx(4.3656, rel=1e-3)
    assert karras_sigmas(18)[11].item() == pytest.approx(0.5853, rel=1e-3)


@pytest.mark.parametrize(
    "k,N,mu",
    [
        (0, 2, 0.810),
        (1000, 6, 0.9587),
        (10_000, 17, 0.9869),
        (100_000, 54, 0.9960),
        (400_000, 107, 0.9980),
        (800_000, 151, 0.9986),
    ],
)
def test_ct_adaptive_cifar10_table(k, N, mu):
    got_N, got_mu = ct_adaptive_schedule(k, 800_000, s0=2, s1=150, mu0=0.9)
    assert got_N == N and got_mu == pytest.approx(mu, abs=1e-4)


@pytest.mark.parametrize(
    "k,N,mu",
    [
        (0, 2, 0.9025),
        (1000, 8, 0.9855),
        (10_000, 23, 0.9953),
        (100_000, 72, 0.9986),
        (400_000, 143, 0.9993),
        (800_000, 201, 0.9995),
    ],
)
def test_ct_adaptive_imagenet_table(k, N, mu):
    got_N, got_mu = ct_adaptive_schedule(k, 800_000, s0=2, s1=200, mu0=0.95)
    assert got_N == N and got_mu == pytest.approx(mu, abs=1e-4)


def test_ict_curriculum_doubles_to_1281():
    K = 400_000
    seen = [ict_num_scales(k, K) for k in range(0, K, 50_000)]
    assert seen == [11, 21, 41, 81, 161, 321, 641, 1281]
    assert ict_num_scales(10 * K, K) == 1281


def test_lognormal_probs_normalised_and_peaked_near_exp_pmean():
    asc = karras_sigmas(641).flip(0)
    p = lognormal_index_probs(asc)
    assert p.sum().item() == pytest.approx(1.0, abs=1e-6) and (p >= 0).all()
    peak_sigma = asc[p.argmax()].item()
    assert 0.05 < peak_sigma < 1.5  # mode of lognormal(-1.1, 2) density in σ per-interval mass


def test_ect_ratio_per_stage_at_t1():
    t = torch.tensor([1.0])
    ratios = [ect_r_of_t(t, a).item() for a in range(1, 8)]
    for got, want in zip(ratios, [0.21, 0.61, 0.80, 0.90, 0.95, 0.975, 0.988]):
        assert got == pytest.approx(want, abs=0.006)
    assert ect_r_of_t(torch.tensor([0.5]), 0).item() == 0.0  # stage 0: pure denoising for small t
    big = ect_r_of_t(torch.tensor([60.0]), 0).item() / 60
    assert big == pytest.approx(0.5, abs=1e-3)
    assert math.isclose(ect_r_of_t(torch.tensor([0.0]), 3).item(), 0.0)
