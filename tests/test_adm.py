"""The ADM UNet of the CM paper's released models (cmkit/nets/adm.py): exact sizes of the released
configurations, the attention head layout, the noise input, conditioning and the CM boundary condition."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import check_boundary_and_bf16

from cmkit.nets.adm import ADMUNet
from cmkit.training.presets import get_config

# (config, parameters, tensors) of the released checkpoints (cm/unet.py with the launch commands' flags)
RELEASED = {
    "imagenet64": (
        dict(
            img_resolution=64,
            model_channels=192,
            channel_mult=(1, 2, 3, 4),
            num_blocks=3,
            attn_resolutions=(32, 16, 8),
            num_classes=1000,
            head_channels=64,
            scale_shift=True,
        ),
        295_899_267,
        541,
    ),
    "lsun256": (
        dict(
            img_resolution=256,
            model_channels=256,
            channel_mult=(1, 1, 2, 2, 4, 4),
            num_blocks=2,
            attn_resolutions=(32, 16, 8),
            num_classes=0,
            head_channels=64,
            scale_shift=False,
        ),
        526_304_771,
        566,
    ),
}
TINY = dict(
    img_resolution=16, model_channels=32, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,), head_channels=16
)


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_configurations_have_the_reference_sizes(name):
    kwargs, params, tensors = RELEASED[name]
    with torch.device("meta"):
        net = ADMUNet(**kwargs)
    assert sum(p.numel() for p in net.parameters()) == params
    assert len(net.state_dict()) == tensors
    keys = net.state_dict()
    # the released key layout: ADM's module tree, no cmkit-only names
    assert "time_embed.0.weight" in keys and "out.2.weight" in keys and "middle_block.1.qkv.weight" in keys
    assert ("label_emb.weight" in keys) == bool(kwargs["num_classes"])
    emb = 2 if kwargs["scale_shift"] else 1
    assert keys["input_blocks.1.0.emb_layers.1.weight"].shape == (
        emb * kwargs["model_channels"],
        4 * kwargs["model_channels"],
    )


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_the_shape_of_a_released_state_dict_is_read_from_its_keys(name):
    from cmkit.formats.adm_weights import adm_config_from_state, diffusers_to_openai, openai_to_diffusers

    kwargs, _, tensors = RELEASED[name]
    with torch.device("meta"):
        state = ADMUNet(**kwargs).state_dict()
    cfg = adm_config_from_state(state)  # the image side from channel_mult, as create_model sets it
    assert {k: cfg[k] for k in kwargs} == {k: (tuple(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()}
    levels = len(kwargs["channel_mult"])
    mapped = openai_to_diffusers(state)
    assert len(mapped) == tensors + len([k for k in state if ".qkv." in k]) * 2  # qkv → to_q, to_k, to_v
    assert diffusers_to_openai(mapped, levels, kwargs["num_blocks"]).keys() == state.keys()


def reference_attention(block, x):
    """Attention written out with einsum: qkv channels (three, heads, head_dim), q and k scaled by d^-1/4."""
    b, c, h, w = x.shape
    qkv = block.qkv(block.norm(x)).reshape(b, 3 * c, h * w)
    q, k, v = qkv.chunk(3, dim=1)
    d = c // block.heads
    scale = 1 / math.sqrt(math.sqrt(d))
    weight = torch.einsum(
        "bct,bcs->bts", (q * scale).reshape(b * block.heads, d, -1), (k * scale).reshape(b * block.heads, d, -1)
    ).softmax(-1)
    a = torch.einsum("bts,bcs->bct", weight, v.reshape(b * block.heads, d, -1)).reshape(b, c, h, w)
    return x + block.proj_out(a)


def test_attention_reads_qkv_as_three_heads_dim():
    torch.manual_seed(0)
    net = ADMUNet(**TINY)
    block = net.middle_block[1]
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 64, 4, 4)
    with torch.no_grad():
        expected = block(x)
        torch.testing.assert_close(expected, reference_attention(block, x), atol=1e-5, rtol=1e-5)
        # the same weights read in guided-diffusion's legacy (heads, three, dim) order give another output
        # (the released checkpoints run "silently 25-43% off" that way): the layout matters and is this one
        legacy = block.qkv.weight.reshape(block.heads, 3, -1, 64, 1, 1).transpose(0, 1).reshape(192, 64, 1, 1)
        block.qkv.weight.copy_(legacy)
        block.qkv.bias.copy_(block.qkv.bias.reshape(block.heads, 3, -1).transpose(0, 1).reshape(-1))
        assert (block(x) - expected).abs().max() > 1e-2


def test_noise_input_is_250_ln_sigma_and_labels_condition():
    torch.manual_seed(0)
    net = ADMUNet(**TINY, num_classes=5)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    sigma = torch.tensor([0.3, 7.0])
    t = 1000 * 0.25 * torch.log(sigma + 1e-44)  # the reference's rescaled_t
    freqs = torch.exp(-math.log(10000) * torch.arange(16) / 16)
    args = t[:, None] * freqs[None]
    torch.testing.assert_close(net.embed(sigma.log() / 4), torch.cat([args.cos(), args.sin()], 1))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        a, b = net(x, sigma.log() / 4, torch.tensor([0, 1])), net(x, sigma.log() / 4, torch.tensor([0, 2]))
    assert torch.equal(a[0], b[0]) and not torch.allclose(a[1], b[1])
    with pytest.raises(ValueError, match="class-conditional"):
        net(x, sigma.log() / 4)


def test_adm_consistency_model_from_the_config_keeps_the_boundary_and_runs_in_bf16():
    cfg = get_config(
        "digits-ict",
        [
            "model.arch=adm",
            "model.model_channels=32",
            "model.channel_mult=1,2",
            "model.attn_resolutions=4",
            "model.head_channels=16",
        ],
    )
    check_boundary_and_bf16(cfg)


def test_adm_config_rules():
    from cmkit.errors import CmkitError

    with pytest.raises(CmkitError, match="GroupNorm"):
        get_config("digits-ict", ["model.arch=adm", "model.model_channels=16"])
    with pytest.raises(CmkitError, match="positionally"):
        get_config("digits-ict", ["model.arch=adm", "model.embedding=fourier"])


# --- released weights: openai .pt and diffusers UNet2DModel ------------------------------------------

diffusers = pytest.importorskip("diffusers")


def hub_like_unet(scale_shift: bool, classes: int | None):
    """A tiny UNet2DModel with the Hub configuration of openai/diffusers-cd_imagenet64_l2 (or LSUN's)."""
    return diffusers.UNet2DModel(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        layers_per_block=2,
        block_out_channels=(32, 64, 64),
        down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"),
        downsample_type="resnet",
        upsample_type="resnet",
        attention_head_dim=16,
        norm_num_groups=32,
        attn_norm_num_groups=32,
        resnet_time_scale_shift="scale_shift" if scale_shift else "default",
        num_class_embeds=classes,
        flip_sin_to_cos=True,
        freq_shift=0,
    ).eval()


@pytest.mark.parametrize("scale_shift,classes", [(True, 10), (False, None)])
def test_equals_diffusers_unet2dmodel_and_round_trips(scale_shift, classes, tmp_path):
    from cmkit.cli.main import main
    from cmkit.formats.adm_weights import diffusers_to_openai, openai_to_diffusers
    from cmkit.load import load_model

    torch.manual_seed(0)
    d = hub_like_unet(scale_shift, classes)
    # attention weights large enough that the head split matters (with small ones attention is near-uniform
    # and 1 head of 64 or 4 of 16 give the same output, which hid a wrong head width)
    sd = {
        k: torch.randn_like(v) * (0.3 if "attentions" in k and k.endswith("weight") else 0.05)
        for k, v in d.state_dict().items()
    }
    d.load_state_dict(sd)
    openai = diffusers_to_openai(sd, levels=3, blocks=2)
    assert openai_to_diffusers(openai).keys() == sd.keys()
    assert all(torch.equal(openai_to_diffusers(openai)[k], v) for k, v in sd.items())  # diffusers → openai → back
    # openai .pt → cmkit model directory → the same function as diffusers' UNet2DModel
    torch.save(openai, tmp_path / "ckpt.pt")
    d.save_pretrained(tmp_path / "diffusers")
    x, sigma = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 20.0])
    y = torch.tensor([1, 7]) if classes else None
    with torch.no_grad():
        expected = d(x, 250 * sigma.log(), class_labels=y).sample
    assert main(["convert", str(tmp_path / "ckpt.pt"), "-o", str(tmp_path / "x"), "--image-size", "16"]) == 2
    assert (
        main(
            [
                "convert",
                str(tmp_path / "ckpt.pt"),
                "-o",
                str(tmp_path / "x"),
                "--image-size",
                "16",
                "--head-channels",
                "48",
            ]
        )
        == 2
    )  # 48 does not divide the 64 attention channels
    torch.save(openai, tmp_path / "wrong.pt")
    assert (
        main(
            [
                "convert",
                str(tmp_path / "wrong.pt"),
                "-o",
                str(tmp_path / "wrong"),
                "--image-size",
                "16",
                "--head-channels",
                "64",
            ]
        )
        == 0
    )
    with torch.no_grad():  # the wrong head width is a different function: what the refusal above prevents
        wrong = load_model(tmp_path / "wrong")[0].net(x, sigma.log() / 4, y)
    assert (wrong - expected).abs().max() > 1e-3
    for src, extra in ((tmp_path / "ckpt.pt", ["--head-channels", "16"]), (tmp_path / "diffusers", [])):
        out = tmp_path / f"cm-{src.stem}"
        args = ["convert", str(src), "-o", str(out), "--image-size", "16", *extra]
        assert main(args) == 0
        model, cfg = load_model(out)
        assert cfg.model.arch == "adm" and cfg.model.scale_shift == scale_shift
        with torch.no_grad():
            got = model.net(x, sigma.log() / 4, y)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(model(x, cfg.model.sigma_min, **({"class_labels": y} if classes else {})), x)


def test_released_file_errors_are_one_line(tmp_path, capsys):
    from cmkit.cli.main import main

    class Evil:  # a pickle that would need full unpickling (it could run code)
        def __reduce__(self):
            return (print, ("ran",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    net = ADMUNet(**TINY)
    sd = net.state_dict()
    torch.save({k: v for k, v in sd.items() if k != "out.2.bias"}, tmp_path / "missing.pt")
    torch.save({**sd, "out.2.weight": torch.zeros(3, 32, 1, 1)}, tmp_path / "shape.pt")
    for name, msg in (
        ("evil.pt", "needs full unpickling"),
        ("missing.pt", "missing out.2.bias"),
        ("shape.pt", "out.2.weight is (3, 32, 1, 1), expected (3, 32, 3, 3)"),
        ("none.pt", "checkpoint not found"),
    ):
        assert (
            main(
                [
                    "convert",
                    str(tmp_path / name),
                    "-o",
                    str(tmp_path / "o"),
                    "--image-size",
                    "16",
                    "--head-channels",
                    "16",
                ]
            )
            == 2
        )
        err = capsys.readouterr()
        assert msg in err.err and len(err.err.strip().splitlines()) == 1 and "ran" not in err.out, err.err


def test_class_conditional_sampling_takes_labels_and_is_batch_size_independent(tmp_path, capsys):
    import numpy as np

    from cmkit.cli.main import main
    from cmkit.formats.model_dir import save_model_dir

    cfg = get_config(
        "digits-ict",
        [
            "model.arch=adm",
            "model.model_channels=32",
            "model.channel_mult=1,2",
            "model.attn_resolutions=4",
            "model.head_channels=16",
            "model.num_classes=10",
        ],
    )
    model = cfg.model.build()
    torch.manual_seed(0)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    save_model_dir(tmp_path / "m", model, "denoiser", cfg.to_dict())
    runs = {}
    for bs, cls in ((5, "3,7"), (2, "3,7"), (5, None)):
        out = tmp_path / f"s{bs}{cls}.npz"
        args = [
            "sample",
            "--model",
            str(tmp_path / "m"),
            "-n",
            "5",
            "--batch-size",
            str(bs),
            "--npz",
            str(out),
            "-o",
            "",
        ]
        assert main(args + (["--class", cls] if cls else [])) == 0
        z = np.load(out)
        runs[(bs, cls)] = z
    assert runs[(5, "3,7")]["arr_1"].tolist() == [3, 7, 3, 7, 3]
    assert np.array_equal(runs[(5, "3,7")]["arr_0"], runs[(2, "3,7")]["arr_0"])  # per-sample seeds
    assert not np.array_equal(runs[(5, None)]["arr_1"], runs[(5, "3,7")]["arr_1"])  # random labels otherwise
    capsys.readouterr()
    assert (
        main(
            [
                "sample",
                "--model",
                str(tmp_path / "m"),
                "-n",
                "2",
                "--npz",
                str(tmp_path / "x.npz"),
                "-o",
                "",
                "--class",
                "10",
            ]
        )
        == 2
    )
    assert "must lie in [0, 9]" in capsys.readouterr().err
    assert (
        main(["sample", "--model", "fmnist-cd", "-n", "2", "--npz", str(tmp_path / "y.npz"), "-o", "", "--class", "1"])
        == 2
    )
    assert "unconditional" in capsys.readouterr().err


def test_a_released_model_samples_two_steps_on_its_published_sigma(tmp_path):
    from cmkit.cli.main import main
    from cmkit.generate import multistep_sigmas
    from cmkit.load import load_model
    from cmkit.schedules import karras_sigmas, training_grid

    torch.save(ADMUNet(**TINY).state_dict(), tmp_path / "cd_imagenet64_l2.pt")
    assert (
        main(["convert", str(tmp_path / "cd_imagenet64_l2.pt"), "-o", str(tmp_path / "m"), "--image-size", "16"]) == 0
    )
    _, cfg = load_model(tmp_path / "m")
    assert training_grid(cfg) == karras_sigmas(40).tolist()  # CD on N = 40
    two = multistep_sigmas(cfg, 2)
    assert two[0] == 80.0 and abs(two[1] - 1.3824) < 1e-4  # launch.sh --ts 0,22,39
    assert abs(karras_sigmas(40)[22].item() - 1.3824) < 1e-4


def test_a_cmkit_adm_model_opens_in_diffusers_consistency_model_pipeline(tmp_path):
    from cmkit.cli.main import main
    from cmkit.load import load_model

    torch.manual_seed(0)
    net = ADMUNet(**TINY, num_classes=4)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    torch.save(net.state_dict(), tmp_path / "cd_imagenet64_l2.pt")
    assert (
        main(["convert", str(tmp_path / "cd_imagenet64_l2.pt"), "-o", str(tmp_path / "m"), "--image-size", "16"]) == 0
    )
    assert main(["export-diffusers", "--model", str(tmp_path / "m"), "-o", str(tmp_path / "pipe")]) == 0
    pipe = diffusers.ConsistencyModelPipeline.from_pretrained(tmp_path / "pipe")
    model, cfg = load_model(tmp_path / "m")
    z = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 3])
    theirs = pipe(batch_size=2, class_labels=labels, num_inference_steps=1, latents=z, output_type="pt").images
    with torch.no_grad():
        ours = model(80.0 * z, 80.0, class_labels=labels).clamp(-1, 1)
    torch.testing.assert_close(theirs, (ours / 2 + 0.5).clamp(0, 1), atol=1e-5, rtol=1e-5)  # output_type="pt": NCHW
