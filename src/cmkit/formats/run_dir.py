"""cmkit's run directory (``RunDir``): the files of one training run, and the only place their names are written.

A run directory holds ``config.json`` (the run config), ``log.jsonl``, ``samples/``, ``model/`` (the export, a
model directory of ``cmkit.formats.model_dir``, rewritten at every checkpoint) and ``checkpoint/`` (every module,
the optimizer, the RNG states, ``state.json`` and the config, for an exact resume). Checkpoints are written
atomically (``cmkit.files``), so a crash never leaves half of one; ``train.lock`` keeps two processes from training
in the same directory.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import CmkitError
from ..files import (
    TMP,
    atomic_dir,
    commit_dir,
    fsync_path,
    load_safetensors,
    reach_point,
    read_json,
    read_safetensors,
    recover_dir,
    seal_dir,
    state_dict_for_save,
    write_json,
)
from .model_dir import CONFIG_FILE

# --- weights -----------------------------------------------------------------------------------------


# --- model directories -------------------------------------------------------------------------------


# --- optimizer state <-> flat tensors + JSON ---------------------------------------------------------


def optimizer_to_flat(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer's state dict as flat tensors (``<param index>.<name>``) and JSON (groups, scalars)."""
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
        for k, v in st.items():  # check: a wrong one fails at the first step, far from its cause)
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
        present = [
            n
            for n in (CONFIG_FILE, self.log.name, "model/", "checkpoint/", "samples/")
            if (self.root / n.rstrip("/")).exists()
        ]
        if set(present) <= {CONFIG_FILE, self.log.name} and not self.read_log():  # nothing trained yet
            return None
        if self.checkpoint.exists() and not self.checkpoint.is_dir():
            return f"{self.checkpoint} is a file, where a run keeps its checkpoint directory"
        if self.checkpoint.exists():
            return (
                f"{self.checkpoint} is incomplete: {self.STATE} is missing, so it cannot be resumed exactly "
                "(its weights are left as they are)"
            )
        if self.model.exists():
            return (
                f"{self.root} holds a trained model ({', '.join(present)}) but no checkpoint/ to resume from "
                f"(to start from its weights: train.init_from={self.model})"
            )
        return (
            f"{self.root} holds a run that stopped before its first checkpoint ({', '.join(present)}; no checkpoint/)"
        )

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
                    raise CmkitError(
                        f"{self.root} is held by another Loop of this process; close() it (or let "
                        "its run() finish) before opening the run again"
                    ) from None
                raise CmkitError(
                    f"{self.root} is being trained by another process ({holder}); wait for it to "
                    "finish or stop it, or choose another train.out_dir"
                ) from None
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
            raise CmkitError(
                f"{self.checkpoint / self.STATE} is damaged (expected step, skipped, world_size, optimizer)"
            )
        for key, least in (("step", 0), ("skipped", 0), ("world_size", 1)):
            value = state[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise CmkitError(
                    f"{self.checkpoint / self.STATE} is damaged: {key} is {value!r}, expected an integer ≥ {least}"
                )
        if not isinstance(state["optimizer"], dict):
            raise CmkitError(f"{self.checkpoint / self.STATE} is damaged: optimizer is not a JSON object")
        return state

    def saved_config(self) -> dict[str, Any]:
        """The run config stored with the checkpoint (the record of how the run was started)."""
        config = read_json(self.checkpoint / CONFIG_FILE, "run config")
        if not isinstance(config, dict):
            raise CmkitError(f"{self.checkpoint / CONFIG_FILE} is damaged: expected a JSON object of config sections")
        return config

    def save_checkpoint(
        self,
        modules: dict[str, nn.Module | dict[str, torch.Tensor]],
        optimizer_state: dict[str, Any],
        rng: dict[str, torch.Tensor],
        state: dict[str, Any],
        config: dict[str, Any],
    ) -> None:
        """``checkpoint/``: ``<name>.safetensors`` per module (or state dict), the optimizer's state dict, RNG states,
        config.json, and state.json last (its presence marks a complete checkpoint); the log is flushed first."""
        if self.log.is_file():
            fsync_path(self.log)
        tmp = atomic_dir(self.checkpoint)
        for name, module in modules.items():
            save_file(state_dict_for_save(module), tmp / f"{name}.safetensors")
        tensors, meta = optimizer_to_flat(optimizer_state)
        save_file(tensors, tmp / self.OPTIMIZER)
        save_file(rng, tmp / self.RNG)
        write_json(tmp / CONFIG_FILE, config)
        seal_dir(tmp, self.STATE, {**state, "optimizer": meta})
        commit_dir(tmp, self.checkpoint)

    def load_checkpoint(
        self, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Restore every module and the optimizer; returns (state, RNG tensors). A damaged file is one line."""
        for name, module in modules.items():
            load_safetensors(module, self.checkpoint / f"{name}.safetensors")
        state = self.state()
        try:
            optimizer_from_flat(optimizer, read_safetensors(self.checkpoint / self.OPTIMIZER), state["optimizer"])
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise CmkitError(
                f"{self.checkpoint / self.OPTIMIZER} does not match this run's optimizer ({type(e).__name__}: {e})"
            ) from None
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
        reach_point("log-staged")
        os.replace(tmp, self.log)
