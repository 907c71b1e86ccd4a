"""Every named recipe of every kind of run, in one registry, and ``get_config`` that resolves one.

Denoiser presets (diffusion teachers and consistency models): the CPU presets train on 8×8 digits, 28×28
Fashion-MNIST or 32×32 emoji in minutes to an hour; the paper presets carry the published hyperparameters
(Song et al. 2023 Table 3 / reference ``launch.sh``; iCT; ECT ``run_ecm.sh``) with the published FID in their
description (CIFAR-10 on EDM's NCSN++ / DDPM++ and ImageNet-64 on ADM, the papers' networks; LSUN on ADM; data
must be given as data.root; teachers may be EDM's released pickles, see cmkit.load).
Autoencoder and consistency-decoder presets train the latent space and the decoder of ``cmkit.decoder``.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import apply_overrides, set_value
from ..datasets import CAPTIONS_LAYOUT
from ..errors import CmkitError
from ..files import read_json
from ..formats.cifar10 import CIFAR10_TRAIN
from ..formats.run_dir import RunDir
from ..formats.zoo import shipped_models
from ..lpips import LPIPS_FILE
from .kinds import run_kind


@dataclass(frozen=True)
class Preset:
    """A named recipe: its kind of run (``denoiser``, ``autoencoder``, ``decoder``) and the values it sets."""

    description: str
    values: dict[str, Any] = field(default_factory=dict)
    kind: str = "denoiser"


DIGITS_NET = {
    "model.img_resolution": 8,
    "model.in_channels": 1,
    "model.model_channels": 32,
    "model.channel_mult": (1, 2),
    "model.num_blocks": 1,
    "data.name": "digits",
    "train.batch_size": 64,
    "train.log_every": 10,
    "train.sample_every": 250,
    "train.ckpt_every": 250,
}
#: A low-frequency time embedding for JVP objectives trained from scratch: with the positional embedding of
#: 1000·t the time derivative du/dt is dominated by high frequencies and MeanFlow diverges (measured on digits:
#: ‖u − u_tgt‖² 1.5 → 15 in 150 steps, against 1.4 → 0.6 with Fourier features of scale 1); sCM §12.2 makes
#: the same point about large Fourier scales.
MEANFLOW_TIME = {"model.embedding": "fourier", "model.fourier_scale": 1.0}
#: Align Your Flow (Sabour et al. 2025): a two-time flow map in CTM's form, initialised from an EDM teacher.
AYF = {
    "model.precond": "flowmap",
    "model.time_inputs": 2,
    "loss.method": "ayf",
    "loss.tangent_warmup": 100,
}
#: sCM's stable noise input (§12.2): c_noise(t) = t, embedded positionally without ADM's factor 1000.
SCM_TIME = {"model.precond": "trigflow", "model.time_input": "t", "model.positional_scale": 1.0}
#: sCM's 2-step middle time t_mid = 1.1 (Lu & Song 2025, sCM, 2-step sampling) as σ = σ_d·tan(1.1) with σ_d = 0.5.
SCM_SIGMA_MID = 0.9824
FMNIST_NET = {
    "model.img_resolution": 28,
    "model.in_channels": 1,
    "model.model_channels": 32,
    "model.channel_mult": (1, 2, 2),
    "model.num_blocks": 2,
    "model.attn_resolutions": (7,),
    "data.name": "fashion_mnist",
    "train.batch_size": 64,
    "train.bf16": True,
    "train.log_every": 25,
    "train.sample_every": 1000,
    "train.ckpt_every": 500,
}
FMNIST_LATENT_NET = {  # a UNet on fmnist-ae's latents: Fashion-MNIST padded to 32, 2×8×8, standardised to σ_data
    "model.img_resolution": 8,
    "model.in_channels": 2,
    "model.model_channels": 64,
    "model.channel_mult": (1, 2),
    "model.num_blocks": 2,
    "model.attn_resolutions": (4,),
    "model.num_classes": 10,
    "data.name": "fashion_mnist",
    "latent.autoencoder": "fmnist-ae",  # the shipped autoencoder (`cmkit train --preset fmnist-ae` for your own)
    "latent.image_size": 32,
    "train.batch_size": 128,
    "train.log_every": 25,
    "train.sample_every": 1000,
    "train.ckpt_every": 500,
}
FMNIST_EDM = {  # the recipe of the Fashion-MNIST EDM teachers (fmnist-edm in pixels, fmnist-ldm in latents)
    "model.precond": "edm",
    "model.dropout": 0.1,
    "loss.method": "edm",
    "train.lr": 1e-3,
    "train.optimizer": "adam",
    "train.warmup_steps": 300,
    "train.ema_rates": (0.999,),
    "sample.sampler": "heun",
    "sample.steps": 18,
}
EMOJI_NET = {
    **FMNIST_NET,
    "model.img_resolution": 32,
    "model.in_channels": 3,
    "model.attn_resolutions": (8,),
    "data.name": "emoji",
    "data.flip": True,
    "train.batch_size": 32,
}
CIFAR_NET = {
    "model.arch": "ncsnpp",
    "model.img_resolution": 32,
    "model.in_channels": 3,
    "model.model_channels": 128,
    "model.channel_mult": (2, 2, 2),
    "model.num_blocks": 4,
    "model.attn_resolutions": (16,),
    "model.embedding": "fourier",
    "model.fourier_scale": 16.0,
    "data.name": "npz",
    "data.flip": True,
    "data.root": CIFAR10_TRAIN,
    "train.log_every": 100,
    "train.sample_every": 10_000,
    "train.ckpt_every": 10_000,
}
IMAGENET64_NET = {
    "model.arch": "adm",
    "model.img_resolution": 64,
    "model.in_channels": 3,
    "model.model_channels": 192,
    "model.channel_mult": (1, 2, 3, 4),
    "model.num_blocks": 3,
    "model.attn_resolutions": (32, 16, 8),
    "model.num_classes": 1000,
    "model.head_channels": 64,
    "data.name": "shards",
    "data.root": "data/imagenet64",
    "data.workers": 8,
    "data.flip": True,
    "train.bf16": True,
    "train.noise": "per_sample",
    "train.log_every": 100,
    "train.sample_every": 10_000,
    "train.ckpt_every": 10_000,
    "train.ema_rates": (0.999, 0.9999, 0.9999432189950708),
}

LSUN_NET = {
    "model.arch": "adm",
    "model.img_resolution": 256,
    "model.in_channels": 3,
    "model.model_channels": 256,
    "model.channel_mult": (1, 1, 2, 2, 4, 4),
    "model.num_blocks": 2,
    "model.attn_resolutions": (32, 16, 8),
    "model.head_channels": 64,
    "model.scale_shift": False,
    "data.name": "shards",
    "data.workers": 8,
    "data.flip": True,
    "train.noise": "per_sample",
    "train.bf16": True,
    "train.batch_size": 256,
    "train.log_every": 100,
    "train.sample_every": 10_000,
    "train.ckpt_every": 10_000,
    "train.ema_rates": (0.9999, 0.99994, 0.9999432189950708),
}


def lsun(scene: str, fids: dict[str, str], mids: dict[str, float]) -> dict[str, Preset]:
    """The CM paper's LSUN-256 recipes for one scene (``launch.sh`` of openai/consistency_models; FIDs of
    Song et al. 2023's LSUN table)."""
    teacher = f"runs/lsun-{scene}-edm"
    two = {m: {"sample.sigmas": (80.0, mids[m])} if m in mids else {} for m in ("cd-l2", "cd-lpips", "ct")}
    net = {**LSUN_NET, "data.root": f"data/lsun-{scene}"}
    cd = {
        **net,
        "loss.method": "cd",
        "loss.num_scales": 40,
        "loss.mu": 0.95,
        "loss.solver": "heun",
        "train.steps": 600_000,
        "train.lr": 1e-5,
        "train.teacher": teacher,
        "train.init_from": teacher,
    }
    return {
        f"lsun-{scene}-edm": Preset(
            f"LSUN {scene.title()}-256 EDM teacher (ADM 256ch, dropout 0.1, RAdam 1e-4, batch 256; "
            f"the paper's teacher was trained by an unpublished script); FID {fids['edm']} "
            "at 79 NFE",
            {
                **net,
                "model.precond": "edm",
                "model.dropout": 0.1,
                "loss.method": "edm",
                "loss.P_mean": -1.2,
                "loss.P_std": 1.2,
                "train.steps": 600_000,
                "train.lr": 1e-4,
                "sample.sampler": "heun",
                "sample.steps": 40,
            },
        ),
        f"lsun-{scene}-cd-l2": Preset(
            f"LSUN {scene.title()}-256 CD (l2, Heun, N=40, μ=0.95, RAdam 1e-5, batch 256, 600k)",
            {**cd, "loss.distance": "l2", **two["cd-l2"]},
        ),
        f"lsun-{scene}-cd-lpips": Preset(
            f"LSUN {scene.title()}-256 CD (LPIPS, Heun, N=40, μ=0.95, RAdam 1e-5, batch 256, 600k); FID {fids['cd']}",
            {**cd, "loss.distance": "lpips", **two["cd-lpips"]},
        ),
        f"lsun-{scene}-ct": Preset(
            f"LSUN {scene.title()}-256 CT (LPIPS, s0=2, s1=150, μ0=0.95, RAdam 5e-5, batch 256, "
            f"1M, from the EDM teacher); FID {fids['ct']}",
            {
                **net,
                "loss.method": "ct",
                "loss.s0": 2,
                "loss.s1": 150,
                "loss.mu0": 0.95,
                "loss.distance": "lpips",
                "train.steps": 1_000_000,
                "train.lr": 5e-5,
                "train.init_from": teacher,
                **two["ct"],
            },
        ),
    }


# fmnist-scd's recipe (sCD from the TrigFlow re-tune of the teacher); fmnist-scd-lowlr changes its lr only
FMNIST_SCD = {
    **FMNIST_NET,
    **SCM_TIME,
    "loss.method": "scd",
    "loss.tangent_warmup": 100,
    "train.steps": 1_000,
    "train.lr": 2e-4,
    "train.teacher": "runs/fmnist-trigflow",
    "train.init_from": "runs/fmnist-trigflow",
    "train.ema_rates": (0.995, 0.999),
    "sample.sigmas": (80.0, SCM_SIGMA_MID),
}

PRESETS: dict[str, Preset] = {
    # --- 8×8 digits: minutes on a laptop CPU ---------------------------------------------------------
    "digits-edm": Preset(
        "8×8 digits EDM diffusion teacher (Heun 18 steps = 35 NFE); ~3 min on 2 CPU cores",
        {
            **DIGITS_NET,
            "model.precond": "edm",
            "loss.method": "edm",
            "train.steps": 1500,
            "train.lr": 1e-3,
            "train.optimizer": "adam",
            "train.ema_rates": (0.995,),
            "sample.sampler": "heun",
            "sample.steps": 18,
        },
    ),
    "digits-edm-cond": Preset(
        "8×8 digits class-conditional EDM teacher with 10% label dropout (for --class and "
        "classifier-free guidance on a CPU); ~3 min on 2 CPU cores",
        {
            **DIGITS_NET,
            "model.precond": "edm",
            "model.num_classes": 10,
            "loss.method": "edm",
            "loss.label_dropout": 0.1,
            "train.steps": 1500,
            "train.lr": 1e-3,
            "train.optimizer": "adam",
            "train.ema_rates": (0.995,),
            "sample.sampler": "heun",
            "sample.steps": 18,
        },
    ),
    "digits-scd-cfg": Preset(
        "8×8 digits sCD distilling digits-edm-cond with classifier-free guidance w = 2 into a "
        "class-conditional one-step model",
        {
            **DIGITS_NET,
            "model.precond": "trigflow",
            "model.time_input": "log_sigma",
            "model.num_classes": 10,
            "loss.method": "scd",
            "loss.guidance": 2.0,
            "loss.tangent_warmup": 100,
            "train.steps": 1000,
            "train.lr": 2e-4,
            "train.teacher": "runs/digits-edm-cond",
            "train.init_from": "runs/digits-edm-cond",
            "train.ema_rates": (0.995,),
            "sample.sigmas": (80.0, SCM_SIGMA_MID),
        },
    ),
    "digits-lcm": Preset(
        "8×8 digits latent-consistency-style distillation (LCM) of digits-edm-cond: one class-conditional model "
        "for every guidance scale w in [1, 4] (w is its input)",
        {
            **DIGITS_NET,
            "model.num_classes": 10,
            "model.time_inputs": 2,
            "loss.method": "lcm",
            "loss.num_scales": 18,
            "loss.solver": "heun",
            "loss.mu": 0.95,
            "loss.guidance_min": 1.0,
            "loss.guidance_max": 4.0,
            "train.steps": 1000,
            "train.lr": 2e-4,
            "train.teacher": "runs/digits-edm-cond",
            "train.init_from": "runs/digits-edm-cond",
            "train.ema_rates": (0.995,),
            "sample.sigmas": (80.0, 0.5853),
            "sample.guidance": 2.0,
        },
    ),
    "digits-cd": Preset(
        "8×8 digits consistency distillation from digits-edm (Heun teacher, N=18, μ=0, l2)",
        {
            **DIGITS_NET,
            "loss.method": "cd",
            "loss.num_scales": 18,
            "loss.mu": 0.0,
            "loss.distance": "l2",
            "train.steps": 1000,
            "train.lr": 2e-4,
            "train.teacher": "runs/digits-edm",
            "train.init_from": "runs/digits-edm",
            "train.ema_rates": (0.995,),
            "sample.sigmas": (80.0, 0.5853),
        },
    ),
    "digits-pd": Preset(
        "8×8 digits progressive distillation from digits-edm (Euler, N 8→4→2→1, 250 steps per stage)",
        {
            **DIGITS_NET,
            "model.precond": "edm",
            "loss.method": "pd",
            "loss.num_scales": 8,
            "loss.halve_every": 250,
            "train.steps": 1000,
            "train.lr": 2e-4,
            "train.teacher": "runs/digits-edm",
            "train.init_from": "runs/digits-edm",
            "train.ema_rates": (0.995,),
            "sample.sampler": "progdist",
            "sample.steps": 1,
        },
    ),
    "digits-ct": Preset(
        "8×8 digits original consistency training (adaptive N(k), μ(k); s0=2, s1=150, μ0=0.9)",
        {
            **DIGITS_NET,
            "loss.method": "ct",
            "loss.distance": "l2",
            "train.steps": 1500,
            "train.lr": 4e-4,
            "train.ema_rates": (0.995,),
            "sample.sigmas": (80.0, 0.8),
        },
    ),
    "digits-ict": Preset(
        "8×8 digits improved CT from scratch (pseudo-Huber, lognormal σ, N(k) doubling 10→1280)",
        {
            **DIGITS_NET,
            "loss.method": "ict",
            "train.steps": 1500,
            "train.lr": 4e-4,
            "train.optimizer": "adam",
            "train.ema_rates": (0.995,),
            "sample.sigmas": (80.0, 0.8),
        },
    ),
    "digits-ect": Preset(
        "8×8 digits easy consistency tuning from digits-edm (t→r sigmoid map, q=2)",
        {
            **DIGITS_NET,
            "loss.method": "ect",
            "loss.double_steps": 250,
            "train.steps": 1000,
            "train.lr": 2e-4,
            "train.init_from": "runs/digits-edm",
            "train.ema_rates": (0.995,),
            "sample.sigmas": (80.0, 0.8),
        },
    ),
    "digits-cmt": Preset(
        "8×8 digits consistency mid-training from digits-edm (4-step DPM-Solver++ trajectories)",
        {
            **DIGITS_NET,
            "loss.method": "cmt",
            "loss.nfe": 4,
            "train.steps": 500,
            "train.lr": 2e-4,
            "train.teacher": "runs/digits-edm",
            "train.init_from": "runs/digits-edm",
            "train.ema_rates": (0.995,),
            "sample.sigmas": (80.0, 0.8),
        },
    ),
    "digits-sct": Preset(
        "8×8 digits sCT (TrigFlow continuous-time CT, JVP) tuned from digits-edm",
        {
            **DIGITS_NET,
            "model.precond": "trigflow",
            "model.time_input": "log_sigma",
            "loss.method": "sct",
            "loss.tangent_warmup": 100,
            "train.steps": 1000,
            "train.lr": 2e-4,
            "train.init_from": "runs/digits-edm",
            "train.ema_rates": (0.995,),
            "sample.sigmas": (80.0, SCM_SIGMA_MID),
        },
    ),
    "digits-scd": Preset(
        "8×8 digits sCD (TrigFlow continuous-time CD, JVP) from digits-edm",
        {
            **DIGITS_NET,
            "model.precond": "trigflow",
            "model.time_input": "log_sigma",
            "loss.method": "scd",
            "loss.tangent_warmup": 100,
            "train.steps": 1000,
            "train.lr": 2e-4,
            "train.teacher": "runs/digits-edm",
            "train.init_from": "runs/digits-edm",
            "train.ema_rates": (0.995,),
            "sample.sigmas": (80.0, SCM_SIGMA_MID),
        },
    ),
    "digits-rcm": Preset(
        "8×8 digits rCM: sCD plus DMD's score regulariser (a fake-score critic copied from the teacher)",
        {
            **DIGITS_NET,
            "model.precond": "trigflow",
            "model.time_input": "log_sigma",
            "loss.method": "scd",
            "loss.tangent_warmup": 100,
            "loss.score_reg": 1.0,
            "train.steps": 1000,
            "train.lr": 2e-4,
            "train.teacher": "runs/digits-edm",
            "train.init_from": "runs/digits-edm",
            "train.ema_rates": (0.995,),
            "sample.sigmas": (80.0, SCM_SIGMA_MID),
        },
    ),
    "digits-meanflow": Preset(
        "8×8 digits MeanFlow (two-time flow map, JVP) from scratch",
        {
            **DIGITS_NET,
            "model.precond": "meanflow",
            "model.time_inputs": 2,
            **MEANFLOW_TIME,
            "loss.method": "meanflow",
            "train.steps": 2000,
            "train.lr": 1e-3,
            "train.optimizer": "adam",
            "train.warmup_steps": 100,
            "train.ema_rates": (0.999,),
            "sample.sigmas": (80.0, 1.0),
        },
    ),
    "digits-ayf": Preset(
        "8×8 digits Align Your Flow: a two-time flow map distilled from digits-edm (Eulerian map distillation, JVP)",
        {
            **DIGITS_NET,
            **AYF,
            "train.steps": 1000,
            "train.lr": 2e-4,
            "train.teacher": "runs/digits-edm",
            "train.init_from": "runs/digits-edm",
            "train.ema_rates": (0.995,),
            "sample.sigmas": (80.0, 0.8),
        },
    ),
    "digits-tcm": Preset(
        "8×8 digits truncated CM (stage 2 after digits-ect; t′ = 1, boundary loss)",
        {
            **DIGITS_NET,
            "loss.method": "tcm",
            "loss.double_steps": 250,
            "loss.start_stage": 3,
            "train.steps": 500,
            "train.lr": 1e-4,
            "train.teacher": "runs/digits-ect",
            "train.init_from": "runs/digits-ect",
            "train.ema_rates": (0.995,),
            "sample.sigmas": (80.0, 0.8),
        },
    ),
    # --- 28×28 Fashion-MNIST: the shipped models (about 1 hour each on one core of a 2-core CPU, bf16; ---
    # --- the recipes in cmkit/assets/models/NAME/config.json say exactly how each was trained) --------
    # sample.sigmas: the 2-step σ_mid that benchmarks/quality.py found best for the shipped model (on its
    # training grid where it has one)
    "fmnist-edm": Preset(
        "28×28 Fashion-MNIST EDM teacher (Heun 18 steps = 35 NFE), 1.7M-param UNet",
        {**FMNIST_NET, **FMNIST_EDM, "train.steps": 4_500},
    ),
    "fmnist-cd": Preset(
        "28×28 Fashion-MNIST consistency distillation from fmnist-edm (Heun, N=18, μ=0, pseudo-Huber)",
        {
            **FMNIST_NET,
            "loss.method": "cd",
            "loss.num_scales": 18,
            "loss.mu": 0.0,
            "loss.distance": "pseudo_huber",
            "train.steps": 2_000,
            "train.lr": 2e-4,
            "train.teacher": "runs/fmnist-edm",
            "train.init_from": "runs/fmnist-edm",
            "train.ema_rates": (0.995, 0.999),
            "sample.sigmas": (80.0, 1.9233),
        },
    ),
    "fmnist-pd": Preset(
        "28×28 Fashion-MNIST progressive distillation from fmnist-edm (Euler, N 16→8→4→2→1, 400 "
        "steps per stage; the same budget as fmnist-cd)",
        {
            **FMNIST_NET,
            "model.precond": "edm",
            "loss.method": "pd",
            "loss.num_scales": 16,
            "loss.halve_every": 400,
            "train.steps": 2_000,
            "train.lr": 2e-4,
            "train.teacher": "runs/fmnist-edm",
            "train.init_from": "runs/fmnist-edm",
            "train.ema_rates": (0.995, 0.999),
            "sample.sampler": "progdist",
            "sample.steps": 1,
        },
    ),
    "fmnist-ct": Preset(
        "28×28 Fashion-MNIST original consistency training from scratch (adaptive N(k), μ(k))",
        {
            **FMNIST_NET,
            "loss.method": "ct",
            "loss.distance": "l2",
            "train.steps": 12_000,
            "train.lr": 4e-4,
            "train.ema_rates": (0.999,),
            "sample.sigmas": (80.0, 0.8),
        },
    ),
    "fmnist-ict": Preset(
        "28×28 Fashion-MNIST improved CT from scratch (pseudo-Huber, lognormal, dropout 0.2)",
        {
            **FMNIST_NET,
            "model.dropout": 0.2,
            "loss.method": "ict",
            "train.steps": 3_000,
            "train.lr": 2e-4,
            "train.optimizer": "adam",
            "train.ema_rates": (0.999,),
            "sample.sigmas": (80.0, 5.1199),
        },
    ),
    "fmnist-ect": Preset(
        "28×28 Fashion-MNIST easy consistency tuning from fmnist-edm (dropout 0.1, q=2)",
        {
            **FMNIST_NET,
            "model.dropout": 0.1,
            "loss.method": "ect",
            "loss.double_steps": 400,
            "train.steps": 1_500,
            "train.lr": 2e-4,
            "train.init_from": "runs/fmnist-edm",
            "train.ema_rates": (0.995, 0.999),
            "sample.sigmas": (80.0, 2.0181),
        },
    ),
    # sCM / MeanFlow / TCM at CPU scale (issue 12); the 2-step σ_mid of sCM is its t_mid = 1.1.
    # sCM's stable time input (§12.2): c_noise(t) = t with a positional embedding of scale 1. The EDM teacher
    # embeds 1000·ln(σ)/4: init_from fits the run's embedding MLP to the teacher's (cmkit.retime), and a short
    # EDM-loss tune follows; sCD / sCT start from this TrigFlow teacher. (fmnist-scd on the EDM teacher's own
    # time input diverged: the tangent's RMS grew from 0.03 to 7 in 500 steps and the 1-step FD was 60.)
    "fmnist-trigflow": Preset(
        "28×28 Fashion-MNIST TrigFlow teacher: fmnist-edm with sCM's c_noise(t) = t "
        "(positional scale 1; embedding refitted, then 300 steps of the EDM loss)",
        {
            **FMNIST_NET,
            **SCM_TIME,
            "model.dropout": 0.1,
            "loss.method": "edm",
            "train.steps": 300,
            "train.lr": 1e-4,
            "train.optimizer": "adam",
            "train.warmup_steps": 50,
            "train.init_from": "runs/fmnist-edm",
            "train.ema_rates": (0.999,),
            "sample.sampler": "heun",
            "sample.steps": 18,
        },
    ),
    "fmnist-sct": Preset(
        "28×28 Fashion-MNIST sCT (TrigFlow continuous-time CT, JVP) tuned from fmnist-trigflow",
        {
            **FMNIST_NET,
            **SCM_TIME,
            "model.dropout": 0.1,
            "loss.method": "sct",
            "loss.tangent_warmup": 100,
            "train.steps": 1_000,
            "train.lr": 2e-4,
            "train.init_from": "runs/fmnist-trigflow",
            "train.ema_rates": (0.995, 0.999),
            "sample.sigmas": (80.0, SCM_SIGMA_MID),
        },
    ),
    "fmnist-scd": Preset("28×28 Fashion-MNIST sCD (TrigFlow continuous-time CD, JVP) from fmnist-trigflow", FMNIST_SCD),
    # Issue 21's sCD fix and rCM's ablation: fmnist-scd at sCM's lr of 1e-4 (at 2e-4 its 1-step FD peaked at step 500
    # and degraded by step 1,000), checkpointed every 250 steps for the FD-versus-step curve; fmnist-rcm without the
    # score regulariser.
    "fmnist-scd-lowlr": Preset(
        "28×28 Fashion-MNIST sCD at sCM's lr of 1e-4 (fmnist-rcm without the score regulariser)",
        {**FMNIST_SCD, "train.lr": 1e-4, "train.ckpt_every": 250},
    ),
    # rCM (Zheng et al. 2026): fmnist-scd's recipe at sCM's lower lr, plus DMD's score regulariser from step 100
    # (the tangent warm-up) with rCM's 4 critic steps per student step; the critic at the student's lr (DMD2's
    # choice; rCM's 0.2× is for 100k steps, and here the critic has ~2,300 steps to follow the student). The shipped
    # model ran 1,500 steps, then resumed to 3,000 (train.resume=true train.steps=3000): nothing in sCD depends on
    # the total, so this preset repeats it step for step.
    "fmnist-rcm": Preset(
        "28×28 Fashion-MNIST rCM: sCD plus DMD's score regulariser (fake-score critic copied from the teacher)",
        {
            **FMNIST_NET,
            **SCM_TIME,
            "loss.method": "scd",
            "loss.tangent_warmup": 100,
            "loss.score_reg": 1.0,
            "loss.critic_lr_scale": 1.0,
            "train.steps": 3_000,
            "train.ckpt_every": 250,
            "train.lr": 1e-4,
            "train.teacher": "runs/fmnist-trigflow",
            "train.init_from": "runs/fmnist-trigflow",
            "train.ema_rates": (0.995, 0.99),  # EMAs move on the ~680 student steps only
            "sample.sigmas": (80.0, SCM_SIGMA_MID),
        },
    ),
    "fmnist-meanflow": Preset(
        "28×28 Fashion-MNIST MeanFlow (two-time flow map, JVP) from scratch",
        {
            **FMNIST_NET,
            "model.precond": "meanflow",
            "model.time_inputs": 2,
            **MEANFLOW_TIME,
            "loss.method": "meanflow",
            "train.steps": 1_000,
            "train.lr": 1e-3,
            "train.optimizer": "adam",
            "train.warmup_steps": 200,
            "train.ema_rates": (0.999,),
            "sample.sigmas": (80.0, 1.0),
        },
    ),
    "fmnist-tcm": Preset(
        "28×28 Fashion-MNIST truncated CM: stage 2 after fmnist-ect (t′ = 1, boundary loss 0.25/0.1)",
        {
            **FMNIST_NET,
            "model.dropout": 0.1,
            "loss.method": "tcm",
            "loss.double_steps": 400,
            "loss.start_stage": 3,
            "train.steps": 800,
            "train.lr": 1e-4,
            "train.teacher": "runs/fmnist-ect",
            "train.init_from": "runs/fmnist-ect",
            "train.ema_rates": (0.995, 0.999),
            "sample.sigmas": (80.0, 2.226),
        },
    ),
    # A longer TCM budget (issue 21): the shipped fmnist-tcm continued where its Δt schedule stopped (stage 3 + 800/400)
    "fmnist-tcm-long": Preset(
        "28×28 Fashion-MNIST truncated CM continued: the shipped fmnist-tcm trained 1,200 more steps from stage 5",
        {
            **FMNIST_NET,
            "model.dropout": 0.1,
            "loss.method": "tcm",
            "loss.double_steps": 400,
            "loss.start_stage": 5,
            "train.steps": 1200,
            "train.lr": 1e-4,
            "train.bf16": False,
            "train.teacher": "fmnist-ect",  # the shipped first stage (t < t′)
            "train.init_from": "fmnist-tcm",
            "train.ema_rates": (0.995, 0.999),
            "sample.sigmas": (80.0, 2.226),
        },
    ),
    # Align Your Flow (issue 21): a flow map distilled from fmnist-edm guided by a weaker version of itself
    # (autoguidance), fmnist-edm-weak: a quarter-size UNet trained for 1/6 as many steps.
    "fmnist-edm-weak": Preset(
        "28×28 Fashion-MNIST weak EDM model (16 channels, 750 steps): autoguidance's bad version of fmnist-edm",
        {
            **FMNIST_NET,
            **FMNIST_EDM,
            "model.model_channels": 16,
            "model.num_blocks": 1,
            "train.steps": 750,
            "train.bf16": False,
        },
    ),
    "fmnist-ayf": Preset(
        "28×28 Fashion-MNIST Align Your Flow: a two-time flow map distilled from fmnist-edm autoguided by "
        "fmnist-edm-weak (w = 1.5; Eulerian map distillation, JVP)",
        {
            **FMNIST_NET,
            **AYF,
            "loss.jvp": "fd",  # a central difference: 2.9 s/step here against 4.1 for forward-mode AD (2 cores)
            "train.steps": 1000,
            "train.lr": 1e-4,
            "train.bf16": False,
            "train.teacher": "fmnist-edm",  # the shipped teacher
            "train.init_from": "fmnist-edm",
            "train.autoguide": "runs/fmnist-edm-weak",
            "train.autoguide_w": 1.5,
            "train.ema_rates": (0.995, 0.999),
            "sample.sigmas": (80.0, 2.0),
        },
    ),
    # Consistency mid-training (issue 21): the teacher's 16-step DPM-Solver++ trajectories, each state mapped to the
    # trajectory's end (4 trajectories per batch of 64); fmnist-cmt-ect then tunes it with ECT at a small Δt.
    "fmnist-cmt": Preset(
        "28×28 Fashion-MNIST consistency mid-training from fmnist-edm (16-step DPM-Solver++ trajectories)",
        {
            **FMNIST_NET,
            "model.dropout": 0.1,
            "loss.method": "cmt",
            "loss.nfe": 16,
            "train.steps": 1_000,
            "train.bf16": False,  # trained on an AVX2-only CPU, where bf16 autocast is ~17× slower than fp32
            "train.lr": 2e-4,
            "train.teacher": "runs/fmnist-edm",
            "train.init_from": "runs/fmnist-edm",
            "train.ema_rates": (0.995, 0.999),
            "sample.sigmas": (80.0, 2.0),
        },
    ),
    "fmnist-cmt-ect": Preset(
        "28×28 Fashion-MNIST ECT after consistency mid-training (from fmnist-cmt, Δt from ECT's stage 3 down)",
        {
            **FMNIST_NET,
            "model.dropout": 0.1,
            "loss.method": "ect",
            "loss.start_stage": 3,
            "loss.double_steps": 400,
            "train.steps": 800,
            "train.lr": 1e-4,
            "train.bf16": False,
            "train.init_from": "runs/fmnist-cmt",
            "train.ema_rates": (0.995, 0.999),
            "sample.sigmas": (80.0, 2.0),
        },
    ),
    "fmnist-cmt-tcm": Preset(
        "28×28 Fashion-MNIST truncated CM after fmnist-cmt-ect (t′ = 1, boundary loss 0.25/0.1, stage 4, 400 steps)",
        {
            **FMNIST_NET,
            "model.dropout": 0.1,
            "loss.method": "tcm",
            "loss.double_steps": 400,
            "loss.start_stage": 4,
            "train.steps": 400,
            "train.lr": 1e-4,
            "train.bf16": False,
            "train.teacher": "runs/fmnist-cmt-ect",
            "train.init_from": "runs/fmnist-cmt-ect",
            "train.ema_rates": (0.995, 0.999),
            "sample.sigmas": (80.0, 2.0),
        },
    ),
    # --- 32×32 colour emoji (Noto Color Emoji from Debian): the colour model for colorization ---------
    # Shipped: emoji-ect (EDM pre-training, then ECT). iCT from scratch learned too slowly here: after 1,000
    # steps (25 min) its samples were still coloured noise, where the EDM + ECT pair shows emoji shapes.
    "emoji-edm": Preset(
        "32×32 colour emoji EDM pre-training for emoji-ect (batch 32)",
        {
            **EMOJI_NET,
            "model.precond": "edm",
            "model.dropout": 0.1,
            "loss.method": "edm",
            "train.steps": 2_500,
            "train.lr": 1e-3,
            "train.optimizer": "adam",
            "train.warmup_steps": 200,
            "train.ema_rates": (0.999,),
            "sample.sampler": "heun",
            "sample.steps": 18,
        },
    ),
    "emoji-ect": Preset(
        "32×32 colour emoji easy consistency tuning from emoji-edm (for colorization and colour editing)",
        {
            **EMOJI_NET,
            "model.dropout": 0.1,
            "loss.method": "ect",
            "loss.double_steps": 500,
            "train.steps": 2_000,
            "train.lr": 2e-4,
            "train.init_from": "runs/emoji-edm",
            "train.ema_rates": (0.995, 0.999),
            "sample.sigmas": (80.0, 0.8),
        },
    ),
    "emoji-ict": Preset(
        "32×32 colour emoji improved CT from scratch (slow to learn on a CPU budget; see emoji-ect)",
        {
            **EMOJI_NET,
            "train.batch_size": 64,
            "model.dropout": 0.2,
            "loss.method": "ict",
            "train.steps": 4_000,
            "train.lr": 2e-4,
            "train.optimizer": "adam",
            "train.ema_rates": (0.999,),
            "sample.sigmas": (80.0, 0.8),
        },
    ),
    # --- paper recipes (GPU scale) -------------------------------------------------------------------
    "cifar10-edm": Preset(
        "CIFAR-10 EDM teacher (NCSN++, dropout 0.13, Adam 1e-3); paper FID 2.04 at 35 NFE "
        "(EDM's edm-cifar10-32x32-uncond-ve.pkl)",
        {
            **CIFAR_NET,
            "model.precond": "edm",
            "model.dropout": 0.13,
            "loss.method": "edm",
            "train.steps": 400_000,
            "train.batch_size": 512,
            "train.lr": 1e-3,
            "train.optimizer": "adam",
            "train.warmup_steps": 19_500,
            "train.ema_rates": (0.99929,),
            "sample.sampler": "heun",
            "sample.steps": 18,
        },
    ),
    "cifar10-cd": Preset(
        "CIFAR-10 CD on NCSN++ (LPIPS, Heun, N=18, μ=0, RAdam 4e-4, batch 512, 800k); "
        "paper FID 3.55 (1-step), 2.93 (2-step)",
        {
            **CIFAR_NET,
            "loss.method": "cd",
            "loss.num_scales": 18,
            "loss.mu": 0.0,
            "loss.distance": "lpips",
            "loss.solver": "heun",
            "train.steps": 800_000,
            "train.batch_size": 512,
            "train.lr": 4e-4,
            "train.ema_rates": (0.9999,),
            "train.teacher": "runs/cifar10-edm",
            "train.init_from": "runs/cifar10-edm",
            "sample.sigmas": (80.0, 0.5853),
        },
    ),
    "cifar10-ct": Preset(
        "CIFAR-10 CT on NCSN++ (LPIPS, s0=2, s1=150, μ0=0.9, RAdam 4e-4, batch 512, 800k, random init); "
        "paper FID 8.70 / 5.83",
        {
            **CIFAR_NET,
            "loss.method": "ct",
            "loss.s0": 2,
            "loss.s1": 150,
            "loss.mu0": 0.9,
            "loss.distance": "lpips",
            "train.steps": 800_000,
            "train.batch_size": 512,
            "train.lr": 4e-4,
            "train.ema_rates": (0.9999,),
            "sample.sigmas": (80.0, 0.5853),
        },
    ),
    "cifar10-ict": Preset(
        "CIFAR-10 iCT on NCSN++ (pseudo-Huber, Fourier scale 0.02, dropout 0.3, Adam 1e-4, batch 1024, 400k); "
        "paper FID 2.83 / 2.46",
        {
            **CIFAR_NET,
            "model.fourier_scale": 0.02,
            "model.dropout": 0.3,
            "loss.method": "ict",
            "loss.s0": 10,
            "loss.s1": 1280,
            "train.steps": 400_000,
            "train.batch_size": 1024,
            "train.lr": 1e-4,
            "train.optimizer": "adam",
            "train.ema_rates": (0.99993,),
            "sample.sigmas": (80.0, 0.821),
        },
    ),
    "cifar10-ect": Preset(
        "CIFAR-10 ECT (DDPM++, dropout 0.2, RAdam 1e-4, batch 128, 400k, double 25k, c=0); paper FID 3.60 / 2.11",
        {
            **CIFAR_NET,
            "model.arch": "ddpmpp",
            "model.embedding": "positional",
            "model.dropout": 0.2,
            "data.flip": False,
            "loss.method": "ect",
            "loss.double_steps": 25_000,
            "loss.huber_c": 0.0,
            "train.steps": 400_000,
            "train.batch_size": 128,
            "train.lr": 1e-4,
            "train.ema_rates": (0.9999,),
            "train.init_from": "edm-cifar10-32x32-uncond-vp.pkl",  # EDM's released DDPM++ (download it)
            "sample.sigmas": (80.0, 0.821),
        },
    ),
    "imagenet64-edm": Preset(
        "ImageNet-64 EDM teacher (ADM 192ch, class-cond, dropout 0.1, RAdam 1e-4, batch 4096); "
        "paper FID 2.44 at 79 NFE",
        {
            **IMAGENET64_NET,
            "model.precond": "edm",
            "model.dropout": 0.1,
            "loss.method": "edm",
            "loss.P_mean": -1.2,
            "loss.P_std": 1.2,
            "train.steps": 600_000,
            "train.batch_size": 4096,
            "train.lr": 1e-4,
            "sample.sampler": "heun",
            "sample.steps": 40,
        },
    ),
    "imagenet64-cd": Preset(
        "ImageNet-64 CD (LPIPS, Heun, N=40, μ=0.95, RAdam 8e-6, batch 2048, 600k); paper FID 6.20 / 4.70",
        {
            **IMAGENET64_NET,
            "loss.method": "cd",
            "loss.num_scales": 40,
            "loss.mu": 0.95,
            "loss.distance": "lpips",
            "train.steps": 600_000,
            "train.batch_size": 2048,
            "train.lr": 8e-6,
            "train.teacher": "runs/imagenet64-edm",
            "train.init_from": "runs/imagenet64-edm",
            "sample.sigmas": (80.0, 1.3824),
        },
    ),
    "imagenet64-ct": Preset(
        "ImageNet-64 CT (LPIPS, s0=2, s1=200, μ0=0.95, RAdam 1e-4, batch 2048, 800k); paper FID 13.0 / 11.1",
        {
            **IMAGENET64_NET,
            "loss.method": "ct",
            "loss.s0": 2,
            "loss.s1": 200,
            "loss.mu0": 0.95,
            "loss.distance": "lpips",
            "train.steps": 800_000,
            "train.batch_size": 2048,
            "train.lr": 1e-4,
            "sample.sigmas": (80.0, 1.9128),
        },
    ),
    # LSUN-256 (the published FIDs are unconfirmed readings of Song et al. 2023's LSUN table)
    **lsun(
        "bedroom",
        {"edm": "3.57", "cd": "7.80 / 5.22", "ct": "16.0 / 7.85"},
        {"cd-l2": 3.5197, "cd-lpips": 4.3656, "ct": 3.9912},
    ),
    **lsun("cat", {"edm": "6.69", "cd": "11.0 / 8.84", "ct": "20.7 / 11.7"}, {"ct": 5.2485}),
    # --- a latent space and its consistency decoder (cmkit.decoder; CPU) ------------------------------
    "fmnist-ae": Preset(
        "KL autoencoder, Fashion-MNIST padded to 32×32 → 2×8×8 latents (f = 4), CPU", {}, kind="autoencoder"
    ),
    "digits-ae": Preset(
        "KL autoencoder, 8×8 digits → 2×4×4 latents (f = 2); a smoke run of seconds",
        {
            "data.name": "digits",
            "data.image_size": 8,
            "model.channels": (8, 16),
            "model.norm_groups": 4,
            "train.steps": 300,
            "train.batch_size": 32,
            "train.ckpt_every": 100,
            "train.sample_every": 100,
            "train.log_every": 10,
        },
        kind="autoencoder",
    ),
    "fmnist-cdec": Preset(
        "consistency decoder for fmnist-ae latents (4-level UNet 16–32 wide, 0.48M parameters), CPU", {}, kind="decoder"
    ),
    # --- the latent stack in miniature (cmkit.latent): fmnist-ae's latents → a guided teacher → LCM -----------
    "fmnist-ldm": Preset(
        "class-conditional latent EDM teacher on fmnist-ae's 2×8×8 latents (10% label dropout), Heun 18; CPU",
        {**FMNIST_LATENT_NET, **FMNIST_EDM, "loss.label_dropout": 0.1, "train.steps": 2500},
    ),
    # --- Stable Diffusion (a local diffusers pipeline directory; the recipes of diffusers' LCM scripts) ----------
    "sd-lcm-lora": Preset(
        "LCM-LoRA (Luo et al. 2023): rank-64 adapters on a Stable Diffusion 1.5 pipeline's UNet (train.teacher=DIR, "
        "a local diffusers copy) trained on captioned images (data.root=FOLDER), sampled in 2–8 steps; a GPU run",
        {
            "model.arch": "diffusers",  # the teacher's UNet (model.diffusers defaults to train.teacher)
            "data.name": "captions",
            "loss.method": "lcm",
            "loss.grid": "teacher",  # LCM's skipping-step grid: 50 of the 1,000 timesteps (k = 20)
            "loss.num_scales": 50,
            "loss.solver": "euler",  # DDIM, exactly (cmkit.losses.lcm)
            "loss.mu": 0.0,  # no EMA target for LCM-LoRA (diffusers#6505)
            "loss.distance": "pseudo_huber",
            "loss.huber_c": 0.001,
            "loss.guidance_min": 6.0,  # ω ∈ [5, 15] in LCM's form x0_c + ω(x0_c − x0_u), w = 1 + ω
            "loss.guidance_max": 16.0,
            "train.teacher": "stable-diffusion-v1-5",
            "train.lora_rank": 64,
            "train.optimizer": "adam",
            "train.lr": 1e-4,
            "train.batch_size": 12,
            "train.steps": 1000,
            "train.ema_rates": (),  # the adapters as trained
            "train.log_every": 10,
            "train.sample_every": 250,
            "train.ckpt_every": 250,
            "sample.sampler": "multistep",
            "sample.grid_size": 4,
        },
    ),
    "fmnist-lcm": Preset(
        "latent consistency model (LCM) of fmnist-ldm: one class-conditional 1–4-step model for every guidance "
        "scale w in [1, 4], decoded by fmnist-ae (or `cmkit sample --decoder runs/fmnist-cdec`); CPU",
        {
            **FMNIST_LATENT_NET,
            "model.time_inputs": 2,
            "loss.method": "lcm",
            "loss.num_scales": 50,
            "loss.solver": "heun",
            "loss.mu": 0.95,
            "loss.guidance_min": 1.0,
            "loss.guidance_max": 4.0,
            "train.steps": 1500,
            "train.lr": 1e-4,
            "train.teacher": "runs/fmnist-ldm",
            "train.init_from": "runs/fmnist-ldm",
            "train.ema_rates": (0.999,),
            "sample.sigmas": (80.0, 0.8),
            "sample.guidance": 2.0,
        },
    ),
    "digits-cdec": Preset(
        "consistency decoder for digits-ae latents (2-level UNet 8–16 wide); seconds",
        {
            "model.autoencoder": "runs/digits-ae",
            "data.name": "digits",
            "data.image_size": 8,
            "model.block_out_channels": (8, 16),
            "model.norm_num_groups": 4,
            "model.stats_images": 500,
            "train.steps": 300,
            "train.batch_size": 32,
            "train.ckpt_every": 100,
            "train.sample_every": 100,
            "train.log_every": 10,
        },
        kind="decoder",
    ),
}


for _preset in PRESETS.values():  # the LPIPS recipes read the file `cmkit convert-lpips` writes by default
    if _preset.values.get("loss.distance") == "lpips":
        _preset.values.setdefault("loss.lpips_weights", LPIPS_FILE)


def _maker(key: str, value: str) -> str:
    """The command that makes a missing input file of a preset, or where to get it."""
    name = Path(value).name
    if key == "data.root" and Path(value) == Path(CIFAR10_TRAIN):
        return "cmkit prepare-data cifar10 cifar-10-python.tar.gz (the official archive)"
    if key == "loss.lpips_weights":
        return (
            f"cmkit convert-lpips --lpips vgg.pth --vgg vgg16-397923af.pth -o {value} (the lpips package's "
            "weights/v0.1/vgg.pth and torchvision's VGG16)"
            if value == LPIPS_FILE
            else "cmkit convert-lpips --lpips vgg.pth --vgg vgg16-397923af.pth"
        )
    if Path(value).parent == Path("runs") and name in PRESETS:
        return f"cmkit train --preset {name}"
    if name.endswith(".pkl"):
        return "EDM's released pickles are listed in the README of github.com/NVlabs/edm"
    if key == "data.root" and name.startswith("imagenet64"):
        return f"cmkit prepare-data folder ILSVRC2012/train -o {value} --resolution 64 (ImageNet's class folders)"
    if key == "data.root" and name.startswith("lsun"):
        return (
            f"cmkit prepare-data folder LSUN-IMAGES -o {value} --resolution 256 --labels none (LSUN exported as images)"
        )
    if key == "data.root":
        return "a folder of images (data.name=folder) or an .npz of uint8 NHWC images (data.name=npz)"
    return "give its path"


def missing_inputs(cfg: Any, raise_error: bool = False) -> list[str]:
    """The input files a run config names that do not exist, each with the command that makes it (or where it
    comes from); ``raise_error`` raises them as one ``CmkitError`` line. Checked by ``cmkit train --dry-run``
    and before a training loads anything."""
    sections = {name: getattr(cfg, name, None) for name in ("data", "train", "loss", "model")}
    wanted: list[tuple[str, str]] = []
    data = sections["data"]
    if data is not None and getattr(data, "name", "") in ("npz", "folder", "captions", "mnist", "shards"):
        wanted.append(("data.root", data.root))
    for key in ("train.teacher", "train.init_from", "train.autoguide"):
        section, field_name = key.split(".")
        value = getattr(sections[section], field_name, None)
        if value:
            wanted.append((key, value))
    loss = sections["loss"]
    if loss is not None and getattr(loss, "distance", None) == "lpips":
        wanted.append(("loss.lpips_weights", loss.lpips_weights or ""))
    autoencoder = getattr(sections["model"], "autoencoder", None)
    if autoencoder:
        wanted.append(("model.autoencoder", autoencoder))

    absent: dict[str, list[str]] = {}  # value → the keys that name it (teacher and init_from often agree)
    for key, value in wanted:
        if not value or not (Path(value).expanduser().exists() or value in shipped_models()):
            absent.setdefault(value or f"({key} is not set)", []).append(key)
    diffusers = getattr(sections["model"], "arch", "") == "diffusers"
    missing = []
    for value, keys in absent.items():
        if keys[0] == "data.root" and getattr(data, "name", "") == "captions":
            maker = f"captioned images, {CAPTIONS_LAYOUT}"
        elif keys[0] == "train.teacher" and diffusers:
            maker = "a local diffusers pipeline directory (Stable Diffusion 1.5: model_index.json, unet/, vae/, …)"
        else:
            maker = _maker(keys[0], "" if value.startswith("(") else value)
        missing.append(f"{value}: {maker}" if value.startswith("(") else f"{', '.join(keys)}={value}: {maker}")
    if missing and raise_error:
        raise CmkitError(f"{len(missing)} input file(s) missing: " + "; ".join(missing))
    return missing


def run_config(run_dir: str | Path, overrides: list[str] | None = None) -> Any:
    """The config of the run in ``run_dir`` (its ``config.json``), set to resume it there: ``train.out_dir`` is
    ``run_dir`` and ``train.resume`` true; ``overrides`` as for ``get_config`` (a resume accepts changes to run
    control only). The run's kind is the one config class that reads the file."""
    d = RunDir(run_dir)
    if not d.root.is_dir():
        raise CmkitError(f"no run directory {d.root} to resume")
    saved = read_json(d.config, "run config")
    readable = []
    for kind in ("denoiser", "autoencoder", "decoder"):
        try:
            readable.append(run_kind(kind).config.from_dict(saved))
        except (CmkitError, TypeError, AttributeError):
            continue
    if len(readable) != 1:
        raise CmkitError(f"{d.config} is not the config of a cmkit training run")
    cfg = readable[0]
    apply_overrides(cfg, list(overrides or []) + [f"train.out_dir={d.root}", "train.resume=true"])
    cfg.validate()
    return cfg


def get_config(preset: str, overrides: list[str] | None = None) -> Any:
    """The validated config of a preset with ``key=value`` overrides; train.out_dir defaults to runs/PRESET."""
    if preset not in PRESETS:
        close = difflib.get_close_matches(preset, list(PRESETS), n=2)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise CmkitError(f"unknown preset {preset!r}; {hint}run `cmkit presets` to list them")
    p = PRESETS[preset]
    cfg = run_kind(p.kind).config()
    for key, value in p.values.items():
        set_value(cfg, key, value)
    cfg.train.out_dir = f"runs/{preset}"
    apply_overrides(cfg, overrides or [])
    cfg.validate()
    return cfg
