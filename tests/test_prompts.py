"""Text-to-image pipeline directories (``cmkit.prompts``, ``cmkit.latent.DiffusersVAE``): a tiny LCM pipeline in
Stable Diffusion's layout, written by diffusers/transformers' ``save_pretrained`` (a 52-token CLIP vocabulary, a
2-layer text encoder, a 2-level VAE and UNet; nothing downloaded), sampled by cmkit from prompts and by diffusers'
own ``LatentConsistencyModelPipeline`` on the same noise: the same images.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import SD_BETAS, tiny_text_unet, write_pipeline

from cmkit.cli.main import main
from cmkit.decoder.testing import random_decoder
from cmkit.errors import CmkitError
from cmkit.generate import sample_images
from cmkit.load import load_denoiser
from cmkit.sampling import per_sample_generators, randn

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


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


def write_captioned(folder, n: int = 6):
    """n random 20×20 RGB images, half captioned in ImageFolder's metadata.jsonl and half by a .txt beside them."""
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir()
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        caption = "a cat" if i % 2 else "a dog on a hill"
        if i < n // 2:
            rows.append(json.dumps({"file_name": f"{i}.png", "text": caption}))
        else:
            (folder / f"{i}.txt").write_text(caption + "\n")
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def test_lcm_lora_trains_on_captioned_images_and_diffusers_samples_the_same_images(sd_pipeline_dir, tmp_path, capsys):
    """``cmkit train --preset sd-lcm-lora`` on a Stable Diffusion pipeline directory and a captioned folder trains
    LoRA adapters only (every other weight stays the teacher's), and the exported ``lora.safetensors`` loaded by
    diffusers' ``load_lora_weights`` into ``StableDiffusionPipeline`` with ``LCMScheduler`` gives, in one step from
    the same latents, the images ``cmkit sample`` gives from the exported model."""
    from cmkit.datasets import load_captions
    from cmkit.imageio import to_uint8
    from cmkit.nets.lora import LCM_LORA_TARGETS
    from cmkit.serve.backend import Backend

    folder = write_captioned(tmp_path / "captioned")
    assert load_captions(str(folder), 16, 3).captions == ["a dog on a hill", "a cat"] * 3
    run = tmp_path / "run"
    argv = ["train", "--preset", "sd-lcm-lora", f"train.teacher={sd_pipeline_dir}", f"data.root={folder}"]
    small = ["train.steps=3", "train.batch_size=4", "train.lora_rank=4", "train.lr=0.01", "sample.grid_size=2"]
    assert main([*argv, *small, "train.sample_every=0", "train.ckpt_every=0", "--no-progress", "--out", str(run)]) == 0
    assert (run / "samples").is_dir() and any((run / "samples").iterdir())  # the final grid, from captions
    model, cfg = load_denoiser(run)
    assert cfg.model.arch == "diffusers" and cfg.latent.autoencoder.endswith("vae")
    teacher = diffusers.UNet2DConditionModel.from_pretrained(sd_pipeline_dir / "unet").state_dict()
    merged = model.unet.state_dict()
    changed = {k for k in teacher if not torch.equal(teacher[k], merged[k])}
    modules = {k.rsplit(".", 1)[0] for k in changed}  # only LCM-LoRA's layers changed, each merged W + s·B·A
    assert modules and all(any(m.endswith("." + t) for t in LCM_LORA_TARGETS) for m in modules), modules

    prompts = ["a cat", "a dog on a hill"]
    ours = sample_images(model, cfg, 2, prompts=prompts, steps=1, progress=False).images
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(sd_pipeline_dir, safety_checker=None)
    pipe.scheduler = diffusers.LCMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(run / "model", weight_name="lora.safetensors")
    sigma = cfg.model.sigma_max
    eps = randn((2, 4, 8, 8), per_sample_generators(range(2)), "cpu")
    latents = sigma * eps / (1 + sigma**2) ** 0.5
    theirs = pipe(prompts, num_inference_steps=1, guidance_scale=1.0, latents=latents, output_type="pt").images
    torch.testing.assert_close(ours, theirs * 2 - 1, atol=1e-4, rtol=0)
    page = Backend(allow=[tmp_path]).sample(str(run), "auto", 1, "", 0, 2, "", None, "a cat\na dog on a hill")
    assert np.array_equal(page.native, to_uint8(ours))  # the web page's prompt field: the same images
    pipe.unload_lora_weights()  # the adapters matter: without them diffusers gives other images
    plain = pipe(prompts, num_inference_steps=1, guidance_scale=1.0, latents=latents, output_type="pt").images
    assert (plain - theirs).abs().amax() > 1e-3

    # a text teacher on images without captions, and an image without a caption: one error line each
    assert main([*argv[:4], "data.name=folder", f"data.root={folder}", *small, "--out", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "is text-conditioned: train on captioned images (data.name=captions" in err
    (folder / "5.txt").unlink()
    with pytest.raises(CmkitError, match=r"no caption for .*5\.png: expected metadata\.jsonl"):
        load_captions(str(folder), 16, 3)
