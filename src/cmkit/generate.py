"""Model → images: the one path the CLI (``cmkit sample``), evaluation (``cmkit eval --model``) and the web page
take. ``sample_images`` resolves the sampler (``resolve_sampler``: the model's default, ``--steps`` or a σ list,
checked against the registry ``cmkit.sampling.SAMPLERS``), draws the class labels and generates in batches with
per-sample seeds (``generate``)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import Tensor, nn
from tqdm import tqdm

from .denoiser_config import Config
from .distributed import barrier
from .errors import CmkitError
from .guidance import Guided
from .imageio import from_uint8, save_npz, write_npz_streamed
from .inputs import class_labels
from .latent import LatentSpace, RawDecoder
from .precond import TWO_TIME_KINDS
from .sampling import (
    SAMPLERS,
    edm_sigmas,
    nfe,
    per_sample_generators,
    random_labels,
    sample_euler,
    sample_flowmap,
    sample_heun,
    sample_multistep,
    sample_progdist,
    validate_sigmas,
)
from .schedules import DEFAULT_SIGMA_MID, grid_levels, karras_sigmas, nearest_grid_index, training_grid, warn_off_grid


def default_sampler(cfg: Config) -> tuple[str, list[float], int]:
    """(sampler, σ list, steps) the model was trained for: Heun for EDM, 1-step for consistency models."""
    if cfg.is_diffusion():
        sampler = cfg.sample.sampler if cfg.sample.sampler in ("heun", "euler", "progdist") else "heun"
        return sampler, [], cfg.sample.steps
    return "onestep", [cfg.model.sigma_max], 1


def resolve_sampler(
    cfg: Config, sampler: str | None, steps: int | None, sigmas: Sequence[float] | None
) -> tuple[str, list[float], int]:
    """Turn CLI choices into (sampler, σ list, steps); consistency models take ``steps`` = 1, 2, … or a σ list.

    Without ``sigmas`` a k-step sampler uses ``multistep_sigmas`` (on the training grid when the model has one);
    given ``sigmas`` off that grid are used as given, with one warning line on stderr naming the nearest levels
    (continuous-time models never warn)."""
    c = cfg.model
    if sampler is None:
        if sigmas:
            sampler = "multistep"
        elif not cfg.is_diffusion():
            sampler = "onestep" if (steps or 1) == 1 else "multistep"
        else:
            sampler = default_sampler(cfg)[0]
    if sampler not in SAMPLERS:
        raise CmkitError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLERS)}")
    family = SAMPLERS[sampler].models
    if cfg.is_diffusion() and family != "diffusion":
        names = ", ".join(n for n, s in SAMPLERS.items() if s.models == "diffusion")
        raise CmkitError(f"this is a diffusion model: use --sampler {names}")
    if not cfg.is_diffusion() and family == "diffusion":
        raise CmkitError("this is a consistency model: use --steps 1|2|... or --sigmas")
    if sampler == "flowmap" and c.precond not in TWO_TIME_KINDS:
        raise CmkitError(
            "--sampler flowmap needs a two-time flow-map model (MeanFlow, AYF); this model has "
            f"precond {c.precond}: use --steps or --sigmas"
        )
    if sampler == "onestep":
        return sampler, [c.sigma_max], 1
    if sampler in ("multistep", "flowmap"):
        given = bool(sigmas)
        try:
            sigmas = validate_sigmas(sigmas if given else multistep_sigmas(cfg, steps or 2), c.sigma_min, c.sigma_max)
        except ValueError as e:
            raise CmkitError(str(e)) from None
        if given:
            warn_off_grid(sigmas, training_grid(cfg))
        return sampler, sigmas, len(sigmas)
    steps = steps or cfg.sample.steps
    if sampler in ("heun", "euler") and steps < 2:  # --steps 1 would be an empty Karras grid
        raise CmkitError(f"--steps {steps}: the {sampler} sampler needs at least 2 σ levels (--steps 2 or more)")
    return sampler, [], steps


def multistep_sigmas(cfg: Config, steps: int) -> list[float]:
    """σ levels of a ``steps``-step sampler for the model of ``cfg``.

    Continuous-time models (ECT; ``training_grid`` is None): the model's own list when it has ``steps`` levels,
    else σ_max followed by ``steps`` − 1 levels Karras-spaced (ρ = 7) down to the model's 2-step middle σ
    (``sample.sigmas[1]``, else 0.8).

    Models trained on a σ grid (CD, CT, iCT): the same construction on the grid, so every level is one the
    model was trained on: the model's own list with each σ moved to its nearest grid level (nearest in
    σ^{1/ρ}, i.e. its fractional grid index rounded) when it has ``steps`` levels; else the grid levels at
    indices round(linspace(0, i_mid, steps)), i_mid the grid index nearest the middle σ (at least ``steps`` − 1,
    so that the levels are distinct). For 18-level CD grids and the middle σ 0.8 this is
    [80, 0.5853] at 2 steps, the CM paper's CIFAR-10 CD setting (ts = 0, 11, 17 on N = 18).
    """
    c, own = cfg.model, list(cfg.sample.sigmas)
    grid = training_grid(cfg)
    if grid is None:
        if len(own) == steps:
            return own
        if steps == 1:
            return [c.sigma_max]
        mid = own[1] if len(own) >= 2 else DEFAULT_SIGMA_MID
        return [c.sigma_max] + karras_sigmas(steps, mid, c.sigma_max).tolist()[1:]
    if len(own) == steps:
        idx = [nearest_grid_index(s, grid) for s in own]
        if all(a < b for a, b in zip(idx, idx[1:])) and idx[-1] < len(grid) - 1:
            return [grid[i] for i in idx]
    if steps == 1:
        return [c.sigma_max]
    mid = own[1] if len(own) >= 2 else DEFAULT_SIGMA_MID
    i_mid = min(max(nearest_grid_index(mid, grid), steps - 1), len(grid) - 2)
    return grid_levels(grid, steps, 0, i_mid)


@dataclass
class Samples:
    """Images in [-1, 1] (n, C, H, W), their class labels (None for an unconditional model), and the sampler
    setting that drew them."""

    images: Tensor
    labels: Tensor | None
    sampler: str
    sigmas: list[float]
    steps: int

    @property
    def nfe(self) -> int:
        """Network evaluations per image."""
        return nfe(self.sampler, self.steps)


def sample_images(
    model: nn.Module,
    cfg: Config,
    n: int,
    *,
    sampler: str | None = None,
    steps: int | None = None,
    sigmas: Sequence[float] | None = None,
    classes: str | None = None,
    seed: int = 0,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    bf16: bool = False,
    progress: bool = True,
    guidance: float | None = None,
    decoder: RawDecoder | None = None,
    prompts: Sequence[str] | None = None,
) -> Samples:
    """``n`` images from a loaded model (``cmkit.load.load_model``): the sampler resolved as ``resolve_sampler``
    does (None: the model's own), class labels from ``classes`` (``"3"`` or ``"0,1,2"``, cycled; random from the
    seed when None), image i drawn with seed ``seed + i``; ``guidance`` is a scale w (``check_guidance``: an
    LCM model's input, or classifier-free guidance of a label-dropout diffusion model); ``decoder`` decodes a
    latent model's samples instead of its autoencoder (``cmkit.latent.RawDecoder``); ``prompts`` (cycled) are a
    text-to-image pipeline's (``check_prompts``)."""
    sampler, sigma_list, steps = resolve_sampler(cfg, sampler, steps, sigmas)
    labels = class_labels(classes, cfg.model.num_classes, n)
    check_guidance(model, cfg, guidance)
    x, labels = generate(
        model,
        cfg,
        n,
        sampler,
        sigma_list,
        steps,
        seed,
        batch_size,
        device,
        progress,
        labels,
        bf16,
        guidance,
        decoder,
        prompts,
    )
    return Samples(x, labels, sampler, sigma_list, steps)


def check_guidance(model: nn.Module, cfg: Config, guidance: float | None) -> None:
    """A guidance scale w is the input of a guidance-distilled (LCM) model, or classifier-free guidance of a
    class-conditional diffusion model trained with label dropout (``cmkit.guidance``); finite and ≥ 0."""
    if guidance is None:
        return
    if not (guidance >= 0 and guidance < float("inf")):
        raise CmkitError(f"--guidance must be a finite scale ≥ 0, got {guidance}")
    if getattr(model, "takes_guidance", False):
        return
    if cfg.is_diffusion() and getattr(model, "prompt_encoder", None) is not None:
        return  # a text-to-image pipeline: guided with the empty prompt as the null branch
    if not cfg.is_diffusion():
        raise CmkitError(
            "--guidance is the input of a guidance-distilled (LCM) model, or classifier-free guidance of a diffusion "
            "model; this consistency model takes none"
        )
    dropout = cfg.loss.label_dropout or 0.0
    if not (cfg.model.num_classes and dropout > 0):
        raise CmkitError(
            "--guidance on a diffusion model is classifier-free guidance: it needs a class-conditional model trained "
            f"with loss.label_dropout > 0 (this one has model.num_classes={cfg.model.num_classes}, "
            f"loss.label_dropout={dropout:g})"
        )


def cfg_guidance(model: nn.Module, cfg: Config, guidance: float | None) -> float | None:
    """The scale w at which a diffusion model is sampled under classifier-free guidance (two network evaluations
    per step and image): ``guidance``, else the model's ``sample.guidance`` (7.5 for a Stable Diffusion pipeline,
    as diffusers; 1 for cmkit's teachers). None: unguided (w = 1), or an LCM model, which takes w as an input."""
    w = cfg.sample.guidance if guidance is None else guidance
    if w == 1.0 or getattr(model, "takes_guidance", False) or not cfg.is_diffusion():
        return None
    return w


def check_prompts(model: nn.Module, prompts: Sequence[str] | None) -> list[str] | None:
    """Prompts as a list; one error line unless the model is a text-to-image pipeline's (it has a prompt encoder)."""
    if prompts is None:
        return None
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise CmkitError("prompts must be a non-empty list of strings")
    if getattr(model, "prompt_encoder", None) is None:
        raise CmkitError(
            "--prompt is for a text-to-image pipeline directory (a diffusers directory with tokenizer/ and "
            "text_encoder/ beside unet/); this model takes no prompts"
        )
    return list(prompts)


def sample_to_npz(
    model: nn.Module,
    cfg: Config,
    n: int,
    path: str | Path,
    *,
    sampler: str | None = None,
    steps: int | None = None,
    sigmas: Sequence[float] | None = None,
    classes: str | None = None,
    seed: int = 0,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    bf16: bool = False,
    progress: bool = True,
    grid: int = 0,
    guidance: float | None = None,
    decoder: RawDecoder | None = None,
    prompts: Sequence[str] | None = None,
) -> Samples:
    """``n`` images written to the ``.npz`` ``path`` (uint8 NHWC ``arr_0``, labels ``arr_1``) in bounded memory,
    spread over the processes of ``torchrun`` (one process without it).

    The work is cut into parts of ``batch_size`` images; part ``c`` goes to rank ``c mod world`` and is written as
    its own file in ``PATH.parts/`` as soon as it is drawn; rank 0 then streams the parts into ``path``
    (``cmkit.imageio.write_npz_streamed``) and removes them. Image i is drawn with seed ``seed + i`` (and its
    label from the same seed when random), so the file is the same for any number of processes and batch size.
    Parts left by an interrupted run of the same model and settings are kept and not drawn again. Returns the
    samples' description; its images are only the first ``grid`` (on rank 0, for a preview)."""
    sampler, sigma_list, steps = resolve_sampler(cfg, sampler, steps, sigmas)
    labels = class_labels(classes, cfg.model.num_classes, n)
    check_guidance(model, cfg, guidance)
    prompts = check_prompts(model, prompts)
    rank, world = (torch_dist.get_rank(), torch_dist.get_world_size()) if torch_dist.is_initialized() else (0, 1)
    path = Path(path)
    parts_dir = path.with_name(path.name + ".parts")
    settings = {
        "model": hashlib.sha1(cfg.to_json().encode()).hexdigest(),
        "weights": float(sum(p.detach().double().abs().sum() for p in model.parameters())),
        **dict(n=n, seed=seed, sampler=sampler, sigmas=list(sigma_list), steps=steps, batch=batch_size),
        **dict(classes=classes, bf16=bf16, guidance=guidance, decoder=None if decoder is None else repr(decoder)),
        **({"prompts": prompts} if prompts else {}),
    }
    if rank == 0:
        _prepare_parts(parts_dir, settings)
    barrier()
    starts = list(range(0, n, batch_size))
    mine = starts[rank::world]
    bar = tqdm(total=n, disable=not (progress and rank == 0), unit="img", desc=f"{sampler} → {path.name}")
    for start in mine:
        b = min(batch_size, n - start)
        part = parts_dir / f"part-{start:010d}.npz"
        if not part.is_file():
            y = labels[start : start + b] if labels is not None else None
            s0, p = seed + start, None
            if prompts:  # this part's prompts, continuing the cycle at image `start`
                p = [prompts[(start + i) % len(prompts)] for i in range(min(b, len(prompts)))]
            x, y = generate(
                model, cfg, b, sampler, sigma_list, steps, s0, b, device, False, y, bf16, guidance, decoder, p
            )
            save_npz(x, part.with_name(part.name + ".tmp"), y)
            os.replace(part.with_name(part.name + ".tmp"), part)
        bar.update(b * world)
    bar.close()
    barrier()
    preview = None
    if rank == 0:
        parts = [parts_dir / f"part-{start:010d}.npz" for start in starts]
        if grid:
            preview = torch.cat([from_uint8(np.load(f)["arr_0"]) for f in parts[: -(-grid // batch_size)]])[:grid]
        write_npz_streamed(path, parts)
        shutil.rmtree(parts_dir, ignore_errors=True)
    barrier()
    return Samples(preview if preview is not None else torch.empty(0), None, sampler, sigma_list, steps)


def _prepare_parts(parts_dir: Path, settings: dict[str, Any]) -> None:
    """The parts directory of a streamed sampling: kept when an interrupted run left it with the same settings."""
    manifest = parts_dir / "settings.json"
    if parts_dir.is_dir():
        try:
            same = json.loads(manifest.read_text()) == settings
        except (OSError, ValueError):
            same = False
        if not same:
            shutil.rmtree(parts_dir)
    parts_dir.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps(settings))


@torch.no_grad()
def generate(
    model: nn.Module,
    cfg: Config,
    n: int,
    sampler: str,
    sigmas: Sequence[float],
    steps: int,
    seed: int = 0,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: bool = True,
    labels: Tensor | None = None,
    bf16: bool = False,
    guidance: float | None = None,
    decoder: RawDecoder | None = None,
    prompts: Sequence[str] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """n samples in [-1, 1] (n, C, H, W); sample i uses seed ``seed + i`` whatever the batch size. ``guidance``:
    an LCM model's guidance-scale input w (None: the model's ``sample.guidance``), or the scale of classifier-free
    guidance of a label-dropout diffusion model (None: unguided; ``check_guidance``). ``prompts``: sample i gets
    ``prompts[i % len(prompts)]``, embedded batch by batch by the model's prompt encoder (``cmkit.prompts``). A
    latent model's samples are decoded to images (``cmkit.latent``) by its autoencoder, or by ``decoder`` (e.g. a
    consistency decoder); its sampler does not clamp the latents to [−1, 1] as it does pixels.

    ``bf16`` runs the network under bfloat16 autocast (about 2× faster on CPUs with bf16 units); the
    preconditioning, the sampler's state and its noise stay fp32 (``precond.py``)."""
    c = cfg.model
    check_guidance(model, cfg, guidance)
    prompts = check_prompts(model, prompts)
    encoder = getattr(model, "prompt_encoder", None)
    space = LatentSpace.load(cfg, device)
    if decoder is not None and space is None:
        raise CmkitError("a latent decoder decodes a latent model's samples; this model works on pixels")
    out, out_labels = [], []
    w_cfg = cfg_guidance(model, cfg, guidance)
    evals = nfe(sampler, steps) * (1 if w_cfg is None else 2)
    # the bar advances at every network evaluation (a 35-NFE Heun batch is 35 ticks, not one), shown in images
    bar = tqdm(
        total=n * evals,
        desc=f"{sampler} ({evals} NFE)",
        disable=not progress,
        unit="img",
        unit_scale=1 / evals,
        bar_format="{l_bar}{bar}| {n:.1f}/{total:.0f} img [{elapsed}<{remaining}]",
    )
    model = _Counted(model, bar)
    if w_cfg is not None:  # a diffusion model under classifier-free guidance (null label, or the empty prompt)
        model = Guided(model, w_cfg, encoder([""]) if prompts else None)
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        gens = per_sample_generators(range(seed + start, seed + start + b))
        cond = {}
        if c.num_classes:
            y = (
                labels[start : start + b].to(device)
                if labels is not None
                else random_labels(b, c.num_classes, gens, device)
            )
            cond["class_labels"] = y
            out_labels.append(y.cpu())
        if prompts:
            batch_prompts = [prompts[(start + i) % len(prompts)] for i in range(b)]
            cond["encoder_hidden_states"] = encoder.embed(batch_prompts, b).to(device)
        if getattr(model, "takes_guidance", False):  # an LCM model: its guidance-scale input w
            cond["guidance"] = torch.full((b,), cfg.sample.guidance if guidance is None else guidance, device=device)
        shape = (b, c.in_channels, c.img_resolution, c.img_resolution)
        kw = dict(generator=gens, device=device, clip=space is None, **cond)  # latents are not clamped to [-1, 1]
        with torch.autocast(torch.device(device).type, torch.bfloat16, enabled=bf16):
            x = _sample(model, cfg, shape, sampler, sigmas, steps, kw)
        if space is not None:
            x = space.decode(x, decoder, seed + start)
        out.append(x.cpu())
    bar.close()
    return torch.cat(out), (torch.cat(out_labels) if out_labels else None)


class _Counted(nn.Module):
    """The model, advancing a progress bar by the batch size at every evaluation."""

    def __init__(self, model: nn.Module, bar: tqdm):
        super().__init__()
        self.model, self.bar = model, bar

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        y = self.model(x, *args, **kwargs)
        self.bar.update(x.shape[0])
        return y

    def flow_map(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:  # the flowmap sampler's one evaluation
        y = self.model.flow_map(x, *args, **kwargs)
        self.bar.update(x.shape[0])
        return y

    def __getattr__(self, name: str) -> Any:  # samplers read the model's own attributes (kind, sigma_data, ...)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.model, name)


def _sample(
    model: nn.Module, cfg: Config, shape: tuple[int, ...], sampler: str, sigmas: Sequence[float], steps: int, kw: dict
) -> Tensor:
    c = cfg.model
    if sampler in ("onestep", "multistep"):
        return sample_multistep(model, shape, sigmas, sigma_min=c.sigma_min, sigma_max=c.sigma_max, **kw)
    if sampler == "flowmap":
        return sample_flowmap(model, shape, sigmas, sigma_min=c.sigma_min, sigma_max=c.sigma_max, **kw)
    if sampler == "progdist":
        return sample_progdist(model, shape, steps, sigma_min=c.sigma_min, sigma_max=c.sigma_max, **kw)
    fn = sample_heun if sampler == "heun" else sample_euler
    return fn(model, shape, edm_sigmas(steps, c.sigma_min, c.sigma_max), **kw)
