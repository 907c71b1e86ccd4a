"""Discrete-time VP models (diffusers UNets and schedulers) as σ-space denoisers (cmkit.discrete_vp,
cmkit.formats.diffusers_dir): parity with diffusers' own schedulers on the same tiny random weights and noise."""

import json

import pytest
import torch
from conftest import tiny_config, tiny_text_unet

diffusers = pytest.importorskip("diffusers")

from cmkit.discrete_vp import DiscreteVPDenoiser, LCMDenoiser, guidance_embedding, sigmas_of  # noqa: E402
from cmkit.errors import CmkitError  # noqa: E402
from cmkit.load import init_from, load_denoiser  # noqa: E402
from cmkit.sampling import sample_euler, sample_heun  # noqa: E402
from cmkit.training.loop import Loop  # noqa: E402

PREDICTIONS = ("epsilon", "v_prediction", "sample")


def tiny_unet(seed: int = 0, out_channels: int = 3, channels: int = 3, num_class_embeds: int | None = None):
    """A random 2-level ``UNet2DModel`` on 8×8 images (``channels=1``: the digits presets' shape)."""
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(
        sample_size=8,
        in_channels=channels,
        out_channels=out_channels if channels == 3 else channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        num_class_embeds=num_class_embeds,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    ).eval()


def ddpm(prediction_type: str, schedule: str = "linear") -> "diffusers.DDPMScheduler":
    return diffusers.DDPMScheduler(
        beta_schedule=schedule, prediction_type=prediction_type, clip_sample=False, beta_start=0.00085, beta_end=0.012
    )


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("lookup", ["interp", "nearest"])
def test_denoiser_equals_the_schedulers_x0_on_the_training_timesteps(prediction_type, lookup):
    """At a table σ_t, D(x, σ_t) is diffusers' ``DDPMScheduler.step(...).pred_original_sample`` for z = x·√ᾱ_t."""
    unet, sched = tiny_unet(), ddpm(prediction_type, "scaled_linear")
    D = DiscreteVPDenoiser(unet, sched.alphas_cumprod, prediction_type, lookup)
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    for t in (0, 17, 500, 999):
        ac = sched.alphas_cumprod[t]
        z = ac.sqrt() * x0 + (1 - ac).sqrt() * eps
        with torch.no_grad():
            ref = sched.step(unet(z, t).sample, t, z).pred_original_sample
            ours = D(z / ac.sqrt(), ((1 - ac) / ac).sqrt())
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_sigma_to_t_is_exact_on_the_table_and_between_it_in_log_sigma():
    D = DiscreteVPDenoiser(tiny_unet(), ddpm("epsilon").alphas_cumprod)
    table = D.sigmas
    t = torch.tensor([0, 3, 250, 999])
    torch.testing.assert_close(D.sigma_to_t(table[t]), t.float(), atol=2e-3, rtol=0)
    mid = (table[10].log() + table[11].log()).div(2).exp()  # halfway in ln σ
    assert abs(float(D.sigma_to_t(mid[None])) - 10.5) < 1e-3
    torch.testing.assert_close(D.t_to_sigma(torch.tensor([10.5])), mid[None], rtol=1e-5, atol=0)
    # beyond the table: the end timesteps
    assert D.sigma_to_t(torch.tensor([1e-6, 1e6])).tolist() == [0.0, 999.0]
    D.lookup = "nearest"
    assert D.sigma_to_t(table[[7, 998]] * 1.0001).tolist() == [7, 998]


def test_sigmas_of_is_the_vp_noise_level_and_clamps_a_zero_terminal_snr():
    ac = torch.tensor([0.99, 0.5, 0.0])
    s = sigmas_of(ac)
    torch.testing.assert_close(s[:2], torch.tensor([(0.01 / 0.99) ** 0.5, 1.0], dtype=torch.float64))
    assert torch.isfinite(s[2]) and s[2] == pytest.approx(2.0**12, rel=1e-6)  # ᾱ raised to 2⁻²⁴


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_euler_and_heun_samples_equal_diffusers_karras_schedulers(prediction_type):
    """cmkit's Euler/Heun on the scheduler's Karras σ list (off the training grid: the interpolated timesteps)
    give diffusers' ``EulerDiscreteScheduler``/``HeunDiscreteScheduler`` samples on the same weights and noise."""
    unet = tiny_unet(2)
    pairs = ((diffusers.EulerDiscreteScheduler, sample_euler), (diffusers.HeunDiscreteScheduler, sample_heun))
    for cls, ours_fn in pairs:
        sched = cls(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            prediction_type=prediction_type,
            use_karras_sigmas=True,
        )
        sched.set_timesteps(5)
        shape = (2, 3, 8, 8)
        latents = torch.randn(shape, generator=torch.Generator().manual_seed(3)) * sched.init_noise_sigma
        with torch.no_grad():
            for t in sched.timesteps:
                out = unet(sched.scale_model_input(latents, t), t).sample
                latents = sched.step(out, t, latents).prev_sample
        D = DiscreteVPDenoiser(unet, sched.alphas_cumprod, prediction_type)
        sigmas = sched.sigmas.unique_consecutive()  # Heun's list repeats each inner σ
        ours = ours_fn(D, shape, sigmas, generator=torch.Generator().manual_seed(3), clip=False)
        assert len(sigmas) == 6 and float(sigmas[-1]) == 0.0
        torch.testing.assert_close(ours, latents, rtol=1e-4, atol=1e-4)


def test_conditioning_passes_through_by_name():
    """Text conditioning (``encoder_hidden_states``) reaches the UNet; a changed prompt changes D."""
    unet, sched = tiny_text_unet(), ddpm("epsilon", "scaled_linear")
    D = DiscreteVPDenoiser(unet, sched.alphas_cumprod)
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 3, 12, generator=g)
    t = 400
    ac = sched.alphas_cumprod[t]
    sigma = ((1 - ac) / ac).sqrt()
    with torch.no_grad():
        z = x * ac.sqrt()
        ref = sched.step(unet(z, t, encoder_hidden_states=text).sample, t, z).pred_original_sample
        ours = D(x, sigma, encoder_hidden_states=text)
        other = D(x, sigma, encoder_hidden_states=text.flip(0))
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert (ours - other).abs().max() > 1e-3


def test_learned_variance_output_keeps_the_prediction_half():
    unet = tiny_unet(out_channels=6)
    ac = ddpm("epsilon").alphas_cumprod
    D = DiscreteVPDenoiser(unet, ac)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        eps = unet(x / (1 + 4.0) ** 0.5, D.sigma_to_t(torch.tensor([2.0]))).sample[:, :3]
        torch.testing.assert_close(D(x, 2.0), x - 2.0 * eps)


def test_grid_sigmas_follow_diffusers_timestep_spacing():
    sched = ddpm("epsilon")
    D = DiscreteVPDenoiser(tiny_unet(), sched.alphas_cumprod)
    for spacing in ("trailing", "leading"):
        ref = diffusers.DDIMScheduler(timestep_spacing=spacing, beta_start=0.00085, beta_end=0.012)
        ref.set_timesteps(4)
        torch.testing.assert_close(D.grid_sigmas(4, spacing)[:-1], D.sigmas[ref.timesteps])
    with pytest.raises(CmkitError, match="steps must be between 1 and 1000"):
        D.grid_sigmas(0)


def save_pipeline_layout(root, unet, scheduler):
    root.mkdir(parents=True, exist_ok=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
    unet.save_pretrained(root / "unet")
    scheduler.save_pretrained(root / "scheduler")


@pytest.mark.parametrize("layout", ["pipeline", "model"])
def test_load_denoiser_reads_a_diffusers_directory(tmp_path, layout):
    """``load_denoiser`` (and so ``train.teacher``) reads a pipeline directory and a UNet directory with its
    scheduler config beside it, and gives the same D as the in-memory adapter; its Config is a VP diffusion
    model with the schedule's σ range."""
    unet, sched = tiny_unet(4), ddpm("v_prediction", "squaredcos_cap_v2")
    if layout == "pipeline":
        save_pipeline_layout(tmp_path, unet, sched)
    else:
        unet.save_pretrained(tmp_path)
        sched.save_pretrained(tmp_path)
    D, cfg = load_denoiser(tmp_path)
    ref = DiscreteVPDenoiser(unet, sched.alphas_cumprod, "v_prediction")
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(D(x, 3.0), ref(x, 3.0))
    assert cfg.is_diffusion() and (cfg.model.img_resolution, cfg.model.in_channels) == (8, 3)
    assert cfg.model.sigma_max == pytest.approx(float(sigmas_of(sched.alphas_cumprod)[-1]))


def test_bad_diffusers_directories_are_one_error_line(tmp_path):
    unet, sched = tiny_unet(), ddpm("epsilon")
    unet.save_pretrained(tmp_path / "bare")
    with pytest.raises(CmkitError, match="no scheduler_config.json .* noise schedule"):
        load_denoiser(tmp_path / "bare")

    save_pipeline_layout(tmp_path / "pipe", unet, sched)
    cfg_file = tmp_path / "pipe" / "scheduler" / "scheduler_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "prediction_type": "score"}))
    with pytest.raises(CmkitError, match="prediction_type='score' is not a prediction type"):
        load_denoiser(tmp_path / "pipe")
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "prediction_type": "epsilon"}))
    (tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CmkitError, match="cannot load the UNet2DModel weights"):
        load_denoiser(tmp_path / "pipe")

    (tmp_path / "nounet").mkdir()
    (tmp_path / "nounet" / "model_index.json").write_text("{}")
    with pytest.raises(CmkitError, match="no diffusers UNet found"):
        load_denoiser(tmp_path / "nounet")

    with pytest.raises(CmkitError, match="is a diffusers model: .* give it as train.teacher"):
        init_from(torch.nn.Linear(1, 1), tmp_path / "pipe", None)


def test_consistency_distillation_from_a_diffusers_teacher(tmp_path, capsys):
    """``train.teacher`` may be a diffusers directory: CD trains from it (the teacher is the σ-space adapter), and a
    teacher whose schedule ends below the student's σ_max is named in a warning."""
    unet = tiny_unet(channels=1)
    unet.save_pretrained(tmp_path / "teacher")
    ddpm("epsilon", "scaled_linear").save_pretrained(tmp_path / "teacher")  # σ_max ≈ 14.6 < the student's 80
    cfg = tiny_config(
        "digits-cd", tmp_path / "run", f"train.teacher={tmp_path / 'teacher'}", "train.init_from=", "train.steps=3"
    )
    loop = Loop(cfg, progress=False)
    assert isinstance(loop.task.teacher, DiscreteVPDenoiser)
    assert loop.task.teacher.sigma_max == pytest.approx(14.6, abs=0.1)
    assert "trained up to σ = 14.6" in capsys.readouterr().err
    result = loop.run()
    assert result["steps_run"] == cfg.train.steps and result["final_loss"] == pytest.approx(result["final_loss"])


def test_cd_on_a_discrete_teachers_own_timesteps(tmp_path):
    """``loss.grid=teacher``: the CD pairs are adjacent points of the teacher's trailing N-step grid and its t = 0
    (LCM's skipping-step grid: N = 50 of 1,000 timesteps is k = 20); the student's σ range must be the teacher's
    (one error line names the values), and then it trains."""
    from cmkit.losses import CDLoss

    sched = ddpm("epsilon", "scaled_linear")
    D = DiscreteVPDenoiser(tiny_unet(), sched.alphas_cumprod)
    grid = CDLoss(num_scales=50, grid="teacher").grid_sigmas(D, torch.device("cpu"))
    t = list(range(999, 0, -20)) + [0]  # 999, 979, …, 19 and 0
    torch.testing.assert_close(grid, D.sigmas[t])
    with pytest.raises(ValueError, match="needs a discrete-time teacher"):
        CDLoss(grid="teacher").grid_sigmas(torch.nn.Identity(), torch.device("cpu"))

    unet = tiny_unet(channels=1)
    unet.save_pretrained(tmp_path / "teacher")
    sched.save_pretrained(tmp_path / "teacher")
    common = ("train.init_from=", "train.steps=2", "loss.grid=teacher", "loss.num_scales=50")
    teacher = f"train.teacher={tmp_path / 'teacher'}"
    with pytest.raises(CmkitError, match=r"set model.sigma_min=0.0291\d* model.sigma_max=14.6\d*"):
        Loop(tiny_config("digits-cd", tmp_path / "a", teacher, *common), progress=False)
    lo, hi = D.sigma_min, D.sigma_max
    sigmas = f"sample.sigmas={hi},0.5"
    cfg = tiny_config(
        "digits-cd", tmp_path / "b", teacher, *common, f"model.sigma_min={lo}", f"model.sigma_max={hi}", sigmas
    )
    assert Loop(cfg, progress=False).run()["steps_run"] == 2


def test_guiding_a_class_conditional_diffusers_teacher_is_one_error_line(tmp_path):
    """diffusers' class embedding has no null class, so its unconditional branch does not exist: LCM (which guides
    the teacher) refuses it in one line instead of failing inside the embedding."""
    unet = tiny_unet(channels=1, num_class_embeds=10)
    unet.save_pretrained(tmp_path / "teacher")
    ddpm("epsilon").save_pretrained(tmp_path / "teacher")
    cfg = tiny_config("digits-lcm", tmp_path / "run", f"train.teacher={tmp_path / 'teacher'}", "train.init_from=")
    with pytest.raises(CmkitError, match="no unconditional branch .* distil it unguided"):
        Loop(cfg, progress=False)


def test_an_fp16_unet_gets_fp16_inputs_and_gives_fp32_x0():
    unet = tiny_unet().half()
    D = DiscreteVPDenoiser(unet, ddpm("epsilon").alphas_cumprod)
    ref = DiscreteVPDenoiser(tiny_unet(), ddpm("epsilon").alphas_cumprod)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        out = D(x, 2.0)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, ref(x, 2.0), rtol=0, atol=0.05)


# --- latent consistency models (LCMScheduler) ----------------------------------------------------------


def lcm_scheduler() -> "diffusers.LCMScheduler":
    """Stable Diffusion's scaled-linear schedule, as LCM-Dreamshaper's scheduler config has it."""
    return diffusers.LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def test_guidance_embedding_is_the_lcm_pipelines():
    from diffusers import LatentConsistencyModelPipeline

    omega = torch.tensor([0.0, 1.5, 7.5])
    for dim in (8, 9, 256):
        theirs = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, omega, dim)
        assert torch.allclose(guidance_embedding(omega, dim), theirs, atol=1e-6)


def test_lcm_denoiser_is_lcm_schedulers_consistency_function_and_its_loop_is_the_multistep_sampler():
    """On a tiny UNet with a guidance input: at each of LCMScheduler's 4 timesteps (999, 759, 499, 259) cmkit's
    f(x, σ_t, guidance=w) with x = z_t/√ᾱ_t equals ``step(...).denoised``; the σ-space loop f, then f + σ'·ε with
    the scheduler's own noise draws, ends on the scheduler's final sample."""
    from diffusers import LatentConsistencyModelPipeline

    unet, sched, w = tiny_text_unet(time_cond_proj_dim=8), lcm_scheduler(), 8.5
    sched.set_timesteps(4)
    assert sched.timesteps.tolist() == [999, 759, 499, 259]
    f = LCMDenoiser(unet, sched.alphas_cumprod, "epsilon", 10.0, guidance_dim=8)
    g = torch.Generator().manual_seed(0)
    latents, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 3, 12, generator=g)
    w_emb = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, torch.full((2,), w - 1), 8)
    sample, theirs, noise_gen = latents, [], torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in sched.timesteps:
            eps = unet(sample, t, encoder_hidden_states=text, timestep_cond=w_emb).sample
            out = sched.step(eps, t, sample, generator=noise_gen)
            theirs.append((sample, out.denoised))
            sample = out.prev_sample
        sigmas = f.t_to_sigma(sched.timesteps.float())
        for (z_t, denoised), s in zip(theirs, sigmas):
            x = z_t * (1 + s**2).sqrt()
            assert torch.allclose(f(x, s, guidance=w, encoder_hidden_states=text), denoised, atol=1e-5)
        noise_gen, x = torch.Generator().manual_seed(1), latents * (1 + sigmas[0] ** 2).sqrt()
        for k, s in enumerate(sigmas):
            x = f(x, s, guidance=w, encoder_hidden_states=text)
            if k + 1 < len(sigmas):
                x = x + sigmas[k + 1] * torch.randn(x.shape, generator=noise_gen)
    assert torch.allclose(x, sample, atol=1e-5)


def test_an_lcm_directory_loads_as_a_consistency_model_with_its_4_step_sigmas(tmp_path):
    save_pipeline_layout(tmp_path / "lcm", tiny_text_unet(time_cond_proj_dim=8), lcm_scheduler())
    model, cfg = load_denoiser(tmp_path / "lcm")
    assert isinstance(model, LCMDenoiser) and model.takes_guidance and not cfg.is_diffusion()
    assert [round(float(model.sigma_to_t(torch.tensor([s]))), 3) for s in cfg.sample.sigmas] == [999, 759, 499, 259]
    assert cfg.sample.guidance == 8.5 and cfg.model.time_inputs == 2
    x, text = torch.randn(1, 4, 8, 8), torch.randn(1, 3, 12)
    with pytest.raises(CmkitError, match="pass guidance=w"):
        model(x, 1.0, encoder_hidden_states=text)
    save_pipeline_layout(tmp_path / "lora", tiny_text_unet(), lcm_scheduler())  # an LCM-LoRA'd SD UNet: no w input
    model, cfg = load_denoiser(tmp_path / "lora")
    assert isinstance(model, LCMDenoiser) and not model.takes_guidance and cfg.sample.guidance == 1.0
    with pytest.raises(CmkitError, match="no guidance input"):
        model(x, 1.0, guidance=2.0, encoder_hidden_states=text)


def test_sampling_a_text_model_without_its_prompt_embeddings_is_one_line(tmp_path, capsys):
    from cmkit.cli.main import main

    save_pipeline_layout(tmp_path / "sd", tiny_text_unet(), ddpm("epsilon", "scaled_linear"))
    assert main(["sample", "--model", str(tmp_path / "sd"), "-n", "1", "-o", str(tmp_path / "x.png")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "text-conditioned UNet" in errors[0] and "encoder_hidden_states" in errors[0]
    model, _ = load_denoiser(tmp_path / "sd")  # with them, it runs
    assert model(torch.randn(1, 4, 8, 8), 1.0, encoder_hidden_states=torch.randn(1, 3, 12)).shape == (1, 4, 8, 8)
