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
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

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


def _reached(point: str) -> None:
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
    _reached("staged")
    old = final.with_name(final.name + OLD)
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
        fsync_path(final.parent)
        _reached("old-moved")
    os.replace(tmp, final)
    fsync_path(final.parent)
    _reached("new-moved")
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
        raise CmkitError(f"cannot read {what} {p}: it needs full unpickling, which could run code; refused "
                         f"({' '.join(str(e).split())[:160]})") from None
    except Exception as e:  # a truncated zip, a file that is not torch's, ...
        raise CmkitError(f"cannot read {what} {p}: {type(e).__name__}: {' '.join(str(e).split())[:200]}") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CmkitError(f"{what} {p} is not a state dict of tensors")
    return dict(sd)


def load_weights(model: nn.Module, file: Path) -> None:
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
        first = (f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}" if unexpected else
                 f"{bad[0]} is {tuple(sd[bad[0]].shape)}, expected {tuple(own[bad[0]].shape)}")
        raise CmkitError(f"{source} does not match {what}: {len(missing)} missing, {len(unexpected)} unexpected, "
                         f"{len(bad)} wrongly shaped tensors (e.g. {first})")
    for k, v in sd.items():  # integer or boolean weights, NaN or inf: a silently black sampler otherwise
        if own[k].is_floating_point() and (not v.is_floating_point() or not bool(torch.isfinite(v).all())):
            kind = f"dtype {v.dtype}" if not v.is_floating_point() else "non-finite values"
            raise CmkitError(f"{source}: tensor {k} has {kind}; expected finite floating-point weights")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()})


# --- model directories -------------------------------------------------------------------------------

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


def save_model_dir(path: str | Path, weights: nn.Module | dict[str, torch.Tensor], kind: str,
                   config: dict[str, Any], meta: dict[str, Any] | None = None,
                   dtype: torch.dtype | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (kind and config also in the metadata) atomically.

    An existing ``path`` is replaced only when it holds nothing but those two files (a model directory);
    anything else there is refused with one line, so no other file is ever lost.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {KINDS}")
    final = Path(path)
    if final.exists():
        other = sorted(p.name for p in final.iterdir()) if final.is_dir() else [final.name]
        other = [n for n in other if n not in (CONFIG_FILE, MODEL_FILE)]
        if other:
            raise CmkitError(f"{final} holds other files ({', '.join(other[:4])}); a model directory is written "
                             f"only into a new directory or over one holding just {CONFIG_FILE} and {MODEL_FILE}")
    tmp = atomic_dir(final)
    tag = {"kind": kind, "config": json.dumps(config)}
    save_file(state_dict_for_save(weights, dtype), tmp / MODEL_FILE, metadata=tag)
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
    from .zoo import shipped_model_dir

    p = Path(path).expanduser()
    shipped = shipped_model_dir(str(path))
    if shipped is not None and p.exists() and p.resolve() == shipped.resolve():
        return shipped  # run from inside the shipped models' folder: the same directory either way
    hint = (f"; a local path takes precedence over the shipped model {path!r}, which is at {shipped}"
            if shipped is not None else "")
    if p.exists():
        run_files = (p / "log.jsonl").exists() or (p / "checkpoint").exists()
        weights_beside = any((p / w).is_file() for w in (MODEL_FILE, *(w for _, w in LEGACY.values())))
        if (p / "model" / CONFIG_FILE).is_file():
            d = p / "model"
        elif (p / CONFIG_FILE).is_file() and (weights_beside or not run_files):
            d = p
        elif p.is_dir() and run_files:
            raise CmkitError(f"model not found: {p} is a training run without a model yet (model/{CONFIG_FILE} is "
                             f"written at its first checkpoint){hint}")
        else:
            raise CmkitError(f"model not found: {p} holds no {CONFIG_FILE} or model/{CONFIG_FILE}{hint}")
        if shipped is not None:
            print(f"cmkit: {path!r} is both a local model and a shipped one: using the local {d} "
                  f"(the shipped one is {shipped})", file=sys.stderr)
        return d
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
        raise CmkitError(f"{d} holds {_a(found)} model, not {_a(kind)} model")
    if not (d / weights).is_file():
        raise CmkitError(f"{d}: no {weights} beside {CONFIG_FILE}")
    meta = {k: v for k, v in meta.items() if k not in ("kind", "config", "cmkit_config", "format")}
    return ModelDir(d, found, config, meta, d / weights)


def load_model(path: str | Path, weights: str = MODEL_FILE, device: str | torch.device = "cpu") -> tuple[nn.Module, Any]:
    """A diffusion or consistency model from a model/run directory or shipped name: (model in eval mode, Config)."""
    from .config import Config

    d = read_model_dir(path, "denoiser")
    cfg = Config.from_dict(d.config)
    lo, hi = cfg.model.sigma_min, cfg.model.sigma_max
    if not (0 < lo < hi < float("inf")):
        raise CmkitError(f"{d.path / CONFIG_FILE}: model.sigma_min={lo} and sigma_max={hi}; expected "
                         "0 < sigma_min < sigma_max (a damaged or hand-edited config)")
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
    for p, st in opt.state.items():  # Adam's moments must have their parameter's shape (load_state_dict does not
        for k, v in st.items():      # check: a wrong one fails at the first step, far from its cause)
            if torch.is_tensor(v) and v.ndim > 0 and v.shape != p.shape:
                raise ValueError(f"optimizer state {k} has shape {tuple(v.shape)}, its parameter {tuple(p.shape)}")


# --- run directories ---------------------------------------------------------------------------------

class RunDir:
    """The files of one training run; every task and command uses these names (and only these)."""

    OPTIMIZER, RNG, STATE = "optimizer.safetensors", "rng.safetensors", "state.json"
    LOCK = "train.lock"  #: held (``fcntl.flock``) by the process that trains in the directory

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._lock_file: Any = None
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

    def recover(self) -> list[str]:
        """Finish or undo a checkpoint or export interrupted by a crash; returns what was recovered."""
        notes = [recover_dir(self.checkpoint, self.STATE), recover_dir(self.model, CONFIG_FILE)]
        return [n for n in notes if n]

    def is_run(self) -> bool:
        """Whether ``root`` holds a cmkit training run (a run config, with or without a checkpoint yet)."""
        if self.has_checkpoint():
            return True
        try:
            config = json.loads(self.config.read_text())
        except (OSError, UnicodeDecodeError, ValueError):
            return False
        return isinstance(config, dict) and "train" in config and "kind" not in config

    def foreign_files(self) -> list[str]:
        """Names in ``root`` when it is neither absent, empty, nor a run: training there would mix with them."""
        if not self.root.exists():
            return []
        if not self.root.is_dir():
            return [self.root.name]
        names = sorted(p.name for p in self.root.iterdir() if p.name != self.LOCK)
        return [] if not names or self.is_run() else names

    def damage(self) -> str | None:
        """Why this directory, which holds no complete checkpoint, cannot be trained in: a sentence naming what
        is there and what is missing, or None when nothing would be lost (absent, empty, or a run that stopped
        before its first step was logged)."""
        if self.has_checkpoint() or not self.root.is_dir():
            return None
        present = [n for n in (CONFIG_FILE, self.log.name, "model/", "checkpoint/", "samples/")
                   if (self.root / n.rstrip("/")).exists()]
        if set(present) <= {CONFIG_FILE, self.log.name} and not self.read_log():  # nothing trained yet
            return None
        if self.checkpoint.exists() and not self.checkpoint.is_dir():
            return f"{self.checkpoint} is a file, where a run keeps its checkpoint directory"
        if self.checkpoint.exists():
            return (f"{self.checkpoint} is incomplete: {self.STATE} is missing, so it cannot be resumed exactly "
                    "(its weights are left as they are)")
        if self.model.exists():
            return (f"{self.root} holds a trained model ({', '.join(present)}) but no checkpoint/ to resume from "
                    f"(to start from its weights: train.init_from={self.model})")
        return (f"{self.root} holds a run that stopped before its first checkpoint ({', '.join(present)}; "
                "no checkpoint/)")

    def lock(self) -> str | None:
        """Hold the run directory for this process (``train.lock``, an ``fcntl.flock``). Another live holder is
        one ``CmkitError`` naming it; a lock file left by a process that has ended is taken over (the kernel
        drops a flock with its process) and the returned note says so. ``unlock`` releases it (so does the
        end of the process, or the garbage collection of this object)."""
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / self.LOCK
        for _ in range(3):  # the holder may remove the file between our open and our flock: open it again
            f = open(path, "a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.seek(0)
                holder = f.read(4096).strip() or "unknown process"
                f.close()
                if holder.startswith(f"pid {os.getpid()} "):
                    raise CmkitError(f"{self.root} is held by another Loop of this process; close() it (or let "
                                     "its run() finish) before opening the run again") from None
                raise CmkitError(f"{self.root} is being trained by another process ({holder}); wait for it to "
                                 "finish or stop it, or choose another train.out_dir") from None
            if path.exists() and os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
                break
            f.close()
        else:
            raise CmkitError(f"cannot lock {path}: it keeps being replaced by another process")
        f.seek(0)
        previous = f.read(4096).strip()
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        self._lock_file = f
        return f"took over the lock of {previous}, which is no longer running" if previous else None

    def unlock(self) -> None:
        """Release the lock taken by ``lock`` and remove its file (nothing when not held)."""
        f, self._lock_file = self._lock_file, None
        if f is None:
            return
        try:
            (self.root / self.LOCK).unlink(missing_ok=True)
        finally:
            f.close()  # closing the file drops the flock

    def state(self) -> dict[str, Any]:
        state = read_json(self.checkpoint / self.STATE, "checkpoint state")
        if not isinstance(state, dict) or not {"step", "skipped", "world_size", "optimizer"} <= set(state):
            raise CmkitError(f"{self.checkpoint / self.STATE} is damaged (expected step, skipped, world_size, "
                             "optimizer)")
        for key, least in (("step", 0), ("skipped", 0), ("world_size", 1)):
            value = state[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise CmkitError(f"{self.checkpoint / self.STATE} is damaged: {key} is {value!r}, expected an "
                                 f"integer ≥ {least}")
        if not isinstance(state["optimizer"], dict):
            raise CmkitError(f"{self.checkpoint / self.STATE} is damaged: optimizer is not a JSON object")
        return state

    def saved_config(self) -> dict[str, Any]:
        """The run config stored with the checkpoint (the record of how the run was started)."""
        config = read_json(self.checkpoint / CONFIG_FILE, "run config")
        if not isinstance(config, dict):
            raise CmkitError(f"{self.checkpoint / CONFIG_FILE} is damaged: expected a JSON object of config sections")
        return config

    def save_checkpoint(self, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
                        rng: dict[str, torch.Tensor], state: dict[str, Any], config: dict[str, Any]) -> None:
        """``checkpoint/``: ``<name>.safetensors`` per module, optimizer, RNG states, config.json, and
        state.json last (its presence marks a complete checkpoint); the log is flushed to disk first."""
        if self.log.is_file():
            fsync_path(self.log)
        tmp = atomic_dir(self.checkpoint)
        for name, module in modules.items():
            save_file(state_dict_for_save(module), tmp / f"{name}.safetensors")
        tensors, meta = optimizer_to_flat(optimizer)
        save_file(tensors, tmp / self.OPTIMIZER)
        save_file(rng, tmp / self.RNG)
        write_json(tmp / CONFIG_FILE, config)
        seal_dir(tmp, self.STATE, {**state, "optimizer": meta})
        commit_dir(tmp, self.checkpoint)

    def load_checkpoint(self, modules: dict[str, nn.Module],
                        optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Restore every module and the optimizer; returns (state, RNG tensors). A damaged file is one line."""
        for name, module in modules.items():
            load_weights(module, self.checkpoint / f"{name}.safetensors")
        state = self.state()
        try:
            optimizer_from_flat(optimizer, read_safetensors(self.checkpoint / self.OPTIMIZER), state["optimizer"])
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise CmkitError(f"{self.checkpoint / self.OPTIMIZER} does not match this run's optimizer "
                             f"({type(e).__name__}: {e})") from None
        return state, read_safetensors(self.checkpoint / self.RNG)

    def read_log(self) -> list[dict[str, Any]]:
        """The log rows; a partial last line (a crash while appending) is ignored."""
        if self.log.exists() and not self.log.is_file():
            raise CmkitError(f"{self.log} is not a file (a training log is a JSON-lines file)")
        if not self.log.is_file():
            return []
        rows = []
        try:
            lines = self.log.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise CmkitError(f"cannot read the training log {self.log}: {type(e).__name__}: {e}") from None
        for i, line in enumerate(lines):
            try:
                rows.append(json.loads(line))
            except ValueError:
                if i != len(lines) - 1:
                    raise CmkitError(f"{self.log} line {i + 1} is damaged (not JSON)") from None
        return rows

    def append_log(self, record: dict[str, Any]) -> None:
        with open(self.log, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_log(self, step: int) -> None:
        """Keep the log rows up to ``step`` (the checkpoint a run resumes from; later ones will be redone),
        rewriting the file atomically."""
        if not self.log.is_file():
            return
        keep = [row for row in self.read_log() if row.get("step", 0) <= step]
        tmp = self.log.with_name(self.log.name + TMP)
        with open(tmp, "w") as f:
            f.write("".join(json.dumps(row) + "\n" for row in keep))
            f.flush()
            os.fsync(f.fileno())
        _reached("log-staged")
        os.replace(tmp, self.log)
