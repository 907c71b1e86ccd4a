"""LoRA adapters (``cmkit.nets.lora``): the adapted network starts equal to the original, merging is exact, files
round-trip, diffusers loads cmkit's file into its own UNet and computes the same function, and a LoRA for
another network is one error line. Tiny networks; seconds on a CPU."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_config, tiny_text_unet
from torch import nn

from cmkit.errors import CmkitError
from cmkit.nets.lora import (
    LCM_LORA_TARGETS,
    LoRALayer,
    add_lora,
    load_lora,
    lora_layers,
    merge_lora,
    read_lora,
    save_lora,
)

diffusers = pytest.importorskip("diffusers")


def cmkit_unet() -> nn.Module:
    torch.manual_seed(0)
    return tiny_config("digits-edm-cond", "unused", "model.attn_resolutions=4").model.build().eval()


def randomise(model: nn.Module, seed: int = 1) -> None:
    """Non-zero B (and A) so the adapters change the function."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) * 0.3)
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.3)


def cm_inputs():
    g = torch.Generator().manual_seed(2)
    return torch.randn(3, 1, 8, 8, generator=g), torch.tensor([0.1, 1.0, 20.0]), torch.tensor([1, 4, -1])


def test_adapters_start_at_zero_train_alone_and_merge_exactly():
    net = cmkit_unet()
    x, sigma, y = cm_inputs()
    with torch.no_grad():
        before = net(x, sigma, class_labels=y)
    names = add_lora(net, rank=4, alpha=8)
    kinds = {type(m.base) for m in lora_layers(net).values()}
    assert kinds == {nn.Linear, nn.Conv2d} and len(names) > 10
    with torch.no_grad():
        assert torch.equal(net(x, sigma, class_labels=y), before)  # B = 0: the original function
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    randomise(net)
    with torch.no_grad():
        adapted = net(x, sigma, class_labels=y)
        assert (adapted - before).abs().max() > 1e-2
        merged = merge_lora(copy.deepcopy(net))
        assert not lora_layers(merged)
        assert torch.allclose(merged(x, sigma, class_labels=y), adapted, atol=1e-5)


def test_a_file_round_trips_into_a_fresh_network(tmp_path):
    net = cmkit_unet()
    add_lora(net, rank=3, alpha=6)
    randomise(net)
    path = save_lora(net, tmp_path / "lora.safetensors")
    fresh = cmkit_unet()
    assert load_lora(fresh, path) == sorted(lora_layers(net))
    x, sigma, y = cm_inputs()
    with torch.no_grad():
        assert torch.allclose(fresh(x, sigma, class_labels=y), net(x, sigma, class_labels=y), atol=1e-6)
    assert all(m.scale == 1.0 for m in lora_layers(fresh).values())  # α/r folded into B in the file


def test_diffusers_loads_the_file_into_its_unet_and_computes_the_same_function(tmp_path):
    """cmkit adapts a diffusers UNet2DConditionModel with LCM-LoRA's targets and writes the file; diffusers'
    loader (``StableDiffusionPipeline.lora_state_dict`` + ``load_lora_into_unet``, what ``load_lora_weights``
    runs) loads it into a fresh copy of the UNet through PEFT: the same outputs."""
    pytest.importorskip("peft")
    from diffusers import StableDiffusionPipeline

    unet = tiny_text_unet()
    names = add_lora(unet, rank=2, alpha=4, targets=LCM_LORA_TARGETS)
    assert any(n.endswith("attn2.to_k") for n in names) and any(n.endswith("resnets.0.conv1") for n in names)
    randomise(unet)
    path = save_lora(unet, tmp_path / "pytorch_lora_weights.safetensors")
    state, alphas = StableDiffusionPipeline.lora_state_dict(str(path))
    theirs = tiny_text_unet()
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet=theirs)
    g = torch.Generator().manual_seed(3)
    x, t, text = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900]), torch.randn(2, 3, 12, generator=g)
    with torch.no_grad():
        ours = unet(x, t, text).sample
        plain = tiny_text_unet()(x, t, text).sample
        assert (ours - plain).abs().max() > 1e-2
        assert torch.allclose(theirs(x, t, text).sample, ours, atol=1e-5)


def test_a_lora_for_another_network_or_a_bad_file_is_one_error(tmp_path):
    net = cmkit_unet()
    add_lora(net, rank=2)
    path = save_lora(net, tmp_path / "a.safetensors")
    wider = tiny_config("digits-edm-cond", "unused", "model.model_channels=24").model.build()
    with pytest.raises(CmkitError, match="a LoRA for another network: .* shapes"):
        load_lora(wider, path)
    assert not lora_layers(wider)  # nothing was changed
    with pytest.raises(CmkitError, match="a LoRA for another network: .* not an adaptable layer"):
        load_lora(tiny_text_unet(), path)
    with pytest.raises(CmkitError, match="not a LoRA key"):
        load_lora(cmkit_unet(), {"unet.x.weight": torch.zeros(1)})
    (tmp_path / "cut.safetensors").write_bytes(path.read_bytes()[:100])
    with pytest.raises(CmkitError, match="cannot read LoRA file"):
        read_lora(tmp_path / "cut.safetensors")
    with pytest.raises(CmkitError, match="no layer of this network matches"):
        add_lora(cmkit_unet(), 2, targets=("to_q",))
    with pytest.raises(CmkitError, match="no LoRA adapters"):
        save_lora(cmkit_unet(), tmp_path / "none.safetensors")
    with pytest.raises(CmkitError, match="rank must be at least 1"):
        LoRALayer(nn.Linear(2, 2), 0)


def test_a_lora_run_trains_only_low_rank_updates_and_exports_the_merged_model_and_the_adapters(teacher_dir, tmp_path):
    """CD with ``train.lora_rank=2`` from the teacher's weights: the exported network is the teacher's plus s·B·A
    of ``lora.safetensors`` in every adapted layer (rank ≤ 2) and the teacher's elsewhere; the file applied to the
    teacher's weights gives the exported network."""
    from cmkit.load import init_from, load_denoiser
    from cmkit.training.loop import train

    out = tmp_path / "cd-lora"
    overrides = [f"train.teacher={teacher_dir}", f"train.init_from={teacher_dir}", "train.lora_rank=2"]
    train(
        tiny_config(
            "digits-cd",
            out,
            *overrides,
            "train.steps=4",
            "train.ema_rates=0.5",
            "train.lr=1e-2",
            "train.optimizer=adam",
            "train.ckpt_every=2",  # two exports: the second replaces a model directory that holds lora.safetensors
        ),
        progress=False,
    )
    student, scfg = load_denoiser(out)
    teacher, _ = load_denoiser(teacher_dir)
    lora = read_lora(out / "model" / "lora.safetensors")
    t_params = dict(teacher.named_parameters())
    adapted = 0
    for name, p in student.named_parameters():
        key = f"unet.{name.removesuffix('.weight')}"
        if f"{key}.lora_A.weight" in lora:
            b, a = lora[f"{key}.lora_B.weight"].flatten(1), lora[f"{key}.lora_A.weight"].flatten(1)
            assert b.shape[1] == 2
            delta = (b.double() @ a.double()).view(p.shape)
            assert torch.allclose((p - t_params[name]).double(), delta, atol=1e-6), name
            adapted += bool(delta.abs().max() > 1e-4)  # this adapter trained
        else:
            assert torch.equal(p, t_params[name]), name  # biases, norms, embeddings: frozen
    assert adapted > 5
    rebuilt = scfg.model.build()
    init_from(rebuilt, str(teacher_dir), scfg.model)
    load_lora(rebuilt, lora)
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 5.0])
    with torch.no_grad():
        assert torch.allclose(rebuilt.eval()(x, sigma), student(x, sigma), atol=1e-5)
