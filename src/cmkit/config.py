"""The config machinery every run shares: typed sections, ``key=value`` overrides, validation, JSON round trips.

A run config is a dataclass whose fields are *sections* (dataclasses of options). ``RunConfig`` is the base
of every kind of run, and ``DataConfig`` and ``TrainConfig`` are the sections they share: the diffusion /
consistency-model run (``cmkit.denoiser_config.Config``) and the autoencoder and consistency-decoder runs
(``cmkit.training.decoder_config``). Every preset of every kind is in ``cmkit.training.presets``.

* Overrides are ``section.key=value`` or a bare ``key=value`` when the name is unique in the config.
* Options that take one of a fixed set of names are ``Literal`` types, checked while parsing with a
  "did you mean" suggestion; ``validate()`` checks the rules across fields before any data is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar

from .datasets import SPLIT_DATASETS
from .errors import CmkitError

T = TypeVar("T")

Optimizer = Literal["adam", "radam"]
DataName = Literal["digits", "fashion_mnist", "mnist", "emoji", "folder", "captions", "npz", "shards"]
Noise = Literal["stream", "per_sample"]
Parallel = Literal["ddp", "fsdp"]
Split = Literal["train", "test"]

#: Keys that may change between a run and its resumption (everything else must match exactly).
RUN_CONTROL_KEYS = (
    "train.steps",
    "train.resume",
    "train.log_every",
    "train.sample_every",
    "train.ckpt_every",
    "train.num_threads",
    "train.out_dir",
    "train.max_skipped",
    "data.workers",
    "model.checkpointing",
)
#: Classes of the labelled built-in data sets (0 = unlabelled); folder/npz are checked when loaded.
DATA_CLASSES = {"digits": 10, "fashion_mnist": 10, "mnist": 10, "emoji": 0}


def max_threads() -> int:
    """The largest thread count accepted (``train.num_threads``, ``--threads``): 4 per CPU of this machine
    (torch crashes on absurd counts)."""
    return 4 * max(1, os.cpu_count() or 1)


def require(ok: bool, message: str) -> None:
    """Raise ``CmkitError(message)`` unless ``ok``: the one-line form of every config rule."""
    if not ok:
        raise CmkitError(message)


# --- shared sections -------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Training data."""

    name: DataName = "digits"  # digits | fashion_mnist | mnist | emoji | folder | captions (captioned images, for a
    # text-to-image teacher) | npz | shards
    root: str = ""  # folder, .npz file, shard set or directory of IDX files ("" = the bundled/Debian copy)
    split: Split = "train"  # train | test
    flip: bool = False  # random horizontal flips (a pure function of seed and step)
    workers: int = 0  # data-loader processes preparing the next batches (0 = in the training process)

    def check(self) -> None:
        require(self.workers >= 0, f"data.workers must be 0 or more, got {self.workers}")
        require(
            self.split == "train" or self.name in SPLIT_DATASETS,
            f"data.split={self.split}: data set {self.name!r} has no held-out split (only "
            f"{', '.join(SPLIT_DATASETS)} do)",
        )


@dataclass
class TrainConfig:
    """Optimisation, EMAs, precision, seeds, logging and checkpointing (the same for every kind of run)."""

    steps: int = 1000  # optimisation steps K
    batch_size: int = 64  # global batch (split over processes, then into train.accum microbatches)
    accum: int = 1  # gradient-accumulation microbatches per process and step
    noise: Noise = "stream"  # stream (one generator per process) | per_sample (a step is independent of the split)
    parallel: Parallel = "ddp"  # under torchrun: ddp (whole copies) | fsdp (parameters, moments and EMAs sharded)
    lr: float = 2e-4  # learning rate after warm-up
    optimizer: Optimizer = "radam"  # adam | radam
    betas: tuple[float, ...] = (0.9, 0.999)  # Adam β1, β2
    weight_decay: float = 0.0  # L2 weight decay (Adam's, not AdamW's)
    warmup_steps: int = 0  # linear learning-rate warm-up
    grad_clip: float = 0.0  # max global gradient norm (0 = off)
    ema_rates: tuple[float, ...] = (0.999,)  # evaluation EMAs; the first is exported (none: the online weights)
    bf16: bool = False  # bfloat16 autocast for the network (σ arithmetic stays fp32)
    fp16: bool = False  # float16 autocast with dynamic loss scaling (the CM paper's setting; overflows skip)
    seed: int = 0  # batches, noise, dropout and initialisation
    out_dir: str = ""  # run directory ("" = runs/PRESET)
    resume: bool = False  # continue the run in out_dir exactly
    log_every: int = 10  # steps between log.jsonl rows
    sample_every: int = 500  # steps between sample grids (0 = only at the end)
    ckpt_every: int = 500  # steps between checkpoints (0 = only at the end)
    num_threads: int = 0  # torch CPU threads (0 = torch's default)
    max_skipped: int = 20  # consecutive non-finite steps that stop the run as diverged

    def lr_at(self, step: int) -> float:
        """Learning rate of step ``step`` (0-based): linear warm-up to ``lr``."""
        return self.lr * min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else self.lr

    def autocast_dtype(self) -> Any:
        """The network's autocast dtype (bf16 or fp16), or None for fp32."""
        import torch

        return torch.bfloat16 if self.bf16 else torch.float16 if self.fp16 else None

    def build_optimizer(self, params: Any) -> Any:
        """Adam or RAdam over ``params`` with this section's lr, betas and weight decay."""
        import torch

        cls = {"adam": torch.optim.Adam, "radam": torch.optim.RAdam}[self.optimizer]
        return cls(list(params), lr=self.lr, betas=tuple(self.betas), weight_decay=self.weight_decay)

    def check(self) -> None:
        most = max_threads()
        require(
            self.num_threads <= most,
            f"train.num_threads must be 0 (torch's default) or at most {most} (4 per CPU), got {self.num_threads}",
        )
        for key in ("steps", "batch_size", "accum", "log_every", "max_skipped"):
            require(getattr(self, key) >= 1, f"train.{key} must be at least 1, got {getattr(self, key)}")
        for key in ("warmup_steps", "sample_every", "ckpt_every", "num_threads"):
            require(getattr(self, key) >= 0, f"train.{key} must be 0 or more, got {getattr(self, key)}")
        require(
            self.batch_size % self.accum == 0,
            f"train.batch_size={self.batch_size} must be divisible by train.accum={self.accum} (equal microbatches)",
        )
        require(not (self.bf16 and self.fp16), "train.bf16 and train.fp16 exclude each other; choose one")
        require(self.lr > 0, f"train.lr must be positive, got {self.lr}")
        require(self.grad_clip >= 0, f"train.grad_clip must be 0 (off) or positive, got {self.grad_clip}")
        require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"train.betas must be two numbers in [0, 1), got {list(self.betas)}",
        )
        require(
            all(0 <= r < 1 for r in self.ema_rates), f"train.ema_rates must lie in [0, 1), got {list(self.ema_rates)}"
        )


# --- the run config base ---------------------------------------------------------------------------


class RunConfig:
    """What every run config has: a ``kind``, a ``train`` section, dict/JSON round trips and ``validate``."""

    kind: ClassVar[str]
    train: TrainConfig
    #: keys a run fills in when it starts (measured on its data) unless the config gives them
    measured_keys: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready nested dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls: type[T], d: dict[str, Any]) -> T:
        """The inverse of ``to_dict``; unknown sections or keys are one clear error."""
        cfg = cls()
        for section, values in d.items():
            require(
                isinstance(values, dict) and section in _section_names(cfg),
                f"unknown config section {section!r}; expected one of {', '.join(_section_names(cfg))}",
            )
            for key, value in values.items():
                set_value(cfg, f"{section}.{key}", value)
        return cfg

    def validate(self) -> None:
        """Rules across fields; raises ``CmkitError`` with one line. Subclasses add their own."""
        self.train.check()

    def adopt_measured(self, saved: dict[str, Any]) -> None:
        """Take the values a saved run measured when it started (``measured_keys``) where this config leaves them
        unset: a resume uses them as they were rather than measuring again."""
        old = flatten(saved)
        for key in self.measured_keys:
            section, name = key.split(".")
            if not getattr(getattr(self, section), name) and old.get(key):
                set_value(self, key, old[key])

    def changes_from(self, saved: dict[str, Any]) -> list[tuple[str, Any, Any]]:
        """(key, saved value, this value) for every setting that differs from a saved config, run-control keys
        left out: what a resume of the saved run must refuse. A key the saved config lacks (a setting added to
        cmkit after the run started) counts as its default, which keeps the behaviour the run was started with."""
        old, new = {**flatten(type(self)().to_dict()), **flatten(saved)}, flatten(self.to_dict())
        return [
            (k, old.get(k), new.get(k))
            for k in sorted(set(old) | set(new))
            if k not in RUN_CONTROL_KEYS and old.get(k) != new.get(k)
        ]


# --- the consistency-model / diffusion run ---------------------------------------------------------


# --- generic machinery: keys, parsing, overrides ---------------------------------------------------


def _section_names(cfg: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(cfg)]


def leaf_keys(cfg: Any, prefix: str = "") -> list[str]:
    """Every option of a (nested) config dataclass as a dotted key."""
    keys = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            keys += leaf_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1}} → {"train.lr": 1}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def resolve_key(cfg: Any, key: str) -> str:
    """``train.lr`` stays; a bare ``lr`` becomes ``train.lr`` when unique; unknown keys raise ``CmkitError``."""
    keys = leaf_keys(cfg)
    if key in keys:
        return key
    matches = [k for k in keys if k.rsplit(".", 1)[-1] == key]
    if len(matches) == 1:
        return matches[0]
    require(not matches, f"config key {key!r} is ambiguous; use one of {', '.join(matches)}")
    close = difflib.get_close_matches(key, keys + [k.rsplit(".", 1)[-1] for k in keys], n=3)
    hint = (
        f"; did you mean {', '.join(close)}?"
        if close
        else "; run `cmkit train --preset NAME --dry-run` to see all keys"
    )
    raise CmkitError(f"unknown config key {key!r}{hint}")


def coerce(key: str, value: Any, hint: Any) -> Any:
    """``value`` (often a string from the command line) as the field type ``hint``; one-line errors."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return coerce(key, value, next(a for a in args if a is not type(None)))
    if origin is Literal:
        text = str(value)
        if text not in args:
            close = difflib.get_close_matches(text, [str(a) for a in args], n=1)
            hint_text = f"; did you mean {close[0]}?" if close else ""
            raise CmkitError(f"config key {key}: {text!r} is not one of {', '.join(map(str, args))}{hint_text}")
        return text
    try:
        if origin is tuple:
            items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v.strip()]
            return tuple(coerce(key, v, args[0]) for v in items)
        if hint is bool:
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                raise ValueError(value)
            return text in ("1", "true", "yes", "on")
        if hint in (int, float):
            if isinstance(value, bool):
                raise TypeError(value)
            f = float(value)
            if not math.isfinite(f):
                raise CmkitError(f"config key {key}: {value!r} is not a finite number")
            if hint is float:
                return f
            if f != int(f):
                raise ValueError(value)
            return int(f)
        return str(value)
    except (TypeError, ValueError, OverflowError):
        name = getattr(hint, "__name__", str(hint))
        raise CmkitError(f"config key {key}: cannot read {value!r} as {name}") from None


def set_value(cfg: Any, key: str, value: Any) -> None:
    """Set ``key`` (dotted or a unique bare name) on ``cfg``, converting ``value`` to the field's type."""
    full = resolve_key(cfg, key)
    *path, name = full.split(".")
    obj = cfg
    for part in path:
        obj = getattr(obj, part)
    setattr(obj, name, coerce(full, value, typing.get_type_hints(type(obj))[name]))


def parse_overrides(overrides: list[str]) -> list[tuple[str, str]]:
    """``["key=value", ...]`` → ``[(key, value), ...]``; anything without ``=`` is one clear error."""
    pairs = []
    for item in overrides:
        require("=" in item, f"expected key=value, got {item!r} (e.g. train.steps=2000)")
        key, value = item.split("=", 1)
        pairs.append((key.strip(), value.strip()))
    return pairs


def apply_overrides(cfg: T, overrides: list[str]) -> T:
    """Apply ``key=value`` strings in order."""
    for key, value in parse_overrides(overrides):
        set_value(cfg, key, value)
    return cfg


def dataclass_from_dict(cls: type[T], d: dict[str, Any], what: str) -> T:
    """``cls(**d)`` for a flat (possibly frozen) dataclass, with one clear error naming any unknown keys."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    require(not unknown, f"unknown {what} config keys {unknown}; expected a subset of {sorted(known)}")
    return cls(**d)
