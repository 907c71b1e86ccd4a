"""OpenAI's released consistency-model weights for ``ADMUNet``: the ``.pt`` state dicts of
openai/consistency_models and the diffusers ``UNet2DModel`` layout of the ``openai/diffusers-*`` copies.

* ``read_openai_pt(path)``: a plain state dict through ``torch.load(weights_only=True)`` (a file that needs
  full unpickling is refused, nothing in it runs).
* ``adm_config_from_state(state)``: the network shape from the key names and tensor shapes; the image side
  follows from ``channel_mult`` as in the reference's ``create_model`` (64 → 1,2,3,4; 256 → 1,1,2,2,4,4).
* ``diffusers_to_openai`` / ``openai_to_diffusers``: the key mapping of diffusers'
  ``scripts/convert_consistency_to_diffusers.py``, both ways; attention ``qkv`` [3C, C, 1, 1] is
  split into ``to_q/k/v`` [C, C] in (three, heads, head_dim) order.

The state dicts here are the network's own (no ``net.`` prefix of ``cmkit.precond.Precond``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import CmkitError
from ..files import read_safetensors, read_torch_state_dict

#: ``create_model``'s channel_mult for each image side (guided-diffusion / consistency_models script_util).
CHANNEL_MULT = {64: (1, 2, 3, 4), 128: (1, 1, 2, 3, 4), 256: (1, 1, 2, 2, 4, 4)}


def read_openai_pt(path: str | Path) -> dict[str, Tensor]:
    """The state dict of a released ``.pt``/``.bin``, read without running any code from the file."""
    return read_torch_state_dict(path, "checkpoint", "expected a consistency_models .pt state dict")


def _blocks(state: dict[str, Tensor], prefix: str) -> int:
    ids = {int(m.group(1)) for k in state if (m := re.match(rf"{prefix}\.(\d+)\.", k))}
    return max(ids) + 1 if ids else 0


def adm_config_from_state(state: dict[str, Tensor], img_resolution: int | None = None) -> dict[str, Any]:
    """``ModelConfig`` fields (arch adm) of an openai-layout state dict; one-line errors if it is not one.

    Levels L and blocks B follow from the output blocks: L·(B + 1) of them, L − 1 holding an up-ResBlock."""
    try:
        emb_dim, C = state["time_embed.0.weight"].shape
        in_channels = state["input_blocks.0.0.weight"].shape[1]
        emb_out = state["input_blocks.1.0.emb_layers.1.weight"].shape[0]
    except KeyError as e:
        raise CmkitError(f"not an ADM (consistency_models) state dict: no {e} key") from None
    n_out = _blocks(state, "output_blocks")
    ups = sum(1 for n in range(n_out) for j in (1, 2) if f"output_blocks.{n}.{j}.in_layers.0.weight" in state)
    levels = ups + 1
    if n_out % levels:
        raise CmkitError(f"not an ADM state dict: {n_out} output blocks do not split into {levels} levels")
    blocks = n_out // levels - 1
    mult, attn_levels = [], []
    for level in range(levels):
        first = 1 + level * (blocks + 1)
        mult.append(int(state[f"input_blocks.{first}.0.out_layers.3.weight"].shape[0] // C))
        attn_levels.append(f"input_blocks.{first}.1.qkv.weight" in state)
    side = img_resolution or {v: k for k, v in CHANNEL_MULT.items()}.get(tuple(mult))
    if side is None:
        raise CmkitError(f"cannot tell the image size of channel_mult {tuple(mult)}; give it (model.img_resolution)")
    return {
        "arch": "adm",
        "img_resolution": int(side),
        "in_channels": int(in_channels),
        "model_channels": int(C),
        "channel_mult": tuple(mult),
        "num_blocks": int(blocks),
        "attn_resolutions": tuple(side >> level for level, a in enumerate(attn_levels) if a),
        "num_classes": int(state["label_emb.weight"].shape[0]) if "label_emb.weight" in state else 0,
        "head_channels": 64,
        "scale_shift": int(emb_out) == 2 * mult[0] * int(C),
        "resblock_updown": True,
        "embedding": "positional",
    }


# --- diffusers UNet2DModel <-> openai names ----------------------------------------------------------

RES = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
TOP = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb": "class_embedding",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}


def _block_names(levels: int, blocks: int) -> dict[str, str]:
    """openai module prefix → diffusers module prefix, for every ResBlock and attention block."""
    names: dict[str, str] = {}
    i = 1
    for level in range(levels):
        for j in range(blocks):
            names[f"input_blocks.{i}.0"] = f"down_blocks.{level}.resnets.{j}"
            names[f"input_blocks.{i}.1"] = f"down_blocks.{level}.attentions.{j}"
            i += 1
        if level != levels - 1:
            names[f"input_blocks.{i}.0"] = f"down_blocks.{level}.downsamplers.0"
            i += 1
    names.update(
        {
            "middle_block.0": "mid_block.resnets.0",
            "middle_block.1": "mid_block.attentions.0",
            "middle_block.2": "mid_block.resnets.1",
        }
    )
    n = 0
    for up in range(levels):
        for j in range(blocks + 1):
            names[f"output_blocks.{n}.0"] = f"up_blocks.{up}.resnets.{j}"
            names[f"output_blocks.{n}.1"] = f"up_blocks.{up}.attentions.{j}"
            if j == blocks and up != levels - 1:  # the up-ResBlock closes every level but the top one
                names[f"output_blocks.{n}.1#up"] = names[f"output_blocks.{n}.2"] = f"up_blocks.{up}.upsamplers.0"
            n += 1
    return names


def openai_to_diffusers(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """An openai-layout state dict in diffusers ``UNet2DModel`` names (qkv split into to_q/k/v)."""
    cfg = adm_config_from_state(state, img_resolution=1)
    names = _block_names(len(cfg["channel_mult"]), cfg["num_blocks"])
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        module, _, leaf = key.rpartition(".")
        if module in TOP:
            out[f"{TOP[module]}.{leaf}"] = value
            continue
        m = re.match(r"((?:input_blocks|output_blocks|middle_block)(?:\.\d+)?\.\d+)\.(.+)", module)
        if m is None:
            raise CmkitError(f"unexpected key {key!r} for an ADM state dict")
        block, inner = m.groups()
        is_attn = inner in ("norm", "qkv", "proj_out")
        target = names.get(block if is_attn or not block.endswith(".1") else block + "#up", names.get(block))
        if target is None:
            raise CmkitError(f"unexpected key {key!r} for an ADM state dict")
        if not is_attn:
            out[f"{target}.{RES[inner]}.{leaf}"] = value
        elif inner == "norm":
            out[f"{target}.group_norm.{leaf}"] = value
        elif inner == "proj_out":
            out[f"{target}.to_out.0.{leaf}"] = value.reshape(value.shape[0], -1) if leaf == "weight" else value
        else:
            for name, part in zip(("to_q", "to_k", "to_v"), value.chunk(3, dim=0)):
                out[f"{target}.{name}.{leaf}"] = part.reshape(part.shape[0], -1) if leaf == "weight" else part
    return out


def diffusers_to_openai(state: dict[str, Tensor], levels: int, blocks: int) -> dict[str, Tensor]:
    """The inverse of ``openai_to_diffusers`` for a network of ``levels`` levels and ``blocks`` blocks each."""
    names = _block_names(levels, blocks)
    inverse_top = {v: k for k, v in TOP.items()}
    inverse_res = {v: k for k, v in RES.items()}
    targets: dict[str, list[str]] = {}
    for openai_name, diffusers_name in names.items():
        targets.setdefault(diffusers_name, []).append(openai_name)
    out: dict[str, Tensor] = {}
    qkv: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        module, _, leaf = key.rpartition(".")
        if module in inverse_top:
            out[f"{inverse_top[module]}.{leaf}"] = value
            continue
        m = re.match(
            r"(.+?)\.(norm1|conv1|time_emb_proj|norm2|conv2|conv_shortcut|group_norm|to_q|to_k|to_v|to_out\.0)$", module
        )
        if m is None or m.group(1) not in targets:
            raise CmkitError(f"unexpected diffusers key {key!r} for a consistency-model UNet2DModel")
        block, part = m.groups()
        if part in inverse_res:
            candidates = [t for t in targets[block] if not t.endswith("#up")]
            # an up-ResBlock sits at .1 when its output block has no attention, else at .2
            openai_block = candidates[0]
            if block.endswith("upsamplers.0"):
                n = openai_block.split(".")[1]
                has_attn = any(k.startswith(block.replace("upsamplers.0", "attentions.")) for k in state)
                openai_block = f"output_blocks.{n}.{2 if has_attn else 1}"
            out[f"{openai_block}.{inverse_res[part]}.{leaf}"] = value
        else:
            openai_block = targets[block][0]
            if part == "group_norm":
                out[f"{openai_block}.norm.{leaf}"] = value
            elif part == "to_out.0":
                out[f"{openai_block}.proj_out.{leaf}"] = value[..., None, None] if leaf == "weight" else value
            else:
                qkv.setdefault(f"{openai_block}.qkv.{leaf}", {})[part] = value
    for key, parts in qkv.items():
        stacked = torch.cat([parts["to_q"], parts["to_k"], parts["to_v"]], dim=0)
        out[key] = stacked[..., None, None] if key.endswith("weight") else stacked
    return out


# --- reading either release format ---------------------------------------------------------------------


def read_released(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """An openai-layout state dict and what is known of its shape, from a consistency_models ``.pt``/``.bin``
    or a diffusers ``UNet2DModel`` directory (``config.json`` + ``diffusion_pytorch_model.{safetensors,bin}``,
    or a pipeline directory holding ``unet/``). The second value holds ``img_resolution`` and
    ``head_channels`` when a diffusers config gives them."""
    import json

    p = Path(path).expanduser()
    if not p.exists():
        raise CmkitError(
            f"checkpoint not found: {p} (expected a consistency_models .pt file or a diffusers UNet2DModel directory)"
        )
    if p.is_dir() and (p / "unet" / "config.json").is_file():
        p = p / "unet"
    if p.is_file():
        return read_openai_pt(p), {}
    if not (p / "config.json").is_file():
        raise CmkitError(
            f"{p}: expected a consistency_models .pt file or a diffusers UNet2DModel directory "
            "(config.json + diffusion_pytorch_model.safetensors)"
        )
    config = json.loads((p / "config.json").read_text())
    if config.get("_class_name") not in (None, "UNet2DModel"):
        raise CmkitError(f"{p / 'config.json'} describes a {config.get('_class_name')}, not a UNet2DModel")
    weights = next(
        (p / n for n in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin") if (p / n).is_file()),
        None,
    )
    if weights is None:
        raise CmkitError(f"{p}: no diffusion_pytorch_model.safetensors or .bin beside config.json")
    if weights.suffix == ".safetensors":
        state = read_safetensors(weights)
    else:
        state = read_openai_pt(weights)
    blocks = config.get("layers_per_block", 2)
    levels = len(config.get("block_out_channels", ()))
    known = {"img_resolution": config.get("sample_size"), "head_channels": config.get("attention_head_dim", 64)}
    return diffusers_to_openai(state, levels, blocks), {k: v for k, v in known.items() if v}


def released_model_config(
    state: dict[str, Tensor], known: dict[str, Any], precond: str, img_resolution: int | None = None
) -> dict[str, Any]:
    """The ``model`` section of a cmkit config for a released ADM state dict."""
    fields = adm_config_from_state(state, img_resolution or known.get("img_resolution"))
    fields["head_channels"] = int(known.get("head_channels", 64))
    return {**fields, "precond": precond}


#: The released models' training grids and the 2-step σ of their ``launch.sh`` (``--ts`` converted to σ on
#: the N-point Karras grid as ``cm/karras_diffusion.py`` does): name → (method, N, σ_mid or None).
RELEASED_MODELS: dict[str, tuple[str, int, float | None]] = {
    "cd_imagenet64_l2": ("cd", 40, 1.3824),
    "cd_imagenet64_lpips": ("cd", 40, 1.3824),
    "ct_imagenet64": ("ct", 201, 1.9128),
    "cd_bedroom256_lpips": ("cd", 40, 4.3656),
    "cd_bedroom256_l2": ("cd", 40, 3.5197),
    "ct_bedroom256": ("ct", 151, 3.9912),
    "cd_cat256_lpips": ("cd", 40, None),
    "cd_cat256_l2": ("cd", 40, None),
    "ct_cat256": ("ct", 151, 5.2485),
}


def released_name(path: str | Path) -> str | None:
    """The released model a file or directory is named after (``cd_imagenet64_l2.pt``,
    ``diffusers-cd_imagenet64_l2/``), or None."""
    stem = Path(path).name.split(".")[0].removeprefix("diffusers-")
    return stem if stem in RELEASED_MODELS else None


def released_overrides(name: str) -> dict[str, Any]:
    """Config values that make a converted model sample like the paper: its training grid (so ``--steps 2``
    lies on it) and the published 2-step σ."""
    method, N, mid = RELEASED_MODELS[name]
    values: dict[str, Any] = {"loss.method": method}
    if method == "cd":
        values["loss.num_scales"] = N
    else:  # CT's final grid: N(K) = s1 + 1 (ct_adaptive_schedule at the end of training)
        values.update({"loss.s0": 2, "loss.s1": N - 1})
    if mid is not None:
        values["sample.sigmas"] = (80.0, mid)
    return values


def diffusers_unet_config(model: dict[str, Any]) -> dict[str, Any]:
    """The ``UNet2DModel`` config of an ADM ``model`` config section (the Hub configuration's block types)."""
    C, mult, attn, side = (
        model["model_channels"],
        model["channel_mult"],
        model["attn_resolutions"],
        model["img_resolution"],
    )
    if not model.get("resblock_updown", True):
        raise CmkitError("only ADM networks with resblock_updown (the released ones) have a diffusers layout here")
    levels = [side >> level in attn for level in range(len(mult))]
    return {
        "_class_name": "UNet2DModel",
        "sample_size": side,
        "in_channels": model["in_channels"],
        "out_channels": model["in_channels"],
        "layers_per_block": model["num_blocks"],
        "block_out_channels": [C * m for m in mult],
        "down_block_types": ["AttnDownBlock2D" if a else "ResnetDownsampleBlock2D" for a in levels],
        "up_block_types": ["AttnUpBlock2D" if a else "ResnetUpsampleBlock2D" for a in reversed(levels)],
        "downsample_type": "resnet",
        "upsample_type": "resnet",
        "attention_head_dim": model["head_channels"],
        "norm_num_groups": 32,
        "attn_norm_num_groups": 32,
        "norm_eps": 1e-5,
        "resnet_time_scale_shift": "scale_shift" if model["scale_shift"] else "default",
        "num_class_embeds": model["num_classes"] or None,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "time_embedding_type": "positional",
        "dropout": model.get("dropout", 0.0),
    }


def export_diffusers_pipeline(
    state: dict[str, Tensor], model: dict[str, Any], out: str | Path, num_train_timesteps: int = 40
) -> Path:
    """A ``ConsistencyModelPipeline`` directory (``model_index.json``, ``unet/``, ``scheduler/``) from the
    network state dict (openai names) and ``model`` config section of a cmkit consistency model."""
    import json

    from safetensors.torch import save_file

    out = Path(out)
    if model.get("precond") != "cm" or model.get("arch") != "adm":
        raise CmkitError(
            "a diffusers ConsistencyModelPipeline needs an ADM consistency model (model.arch=adm, model.precond=cm)"
        )
    (out / "unet").mkdir(parents=True, exist_ok=True)
    (out / "scheduler").mkdir(exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in openai_to_diffusers(state).items()},
        out / "unet" / "diffusion_pytorch_model.safetensors",
    )
    (out / "unet" / "config.json").write_text(json.dumps(diffusers_unet_config(model), indent=2))
    scheduler = {
        "_class_name": "CMStochasticIterativeScheduler",
        "num_train_timesteps": num_train_timesteps,
        "sigma_min": model["sigma_min"],
        "sigma_max": model["sigma_max"],
        "sigma_data": model["sigma_data"],
        "s_noise": 1.0,
        "rho": 7.0,
        "clip_denoised": True,
    }
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    index = {
        "_class_name": "ConsistencyModelPipeline",
        "unet": ["diffusers", "UNet2DModel"],
        "scheduler": ["diffusers", "CMStochasticIterativeScheduler"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out
