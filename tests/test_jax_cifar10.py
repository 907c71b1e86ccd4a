"""The CM paper's JAX CIFAR-10 checkpoints (cmkit/nets/jax_cifar10.py): a msgpack decoder with Flax's extensions,
and score_sde's Flax NCSN++ names and layouts onto EDM's NCSN++.

The tests write their own ``flax.serialization.to_bytes``-style files: a msgpack map of the training state
(``step, lr, ema_rate, params, params_ema, model_state, opt_state, rng_state``) whose arrays are extension 1
``(shape, dtype name, bytes)``, numpy scalars extension 3, and large arrays Flax's chunked-array dicts. Their Flax
parameter trees are built from a cmkit NCSN++ by the inverse of the documented conversion (OIHW → HWIO, dense
weights transposed, GroupNorm weight → scale, EDM's interleaved qkv → NIN_0..2), with module names numbered in
the order EDM's module tree visits the blocks (one ``ResnetBlockBigGANpp`` per UNet block, then an
``AttnBlockpp`` when it has attention; ``Downsample`` for the residual input pyramid), which is the call order
of ``jcm/models/ncsnpp.py``.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cmkit.errors import CmkitError
from cmkit.formats.jax_cifar10 import convert_params, read_jax_cifar10, unpackb
from cmkit.nets.edm import NCSNpp, UNetBlock

# --- a msgpack encoder (the writer side of flax.serialization) -------------------------------------------


def pack(obj, wide: bool = False) -> bytes:
    """msgpack of dicts, lists, str, bytes, bool, None, int, float, numpy arrays (ext 1) and scalars (ext 3);
    ``wide`` uses the 16/32-bit headers where a shorter one would do, to exercise them."""
    if obj is None:
        return b"\xc0"
    if obj is True or obj is False:
        return b"\xc3" if obj else b"\xc2"
    if isinstance(obj, np.ndarray):
        return ext(1, pack([list(obj.shape), obj.dtype.name, np.ascontiguousarray(obj).tobytes()]))
    if isinstance(obj, np.generic):
        return ext(3, pack([obj.dtype.name, obj.tobytes()]))
    if isinstance(obj, int):
        if 0 <= obj <= 0x7F and not wide:
            return bytes([obj])
        if -32 <= obj < 0 and not wide:
            return struct.pack(">b", obj)
        if obj >= 0:
            return b"\xcf" + struct.pack(">Q", obj) if obj > 0xFFFFFFFF or wide else b"\xce" + struct.pack(">I", obj)
        return b"\xd3" + struct.pack(">q", obj)
    if isinstance(obj, float):
        return b"\xcb" + struct.pack(">d", obj)
    if isinstance(obj, str):
        data = obj.encode()
        if len(data) < 32 and not wide:
            return bytes([0xA0 | len(data)]) + data
        return (
            b"\xda" + struct.pack(">H", len(data)) + data
            if len(data) < 65536
            else b"\xdb" + struct.pack(">I", len(data)) + data
        )
    if isinstance(obj, (bytes, bytearray)):
        return (
            b"\xc4" + struct.pack(">B", len(obj))
            if len(obj) < 256 and not wide
            else b"\xc6" + struct.pack(">I", len(obj))
        ) + bytes(obj)
    if isinstance(obj, (list, tuple)):
        head = bytes([0x90 | len(obj)]) if len(obj) < 16 and not wide else b"\xdc" + struct.pack(">H", len(obj))
        return head + b"".join(pack(v, wide) for v in obj)
    if isinstance(obj, dict):
        head = bytes([0x80 | len(obj)]) if len(obj) < 16 and not wide else b"\xde" + struct.pack(">H", len(obj))
        return head + b"".join(pack(k, wide) + pack(v, wide) for k, v in obj.items())
    raise TypeError(type(obj))


def ext(code: int, payload: bytes) -> bytes:
    fixed = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}
    if len(payload) in fixed:
        return bytes([fixed[len(payload)]]) + struct.pack(">b", code) + payload
    if len(payload) < 256:
        return b"\xc7" + struct.pack(">Bb", len(payload), code) + payload
    return b"\xc9" + struct.pack(">Ib", len(payload), code) + payload


def chunked(arr: np.ndarray, size: int) -> dict:
    """Flax's layout for arrays over its chunk size: the flat array in pieces, tuples as {"0": ..., "1": ...}."""
    flat = arr.reshape(-1)
    chunks = [flat[i : i + size] for i in range(0, flat.size, size)]
    return {
        "__msgpack_chunked_array__": True,
        "shape": {str(i): s for i, s in enumerate(arr.shape)},
        "chunks": {str(i): c for i, c in enumerate(chunks)},
    }


def test_msgpack_decoder_reads_every_form():
    value = {
        "small": 5,
        "neg": -7,
        "big": 2**40,
        "neg64": -(2**40),
        "u32": 70000,
        "f": 1.5,
        "none": None,
        "t": True,
        "f0": False,
        "s": "x" * 40,
        "b": b"\x00\x01\x02",
        "list": list(range(20)),
        "nested": {"a": [1, {"b": "c"}]},
        "arr": np.arange(6, dtype=np.float32).reshape(2, 3),
        "i64": np.array([-1, 2**40]),
        "scalar": np.float32(0.25),
        "empty": np.zeros((0, 3), np.float32),
    }
    for wide in (False, True):
        got = unpackb(pack(value, wide))
        assert got.keys() == value.keys()
        for k, v in value.items():
            if isinstance(v, np.ndarray):
                assert got[k].dtype == v.dtype and np.array_equal(got[k], v)
            elif isinstance(v, bytes):
                assert bytes(got[k]) == v
            else:
                assert got[k] == v and type(got[k]) is type(v) or (k == "scalar" and got[k] == 0.25)
    big = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    assert np.array_equal(unpackb(pack({"w": chunked(big, 4)}))["w"], big)


@pytest.mark.parametrize(
    "data,match",
    [
        (pack({"a": np.ones(4, np.float32)})[:-3], "ends early"),
        (pack({"a": 1}) + b"\x00", "trailing"),
        (b"\xc1", "not a msgpack value"),
        (ext(5, b"\x00\x01\x02"), "extension type 5"),
        (ext(1, pack([[2, 2], "object", b"1234"])), "malformed"),
        (ext(1, pack([[2, 2], "float32", b"1234"])), "holds 4 bytes"),
    ],
)
def test_damaged_msgpack_is_one_line(data, match):
    with pytest.raises(CmkitError, match=match):
        unpackb(data)


# --- Flax NCSN++ trees built from a cmkit NCSN++ ----------------------------------------------------------


def flax_tree(net: NCSNpp, to=lambda t: t.detach().numpy().copy()):
    """The Flax parameter tree of score_sde's NCSN++ holding ``net``'s weights (the inverse conversion)."""
    sd = net.state_dict()
    tree: dict = {}
    counts = {"ResnetBlockBigGANpp": 0, "AttnBlockpp": 0, "Downsample": 0}

    def name(cls):
        counts[cls] += 1
        return f"{cls}_{counts[cls] - 1}"

    def conv(prefix, kernel="kernel"):
        return {kernel: to(sd[f"{prefix}.weight"].permute(2, 3, 1, 0)), "bias": to(sd[f"{prefix}.bias"])}

    def dense(prefix):
        return {"kernel": to(sd[f"{prefix}.weight"].T), "bias": to(sd[f"{prefix}.bias"])}

    def norm(prefix):
        return {"scale": to(sd[f"{prefix}.weight"]), "bias": to(sd[f"{prefix}.bias"])}

    tree["GaussianFourierProjection_0"] = {"W": to(sd["map_noise.freqs"])}
    tree["Dense_0"], tree["Dense_1"] = dense("map_layer0"), dense("map_layer1")
    for part in ("enc", "dec"):
        for key, module in getattr(net, part).items():
            p = f"{part}.{key}"
            if isinstance(module, UNetBlock):
                block = {
                    "GroupNorm_0": norm(f"{p}.norm0"),
                    "Conv_0": conv(f"{p}.conv0"),
                    "Dense_0": dense(f"{p}.affine"),
                    "GroupNorm_1": norm(f"{p}.norm1"),
                    "Conv_1": conv(f"{p}.conv1"),
                }
                if module.skip is not None:
                    block["Conv_2"] = conv(f"{p}.skip")
                tree[name("ResnetBlockBigGANpp")] = block
                if module.num_heads:
                    C = module.out_channels
                    W = sd[f"{p}.qkv.weight"].reshape(C, 3, C)  # (head_dim, 3) interleaved, one head
                    b = sd[f"{p}.qkv.bias"].reshape(C, 3)
                    attn = {"GroupNorm_0": norm(f"{p}.norm2")}
                    for i in range(3):
                        attn[f"NIN_{i}"] = {"W": to(W[:, i].T), "b": to(b[:, i])}
                    attn["NIN_3"] = {"W": to(sd[f"{p}.proj.weight"][:, :, 0, 0].T), "b": to(sd[f"{p}.proj.bias"])}
                    tree[name("AttnBlockpp")] = attn
            elif key.endswith("_conv") and part == "enc":
                tree["Conv_0"] = conv(p)
            elif key.endswith("aux_residual"):
                tree[name("Downsample")] = {"Conv2d_0": conv(p, kernel="weight")}
            elif key.endswith("aux_norm"):
                tree["GroupNorm_0"] = norm(p)
            elif key.endswith("aux_conv"):
                tree["Conv_1"] = conv(p)
            else:
                raise AssertionError(key)
    return tree


def leaves(tree):
    return [v for x in tree.values() for v in (leaves(x) if isinstance(x, dict) else [x])]


def test_full_size_flax_ncsnpp_is_edms_ncsnpp_leaf_for_leaf():
    """The CIFAR-10 configuration (nf 128, ch_mult 2,2,2, 4 blocks, attention at 16): 445 Flax leaves and
    56,395,651 parameters (EDM's NCSN++ without augmentation, 56,395,523, plus the 128 Fourier frequencies)."""
    with torch.device("meta"):
        net = NCSNpp()
        tree = flax_tree(net, to=lambda t: t)
    assert len(leaves(tree)) == 445
    assert sum(t.numel() for t in leaves(tree)) == 56_395_651
    names = [k for k in tree if k.startswith("ResnetBlockBigGANpp_")]
    assert len(names) == 33 and sum(k.startswith("AttnBlockpp_") for k in tree) == 6
    from cmkit.formats.jax_cifar10 import flax_to_edm_names

    mapping = {flax: edm for flax, edm, kind in flax_to_edm_names(32, (2, 2, 2), 4, (16,)) if kind != "attn"}
    # call order of jcm/models/ncsnpp.py: 4 blocks at 32, a down block, 4 blocks (+ attention) at 16, ...
    assert mapping["ResnetBlockBigGANpp_4"] == "enc.16x16_down" and mapping["Downsample_1"] == "enc.8x8_aux_residual"
    assert mapping["ResnetBlockBigGANpp_14"] == "dec.8x8_in0" and mapping["ResnetBlockBigGANpp_21"] == "dec.16x16_up"
    attn = [edm for _, edm, kind in flax_to_edm_names(32, (2, 2, 2), 4, (16,)) if kind == "attn"]
    assert attn == [f"enc.16x16_block{i}" for i in range(4)] + ["dec.8x8_in0", "dec.16x16_block4"]


TINY = dict(
    img_resolution=32,
    in_channels=3,
    model_channels=16,
    channel_mult=(1, 2),
    num_blocks=1,
    attn_resolutions=(16,),
    dropout=0.0,
)


def tiny_net(seed):
    torch.manual_seed(seed)
    net = NCSNpp(**TINY).eval()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return net


def write_state(path, ema: NCSNpp, online: NCSNpp):
    """A training state as jcm's State dataclass serialises (params, params_ema, optimizer moments, RNG)."""
    params, params_ema = flax_tree(online), flax_tree(ema)
    moments = {k: v for k, v in flax_tree(online, to=lambda t: (0 * t).numpy().copy()).items()}
    state = {
        "step": 800_000,
        "lr": np.float32(4e-4),
        "ema_rate": np.float32(0.9999),
        "params": params,
        "params_ema": {"params": params_ema},
        "model_state": {},
        "opt_state": {
            "0": {"count": np.int32(3), "mu": moments, "nu": moments},
            "1": {"big": chunked(np.arange(10, dtype=np.float32), 3)},
        },
        "rng_state": np.array([0, 42], dtype=np.uint32),
    }
    path.write_bytes(pack(state))


def test_a_flax_checkpoint_converts_exactly_and_samples(tmp_path, one_thread):
    """``params_ema`` (not ``params``) lands on EDM's NCSN++ tensor for tensor; the converted consistency
    model equals cmkit's with the same weights (boundary-shifted scalings, σ_min 0.002) and keeps f(x, σ_min) = x."""
    from cmkit.cli.main import main
    from cmkit.load import load_model
    from cmkit.precond import Precond

    ema, online = tiny_net(0), tiny_net(1)
    path = tmp_path / "checkpoint_80"
    write_state(path, ema, online)
    model, state = read_jax_cifar10(path)
    assert state.keys() == ema.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in ema.state_dict().items())
    assert (model["arch"], model["model_channels"], model["channel_mult"], model["num_blocks"], model["precond"]) == (
        "ncsnpp",
        16,
        (1, 2),
        1,
        "cm",
    )
    assert main(["convert", str(path), "-o", str(tmp_path / "cm")]) == 0
    converted, cfg = load_model(tmp_path / "cm")
    x, sigma = torch.randn(2, 3, 32, 32), torch.tensor([0.3, 80.0])
    with torch.no_grad():
        torch.testing.assert_close(converted(x, sigma), Precond(ema, "cm")(x, sigma), rtol=0, atol=0)
        assert torch.equal(converted(x, 0.002), x)
    assert main(["convert", str(path), "-o", str(tmp_path / "edm"), "--precond", "edm"]) == 0
    assert load_model(tmp_path / "edm")[1].model.precond == "edm"
    assert (
        main(["sample", "--model", str(tmp_path / "cm"), "--steps", "1", "-n", "2", "-o", str(tmp_path / "s.png")]) == 0
    )


def test_flax_layouts_in_closed_form():
    """Flax's conv (NHWC, kernel HWIO, SAME), dense (x @ kernel) and AttnBlockpp (GroupNorm, NIN q/k/v,
    softmax(qk/√C), NIN out, (x + h)/√2) written out from the Flax leaves give what cmkit's converted modules give."""
    net = tiny_net(0)
    tree = flax_tree(net)
    converted = NCSNpp(**TINY).eval()
    converted.load_state_dict(convert_params(tree, 32, (1, 2), 1, (16,)))
    x = torch.randn(2, 3, 32, 32)
    k = torch.from_numpy(tree["Conv_0"]["kernel"])  # [3, 3, in, out]
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))
    y = sum(
        torch.einsum("bhwi,io->bhwo", xp[:, dh : dh + 32, dw : dw + 32], k[dh, dw])
        for dh in range(3)
        for dw in range(3)
    )
    y = y + torch.from_numpy(tree["Conv_0"]["bias"])
    with torch.no_grad():
        torch.testing.assert_close(converted.enc["32x32_conv"](x), y.permute(0, 3, 1, 2), atol=1e-5, rtol=1e-5)
        e = torch.randn(2, 32)
        d = tree["Dense_0"]
        torch.testing.assert_close(
            converted.map_layer0(e), e @ torch.from_numpy(d["kernel"]) + torch.from_numpy(d["bias"])
        )
        # the attention of the first 16×16 block
        block = converted.enc["16x16_block0"]
        h, emb = torch.randn(2, 16, 16, 16), torch.randn(2, 64)
        heads, block.num_heads = block.num_heads, 0
        r = block(h, emb)  # the residual part alone
        block.num_heads = heads
        out = block(h, emb)
        a = tree["AttnBlockpp_0"]
        g = F.group_norm(
            r, 8, torch.from_numpy(a["GroupNorm_0"]["scale"]), torch.from_numpy(a["GroupNorm_0"]["bias"]), 1e-6
        ).permute(0, 2, 3, 1)
        nin = [g @ torch.from_numpy(a[f"NIN_{i}"]["W"]) + torch.from_numpy(a[f"NIN_{i}"]["b"]) for i in range(3)]
        q, kk, v = (t.reshape(2, 256, 32) for t in nin)
        w = (torch.einsum("bqc,bkc->bqk", q, kk) / math.sqrt(32)).softmax(-1)
        att = torch.einsum("bqk,bkc->bqc", w, v) @ torch.from_numpy(a["NIN_3"]["W"]) + torch.from_numpy(a["NIN_3"]["b"])
        ref = (r.permute(0, 2, 3, 1) + att.reshape(2, 16, 16, 32)) / math.sqrt(2)
        torch.testing.assert_close(out, ref.permute(0, 3, 1, 2), atol=1e-5, rtol=1e-5)


def test_trees_that_are_not_this_ncsnpp_are_one_line(tmp_path):
    net = tiny_net(0)
    tree = flax_tree(net)
    tree["Extra_0"] = {"kernel": np.zeros(3, np.float32)}
    with pytest.raises(CmkitError, match="no place in EDM's NCSN\\+\\+.*Extra_0"):
        convert_params(tree, 32, (1, 2), 1, (16,))
    del tree["Extra_0"], tree["AttnBlockpp_1"]
    with pytest.raises(CmkitError, match="AttnBlockpp_1"):
        convert_params(tree, 32, (1, 2), 1, (16,))
    path = tmp_path / "checkpoint_1"
    path.write_bytes(pack({"step": 1, "params": {}}))
    with pytest.raises(CmkitError, match="no params_ema"):
        read_jax_cifar10(path)
    path.write_bytes(pack({"step": 1, "params_ema": flax_tree(net)})[:-10])
    with pytest.raises(CmkitError, match="not a Flax msgpack checkpoint"):
        read_jax_cifar10(path)
