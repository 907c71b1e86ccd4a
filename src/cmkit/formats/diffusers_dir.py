"""A diffusers model directory read for a cmkit denoiser (``cmkit.load`` wraps it in ``cmkit.discrete_vp``).

Two layouts are read, both as ``save_pretrained`` writes them and nothing downloaded:

- a pipeline directory (``model_index.json``, ``unet/``, ``scheduler/``), e.g. a local copy of SD 1.5;
- a model directory (``config.json`` of a ``UNet2DModel`` / ``UNet2DConditionModel`` and its weights), with the
  schedule in ``scheduler_config.json`` beside it (google/ddpm-cifar10-32's layout) or in ``../scheduler/``.

The noise schedule (``alphas_cumprod``) is computed by diffusers' own ``DDPMScheduler`` from the scheduler config
(any scheduler class's config: they share the beta fields), and the prediction type is the config's
``prediction_type`` (default epsilon, as in diffusers). A text-to-image pipeline's other parts are read here too:
its ``vae/`` (an ``AutoencoderKL``, ``load_diffusers_vae``) and its ``tokenizer/`` + ``text_encoder/``
(transformers' CLIP, ``load_text_parts``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CmkitError, one_line, optional_import

UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")
SCHEDULER_FILE = "scheduler_config.json"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CmkitError(f"{path}: not a readable JSON file ({one_line(e, 160)})") from None


def unet_class(path: Path) -> str | None:
    """The diffusers UNet class a ``config.json`` names, or None when the file is absent or names another class."""
    config = path / "config.json"
    if not config.is_file():
        return None
    try:
        name = json.loads(config.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None
    return name if name in UNET_CLASSES else None


def is_diffusers_dir(path: str | Path) -> bool:
    """True for a diffusers pipeline directory or a diffusers UNet model directory."""
    p = Path(path).expanduser()
    return p.is_dir() and ((p / "model_index.json").is_file() or unet_class(p) is not None)


def locate(path: str | Path) -> tuple[Path, Path]:
    """(UNet directory, scheduler config file) of a diffusers directory, or one error line saying what is missing."""
    p = Path(path).expanduser()
    unet_dir = p / "unet" if (p / "model_index.json").is_file() else p
    if unet_class(unet_dir) is None:
        raise CmkitError(
            f"{p}: no diffusers UNet found (expected {unet_dir / 'config.json'} naming one of {UNET_CLASSES})"
        )
    candidates = [unet_dir / SCHEDULER_FILE, unet_dir.parent / "scheduler" / SCHEDULER_FILE]
    scheduler = next((c for c in candidates if c.is_file()), None)
    if scheduler is None:
        raise CmkitError(
            f"{p}: no {SCHEDULER_FILE} (looked in {', '.join(str(c.parent) for c in dict.fromkeys(candidates))}); "
            "a diffusers model needs its scheduler config for the noise schedule it was trained on"
        )
    return unet_dir, scheduler


def schedule_of(scheduler_config: dict[str, Any], where: str) -> tuple[Any, str]:
    """(alphas_cumprod, prediction_type) from a scheduler config, computed by diffusers' ``DDPMScheduler``."""
    diffusers = optional_import("diffusers", "diffusers", "a diffusers model")
    prediction_type = scheduler_config.get("prediction_type", "epsilon")
    config = {k: v for k, v in scheduler_config.items() if k != "prediction_type"}
    try:
        scheduler = diffusers.DDPMScheduler.from_config(config)
    except (NotImplementedError, ValueError, TypeError) as e:
        raise CmkitError(f"{where}: cannot build its noise schedule ({one_line(e, 200)})") from None
    return scheduler.alphas_cumprod.clone(), prediction_type


def lcm_timesteps(scheduler_config: dict[str, Any], steps: int) -> list[int]:
    """The timesteps of LCM's ``steps``-step sampling (diffusers' ``LCMScheduler.set_timesteps``: ``steps`` of the
    skipping-step grid of ``original_inference_steps`` = 50 by default), e.g. 999, 759, 499, 259 at 4 steps."""
    diffusers = optional_import("diffusers", "diffusers", "a diffusers model")
    config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    scheduler = diffusers.LCMScheduler.from_config(config)
    scheduler.set_timesteps(steps)
    return [int(t) for t in scheduler.timesteps]


def load_diffusers_unet(unet_dir: Path) -> Any:
    """The diffusers UNet of ``unet_dir`` (its ``from_pretrained``, local files only), in eval mode."""
    diffusers = optional_import("diffusers", "diffusers", "a diffusers model")
    cls = getattr(diffusers, unet_class(unet_dir) or "UNet2DModel")
    try:
        unet = cls.from_pretrained(unet_dir, local_files_only=True, low_cpu_mem_usage=False)
    except (OSError, ValueError, EnvironmentError) as e:
        raise CmkitError(f"{unet_dir}: cannot load the {cls.__name__} weights ({one_line(e, 200)})") from None
    return unet.eval().requires_grad_(False)


def read_schedule(path: str | Path) -> tuple[Path, Any, str, dict[str, Any]]:
    """(UNet directory, alphas_cumprod, prediction type, scheduler config) of a diffusers directory, without
    reading any weights."""
    unet_dir, scheduler_file = locate(path)
    scheduler_config = _read_json(scheduler_file)
    alphas_cumprod, prediction_type = schedule_of(scheduler_config, str(scheduler_file))
    return unet_dir, alphas_cumprod, prediction_type, scheduler_config


def unet_config(path: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a diffusers directory's UNet (the pipeline's ``unet/`` or the directory itself)."""
    unet_dir, _ = locate(path)
    return _read_json(unet_dir / "config.json")


def fresh_unet(unet_dir: Path, **changes: Any) -> Any:
    """The UNet that ``unet_dir``'s config describes, freshly initialised (``from_config``; no weights read), with
    config ``changes`` (e.g. ``time_cond_proj_dim``, LCM's guidance input)."""
    diffusers = optional_import("diffusers", "sd", "a diffusers model")
    cls = getattr(diffusers, unet_class(unet_dir) or "UNet2DModel")
    config = {k: v for k, v in _read_json(unet_dir / "config.json").items() if not k.startswith("_")}
    try:
        return cls.from_config({**config, **changes})
    except (ValueError, TypeError) as e:
        raise CmkitError(f"{unet_dir}: cannot build its {cls.__name__} ({one_line(e, 200)})") from None


@dataclass
class DiffusersModel:
    """What a diffusers directory holds for a denoiser: its UNet (eval mode), the schedule's ``alphas_cumprod``,
    the prediction type as the config names it (checked by ``cmkit.discrete_vp``) and where each came from."""

    unet: Any
    alphas_cumprod: Any
    prediction_type: str
    unet_dir: Path
    scheduler_file: Path
    scheduler_config: dict[str, Any]

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.unet.config)

    @property
    def is_lcm(self) -> bool:
        """A latent consistency model: an ``LCMScheduler`` directory or a UNet with LCM's guidance input."""
        return self.scheduler_config.get("_class_name") == "LCMScheduler" or bool(self.config.get("time_cond_proj_dim"))


def read_diffusers_dir(path: str | Path) -> DiffusersModel:
    """The UNet and noise schedule of a diffusers pipeline or UNet directory (``locate``)."""
    unet_dir, scheduler_file = locate(path)
    scheduler_config = _read_json(scheduler_file)
    alphas_cumprod, prediction_type = schedule_of(scheduler_config, str(scheduler_file))
    unet = load_diffusers_unet(unet_dir)
    return DiffusersModel(unet, alphas_cumprod, prediction_type, unet_dir, scheduler_file, scheduler_config)


def pipeline_root(path: str | Path) -> Path | None:
    """The pipeline directory (with ``model_index.json``) that ``path`` is or whose ``unet/`` it is; None for a bare
    UNet directory."""
    p = Path(path).expanduser()
    for root in (p, p.parent):
        if (root / "model_index.json").is_file():
            return root
    return None


def is_diffusers_vae(path: str | Path) -> bool:
    """True for a diffusers ``AutoencoderKL`` directory (a pipeline's ``vae/``)."""
    config = Path(path).expanduser() / "config.json"
    try:
        return config.is_file() and json.loads(config.read_text()).get("_class_name") == "AutoencoderKL"
    except (OSError, ValueError, AttributeError):
        return False


def load_diffusers_vae(path: str | Path) -> Any:
    """The ``AutoencoderKL`` of a pipeline's ``vae/`` (local files only), in eval mode, frozen."""
    diffusers = optional_import("diffusers", "sd", "a diffusers VAE")
    try:
        vae = diffusers.AutoencoderKL.from_pretrained(Path(path), local_files_only=True, low_cpu_mem_usage=False)
    except (OSError, ValueError, EnvironmentError) as e:
        raise CmkitError(f"{path}: cannot load the AutoencoderKL weights ({one_line(e, 200)})") from None
    return vae.eval().requires_grad_(False)


def load_text_parts(root: Path) -> tuple[Any, Any] | None:
    """(tokenizer, text encoder) of a pipeline directory's ``tokenizer/`` and ``text_encoder/`` (transformers, local
    files only; the encoder's class is the one its ``config.json`` names), or None when it has no text encoder."""
    if not (root / "text_encoder" / "config.json").is_file():
        return None
    transformers = optional_import("transformers", "sd", "a text-to-image pipeline's prompts")
    names = _read_json(root / "text_encoder" / "config.json").get("architectures") or ["CLIPTextModel"]
    cls = getattr(transformers, names[0], None)
    if cls is None:
        raise CmkitError(f"{root / 'text_encoder'}: its text encoder class {names[0]!r} is not in transformers")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
        encoder = cls.from_pretrained(root / "text_encoder", local_files_only=True)
    except (OSError, ValueError, EnvironmentError) as e:
        raise CmkitError(f"{root}: cannot load its tokenizer and text encoder ({one_line(e, 200)})") from None
    return tokenizer, encoder.eval().requires_grad_(False)
