"""Align Your Flow (AYF-EMD) and autoguidance: the flow-map parameterisation's closed forms, the loss at the exact
flow map, an exact-teacher run on a Gaussian mixture, and the command line on digits."""

import json
import math

import pytest
import torch
from conftest import tiny_config
from exact_teacher import pf_ode_map, three_gaussians, train_exact
from torch import nn

from cmkit.cli.main import main
from cmkit.guidance import AutoGuided
from cmkit.losses.ayf import AYFLoss, teacher_velocity
from cmkit.nets.mlp import MLPNet
from cmkit.nets.unet import UNet
from cmkit.precond import Precond, edm_scalings
from cmkit.training.loop import train

SD = 0.5


def _unet(time_inputs: int) -> UNet:
    return UNet(8, 1, model_channels=16, channel_mult=(1, 2), num_blocks=1, time_inputs=time_inputs)


def test_flowmap_is_a_ddim_step_with_a_learned_x0_and_starts_as_its_edm_teacher():
    """f(x, σ, σ) = x and f(x, σ, 0) = g_θ = the denoiser; the rectified-path velocity u = (z − g)/t gives the same
    jump; with the zero-initialised target-time input and the teacher's other weights, u(z, t, s) is the teacher's
    velocity (z − D(z/(1−t), t/(1−t)))/t for every s."""
    torch.manual_seed(0)
    teacher = Precond(_unet(1), "edm").eval()
    for p in teacher.parameters():
        nn.init.normal_(p, std=0.05)
    student = Precond(_unet(2), "flowmap").eval()
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("net.emb_mlp2.") for k in missing)
    x = torch.randn(4, 1, 8, 8) * 3
    sigma, sigma_to = torch.tensor([3.0, 0.5, 10.0, 80.0]), torch.tensor([1.0, 0.1, 0.0, 2.0])
    with torch.no_grad():
        assert torch.equal(student.flow_map(x, sigma, sigma), x)
        assert torch.allclose(student.flow_map(x, sigma, 0.0), student(x, sigma), atol=1e-6)
        t, r = sigma / (1 + sigma), sigma_to / (1 + sigma_to)
        z = x / (1 + sigma)[:, None, None, None]
        u = student.average_velocity(z, t, r)
        jump = (z - (t - r)[:, None, None, None] * u) * (1 + sigma_to)[:, None, None, None]
        assert torch.allclose(jump, student.flow_map(x, sigma, sigma_to), atol=1e-4)
        v = teacher_velocity(teacher, z, t, None)
        assert torch.allclose(u, v, atol=1e-5)
        assert torch.allclose(student.average_velocity(z, t, torch.zeros_like(t)), v, atol=1e-5)
        nn.init.normal_(student.net.emb_mlp2[-1].weight, std=0.05)  # a trained target-time input: s matters
        assert not torch.allclose(student.average_velocity(z, t, r), v, atol=1e-3)


class ExactPointMassF(nn.Module):
    """The backbone whose flow map is exact when all data sit at c: g_θ ≡ c for every (σ, s), i.e.
    F = (c − c_skip·x)/c_out; ``shift`` moves g off it."""

    def __init__(self, c: float, shift: float = 0.0):
        super().__init__()
        self.c, self.shift = c, nn.Parameter(torch.tensor(shift))

    def forward(self, x_in, c_noise, class_labels=None, c_noise2=None):
        sigma = (4 * c_noise.float()).exp()
        c_skip, c_out, c_in = (c[:, None, None, None] for c in edm_scalings(sigma, SD))
        return (self.c + self.shift - c_skip * x_in / c_in) / c_out


class PointMass(nn.Module):
    def __init__(self, c: float):
        super().__init__()
        self.c = c

    def forward(self, x, sigma, **_):
        return torch.full_like(x, self.c)


def test_ayf_loss_vanishes_at_the_exact_flow_map_of_a_point_mass():
    torch.manual_seed(0)
    x0 = torch.full((64, 1, 4, 4), 0.3)
    loss = AYFLoss(norm_p=0.0)  # p = 0: the plain ‖u − u_tgt‖²
    exact = Precond(ExactPointMassF(0.3), "flowmap")
    assert float(loss(exact, x0, step=0, teacher=PointMass(0.3)).detach().max()) < 1e-6
    wrong = Precond(ExactPointMassF(0.3, 0.1), "flowmap")
    assert float(loss(wrong, x0, step=0, teacher=PointMass(0.3)).mean()) > 1e-3
    assert float(loss(exact, x0, step=0, teacher=PointMass(0.5)).mean()) > 1e-3  # another teacher, another map
    z = torch.randn(4, 1, 4, 4) * 80
    with torch.no_grad():
        assert torch.allclose(exact(z, 80.0), torch.full_like(z, 0.3), atol=1e-4)
    with pytest.raises(ValueError, match="teacher"):
        loss(exact, x0, step=0)


def test_autoguidance_extrapolates_from_the_weak_model_and_w_1_is_the_teacher_alone():
    calls = []

    class Const(nn.Module):
        def __init__(self, value):
            super().__init__()
            self.value, self.sigma_data = value, 0.5

        def forward(self, x, sigma, **cond):
            calls.append(self.value)
            return torch.full_like(x, self.value)

    x, sigma = torch.zeros(2, 1, 2, 2), torch.ones(2)
    guided = AutoGuided(Const(1.0), Const(0.25), 2.5)
    assert torch.allclose(guided(x, sigma), torch.full_like(x, 0.25 + 2.5 * (1.0 - 0.25)))
    assert guided.sigma_data == 0.5  # the teacher's attributes pass through
    calls.clear()
    assert torch.equal(AutoGuided(Const(1.0), Const(0.25), 1.0)(x, sigma), torch.ones_like(x)) and calls == [1.0]


def test_ayf_with_the_exact_teacher_learns_the_probability_flow_map(seed, bound):
    """AYF on a Gaussian mixture with its exact denoiser as teacher: the one-step map f(x, σ, 0) approaches the
    exact PF-ODE map (fine Heun from σ to 0 with the same denoiser) at σ = 0.2, 1, 5 and 80, and so does the
    two-time jump f(x, 80, 1) (Heun from 80 to 1).

    Measured with ``scripts/bound_spread.py --seeds 5 --threads 1,2 -k "ayf and exact_teacher"`` (10 runs, 1000
    steps, AMD EPYC): RMS errors 0.059–0.070 (0.2 → 0), 0.139–0.182 (1 → 0), 0.155–0.186 (5 → 0), 0.163–0.208
    (80 → 0), 0.016–0.023 (80 → 1); trained / untrained 0.126–0.175. Each bound is at least 1.9× the worst run.
    (sCD's one-step map on the same mixture reaches 0.1–0.12 at σ ≥ 1: a two-time map is a harder function.)"""
    torch.manual_seed(seed)
    gm = three_gaussians()
    net = MLPNet(1, 2, hidden=96, depth=3, embedding="positional", positional_scale=1.0, time_inputs=2)
    model = Precond(net, "flowmap")
    steps = 1000
    loss = AYFLoss(tangent_warmup=steps // 5)
    before = _flow_map_errors(model, gm)
    model = train_exact(model, lambda step: loss(model, gm.sample(512), step=step, teacher=gm), steps)
    after = _flow_map_errors(model, gm)
    for (sigma, sigma_to), error, limit in zip(JUMPS, after, LIMITS):
        bound(f"RMS error of the jump {sigma} -> {sigma_to}", error, limit)
    bound("sum of errors, trained / untrained", sum(after) / sum(before), 0.35)


JUMPS = ((0.2, 0.0), (1.0, 0.0), (5.0, 0.0), (80.0, 0.0), (80.0, 1.0))
LIMITS = (0.15, 0.4, 0.4, 0.4, 0.05)


def _flow_map_errors(model, gm):
    """RMS error of f(x, σ, σ_to) against the exact PF-ODE map, relative to the data std, for each of ``JUMPS``."""
    std = float(gm.sample(20000, torch.Generator().manual_seed(0)).flatten(1).std(0).mean())
    errors = []
    for sigma, sigma_to in JUMPS:
        x0 = gm.sample(1000, torch.Generator().manual_seed(1))
        x = x0 + sigma * torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            exact = pf_ode_map(gm, x, sigma, sigma_to)
            pred = model.flow_map(x, sigma, sigma_to)
        scale = std * max(1.0, sigma_to)  # a jump to σ_to > 0 lands on data plus noise of std σ_to
        errors.append(float((pred - exact).flatten(1).pow(2).sum(1).mean().sqrt()) / math.sqrt(2) / scale)
    return errors


def test_digits_ayf_distils_an_autoguided_teacher_from_the_command_line(tmp_path, teacher_dir, capsys, one_thread):
    """`cmkit train --preset digits-ayf` with train.autoguide: the run records its guide, the model samples in one
    step and with the flowmap sampler, and the autoguidance mistakes are one error line each."""
    weak = tmp_path / "weak"
    train(tiny_config("digits-edm", weak, "train.steps=10", "model.model_channels=8"), progress=False)
    run = tmp_path / "ayf"
    common = [f"train.teacher={teacher_dir}", f"train.init_from={teacher_dir}"] + [
        f"{k}" for k in ("model.model_channels=16", "model.channel_mult=1,2", "model.num_blocks=1")
    ]
    args = ["train", "--preset", "digits-ayf", *common, f"train.autoguide={weak}", "train.autoguide_w=2"]
    args += [f"train.out_dir={run}", "train.steps=20", "train.batch_size=16", "train.sample_every=0"]
    assert main(args + ["train.ckpt_every=0", "--no-progress"]) == 0
    cfg = json.loads((run / "model" / "config.json").read_text())["config"]
    assert cfg["train"]["autoguide"] == str(weak) and cfg["train"]["autoguide_w"] == 2.0
    assert cfg["model"]["precond"] == "flowmap"
    logged = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(row["loss"]) and math.isfinite(row["mse"]) for row in logged)
    for sampler in (["--steps", "1"], ["--sampler", "flowmap", "--steps", "2"]):
        out = tmp_path / f"s{len(sampler)}.png"
        assert main(["sample", "--model", str(run / "model"), "-n", "4", "-o", str(out), *sampler]) == 0
        assert out.stat().st_size > 0
    capsys.readouterr()

    other = tmp_path / "other"  # a weak model of other data: class-conditional digits
    train(tiny_config("digits-edm", other, "train.steps=2", "model.num_classes=10"), progress=False)
    bad = [
        ("digits-ayf", [*common, "train.autoguide_w=2"], "set train.autoguide=PATH"),
        ("digits-ayf", [*common, f"train.autoguide={other}"], "does not model the teacher's data"),
        ("digits-ect", [f"train.init_from={teacher_dir}", f"train.autoguide={weak}"], "train.autoguide guides"),
    ]
    for i, (preset, extra, message) in enumerate(bad):
        assert main(["train", "--preset", preset, f"train.out_dir={tmp_path / f'bad{i}'}", *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
