"""cmkit's model directory: ``config.json`` + ``model.safetensors``, the same for every kind of model.

``config.json`` is ``{"kind": KIND, "config": {...}, ...}`` (KIND = ``denoiser`` for diffusion and consistency
models, ``autoencoder``, or ``decoder``) and the safetensors metadata repeats kind and config, so the weights file
alone is enough. ``save_model_dir`` writes one atomically; ``read_model_dir`` finds and reads one (a model
directory, a run directory's ``model/``, or a shipped model name) and returns its config as a plain dict:
building the network from it is ``cmkit.load``'s job.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import CmkitError
from ..files import atomic_dir, commit_dir, seal_dir, state_dict_for_save
from .zoo import shipped_model_dir

MODEL_FILE, CONFIG_FILE = "model.safetensors", "config.json"
LORA_FILE = "lora.safetensors"  # a LoRA run's adapters beside its merged model (cmkit.nets.lora)


MODEL_KINDS = ("denoiser", "autoencoder", "decoder")


#: Earlier layouts that are still read: config.json tag → (kind, weights file).
LEGACY = {
    "cmkit.kl_autoencoder": ("autoencoder", "autoencoder.safetensors"),
    "cmkit.consistency_decoder": ("decoder", "decoder.safetensors"),
}


def _a(word: str) -> str:
    """``word`` with its indefinite article (an autoencoder, a decoder)."""
    return ("an " if word[:1] in tuple("aeiou") else "a ") + word


@dataclass
class ModelDir:
    """A model directory as read from disk: its kind, model config, the rest of config.json, weights file."""

    path: Path
    kind: str
    config: dict[str, Any]
    meta: dict[str, Any]
    weights: Path


def save_model_dir(
    path: str | Path,
    weights: nn.Module | dict[str, torch.Tensor],
    kind: str,
    config: dict[str, Any],
    meta: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    extra: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (kind and config also in the metadata) atomically, with
    ``extra`` safetensors files beside them (name → tensors; a LoRA run's ``lora.safetensors``).

    An existing ``path`` is replaced only when it holds nothing but such files (a model directory);
    anything else there is refused with one line, so no other file is ever lost.
    """
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {MODEL_KINDS}")
    final = Path(path)
    if final.exists():
        other = sorted(p.name for p in final.iterdir()) if final.is_dir() else [final.name]
        other = [n for n in other if n not in (CONFIG_FILE, MODEL_FILE, LORA_FILE)]
        if other:
            raise CmkitError(
                f"{final} holds other files ({', '.join(other[:4])}); a model directory is written "
                f"only into a new directory or over one holding just {CONFIG_FILE} and {MODEL_FILE}"
            )
    tmp = atomic_dir(final)
    tag = {"kind": kind, "config": json.dumps(config)}
    save_file(state_dict_for_save(weights, dtype), tmp / MODEL_FILE, metadata=tag)
    for name, tensors in (extra or {}).items():
        save_file(tensors, tmp / name, metadata={"format": "pt"})
    seal_dir(tmp, CONFIG_FILE, {"kind": kind, "config": config, **(meta or {})})
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
    """A model directory, a run directory (its ``model/``), or a shipped model name → the model directory.

    A path that exists always wins over a shipped model of the same name: ``--model fmnist-cd`` in a directory
    holding a run ``./fmnist-cd`` means that run (and is an error while the run has no model yet), never the
    shipped model. When a bare name is both a local model and a shipped one, one line on stderr says which was
    used. A name with a directory part (``./fmnist-cd``, ``runs/x``) is only ever a path.
    """
    p = Path(path).expanduser()
    shipped = shipped_model_dir(str(path))
    if shipped is not None and p.exists() and p.resolve() == shipped.resolve():
        return shipped  # run from inside the shipped models' folder: the same directory either way
    hint = (
        f"; a local path takes precedence over the shipped model {path!r}, which is at {shipped}"
        if shipped is not None
        else ""
    )
    if p.exists():
        run_files = (p / "log.jsonl").exists() or (p / "checkpoint").exists()
        weights_beside = any((p / w).is_file() for w in (MODEL_FILE, *(w for _, w in LEGACY.values())))
        if (p / "model" / CONFIG_FILE).is_file():
            d = p / "model"
        elif (p / CONFIG_FILE).is_file() and (weights_beside or not run_files):
            d = p
        elif p.is_dir() and run_files:
            raise CmkitError(
                f"model not found: {p} is a training run without a model yet (model/{CONFIG_FILE} is "
                f"written at its first checkpoint){hint}"
            )
        else:
            raise CmkitError(f"model not found: {p} holds no {CONFIG_FILE} or model/{CONFIG_FILE}{hint}")
        if shipped is not None:
            print(
                f"cmkit: {path!r} is both a local model and a shipped one: using the local {d} "
                f"(the shipped one is {shipped})",
                file=sys.stderr,
            )
        return d
    if shipped is not None:
        return shipped
    raise CmkitError(
        f"model not found: {p} (expected a directory with {CONFIG_FILE} and {MODEL_FILE}, "
        f"a training run directory, or a shipped model name; see `cmkit models`)"
    )


def read_model_dir(path: str | Path, kind: str | None = None) -> ModelDir:
    """Find and read a model directory (see ``resolve_model_dir``); ``kind`` checks what it holds."""
    d = resolve_model_dir(path)
    try:
        meta = json.loads((d / CONFIG_FILE).read_text())
        found, config, weights = _tag(meta)
    except (OSError, ValueError, AttributeError) as e:
        raise CmkitError(f"{d / CONFIG_FILE} is not a cmkit model config ({type(e).__name__}: {e})") from None
    if found not in MODEL_KINDS or not isinstance(config, dict):
        hint = " (a run directory without a model yet?)" if (d / "log.jsonl").exists() else ""
        raise CmkitError(f"{d / CONFIG_FILE} is not a cmkit model config: no kind and config{hint}")
    if kind is not None and found != kind:
        raise CmkitError(f"{d} holds {_a(found)} model, not {_a(kind)} model")
    if not (d / weights).is_file():
        raise CmkitError(f"{d}: no {weights} beside {CONFIG_FILE}")
    meta = {k: v for k, v in meta.items() if k not in ("kind", "config", "cmkit_config", "format")}
    return ModelDir(d, found, config, meta, d / weights)
