"""Starting from the field's released diffusion and consistency models, whatever their file format.

``checkpoint_format(path)`` tells a cmkit model/run directory, an EDM-style pickle (``.pkl``, or a
``torch.save`` archive embedding ``torch_utils.persistence`` modules: ECT training states), a Flax msgpack
training state (openai/consistency_models_cifar10 ``checkpoint_N``) and a plain torch state dict apart, by content.
``read_released_net`` reads the two foreign formats into (cmkit ``model`` section, backbone state dict);
``load_denoiser`` builds a ready model from any of them (``train.teacher``), ``init_from`` loads one into a
model being trained (``train.init_from``), dropping EDM's unused augmentation input when the student has none.
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import CmkitError


def checkpoint_format(path: str | Path) -> str:
    """``model-dir``, ``edm-pickle``, ``flax-msgpack`` or ``torch`` (a state dict archive), or one error line."""
    p = Path(path).expanduser()
    if not p.exists() and p.suffix in (".pkl", ".pickle", ".pt", ".pth", ".bin"):
        raise CmkitError(f"checkpoint not found: {p} (released models are never downloaded: give the file you have)")
    if p.is_dir() or not p.exists():
        return "model-dir"  # directories, run directories and shipped names: checkpoint.read_model_dir
    with open(p, "rb") as f:
        head = f.read(4)
    if head[:1] == b"\x80":  # a pickle: EDM's when it holds persistent objects (a legacy torch.save does not)
        if p.suffix in (".pkl", ".pickle"):
            return "edm-pickle"
        import mmap

        with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return "edm-pickle" if m.find(b"_reconstruct_persistent_obj") >= 0 else "torch"
    if head[:1] and (0x81 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF)):
        return "flax-msgpack"
    if head == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(p) as z:
                pkl = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                if pkl is not None and b"torch_utils.persistence" in z.read(pkl):
                    return "edm-pickle"
        except (zipfile.BadZipFile, OSError):
            pass
        return "torch"
    raise CmkitError(f"{p}: not a model directory, an EDM .pkl, a Flax msgpack checkpoint or a torch archive")


def read_released_net(path: str | Path, precond: str | None = None,
                      img_resolution: int | None = None) -> tuple[dict[str, Any], dict[str, Tensor], str]:
    """(model section, backbone state dict, format) of an EDM-style pickle or a Flax CIFAR-10 checkpoint;
    ``precond`` overrides the preconditioning (a Flax file does not say whether it holds the EDM teacher) and
    ``img_resolution`` the image side of a Flax file (32)."""
    fmt = checkpoint_format(path)
    if fmt == "edm-pickle":
        from .edm_pickle import read_edm_pickle

        model, state, _ = read_edm_pickle(path)
    elif fmt == "flax-msgpack":
        from .jax_cifar10 import read_jax_cifar10

        model, state = read_jax_cifar10(path, precond or "cm", img_resolution or 32)
    else:
        raise CmkitError(f"{path} is not an EDM pickle or a Flax msgpack checkpoint (it is a {fmt})")
    if precond is not None:
        model["precond"] = precond
    return model, state, fmt


def config_for(model: dict[str, Any]) -> Any:
    """A cmkit ``Config`` holding a released network's ``model`` section (EDM-type runs sample with Heun)."""
    from ..config import Config, set_value

    cfg = Config()
    for key, value in model.items():
        set_value(cfg, f"model.{key}", value)
    cfg.loss.method = "edm" if model["precond"] in ("edm", "vp", "ve") else "cd"
    cfg.sample.sampler = "heun" if cfg.loss.method == "edm" else "onestep"
    cfg.model.check()
    return cfg


def load_denoiser(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Any]:
    """(model in eval mode, Config) from a model/run directory, an EDM pickle or a Flax checkpoint."""
    if checkpoint_format(path) == "model-dir":
        from ..checkpoint import load_model

        return load_model(path, device=device)
    from ..checkpoint import load_state

    model_section, state, _ = read_released_net(path)
    cfg = config_for(model_section)
    model = cfg.model.build()
    load_state(model.net, state, str(path), f"the {model_section['arch']} network its init kwargs describe")
    return model.to(device).eval().requires_grad_(False), cfg


def init_from(model: nn.Module, path: str | Path, model_cfg: Any) -> None:
    """Load the weights of ``path`` (any format ``load_denoiser`` reads) into ``model``'s backbone. From an EDM
    pickle or Flax file the network must be the run's (``model.arch`` and shape); EDM's augmentation input
    (``map_augment``), never used without augmentation labels, is dropped when the run's network has none."""
    from ..checkpoint import load_state, read_model_dir, read_safetensors

    if checkpoint_format(path) == "model-dir":
        d = read_model_dir(path, "denoiser")
        sd = read_safetensors(d.weights)
        # sCM's learned weighting w_φ (``logvar``) is not part of a diffusion model: it starts fresh
        fresh = {k: v for k, v in model.state_dict().items() if k.startswith("logvar.")}
        if fresh and not any(k.startswith("logvar.") for k in sd):
            sd = {**sd, **fresh}
        load_state(model, sd, str(d.weights), "the model in config.json")
        _refit_time_input(model, d.config, sd, path, model_cfg)
        return
    section, state, _ = read_released_net(path)
    keys = ("arch", "img_resolution", "in_channels", "model_channels", "channel_mult", "num_blocks",
            "attn_resolutions", "num_classes")
    differ = [f"model.{k}={section[k]!r} (the run has {getattr(model_cfg, k)!r})" for k in keys
              if (tuple(section[k]) if isinstance(section[k], (list, tuple)) else section[k])
              != (tuple(getattr(model_cfg, k)) if isinstance(getattr(model_cfg, k), (list, tuple))
                  else getattr(model_cfg, k))]
    if differ:
        raise CmkitError(f"train.init_from={path} holds another network: {'; '.join(differ[:3])}")
    if not model_cfg.augment_dim:
        state = {k: v for k, v in state.items() if not k.startswith("map_augment.")}
    load_state(model.net, state, str(path), f"the run's {model_cfg.arch} network")


#: The model fields that decide how a network embeds σ (the noise input and its features).
TIME_FIELDS = ("precond", "time_input", "embedding", "positional_scale", "fourier_scale")


def _refit_time_input(model: nn.Module, source_config: dict[str, Any], sd: dict[str, Tensor], path: str | Path,
                      model_cfg: Any) -> None:
    """When the run embeds the noise level differently from the source model (e.g. sCM's c_noise(t) = t from an
    EDM teacher's ln(σ)/4), fit the run's embedding MLP to the source's (``cmkit.retime``), with one line on
    stderr."""
    import sys

    from ..config import Config
    from ..retime import fit_time_embedding, needs_refit

    src_cfg = Config.from_dict(source_config).model
    if all(getattr(src_cfg, k) == getattr(model_cfg, k) for k in TIME_FIELDS):
        return  # the same noise input (TCM from ECT, sCD/sCT from a TrigFlow teacher): nothing to build
    src = src_cfg.build()
    src.load_state_dict({k: v for k, v in sd.items() if k in src.state_dict()}, strict=False)
    src.to(next(model.parameters()).device).eval().requires_grad_(False)
    lo, hi = model_cfg.sigma_min, model_cfg.sigma_max
    if not needs_refit(src, model, lo, hi):
        return
    err = fit_time_embedding(src, model, sigma_min=lo, sigma_max=hi)
    print(f"train.init_from={path}: the run's time input differs from the source's; fitted its noise-embedding "
          "MLP to the source's (cmkit.retime), relative error " +
          ", ".join(f"{e:.2f} at σ={s:g}" for s, e in err.items()), file=sys.stderr)
