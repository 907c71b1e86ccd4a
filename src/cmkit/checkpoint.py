"""Files: model directories and run directories, written atomically as safetensors + JSON (never pickles).

A **model directory** is ``config.json`` + ``model.safetensors``, the same for every kind of model:
``config.json`` is ``{"kind": KIND, "config": {...}, ...}`` (KIND = ``denoiser`` for diffusion and
consistency models, ``autoencoder``, or ``decoder``) and the safetensors metadata repeats kind and config,
so the weights file alone is enough. ``save_model_dir`` writes one, ``read_model_dir`` finds and reads one
(a model directory, a run directory's ``model/``, or a shipped model name).

A **run directory** (``RunDir``) holds ``config.json`` (the run config), ``log.jsonl``, ``samples/``,
``model/`` (the export, rewritten at every checkpoint) and ``checkpoint/`` (every module, the optimizer, the
RNG states, ``state.json`` and the config, for an exact resume). Directories are written beside their final
name and renamed into place, so a crash never leaves half a checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import CmkitError

MODEL_FILE, CONFIG_FILE = "model.safetensors", "config.json"
KINDS = ("denoiser", "autoencoder", "decoder")
#: Earlier layouts that are still read: config.json tag → (kind, weights file).
LEGACY = {"cmkit.kl_autoencoder": ("autoencoder", "autoencoder.safetensors"),
          "cmkit.consistency_decoder": ("decoder", "decoder.safetensors")}


# --- atomic directories ----------------------------------------------------------------------------

def atomic_dir(final: Path) -> Path:
    """A fresh temporary directory next to ``final``; pass it to ``commit_dir`` when complete."""
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit_dir(tmp: Path, final: Path) -> None:
    """Replace ``final`` by the completed ``tmp`` (rename, keeping the old one until the new one is in place)."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (to a temporary file, then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


# --- weights -----------------------------------------------------------------------------------------

def state_dict_for_save(model: nn.Module | dict[str, torch.Tensor],
                        dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors of a module or state dict, floats optionally cast (e.g. fp16 storage)."""
    sd = model.state_dict() if isinstance(model, nn.Module) else model
    sd = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    return sd


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, with one clear error for a missing or corrupt file."""
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as e:
        raise CmkitError(f"cannot read {file}: corrupt or not a safetensors file ({e})") from None


def load_weights(model: nn.Module, file: Path) -> None:
    """Load safetensors weights strictly, with one clear error for corrupt or mismatched files."""
    sd = read_safetensors(file)
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    bad = [k for k in sd if k in own and sd[k].shape != own[k].shape]
    if missing or unexpected or bad:
        raise CmkitError(f"{file} does not match the model in config.json: {len(missing)} missing, "
                         f"{len(unexpected)} unexpected, {len(bad)} wrongly shaped tensors (e.g. "
                         f"{(missing + unexpected + bad)[0]})")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()})


# --- model directories -------------------------------------------------------------------------------

@dataclass
class ModelDir:
    """A model directory as read from disk: its kind, model config, the rest of config.json, weights file."""

    path: Path
    kind: str
    config: dict[str, Any]
    meta: dict[str, Any]
    weights: Path


def save_model_dir(path: str | Path, weights: nn.Module | dict[str, torch.Tensor], kind: str,
                   config: dict[str, Any], meta: dict[str, Any] | None = None,
                   dtype: torch.dtype | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (kind and config also in the metadata) atomically."""
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {KINDS}")
    final = Path(path)
    tmp = atomic_dir(final)
    tag = {"kind": kind, "config": json.dumps(config)}
    save_file(state_dict_for_save(weights, dtype), tmp / MODEL_FILE, metadata=tag)
    write_json(tmp / CONFIG_FILE, {"kind": kind, "config": config, **(meta or {})})
    commit_dir(tmp, final)
    return final


def cmkit_tag(meta: dict[str, Any]) -> tuple[str | None, Any]:
    """(kind, config) of a config.json or safetensors metadata written by cmkit (any layout); (None, None) else."""
    kind, config, _ = _tag(meta)
    return kind, config


def _tag(meta: dict[str, Any]) -> tuple[str | None, Any, str]:
    """(kind, config, weights file name) of a config.json, including the earlier layouts."""
    if "kind" in meta:
        return meta["kind"], meta.get("config"), MODEL_FILE
    if "cmkit_config" in meta:
        return "denoiser", meta["cmkit_config"], MODEL_FILE
    kind, weights = LEGACY.get(meta.get("format"), (None, MODEL_FILE))
    return kind, meta.get("config"), weights


def resolve_model_dir(path: str | Path) -> Path:
    """A model directory, a run directory (its ``model/``), or a shipped model name → the model directory."""
    p = Path(path).expanduser()
    if (p / "model" / CONFIG_FILE).is_file():
        return p / "model"
    if (p / CONFIG_FILE).is_file():
        return p
    from .zoo import shipped_model_dir

    shipped = shipped_model_dir(str(path))
    if shipped is not None:
        return shipped
    raise CmkitError(f"model not found: {p} (expected a directory with {CONFIG_FILE} and {MODEL_FILE}, "
                     f"a training run directory, or a shipped model name; see `cmkit models`)")


def read_model_dir(path: str | Path, kind: str | None = None) -> ModelDir:
    """Find and read a model directory (see ``resolve_model_dir``); ``kind`` checks what it holds."""
    d = resolve_model_dir(path)
    try:
        meta = json.loads((d / CONFIG_FILE).read_text())
        found, config, weights = _tag(meta)
    except (OSError, ValueError, AttributeError) as e:
        raise CmkitError(f"{d / CONFIG_FILE} is not a cmkit model config ({type(e).__name__}: {e})") from None
    if found not in KINDS or not isinstance(config, dict):
        hint = " (a run directory without a model yet?)" if (d / "log.jsonl").exists() else ""
        raise CmkitError(f"{d / CONFIG_FILE} is not a cmkit model config: no kind and config{hint}")
    if kind is not None and found != kind:
        raise CmkitError(f"{d} holds a {found} model, not a {kind} model")
    if not (d / weights).is_file():
        raise CmkitError(f"{d}: no {weights} beside {CONFIG_FILE}")
    meta = {k: v for k, v in meta.items() if k not in ("kind", "config", "cmkit_config", "format")}
    return ModelDir(d, found, config, meta, d / weights)


def load_model(path: str | Path, weights: str = MODEL_FILE, device: str | torch.device = "cpu") -> tuple[nn.Module, Any]:
    """A diffusion or consistency model from a model/run directory or shipped name: (model in eval mode, Config)."""
    from .config import Config

    d = read_model_dir(path, "denoiser")
    cfg = Config.from_dict(d.config)
    model = cfg.model.build()
    load_weights(model, d.path / weights)
    return model.to(device).eval().requires_grad_(False), cfg


# --- optimizer state <-> flat tensors + JSON ---------------------------------------------------------

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


# --- run directories ---------------------------------------------------------------------------------

class RunDir:
    """The files of one training run; every task and command uses these names (and only these)."""

    OPTIMIZER, RNG, STATE = "optimizer.safetensors", "rng.safetensors", "state.json"

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.config = self.root / CONFIG_FILE
        self.log = self.root / "log.jsonl"
        self.samples = self.root / "samples"
        self.checkpoint = self.root / "checkpoint"
        self.model = self.root / "model"

    @staticmethod
    def weights_name(ema_rate: float | None) -> str:
        """``ema_<rate>`` for an evaluation EMA, ``model`` for the online weights (file stem)."""
        return "model" if ema_rate is None else f"ema_{ema_rate:g}"

    def has_checkpoint(self) -> bool:
        return (self.checkpoint / self.STATE).is_file()

    def state(self) -> dict[str, Any]:
        return json.loads((self.checkpoint / self.STATE).read_text())

    def saved_config(self) -> dict[str, Any]:
        """The run config stored with the checkpoint (the record of how the run was started)."""
        return json.loads((self.checkpoint / CONFIG_FILE).read_text())

    def save_checkpoint(self, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
                        rng: dict[str, torch.Tensor], state: dict[str, Any], config: dict[str, Any]) -> None:
        """``checkpoint/``: ``<name>.safetensors`` per module, optimizer, RNG states, state.json, config.json."""
        tmp = atomic_dir(self.checkpoint)
        for name, module in modules.items():
            save_file(state_dict_for_save(module), tmp / f"{name}.safetensors")
        tensors, meta = optimizer_to_flat(optimizer)
        save_file(tensors, tmp / self.OPTIMIZER)
        save_file(rng, tmp / self.RNG)
        write_json(tmp / self.STATE, {**state, "optimizer": meta})
        write_json(tmp / CONFIG_FILE, config)
        commit_dir(tmp, self.checkpoint)

    def load_checkpoint(self, modules: dict[str, nn.Module],
                        optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Restore every module and the optimizer; returns (state, RNG tensors)."""
        for name, module in modules.items():
            load_weights(module, self.checkpoint / f"{name}.safetensors")
        state = self.state()
        optimizer_from_flat(optimizer, read_safetensors(self.checkpoint / self.OPTIMIZER), state["optimizer"])
        return state, read_safetensors(self.checkpoint / self.RNG)

    def append_log(self, record: dict[str, Any]) -> None:
        with open(self.log, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_log(self, step: int) -> None:
        """Drop log rows written after the checkpoint a run resumes from (they will be redone)."""
        if self.log.is_file():
            keep = [ln for ln in self.log.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
            tmp = self.log.with_name(self.log.name + ".tmp")
            tmp.write_text("".join(ln + "\n" for ln in keep))
            os.replace(tmp, self.log)
