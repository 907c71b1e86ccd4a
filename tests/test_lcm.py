"""Latent consistency distillation (cmkit.losses.lcm): the guidance scale as an input, checked against the exact
class-conditional teacher of a Gaussian mixture (cmkit.toy), whose guided denoiser is known in closed form."""

import copy
import math

import numpy as np
import pytest
import torch
from conftest import tiny_config
from exact_teacher import train_exact

from cmkit.guidance import NULL_LABEL, guided
from cmkit.losses import LCMLoss
from cmkit.nets.mlp import MLPNet
from cmkit.precond import Precond
from cmkit.sampling import sample_multistep
from cmkit.toy import GaussianMixture

MEANS = torch.tensor([[-0.6, -0.6], [0.6, -0.6], [0.0, 0.7]])
WEIGHTS = torch.tensor([0.5, 0.3, 0.2])


def mixture() -> GaussianMixture:
    return GaussianMixture(MEANS, WEIGHTS, 0.08)


def test_the_toy_teacher_is_the_exact_conditional_and_guided_denoiser():
    """D(x, σ, c) is component c's posterior mean; the null label gives the mixture's; guidance with w = 1 is the
    conditional denoiser, w = 0 the unconditional one, and a per-sample w mixes them sample by sample."""
    gm = mixture()
    x, sigma = torch.randn(6, 2, 1, 1), torch.full((6,), 0.7)
    c = torch.tensor([0, 1, 2, 0, 1, 2])
    shrink = 0.08**2 / (0.08**2 + 0.49)
    want = MEANS[c] + shrink * (x.flatten(1) - MEANS[c])
    torch.testing.assert_close(gm(x, sigma, class_labels=c).flatten(1), want)
    torch.testing.assert_close(gm(x, sigma, class_labels=torch.full_like(c, NULL_LABEL)), gm(x, sigma))
    torch.testing.assert_close(guided(gm, x, sigma, c, 1.0), gm(x, sigma, class_labels=c))
    torch.testing.assert_close(guided(gm, x, sigma, c, 0.0), gm(x, sigma))
    w = torch.tensor([0.0, 1.0, 2.0, 0.0, 1.0, 2.0])
    each = torch.cat([guided(gm, x[i : i + 1], sigma[i : i + 1], c[i : i + 1], float(w[i])) for i in range(6)])
    torch.testing.assert_close(guided(gm, x, sigma, c, w), each)


def test_a_guidance_model_needs_its_input_and_others_refuse_it():
    lcm = Precond(MLPNet(1, 2, hidden=16, depth=1, num_classes=3, time_inputs=2), "cm")
    plain = Precond(MLPNet(1, 2, hidden=16, depth=1, num_classes=3), "cm")
    x, c = torch.randn(2, 2, 1, 1), torch.tensor([0, 1])
    assert lcm.takes_guidance and not plain.takes_guidance
    with pytest.raises(ValueError, match="pass guidance=w"):
        lcm(x, 1.0, class_labels=c)
    with pytest.raises(ValueError, match="not distilled with a guidance input"):
        plain(x, 1.0, class_labels=c, guidance=2.0)
    torch.nn.init.normal_(lcm.net.emb_mlp2[0].weight)
    a, b = lcm(x, 1.0, class_labels=c, guidance=0.0), lcm(x, 1.0, class_labels=c, guidance=2.0)
    assert (a - b).abs().max() > 1e-4  # w reaches the network


def test_lcm_needs_a_teacher_and_labels():
    model = Precond(MLPNet(1, 2, hidden=16, depth=1, num_classes=3, time_inputs=2), "cm")
    with pytest.raises(ValueError, match="distils a teacher"):
        LCMLoss()(model, torch.zeros(4, 2, 1, 1), step=0)
    with pytest.raises(ValueError, match="needs class labels"):
        LCMLoss()(model, torch.zeros(4, 2, 1, 1), step=0, teacher=mixture())
    with pytest.raises(ValueError, match="guidance_min ≤ guidance_max"):
        LCMLoss(guidance_min=3.0, guidance_max=1.0)


def test_lcm_with_exact_teacher_samples_each_guidance_scale_in_one_step(seed, bound):
    """One network, distilled from the exact guided teacher with w ~ U[0, 1] per example, samples in one step
    the conditional distribution at w = 1 (component c) and, for the same label c, close to the unconditional
    mixture at w = 0: the guidance input, not the label alone, decides. A sampler that ignored w would put
    ≥ 0.98 of the label-0 samples on component 0 at w = 0 (a deviation of 0.48 from its weight 0.5; 0.7–0.8 for
    labels 1 and 2). The w = 0 end converges slowly (the guided map is steep in w near 0): after 1,200 steps
    the deviation is 0.17 at seed 0 and 0.09 after 2,400 steps. Measured with ``scripts/bound_spread.py`` (seeds
    0–3 × 1 and 2 threads, 8 runs): fraction off the label at w = 1 0.011–0.018 (bound 0.03: margin ≥ 1.67×);
    w = 0 deviations 0.17–0.20, 0.087–0.19, 0.068–0.15 for labels 0, 1, 2 (bound 0.3: ≥ 1.48×)."""
    torch.manual_seed(seed)
    gm = mixture()
    model = Precond(MLPNet(1, 2, hidden=96, depth=3, positional_scale=1.0, num_classes=3, time_inputs=2), "cm")
    loss = LCMLoss(num_scales=18, mu=0.0, solver="heun", distance="l2", guidance_min=0.0, guidance_max=1.0)

    def step_loss(step):
        x0, labels = gm.sample(512, labels=True)
        return loss(model, x0, step=step, target=model, teacher=gm, class_labels=labels)

    ema = train_exact(model, step_loss, 1200, 0.99)
    n = 3000
    labels = torch.arange(n) % 3
    for w in (1.0, 0.0):
        x = sample_multistep(
            ema, (n, 2, 1, 1), [80.0], generator=torch.Generator().manual_seed(2), class_labels=labels, guidance=w
        )
        k = gm.assign(x)
        if w == 1.0:  # the conditional: every sample on its label's component
            bound("w=1: fraction off the label's component", float((k != labels).float().mean()), 0.03)
        else:  # the unconditional mixture, whatever the label
            for c in range(3):
                props = torch.bincount(k[labels == c], minlength=3).float() / int((labels == c).sum())
                bound(f"w=0, label {c}: max |proportion - weight|", float((props - WEIGHTS).abs().max()), 0.3)


def test_lcm_through_the_loop_and_the_cli(tmp_path, one_thread, capsys):
    """The whole path on 8×8 digits: a class-conditional EDM teacher with label dropout, LCM from it (the student
    starts from the teacher; its guidance input starts at zero), then ``cmkit sample --guidance`` per class; the
    scale changes the images. The teacher samples under classifier-free guidance (two evaluations per step); a
    teacher without label dropout refuses a scale in one line, and is refused as an LCM teacher."""
    from cmkit.cli.main import main
    from cmkit.errors import CmkitError
    from cmkit.generate import sample_images
    from cmkit.load import load_model
    from cmkit.training.loop import train

    teacher = tmp_path / "teacher"
    train(tiny_config("digits-edm-cond", teacher, "train.steps=30", "loss.label_dropout=0.2"), progress=False)
    student = tmp_path / "lcm"
    overrides = ("train.steps=20", f"train.teacher={teacher}", f"train.init_from={teacher}", "train.lr=1e-3")
    result = train(tiny_config("digits-lcm", student, *overrides), progress=False)
    assert result["steps_run"] == 20 and math.isfinite(result["final_loss"])
    grids = sorted(p.name for p in (student / "samples").iterdir())
    assert any("1step" in g for g in grids), grids

    out = tmp_path / "w4.npz"
    argv = ["sample", "--model", str(student), "-n", "8", "--class", "3", "--guidance", "4", "--steps", "1"]
    assert main([*argv, "-o", "", "--npz", str(out)]) == 0
    assert np.load(out)["arr_0"].shape == (8, 8, 8, 1) and (np.load(out)["arr_1"] == 3).all()
    model, cfg = load_model(student)
    assert cfg.sample.guidance == 2.0 and model.takes_guidance
    x = {w: sample_images(model, cfg, 4, classes="3", guidance=w, progress=False).images for w in (1.0, 4.0)}
    assert (x[1.0] - x[4.0]).abs().max() > 0  # w reaches the sampled network (after 20 steps the change is small)
    # the label-dropout teacher itself samples under classifier-free guidance: w = 1 is the unguided teacher,
    # and every step evaluates the network on the doubled batch (conditional + null labels)
    tmodel, tcfg = load_model(teacher)
    rows = []
    tmodel.net.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    kw = dict(classes="3", sampler="heun", steps=3, progress=False)
    x1 = sample_images(tmodel, tcfg, 4, guidance=1.0, **kw).images
    assert rows == [4] * 5  # Heun with 3 levels: 5 evaluations of the 4 images
    rows.clear()
    x3 = sample_images(tmodel, tcfg, 4, guidance=3.0, **kw).images
    assert rows == [8] * 5 and (x3 - x1).abs().max() > 0  # each on the doubled batch
    assert torch.equal(x1, sample_images(tmodel, tcfg, 4, **kw).images)
    assert main(["sample", "--model", str(teacher), "-n", "2", "--guidance", "2", "-o", str(tmp_path / "t.png")]) == 0
    assert main(["sample", "--model", str(student), "-n", "2", "--guidance", "-1", "-o", str(tmp_path / "s.png")]) == 2
    assert "finite scale ≥ 0" in capsys.readouterr().err

    uncond = tmp_path / "uncond"
    train(tiny_config("digits-edm", uncond, "train.steps=2"), progress=False)
    assert main(["sample", "--model", str(uncond), "-n", "2", "--guidance", "2", "-o", str(tmp_path / "u.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs a class-conditional model trained with loss.label_dropout > 0" in err and "\n" not in err
    with pytest.raises(CmkitError, match="loss.method=lcm needs a class-conditional teacher"):
        train(tiny_config("digits-lcm", tmp_path / "lcm2", f"train.teacher={uncond}", "train.init_from="))


def test_lcm_config_rules(tmp_path):
    from cmkit.errors import CmkitError

    with pytest.raises(CmkitError, match="loss.method=lcm and model.time_inputs=2 go together"):
        tiny_config("digits-lcm", tmp_path, "model.time_inputs=1").validate()
    with pytest.raises(CmkitError, match="loss.method=lcm and model.time_inputs=2 go together"):
        tiny_config("digits-cd", tmp_path, "model.time_inputs=2").validate()
    with pytest.raises(CmkitError, match="needs a class-conditional model"):
        tiny_config("digits-lcm", tmp_path, "model.num_classes=0").validate()


def test_lcm_distils_a_text_teacher_guided_by_the_empty_prompt_into_a_lora_student():
    """The text path, LCM-LoRA on Stable Diffusion in miniature: the guided text denoiser is the conditional one at
    w = 1 and the empty prompt's at w = 0; in the loss the teacher sees each prompt beside the empty prompt, and a
    student without a guidance input (an LCM denoiser over the teacher's UNet plus LoRA adapters) gets gradients in
    its adapters only."""
    import diffusers
    from conftest import tiny_text_unet

    from cmkit.discrete_vp import DiscreteVPDenoiser, LCMDenoiser
    from cmkit.guidance import guided_text
    from cmkit.nets.lora import LCM_LORA_TARGETS, add_lora

    alphas = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
    unet = tiny_text_unet(seed=0)
    seen = []

    class Spy(DiscreteVPDenoiser):
        def forward(self, x, sigma, **cond):
            seen.append(cond["encoder_hidden_states"])
            return super().forward(x, sigma, **cond)

    teacher = Spy(unet, alphas).requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    x, text, null = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 5, 12, generator=g), torch.randn(1, 5, 12)
    sigma = torch.tensor([0.5, 2.0, 9.0])
    with torch.no_grad():
        torch.testing.assert_close(
            guided_text(teacher, x, sigma, text, null, 1.0), teacher(x, sigma, encoder_hidden_states=text)
        )
        torch.testing.assert_close(
            guided_text(teacher, x, sigma, text, null, 0.0),
            teacher(x, sigma, encoder_hidden_states=null.expand_as(text)),
        )
    student_unet = copy.deepcopy(unet)
    add_lora(student_unet, 2, targets=LCM_LORA_TARGETS)
    student = LCMDenoiser(student_unet, alphas, "epsilon", 10.0).train()
    torch.manual_seed(0)
    with torch.no_grad():  # B = 0 at the start: give the adapters a function, so that A gets a gradient too
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.01)
    loss = LCMLoss(num_scales=10, grid="teacher", solver="euler", mu=0.0, guidance_min=2.0, guidance_max=6.0)
    seen.clear()
    value = loss(student, x, step=0, teacher=teacher, encoder_hidden_states=text, null_text=null).mean()
    assert len(seen) == 1 and torch.equal(seen[0], torch.cat([text, null.expand_as(text)]))
    value.backward()
    grads = {n: p.grad for n, p in student.named_parameters() if p.requires_grad}
    assert grads and all("lora" in n.lower() for n in grads), [n for n in grads if "lora" not in n.lower()][:3]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads.values())
    assert all(gr.abs().sum() > 0 for gr in grads.values())  # every adapter, A and B, is on the path
    with pytest.raises(ValueError, match="empty prompt"):
        loss(student, x, step=0, teacher=teacher, encoder_hidden_states=text)
