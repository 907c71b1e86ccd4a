"""Any denoiser, teacher or ``init_from`` source, in one place: a cmkit model or run directory, a shipped model
name, a diffusers directory (teachers only), an EDM-style pickle or a Flax checkpoint (the format is told by
content: ``cmkit.formats.detect``).

``load_model`` reads a cmkit model directory (model in eval mode, ``Config``); ``load_denoiser`` any of the formats
(``train.teacher``); ``init_from`` loads one into a model being trained (``train.init_from``), dropping EDM's unused
augmentation input when the student has none and refitting the noise embedding when the two embed σ differently.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from .config import set_value
from .denoiser_config import Config
from .discrete_vp import DiscreteVPDenoiser, LCMDenoiser
from .errors import CmkitError
from .files import load_safetensors, load_state, read_safetensors
from .formats.detect import checkpoint_format, read_released_net
from .formats.diffusers_dir import is_diffusers_vae, lcm_timesteps, pipeline_root, read_diffusers_dir
from .formats.model_dir import CONFIG_FILE, MODEL_FILE, read_model_dir
from .latent import vae_standardisation
from .prompts import PromptEncoder
from .retime import fit_time_embedding, needs_refit

#: the guidance scale w diffusers' LCM pipeline samples with by default
LCM_GUIDANCE = 8.5
#: the classifier-free guidance scale diffusers' Stable Diffusion pipeline samples with by default
SD_GUIDANCE = 7.5


def config_for(model: dict[str, Any]) -> Any:
    """A cmkit ``Config`` holding a released network's ``model`` section (EDM-type runs sample with Heun)."""
    cfg = Config()
    for key, value in model.items():
        set_value(cfg, f"model.{key}", value)
    cfg.loss.method = "edm" if model["precond"] in ("edm", "vp", "ve") else "cd"
    cfg.sample.sampler = "heun" if cfg.loss.method == "edm" else "onestep"
    cfg.model.check()
    return cfg


def config_for_diffusers(unet_config: dict[str, Any], denoiser: Any, lcm_steps: list[int] | None = None) -> Any:
    """A ``Config`` describing a diffusers model read as a ``DiscreteVPDenoiser``: image shape, classes, σ range
    (the schedule's table ends), a VP diffusion model sampled with Heun. It describes, it does not build: the
    network is the diffusers UNet (``cfg.model.build()`` would give a cmkit network, not that one)."""
    cfg = Config()
    size = unet_config.get("sample_size") or 0
    cfg.model.img_resolution = int(size[0] if isinstance(size, (list, tuple)) else size)
    cfg.model.in_channels = int(unet_config.get("in_channels", 3))
    cfg.model.num_classes = int(unet_config.get("num_class_embeds") or 0)
    cfg.model.precond = "vp"
    cfg.model.sigma_min, cfg.model.sigma_max = denoiser.sigma_min, denoiser.sigma_max
    cfg.loss.method, cfg.sample.sampler = "edm", "heun"
    if isinstance(denoiser, LCMDenoiser):  # a consistency model: LCM's 4-step timesteps and its default w
        cfg.model.precond, cfg.loss.method, cfg.sample.sampler = "cm", "lcm", "multistep"
        cfg.model.time_inputs = 2 if denoiser.takes_guidance else 1
        cfg.sample.sigmas = tuple(float(s) for s in denoiser.t_to_sigma(torch.tensor(lcm_steps)))
        cfg.sample.guidance = LCM_GUIDANCE if denoiser.takes_guidance else 1.0
    return cfg


def _pipeline_latents(cfg: Any, root: Path) -> None:
    """Describe a pipeline's ``vae/`` as the model's latent space (``cmkit.latent``), so samples decode to images."""
    vae = root / "vae"
    if not is_diffusers_vae(vae):
        return
    vae_config = SimpleNamespace(**json.loads((vae / "config.json").read_text()))
    channels, factor = cfg.model.in_channels, 2 ** (len(vae_config.block_out_channels) - 1)
    cfg.latent.autoencoder = str(vae.resolve())  # a student records it: found again from any directory
    cfg.latent.image_size = cfg.model.img_resolution * factor
    cfg.latent.mean, cfg.latent.std = vae_standardisation(vae_config, channels, cfg.model.sigma_data)


def load_denoiser(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Any]:
    """(model in eval mode, Config) from a model/run directory, a diffusers directory (any VP model, as
    ``cmkit.discrete_vp.DiscreteVPDenoiser``), an EDM pickle or a Flax checkpoint."""
    fmt = checkpoint_format(path)
    if fmt == "model-dir":
        return load_model(path, device=device)
    if fmt == "diffusers":
        found = read_diffusers_dir(path)
        steps = None
        try:
            if found.is_lcm:
                scaling = found.scheduler_config.get("timestep_scaling", 10.0)
                guidance_dim = int(found.config.get("time_cond_proj_dim") or 0)
                denoiser = LCMDenoiser(found.unet, found.alphas_cumprod, found.prediction_type, scaling, guidance_dim)
                steps = lcm_timesteps(found.scheduler_config, 4)
            else:
                denoiser = DiscreteVPDenoiser(found.unet, found.alphas_cumprod, found.prediction_type)
        except CmkitError as e:
            raise CmkitError(f"{found.scheduler_file}: {e}") from None
        cfg = config_for_diffusers(found.config, denoiser, steps)
        root = pipeline_root(found.unet_dir)
        if root is not None:  # a text-to-image pipeline: its prompts and its VAE's latent space
            denoiser.prompt_encoder = PromptEncoder.load(root)
            _pipeline_latents(cfg, root)
            if denoiser.prompt_encoder is not None and cfg.is_diffusion():
                cfg.sample.guidance = SD_GUIDANCE  # classifier-free guidance with the empty prompt, as diffusers
        return denoiser.to(device).eval().requires_grad_(False), cfg

    model_section, state, _ = read_released_net(path)
    cfg = config_for(model_section)
    model = cfg.model.build()
    load_state(model.net, state, str(path), f"the {model_section['arch']} network its init kwargs describe")
    return model.to(device).eval().requires_grad_(False), cfg


def init_from(model: nn.Module, path: str | Path, model_cfg: Any) -> None:
    """Load the weights of ``path`` (any format ``load_denoiser`` reads) into ``model``'s backbone. From an EDM
    pickle or Flax file the network must be the run's (``model.arch`` and shape); EDM's augmentation input
    (``map_augment``), never used without augmentation labels, is dropped when the run's network has none."""
    fmt = checkpoint_format(path)
    if fmt == "diffusers":
        if not isinstance(model, LCMDenoiser):
            raise CmkitError(
                f"train.init_from={path} is a diffusers model: its UNet is not a cmkit network (a diffusers student "
                "is model.arch=diffusers); give it as train.teacher"
            )
        _init_diffusers_unet(model, path)
        return
    if fmt == "model-dir":
        d = read_model_dir(path, "denoiser")
        sd = read_safetensors(d.weights)
        # parts a diffusion model has not, which start fresh: sCM's learned weighting w_φ (``logvar``) and an LCM
        # student's guidance-scale input or an AYF flow map's target time (the backbone's second scalar input,
        # ``emb_mlp2``; zero-initialised last layer in the UNet, so the student starts as the teacher)
        fresh_prefixes = ("logvar.",) + (("net.emb_mlp2.",) if getattr(model, "has_extra_input", False) else ())
        for prefix in fresh_prefixes:
            fresh = {k: v for k, v in model.state_dict().items() if k.startswith(prefix)}
            if fresh and not any(k.startswith(prefix) for k in sd):
                sd = {**sd, **fresh}
        load_state(model, sd, str(d.weights), "the model in config.json")
        _refit_time_input(model, d.config, sd, path, model_cfg)
        return
    section, state, _ = read_released_net(path)
    keys = (
        "arch",
        "img_resolution",
        "in_channels",
        "model_channels",
        "channel_mult",
        "num_blocks",
        "attn_resolutions",
        "num_classes",
    )
    differ = [
        f"model.{k}={section[k]!r} (the run has {getattr(model_cfg, k)!r})"
        for k in keys
        if (tuple(section[k]) if isinstance(section[k], (list, tuple)) else section[k])
        != (tuple(getattr(model_cfg, k)) if isinstance(getattr(model_cfg, k), (list, tuple)) else getattr(model_cfg, k))
    ]
    if differ:
        raise CmkitError(f"train.init_from={path} holds another network: {'; '.join(differ[:3])}")
    if not model_cfg.augment_dim:
        state = {k: v for k, v in state.items() if not k.startswith("map_augment.")}
    load_state(model.net, state, str(path), f"the run's {model_cfg.arch} network")


def _init_diffusers_unet(model: LCMDenoiser, path: str | Path) -> None:
    """Load the UNet weights of the diffusers directory ``path`` into an ``lcm_student``. LCM's guidance input
    (``time_embedding.cond_proj``, absent from the teacher) starts at zero, so the student starts as the teacher
    (diffusers' LCM scripts leave it at its random initialisation)."""
    source = read_diffusers_dir(path).unet.state_dict()
    own = model.unet.state_dict()
    fresh = {k: torch.zeros_like(v) for k, v in own.items() if k.startswith("time_embedding.cond_proj.")}
    load_state(model.unet, {**fresh, **source}, str(path), "the UNet of model.diffusers")


#: The model fields that decide how a network embeds σ (the noise input and its features).
TIME_FIELDS = ("precond", "time_input", "embedding", "positional_scale", "fourier_scale")


def _refit_time_input(
    model: nn.Module, source_config: dict[str, Any], sd: dict[str, Tensor], path: str | Path, model_cfg: Any
) -> None:
    """When the run embeds the noise level differently from the source model (e.g. sCM's c_noise(t) = t from an
    EDM teacher's ln(σ)/4), fit the run's embedding MLP to the source's (``cmkit.retime``), with one line on
    stderr."""
    import sys

    src_cfg = Config.from_dict(source_config).model
    if all(getattr(src_cfg, k) == getattr(model_cfg, k) for k in TIME_FIELDS):
        return  # the same noise input (TCM from ECT, sCD/sCT from a TrigFlow teacher): nothing to build
    src = src_cfg.build()
    src.load_state_dict({k: v for k, v in sd.items() if k in src.state_dict()}, strict=False)
    src.to(next(model.parameters()).device).eval().requires_grad_(False)
    lo, hi = model_cfg.sigma_min, model_cfg.sigma_max
    if not needs_refit(src, model, lo, hi):
        return
    err = fit_time_embedding(src, model, sigma_min=lo, sigma_max=hi)
    print(
        f"train.init_from={path}: the run's time input differs from the source's; fitted its noise-embedding "
        "MLP to the source's (cmkit.retime), relative error "
        + ", ".join(f"{e:.2f} at σ={s:g}" for s, e in err.items()),
        file=sys.stderr,
    )


def load_model(
    path: str | Path, weights: str = MODEL_FILE, device: str | torch.device = "cpu"
) -> tuple[nn.Module, Any]:
    """A diffusion or consistency model from a model/run directory or shipped name: (model in eval mode, Config)."""
    d = read_model_dir(path, "denoiser")
    cfg = Config.from_dict(d.config)
    lo, hi = cfg.model.sigma_min, cfg.model.sigma_max
    if not (0 < lo < hi < float("inf")):
        raise CmkitError(
            f"{d.path / CONFIG_FILE}: model.sigma_min={lo} and sigma_max={hi}; expected "
            "0 < sigma_min < sigma_max (a damaged or hand-edited config)"
        )
    model = cfg.model.build()
    load_safetensors(model, d.path / weights)
    root = pipeline_root(cfg.model.diffusers) if cfg.model.arch == "diffusers" else None
    if root is not None:  # an LCM distilled from a text-to-image pipeline: the pipeline's prompts
        model.prompt_encoder = PromptEncoder.load(root)
    return model.to(device).eval().requires_grad_(False), cfg
