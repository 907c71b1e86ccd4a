"""What the page does, without the page: sampling, editing, decoding and reading runs, on cmkit's own API.

Every method takes the plain values a form sends (strings, numbers, uint8 arrays), checks them, and either
returns uint8 images and a one-line summary or raises :class:`~cmkit.errors.CmkitError` with one clear line.
Nothing here imports gradio, so it is tested directly and the UI (``app.py``) stays a thin layer.

Paths typed in the page go through :class:`PathPolicy`: only files under the paths given on the command line
(``--runs``, ``--allow``) can be read, after resolving ``..`` and symbolic links. Shipped models are named, never
given as paths. Models and decoders are loaded once and cached (:class:`Cache`), keyed by their weights file's
modification time, so a run that writes a newer export is reloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..denoiser_config import is_diffusion
from ..errors import CmkitError
from ..formats.model_dir import MODEL_FILE, read_model_dir, resolve_model_dir
from ..formats.zoo import is_model_name, models_root, shipped_model_dir, shipped_models
from ..generate import multistep_sigmas
from ..load import load_model
from ..schedules import training_grid
from .common import Cache, Loaded, PathPolicy
from .decode import DecodeTab
from .edit import EditTab
from .runs import RunsTab
from .sample import SampleTab


class Backend(SampleTab, EditTab, DecodeTab, RunsTab):
    """Models, runs and files of one ``cmkit serve`` process."""

    def __init__(
        self,
        runs: str | Path | None = None,
        allow: list[str | Path] | None = None,
        base: str | Path | None = None,
        device: str = "cpu",
    ):
        roots = [p for p in [runs, *(allow or [])] if p]
        self.policy = PathPolicy(roots, base)
        self.runs_root = self.policy.roots[0] if runs else None
        self.device = device
        self.models, self.decoders, self.datasets = Cache(6), Cache(2), Cache(4)

    # models --------------------------------------------------------------------------------------------

    def model_choices(self, consistency_only: bool = False) -> list[str]:
        """Shipped model names, then the runs under --runs whose export samples: diffusion and consistency
        models (kind ``denoiser``), not autoencoders or decoders; ``consistency_only`` also leaves out diffusion
        models (the editing tasks need a one-step generator)."""

        def samples(config_json: Path) -> bool:
            try:
                meta = json.loads(config_json.read_text())
                cfg = meta["config"]
                if meta.get("kind", "denoiser") != "denoiser":
                    return False
                editable = not is_diffusion(cfg["model"].get("precond"), cfg.get("loss", {}).get("method"))
                editable = editable and not cfg.get("latent", {}).get("autoencoder")  # the tasks work on pixels
                return editable or not consistency_only
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                return False

        names = [name for name in shipped_models() if samples(models_root() / name / "config.json")]
        names += [
            str(self.runs_root / run)
            for run in self.list_runs()
            if samples(self.runs_root / run / "model" / "config.json")
        ]
        return names

    def model_dir(self, ref: str) -> Path:
        """A shipped name, or an allowed path of a model or run directory → the model directory."""
        ref = (ref or "").strip()
        if not ref:
            raise CmkitError("choose a model: a shipped name (see `cmkit models`) or a model/run directory")
        shipped = shipped_model_dir(ref)
        if shipped is not None:
            return shipped
        if is_model_name(ref) and not self.policy.roots:
            raise CmkitError(f"unknown model {ref!r}: not a shipped model (see `cmkit models`)")
        try:
            path = self.policy.check(ref, "model")
        except CmkitError:
            if is_model_name(ref):
                raise CmkitError(
                    f"unknown model {ref!r}: not a shipped model (see `cmkit models`), nor a directory "
                    "under the paths given on the command line"
                ) from None
            raise
        if not path.exists():
            raise CmkitError(
                f"unknown model {ref!r}: not a shipped model (see `cmkit models`) and no such directory"
                if is_model_name(ref)
                else f"model not found: no directory {ref!r}"
            )
        d = resolve_model_dir(path)
        if not self.policy.allows(d.resolve()):  # a model/ symlinked out of an allowed run
            raise CmkitError(f"model {ref!r} is outside the paths given on the command line")
        return d

    def load(self, ref: str) -> Loaded:
        d = self.model_dir(ref)
        weights = d / MODEL_FILE
        if not weights.is_file():
            raise CmkitError(f"model {ref!r}: missing weights ({weights} not found)")
        key = (str(d.resolve()), weights.stat().st_mtime_ns)

        def load() -> Loaded:
            md = read_model_dir(d, "denoiser")
            model, cfg = load_model(d, device=self.device)
            return Loaded(ref, d, model, cfg, md.meta.get("description", ""), training_grid(cfg))

        return self.models.get(key, load)

    def model_info(self, ref: str) -> dict[str, Any]:
        """What the page shows when a model is chosen: a description and the σ schedules it offers."""
        m = self.load(ref)
        c = m.cfg.model
        info = {
            "description": m.description,
            "kind": "consistency model" if m.is_cm else "diffusion (EDM) model",
            "resolution": m.resolution,
            "channels": m.channels,
            "num_classes": int(c.num_classes or 0),
            "schedules": {},
            "default_steps": 1 if m.is_cm else int(m.cfg.sample.steps),
        }
        if m.is_cm:
            for k in (1, 2, 4):
                try:
                    info["schedules"][f"{k} step{'s' if k > 1 else ''}"] = multistep_sigmas(m.cfg, k)
                except CmkitError:
                    pass
            own = [float(s) for s in m.cfg.sample.sigmas]
            if len(own) > 1:
                info["schedules"]["published (config)"] = own
        return info

    def teacher_for(self, ref: str, _seen: tuple[str, ...] = ()) -> str | None:
        """The teacher of a distilled model: its recorded teacher when it can be found (followed on when that is
        itself a consistency model, as TCM's frozen first stage), else a shipped EDM model of the same data, size
        and space (pixels, or the same autoencoder's latents); a diffusion model is its own."""
        m = self.load(ref)
        if not m.is_cm:
            return ref
        teacher = str(getattr(m.cfg.train, "teacher", "") or "")
        if teacher and teacher not in _seen:
            name = Path(teacher).name
            found = name if shipped_model_dir(name) is not None else None
            if found is None:
                try:
                    self.model_dir(teacher)
                    found = teacher
                except CmkitError:
                    pass
            if found is not None:
                return self.teacher_for(found, (*_seen, ref, teacher))
        for name in shipped_models():
            try:
                meta = json.loads((models_root() / name / "config.json").read_text())
                cfg = meta["config"]
            except (OSError, ValueError, KeyError):
                continue
            if meta.get("kind", "denoiser") != "denoiser":  # a shipped autoencoder or decoder
                continue
            if (
                is_diffusion(cfg["model"].get("precond"), cfg.get("loss", {}).get("method"))
                and cfg["data"].get("name") == m.cfg.data.name
                and cfg["model"].get("img_resolution") == m.cfg.model.img_resolution
                and (cfg.get("latent") or {}).get("autoencoder", "") == m.cfg.latent.autoencoder  # same space
            ):
                return name
        return None
