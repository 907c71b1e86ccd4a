"""The ADM UNet of the CM paper's released models (cmkit/nets/adm.py): exact sizes of the released
configurations, the attention head layout, the noise input, conditioning and the CM boundary condition."""
from __future__ import annotations

import math

import pytest
import torch

from cmkit.nets.adm import ADMUNet
from cmkit.presets import get_config

# (config, parameters, tensors) of the released checkpoints (cm/unet.py with the launch commands' flags)
RELEASED = {
    "imagenet64": (dict(img_resolution=64, model_channels=192, channel_mult=(1, 2, 3, 4), num_blocks=3,
                        attn_resolutions=(32, 16, 8), num_classes=1000, head_channels=64, scale_shift=True),
                   295_899_267, 541),
    "lsun256": (dict(img_resolution=256, model_channels=256, channel_mult=(1, 1, 2, 2, 4, 4), num_blocks=2,
                     attn_resolutions=(32, 16, 8), num_classes=0, head_channels=64, scale_shift=False),
                526_304_771, 566),
}
TINY = dict(img_resolution=16, model_channels=32, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,),
            head_channels=16)


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
    assert keys["input_blocks.1.0.emb_layers.1.weight"].shape == (emb * kwargs["model_channels"],
                                                                  4 * kwargs["model_channels"])


def reference_attention(block, x):
    """Attention written out with einsum: qkv channels (three, heads, head_dim), q and k scaled by d^-1/4."""
    b, c, h, w = x.shape
    qkv = block.qkv(block.norm(x)).reshape(b, 3 * c, h * w)
    q, k, v = qkv.chunk(3, dim=1)
    d = c // block.heads
    scale = 1 / math.sqrt(math.sqrt(d))
    weight = torch.einsum("bct,bcs->bts", (q * scale).reshape(b * block.heads, d, -1),
                          (k * scale).reshape(b * block.heads, d, -1)).softmax(-1)
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
    cfg = get_config("digits-ict", ["model.arch=adm", "model.model_channels=32", "model.channel_mult=1,2",
                                    "model.attn_resolutions=4", "model.head_channels=16"])
    model = cfg.model.build().eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x, cfg.model.sigma_min), x)  # f(x, σ_min) = x exactly
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x, 2.0)
    assert y.dtype == torch.float32 and torch.isfinite(y).all()


def test_adm_config_rules():
    from cmkit.errors import CmkitError

    with pytest.raises(CmkitError, match="GroupNorm"):
        get_config("digits-ict", ["model.arch=adm", "model.model_channels=16"])
    with pytest.raises(CmkitError, match="positionally"):
        get_config("digits-ict", ["model.arch=adm", "model.embedding=fourier"])
