"""Finding, reading, checking and writing decoder weights in the three supported formats.

Reference doc §2.3 (checkpoint names and formats) and §1.2 (OpenAI's TorchScript file and its hash):

* **diffusers** ``ConsistencyDecoderVAE`` safetensors (``openai/consistency-decoder``,
  ``diffusion_pytorch_model[.fp16].safetensors``, fp16 or fp32, with or without the SD encoder), a
  ``UNet2DModel``-only safetensors (``williamberman/consistency-decoder/unet``), or their directories;
  the config comes from ``config.json`` beside the weights, else it is inferred from the tensor shapes.
* **OpenAI** ``decoder.pt`` (TorchScript), read without running it (``torchscript.py``) and checked against
  the SHA-256 in its release URL; a ``torch.save``'d state dict in any of the layouts is read the same way.
* **cmkit**: a model directory (``cmkit.formats.model_dir``: ``config.json`` + ``model.safetensors``, kind
  ``decoder``; the config is also stored in the safetensors metadata, so the file alone is enough), written by
  ``convert_decoder`` and by decoder training.

The user always gives a path; nothing is downloaded.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import CmkitError
from ..formats.model_dir import CONFIG_FILE, MODEL_FILE, cmkit_tag, read_model_dir, save_model_dir
from ..formats.torchscript import OPENAI_DECODER_SHA256, is_torch_zip, is_torchscript, read_torch_zip
from ..formats.zoo import shipped_model_dir
from .config import DecoderConfig
from .keys import check_keys, is_diffusers_vae_layout, is_openai_layout, openai_to_cmkit, strip_diffusers_prefix
from .unet import DecoderUNet

DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")
EXPECTED = (
    "a diffusers ConsistencyDecoderVAE/UNet2DModel .safetensors file or directory "
    "(openai/consistency-decoder), OpenAI's TorchScript decoder.pt, or a cmkit directory from "
    "`cmkit convert-decoder`"
)


@dataclass
class DecoderWeights:
    """A state dict in cmkit names, its config, and where it came from."""

    state_dict: dict[str, Tensor]
    config: DecoderConfig
    source_format: str  # "cmkit" | "diffusers" | "openai-torchscript" | "torch-state-dict"
    path: Path


def is_safetensors(path: Path) -> bool:
    """safetensors files start with a little-endian u64 header length followed by a JSON object."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < (1 << 30)


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors (skipping a ConsistencyDecoderVAE's SD encoder) and metadata of a safetensors file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = [k for k in f.keys() if not k.startswith(("encoder.", "quant_conv."))]
            return {k: f.get_tensor(k) for k in keys}, dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types
        raise CmkitError(f"{path}: unreadable safetensors file ({e})") from None


def infer_config(state: dict[str, Tensor], source: str) -> DecoderConfig:
    """The network shape from the tensor shapes (cmkit names); GroupNorm groups cannot be inferred: 32."""
    try:
        ch0, in_ch = state["conv_in.weight"].shape[:2]
        widths, k = [], 0
        while f"down_blocks.{k}.resnets.0.conv1.weight" in state:
            widths.append(state[f"down_blocks.{k}.resnets.0.conv1.weight"].shape[0])
            k += 1
        layers = 0
        while f"down_blocks.0.resnets.{layers}.conv1.weight" in state:
            layers += 1
        temb = state["time_embedding.linear_1.weight"].shape[0]
        cfg = dict(
            block_out_channels=tuple(widths),
            layers_per_block=layers,
            in_channels=in_ch,
            out_channels=state["conv_out.weight"].shape[0],
            num_train_timesteps=state["time_proj.weight"].shape[0],
            time_embed_dim=None if temb == 4 * ch0 else temb,
        )
    except KeyError as e:
        raise CmkitError(
            f"{source}: no consistency decoder weights ({e.args[0]} missing); expected {EXPECTED}"
        ) from None
    if any(w % 32 for w in widths):
        raise CmkitError(f"{source}: widths {widths} need a config.json (GroupNorm groups cannot be inferred)")
    return DecoderConfig(**cfg)


def to_cmkit_names(state: dict[str, Tensor], num_levels: int | None = None) -> tuple[dict[str, Tensor], str]:
    """Rename any supported layout to cmkit names; returns the layout ("diffusers", "openai" or "cmkit").

    OpenAI's time table may sit outside the ``blocks`` tree (§1.2): if ``time_proj.weight`` is still missing,
    the single graph constant shaped like it (num_timesteps × width) is used.
    """
    keys = list(state)
    if is_diffusers_vae_layout(keys):
        return strip_diffusers_prefix(state), "diffusers"
    if not is_openai_layout(keys):
        return {k: v for k, v in state.items() if not k.startswith("CONSTANTS.")}, "cmkit"
    if num_levels is None:
        levels = [int(m.group(1)) for k in keys if (m := re.search(r"(?:^|\.)down_(\d+)_", k))]
        num_levels = 1 + max(levels, default=3)
    out = {openai_to_cmkit(k, num_levels): v for k, v in state.items() if not k.startswith("CONSTANTS.")}
    if "time_proj.weight" not in out and "conv_in.weight" in out:
        width = out["conv_in.weight"].shape[0]
        tables = [v for k, v in state.items() if k.startswith("CONSTANTS.") and v.ndim == 2 and v.shape[1] == width]
        if len(tables) == 1:
            out["time_proj.weight"] = tables[0]
    return out, "openai"


def expected_shapes(config: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of ``DecoderUNet(config)``, built on the meta device (no memory)."""
    with torch.device("meta"):
        net = DecoderUNet(config)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def _config_beside(path: Path) -> DecoderConfig | None:
    """A cmkit or diffusers decoder ``config.json`` next to a weights file, if there is one."""
    cfg_path = path.parent / CONFIG_FILE
    if not cfg_path.is_file():
        return None
    try:
        d = json.loads(cfg_path.read_text())
    except (OSError, ValueError):
        return None
    return config_from_json(d, cfg_path) if is_decoder_config(d) else None


def is_decoder_config(d: dict[str, Any]) -> bool:
    """cmkit's config, a diffusers ``ConsistencyDecoderVAE`` config, or a ``UNet2DModel`` config."""
    return isinstance(d, dict) and (
        cmkit_tag(d)[0] == "decoder" or "decoder_block_out_channels" in d or d.get("_class_name") == "UNet2DModel"
    )


def config_from_json(d: dict[str, Any], where: Path | str) -> DecoderConfig:
    """A ``DecoderConfig`` from cmkit's ``{"kind": "decoder", "config": {...}}`` or a diffusers config dict."""
    kind, config = cmkit_tag(d)
    if kind == "decoder":
        return DecoderConfig.from_dict(config)
    if is_decoder_config(d):
        return DecoderConfig.from_diffusers(d)
    raise CmkitError(
        f"{where}: not a consistency decoder config (expected cmkit's or a diffusers "
        "ConsistencyDecoderVAE/UNet2DModel config.json)"
    )


def _resolve_directory(path: Path) -> Path:
    """The weights file inside a diffusers directory, or a cmkit model or run directory (``read_model_dir``)."""
    for name in DIFFUSERS_WEIGHTS:
        if (path / name).is_file():
            return path / name
    try:
        return read_model_dir(path, "decoder").weights
    except CmkitError:
        pass
    found = sorted(p.name for p in path.iterdir())[:6]
    raise CmkitError(
        f"{path}: no {MODEL_FILE} or {DIFFUSERS_WEIGHTS[0]} in this directory (found {found}); expected {EXPECTED}"
    )


def load_weights(
    path: str | Path,
    *,
    config: DecoderConfig | None = None,
    verify: bool = True,
    expected_sha256: str = OPENAI_DECODER_SHA256,
) -> DecoderWeights:
    """Read decoder weights from any supported file or directory, renamed and checked against the config.

    Args:
        config: overrides the config found beside the weights or inferred from them.
        verify: check a TorchScript file's SHA-256 against ``expected_sha256`` (OpenAI's release hash).
    Raises:
        CmkitError: missing path, unsupported format, hash mismatch, or missing/unexpected/mis-shaped keys.
    """
    path = _weights_file(Path(path).expanduser())
    raw, found, kind = _read(path, verify, expected_sha256)
    num_levels = len((config or found).block_out_channels) if (config or found) else None
    state, _ = to_cmkit_names(raw, num_levels)
    cfg = config or found or infer_config(state, str(path))
    check_keys(state, expected_shapes(cfg), str(path))
    return DecoderWeights(state, cfg, kind, path)


def _weights_file(path: Path) -> Path:
    """The weights file a user path designates: itself, the one in its (or its config.json's) directory, or a
    shipped model's (a bare name such as ``fmnist-cdec``, when no such path exists)."""
    if not path.exists():
        shipped = shipped_model_dir(str(path))
        if shipped is None:
            raise CmkitError(f"{path}: no such file or directory; expected {EXPECTED}")
        path = shipped
    if path.is_dir():
        return _resolve_directory(path)
    if path.name == CONFIG_FILE:
        return _resolve_directory(path.parent)
    return path


def _read(path: Path, verify: bool, expected_sha256: str) -> tuple[dict[str, Tensor], DecoderConfig | None, str]:
    """Raw tensors, the config stored with them (if any), and the format name."""
    if is_safetensors(path):
        raw, meta = _read_safetensors(path)
        kind, config = cmkit_tag(meta)
        if kind == "decoder":
            try:
                parsed = json.loads(config) if isinstance(config, str) else config
            except ValueError as e:
                raise CmkitError(f"{path}: its decoder config (safetensors metadata) is not JSON ({e})") from None
            if not isinstance(parsed, dict):
                raise CmkitError(f"{path}: its decoder config (safetensors metadata) is not a JSON object")
            return raw, DecoderConfig.from_dict(parsed), "cmkit"
        return raw, _config_beside(path), "diffusers"
    if is_torch_zip(path):
        script = is_torchscript(path)
        raw, _ = read_torch_zip(path, expected_sha256 if (verify and script) else None)
        return raw, _config_beside(path), "openai-torchscript" if script else "torch-state-dict"
    raise CmkitError(f"{path}: unrecognised file format; expected {EXPECTED}")


def save_cmkit(
    state_dict: dict[str, Tensor],
    config: DecoderConfig,
    out_dir: str | Path,
    dtype: torch.dtype | None = None,
    source: dict[str, Any] | None = None,
) -> Path:
    """Write a cmkit model directory of kind ``decoder`` (``cmkit.formats.model_dir.save_model_dir``)."""
    return save_model_dir(out_dir, state_dict, "decoder", config.to_dict(), {"source": source or {}}, dtype=dtype)


def convert_decoder(
    src: str | Path,
    out_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
    verify: bool = True,
    config: DecoderConfig | None = None,
) -> Path:
    """Any supported checkpoint → cmkit's format (optionally cast, e.g. to float16 to halve the size)."""
    weights = load_weights(src, verify=verify, config=config)
    source = {"path": str(weights.path), "format": weights.source_format}
    return save_cmkit(weights.state_dict, weights.config, out_dir, dtype=dtype, source=source)
