"""The step loop shared by the autoencoder and decoder trainers: progress bar, JSONL log, checkpoints, resume.

A run directory holds ``config.json``, ``log.jsonl`` (one JSON object per ``log_every`` steps),
``checkpoint/`` (every module of the task, the optimizer, the noise generator and the step, as safetensors +
``state.json``: an exact resume, since batches are a function of (seed, step)), ``model/`` (the task's export,
rewritten at every checkpoint) and ``samples/``. Directories are replaced atomically (``cmkit.checkpoint``);
an existing run is never overwritten unless ``resume`` is set, and then its config must match.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from ..checkpoint import (atomic_dir, commit_dir, load_weights, optimizer_from_flat, optimizer_to_flat,
                          state_dict_for_save)
from ..errors import CmkitError

#: Config keys that may change between a run and its resumption.
RUN_CONTROL_KEYS = ("steps", "resume", "log_every", "ckpt_every", "sample_every", "num_threads", "out_dir")


class Task(Protocol):
    """What the loop needs from a trainer."""

    name: str
    optimizer: torch.optim.Optimizer
    generator: torch.Generator

    def modules(self) -> dict[str, nn.Module]: ...          # everything to checkpoint, by file name
    def train_step(self, step: int) -> dict[str, Any]: ...  # one update; {"loss", "skipped", ...}
    def export(self, out: Path, step: int) -> None: ...     # the usable model (e.g. the EMA) into ``out``
    def sample(self, out: Path, step: int) -> None: ...     # grids into ``out`` (samples/)


@dataclass
class LoopSettings:
    steps: int
    log_every: int = 50
    ckpt_every: int = 1000
    sample_every: int = 0
    resume: bool = False


def comparable(config: dict[str, Any]) -> dict[str, Any]:
    """The config without run-control keys: what must match for a resume to be exact."""
    return {k: v for k, v in config.items() if k not in RUN_CONTROL_KEYS}


def save_checkpoint(task: Task, out: Path, config: dict[str, Any], state: dict[str, Any]) -> None:
    """``out/checkpoint`` (modules, optimizer, generator, state) and ``out/model`` (the export), atomically."""
    tmp = atomic_dir(out / "checkpoint")
    for name, module in task.modules().items():
        save_file(state_dict_for_save(module), tmp / f"{name}.safetensors")
    tensors, meta = optimizer_to_flat(task.optimizer)
    save_file(tensors, tmp / "optimizer.safetensors")
    save_file({"generator": task.generator.get_state()}, tmp / "rng.safetensors")
    (tmp / "state.json").write_text(json.dumps({**state, "optimizer": meta}))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    commit_dir(tmp, out / "checkpoint")
    tmp = atomic_dir(out / "model")
    task.export(tmp, state["step"])
    commit_dir(tmp, out / "model")


def load_checkpoint(task: Task, ckpt: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Restore every module, the optimizer and the generator; returns the saved state (step, skipped, wall_s)."""
    saved = json.loads((ckpt / "config.json").read_text())
    diff = sorted(k for k in set(comparable(saved)) | set(comparable(config)) if saved.get(k) != config.get(k))
    if diff:
        raise CmkitError(f"cannot resume {ckpt.parent}: its config differs in {diff[:4]}; "
                         "use the same settings (only steps and logging may change) or another output directory")
    for name, module in task.modules().items():
        load_weights(module, ckpt / f"{name}.safetensors")
    state = json.loads((ckpt / "state.json").read_text())
    optimizer_from_flat(task.optimizer, load_file(ckpt / "optimizer.safetensors"), state["optimizer"])
    task.generator.set_state(load_file(ckpt / "rng.safetensors")["generator"])
    return state


def truncate_log(log: Path, step: int) -> None:
    """Drop log lines written after the checkpoint a run resumes from (they will be redone)."""
    if log.is_file():
        keep = [ln for ln in log.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        log.write_text("".join(ln + "\n" for ln in keep))


def run(task: Task, out: str | Path, config: dict[str, Any], settings: LoopSettings,
        progress: bool = True) -> dict[str, Any]:
    """Train ``task`` to ``settings.steps``; returns {steps, steps_run, final_loss, wall_s, skipped, out}."""
    out = Path(out)
    ckpt = out / "checkpoint"
    step, skipped, wall_before = 0, 0, 0.0
    if (ckpt / "state.json").is_file():
        if not settings.resume:
            raise CmkitError(f"{out} already holds a training run; pass resume=true to continue it "
                             "or choose another output directory")
        state = load_checkpoint(task, ckpt, config)
        step, skipped, wall_before = state["step"], state["skipped"], state.get("wall_s", 0.0)
        truncate_log(out / "log.jsonl", step)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    start, start_step, last = time.time(), step, {}
    tick, tick_step = start, step
    bar = tqdm(total=settings.steps, initial=step, disable=not progress, dynamic_ncols=True, desc=task.name)
    while step < settings.steps:
        last = task.train_step(step)
        if last.get("skipped"):
            skipped += 1
            if skipped > 100 + step:
                raise CmkitError("training diverged: more than 100 steps with non-finite loss or gradients")
            continue
        step += 1
        bar.update(1)
        if step % settings.log_every == 0 or step == settings.steps:
            now = time.time()
            rec = {"step": step, **{k: v for k, v in last.items() if k != "skipped"},
                   "steps_per_s": (step - tick_step) / max(now - tick, 1e-9), "skipped": skipped,
                   "wall_s": round(wall_before + now - start, 1)}
            tick, tick_step = now, step
            bar.set_postfix(loss=f"{last['loss']:.4g}")
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
        if settings.sample_every and step % settings.sample_every == 0:
            task.sample(out / "samples", step)
        if settings.ckpt_every and step % settings.ckpt_every == 0 and step < settings.steps:
            save_checkpoint(task, out, config, {"step": step, "skipped": skipped,
                                                "wall_s": wall_before + time.time() - start})
    bar.close()
    wall = wall_before + time.time() - start
    save_checkpoint(task, out, config, {"step": step, "skipped": skipped, "wall_s": wall})
    task.sample(out / "samples", step)
    return {"steps": step, "steps_run": step - start_step, "final_loss": last.get("loss"), "wall_s": wall,
            "skipped": skipped, "out": str(out)}


def guarded_update(loss: torch.Tensor, params: list[nn.Parameter], optimizer: torch.optim.Optimizer,
                   grad_clip: float = 0.0) -> dict[str, Any]:
    """backward → (clip) → step, unless the loss or gradient norm is non-finite (then skip the step)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = float(nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf))
    value = float(loss.detach())
    if not (math.isfinite(value) and math.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        return {"loss": value, "grad_norm": grad_norm, "skipped": True}
    optimizer.step()
    return {"loss": value, "grad_norm": grad_norm, "skipped": False}
