"""Which file format a released model is in, told by content, and the reader of the foreign ones.

``checkpoint_format(path)`` tells a cmkit model/run directory, a diffusers directory, an EDM-style pickle
(``.pkl``, or a ``torch.save`` archive embedding ``torch_utils.persistence`` modules: ECT training states), a Flax
msgpack training state (openai/consistency_models_cifar10 ``checkpoint_N``) and a plain torch state dict apart.
``read_released_net`` reads the two foreign formats into (cmkit ``model`` section as a dict, backbone state dict).
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

from torch import Tensor

from ..errors import CmkitError
from .diffusers_dir import is_diffusers_dir
from .edm_pickle import read_edm_pickle
from .jax_cifar10 import read_jax_cifar10


def checkpoint_format(path: str | Path) -> str:
    """``model-dir``, ``diffusers``, ``edm-pickle``, ``flax-msgpack`` or ``torch`` (a state dict archive), or one
    error line."""
    p = Path(path).expanduser()
    if not p.exists() and p.suffix in (".pkl", ".pickle", ".pt", ".pth", ".bin"):
        raise CmkitError(f"checkpoint not found: {p} (released models are never downloaded: give the file you have)")
    if is_diffusers_dir(p):
        return "diffusers"  # a diffusers pipeline or UNet directory: formats.diffusers_dir
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


def read_released_net(
    path: str | Path, precond: str | None = None, img_resolution: int | None = None
) -> tuple[dict[str, Any], dict[str, Tensor], str]:
    """(model section, backbone state dict, format) of an EDM-style pickle or a Flax CIFAR-10 checkpoint;
    ``precond`` overrides the preconditioning (a Flax file does not say whether it holds the EDM teacher) and
    ``img_resolution`` the image side of a Flax file (32)."""
    fmt = checkpoint_format(path)
    if fmt == "edm-pickle":
        model, state, _ = read_edm_pickle(path)
    elif fmt == "flax-msgpack":
        model, state = read_jax_cifar10(path, precond or "cm", img_resolution or 32)
    else:
        raise CmkitError(f"{path} is not an EDM pickle or a Flax msgpack checkpoint (it is a {fmt})")
    if precond is not None:
        model["precond"] = precond
    return model, state, fmt
