"""The CM paper's CIFAR-10 checkpoints (openai/consistency_models_cifar10, JAX/Flax), read without JAX or Flax.

Each ``checkpoint_N`` is ``flax.serialization.to_bytes(State)``: msgpack of a dict ``step, lr, ema_rate, params,
[target_params,] params_ema, model_state, opt_state, rng_state`` (``jcm/models/utils.py``), whose arrays are
msgpack extension 1 (``(shape, dtype name, C-order bytes)``, itself msgpack), numpy scalars extension 3, and arrays
over 1 GiB ``{"__msgpack_chunked_array__": True, "shape", "chunks"}`` dicts (flax.serialization's chunked arrays).
``unpackb`` below is a small msgpack decoder written for this (no dependency); it only builds dicts, lists, numbers,
strings, bytes and numpy arrays.

``params_ema`` is score_sde's NCSN++ (``jcm/models/ncsnpp.py``: nf 128, ch_mult 2,2,2, 4 blocks, attention at 16,
BigGAN blocks with FIR [1, 3, 3, 1], residual input pyramid, Fourier features). Flax names modules by class and
call order (``ResnetBlockBigGANpp_7``, ``AttnBlockpp_2``, ``Downsample_1``, ``Conv_0``…); ``flax_to_edm_names``
replays that order against EDM's NCSN++ (``cmkit.nets.edm.NCSNpp``), on which every leaf maps one-to-one:
convolutions HWIO → OIHW, dense kernels transposed, GroupNorm ``scale`` → ``weight``, the attention's four
``NIN`` layers (q, k, v, out; W is [in, out]) → EDM's interleaved ``qkv`` and ``proj``, Fourier ``W`` →
``map_noise.freqs``; EDM's fixed FIR buffers (``resample_filter``, [1, 3, 3, 1]) are added. The noise input is
0.25·ln σ and the scalings are EDM's (teacher) or the boundary-shifted ones with σ_min = 0.002
(``get_distiller_fn``), which are cmkit's ``precond=edm`` / ``cm``.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import CmkitError

MAX_DEPTH = 64
#: numpy dtypes a Flax ndarray extension may name (no object dtypes).
DTYPES = {
    name: np.dtype(name)
    for name in (
        "float16",
        "float32",
        "float64",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "bool",
        "complex64",
        "complex128",
    )
}


class MsgpackError(CmkitError):
    """A damaged or unsupported msgpack file (one line)."""


class _Reader:
    def __init__(self, data: bytes | memoryview):
        self.buf, self.pos = memoryview(data), 0

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise MsgpackError(f"msgpack data ends early (need {n} bytes at offset {self.pos} of {len(self.buf)})")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def value(self, depth: int = 0) -> Any:
        if depth > MAX_DEPTH:
            raise MsgpackError(f"msgpack data nested deeper than {MAX_DEPTH} levels")
        b = self.take(1)[0]
        if b <= 0x7F:
            return b
        if b >= 0xE0:
            return b - 0x100
        if 0x80 <= b <= 0x8F:
            return self.map(b & 0x0F, depth)
        if 0x90 <= b <= 0x9F:
            return [self.value(depth + 1) for _ in range(b & 0x0F)]
        if 0xA0 <= b <= 0xBF:
            return self.str(b & 0x1F)
        simple = {0xC0: None, 0xC2: False, 0xC3: True}
        if b in simple:
            return simple[b]
        if b in (0xC4, 0xC5, 0xC6):
            return self.take(self.unpack({0xC4: ">B", 0xC5: ">H", 0xC6: ">I"}[b]))
        if b in (0xC7, 0xC8, 0xC9):
            n = self.unpack({0xC7: ">B", 0xC8: ">H", 0xC9: ">I"}[b])
            return self.ext(self.unpack(">b"), n)
        if b in (0xCA, 0xCB):
            return self.unpack(">f" if b == 0xCA else ">d")
        if 0xCC <= b <= 0xD3:
            return self.unpack(
                {0xCC: ">B", 0xCD: ">H", 0xCE: ">I", 0xCF: ">Q", 0xD0: ">b", 0xD1: ">h", 0xD2: ">i", 0xD3: ">q"}[b]
            )
        if 0xD4 <= b <= 0xD8:
            return self.ext(self.unpack(">b"), 1 << (b - 0xD4))
        if b in (0xD9, 0xDA, 0xDB):
            return self.str(self.unpack({0xD9: ">B", 0xDA: ">H", 0xDB: ">I"}[b]))
        if b in (0xDC, 0xDD):
            return [self.value(depth + 1) for _ in range(self.unpack(">H" if b == 0xDC else ">I"))]
        if b in (0xDE, 0xDF):
            return self.map(self.unpack(">H" if b == 0xDE else ">I"), depth)
        raise MsgpackError(f"byte 0x{b:02x} at offset {self.pos - 1} is not a msgpack value")

    def str(self, n: int) -> str:
        try:
            return bytes(self.take(n)).decode("utf-8")
        except UnicodeDecodeError:
            raise MsgpackError(f"a msgpack string before offset {self.pos} is not UTF-8") from None

    def map(self, n: int, depth: int) -> dict:
        out = {}
        for _ in range(n):
            key = self.value(depth + 1)
            if isinstance(key, (list, dict, memoryview)):
                raise MsgpackError("a msgpack map key is not a string or number")
            out[key] = self.value(depth + 1)
        return out

    def ext(self, code: int, n: int) -> Any:
        payload = self.take(n)
        if code == 1:  # Flax ndarray: msgpack (shape, dtype name, bytes)
            shape, dtype, data = _Reader(payload).value(MAX_DEPTH - 4)
            return _array(shape, dtype, data)
        if code == 3:  # Flax numpy scalar: (dtype name, bytes)
            dtype, data = _Reader(payload).value(MAX_DEPTH - 4)
            return _array([], dtype, data)[()]
        if code == 2:  # Flax native complex: (real, imag)
            real, imag = _Reader(payload).value(MAX_DEPTH - 4)
            return complex(real, imag)
        raise MsgpackError(f"msgpack extension type {code} is not one of Flax's (1 ndarray, 2 complex, 3 scalar)")


def _array(shape: Any, dtype: Any, data: Any) -> np.ndarray:
    if (
        not isinstance(shape, list)
        or not all(isinstance(s, int) and s >= 0 for s in shape)
        or dtype not in DTYPES
        or not isinstance(data, memoryview)
    ):
        raise MsgpackError(f"a Flax array record is malformed (shape {shape!r}, dtype {dtype!r})")
    dt = DTYPES[dtype]
    if int(np.prod(shape, dtype=np.int64)) * dt.itemsize != len(data):
        raise MsgpackError(f"a Flax array of shape {tuple(shape)} and dtype {dtype} holds {len(data)} bytes")
    return np.frombuffer(data, dtype=dt).reshape(shape)


def _unchunk(obj: Any) -> Any:
    """Flax's chunked arrays (``__msgpack_chunked_array__``) joined back, everywhere in a tree."""
    if isinstance(obj, dict):
        if obj.get("__msgpack_chunked_array__") is True:
            shape = [obj["shape"][str(i)] for i in range(len(obj["shape"]))]
            chunks = [obj["chunks"][str(i)] for i in range(len(obj["chunks"]))]
            return np.concatenate([np.asarray(c).reshape(-1) for c in chunks]).reshape(shape)
        return {k: _unchunk(v) for k, v in obj.items()}
    return obj


def unpackb(data: bytes | memoryview) -> Any:
    """One msgpack value (the whole input) with Flax's extensions; arrays are read-only numpy views of ``data``."""
    reader = _Reader(data)
    value = reader.value()
    if reader.pos != len(reader.buf):
        raise MsgpackError(f"{len(reader.buf) - reader.pos} bytes of trailing data after the msgpack value")
    return _unchunk(value)


def read_flax_state(path: str | Path) -> dict[str, Any]:
    """The state dict of a ``flax.serialization.to_bytes`` file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise CmkitError(f"checkpoint not found: {p} (expected a consistency_models_cifar10 checkpoint_N file)")
    try:
        state = unpackb(p.read_bytes())
    except MsgpackError as e:
        raise CmkitError(f"{p} is not a Flax msgpack checkpoint: {e}") from None
    if not isinstance(state, dict):
        raise CmkitError(f"{p} is not a Flax training state (the msgpack value is a {type(state).__name__})")
    return state


def ema_params(state: dict[str, Any], source: str = "the checkpoint") -> dict[str, Any]:
    """``params_ema`` of a training state (under a ``params`` collection or a joint model's first network)."""
    if "params_ema" not in state:
        raise CmkitError(f"{source} has no params_ema (keys: {', '.join(sorted(map(str, state))[:10])})")
    params = state["params_ema"]
    while isinstance(params, dict) and len(params) == 1 and next(iter(params)) in ("params", "NCSNpp_0"):
        params = next(iter(params.values()))
    if isinstance(params, dict) and "NCSNpp_0" in params:  # JointNCSNpp: the denoiser is the first network
        params = params["NCSNpp_0"]
    if not isinstance(params, dict) or "Conv_0" not in params:
        raise CmkitError(f"{source}: params_ema is not an NCSN++ parameter tree (no Conv_0)")
    return params


def flax_to_edm_names(
    img_resolution: int, channel_mult: tuple[int, ...], num_blocks: int, attn_resolutions: tuple[int, ...]
) -> list[tuple[str, str, str]]:
    """(Flax module, EDM module prefix, kind) in NCSN++'s call order (``jcm/models/ncsnpp.py``, progressive
    "none", progressive_input "residual", BigGAN blocks); kind is fourier, dense, conv, block, attn or fir_conv."""
    counts: dict[str, int] = {}

    def nxt(cls: str) -> str:
        counts[cls] = counts.get(cls, 0) + 1
        return f"{cls}_{counts[cls] - 1}"

    R, last = img_resolution, len(channel_mult) - 1
    out = [
        ("GaussianFourierProjection_0", "map_noise", "fourier"),
        ("Dense_0", "map_layer0", "dense"),
        ("Dense_1", "map_layer1", "dense"),
        ("Conv_0", f"enc.{R}x{R}_conv", "conv"),
    ]
    for level in range(len(channel_mult)):
        res = R >> level
        for i in range(num_blocks):
            out.append((nxt("ResnetBlockBigGANpp"), f"enc.{res}x{res}_block{i}", "block"))
            if res in attn_resolutions:
                out.append((nxt("AttnBlockpp"), f"enc.{res}x{res}_block{i}", "attn"))
        if level != last:
            out.append((nxt("ResnetBlockBigGANpp"), f"enc.{res // 2}x{res // 2}_down", "block"))
            out.append((nxt("Downsample"), f"enc.{res // 2}x{res // 2}_aux_residual", "fir_conv"))
    r = R >> last
    out += [
        (nxt("ResnetBlockBigGANpp"), f"dec.{r}x{r}_in0", "block"),
        (nxt("AttnBlockpp"), f"dec.{r}x{r}_in0", "attn"),
        (nxt("ResnetBlockBigGANpp"), f"dec.{r}x{r}_in1", "block"),
    ]
    for level in reversed(range(len(channel_mult))):
        res = R >> level
        for i in range(num_blocks + 1):
            out.append((nxt("ResnetBlockBigGANpp"), f"dec.{res}x{res}_block{i}", "block"))
        if res in attn_resolutions:
            out.append((nxt("AttnBlockpp"), f"dec.{res}x{res}_block{num_blocks}", "attn"))
        if level:
            out.append((nxt("ResnetBlockBigGANpp"), f"dec.{res * 2}x{res * 2}_up", "block"))
    out += [("GroupNorm_0", f"dec.{R}x{R}_aux_norm", "norm"), ("Conv_1", f"dec.{R}x{R}_aux_conv", "conv")]
    return out


def _t(a: Any, what: str) -> Tensor:
    if not isinstance(a, np.ndarray) or a.dtype.kind != "f":
        raise CmkitError(f"{what} is not a floating-point array")
    return torch.from_numpy(np.array(a, dtype=np.float32))


def _leaf(tree: dict[str, Any], module: str, name: str, used: set[str]) -> Any:
    try:
        value = tree[name]
    except (KeyError, TypeError):
        raise CmkitError(f"the Flax parameters have no {module}/{name}") from None
    used.add(f"{module}/{name}")
    return value


def convert_params(
    params: dict[str, Any],
    img_resolution: int,
    channel_mult: tuple[int, ...],
    num_blocks: int,
    attn_resolutions: tuple[int, ...],
) -> dict[str, Tensor]:
    """EDM NCSN++ state dict (``cmkit.nets.edm.NCSNpp`` keys) of a Flax NCSN++ parameter tree; every Flax leaf
    must be used, or one ``CmkitError`` line names the first that is not."""
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    fir = torch.tensor([1.0, 3.0, 3.0, 1.0])
    fir = (torch.outer(fir, fir) / fir.sum() ** 2)[None, None]  # EDM's resample_filter buffer (not in Flax)

    def get(module: str, *path: str) -> Any:
        node: Any = params
        for part in (module,) + path[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
            if node is None:
                raise CmkitError(f"the Flax parameters have no {'/'.join((module,) + path[:-1])}")
        return _t(_leaf(node, "/".join((module,) + path[:-1]), path[-1], used), "/".join((module,) + path))

    def conv(edm: str, *path: str, kernel: str = "kernel") -> None:
        out[f"{edm}.weight"] = get(*path, kernel).permute(3, 2, 0, 1).contiguous()  # HWIO → OIHW
        out[f"{edm}.bias"] = get(*path, "bias")

    def dense(edm: str, *path: str) -> None:
        out[f"{edm}.weight"] = get(*path, "kernel").T.contiguous()
        out[f"{edm}.bias"] = get(*path, "bias")

    def norm(edm: str, *path: str) -> None:
        out[f"{edm}.weight"], out[f"{edm}.bias"] = get(*path, "scale"), get(*path, "bias")

    for flax, edm, kind in flax_to_edm_names(img_resolution, channel_mult, num_blocks, attn_resolutions):
        if flax not in params:
            raise CmkitError(
                f"the Flax parameters have no {flax} (expected for {edm}); not the NCSN++ of "
                f"channel_mult {channel_mult}, {num_blocks} blocks, attention at {attn_resolutions}"
            )
        if kind == "fourier":
            out[f"{edm}.freqs"] = get(flax, "W")
        elif kind == "dense":
            dense(edm, flax)
        elif kind == "conv":
            conv(edm, flax)
        elif kind == "norm":
            norm(edm, flax)
        elif kind == "fir_conv":
            conv(edm, flax, "Conv2d_0", kernel="weight")
            out[f"{edm}.resample_filter"] = fir.clone()
        elif kind == "block":
            norm(f"{edm}.norm0", flax, "GroupNorm_0")
            conv(f"{edm}.conv0", flax, "Conv_0")
            dense(f"{edm}.affine", flax, "Dense_0")
            norm(f"{edm}.norm1", flax, "GroupNorm_1")
            conv(f"{edm}.conv1", flax, "Conv_1")
            if "Conv_2" in params[flax]:
                conv(f"{edm}.skip", flax, "Conv_2")
            if edm.endswith(("_down", "_up")):  # FIR resampling inside the block: conv0 and the skip
                out[f"{edm}.conv0.resample_filter"], out[f"{edm}.skip.resample_filter"] = fir.clone(), fir.clone()
        else:  # attention: NIN_0..2 = q, k, v ([in, out]); EDM's qkv channels are (head_dim, 3) interleaved
            norm(f"{edm}.norm2", flax, "GroupNorm_0")
            W = torch.stack([get(flax, f"NIN_{i}", "W").T for i in range(3)], dim=1)  # [C, 3, C]
            b = torch.stack([get(flax, f"NIN_{i}", "b") for i in range(3)], dim=1)  # [C, 3]
            out[f"{edm}.qkv.weight"] = W.reshape(-1, W.shape[-1])[:, :, None, None].contiguous()
            out[f"{edm}.qkv.bias"] = b.reshape(-1).contiguous()
            out[f"{edm}.proj.weight"] = get(flax, "NIN_3", "W").T[:, :, None, None].contiguous()
            out[f"{edm}.proj.bias"] = get(flax, "NIN_3", "b")
    leaves = set(_leaf_paths(params))
    unused = sorted(leaves - used)
    if unused:
        raise CmkitError(
            f"{len(unused)} Flax parameters have no place in EDM's NCSN++ (e.g. {unused[0]}); not the "
            f"NCSN++ of channel_mult {channel_mult}, {num_blocks} blocks, attention at {attn_resolutions}"
        )
    return out


def _leaf_paths(tree: Any, prefix: str = "") -> list[str]:
    if isinstance(tree, dict):
        return [p for k, v in tree.items() for p in _leaf_paths(v, f"{prefix}/{k}" if prefix else str(k))]
    return [prefix]


def ncsnpp_shape(params: dict[str, Any]) -> dict[str, Any]:
    """nf, image channels, channel_mult and blocks per level of a Flax NCSN++ tree (from its kernels and counts);
    the image side and the attention resolutions are the CIFAR-10 ones (32, (16,)) unless given."""
    try:
        kh, kw, cin, nf = np.shape(params["Conv_0"]["kernel"])
    except (KeyError, TypeError, ValueError):
        raise CmkitError("params_ema has no 3×3 Conv_0 kernel: not an NCSN++ parameter tree") from None
    blocks = sum(1 for k in params if str(k).startswith("ResnetBlockBigGANpp_"))
    levels = sum(1 for k in params if str(k).startswith("Downsample_")) + 1
    if blocks <= 3 * levels or (blocks - 3 * levels) % (2 * levels):
        raise CmkitError(f"{blocks} residual blocks over {levels} levels do not make an NCSN++ (2·L·B + 3·L)")
    per_level = (blocks - 3 * levels) // (2 * levels)
    mult = []
    for level in range(levels):
        rb = params.get(f"ResnetBlockBigGANpp_{level * (per_level + 1)}", {})
        try:
            mult.append(int(np.shape(rb["Conv_0"]["kernel"])[3]) // int(nf))
        except (KeyError, TypeError, IndexError):
            raise CmkitError(f"ResnetBlockBigGANpp_{level * (per_level + 1)} has no Conv_0 kernel") from None
    return {"model_channels": int(nf), "in_channels": int(cin), "channel_mult": tuple(mult), "num_blocks": per_level}


def read_jax_cifar10(
    path: str | Path, precond: str = "cm", img_resolution: int = 32, attn_resolutions: tuple[int, ...] = (16,)
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(cmkit ``model`` config section, NCSN++ state dict) of a consistency_models_cifar10 checkpoint's EMA."""
    params = ema_params(read_flax_state(path), str(path))
    shape = ncsnpp_shape(params)
    state = convert_params(params, img_resolution, shape["channel_mult"], shape["num_blocks"], attn_resolutions)
    model = {
        "arch": "ncsnpp",
        "img_resolution": img_resolution,
        **shape,
        "attn_resolutions": tuple(attn_resolutions),
        "dropout": 0.0,
        "num_classes": 0,
        "augment_dim": 0,
        "embedding": "fourier",
        "precond": precond,
        "sigma_min": 0.002,
        "sigma_max": 80.0,
        "sigma_data": 0.5,
    }
    return model, state
