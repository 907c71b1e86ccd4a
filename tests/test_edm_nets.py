"""EDM's networks in cmkit (cmkit/nets/edm.py): exact sizes and key layouts of EDM's published configurations,
the attention layout, embeddings, resampling, VP/VE preconditioning in closed form, the CM boundary, presets."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import check_boundary_and_bf16

from cmkit.errors import CmkitError
from cmkit.nets.edm import DDPMpp, DhariwalUNet, NCSNpp, VEPrecond, VPPrecond
from cmkit.training.presets import get_config

# (parameters, buffer elements, tensors, sha256[:16] of the sorted "key:shape" lines) of EDM's constructors as its
# train.py builds them for CIFAR-10 (--arch ddpmpp / ncsnpp, augment_dim=9) and ImageNet-64 (--arch adm):
# reference doc frontier-and-checkpoints §5; the digests were computed from NVlabs/edm training/networks.py.
REFERENCE = {
    ("ddpmpp", 0): (55_733_891, 32, 425, "f56dd8a448936bba"),
    ("ddpmpp", 10): (55_735_299, 32, 427, "1d9e29d8bdd329c2"),
    ("ncsnpp", 0): (56_397_827, 288, 432, "4f2c86c11f2c4326"),
    ("ncsnpp", 10): (56_400_643, 288, 434, "ec74fe1a96987b95"),
    ("dhariwal", 1000): (295_899_267, 48, 553, "10c58e97ab45efbf"),
}
CLASSES = {"ddpmpp": DDPMpp, "ncsnpp": NCSNpp, "dhariwal": DhariwalUNet}


def digest(net: torch.nn.Module) -> str:
    lines = "\n".join(f"{k}:{tuple(v.shape)}" for k, v in sorted(net.state_dict().items()))
    return hashlib.sha256(lines.encode()).hexdigest()[:16]


@pytest.mark.parametrize("arch,classes", sorted(REFERENCE))
def test_published_configurations_have_edms_sizes_and_keys(arch, classes):
    params, buffers, tensors, keys = REFERENCE[(arch, classes)]
    kwargs = {"num_classes": classes, "augment_dim": 9 if arch != "dhariwal" else 0}
    if arch == "dhariwal":
        kwargs.update(img_resolution=64)
    with torch.device("meta"):
        net = CLASSES[arch](**kwargs)
    assert sum(p.numel() for p in net.parameters()) == params
    params_by_name = dict(net.named_parameters())  # the buffers a state dict holds (the embedding's frequencies
    assert sum(v.numel() for k, v in net.state_dict().items() if k not in params_by_name) == buffers  # are not)
    assert len(net.state_dict()) == tensors
    assert digest(net) == keys


def test_without_augmentation_input_the_sizes_drop_by_its_weights():
    with torch.device("meta"):
        assert sum(p.numel() for p in DDPMpp().parameters()) == 55_732_739
        assert sum(p.numel() for p in NCSNpp().parameters()) == 56_395_523
        net = NCSNpp()
    sd = net.state_dict()
    assert sd["map_noise.freqs"].shape == (128,)  # Fourier features of width 2·128
    assert sd["enc.16x16_aux_residual.weight"].shape == (256, 3, 3, 3)  # the residual input pyramid
    assert sd["enc.16x16_block0.qkv.weight"].shape == (768, 256, 1, 1)


def test_resampling_filters_are_edms_buffers_and_closed_forms():
    from cmkit.nets.edm import Conv2d

    f = torch.tensor([1.0, 3, 3, 1])
    conv = Conv2d(4, 4, 0, down=True, resample_filter=(1, 3, 3, 1))
    torch.testing.assert_close(conv.resample_filter[0, 0], torch.outer(f, f) / 64)
    x = torch.randn(2, 4, 8, 8)
    # the [1, 1] filter: 2×2 average pooling down, nearest-neighbour ×2 up
    torch.testing.assert_close(Conv2d(4, 4, 0, down=True)(x), F.avg_pool2d(x, 2))
    torch.testing.assert_close(Conv2d(4, 4, 0, up=True)(x), F.interpolate(x, scale_factor=2, mode="nearest"))
    assert Conv2d(4, 4, 3).resample_filter is None and "resample_filter" not in Conv2d(4, 4, 3).state_dict()


def test_attention_reads_qkv_as_heads_dim_three():
    """EDM's layout (heads, head_dim, 3) interleaved, softmax(qᵀk/√d): written out here with einsum."""
    from cmkit.nets.edm import UNetBlock

    torch.manual_seed(0)
    block = UNetBlock(64, 64, 32, attention=True, channels_per_head=16).eval()  # 4 heads (DhariwalUNet's rule)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x, emb = torch.randn(2, 64, 4, 4), torch.randn(2, 32)
    with torch.no_grad():
        out = block(x, emb)
        heads = block.num_heads
        block.num_heads = 0
        r = block(x, emb)  # the residual part alone
        block.num_heads = heads
        qkv = block.qkv(block.norm2(r)).reshape(2, heads, 16, 3, 16)
        q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
        w = torch.einsum("bhcq,bhck->bhqk", q, k / math.sqrt(16)).softmax(-1)
        a = torch.einsum("bhqk,bhck->bhcq", w, v).reshape(2, 64, 4, 4)
        torch.testing.assert_close(out, block.proj(a) + r, atol=1e-5, rtol=1e-5)
        # read as (three, heads, dim) instead, the same weights give another output: the layout matters
        block.qkv.weight.copy_(block.qkv.weight.reshape(64, 3, 64, 1, 1).transpose(0, 1).reshape(192, 64, 1, 1))
        block.qkv.bias.copy_(block.qkv.bias.reshape(64, 3).T.reshape(-1))
        assert (block(x, emb) - out).abs().max() > 1e-2


def test_noise_embeddings_are_edms():
    """The one embedding of each kind (cmkit.nets.embedding), as EDM's networks use it, computes EDM's formulas."""
    from cmkit.nets.embedding import FourierEmbedding, PositionalEmbedding

    c = torch.tensor([-1.3, 0.2])
    i = torch.arange(8.0)
    args = c[:, None] * (1e-4 ** (i / 7))[None]  # DDPM++: endpoint=True
    torch.testing.assert_close(
        PositionalEmbedding(16, scale=1.0, endpoint=True)(c), torch.cat([args.cos(), args.sin()], 1)
    )
    args = c[:, None] * (1e-4 ** (i / 8))[None]  # ADM
    torch.testing.assert_close(PositionalEmbedding(16, scale=1.0)(c), torch.cat([args.cos(), args.sin()], 1))
    emb = FourierEmbedding(16, scale=16, buffer="freqs")
    args = c[:, None] * (2 * math.pi * emb.freqs)[None]  # EDM: x.ger(2π·freqs)
    torch.testing.assert_close(emb(c), torch.cat([args.cos(), args.sin()], 1))


TINY = dict(
    img_resolution=8,
    in_channels=1,
    model_channels=16,
    channel_mult=(1, 2),
    num_blocks=1,
    attn_resolutions=(4,),
    dropout=0.0,
)


@pytest.mark.parametrize("arch", ["ddpmpp", "ncsnpp", "dhariwal"])
def test_labels_as_integers_or_one_hot_rows(arch, one_thread):
    kwargs = dict(TINY, num_classes=5, augment_dim=9)
    if arch == "dhariwal":
        kwargs.update(model_channels=32, attn_resolutions=(4,))
    torch.manual_seed(0)
    net = CLASSES[arch](**kwargs).eval()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x, c = torch.randn(2, 1, 8, 8), torch.tensor([0.1, -0.5])
    with torch.no_grad():
        a = net(x, c, torch.tensor([1, 3]))
        b = net(x, c, F.one_hot(torch.tensor([1, 3]), 5).float())
        d = net(x, c, torch.tensor([1, 4]))
    torch.testing.assert_close(a, b)
    assert torch.equal(a[0], d[0]) and not torch.allclose(a[1], d[1])
    with pytest.raises(ValueError, match="class-conditional"):
        net(x, c)


def test_vp_and_ve_preconditioning_closed_forms():
    class Probe(torch.nn.Module):  # returns its inputs, to read c_in and c_noise back
        def forward(self, x, c_noise, class_labels=None):
            self.x, self.c_noise = x, c_noise
            return torch.ones_like(x)

    x, sigma = torch.randn(2, 1, 4, 4), torch.tensor([0.5, 20.0])
    vp = VPPrecond(Probe())
    out = vp(x, sigma)
    # VP (EDM Table 1): c_skip 1, c_out -σ, c_in 1/√(σ²+1), c_noise (M-1)·σ⁻¹(σ)
    # with σ(t) = √(e^{½β_d t² + β_min t} − 1)
    t = vp.net.c_noise / 999
    torch.testing.assert_close(((0.5 * 19.9 * t**2 + 0.1 * t).exp() - 1).sqrt(), sigma)
    torch.testing.assert_close(vp.net.x, x / (sigma**2 + 1).sqrt()[:, None, None, None])
    torch.testing.assert_close(out, x - sigma[:, None, None, None])
    assert vp.sigma_min == pytest.approx(math.sqrt(math.exp(0.5 * 19.9 * 1e-10 + 0.1 * 1e-5) - 1), rel=1e-4)
    ve = VEPrecond(Probe())
    out = ve(x, sigma)  # VE: c_skip 1, c_out σ, c_in 1, c_noise ln(σ/2)
    torch.testing.assert_close(ve.net.c_noise, (sigma / 2).log())
    torch.testing.assert_close(ve.net.x, x)
    torch.testing.assert_close(out, x + sigma[:, None, None, None])


@pytest.mark.parametrize(
    "arch,embedding", [("ddpmpp", "positional"), ("ncsnpp", "fourier"), ("dhariwal", "positional")]
)
def test_edm_network_as_consistency_model_keeps_the_boundary(arch, embedding, one_thread):
    channels = "32" if arch == "dhariwal" else "16"
    cfg = get_config(
        "digits-ict",
        [
            f"model.arch={arch}",
            f"model.embedding={embedding}",
            f"model.model_channels={channels}",
            "model.attn_resolutions=4",
        ],
    )
    check_boundary_and_bf16(cfg)


def test_edm_architecture_config_rules():
    with pytest.raises(CmkitError, match="fourier"):
        get_config("digits-ict", ["model.arch=ncsnpp"])  # NCSN++ embeds with Fourier features
    with pytest.raises(CmkitError, match="augment_dim"):
        get_config("digits-ict", ["model.augment_dim=9"])  # cmkit's UNet has no augmentation input
    with pytest.raises(CmkitError, match="GroupNorm"):
        get_config("digits-ict", ["model.arch=ddpmpp", "model.model_channels=18"])


# the paper presets on the paper networks: (preset, arch, parameters of the Precond-wrapped network)
PAPER = [
    ("cifar10-edm", "ncsnpp", 56_395_523),
    ("cifar10-cd", "ncsnpp", 56_395_523),
    ("cifar10-ct", "ncsnpp", 56_395_523),
    ("cifar10-ict", "ncsnpp", 56_395_523),
    ("cifar10-ect", "ddpmpp", 55_732_739),
]


@pytest.mark.parametrize("preset,arch,params", PAPER)
def test_cifar10_presets_use_the_papers_networks(preset, arch, params):
    cfg = get_config(preset, ["data.root=x.npz"])
    assert cfg.model.arch == arch
    with torch.device("meta"):
        model = cfg.model.build()
    assert sum(p.numel() for p in model.parameters()) == params
