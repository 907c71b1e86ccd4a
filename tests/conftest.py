"""Shared fixtures: tiny configs on the bundled 8×8 digits, a tiny trained EDM teacher, and ``bound`` for the
tests whose pass/fail depends on a training run.

Training-bound tests take their seed from ``CMKIT_TEST_SEED`` (0 unless set) and check each trained quantity with
``bound(name, value, limit)``; ``scripts/bound_spread.py`` reruns them over seeds and thread counts and tabulates
the spread of every such value against its limit (the margins quoted in the tests' docstrings come from it).
"""

from __future__ import annotations

import json
import os
import string

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "2")
torch.set_num_threads(min(2, torch.get_num_threads()))

SEED = int(os.environ.get("CMKIT_TEST_SEED", "0"))

TINY = [
    "model.model_channels=16",
    "model.channel_mult=1,2",
    "model.num_blocks=1",
    "train.batch_size=32",
    "train.log_every=5",
    "train.sample_every=0",
    "train.ckpt_every=0",
    "sample.grid_size=4",
]


def tiny_config(preset: str, out_dir, *overrides: str):
    from cmkit.training.presets import get_config

    return get_config(preset, TINY + [f"train.out_dir={out_dir}", f"train.seed={SEED}", *overrides])


def pytest_collection_modifyitems(items):
    """Every test that uses ``bound`` is marked ``training_bound`` (``pytest -m training_bound`` runs them)."""
    for item in items:
        if "bound" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.training_bound)


@pytest.fixture
def seed() -> int:
    """The seed of a training-bound test: ``CMKIT_TEST_SEED`` (0 unless set)."""
    return SEED


@pytest.fixture
def bound(request):
    """``bound(name, value, limit)`` asserts value < limit for a quantity that a training run produced, and
    appends it to the JSON-lines file ``CMKIT_BOUND_LOG`` when that is set (``scripts/bound_spread.py``)."""

    def check(name: str, value: float, limit: float) -> None:
        log = os.environ.get("CMKIT_BOUND_LOG")
        if log:
            row = {
                "test": request.node.nodeid,
                "quantity": name,
                "value": float(value),
                "limit": float(limit),
                "seed": SEED,
                "threads": torch.get_num_threads(),
            }
            with open(log, "a") as f:
                f.write(json.dumps(row) + "\n")
        assert value < limit, f"{name} = {value:.4g}, bound < {limit:.4g} (seed {SEED})"

    return check


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory):
    """A tiny digits EDM teacher trained for 60 steps (shared by CD/ECT tests)."""
    from cmkit.training.loop import train

    out = tmp_path_factory.mktemp("teacher")
    train(tiny_config("digits-edm", out, "train.steps=60"), progress=False)
    return out


@pytest.fixture
def one_thread():
    """Tiny networks gain nothing from 2 threads, and lose a lot when the CPU is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def check_boundary_and_bf16(cfg) -> None:
    """A consistency model built from ``cfg`` with weights far from zero: f(x, σ_min) = x exactly, and a bf16 or fp16
    autocast forward returns finite fp32 (σ arithmetic and the noise embedding stay fp32)."""
    model = cfg.model.build().eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x, cfg.model.sigma_min), x)  # f(x, σ_min) = x exactly
        for dtype in (torch.bfloat16, torch.float16):
            with torch.autocast("cpu", dtype=dtype):
                y = model(x, 2.0)
                assert torch.equal(model(x, cfg.model.sigma_min), x)
            assert y.dtype == torch.float32 and torch.isfinite(y).all()


def tiny_text_unet(seed: int = 0, time_cond_proj_dim: int | None = None):
    """A random 2-level diffusers ``UNet2DConditionModel`` on 4×8×8 latents with 12-dim text embeddings (Stable
    Diffusion's layout in miniature); ``time_cond_proj_dim`` adds LCM's guidance input."""
    import diffusers

    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(
        time_cond_proj_dim=time_cond_proj_dim,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        cross_attention_dim=12,
        attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()


SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def tiny_tokenizer(root):
    """A CLIP tokenizer over single letters (each also as a word end), padded to 16 tokens."""
    import transformers

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase:
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    root.mkdir(parents=True)
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"), model_max_length=16)


def write_pipeline(root, cls, unet, scheduler):
    """A tiny text-to-image pipeline directory in Stable Diffusion's layout, written by ``cls.save_pretrained``: a
    52-token CLIP vocabulary, a 2-layer text encoder, a 2-level VAE (16×16 images ↔ 4×8×8 latents)."""
    import diffusers
    import transformers

    torch.manual_seed(0)
    text_encoder = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=54,
            hidden_size=12,
            intermediate_size=24,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    ).eval()
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    ).eval()
    parts = dict(vae=vae, text_encoder=text_encoder, tokenizer=tiny_tokenizer(root.parent / f"{root.name}-vocab"))
    pipe = cls(
        **parts,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(root)
    return root


@pytest.fixture(scope="session")
def sd_pipeline_dir(tmp_path_factory):
    """A tiny Stable Diffusion pipeline directory (ε-prediction, SD's scaled-linear betas, PNDM as SD 1.5 ships)."""
    import diffusers

    root = tmp_path_factory.mktemp("sd") / "sd"
    scheduler = diffusers.PNDMScheduler(**SD_BETAS, skip_prk_steps=True)
    return write_pipeline(root, diffusers.StableDiffusionPipeline, tiny_text_unet(seed=4), scheduler)
