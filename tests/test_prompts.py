"""Text-to-image pipeline directories (``cmkit.prompts``, ``cmkit.latent.DiffusersVAE``): a tiny LCM pipeline in
Stable Diffusion's layout, written by diffusers/transformers' ``save_pretrained`` (a 52-token CLIP vocabulary, a
2-layer text encoder, a 2-level VAE and UNet; nothing downloaded), sampled by cmkit from prompts and by diffusers'
own ``LatentConsistencyModelPipeline`` on the same noise: the same images.
"""

from __future__ import annotations

import json
import string

import numpy as np
import pytest
import torch
from conftest import tiny_text_unet

from cmkit.cli.main import main
from cmkit.decoder.testing import random_decoder
from cmkit.errors import CmkitError
from cmkit.generate import sample_images
from cmkit.load import load_denoiser
from cmkit.sampling import per_sample_generators, randn

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


def tiny_tokenizer(root):
    """A CLIP tokenizer over single letters (each also as a word end), padded to 16 tokens."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase:
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    root.mkdir(parents=True)
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"), model_max_length=16)


def write_pipeline(root, cls, unet, scheduler):
    """A tiny text-to-image pipeline directory in Stable Diffusion's layout, written by ``cls.save_pretrained``."""
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


SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    """A tiny LCM pipeline directory (with LCM's guidance input, w embedded in 8 dims)."""
    root = tmp_path_factory.mktemp("pipe") / "lcm"
    unet = tiny_text_unet(seed=1, time_cond_proj_dim=8)
    return write_pipeline(root, diffusers.LatentConsistencyModelPipeline, unet, diffusers.LCMScheduler(**SD_BETAS))


def test_prompts_sample_the_same_images_as_diffusers_lcm_pipeline(pipeline_dir):
    """One step from the same initial latents: cmkit (prompts → CLIP embeddings → LCM denoiser with w → the VAE's
    decoder of z/scaling_factor) equals ``LatentConsistencyModelPipeline`` image for image. cmkit's σ-space start
    σ_max·ε is the pipeline's VP latent σ_max·ε/sqrt(1 + σ_max²)."""
    model, cfg = load_denoiser(pipeline_dir)
    prompts = ["a cat", "a dog on a hill"]
    ours = sample_images(model, cfg, 2, prompts=prompts, steps=1, progress=False).images
    assert ours.shape == (2, 3, 16, 16)
    sigma = cfg.model.sigma_max
    eps = randn((2, 4, 8, 8), per_sample_generators(range(2)), "cpu")
    pipe = diffusers.LatentConsistencyModelPipeline.from_pretrained(pipeline_dir, safety_checker=None)
    theirs = pipe(
        prompts,
        num_inference_steps=1,
        guidance_scale=cfg.sample.guidance,
        latents=sigma * eps / (1 + sigma**2) ** 0.5,
        output_type="pt",
    ).images
    torch.testing.assert_close(ours, theirs * 2 - 1, atol=1e-4, rtol=0)
    # the prompt reaches the network: another prompt gives other images from the same noise
    other = sample_images(model, cfg, 2, prompts=["zzz"], steps=1, progress=False).images
    assert (other - ours).abs().amax() > 1e-3


def test_cli_samples_a_pipeline_from_prompts_and_refuses_prompts_elsewhere(pipeline_dir, tmp_path, capsys):
    """``cmkit sample --prompt`` (cycled over the images) writes what ``sample_images`` gives; the pipeline's latents
    also decode through a consistency decoder; a pipeline without prompts and a model without a text encoder given
    prompts are one error line each."""
    npz = tmp_path / "s.npz"
    argv = ["sample", "--model", str(pipeline_dir), "-n", "3", "--steps", "2", "--prompt", "a cat", "--prompt", "b"]
    assert main([*argv, "-o", str(tmp_path / "g.png"), "--npz", str(npz)]) == 0
    images = np.load(npz)["arr_0"]
    assert images.shape == (3, 16, 16, 3)
    model, cfg = load_denoiser(pipeline_dir)
    again = sample_images(model, cfg, 3, prompts=["a cat", "b"], steps=2, progress=False).images
    assert np.abs((again.numpy() + 1) * 127.5 - images.transpose(0, 3, 1, 2)).max() <= 1  # uint8 rounding

    # OpenAI's consistency decoder (here a tiny random one in its layout) decodes the pipeline's raw SD latents: ×8
    random_decoder(seed=3).save_pretrained(tmp_path / "cdec")
    cdec = ["--decoder", str(tmp_path / "cdec"), "--npz", str(tmp_path / "c.npz"), "-o", ""]
    assert main([*argv[:4], "1", "--steps", "1", "--prompt", "a", *cdec]) == 0
    assert np.load(tmp_path / "c.npz")["arr_0"].shape == (1, 64, 64, 3)

    assert main(["sample", "--model", str(pipeline_dir), "-n", "1", "-o", str(tmp_path / "x.png")]) != 0
    assert "needs prompts" in capsys.readouterr().err
    assert main(["sample", "--model", "fmnist-cd", "-n", "1", "--prompt", "a", "-o", str(tmp_path / "y.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "takes no prompts" in err and "\n" not in err
    with pytest.raises(CmkitError, match="non-empty list of strings"):
        sample_images(model, cfg, 1, prompts="a cat", progress=False)


def test_a_stable_diffusion_pipeline_samples_with_classifier_free_guidance_as_diffusers_does(tmp_path):
    """A non-LCM pipeline (Euler, ε-prediction) is a diffusion model guided with the empty prompt as the null branch,
    at diffusers' default w = 7.5: cmkit's Euler steps in σ-space through the guided denoiser end on the images of
    ``StableDiffusionPipeline`` with ``EulerDiscreteScheduler`` (trailing timesteps) from the same initial latents;
    ``sample_images`` is that loop, guided, on EDM's σ list."""
    from cmkit.guidance import Guided
    from cmkit.latent import LatentSpace
    from cmkit.sampling import edm_sigmas, sample_euler

    scheduler = diffusers.EulerDiscreteScheduler(**SD_BETAS, timestep_spacing="trailing")
    root = write_pipeline(tmp_path / "sd", diffusers.StableDiffusionPipeline, tiny_text_unet(seed=2), scheduler)
    model, cfg = load_denoiser(root)
    assert cfg.is_diffusion() and cfg.sample.guidance == 7.5
    prompts = ["a cat", "a dog on a hill"]
    text, null = model.prompt_encoder(prompts), model.prompt_encoder([""])
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(root, safety_checker=None)
    pipe.scheduler.set_timesteps(3)
    sigmas = pipe.scheduler.sigmas.tolist()  # σ at timesteps 999, 666, 333, then 0
    eps = randn((2, 4, 8, 8), per_sample_generators(range(2)), "cpu")
    guided = Guided(model, 7.5, null)
    with torch.no_grad():
        z = sample_euler(
            guided,
            (2, 4, 8, 8),
            sigmas,
            generator=per_sample_generators(range(2)),
            clip=False,
            encoder_hidden_states=text,
        )
    ours = LatentSpace.load(cfg).decode(z)
    # the pipeline scales the latents it is given by init_noise_sigma = σ_max (trailing spacing): σ_max·ε, as cmkit
    theirs = pipe(prompts, num_inference_steps=3, guidance_scale=7.5, latents=eps, output_type="pt").images
    torch.testing.assert_close(ours, theirs * 2 - 1, atol=1e-4, rtol=0)

    with torch.no_grad():
        z = sample_euler(
            guided,
            (2, 4, 8, 8),
            edm_sigmas(3, cfg.model.sigma_min, cfg.model.sigma_max),
            generator=per_sample_generators(range(2)),
            clip=False,
            encoder_hidden_states=text,
        )
    got = sample_images(model, cfg, 2, sampler="euler", steps=3, prompts=prompts, progress=False).images
    torch.testing.assert_close(got, LatentSpace.load(cfg).decode(z))
    unguided = sample_images(model, cfg, 2, sampler="euler", steps=3, prompts=prompts, guidance=1.0, progress=False)
    assert (unguided.images - got).abs().amax() > 1e-3
