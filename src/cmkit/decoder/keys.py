"""State-dict key names: OpenAI TorchScript ↔ cmkit (= diffusers ``UNet2DModel``) and diffusers prefixes.

Reference doc §1.2 (TorchScript names ``blocks.down_0_conv_0.gn_1.g`` …) and §2.4 (the two-stage rename of
diffusers' ``scripts/convert_consistency_decoder.py``), composed into one mapping here:

    blocks.embed_image.f.{w,b}        → conv_in.{weight,bias}
    blocks.embed_time.emb(.weight)    → time_proj.weight
    blocks.embed_time.f_{1,2}.{w,b}   → time_embedding.linear_{1,2}.*
    blocks.down_k_conv_i.*            → down_blocks.k.resnets.i.*
    blocks.down_k_downsamp.*          → down_blocks.k.downsamplers.0.*
    blocks.mid_i.*                    → mid_block.resnets.i.*
    blocks.up_j_conv_i.*              → up_blocks.(L−1−j).resnets.i.*      (up levels are numbered in reverse)
    blocks.up_j_upsamp.*              → up_blocks.(L−1−j).upsamplers.0.*
    blocks.output.{gn,f}.*            → conv_norm_out.* / conv_out.*
    inside blocks: gn_1→norm1, f_1→conv1, f_t→time_emb_proj, gn_2→norm2, f_2→conv2, f_s→conv_shortcut;
                   .w/.g→.weight, .b→.bias
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from ..errors import CmkitError

#: Prefix of the decoder UNet inside a diffusers ``ConsistencyDecoderVAE`` state dict (§2.3).
DIFFUSERS_PREFIX = "decoder_unet."
#: Other top-level modules of ``ConsistencyDecoderVAE`` (the SD encoder), ignored when loading the decoder.
DIFFUSERS_OTHER_PREFIXES = ("encoder.", "quant_conv.")

_RES_SUB = {
    "gn_1": "norm1",
    "f_1": "conv1",
    "f_t": "time_emb_proj",
    "gn_2": "norm2",
    "f_2": "conv2",
    "f_s": "conv_shortcut",
}
_PARAM = {"w": "weight", "g": "weight", "b": "bias", "weight": "weight", "bias": "bias"}
_BLOCK = re.compile(r"^(down|up)_(\d+)_(conv_(\d+)|downsamp|upsamp)$|^mid_(\d+)$")


def _param(name: str, key: str) -> str:
    if name not in _PARAM:
        raise CmkitError(f"unexpected OpenAI decoder parameter {key!r}")
    return _PARAM[name]


def openai_to_cmkit(key: str, num_levels: int = 4) -> str:
    """One OpenAI TorchScript parameter name → the cmkit/diffusers name (table above)."""
    parts = key.split(".")
    if parts[0] == "blocks":
        parts = parts[1:]
    if len(parts) < 2:
        raise CmkitError(f"unexpected OpenAI decoder parameter {key!r}")
    block, rest = parts[0], parts[1:]
    if block == "embed_image" and rest[0] == "f":
        return f"conv_in.{_param(rest[-1], key)}"
    if block == "embed_time":
        if rest[0] == "emb":
            return "time_proj.weight"
        if rest[0] in ("f_1", "f_2"):
            return f"time_embedding.linear_{rest[0][-1]}.{_param(rest[-1], key)}"
    if block == "output" and rest[0] in ("gn", "f"):
        return f"{'conv_norm_out' if rest[0] == 'gn' else 'conv_out'}.{_param(rest[-1], key)}"
    m = _BLOCK.match(block)
    if m is None or len(rest) != 2 or rest[0] not in _RES_SUB:
        raise CmkitError(f"unexpected OpenAI decoder parameter {key!r}")
    leaf = f"{_RES_SUB[rest[0]]}.{_param(rest[1], key)}"
    if m.group(5) is not None:
        return f"mid_block.resnets.{m.group(5)}.{leaf}"
    side, level = m.group(1), int(m.group(2))
    blocks = "down_blocks" if side == "down" else "up_blocks"
    index = level if side == "down" else num_levels - 1 - level
    if m.group(4) is not None:
        return f"{blocks}.{index}.resnets.{m.group(4)}.{leaf}"
    return f"{blocks}.{index}.{'downsamplers' if side == 'down' else 'upsamplers'}.0.{leaf}"


def cmkit_to_openai(key: str, num_levels: int = 4) -> str:
    """Inverse of ``openai_to_cmkit`` (used to build OpenAI-layout test checkpoints)."""
    inv_sub = {v: k for k, v in _RES_SUB.items()}
    parts = key.split(".")
    leaf = {"weight": "w", "bias": "b"}[parts[-1]]
    head = parts[0]
    if head == "conv_in":
        return f"blocks.embed_image.f.{leaf}"
    if head == "time_proj":
        return "blocks.embed_time.emb.weight"
    if head == "time_embedding":
        return f"blocks.embed_time.f_{parts[1][-1]}.{leaf}"
    if head in ("conv_norm_out", "conv_out"):
        sub = "gn" if head == "conv_norm_out" else "f"
        return f"blocks.output.{sub}.{'g' if sub == 'gn' and leaf == 'w' else leaf}"
    sub = inv_sub[parts[-2]]
    leaf = "g" if sub.startswith("gn") and leaf == "w" else leaf
    if head == "mid_block":
        return f"blocks.mid_{parts[2]}.{sub}.{leaf}"
    level = int(parts[1]) if head == "down_blocks" else num_levels - 1 - int(parts[1])
    side = "down" if head == "down_blocks" else "up"
    block = f"conv_{parts[3]}" if parts[2] == "resnets" else ("downsamp" if side == "down" else "upsamp")
    return f"blocks.{side}_{level}_{block}.{sub}.{leaf}"


def strip_diffusers_prefix(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The ``decoder_unet.*`` part of a ``ConsistencyDecoderVAE`` state dict, prefix removed.

    The SD encoder (``encoder.*``, ``quant_conv.*``) may or may not be present and is dropped; any other
    key is returned as is (and later reported as unexpected by ``check_keys``).
    """
    out = {}
    for key, value in state.items():
        if key.startswith(DIFFUSERS_PREFIX):
            out[key[len(DIFFUSERS_PREFIX) :]] = value
        elif not key.startswith(DIFFUSERS_OTHER_PREFIXES):
            out[key] = value
    return out


def is_openai_layout(keys: list[str]) -> bool:
    return any(k.startswith(("blocks.", "embed_image.")) for k in keys)


def is_diffusers_vae_layout(keys: list[str]) -> bool:
    return any(k.startswith(DIFFUSERS_PREFIX) for k in keys)


def check_keys(state: dict[str, Tensor], expected: dict[str, tuple[int, ...]], source: str) -> None:
    """Raise one ``CmkitError`` line naming missing / unexpected / mis-shaped keys (at most 3 of each)."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(k for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k]))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[:3]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    if shapes:
        k = shapes[0]
        problems.append(f"{len(shapes)} with wrong shape (e.g. {k}: {tuple(state[k].shape)} vs {tuple(expected[k])})")
    if problems:
        raise CmkitError(f"{source} does not match the consistency decoder config: " + "; ".join(problems))
    for k in sorted(state):  # as the denoisers' loader: integer weights or NaN/inf decode to a black image
        v = state[k]
        if not v.is_floating_point() or (not v.is_meta and not bool(torch.isfinite(v).all())):
            kind = f"dtype {v.dtype}" if not v.is_floating_point() else "non-finite values"
            raise CmkitError(f"{source}: tensor {k} has {kind}; expected finite floating-point weights")
