"""One trainer for every method (EDM, CD, CT, iCT, ECT); single process or ``torchrun`` DDP.

Per step: loss on a deterministic batch → backward → NaN/inf guard (skip the step without advancing
schedules, EMAs or the target) → optional gradient clipping → optimizer → evaluation EMAs →
target network θ⁻ ← μθ⁻ + (1-μ)θ (CM reference order: EMAs first, then the target).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm import tqdm

from . import distributed as dist
from .checkpoint import (MODEL_FILE, atomic_dir, build_model, commit_dir, load_model, load_weights,
                         optimizer_from_flat, optimizer_to_flat, read_config, resolve_model_dir,
                         save_model_dir, state_dict_for_save)
from .config import Config, loss_kwargs
from .datasets import Batches, load_dataset
from .ema import ema_update, make_copy
from .errors import CmkitError
from .losses import build_loss
from .sampling import edm_sigmas, per_sample_generators, sample_heun, sample_multistep
from .utils import save_grid


def make_optimizer(params: list[nn.Parameter], cfg: Config) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    if t.optimizer == "radam":
        return torch.optim.RAdam(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    raise CmkitError(f"unknown optimizer {t.optimizer!r}; expected 'adam' or 'radam'")


def ema_name(rate: float) -> str:
    return f"ema_{rate:g}.safetensors"


class Trainer:
    """Build everything a run needs from a Config, then ``run()``; resumes exactly with train.resume=true."""

    def __init__(self, cfg: Config, progress: bool = True):
        self.cfg, t = cfg, cfg.train
        if not t.out_dir:
            raise CmkitError("train.out_dir is not set (e.g. train.out_dir=runs/my-run)")
        self.rank, self.world, self.device = dist.init()
        if t.num_threads:
            torch.set_num_threads(t.num_threads)
        torch.manual_seed(t.seed + self.rank)  # drives noise and dropout; saved per rank for resume
        self.out = Path(t.out_dir)
        self.progress = progress
        data = load_dataset(cfg.data.name, cfg.data.root, cfg.data.split, cfg.model.img_resolution, cfg.model.in_channels)
        if cfg.model.num_classes and data.labels is None:
            raise CmkitError(f"model.num_classes={cfg.model.num_classes} but data set {cfg.data.name!r} has no labels")
        self.batches = Batches(data, t.batch_size, t.seed, cfg.data.flip, self.rank, self.world)
        self.loss = build_loss(cfg.loss.method, **loss_kwargs(cfg))
        self.model = build_model(cfg.model).to(self.device).train()
        if t.init_from:
            load_weights(self.model, resolve_model_dir(t.init_from) / MODEL_FILE)
        self.teacher = self._load_teacher() if self.loss.needs_teacher else None
        self.ddp: nn.Module = self.model
        if self.world > 1:
            self.ddp = nn.parallel.DistributedDataParallel(self.model)  # broadcasts rank 0's weights
        self.emas = [make_copy(self.model) for _ in t.ema_rates]
        has_target = self.loss.uses_target and self.loss.target_mu(0) is not None
        self.target = make_copy(self.model) if has_target else None
        self.opt = make_optimizer(list(self.model.parameters()), cfg)
        self.step, self.skipped, self.wall_before = 0, 0, 0.0
        self._check_out_dir()

    # --- set-up -------------------------------------------------------------------------------------
    def _load_teacher(self) -> nn.Module:
        if not self.cfg.train.teacher:
            raise CmkitError(f"method {self.cfg.loss.method!r} needs a teacher: set train.teacher=PATH (an EDM model)")
        teacher, tcfg = load_model(self.cfg.train.teacher, device=self.device)
        if tcfg.model.precond != "edm":
            raise CmkitError(f"teacher {self.cfg.train.teacher} is not a diffusion (EDM) model")
        return teacher

    def _check_out_dir(self) -> None:
        ckpt = self.out / "checkpoint"
        if (ckpt / "state.json").is_file():
            if not self.cfg.train.resume:
                raise CmkitError(f"{self.out} already holds a training run; pass train.resume=true to continue it "
                                 f"or choose another train.out_dir")
            self.load_checkpoint(ckpt)

    # --- one step -----------------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        t = self.cfg.train
        return t.lr * min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps else t.lr

    def compute_loss(self, x0: Tensor, labels: Tensor | None, step: int) -> Tensor:
        cond = {"class_labels": labels} if self.cfg.model.num_classes else {}
        target = self.target if self.target is not None else self.model  # stopgrad(θ) when μ is None
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.train.bf16):
            return self.loss(self.ddp, x0, step=step, target=target, teacher=self.teacher, **cond).mean()

    def train_step(self) -> dict[str, Any]:
        """One optimisation step; returns stats. A non-finite loss or gradient skips the step entirely."""
        x0, labels = self.batches.get(self.step, self.device)
        for g in self.opt.param_groups:
            g["lr"] = self.lr_at(self.step)
        self.opt.zero_grad(set_to_none=True)
        loss = self.compute_loss(x0, labels, self.step)
        loss.backward()
        clip = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else math.inf
        grad_norm = float(nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        loss_value = float(loss.detach())
        finite = dist.all_reduce_mean(float(math.isfinite(loss_value) and math.isfinite(grad_norm)), self.device)
        if finite < 1.0:  # any rank saw NaN/inf: all ranks skip, the schedules do not advance
            self.opt.zero_grad(set_to_none=True)
            self.skipped += 1
            return {"loss": loss_value, "grad_norm": grad_norm, "skipped": True}
        self.opt.step()
        for rate, ema in zip(self.cfg.train.ema_rates, self.emas):
            ema_update(ema, self.model, rate)
        mu = self.loss.target_mu(self.step)
        if self.target is not None and mu is not None:
            ema_update(self.target, self.model, mu)
        self.step += 1
        return {"loss": loss_value, "grad_norm": grad_norm, "skipped": False}

    # --- loop ---------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train to train.steps with a progress bar, JSONL log, sample grids and checkpoints."""
        t = self.cfg.train
        main = dist.is_main()
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(self.cfg.to_json())
        bar = tqdm(total=t.steps, initial=self.step, disable=not (main and self.progress), dynamic_ncols=True,
                   desc=f"{self.cfg.loss.method}")
        start, start_step, last = time.time(), self.step, {}
        self._run_start = start
        tick, tick_step = time.time(), self.step
        while self.step < t.steps:
            last = self.train_step()
            if last["skipped"]:
                bar.set_postfix(skipped=self.skipped)
                if self.skipped > 100 + self.step:
                    raise CmkitError("training diverged: more than 100 steps with non-finite loss or gradients")
                continue
            bar.update(1)
            if self.step % t.log_every == 0 or self.step == t.steps:
                now = time.time()
                ips = (self.step - tick_step) * t.batch_size / max(now - tick, 1e-9)
                tick, tick_step = now, self.step
                rec = {"step": self.step, "loss": last["loss"], "grad_norm": last["grad_norm"],
                       "lr": self.lr_at(self.step - 1), "img_per_s": ips, "skipped": self.skipped,
                       "wall_s": round(self.wall_s(), 1),
                       **self.loss.stats(self.step)}
                bar.set_postfix(loss=f"{last['loss']:.4g}", img_s=f"{ips:.0f}")
                if main:
                    with open(self.out / "log.jsonl", "a") as f:
                        f.write(json.dumps(rec) + "\n")
            if t.sample_every and self.step % t.sample_every == 0 and main:
                self.sample_grids()
            if t.ckpt_every and self.step % t.ckpt_every == 0 and self.step < t.steps:
                self.save_checkpoint()
        bar.close()
        self.save_checkpoint()
        if main:
            self.sample_grids()
        wall = time.time() - start
        return {"steps": self.step, "final_loss": last.get("loss"), "wall_s": wall, "skipped": self.skipped,
                "steps_run": self.step - start_step}

    def wall_s(self) -> float:
        """Training wall time in seconds, summed over resumed sessions."""
        return self.wall_before + (time.time() - getattr(self, "_run_start", time.time()))

    # --- samples ------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_grids(self) -> list[Path]:
        """Grids from the first EMA with fixed per-sample seeds: 1- and 2-step (CM) or Heun (EDM)."""
        model = (self.emas[0] if self.emas else self.model).eval()
        c, s = self.cfg.model, self.cfg.sample
        n = s.grid_size
        shape = (n, c.in_channels, c.img_resolution, c.img_resolution)
        cond = {"class_labels": torch.arange(n, device=self.device) % c.num_classes} if c.num_classes else {}
        gens = per_sample_generators(range(n), self.device)
        paths = []
        if c.precond == "edm":
            x = sample_heun(model, shape, edm_sigmas(s.steps, c.sigma_min, c.sigma_max), generator=gens,
                            device=self.device, **cond)
            paths.append(save_grid(x, self.out / "samples" / f"step_{self.step:06d}_heun{s.steps}.png"))
        else:
            two = list(s.sigmas) if len(s.sigmas) >= 2 else [c.sigma_max, 0.8]
            for name, sig in (("1step", [c.sigma_max]), (f"{len(two)}step", two)):
                gens = per_sample_generators(range(n), self.device)
                x = sample_multistep(model, shape, sig, generator=gens, sigma_min=c.sigma_min,
                                     sigma_max=c.sigma_max, device=self.device, **cond)
                paths.append(save_grid(x, self.out / "samples" / f"step_{self.step:06d}_{name}.png"))
        model.train()
        return paths

    # --- checkpoints ----------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """Write out/checkpoint (exact resume) and out/model (first EMA, for sampling) atomically."""
        rng = dist.all_gather_tensor(torch.get_rng_state())
        if dist.is_main():
            tmp = atomic_dir(self.out / "checkpoint")
            save_file(state_dict_for_save(self.model), tmp / MODEL_FILE)
            for rate, ema in zip(self.cfg.train.ema_rates, self.emas):
                save_file(state_dict_for_save(ema), tmp / ema_name(rate))
            if self.target is not None:
                save_file(state_dict_for_save(self.target), tmp / "target.safetensors")
            tensors, meta = optimizer_to_flat(self.opt)
            save_file(tensors, tmp / "optimizer.safetensors")
            save_file({f"rank{r}": s for r, s in enumerate(rng)}, tmp / "rng.safetensors")
            state = {"step": self.step, "skipped": self.skipped, "world_size": self.world,
                     "wall_s": self.wall_s(), "optimizer": meta}
            (tmp / "state.json").write_text(json.dumps(state))
            (tmp / "config.json").write_text(json.dumps({"cmkit_config": self.cfg.to_dict()}, indent=2))
            commit_dir(tmp, self.out / "checkpoint")
            export = self.emas[0] if self.emas else self.model
            save_model_dir(self.out / "model", export, self.cfg,
                           {"step": self.step, "weights": ema_name(self.cfg.train.ema_rates[0]) if self.emas else "online"})
        dist.barrier()

    def load_checkpoint(self, ckpt: Path) -> None:
        saved, _ = read_config(ckpt)
        if saved.model != self.cfg.model or saved.loss.method != self.cfg.loss.method:
            raise CmkitError(f"cannot resume {ckpt}: its model/method config differs from the current one")
        state = json.loads((ckpt / "state.json").read_text())
        if state["world_size"] != self.world:
            raise CmkitError(f"cannot resume exactly: {ckpt} was written by {state['world_size']} processes, "
                             f"this run has {self.world}")
        load_weights(self.model, ckpt / MODEL_FILE)
        for rate, ema in zip(self.cfg.train.ema_rates, self.emas):
            load_weights(ema, ckpt / ema_name(rate))
        if self.target is not None:
            load_weights(self.target, ckpt / "target.safetensors")
        optimizer_from_flat(self.opt, load_file(ckpt / "optimizer.safetensors"), state["optimizer"])
        torch.set_rng_state(load_file(ckpt / "rng.safetensors")[f"rank{self.rank}"])
        self.step, self.skipped = state["step"], state["skipped"]
        self.wall_before = state.get("wall_s", 0.0)
        self._truncate_log()

    def _truncate_log(self) -> None:
        """Drop log lines written after the checkpoint we resume from (they will be redone)."""
        log = self.out / "log.jsonl"
        if dist.is_main() and log.is_file():
            keep = [ln for ln in log.read_text().splitlines() if ln and json.loads(ln)["step"] <= self.step]
            log.write_text("".join(ln + "\n" for ln in keep))


def train(cfg: Config, progress: bool = True) -> dict[str, Any]:
    """Train a run described by ``cfg``; returns a summary (steps, final loss, wall time)."""
    trainer = Trainer(cfg, progress)
    try:
        return trainer.run()
    finally:
        dist.cleanup()
