"""Activation checkpointing (model.checkpointing): the same gradients, with far fewer activations kept."""

import pytest
import torch

from cmkit.config import apply_overrides
from cmkit.denoiser_config import Config
from cmkit.errors import CmkitError
from cmkit.nets.blocks import Block

ARCHS = {
    "unet": ["model.attn_resolutions=8"],
    "adm": ["model.attn_resolutions=8", "model.head_channels=16", "model.model_channels=32"],
    "ddpmpp": ["model.attn_resolutions=8"],
    "ncsnpp": ["model.attn_resolutions=8", "model.embedding=fourier"],
    "dhariwal": ["model.attn_resolutions=8", "model.model_channels=32"],
}


def build(arch, checkpointing):
    cfg = apply_overrides(
        Config(),
        [
            f"model.arch={arch}",
            "model.img_resolution=16",
            "model.in_channels=3",
            "model.model_channels=16",
            "model.channel_mult=1,2",
            "model.num_blocks=1",
            "model.dropout=0.1",
            "model.num_classes=3",
            f"model.checkpointing={checkpointing}",
            *ARCHS[arch],
        ],
    )
    cfg.validate()
    torch.manual_seed(0)
    return cfg.model.build().train()


def saved_bytes_and_grads(model):
    """One training forward and backward (dropout on, fixed seed): bytes autograd saved, and the gradients."""
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    torch.manual_seed(1)
    x, sigma, labels = torch.randn(4, 3, 16, 16), torch.tensor([0.1, 1.0, 5.0, 80.0]), torch.tensor([0, 1, 2, 0])
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x, sigma, class_labels=labels).square().mean()
    loss.backward()
    return saved[0], [p.grad for p in model.parameters()]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_checkpointing_gives_the_same_gradients_and_keeps_fewer_activations(arch, one_thread):
    plain, checked = build(arch, False), build(arch, True)
    checked.load_state_dict(plain.state_dict())
    assert sum(isinstance(m, Block) and m.checkpointing for m in checked.modules()) >= 4
    kept, g_plain = saved_bytes_and_grads(plain)
    kept_ckpt, g_ckpt = saved_bytes_and_grads(checked)
    for a, b in zip(g_plain, g_ckpt):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)  # dropout masks replayed: the same gradient
    assert kept_ckpt < 0.5 * kept, (kept_ckpt, kept)
    with torch.no_grad():  # sampling is unaffected
        x, sigma, labels = torch.randn(2, 3, 16, 16), torch.tensor([1.0, 2.0]), torch.tensor([1, 2])
        assert torch.equal(plain.eval()(x, sigma, class_labels=labels), checked.eval()(x, sigma, class_labels=labels))


def test_checkpointing_an_mlp_is_refused():
    with pytest.raises(CmkitError, match="the mlp has none"):
        apply_overrides(Config(), ["model.arch=mlp", "model.checkpointing=true"]).validate()


@pytest.mark.parametrize("layout", ["three", "interleaved"])
def test_pixel_attention_equals_softmax_attention_through_the_convolutions(layout):
    """The blocks' attention (1×1 projections as matmuls, fused kernel) is softmax(qᵀk/√d)·v computed the plain way
    through the 1×1 convolutions, for both orders of the qkv channels; gradients agree too."""
    from torch import nn

    from cmkit.nets.blocks import pixel_attention

    torch.manual_seed(0)
    b, c, h, w, heads = 2, 16, 5, 3, 4
    qkv, proj = nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)
    x = torch.randn(b, c, h, w, dtype=torch.float64, requires_grad=True)
    qkv, proj = qkv.double(), proj.double()
    out = pixel_attention(x, qkv, proj, heads, layout)
    y = qkv(x).reshape(b, 3, heads, c // heads, h * w)  # (three, heads, head_dim)
    if layout == "interleaved":  # (heads, head_dim, three)
        y = qkv(x).reshape(b, heads, c // heads, 3, h * w).permute(0, 3, 1, 2, 4)
    q, k, v = y.unbind(1)  # (B, heads, d, HW)
    weights = torch.softmax(q.transpose(-1, -2) @ k / (c // heads) ** 0.5, dim=-1)  # (B, heads, HW, HW)
    want = proj((v @ weights.transpose(-1, -2)).reshape(b, c, h, w))
    assert torch.allclose(out, want, atol=1e-12)
    (g,) = torch.autograd.grad(out.square().sum(), x)
    (g_want,) = torch.autograd.grad(want.square().sum(), x)
    assert torch.allclose(g, g_want, atol=1e-10)
    with pytest.raises(ValueError, match="unknown qkv layout"):
        pixel_attention(x, qkv, proj, heads, "heads-first")
