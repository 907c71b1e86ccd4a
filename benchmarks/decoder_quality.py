"""Decoder quality benchmark (issue item 7): a consistency decoder trained by cmkit vs its autoencoder's decoder.

Stage 1 trains (or loads) a small KL autoencoder on Fashion-MNIST padded to 32×32 (``cmkit train-autoencoder
--preset fmnist-ae``), stage 2 a consistency decoder on its latents (``cmkit train-decoder --preset
fmnist-cdec``). Both then decode the posterior means μ(x) of N held-out test images, and each decoder is
scored on the 28×28 crops:

* FD in the feature space of the project's Fashion-MNIST classifier against the whole test split (the
  real-vs-real floor is the training split scored the same way), i.e. how realistic the decodes look;
* PSNR = 10·log10(255² / MSE) per image against the original uint8 image, averaged, i.e. how faithful;
* decode throughput (images/s) on this CPU.

Rows: (a) the autoencoder's own decoder D(μ), (b) the consistency decoder at 1 step (t = 1008) and 2 steps
(t = 1008, 512), with per-batch seeded noise. Writes ``decoder.md`` / ``decoder.json`` and a grid.

    python benchmarks/decoder_quality.py              # trains runs/fmnist-ae and runs/fmnist-cdec if missing
    python benchmarks/decoder_quality.py --ae runs/fmnist-ae --decoder runs/fmnist-cdec --n 10000
    python benchmarks/decoder_quality.py --ae fmnist-ae --decoder fmnist-cdec   # the shipped pair
    python benchmarks/decoder_quality.py --quick                          # smoke run: tiny nets, 20 steps, /tmp output

``--quick`` trains throw-away tiny models and writes to a temporary directory, never to benchmarks/results.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cmkit.decoder.decoder import ConsistencyDecoder
from cmkit.decoder.schedule import steps_to_schedule
from cmkit.distributed import cpu_name
from cmkit.errors import CmkitError
from cmkit.formats.model_dir import read_model_dir, resolve_model_dir
from cmkit.formats.run_dir import RunDir
from cmkit.imageio import save_grid, to_uint8
from cmkit.latent import crop_images, load_images
from cmkit.metrics.evaluate import get_extractor, real_floor
from cmkit.metrics.frechet import feature_statistics, frechet_distance_stats
from cmkit.metrics.reference import load_reference
from cmkit.nets.autoencoder import KLAutoencoder
from cmkit.training.loop import train
from cmkit.training.presets import get_config

RESULTS = Path(__file__).parent / "results"
QUICK_AE = ["steps=20", "channels=8,16,16", "log_every=10", "ckpt_every=0", "sample_every=0"]
QUICK_DEC = [
    "steps=20",
    "block_out_channels=8,16,16,16",
    "stats_images=200",
    "log_every=10",
    "ckpt_every=0",
    "sample_every=0",
]


def has_model(path: Path) -> bool:
    """A run directory with its model, a model directory, or a shipped model's name."""
    try:
        resolve_model_dir(path)
        return True
    except CmkitError:
        return False


def ensure_models(args: argparse.Namespace) -> tuple[Path, Path]:
    """Train the autoencoder and the decoder with their presets unless they name models (run or model directories,
    shipped names)."""
    ae_dir, dec_dir = Path(args.ae), Path(args.decoder)
    threads = [f"num_threads={args.threads}"]
    if not has_model(ae_dir):
        print(f"training the autoencoder into {ae_dir}")
        train(get_config("fmnist-ae", (QUICK_AE if args.quick else []) + threads + [f"out_dir={ae_dir}"]))
    if not has_model(dec_dir):
        print(f"training the consistency decoder into {dec_dir}")
        train(
            get_config(
                "fmnist-cdec",
                (QUICK_DEC if args.quick else []) + threads + [f"out_dir={dec_dir}", f"autoencoder={ae_dir}"],
            )
        )
    return ae_dir, dec_dir


def psnr(decoded: np.ndarray, original: np.ndarray) -> float:
    """Mean over images of 10·log10(255² / MSE) on uint8 arrays (N, H, W, C); an exact image counts as 100 dB."""
    err = (decoded.astype(np.float64) - original.astype(np.float64)) ** 2
    mse = err.reshape(len(err), -1).mean(1)
    return float(np.mean(np.where(mse > 0, 10 * np.log10(255.0**2 / np.maximum(mse, 1e-12)), 100.0)))


@torch.no_grad()
def decode_all(decode, latents: torch.Tensor, batch: int) -> tuple[torch.Tensor, float]:
    """Decode latents in batches with ``decode(z, batch_index)``; returns (images, images per second)."""
    t0, out = time.perf_counter(), []
    for i in range(0, len(latents), batch):
        out.append(decode(latents[i : i + batch], i // batch).clamp(-1, 1))
    return torch.cat(out), len(latents) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ae", default=None, help="autoencoder run directory (default runs/fmnist-ae)")
    ap.add_argument("--decoder", default=None, help="decoder run directory (default runs/fmnist-cdec)")
    ap.add_argument("--n", type=int, default=10_000, help="test images to decode")
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--image-size", type=int, default=32, help="the padded side the autoencoder was trained at (32)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", default="1,2", help="consistency decoder step counts (default 1,2)")
    ap.add_argument("--results", default=None, help="output directory (default benchmarks/results)")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny models, 20 steps, n=200, /tmp output")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="cmkit-decoder-quick-")) if args.quick else None
    if args.quick:
        args.n = min(args.n, 200)
    args.ae = args.ae or str(tmp / "ae" if tmp else "runs/fmnist-ae")
    args.decoder = args.decoder or str(tmp / "cdec" if tmp else "runs/fmnist-cdec")
    results = Path(args.results) if args.results else (tmp if tmp else RESULTS)
    ae_dir, dec_dir = ensure_models(args)
    ae = KLAutoencoder.from_pretrained(ae_dir)
    dec = ConsistencyDecoder.from_pretrained(resolve_model_dir(dec_dir), channels_last=False)
    test = load_images("fashion_mnist", "", "test", args.image_size).images[: args.n]
    x = test.float() / 127.5 - 1
    original = to_uint8(crop_images(x, 28, 28))
    latents = torch.cat([ae.encode(x[i : i + args.batch]) for i in range(0, len(x), args.batch)])
    extractor = get_extractor("fmnist")
    reference = load_reference("fmnist-test", extractor, progress=False)
    floor = real_floor(reference, extractor, args.n, progress=False)
    decoders = {"autoencoder decoder D(μ)": (1, lambda z, b: ae.decode(z))}
    for steps in (int(s) for s in args.steps.split(",")):
        schedule = steps_to_schedule(steps)
        decoders[
            f"consistency decoder, {steps} step{'s' if steps > 1 else ''} (t = "
            f"{', '.join(map(str, dec.timesteps(schedule)))})"
        ] = (steps, lambda z, b, s=schedule: dec.decode(z, s, torch.Generator().manual_seed(b)))
    rows, grid = [], [crop_images(x[:8], 28, 28)]
    for name, (nfe, fn) in decoders.items():
        images, ips = decode_all(fn, latents, args.batch)
        images = crop_images(images, 28, 28)
        grid.append(images[:8])
        u8 = to_uint8(images)
        fd = frechet_distance_stats(feature_statistics(extractor.extract(u8, progress=False)), reference.stats)
        rows.append({"decoder": name, "network_evals": nfe, "fd": fd, "psnr": psnr(u8, original), "img_per_s": ips})
        print(json.dumps(rows[-1]))
    write(results, rows, floor, args, ae_dir, dec_dir)
    save_grid(torch.cat(grid), results / "decoder_grid.png", nrow=8)


def run_recipe(run: Path) -> dict:
    """Steps and wall time of a run, from its checkpoint state, or of a model directory, from its recipe."""
    if not RunDir(run).has_checkpoint():
        recipe = read_model_dir(run).meta.get("recipe", {})
        return {k: recipe[k] for k in ("steps", "wall_s") if k in recipe}
    s = RunDir(run).state()
    return {"steps": s["step"], "wall_s": round(s.get("wall_s", 0.0), 1)}


def write(
    results: Path, rows: list[dict], floor: dict | None, args: argparse.Namespace, ae_dir: Path, dec_dir: Path
) -> None:
    results.mkdir(parents=True, exist_ok=True)
    machine = (
        f"{cpu_name()}, {args.threads} torch threads, torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}"
    )
    meta = {
        "n_test_images": args.n,
        "quick": args.quick,
        "machine": machine,
        "command": "python " + " ".join(["benchmarks/decoder_quality.py", *sys.argv[1:]]),
        "autoencoder": {"dir": str(ae_dir), **run_recipe(ae_dir)},
        "decoder": {"dir": str(dec_dir), **run_recipe(dec_dir)},
        "feature_space": "FD (Fashion-MNIST classifier features)",
        "reference": "Fashion-MNIST test split (10,000)",
    }
    (results / "decoder.json").write_text(json.dumps({"meta": meta, "floor": floor, "rows": rows}, indent=2))
    lines = [f"# Consistency decoder vs autoencoder decoder ({args.n:,} Fashion-MNIST test images)", ""]
    if args.quick:
        lines += ["**Smoke run (`--quick`): tiny models trained for 20 steps; the numbers mean nothing.**", ""]
    lines += [
        f"Autoencoder `{ae_dir}` ({meta['autoencoder'].get('steps', '?')} steps), consistency decoder "
        f"`{dec_dir}` ({meta['decoder'].get('steps', '?')} steps). Machine: {machine}. Command: "
        f"`{meta['command']}`.",
        "",
        "FD: Fréchet distance in the Fashion-MNIST classifier's feature space (not FID) against the test split; "
        "PSNR: per image on the 28×28 uint8 crop, averaged (higher = closer to the input).",
        "",
        "| decoder | network evals | FD ↓ | PSNR (dB) ↑ | img/s |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['decoder']} | {r['network_evals']} | {r['fd']:.3f} | {r['psnr']:.2f} | {r['img_per_s']:.1f} |"
        )
    if floor:
        lines.append(f"| real images (floor: {floor['description']}) | — | {floor['fd']:.3f} | — | — |")
    lines += ["", "Grid (`decoder_grid.png`): originals, then one row per decoder in table order."]
    (results / "decoder.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {results / 'decoder.md'} and {results / 'decoder.json'}")


if __name__ == "__main__":
    main()
