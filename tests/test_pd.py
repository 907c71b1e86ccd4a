"""Progressive distillation (losses/pd.py): closed form on a Gaussian with an exact teacher, the halving
schedule, the sampler, and training through the loop with an exact resume (the teacher changes per stage)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from cmkit.losses.pd import PDLoss
from cmkit.schedules import karras_sigmas
from cmkit.solvers import euler_step

S2 = 0.3  # data ~ N(0, S2·I): the exact denoiser is D(x, σ) = S2/(S2 + σ²)·x


def exact_denoiser(x, sigma, **_):
    sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return S2 / (S2 + sigma**2) * x


def test_the_target_makes_one_student_step_equal_two_teacher_steps():
    loss = PDLoss(num_scales=8)
    x_t, N = torch.randn(5, 1, 4, 4), 8
    i = torch.arange(5).float()
    t, t2, t3 = (loss.sigma_at(v / N) for v in (i, i + 0.5, i + 1))
    x_hat = loss.target(exact_denoiser, x_t, t, t2, t3)
    two = euler_step(exact_denoiser, euler_step(exact_denoiser, x_t, t, t2), t2, t3)
    one = euler_step(lambda x, s: x_hat, x_t, t, t3)  # the student predicting x̂ at (x_t, t)
    torch.testing.assert_close(one, two, atol=1e-5, rtol=1e-5)
    # and the grid is the reference's: ρ-spaced, t at i/N and t3 at (i+1)/N of the N-interval Karras grid
    torch.testing.assert_close(torch.cat([t, t3[-1:]]), karras_sigmas(N + 1)[:6], atol=1e-4, rtol=1e-5)


def test_an_exact_two_step_student_has_zero_loss_and_a_wrong_one_does_not():
    loss = PDLoss(num_scales=4)
    x0 = torch.randn(64, 1, 4, 4) * S2**0.5
    torch.manual_seed(0)

    class Student(torch.nn.Module):  # predicts x̂ exactly: the student of an exact teacher
        def forward(self, x, sigma, **cond):
            N = 4
            u = (loss.sigma_max ** (1 / 7) - sigma ** (1 / 7)) / (loss.sigma_max ** (1 / 7) - loss.sigma_min ** (1 / 7))
            i = (u * N).round()
            t2, t3 = loss.sigma_at((i + 0.5) / N), loss.sigma_at((i + 1) / N)
            return loss.target(exact_denoiser, x, sigma, t2, t3)

    assert loss(Student(), x0, step=0, teacher=exact_denoiser).max() < 1e-8
    assert loss(exact_denoiser, x0, step=0, teacher=exact_denoiser).mean() > 1e-6  # the teacher itself is not


def test_halving_schedule():
    loss = PDLoss(num_scales=16, halve_every=10)
    assert [loss.num_scales(k) for k in (0, 9, 10, 20, 30, 40, 50, 1000)] == [16, 16, 8, 4, 2, 1, 1, 1]
    assert [k for k in range(60) if loss.stage_ends(k)] == [9, 19, 29, 39]


def test_pd_trains_resumes_bit_for_bit_and_samples(tmp_path, teacher_dir):
    from safetensors.torch import load_file

    from cmkit.generate import generate, resolve_sampler
    from cmkit.load import load_model
    from cmkit.training.loop import Loop, train

    common = [
        "train.steps=6",
        "loss.num_scales=4",
        "loss.halve_every=2",
        f"train.teacher={teacher_dir}",
        f"train.init_from={teacher_dir}",
        "train.ema_rates=0.9",
    ]
    train(tiny_config("digits-pd", tmp_path / "a", *common), progress=False)
    first = Loop(tiny_config("digits-pd", tmp_path / "b", *common), progress=False)
    for _ in range(3):  # interrupted inside the second stage, after a teacher swap
        first.train_step()
    first.save_checkpoint()
    first.close()  # the interrupted process ends
    train(tiny_config("digits-pd", tmp_path / "b", *common, "train.resume=true"), progress=False)
    for name in ("model", "ema_0.9", "teacher"):
        a = load_file(tmp_path / "a" / "checkpoint" / f"{name}.safetensors")
        b = load_file(tmp_path / "b" / "checkpoint" / f"{name}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), name
    model, cfg = load_model(tmp_path / "a")
    sampler, sigmas, steps = resolve_sampler(cfg, None, None, None)
    assert (sampler, steps) == ("progdist", 1)
    x, _ = generate(model, cfg, 3, sampler, sigmas, 2, progress=False)
    assert x.shape == (3, 1, 8, 8) and torch.isfinite(x).all()


def test_pd_config_rules():
    from cmkit.errors import CmkitError
    from cmkit.training.presets import get_config

    with pytest.raises(CmkitError, match="needs model.precond=edm"):
        get_config("digits-pd", ["model.precond=cm"])
    with pytest.raises(CmkitError, match="loss.method=pd needs a teacher"):
        get_config("digits-pd", ["train.teacher="])
