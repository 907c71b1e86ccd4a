"""The Runs tab: a training run's curves, sample grids and config."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CmkitError
from ..formats.run_dir import RunDir
from .common import run_mtime


class RunsTab:
    """The Runs tab's work; a part of ``Backend``, which holds the models."""

    def list_runs(self) -> list[str]:
        """Runs under --runs (two levels deep), as paths relative to it, newest first."""
        if self.runs_root is None or not self.runs_root.is_dir():
            return []
        found = []
        for p in sorted(self.runs_root.glob("*")) + sorted(self.runs_root.glob("*/*")):
            inside_run = p.parent != self.runs_root and RunDir(p.parent).is_run()  # e.g. a run's checkpoint/
            if (
                p.is_dir()
                and not p.name.startswith(".")
                and not inside_run
                and RunDir(p).is_run()
                and self.policy.allows(p.resolve())
            ):
                found.append(p)
        found.sort(key=lambda p: -run_mtime(p))
        return [str(p.relative_to(self.runs_root)) for p in found]

    def run_dir(self, name: str) -> Path:
        if self.runs_root is None:
            raise CmkitError("no runs directory: start `cmkit serve --runs DIR`")
        name = (name or "").strip()
        if not name:
            raise CmkitError("choose a run")
        p = self.policy.check(str(self.runs_root / name) if not Path(name).is_absolute() else name, "run")
        if not (p == self.runs_root or p.is_relative_to(self.runs_root)):
            raise CmkitError(f"run {name!r} is not under {self.runs_root}")
        if not RunDir(p).is_run():
            raise CmkitError(f"{name!r} is not a training run under {self.runs_root}")
        return p

    def run_stamp(self, name: str | None) -> tuple:
        """Changes whenever the Runs tab would show something new: the runs listed, the chosen run's log, samples."""
        runs = tuple(self.list_runs())
        if not name or self.runs_root is None:
            return (runs,)
        try:
            p = self.run_dir(name)
        except CmkitError:
            return (runs, name)
        log = p / "log.jsonl"
        samples = p / "samples"
        return (
            runs,
            name,
            log.stat().st_mtime_ns if log.is_file() else 0,
            log.stat().st_size if log.is_file() else 0,
            len(list(samples.glob("*.png"))) if samples.is_dir() else 0,
        )

    def run_view(self, name: str) -> dict[str, Any]:
        """Log rows, sample grids over time, config and a status line of one run."""
        from PIL import Image

        run = RunDir(self.run_dir(name))
        rows = run.read_log()
        try:
            config = json.loads(run.config.read_text())
        except (OSError, ValueError):
            config = {}
        total = (config.get("train") or {}).get("steps")
        step = rows[-1].get("step", 0) if rows else 0
        samples = []
        if run.samples.is_dir():
            for f in sorted(run.samples.glob("*.png"))[-24:]:
                try:
                    with Image.open(f) as im:
                        samples.append((np.asarray(im.convert("RGB")), f.stem.replace("_", " ")))
                except OSError:
                    continue
        age = time.time() - run.log.stat().st_mtime if run.log.is_file() else None
        last = rows[-1] if rows else {}
        status = (
            f"**{name}**: step {step}"
            + (f" of {total}" if total else "")
            + (f", loss {last['loss']:.4g}" if isinstance(last.get("loss"), (int, float)) else "")
            + (f"; log updated {age:.0f} s ago" if age is not None else "; no log yet")
            + (" (training)" if age is not None and age < 60 and total and step < total else "")
        )
        return {"rows": rows, "samples": samples, "config": config, "status": status, "step": step}
