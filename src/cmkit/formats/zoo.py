"""Models shipped with cmkit (under ``cmkit/assets/models/NAME``), loadable by name."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

#: The shipped consistency model with the best one-step FD in benchmarks/results/quality.md: the web page's Sample
#: tab opens on it, beside its teacher.
BEST_ONESTEP = "fmnist-rcm"


def models_root() -> Path:
    return Path(str(resources.files("cmkit").joinpath("assets/models")))


def shipped_models() -> list[str]:
    root = models_root()
    return sorted(p.name for p in root.iterdir() if (p / "config.json").is_file()) if root.is_dir() else []


def is_model_name(name: str) -> bool:
    """A bare name (no directory part, not ``.``/``..``): what can name a shipped model, unlike a path."""
    return bool(name) and Path(name).name == name and name not in (".", "..") and "\\" not in name


def shipped_model_dir(name: str) -> Path | None:
    """The directory of the shipped model ``name``, or None (also for anything that is a path, not a name)."""
    if not is_model_name(str(name)):
        return None
    p = models_root() / name
    return p if (p / "config.json").is_file() and (p / "model.safetensors").is_file() else None
