"""rCM's score regulariser (``cmkit.losses.dmd``, ``loss.score_reg`` of sCD): DMD's gradient in closed form on
Gaussians, the critic's minimiser, the student/critic schedule, and the loop's handling of the second network
(each network moves only on its own steps, EMAs only with the student, exact resume, microbatches)."""

import math

import pytest
import torch
from conftest import tiny_config
from torch import nn

from cmkit.losses.dmd import ScoreRegulariser
from cmkit.losses.scm import SCDLoss


class GaussianDenoiser(nn.Module):
    """The exact denoiser of N(m, s²) per pixel: E[x0 | x0 + σε = x] = m + s²/(s² + σ²)·(x − m)."""

    def __init__(self, m: float, s: float):
        super().__init__()
        self.m, self.s = m, s

    def forward(self, x, sigma, **cond):
        shrink = self.s**2 / (self.s**2 + sigma.view(-1, *[1] * (x.ndim - 1)) ** 2)
        return self.m + shrink * (x - self.m)


@pytest.mark.parametrize("m0,s0", [(1.5, 0.2), (-1.0, 1.2)])
def test_dmd_gradient_moves_a_gaussian_generator_onto_the_data_gaussian(m0, s0):
    """Data N(0.3, 0.5²); generator x̂0 = m + s·z with the fake score exact for its current (m, s). Descending
    L_G alone (DMD, the reverse KL) must bring (m, s) to (0.3, 0.5): a sign error in Δ, a missing stop-gradient or
    a wrong normalisation moves them away or stalls. Closed form, no network: both starts end within 1e-6 of
    (0.3, 0.5) after 400 steps (seeds 0–2), a thousandth of the bound."""
    torch.manual_seed(0)
    reg = ScoreRegulariser(1.0, P_mean=math.log(0.5), P_std=1.2)
    real = GaussianDenoiser(0.3, 0.5)
    m = torch.tensor(m0, requires_grad=True)
    log_s = torch.tensor(math.log(s0), requires_grad=True)
    opt = torch.optim.Adam([m, log_s], lr=0.02)
    for _ in range(400):
        z = torch.randn(512, 1, 4, 4)
        x0_hat = m + log_s.exp() * z
        fake = GaussianDenoiser(float(m.detach()), float(log_s.detach().exp()))
        loss = reg.student_loss(x0_hat, lambda x, s, c: real(x, s), fake, {}).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    m, s = float(m.detach()), float(log_s.detach().exp())
    assert abs(m - 0.3) < 1e-3 and abs(s - 0.5) < 1e-3, (m, s)


def test_dmd_gradient_is_zero_when_the_generator_matches_the_data():
    """Fake = real: Δ = 0, so L_G has no gradient at all (the regulariser leaves a perfect student alone)."""
    reg = ScoreRegulariser(1.0)
    x0_hat = torch.randn(64, 1, 4, 4, requires_grad=True)
    same = GaussianDenoiser(0.0, 1.0)
    loss = reg.student_loss(x0_hat, lambda x, s, c: same(x, s), same, {}).sum()
    loss.backward()
    assert float(loss) == 0.0 and float(x0_hat.grad.abs().max()) == 0.0


def test_critic_loss_is_lowest_at_the_generators_exact_denoiser():
    """L_φ is EDM's denoising loss on the generator's samples: on N(−0.4, 0.7²) samples its expectation is least
    for that distribution's exact denoiser, not for the data's (the teacher the critic starts from)."""
    torch.manual_seed(0)
    reg = ScoreRegulariser(1.0)
    samples = -0.4 + 0.7 * torch.randn(20_000, 1, 2, 2)

    def mean_loss(fake):
        torch.manual_seed(1)  # the same σ and ε for every candidate
        return float(reg.critic_loss(samples, fake, {}).mean())

    exact = mean_loss(GaussianDenoiser(-0.4, 0.7))
    for other in [GaussianDenoiser(0.0, 0.5), GaussianDenoiser(-0.3, 0.7), GaussianDenoiser(-0.4, 0.8)]:
        assert exact < mean_loss(other)


def test_schedule_alternates_one_student_step_and_the_critic_steps():
    reg = ScoreRegulariser(1.0, critic_steps=2, max_steps=2, start=3)
    assert [reg.active(s) for s in range(4)] == [False, False, False, True]
    critic = [reg.is_critic_step(s) for s in range(3, 12)]
    assert critic == [False, True, True, False, True, True, False, True, True]
    # n cycles 1 … K over the student updates (steps 3, 6, 9) and, separately, over the critic updates
    assert [reg.simulation_steps(s) for s in (3, 6, 9)] == [1, 2, 1]
    assert [reg.simulation_steps(s) for s in (4, 5, 7, 8)] == [1, 2, 1, 2]


def test_generator_keeps_the_graph_of_its_last_step_only():
    """rCM's backward simulation: n − 1 steps without a graph, then one with it."""
    calls = []

    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(()))

        def forward(self, x, sigma, **cond):
            calls.append((torch.is_grad_enabled(), float(sigma.max())))
            return self.w * x / (1 + sigma.view(-1, 1, 1, 1) ** 2).sqrt()

    reg = ScoreRegulariser(1.0, max_steps=3, sigma_max=80.0)
    x0 = reg.generate(Recorder(), torch.randn(8, 1, 2, 2), 3, {}, grad=True)
    assert [g for g, _ in calls] == [False, False, True]
    assert calls[0][1] == 80.0 and calls[1][1] >= calls[2][1]  # σ never rises along the simulation
    assert x0.requires_grad


def test_score_reg_needs_its_critic():
    loss = SCDLoss(score_reg=1.0, tangent_warmup=0)
    with pytest.raises(ValueError, match="fake-score"):
        loss(nn.Identity(), torch.zeros(2, 1, 4, 4), step=0, teacher=nn.Identity())


def _weights(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


RCM = ["loss.tangent_warmup=2", "loss.score_critic_steps=2", "loss.score_sim_steps=2", "train.lr=1e-3"]


def test_each_network_moves_only_on_its_own_steps(tmp_path, teacher_dir, one_thread):
    """Steps 0–1: sCD alone; from step 2, student (2, 5) and critic (3, 4, 6) steps. The student and its EMA
    change only on student steps, the fake score only on critic steps; the critic starts as the teacher."""
    from cmkit.load import load_denoiser
    from cmkit.training.loop import Loop

    cfg = tiny_config("digits-rcm", tmp_path, f"train.teacher={teacher_dir}", f"train.init_from={teacher_dir}", *RCM)
    loop = Loop(cfg, progress=False)
    try:
        teacher, _ = load_denoiser(str(teacher_dir))
        fake = loop.task.fake
        assert _same(_weights(teacher), _weights(fake))
        groups = loop.optimizer.param_groups
        assert len(groups) == 2 and groups[1]["lr_scale"] == 0.2
        for step in range(7):
            before = (_weights(loop.model), _weights(loop.emas[0]), _weights(fake))
            stats = loop.train_step()
            assert not stats["skipped"] and math.isfinite(stats["loss"])
            if step >= 3:  # every log row carries the latest DMD term and critic loss, whichever step it falls on
                assert math.isfinite(stats["dmd"]) and math.isfinite(stats["critic_loss"]), stats
            after = (_weights(loop.model), _weights(loop.emas[0]), _weights(fake))
            critic = step in (3, 4, 6)
            assert _same(before[0], after[0]) == critic, step
            assert _same(before[1], after[1]) == critic, step
            assert _same(before[2], after[2]) == (not critic), step
            if critic:
                assert groups[1]["lr"] == pytest.approx(0.2 * groups[0]["lr"])
    finally:
        loop.close()


def test_resume_is_exact_with_the_critic(tmp_path, teacher_dir, one_thread):
    """8 steps straight and 5 + 3 resumed end with identical student, EMA and critic weights (the critic and
    its Adam moments are in the checkpoint)."""
    from safetensors.torch import load_file

    from cmkit.training.loop import train

    common = [f"train.teacher={teacher_dir}", f"train.init_from={teacher_dir}", *RCM, "train.ckpt_every=5"]
    train(tiny_config("digits-rcm", tmp_path / "straight", "train.steps=8", *common), progress=False)
    train(tiny_config("digits-rcm", tmp_path / "split", "train.steps=5", *common), progress=False)
    train(tiny_config("digits-rcm", tmp_path / "split", "train.steps=8", "train.resume=true", *common), progress=False)
    for name in ("model", "ema_0.995", "fake_score"):
        a = load_file(tmp_path / "straight" / "checkpoint" / f"{name}.safetensors")
        b = load_file(tmp_path / "split" / "checkpoint" / f"{name}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_two_processes_end_with_identical_student_and_critic(tmp_path, teacher_dir):
    """Under DDP the student runs twice through its wrapper in a student step (sCD's pass and the generator's last
    step) and the critic has a wrapper of its own: after a student, a critic and a student step (steps 0, 1, 2)
    both networks are equal on the two ranks, which trained on different data."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("ddp_weights.py")
    overrides = [
        f"train.teacher={teacher_dir}",
        f"train.init_from={teacher_dir}",
        "loss.tangent_warmup=0",
        "loss.score_critic_steps=1",
    ]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29543"]
    proc = subprocess.run(
        [*cmd, str(script), "digits-rcm", str(tmp_path / "run"), *overrides],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "RESULT same=True ranks=2" in proc.stdout, proc.stdout[-1000:]
