"""Checkpoints as ``model.safetensors`` + ``config.json`` (+ training state); never pickles of code.

A *model directory* holds ``config.json`` and ``model.safetensors`` (the weights to sample with, the EMA
for trained runs). A *run directory* (``train.out_dir``) holds ``model/`` (exported), ``checkpoint/``
(online weights, EMAs, target, optimizer, step and RNG states for exact resume), ``samples/`` and
``log.jsonl``. Directories are replaced atomically (written beside, then renamed).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import Config, ModelConfig
from .errors import CmkitError
from .nets import build_net
from .precond import Precond

MODEL_FILE, CONFIG_FILE = "model.safetensors", "config.json"
NET_KEYS = ("img_resolution", "in_channels", "model_channels", "channel_mult", "num_blocks", "attn_resolutions",
            "dropout", "num_classes", "embedding", "fourier_scale", "head_channels", "hidden", "depth")


def build_model(m: ModelConfig) -> Precond:
    """Backbone + preconditioning from a ModelConfig (``model(x, sigma, class_labels=None) -> x0``)."""
    d = asdict(m)
    net = build_net(m.arch, **{k: d[k] for k in NET_KEYS})
    return Precond(net, m.precond, m.sigma_data, m.sigma_min, m.sigma_max)


def state_dict_for_save(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    return sd


def atomic_dir(final: Path) -> Path:
    """A fresh temporary directory next to ``final``; pass it to ``commit_dir`` when complete."""
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit_dir(tmp: Path, final: Path) -> None:
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def save_model_dir(path: str | Path, model: nn.Module, cfg: Config, extra: dict[str, Any] | None = None,
                   dtype: torch.dtype | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (optionally fp16 storage) atomically."""
    final = Path(path)
    tmp = atomic_dir(final)
    save_file(state_dict_for_save(model, dtype), tmp / MODEL_FILE)
    meta = {"cmkit_config": cfg.to_dict(), **(extra or {})}
    (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    commit_dir(tmp, final)
    return final


def read_config(path: str | Path) -> tuple[Config, dict[str, Any]]:
    """Read ``config.json`` of a model or run directory: (Config, the whole JSON)."""
    p = Path(path) / CONFIG_FILE
    if not p.is_file():
        raise CmkitError(f"no {CONFIG_FILE} in {Path(path)} (expected a cmkit model directory)")
    try:
        meta = json.loads(p.read_text())
        return Config.from_dict(meta["cmkit_config"]), meta
    except (json.JSONDecodeError, KeyError) as e:
        raise CmkitError(f"{p} is not a cmkit config ({type(e).__name__}: {e})") from None


def resolve_model_dir(path: str | Path) -> Path:
    """Accept a model directory, a run directory (uses its ``model/``), or a shipped model name."""
    p = Path(path)
    if (p / MODEL_FILE).is_file() and (p / CONFIG_FILE).is_file():
        return p
    if (p / "model" / MODEL_FILE).is_file():
        return p / "model"
    from .zoo import shipped_model_dir

    shipped = shipped_model_dir(str(path))
    if shipped is not None:
        return shipped
    raise CmkitError(f"model not found: {p} (expected a directory with {CONFIG_FILE} and {MODEL_FILE}, "
                     f"a training run directory, or a shipped model name; see `cmkit models`)")


def load_weights(model: nn.Module, file: Path) -> None:
    """Load safetensors weights strictly, with one clear error for corrupt or mismatched files."""
    try:
        sd = load_file(file)
    except (SafetensorError, OSError, ValueError) as e:
        raise CmkitError(f"cannot read {file}: corrupt or not a safetensors file ({e})") from None
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    bad = [k for k in sd if k in own and sd[k].shape != own[k].shape]
    if missing or unexpected or bad:
        raise CmkitError(f"{file} does not match the model in config.json: {len(missing)} missing, "
                         f"{len(unexpected)} unexpected, {len(bad)} wrongly shaped tensors (e.g. "
                         f"{(missing + unexpected + bad)[0]})")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()})


def load_model(path: str | Path, weights: str = MODEL_FILE, device: str | torch.device = "cpu") -> tuple[Precond, Config]:
    """Build the model described by ``config.json`` and load its weights; returns it in eval mode."""
    d = resolve_model_dir(path)
    cfg, _ = read_config(d)
    model = build_model(cfg.model)
    load_weights(model, d / weights)
    return model.to(device).eval().requires_grad_(False), cfg


# --- optimizer state <-> flat tensors + JSON -----------------------------------------------------------

def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, v in list(tensors.items()) + list(meta["scalars"].items()):
        idx, k = name.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
