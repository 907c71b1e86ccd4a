"""Typed run configuration, ``key=value`` overrides, and the preset registry.

A config has five sections (model, data, loss, train, sample). Overrides use dotted keys
(``train.lr=2e-4``) or a bare field name when it is unique across sections (``lr=2e-4``).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, TypeVar

from .errors import CmkitError

T = TypeVar("T")


@dataclass
class ModelConfig:
    """Backbone (``unet`` or ``mlp``) and preconditioning (``edm`` for diffusion, ``cm`` for consistency)."""

    arch: str = "unet"
    img_resolution: int = 8
    in_channels: int = 1
    model_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2)
    num_blocks: int = 1
    attn_resolutions: tuple[int, ...] = ()
    dropout: float = 0.0
    num_classes: int = 0
    embedding: str = "positional"
    fourier_scale: float = 16.0
    head_channels: int = 64
    hidden: int = 128
    depth: int = 3
    precond: str = "cm"
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5


@dataclass
class DataConfig:
    """Training data: ``digits``, ``fashion_mnist``, ``mnist``, ``folder`` or ``npz`` (root = path)."""

    name: str = "digits"
    root: str = ""
    split: str = "train"
    flip: bool = False


@dataclass
class LossConfig:
    """Method (edm, cd, ct, ict, ect) and its options; ``None`` keeps the method's published default."""

    method: str = "ict"
    distance: Optional[str] = None
    weighting: Optional[str] = None
    huber_c: Optional[float] = None
    lpips_weights: Optional[str] = None
    num_scales: Optional[int] = None
    mu: Optional[float] = None
    solver: Optional[str] = None
    s0: Optional[int] = None
    s1: Optional[int] = None
    mu0: Optional[float] = None
    P_mean: Optional[float] = None
    P_std: Optional[float] = None
    q: Optional[float] = None
    k: Optional[float] = None
    b: Optional[float] = None
    double_steps: Optional[int] = None
    total_steps: Optional[int] = None


@dataclass
class TrainConfig:
    """Optimisation, EMA, precision, logging and checkpointing."""

    steps: int = 1000
    batch_size: int = 64
    lr: float = 2e-4
    optimizer: str = "radam"
    betas: tuple[float, ...] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 0.0
    ema_rates: tuple[float, ...] = (0.999,)
    bf16: bool = False
    seed: int = 0
    teacher: str = ""
    init_from: str = ""
    out_dir: str = ""
    resume: bool = False
    log_every: int = 10
    sample_every: int = 500
    ckpt_every: int = 500
    num_threads: int = 0


@dataclass
class SampleConfig:
    """Default sampler of the trained model (written into its config.json)."""

    sampler: str = "onestep"
    sigmas: tuple[float, ...] = ()
    steps: int = 18
    grid_size: int = 64


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        cfg = cls()
        for section, values in d.items():
            if not hasattr(cfg, section):
                raise CmkitError(f"unknown config section {section!r}; expected one of {SECTIONS}")
            for key, value in values.items():
                set_value(cfg, f"{section}.{key}", value)
        return cfg


SECTIONS = ("model", "data", "loss", "train", "sample")


def dataclass_from_dict(cls: type[T], d: dict[str, Any], what: str) -> T:
    """``cls(**d)`` for a flat config dataclass, with one clear error naming any unknown keys."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise CmkitError(f"unknown {what} config keys {unknown}; expected a subset of {sorted(known)}")
    return cls(**d)


# --- overrides -------------------------------------------------------------------------------------

def _all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s in SECTIONS for f in dataclasses.fields(getattr(Config(), s))]


def resolve_key(key: str) -> str:
    """``train.lr`` stays; a bare ``lr`` becomes ``train.lr`` when unique; unknown keys raise CmkitError."""
    keys = _all_keys()
    if key in keys:
        return key
    matches = [k for k in keys if k.split(".", 1)[1] == key]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise CmkitError(f"config key {key!r} is ambiguous; use one of {', '.join(matches)}")
    close = difflib.get_close_matches(key, keys + [k.split('.', 1)[1] for k in keys], n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else "; run `cmkit train --preset NAME --dry-run` to see all keys"
    raise CmkitError(f"unknown config key {key!r}{hint}")


def _coerce(key: str, value: Any, hint: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return _coerce(key, value, next(a for a in args if a is not type(None)))
    try:
        if origin is tuple:
            items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v.strip()]
            return tuple(_coerce(key, v, args[0]) for v in items)
        if hint is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if hint is int:
            f = float(value)
            if f != int(f):
                raise ValueError(value)
            return int(f)
        if hint is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        name = getattr(hint, "__name__", str(hint))
        raise CmkitError(f"config key {key}: cannot read {value!r} as {name}") from None


def set_value(cfg: Config, key: str, value: Any) -> None:
    """Set ``section.field`` on ``cfg``, converting ``value`` (often a string) to the field's type."""
    full = resolve_key(key)
    section, name = full.split(".", 1)
    obj = getattr(cfg, section)
    hints = typing.get_type_hints(type(obj))
    setattr(obj, name, _coerce(full, value, hints[name]))


def parse_overrides(overrides: list[str], example: str = "train.steps=2000") -> list[tuple[str, str]]:
    """``["key=value", ...]`` → ``[(key, value), ...]``; anything without ``=`` is one clear error."""
    pairs = []
    for item in overrides:
        if "=" not in item:
            raise CmkitError(f"expected key=value, got {item!r} (e.g. {example})")
        key, value = item.split("=", 1)
        pairs.append((key.strip(), value.strip()))
    return pairs


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``key=value`` strings in order."""
    for key, value in parse_overrides(overrides):
        set_value(cfg, key, value)
    return cfg


def loss_kwargs(cfg: Config) -> dict[str, Any]:
    """Options for ``build_loss``: set loss fields, the σ range, and K = train.steps unless given."""
    kw = {k: v for k, v in asdict(cfg.loss).items() if v is not None and k != "method"}
    kw.setdefault("total_steps", cfg.train.steps)
    kw.update(sigma_min=cfg.model.sigma_min, sigma_max=cfg.model.sigma_max)
    if cfg.loss.method in ("edm", "ect"):
        kw["sigma_data"] = cfg.model.sigma_data
    return kw
