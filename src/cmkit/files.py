"""Safe, durable files: atomic directories, JSON, and weights read without unpickling.

Every directory cmkit writes (model directories, checkpoints) is staged beside its final name and swapped in
(``atomic_dir`` → ``seal_dir`` → ``commit_dir``), so a crash never leaves half of one; ``recover_dir`` finishes or
undoes an interrupted swap. Weights are read from safetensors (``read_safetensors``) or from ``torch.save``
archives with ``weights_only`` (``read_torch_state_dict``), and loaded into a module with one error line naming
the missing, unexpected or wrongly shaped tensors (``load_state``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from .errors import CmkitError

# --- atomic, durable directories -------------------------------------------------------------------
#
# A directory is written as ``NAME.cmkit-tmp`` (its *key* file last), flushed to disk, then swapped in:
# ``NAME`` → ``NAME.cmkit-old``, ``NAME.cmkit-tmp`` → ``NAME``, and ``NAME.cmkit-old`` is removed. A crash
# at any point leaves a complete ``NAME``, or a complete ``.cmkit-tmp`` / ``.cmkit-old`` that ``recover_dir``
# renames back. The staging names are cmkit's own: no other directory is ever deleted.

TMP, OLD = ".cmkit-tmp", ".cmkit-old"

#: Test hook: called with the name of each step of a commit ("staged", "old-moved", "new-moved",
#: "log-staged"), so that tests can simulate a crash at every point.
KILL_POINT: Callable[[str], None] | None = None


def reach_point(point: str) -> None:
    """Call ``KILL_POINT`` (when a test set one) at a named step of a commit."""
    if KILL_POINT is not None:
        KILL_POINT(point)


def fsync_path(path: Path) -> None:
    """Flush a file or a directory entry table to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_dir(final: Path) -> Path:
    """A fresh staging directory next to ``final``; write into it, then ``commit_dir``."""
    tmp = final.with_name(final.name + TMP)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
    except OSError as e:
        raise CmkitError(f"cannot write {final}: {e.strerror or e}") from None
    return tmp


def seal_dir(tmp: Path, key: str, obj: Any) -> None:
    """Flush every file in ``tmp`` to disk, then write the key file ``key`` (JSON) that marks it complete."""
    for f in tmp.iterdir():
        fsync_path(f)
    write_json(tmp / key, obj)
    fsync_path(tmp)


def commit_dir(tmp: Path, final: Path) -> None:
    """Swap the sealed ``tmp`` in for ``final`` (keeping the old one until the new one is in place)."""
    reach_point("staged")
    old = final.with_name(final.name + OLD)
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
        fsync_path(final.parent)
        reach_point("old-moved")
    os.replace(tmp, final)
    fsync_path(final.parent)
    reach_point("new-moved")
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(final: Path, key: str) -> str | None:
    """After a crash inside ``commit_dir``: make ``final`` the newest complete copy (the one holding ``key``).

    Returns a sentence saying what was recovered, or None when ``final`` was already complete (or absent
    with nothing to recover). Staging directories that are no longer needed are removed.
    """
    tmp, old = final.with_name(final.name + TMP), final.with_name(final.name + OLD)
    note = None
    if (tmp / key).is_file():  # sealed, hence newer than anything else here: finish its commit
        if final.exists() and (old / key).is_file():
            shutil.rmtree(final)  # an older copy, or a damaged one; the previous complete copy is in old
        commit_dir(tmp, final)
        note = f"recovered {final} from its completed new copy ({tmp.name}), left by an interrupted write"
    elif not final.exists() and (old / key).is_file():
        os.replace(old, final)
        fsync_path(final.parent)
        note = f"recovered {final} from its previous copy ({old.name}), left by an interrupted write"
    if (final / key).is_file():
        shutil.rmtree(old, ignore_errors=True)
    return note


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically and durably (to a temporary file, flushed, then renamed)."""
    tmp = path.with_name(path.name + TMP)
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path, what: str) -> Any:
    """JSON from ``path`` with one clear error for a missing, unreadable or damaged file."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CmkitError(f"cannot read {what} {path}: {type(e).__name__}: {e}") from None


def state_dict_for_save(
    model: nn.Module | dict[str, torch.Tensor], dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
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


def read_torch_state_dict(path: str | Path, what: str, hint: str = "") -> dict[str, torch.Tensor]:
    """The tensors of a ``torch.save``d state dict (``.pt``/``.pth``/``.bin``; a ``{"state_dict": ...}`` wrapper
    is opened), read with ``weights_only=True``: no code from the file runs. A missing or unreadable file, a
    pickle that needs code, or anything but a dict of tensors is one ``CmkitError`` line."""
    import pickle

    p = Path(path).expanduser()
    if not p.is_file():
        raise CmkitError(f"{what} not found: {p}" + (f" ({hint})" if hint else ""))
    try:
        sd = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CmkitError(
            f"cannot read {what} {p}: it needs full unpickling, which could run code; refused "
            f"({' '.join(str(e).split())[:160]})"
        ) from None
    except Exception as e:  # a truncated zip, a file that is not torch's, ...
        raise CmkitError(f"cannot read {what} {p}: {type(e).__name__}: {' '.join(str(e).split())[:200]}") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CmkitError(f"{what} {p} is not a state dict of tensors")
    return dict(sd)


def load_safetensors(model: nn.Module, file: Path) -> None:
    """Load safetensors weights strictly, with one clear error for corrupt or mismatched files."""
    load_state(model, read_safetensors(file), str(file), "the model in config.json")


def load_state(model: nn.Module, sd: dict[str, torch.Tensor], source: str, what: str = "the model") -> None:
    """Load a state dict strictly: missing, unexpected or wrongly shaped tensors, non-float or non-finite
    weights are each one ``CmkitError`` line naming the first offending key."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    bad = [k for k in sd if k in own and sd[k].shape != own[k].shape]
    if missing or unexpected or bad:
        first = (
            f"missing {missing[0]}"
            if missing
            else f"unexpected {unexpected[0]}"
            if unexpected
            else f"{bad[0]} is {tuple(sd[bad[0]].shape)}, expected {tuple(own[bad[0]].shape)}"
        )
        raise CmkitError(
            f"{source} does not match {what}: {len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(bad)} wrongly shaped tensors (e.g. {first})"
        )
    for k, v in sd.items():  # integer or boolean weights, NaN or inf: a silently black sampler otherwise
        if own[k].is_floating_point() and (not v.is_floating_point() or not bool(torch.isfinite(v).all())):
            kind = f"dtype {v.dtype}" if not v.is_floating_point() else "non-finite values"
            raise CmkitError(f"{source}: tensor {k} has {kind}; expected finite floating-point weights")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()})
