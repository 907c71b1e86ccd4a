"""Training diffusion teachers (EDM, progressive distillation) and consistency models (CD, CT, iCT, ECT, sCT, sCD,
MeanFlow, TCM, LCM): the ``DenoiserTask`` of the loop.

The loop (``cmkit.training.loop``) does everything every run shares; this task holds what is particular to a
denoiser ``model(x, sigma, class_labels=None) -> x0``: the method's loss on a deterministic batch, the
teacher (CD), the target network θ⁻ where the method has one (CT; CD with μ > 0), and 1-/2-step (CM) or
Heun (EDM) sample grids with fixed per-sample seeds. A text-to-image teacher (a Stable Diffusion pipeline directory)
trains on captioned images (``data.name=captions``): each batch's captions go through the pipeline's text encoder,
and the empty prompt is the unconditional branch of the guided teacher (LCM, LCM-LoRA).
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import noise
from ..datasets import Batches, ImageData, load_dataset
from ..denoiser_config import Config
from ..ema import ema_update, make_copy
from ..errors import CmkitError
from ..formats.diffusers_dir import is_diffusers_vae
from ..formats.model_dir import LORA_FILE
from ..generate import multistep_sigmas
from ..guidance import AutoGuided
from ..imageio import save_grid
from ..latent import (
    LatentSpace,
    adopt_teacher_space,
    autoencoder_config,
    check_image_channels,
    check_latent_shape,
    load_images,
    sample_statistics,
    vae_standardisation,
)
from ..load import init_from, load_denoiser
from ..nets.autoencoder import KLAutoencoder
from ..nets.lora import LCM_LORA_TARGETS, add_lora, lora_state_dict, merge_lora
from ..sampling import edm_sigmas, per_sample_generators, sample_heun, sample_multistep, sample_progdist
from ..shards import ShardSet
from .task import Context


class DenoiserTask:
    """The loop's task for a ``Config`` run (any method of ``cmkit.losses.LOSSES``)."""

    @staticmethod
    def build_model(cfg: Config) -> nn.Module:
        return cfg.model.build()

    @staticmethod
    def build_loss(cfg: Config) -> Any:
        return cfg.loss.build(cfg.model, cfg.train.steps)

    def __init__(self, cfg: Config, ctx: Context):
        self.cfg, self.ctx, self.name = cfg, ctx, cfg.loss.method
        t = cfg.train
        self.model = self.build_model(cfg).to(ctx.device)
        self.objective = self.build_loss(cfg)
        if hasattr(getattr(self.objective, "distance", None), "load"):
            self.objective.distance.load()  # LPIPS weights: a missing file fails here, before any data is read
        if t.init_from:  # a model/run directory, an EDM pickle or a Flax checkpoint (cmkit.load)
            init_from(self.model, t.init_from, cfg.model)
        if t.lora_rank:  # LCM-LoRA: only low-rank adapters on the init_from weights train
            if t.parallel == "fsdp" and ctx.world > 1:
                raise CmkitError("train.lora_rank trains small adapters: use train.parallel=ddp, not fsdp")
            add_lora(self._backbone(), t.lora_rank, t.lora_alpha or None, self._lora_targets())
        self.teacher = self._load_teacher() if self.objective.needs_teacher else None  # also adopts its latent space
        self.prompts = self._prompt_encoder()  # a text teacher's (None otherwise)
        self.latent: LatentSpace | None = None
        if cfg.latent.autoencoder:  # latent diffusion / LCM: batches are encoded by the frozen autoencoder
            data = self._latent_data()
        else:
            data = load_dataset(
                cfg.data.name, cfg.data.root, cfg.data.split, cfg.model.img_resolution, cfg.model.in_channels
            )
        if cfg.model.num_classes and data.labels is None:
            raise CmkitError(f"model.num_classes={cfg.model.num_classes} but data set {cfg.data.name!r} has no labels")
        if self.prompts is not None and data.captions is None:
            raise CmkitError(
                f"teacher {t.teacher} is text-conditioned: train on captioned images (data.name=captions "
                f"data.root=FOLDER), not data set {cfg.data.name!r}"
            )
        self.batches = Batches(
            data, t.batch_size, t.seed, cfg.data.flip, ctx.rank, ctx.world, cfg.data.workers, t.accum
        )
        self.target = make_copy(self.model) if self.objective.target_mu(0) is not None else None
        self.fake, self.fake_net = self._fake_score()

    def _fake_score(self) -> tuple[nn.Module | None, nn.Module | None]:
        """rCM's fake-score critic (``loss.score_reg``): a trainable copy of the teacher, and the module the loss
        calls (DDP-wrapped when distributed, so that its gradients are averaged)."""
        if getattr(self.objective, "regulariser", None) is None:
            return None, None
        if self.cfg.train.parallel == "fsdp" and self.ctx.world > 1:
            raise CmkitError("loss.score_reg trains a second network (the fake score): use train.parallel=ddp")
        base = getattr(self.teacher, "denoiser", self.teacher)  # the network under an autoguidance wrapper
        if not any(True for _ in base.parameters()):
            raise CmkitError(
                f"loss.score_reg copies the teacher as the fake score; {self.cfg.train.teacher} has no weights"
            )
        fake = copy.deepcopy(base).requires_grad_(True).train()
        wrapped = nn.parallel.DistributedDataParallel(fake) if self.ctx.world > 1 else fake
        return fake, wrapped

    def param_groups(self) -> list[dict[str, Any]]:
        """Parameter groups the loop's optimizer holds besides the model's: rCM's critic, at its lr scale."""
        if self.fake is None:
            return []
        return [{"params": list(self.fake.parameters()), "lr_scale": self.objective.critic_lr_scale}]

    def trains_model(self, step: int) -> bool:
        """Whether ``step`` updates the model (and its EMAs): not on rCM's critic steps."""
        return getattr(self.objective, "trains_model", lambda _: True)(step)

    def _backbone(self) -> nn.Module:
        """The network the LoRA adapters go on: the diffusers UNet of ``model.arch=diffusers``, else the model."""
        return self.model.unet if self.cfg.model.arch == "diffusers" else self.model

    def _lora_targets(self) -> tuple[str, ...] | None:
        """LCM-LoRA's layers in a diffusers UNet; every linear and convolution of a cmkit network."""
        return LCM_LORA_TARGETS if self.cfg.model.arch == "diffusers" else None

    def _prompt_encoder(self) -> nn.Module | None:
        """A text-to-image teacher's prompt encoder (``cmkit.prompts``), with the empty prompt's embedding as
        ``null_text``; None for any other teacher."""
        if not getattr(self.teacher, "text_conditioned", False):
            return None
        encoder, path = getattr(self.teacher, "prompt_encoder", None), self.cfg.train.teacher
        if encoder is None:
            raise CmkitError(
                f"teacher {path} is a text-conditioned UNet without a tokenizer/ and text_encoder/ beside it: give "
                "the pipeline directory (with model_index.json) as train.teacher"
            )
        if self.cfg.loss.method != "lcm":
            raise CmkitError(f"a text-to-image teacher is distilled with loss.method=lcm (got {self.cfg.loss.method})")
        encoder = encoder.to(self.ctx.device)
        with torch.no_grad():
            self.null_text = encoder([""])
        return encoder

    def _text(self, index: Tensor) -> dict[str, Tensor]:
        """The text conditioning of the images at ``index`` of a captioned data set: their captions' embeddings
        (``encoder_hidden_states``) and the empty prompt's (``null_text``, the teacher's unconditional branch)."""
        captions = self.batches.data.captions
        with torch.no_grad():
            emb = self.prompts([captions[i] for i in index.tolist()])
        return {"encoder_hidden_states": emb, "null_text": self.null_text}

    def _latent_data(self) -> ImageData | ShardSet:
        """The images padded to the autoencoder's side; the latent standardisation measured on them (unless the
        config gives it) and written into the config, with the side samples are cropped back to. A pipeline's
        ``vae/`` has its standardisation in its config (``cmkit.latent.vae_standardisation``)."""
        cfg, lat = self.cfg, self.cfg.latent
        if is_diffusers_vae(lat.autoencoder):
            data = load_images(cfg.data.name, cfg.data.root, cfg.data.split, lat.image_size)
            self.latent = LatentSpace.load(cfg, self.ctx.device)
            if not lat.mean:
                vae_config = self.latent.ae.config
                lat.mean, lat.std = vae_standardisation(vae_config, vae_config.latent_channels, cfg.model.sigma_data)
                self.latent = LatentSpace.from_autoencoder(cfg, self.latent.ae)  # the VAE already loaded
            return data
        check_latent_shape(cfg, autoencoder_config(lat.autoencoder))
        data = load_images(cfg.data.name, cfg.data.root, cfg.data.split, lat.image_size)
        ae = KLAutoencoder.from_pretrained(lat.autoencoder, device=self.ctx.device)
        check_image_channels(data, ae, cfg.data.name, lat.autoencoder)
        if not lat.mean:
            lat.mean, lat.std = sample_statistics(ae, data, lat.stats_images, cfg.train.seed, self.ctx.device)
        if not lat.crop and cfg.data.name in ("fashion_mnist", "mnist", "digits", "npz"):  # padded, not resized
            native = load_dataset(cfg.data.name, cfg.data.root, cfg.data.split)
            lat.crop = native.shape[1] if native.shape[1] < lat.image_size else 0
        self.latent = LatentSpace.from_autoencoder(cfg, ae)
        return data

    def _load_teacher(self) -> nn.Module:
        """The EDM teacher (CD, PD, sCD), or TCM's frozen first-stage consistency model (``teacher_precond``); a
        latent run takes its teacher's latent standardisation (``cmkit.latent.adopt_teacher_space``)."""
        teacher, tcfg = load_denoiser(self.cfg.train.teacher, device=self.ctx.device)
        adopt_teacher_space(self.cfg, tcfg, self.cfg.train.teacher)
        want = getattr(self.objective, "teacher_precond", "edm")
        if not (tcfg.is_diffusion() if want == "edm" else tcfg.model.precond == want):
            what = "a diffusion model" if want == "edm" else f"a consistency model (precond {want})"
            raise CmkitError(f"teacher {self.cfg.train.teacher} is not {what}; loss.method={self.name} needs one")
        lcm = hasattr(self.objective, "draw_guidance")  # LCM guides the teacher at every step
        text = getattr(teacher, "text_conditioned", False)  # guided by the empty prompt (``_prompt_encoder``)
        if (lcm or getattr(self.objective, "guidance", 1.0) != 1.0) and not text:
            what = "loss.method=lcm" if lcm else "loss.guidance"
            if not tcfg.model.num_classes:
                raise CmkitError(f"{what} needs a class-conditional teacher; {self.cfg.train.teacher} is unconditional")
            if hasattr(teacher, "grid_sigmas"):  # a diffusers UNet: its class embedding has no null class
                raise CmkitError(
                    f"{what} guides a class-conditional diffusers teacher, which has no unconditional branch (no null "
                    f"class in its class embedding): {self.cfg.train.teacher} cannot be guided; distil it unguided"
                )
            if not tcfg.loss.label_dropout:
                print(
                    f"warning: teacher {self.cfg.train.teacher} records no loss.label_dropout: its unconditional "
                    "branch (the null label) may be untrained, and guidance meaningless",
                    file=sys.stderr,
                )
        if getattr(self.objective, "grid", "karras") == "teacher":
            self._check_teacher_grid(teacher)
        elif want == "edm" and tcfg.model.sigma_max < self.cfg.model.sigma_max:
            print(
                f"warning: teacher {self.cfg.train.teacher} was trained up to σ = {tcfg.model.sigma_max:.4g} (its "
                f"schedule's end); above it, up to model.sigma_max={self.cfg.model.sigma_max:g}, it is extrapolated",
                file=sys.stderr,
            )
        if self.cfg.train.autoguide:
            teacher = AutoGuided(teacher, self._load_weak_teacher(tcfg), self.cfg.train.autoguide_w)
        return teacher.requires_grad_(False)

    def _load_weak_teacher(self, tcfg: Config) -> nn.Module:
        """Autoguidance's weaker model (``train.autoguide``): a diffusion model of the teacher's data, shape, classes
        and latent space (Karras et al. 2024 use a smaller model trained for less long)."""
        path = self.cfg.train.autoguide
        weak, wcfg = load_denoiser(path, device=self.ctx.device)
        if not wcfg.is_diffusion():
            raise CmkitError(f"train.autoguide={path} is not a diffusion model: autoguidance needs a weaker teacher")
        keys = ("img_resolution", "in_channels", "num_classes")
        pairs = [(k, getattr(wcfg.model, k), getattr(tcfg.model, k)) for k in keys]
        differ = [f"model.{k} {w} ≠ {t}" for k, w, t in pairs if w != t]
        if wcfg.latent.autoencoder != tcfg.latent.autoencoder:
            differ.append(f"latent.autoencoder {wcfg.latent.autoencoder or 'none'!r} ≠ {tcfg.latent.autoencoder!r}")
        if differ:
            raise CmkitError(
                f"train.autoguide={path} does not model the teacher's data ({'; '.join(differ)}): give a weaker "
                f"model of the same images as {self.cfg.train.teacher}"
            )
        return weak.requires_grad_(False)

    def _check_teacher_grid(self, teacher: nn.Module) -> None:
        """``loss.grid=teacher`` trains on a discrete teacher's timesteps: the student's σ range must be theirs, so
        that its boundary f(x, σ_min) = x sits at the teacher's t = 0."""
        path, m = self.cfg.train.teacher, self.cfg.model
        if not hasattr(teacher, "grid_sigmas"):
            raise CmkitError(
                f"loss.grid=teacher needs a discrete-time teacher (a diffusers or DDPM directory); {path} is a "
                "σ-space model: use loss.grid=karras"
            )
        lo, hi = teacher.sigma_min, teacher.sigma_max
        if not (math.isclose(m.sigma_min, lo, rel_tol=1e-3) and math.isclose(m.sigma_max, hi, rel_tol=1e-3)):
            raise CmkitError(
                f"loss.grid=teacher: the student's σ range must be the teacher's timesteps' (t = 0 … T−1): set "
                f"model.sigma_min={lo:.6g} model.sigma_max={hi:.6g} (got {m.sigma_min:g}, {m.sigma_max:g})"
            )

    def loss(
        self, net: nn.Module, step: int, generator: torch.Generator, micro: int = 0
    ) -> tuple[Tensor, dict[str, float]]:
        """The method's loss on (microbatch ``micro`` of) batch ``step``; noise and σ come from the global RNG
        (saved per process) or, with ``train.noise=per_sample``, from per-sample generators (``cmkit.noise``)."""
        t = self.cfg.train
        x0, labels = self.batches.get(step, self.ctx.device, micro)
        if self.latent is not None:
            x0 = self.latent.encode(x0)
        cond = {"class_labels": labels} if self.cfg.model.num_classes else {}
        if self.prompts is not None:  # captioned images: labels are the image indices
            cond = self._text(labels)
        target = self.target if self.target is not None else self.model  # stopgrad(θ) when there is no θ⁻
        keyed = t.noise == "per_sample"
        with noise.per_sample(t.seed, step, self.batches.positions(micro)) if keyed else contextlib.nullcontext():
            extra = {"fake_score": self.fake_net} if self.fake is not None else {}
            value = self.objective(net, x0, step=step, target=target, teacher=self.teacher, **extra, **cond).mean()
        return value, self.objective.stats(step)

    def after_update(self, step: int) -> None:
        """θ⁻ ← μ(k)θ⁻ + (1-μ(k))θ when the method has a target network; at the end of a progressive-
        distillation stage the student becomes the teacher."""
        mu = self.objective.target_mu(step)
        if self.target is not None and mu is not None:
            ema_update(self.target, self.model, mu)
        if getattr(self.objective, "stage_ends", lambda _: False)(step):
            self.teacher.load_state_dict(self.model.state_dict())

    def extra_modules(self) -> dict[str, nn.Module]:
        """The target network, rCM's fake score, and PD's teacher (it changes during training) for an exact resume."""
        extra = {"target": self.target} if self.target is not None else {}
        if self.fake is not None:
            extra["fake_score"] = self.fake
        return {**extra, "teacher": self.teacher} if hasattr(self.objective, "stage_ends") else extra

    def export_config(self) -> tuple[str, dict[str, Any], dict[str, Any]]:
        return "denoiser", self.cfg.to_dict(), {}

    def export_module(self, model: nn.Module) -> nn.Module:
        """What the model directory holds: a LoRA run's network with its adapters merged (a plain network that
        ``cmkit sample`` loads); the adapters alone go beside it (``export_files``)."""
        return merge_lora(copy.deepcopy(model)) if self.cfg.train.lora_rank else model

    def export_files(self, model: nn.Module) -> dict[str, dict[str, Tensor]]:
        """A LoRA run's adapters as ``lora.safetensors`` in diffusers' key format (``cmkit.nets.lora``)."""
        if not self.cfg.train.lora_rank:
            return {}
        return {LORA_FILE: lora_state_dict(model.unet if self.cfg.model.arch == "diffusers" else model)}

    def _pixels(self, x: Tensor) -> Tensor:
        """A grid's samples as images: latents decoded by the autoencoder."""
        return self.latent.decode(x) if self.latent is not None else x

    def sample(self, model: nn.Module, out: Path, step: int) -> None:
        """1- and 2-step grids (consistency models) or a Heun grid (EDM), with fixed per-sample seeds."""
        c, s, device = self.cfg.model, self.cfg.sample, self.ctx.device
        n = s.grid_size
        shape = (n, c.in_channels, c.img_resolution, c.img_resolution)
        cond = {"class_labels": torch.arange(n, device=device) % c.num_classes} if c.num_classes else {}
        if self.prompts is not None:  # the captions of the first images
            first = torch.arange(n) % len(self.batches.data)
            cond = {"encoder_hidden_states": self._text(first)["encoder_hidden_states"]}
        if getattr(model, "takes_guidance", False):  # an LCM model: its guidance-scale input
            cond["guidance"] = torch.full((n,), s.guidance, device=device)
        gens = per_sample_generators(range(n), device)
        cond["clip"] = self.latent is None  # a sampler option, not the model's: latents are not clamped to [-1, 1]
        if self.cfg.is_diffusion() and s.sampler == "progdist":  # a PD student: its current number of steps
            N = self.objective.num_scales(step) if hasattr(self.objective, "num_scales") else s.steps
            x = sample_progdist(
                model, shape, N, generator=gens, sigma_min=c.sigma_min, sigma_max=c.sigma_max, device=device, **cond
            )
            save_grid(self._pixels(x), out / f"step_{step:06d}_progdist{N}.png")
            return
        if self.cfg.is_diffusion():
            x = sample_heun(
                model, shape, edm_sigmas(s.steps, c.sigma_min, c.sigma_max), generator=gens, device=device, **cond
            )
            save_grid(self._pixels(x), out / f"step_{step:06d}_heun{s.steps}.png")
            return
        grids = [("1step", [c.sigma_max])]
        try:  # the multistep grid on the training σ grid when there is one
            two = multistep_sigmas(self.cfg, max(2, len(s.sigmas)))
            grids.append((f"{len(two)}step", two))
        except CmkitError:  # a grid too coarse for two levels (the first steps of a CT curriculum)
            pass
        for name, sigmas in grids:
            x = sample_multistep(
                model,
                shape,
                sigmas,
                generator=per_sample_generators(range(n), device),
                sigma_min=c.sigma_min,
                sigma_max=c.sigma_max,
                device=device,
                **cond,
            )
            save_grid(self._pixels(x), out / f"step_{step:06d}_{name}.png")


__all__ = ["DenoiserTask"]
