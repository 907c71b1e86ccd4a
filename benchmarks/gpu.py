"""The GPU check (run by ``benchmarks/gpu.sh`` whenever a GPU is lent; never by the tests): full-size training steps
per second and peak memory, one-step sampling throughput, and a 1024² consistency-decoder decode.

* Training: ``cifar10-cd`` (NCSN++, CD with the Heun teacher, LPIPS), ``cifar10-ect`` (DDPM++), sCT on the same
  DDPM++ network (``cifar10-ect`` with ``loss.method=sct``: the JVP; cmkit has no ``cifar10-sct`` preset) and
  ``imagenet64-cd`` (ADM, CD, LPIPS), at the per-GPU batch of the papers' runs (CIFAR-10 512 over 8 GPUs,
  ImageNet-64 2048 over 64), in bf16 and in fp16 with dynamic loss scaling, with an Adam step. Attention runs
  PyTorch's SDPA (flash or memory-efficient kernels on the GPU); the JVP pass runs SDPA's math kernel
  (``cmkit.jvp``), and one row says whether forward-mode AD goes through the fused kernel at all.
* Sampling: one-step images per second at full size (bf16).
* Decoder: one 1024² decode (128² latent) by the Consistency Decoder, 2 steps, bf16, untiled.

Random weights and data (a benchmark of speed, not of quality). Writes ``benchmarks/results/gpu.md`` and ``.json``
with the card's name.

    python benchmarks/gpu.py               # on a GPU (~5 min on one H100)
    python benchmarks/gpu.py --quick       # tiny networks, any device: checks that it runs
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from cmkit.config import apply_overrides  # noqa: E402
from cmkit.denoiser_config import Config  # noqa: E402
from cmkit.ema import make_copy  # noqa: E402
from cmkit.jvp import directional_derivative  # noqa: E402
from cmkit.lpips import LPIPS  # noqa: E402
from cmkit.training.presets import PRESETS  # noqa: E402

#: (name, preset, overrides, per-GPU batch)
TRAINING = [
    ("cifar10-cd", "cifar10-cd", [], 64),
    ("cifar10-ect", "cifar10-ect", [], 64),
    ("cifar10-sct (DDPM++)", "cifar10-ect", ["loss.method=sct", "model.precond=trigflow", "loss.jvp=jvp"], 64),
    ("imagenet64-cd", "imagenet64-cd", [], 32),
]
QUICK = ["model.model_channels=32", "model.channel_mult=1,2", "model.num_blocks=1", "model.attn_resolutions=16"]


def config(preset: str, overrides: list[str], quick: bool):
    """The preset's config; with another ``loss.method`` among ``overrides``, its network and training sections and
    that method's default loss options. Teachers are random networks (``train.teacher`` only names one)."""
    own = not any(o.startswith("loss.method=") for o in overrides)
    keep = [
        f"{k}={','.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
        for k, v in PRESETS[preset].values.items()
        if own or not k.startswith(("loss.", "sample."))
    ]
    cfg = apply_overrides(Config(), [*keep, "train.init_from=", *overrides])
    cfg.train.teacher = "random-weights" if cfg.loss.method in ("cd", "scd") else ""
    if quick:
        apply_overrides(cfg, QUICK + ["model.img_resolution=32"])
    cfg.validate()
    return cfg


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def train_rate(name, preset, overrides, batch, dtype, device, quick, steps) -> dict:
    """Steps per second of loss + backward + Adam at ``batch``, under autocast ``dtype`` (fp16: loss scaling)."""
    cfg = config(preset, overrides, quick)
    torch.manual_seed(0)
    model = cfg.model.build().to(device).train()
    objective = cfg.loss.build(cfg.model, cfg.train.steps)
    if getattr(cfg.loss, "distance", "") == "lpips":
        objective.distance = LPIPS().to(device).requires_grad_(False).eval()  # random VGG16, the real one's cost
    teacher = None
    if objective.needs_teacher:
        tcfg = config(preset, ["loss.method=edm", "model.precond=edm", *overrides], quick)
        teacher = tcfg.model.build().to(device).eval().requires_grad_(False)
    target = make_copy(model) if objective.target_mu(0) is not None else None
    optimizer = torch.optim.RAdam(model.parameters(), lr=1e-5)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    m = cfg.model
    x0 = torch.rand(batch, m.in_channels, m.img_resolution, m.img_resolution, device=device) * 2 - 1
    cond = {"class_labels": torch.arange(batch, device=device) % m.num_classes} if m.num_classes else {}

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype):
            loss = objective(model, x0, step=1000, target=target or model, teacher=teacher, **cond).mean()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    step()
    reset_peak(device)
    step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    seconds = (time.perf_counter() - t0) / steps
    return {"steps_per_s": 1 / seconds, "images_per_s": batch / seconds, "peak_gib": peak_gib(device)}


def jvp_through_fused_attention(device: torch.device, quick: bool) -> str:
    """Whether forward-mode AD runs through SDPA's default (fused) kernel, outside cmkit.jvp's math-kernel context."""
    cfg = config("cifar10-ect", ["loss.method=sct", "model.precond=trigflow"], quick)
    model = cfg.model.build().to(device).eval()
    x = torch.randn(2, 3, cfg.model.img_resolution, cfg.model.img_resolution, device=device)
    t = torch.full((2,), 0.5, device=device)
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            torch.func.jvp(lambda a: model(a, t), (x,), (torch.ones_like(x),))
        fused = "runs"
    except Exception as e:  # noqa: BLE001 - the answer is the error
        fused = f"fails ({type(e).__name__}: {' '.join(str(e).split())[:120]})"
    try:
        directional_derivative(lambda a: model(a, t), (x,), (torch.ones_like(x),), mode="jvp")
        math = "runs"
    except Exception as e:  # noqa: BLE001
        math = f"fails ({type(e).__name__})"
    return f"fused SDPA kernel: {fused}; cmkit.jvp (math kernel): {math}"


@torch.no_grad()
def sampling_rate(preset: str, batch: int, device: torch.device, quick: bool, repeats: int) -> dict:
    cfg = config(preset, [], quick)
    model = cfg.model.build().to(device).eval()
    m = cfg.model
    x = torch.randn(batch, m.in_channels, m.img_resolution, m.img_resolution, device=device) * m.sigma_max
    sigma = torch.full((batch,), m.sigma_max, device=device)
    cond = {"class_labels": torch.arange(batch, device=device) % m.num_classes} if m.num_classes else {}
    with torch.autocast(device.type, dtype=torch.bfloat16):
        model(x, sigma, **cond)
        reset_peak(device)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            model(x, sigma, **cond)
        sync(device)
    seconds = (time.perf_counter() - t0) / repeats
    return {"images_per_s": batch / seconds, "peak_gib": peak_gib(device)}


@torch.no_grad()
def decode_1024(device: torch.device, quick: bool) -> dict:
    from cmkit.decoder.config import DecoderConfig
    from cmkit.decoder.decoder import ConsistencyDecoder
    from cmkit.decoder.testing import randomize_

    cfg = DecoderConfig(block_out_channels=(32, 64, 64, 64)) if quick else DecoderConfig()
    dec = ConsistencyDecoder(cfg)
    randomize_(dec.unet, 0)
    dec.prepare(dtype=torch.bfloat16, channels_last=True)
    dec.to(device)
    side = 16 if quick else 128
    z = torch.randn(1, 4, side, side, device=device)
    dec.decode(z, (1.0, 0.5), torch.Generator(device).manual_seed(0))
    reset_peak(device)
    sync(device)
    t0 = time.perf_counter()
    x = dec.decode(z, (1.0, 0.5), torch.Generator(device).manual_seed(0))
    sync(device)
    return {"seconds": time.perf_counter() - t0, "peak_gib": peak_gib(device), "image": list(x.shape[-2:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny networks: check that it runs (any device)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=10, help="timed training steps per row (default 10)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu"))
    args = ap.parse_args()
    device = torch.device(args.device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device} (no GPU: --quick check)"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    results: dict = {"card": card, "torch": torch.__version__, "quick": args.quick, "training": [], "sampling": []}
    for name, preset, overrides, batch in TRAINING:
        for dtype in (torch.bfloat16, torch.float16):
            b = 4 if args.quick else batch
            try:
                r = train_rate(name, preset, overrides, b, dtype, device, args.quick, 2 if args.quick else args.steps)
            except Exception as e:  # noqa: BLE001 - a row that fails says why; the others still run
                r = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"}
            results["training"].append({"recipe": name, "dtype": str(dtype).split(".")[1], "batch": b, **r})
            print(results["training"][-1], flush=True)
    results["jvp"] = jvp_through_fused_attention(device, args.quick)
    print(results["jvp"], flush=True)
    for preset, batch in (("cifar10-ect", 256), ("imagenet64-cd", 64)):
        b = 4 if args.quick else batch
        r = sampling_rate(preset, b, device, args.quick, 2 if args.quick else 10)
        results["sampling"].append({"network": preset, "batch": b, **r})
        print(results["sampling"][-1], flush=True)
    try:
        results["decoder"] = decode_1024(device, args.quick)
    except Exception as e:  # noqa: BLE001
        results["decoder"] = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"}
    print(results["decoder"], flush=True)
    Path(args.out + ".json").write_text(json.dumps(results, indent=2))
    Path(args.out + ".md").write_text(report(results))
    print(f"wrote {args.out}.md")


def report(r: dict) -> str:
    lines = [
        "# GPU check",
        "",
        f"Card: **{r['card']}**; torch {r['torch']}; {time.strftime('%Y-%m-%d %H:%M')}."
        + (" **Quick mode: tiny networks, not the real figures.**" if r["quick"] else ""),
        "Command: `bash benchmarks/gpu.sh`. Random weights and data; an Adam step is included in each training step.",
        "",
        "## Training steps at full size, per-GPU batch",
        "",
        "| recipe | dtype | batch | steps / s | images / s | peak GiB |",
        "|---|---|---|---|---|---|",
    ]
    for t in r["training"]:
        if "error" in t:
            lines.append(f"| {t['recipe']} | {t['dtype']} | {t['batch']} | n/a: {t['error']} | | |")
        else:
            lines.append(
                f"| {t['recipe']} | {t['dtype']} | {t['batch']} | {t['steps_per_s']:.2f} | {t['images_per_s']:.0f} "
                f"| {t['peak_gib']:.1f} |"
            )
    lines += ["", f"JVP and attention: {r['jvp']}.", "", "## One-step sampling (bf16)", ""]
    lines += ["| network | batch | images / s | peak GiB |", "|---|---|---|---|"]
    for s in r["sampling"]:
        lines.append(f"| {s['network']} | {s['batch']} | {s['images_per_s']:.0f} | {s['peak_gib']:.1f} |")
    d = r["decoder"]
    lines += ["", "## Consistency Decoder, 1024² (128² latent), 2 steps, bf16", ""]
    lines.append(
        f"n/a: {d['error']}" if "error" in d else f"{d['seconds']:.2f} s, peak {d['peak_gib']:.1f} GiB, {d['image']}"
    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
