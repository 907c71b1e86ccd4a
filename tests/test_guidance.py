"""Classifier-free guidance for distillation teachers (cmkit.guidance): the null label, label dropout, the
guided denoiser, sCD with a guided teacher, and the config checks."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import tiny_config
from torch import nn

from cmkit.errors import CmkitError
from cmkit.guidance import NULL_LABEL, drop_labels, guided, label_embedding
from cmkit.losses.edm import EDMLoss
from cmkit.losses.scm import SCDLoss
from cmkit.nets.edm import DDPMpp
from cmkit.nets.mlp import MLPNet
from cmkit.nets.unet import UNet
from cmkit.trigflow import sigma_from_t, velocity_from_denoiser


def _randomise(net: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)
    return net.eval()


def test_label_embedding_null_row_is_zero_and_bad_labels_are_one_line():
    table = nn.Embedding(4, 3)
    labels = torch.tensor([2, NULL_LABEL, 0])
    out = label_embedding(table, labels)
    assert torch.equal(out[1], torch.zeros(3))
    assert torch.equal(out[0], table.weight[2]) and torch.equal(out[2], table.weight[0])
    for bad in ([4], [-2]):
        with pytest.raises(ValueError, match=r"must lie in \[0, 4\) or be -1"):
            label_embedding(table, torch.tensor(bad))


@pytest.mark.parametrize("arch", ["unet", "mlp"])
def test_null_label_is_the_network_without_its_label_embedding(arch):
    """A null label adds nothing to the noise embedding: the output equals the same weights built unconditional."""
    kw = dict(img_resolution=8, in_channels=1, num_classes=3)
    if arch == "unet":

        def make(n):
            return UNet(model_channels=16, channel_mult=(1, 2), num_blocks=1, **{**kw, "num_classes": n})
    else:

        def make(n):
            return MLPNet(hidden=32, depth=2, **{**kw, "num_classes": n})

    cond = _randomise(make(3))
    uncond = make(0).eval()
    missing, unexpected = uncond.load_state_dict(cond.state_dict(), strict=False)
    assert not missing and unexpected == ["label_emb.weight"]
    x, c = torch.randn(3, 1, 8, 8), torch.randn(3)
    null = torch.full((3,), NULL_LABEL)
    torch.testing.assert_close(cond(x, c, null), uncond(x, c), rtol=0, atol=1e-6)
    assert not torch.allclose(cond(x, c, torch.tensor([0, 1, 2])), uncond(x, c), atol=1e-3)


def test_edm_networks_read_the_null_label_as_a_zero_one_hot_row():
    net = _randomise(
        DDPMpp(
            img_resolution=8,
            in_channels=1,
            model_channels=16,
            channel_mult=(1, 2),
            num_blocks=1,
            attn_resolutions=(),
            num_classes=3,
        )
    )
    x, c = torch.randn(2, 1, 8, 8), torch.randn(2)
    zero_rows = torch.zeros(2, 3)
    torch.testing.assert_close(net(x, c, torch.full((2,), NULL_LABEL)), net(x, c, zero_rows), rtol=0, atol=0)


def test_drop_labels_rate_and_kept_labels():
    torch.manual_seed(0)
    labels = torch.randint(0, 10, (20_000,))
    assert torch.equal(drop_labels(labels, 0.0), labels)
    out = drop_labels(labels, 0.2)
    dropped = out == NULL_LABEL
    # binomial(20000, 0.2): std 0.0028 of the rate; 5 std either side
    assert abs(float(dropped.float().mean()) - 0.2) < 0.015
    assert torch.equal(out[~dropped], labels[~dropped])


class Spy(nn.Module):
    """A class-conditional toy denoiser D(x, σ, c) = x/(1+σ) + (c+1)/10 (the null label gives 0), counting calls."""

    def __init__(self):
        super().__init__()
        self.calls, self.seen = 0, []

    def forward(self, x, sigma, class_labels=None):
        self.calls += 1
        self.seen.append(class_labels.clone())
        shift = torch.where(class_labels == NULL_LABEL, 0.0, (class_labels + 1).float() / 10)
        return x / (1 + sigma.view(-1, 1, 1, 1)) + shift.view(-1, 1, 1, 1)


def test_guided_denoiser_is_the_cfg_combination_in_one_call():
    x, sigma, labels = torch.randn(4, 1, 2, 2), torch.rand(4) + 0.1, torch.tensor([0, 1, 2, 3])
    spy = Spy()
    base = x / (1 + sigma.view(-1, 1, 1, 1))
    shift = ((labels + 1).float() / 10).view(-1, 1, 1, 1)
    for w in (0.0, 1.0, 2.5):
        calls = spy.calls
        torch.testing.assert_close(guided(spy, x, sigma, labels, w), base + w * shift)
        assert spy.calls == calls + 1  # one network call, on the doubled batch when w ≠ 1


def test_edm_loss_label_dropout_shows_the_model_null_labels():
    torch.manual_seed(0)
    spy = Spy()
    labels = torch.randint(0, 10, (4_000,))
    EDMLoss(label_dropout=0.25)(spy, torch.randn(4_000, 1, 2, 2), step=0, class_labels=labels)
    seen = spy.seen[-1]
    assert 0.2 < float((seen == NULL_LABEL).float().mean()) < 0.3
    assert torch.equal(labels, labels.clone())  # the caller's labels are not modified in place
    EDMLoss()(spy, torch.randn(8, 1, 2, 2), step=0, class_labels=labels[:8])
    assert torch.equal(spy.seen[-1], labels[:8])


def test_scd_distils_the_guided_teacher_velocity():
    torch.manual_seed(0)
    x0, labels = torch.randn(6, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1, 2])
    t = torch.rand(6) * 1.4 + 0.1
    z = torch.randn_like(x0) * 0.5
    x_t = torch.cos(t).view(-1, 1, 1, 1) * x0 + torch.sin(t).view(-1, 1, 1, 1) * z
    spy = Spy()
    v = SCDLoss(guidance=3.0).velocity(x0, z, x_t, t, spy, {"class_labels": labels})
    x_sigma = x_t / torch.cos(t).view(-1, 1, 1, 1)
    D = guided(spy, x_sigma, sigma_from_t(t, 0.5), labels, 3.0)
    torch.testing.assert_close(v, velocity_from_denoiser(x_t, t, D))
    v1 = SCDLoss().velocity(x0, z, x_t, t, spy, {"class_labels": labels})
    assert not torch.allclose(v, v1)  # guidance changes the target
    with pytest.raises(ValueError, match="class-conditional"):
        SCDLoss(guidance=2.0).velocity(x0, z, x_t, t, spy, {})


def test_guidance_options_need_a_class_conditional_model(tmp_path):
    with pytest.raises(CmkitError, match=r"loss.guidance=2.0 is classifier-free guidance: it needs a class-cond"):
        tiny_config("digits-scd", tmp_path, "loss.guidance=2.0", f"train.teacher={tmp_path}").validate()
    with pytest.raises(CmkitError, match="label_dropout"):
        tiny_config("digits-edm", tmp_path, "loss.label_dropout=0.1").validate()
    with pytest.raises(CmkitError, match="guidance"):  # sCT has no teacher to guide
        tiny_config("digits-sct", tmp_path, "model.num_classes=10", "loss.guidance=2.0").validate()


def test_conditional_teacher_with_label_dropout_then_guided_scd_train(tmp_path, one_thread):
    """The whole path on 8×8 digits: a class-conditional EDM teacher with label dropout, then sCD distilling it
    with guidance 2 through the loop; the run records its guidance and samples per class. (That the objective
    learns is test_continuous_time's check; the guided target itself is checked above.)"""
    from cmkit.load import load_model
    from cmkit.sampling import sample_multistep
    from cmkit.training.loop import train

    teacher = tmp_path / "teacher"
    train(
        tiny_config("digits-edm", teacher, "train.steps=30", "model.num_classes=10", "loss.label_dropout=0.2"),
        progress=False,
    )
    student = tmp_path / "scd"
    train(
        tiny_config(
            "digits-scd",
            student,
            "train.steps=60",
            "train.log_every=1",
            "model.num_classes=10",
            "train.init_from=",
            f"train.teacher={teacher}",
            "loss.guidance=2.0",
            "loss.tangent_warmup=0",
            "train.lr=1e-3",
        ),
        progress=False,
    )
    rows = [json.loads(line) for line in (student / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert len(rows) == 60
    model, cfg = load_model(student)
    assert cfg.loss.guidance == 2.0
    x = sample_multistep(
        model,
        (4, 1, 8, 8),
        [80.0, 1.0],
        generator=torch.Generator().manual_seed(0),
        class_labels=torch.tensor([0, 1, 2, 3]),
    )
    assert torch.isfinite(x).all()


def test_guidance_with_an_unconditional_teacher_is_one_error(tmp_path, teacher_dir, one_thread):
    from cmkit.training.loop import train

    cfg = tiny_config(
        "digits-scd",
        tmp_path / "scd",
        "train.steps=2",
        "model.num_classes=10",
        "train.init_from=",
        f"train.teacher={teacher_dir}",
        "loss.guidance=2.0",
    )
    with pytest.raises(CmkitError, match="loss.guidance needs a class-conditional teacher"):
        train(cfg, progress=False)


def test_the_class_conditional_digits_presets_train_and_sample_a_class(tmp_path, one_thread):
    """digits-edm-cond (label dropout 0.1) and digits-scd-cfg (guidance 2 from it) run through the loop as
    configured, and `cmkit sample --class` takes the student."""
    from cmkit.cli.main import main
    from cmkit.training.loop import train
    from cmkit.training.presets import get_config

    teacher = tmp_path / "teacher"
    cfg = tiny_config("digits-edm-cond", teacher, "train.steps=3")
    assert cfg.model.num_classes == 10 and cfg.loss.label_dropout == 0.1
    train(cfg, progress=False)
    student = tmp_path / "student"
    scd = tiny_config(
        "digits-scd-cfg", student, "train.steps=3", f"train.teacher={teacher}", f"train.init_from={teacher}"
    )
    assert scd.loss.guidance == 2.0 and get_config("digits-scd-cfg").train.teacher == "runs/digits-edm-cond"
    train(scd, progress=False)
    assert (
        main(
            [
                "sample",
                "--model",
                str(student),
                "--steps",
                "1",
                "-n",
                "2",
                "--class",
                "3",
                "-o",
                "",
                "--npz",
                str(tmp_path / "s.npz"),
            ]
        )
        == 0
    )
    assert np.load(tmp_path / "s.npz")["arr_1"].tolist() == [3, 3]
