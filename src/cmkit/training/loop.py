"""The one training loop: every kind of run (diffusion/consistency model, autoencoder, consistency decoder)
is a ``Task`` run by ``Loop``.

Per step: lr warm-up → the task's loss on its deterministic batch (bf16 or fp16 autocast if asked) → backward,
over ``train.accum`` microbatches (one all-reduce per step under DDP; with fp16, of the loss times the dynamic
loss scale, then unscaled) → NaN/inf guard (agreed over all processes: skip the step without advancing the
optimizer, the EMAs or the task's schedules; an fp16 overflow also halves the loss scale) → optional gradient
clipping → optimizer → evaluation EMAs → ``task.after_update``
(e.g. the CM target network θ⁻ ← μθ⁻ + (1-μ)θ, after the EMAs as in the CM reference code).

The loop owns the progress bar, the JSONL log, sample grids, checkpoints (``cmkit.formats.run_dir.RunDir``),
the exact resume (weights, EMAs, optimizer, step, the global torch RNG and the task's noise generator of
every process; batches are a pure function of (seed, step)), the divergence guard and DDP under
``torchrun`` (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from .. import distributed as dist
from ..config import RUN_CONTROL_KEYS, RunConfig
from ..ema import ema_update, make_copy
from ..errors import CmkitError
from ..files import write_json
from ..formats.model_dir import save_model_dir
from ..formats.run_dir import RunDir
from ..tensors import eval_mode
from . import sharding
from .kinds import run_kind
from .task import Context, Task


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by SIGINT/SIGTERM after a checkpoint was written; the message says how to resume.
    ``exit_code`` is 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopRequest:
    """SIGINT/SIGTERM while training: the first asks the loop to stop after the current step and write a
    checkpoint; a second one stops at once (``KeyboardInterrupt``; the last checkpoint stays intact, as every
    checkpoint is written atomically). Handlers are installed only in the main thread, and restored on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, announce: bool):
        self.signum: int | None = None
        self.announce = announce
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # the second signal: stop now
            self.__exit__()
            raise KeyboardInterrupt
        self.signum = signum
        if self.announce:
            print(
                f"\ncmkit: {signal.Signals(signum).name}: finishing this step and writing a checkpoint "
                "(send it again to stop at once)",
                file=sys.stderr,
                flush=True,
            )


class Loop:
    """Build a run from its config, then ``run()``; resumes exactly with ``train.resume=true``."""

    def __init__(self, cfg: RunConfig, progress: bool = True):
        cfg.validate()
        t = cfg.train
        if not t.out_dir:
            raise CmkitError("train.out_dir is not set (e.g. train.out_dir=runs/my-run)")
        self.cfg, self.progress = cfg, progress
        self.dir = RunDir(t.out_dir)
        rank, world, device = dist.init()
        self.ctx = Context(device, rank, world)
        try:
            self._build(t)
        except BaseException:
            self.dir.unlock()
            raise

    def _build(self, t: Any) -> None:
        """Everything after the directory checks: the task, network, EMAs, optimizer, and the checkpoint."""
        cfg, (device, rank, world) = self.cfg, (self.ctx.device, self.ctx.rank, self.ctx.world)
        resuming = self._prepare_dir()
        if t.num_threads:
            torch.set_num_threads(t.num_threads)
        torch.manual_seed(t.seed + rank)  # initialisation, dropout and the CM losses' noise; saved per rank
        self.generator = torch.Generator().manual_seed(t.seed + rank)  # the tasks that take a generator
        self.task: Task = run_kind(cfg.kind).task(cfg, self.ctx)
        self.model = self.task.model.to(device).train()
        self.sharded = t.parallel == "fsdp" and world > 1
        if self.sharded:
            if "teacher" in self.task.extra_modules():
                raise CmkitError("train.parallel=fsdp cannot shard a teacher that trains (loss.method=pd); use ddp")
            sharding.broadcast_from_rank0([self.model, *self.task.extra_modules().values()])
        ddp = world > 1 and not self.sharded
        self.net: nn.Module = nn.parallel.DistributedDataParallel(self.model) if ddp else self.model
        self.emas = [make_copy(self.model) for _ in t.ema_rates]
        self.extra_groups = getattr(self.task, "param_groups", list)()  # a second trained network (rCM's critic)
        self.optimizer = t.build_optimizer([{"params": list(self.model.parameters())}, *self.extra_groups])
        self.scaler = torch.amp.GradScaler(device.type, enabled=t.fp16)  # identity unless fp16
        self.step, self.skipped, self.wall_before = 0, 0, 0.0
        self.consecutive_skips = 0
        if resuming:
            self.load_checkpoint()  # into the whole modules, before any sharding
        elif dist.is_main():
            self.dir.truncate_log(0)  # rows of an earlier attempt that never reached a checkpoint
        if self.sharded:
            self._shard()

    def _shard(self) -> None:
        """FSDP: shard the network, its EMAs and the target network, and the optimizer's state like them; rank 0
        keeps one whole copy (``shadow``) for sample grids and the exported model."""
        self.shadow = make_copy(self.model) if dist.is_main() else None
        whole = self.optimizer.state_dict()
        for module in [self.model, *self.emas, *self.task.extra_modules().values()]:
            sharding.shard(module)
        self.optimizer = self.cfg.train.build_optimizer(self.model.parameters())
        self.optimizer.load_state_dict(sharding.shard_optimizer_state(whole, list(self.model.parameters())))

    # --- resume -------------------------------------------------------------------------------------
    def _prepare_dir(self) -> bool:
        """Refuse a directory that is not a run, lock it, recover from an interrupted write, and decide whether
        to resume. A directory holding part of a run (config, log, model or checkpoint, but no complete
        checkpoint) is refused: training there would replace what it holds."""
        t, main = self.cfg.train, dist.is_main()
        foreign = self.dir.foreign_files()
        if foreign:
            raise CmkitError(
                f"train.out_dir={self.dir.root} holds files that are not a cmkit run "
                f"({', '.join(foreign[:4])}); choose a new or empty directory"
            )
        if main:
            for note in filter(None, [self.dir.lock(), *self.dir.recover()]):
                print(f"cmkit: {note}", file=sys.stderr)
        dist.barrier()
        self.dir.read_log()  # a log that is not a readable JSON-lines file is one line now, not at the first step
        if not self.dir.has_checkpoint():
            damage = self.dir.damage()
            if damage:
                raise CmkitError(
                    f"{damage}; nothing was changed: choose another train.out_dir, or move those "
                    "files away to start again there"
                )
            if t.resume and main:
                print(
                    f"cmkit: warning: train.resume=true but {self.dir.root} has no checkpoint to resume; "
                    "starting from step 0",
                    file=sys.stderr,
                )
            return False
        if not t.resume:
            raise CmkitError(
                f"{self.dir.root} already holds a training run; pass train.resume=true to continue "
                "it or choose another train.out_dir"
            )
        self._check_resumable()
        return True

    def _check_resumable(self) -> None:
        """Refuse a resume whose settings differ from the run's, except run control (steps, logging, ...)."""
        saved = self.dir.saved_config()
        self.cfg.adopt_measured(saved)
        diff = self.cfg.changes_from(saved)
        if diff:
            shown = ", ".join(f"{k} ({old!r} → {new!r})" for k, old, new in diff[:5])
            raise CmkitError(
                f"cannot resume {self.dir.root}: settings differ from the run's: {shown}"
                f"{' …' if len(diff) > 5 else ''}; only {', '.join(RUN_CONTROL_KEYS)} may change"
            )

    def modules(self) -> dict[str, nn.Module]:
        """Everything a checkpoint holds, by file stem: model, ema_<rate>..., the task's extra modules."""
        emas = {RunDir.weights_name(r): e for r, e in zip(self.cfg.train.ema_rates, self.emas)}
        return {RunDir.weights_name(None): self.model, **emas, **self.task.extra_modules()}

    def load_checkpoint(self) -> None:
        state, rng = self.dir.load_checkpoint(self.modules(), self.optimizer)
        if state["world_size"] != self.ctx.world:
            raise CmkitError(
                f"cannot resume exactly: {self.dir.checkpoint} was written by {state['world_size']} "
                f"processes, this run has {self.ctx.world}"
            )
        try:
            torch.set_rng_state(rng[f"rank{self.ctx.rank}"])
            self.generator.set_state(rng[f"generator{self.ctx.rank}"])
        except (KeyError, RuntimeError, TypeError) as e:
            raise CmkitError(
                f"{self.dir.checkpoint / RunDir.RNG} is damaged or from another cmkit version "
                f"({type(e).__name__}: {e}); it cannot be resumed exactly"
            ) from None
        if f"cuda{self.ctx.rank}" in rng and self.ctx.device.type == "cuda":
            torch.cuda.set_rng_state(rng[f"cuda{self.ctx.rank}"], self.ctx.device)
        self.step, self.skipped, self.wall_before = state["step"], state["skipped"], state.get("wall_s", 0.0)
        if "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])
        if dist.is_main():
            self.dir.truncate_log(self.step)

    # --- one step -----------------------------------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        """One optimisation step; returns its stats. A non-finite loss or gradient skips the step entirely."""
        t = self.cfg.train
        for g in self.optimizer.param_groups:
            g["lr"] = t.lr_at(self.step) * g.get("lr_scale", 1.0)
        self.optimizer.zero_grad(set_to_none=True)
        loss, extra = self.accumulate_gradients()
        if self.sharded:  # FSDP keeps a root module whole after a forward without backward (θ⁻'s pass)
            for module in self.task.extra_modules().values():
                module.reshard()
        self.scaler.unscale_(self.optimizer)
        clip = t.grad_clip if t.grad_clip > 0 else math.inf
        grad_norm = float(sharding.full(nn.utils.clip_grad_norm_(self.model.parameters(), clip)))
        stats = {"loss": loss, "grad_norm": grad_norm, **extra}
        if self.extra_groups:  # the second network's gradient is checked like the model's, not clipped
            params = [p for g in self.extra_groups for p in g["params"]]
            stats["extra_grad_norm"] = float(nn.utils.clip_grad_norm_(params, math.inf))
        if t.fp16:
            stats["loss_scale"] = self.scaler.get_scale()
        reason = (
            "non-finite loss"
            if not math.isfinite(stats["loss"])
            else "non-finite gradient norm"
            if not (math.isfinite(grad_norm) and math.isfinite(stats.get("extra_grad_norm", 0.0)))
            else ""
        )
        if t.fp16 and reason == "non-finite gradient norm":
            reason = f"fp16 overflow at loss scale {stats['loss_scale']:g}"
        if dist.all_reduce_mean(float(not reason), self.ctx.device) < 1.0:  # any rank saw NaN/inf: all skip
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.update()  # fp16: halves the loss scale after an overflow
            self.skipped += 1
            return {**stats, "skipped": True, "reason": reason or "non-finite values on another process"}
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if getattr(self.task, "trains_model", lambda _: True)(self.step):  # not on a step of the critic alone
            for rate, ema in zip(t.ema_rates, self.emas):
                ema_update(ema, self.model, rate)
        self.task.after_update(self.step)
        self.step += 1
        return {**stats, "skipped": False}

    def accumulate_gradients(self) -> tuple[float, dict[str, float]]:
        """The gradient of the step's mean loss, over ``train.accum`` microbatches: each backward adds
        ∇(loss_m / accum), and under DDP only the last one all-reduces (``no_sync`` before it). Returns the mean
        loss and the mean of the task's logged values."""
        t, k = self.cfg.train, self.cfg.train.accum
        ddp, dtype = self.ctx.world > 1 and not self.sharded, t.autocast_dtype()
        total, extras = 0.0, []
        for m in range(k):
            last = m == k - 1
            if self.sharded:
                self.model.set_requires_gradient_sync(last)
            with self.net.no_sync() if ddp and not last else contextlib.nullcontext():
                with torch.autocast(self.ctx.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    loss, extra = self.task.loss(self.net, self.step, self.generator, m)
                self.scaler.scale(loss / k).backward()
            total += float(loss.detach()) / k
            extras.append(extra)
        mean = {key: sum(e[key] for e in extras) / k for key in extras[0]} if k > 1 else extras[0]
        return total, mean

    # --- the loop -----------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train to train.steps with a progress bar, JSONL log, sample grids and checkpoints. SIGINT/SIGTERM
        stop after the current step with a checkpoint (``TrainingInterrupted`` says how to resume). The run
        directory's lock is released at the end, whatever happens."""
        try:
            with StopRequest(announce=dist.is_main()) as stop:
                return self._run(stop)
        finally:
            self.close()

    def _run(self, stop: StopRequest) -> dict[str, Any]:
        t, main = self.cfg.train, dist.is_main()
        if main:
            self.dir.root.mkdir(parents=True, exist_ok=True)
            write_json(self.dir.config, self.cfg.to_dict())
        bar = tqdm(
            total=t.steps,
            initial=self.step,
            disable=not (main and self.progress),
            dynamic_ncols=True,
            desc=self.task.name,
        )
        self._start, start_step, last = time.time(), self.step, {}
        tick, tick_step = self._start, self.step
        while self.step < t.steps:
            if self._stop_requested(stop):
                bar.close()
                self.save_checkpoint()
                raise TrainingInterrupted(
                    f"stopped by {signal.Signals(stop.signum or signal.SIGINT).name} at step {self.step} of "
                    f"{t.steps}; checkpoint written to {self.dir.checkpoint}; resume with: "
                    f"cmkit train --resume {self.dir.root}",
                    stop.signum or signal.SIGINT,
                )
            last = self.train_step()
            if last["skipped"]:
                self.consecutive_skips += 1
                bar.set_postfix(skipped=self.skipped)
                if main:  # the attempt at step + 1, with its reason (dropped with later rows on resume)
                    self.dir.append_log({**last, "step": self.step + 1, "skipped_total": self.skipped})
                if self.consecutive_skips >= t.max_skipped:
                    raise CmkitError(
                        f"training diverged: {self.consecutive_skips} consecutive steps with "
                        f"{last['reason']} after step {self.step} (train.max_skipped="
                        f"{t.max_skipped}); the last checkpoint is in {self.dir.checkpoint}"
                    )
                continue
            self.consecutive_skips = 0
            bar.update(1)
            if self.step % t.log_every == 0 or self.step == t.steps:
                now = time.time()
                ips = (self.step - tick_step) * t.batch_size / max(now - tick, 1e-9)
                tick, tick_step = now, self.step
                bar.set_postfix(loss=f"{last['loss']:.4g}", img_s=f"{ips:.0f}")
                if main:
                    self.dir.append_log(
                        {
                            "step": self.step,
                            **{k: v for k, v in last.items() if k != "skipped"},
                            "lr": t.lr_at(self.step - 1),
                            "img_per_s": ips,
                            "skipped": self.skipped,
                            "wall_s": round(self.wall_s(), 1),
                        }
                    )
            if t.sample_every and self.step % t.sample_every == 0:
                self.sample()
            if t.ckpt_every and self.step % t.ckpt_every == 0 and self.step < t.steps:
                self.save_checkpoint()
        bar.close()
        self.save_checkpoint()
        self.sample()
        final = last.get("loss")
        if final is not None and self.ctx.world > 1:  # one figure for the run: the mean over the processes
            final = dist.all_reduce_mean(final, self.ctx.device)
        return {
            "steps": self.step,
            "final_loss": final,
            "wall_s": self.wall_s(),
            "skipped": self.skipped,
            "steps_run": self.step - start_step,
            "out": str(self.dir.root),
        }

    def _stop_requested(self, stop: StopRequest) -> bool:
        """Whether a signal asked to stop, agreed over all processes (a signal may reach them at different steps)."""
        asked = float(stop.signum is not None)
        if self.ctx.world > 1:
            if dist.all_reduce_mean(asked, self.ctx.device) > 0:
                stop.signum = stop.signum or signal.SIGTERM
                return True
            return False
        return bool(asked)

    def close(self) -> None:
        """Stop the data-loader workers and release the run directory (``run()`` does so when it ends): for a
        Loop driven step by step."""
        if hasattr(self.task, "batches"):
            self.task.batches.close()
        self.dir.unlock()

    def wall_s(self) -> float:
        """Training wall time in seconds, summed over resumed sessions."""
        return self.wall_before + (time.time() - getattr(self, "_start", time.time()))

    def exported(self) -> tuple[nn.Module, str]:
        """The network a run exports (the first EMA, else the online weights) and its checkpoint file stem."""
        rates = self.cfg.train.ema_rates
        return (self.emas[0], RunDir.weights_name(rates[0])) if rates else (self.model, RunDir.weights_name(None))

    def sample(self) -> None:
        """Sample grids of the exported network, on rank 0 (every rank takes part in gathering a sharded one)."""
        model = self.exported()[0]
        if self.sharded:
            whole = sharding.full_state_dict(model)
            if self.shadow is not None:
                self.shadow.load_state_dict(whole)
            model = self.shadow
        if not dist.is_main():
            return
        with eval_mode(model) as model:
            self.task.sample(model, self.dir.samples, self.step)

    def save_checkpoint(self) -> None:
        """``checkpoint/`` (exact resume) and ``model/`` (the export) atomically; every rank's RNG is gathered."""
        states = {"rank": torch.get_rng_state(), "generator": self.generator.get_state()}
        if self.ctx.device.type == "cuda":  # dropout on a GPU draws from the CUDA generator
            states["cuda"] = torch.cuda.get_rng_state(self.ctx.device)
        rngs = {f"{name}{r}": s for name, state in states.items() for r, s in enumerate(dist.all_gather_tensor(state))}
        modules: dict[str, Any] = self.modules()
        optimizer_state = self.optimizer.state_dict()
        if self.sharded:  # whole tensors, gathered by every rank: the files of an unsharded run
            modules = {name: sharding.full_state_dict(m) for name, m in modules.items()}
            optimizer_state = sharding.full_optimizer_state(self.optimizer)
        if dist.is_main():
            state = {"step": self.step, "skipped": self.skipped, "world_size": self.ctx.world, "wall_s": self.wall_s()}
            if self.cfg.train.fp16:
                state["grad_scaler"] = self.scaler.state_dict()
            self.dir.save_checkpoint(modules, optimizer_state, rngs, state, self.cfg.to_dict())
            model, weights = modules[self.exported()[1]], self.exported()[1]
            kind, config, meta = self.task.export_config()
            export = getattr(self.task, "export_module", lambda m: m)(model)
            extra = getattr(self.task, "export_files", lambda m: {})(model)
            meta = {**meta, "step": self.step, "weights": weights}
            save_model_dir(self.dir.model, export, kind, config, meta, extra=extra)
        dist.barrier()


def train(cfg: RunConfig, progress: bool = True) -> dict[str, Any]:
    """Train the run described by ``cfg`` (any kind); returns a summary (steps, final loss, wall time)."""
    try:
        return Loop(cfg, progress).run()
    finally:
        dist.cleanup()


def dry_run(cfg: RunConfig) -> str:
    """Validate ``cfg`` and build its model, loss and optimizer on the meta device (no data, no weights).

    Returns a summary: what it builds, and for a denoiser run the options of its method (``LossConfig.describe``).
    Raises ``CmkitError`` for any config problem, before any data is loaded.
    """
    cfg.validate()
    task = run_kind(cfg.kind).task
    loss = task.build_loss(cfg)
    with torch.device("meta"):  # the network's size without allocating it (ImageNet-64 presets included)
        model = task.build_model(cfg)
    optimizer = cfg.train.build_optimizer(model.parameters())
    n = sum(p.numel() for p in model.parameters())
    summary = (
        f"builds: {type(model).__name__} with {n:,} parameters, loss {type(loss).__name__}, "
        f"optimizer {type(optimizer).__name__}"
    )
    if hasattr(cfg.loss, "describe"):
        summary += f"\noptions of loss.method={cfg.loss.method}:\n{cfg.loss.describe(cfg.train.steps)}"
    return summary
