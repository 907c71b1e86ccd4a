"""Editing benchmark (issue: zero-shot editing) on held-out Fashion-MNIST test images.

Centre-square inpainting against mean fill, and ×4 super-resolution against nearest and bicubic
upsampling, scored by FD (Fashion-MNIST classifier features; reference: the training split, so the
edited test images were never seen by the model nor by the reference) and PSNR against the ground
truth. The SR consistency check (avg-pool of the output vs the low-resolution input) is reported as
the max absolute error. Writes benchmarks/results/editing.md / .json and a gallery PNG.

    python benchmarks/editing.py --model fmnist-cd --n 2000
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from cmkit.datasets import load_dataset
from cmkit.distributed import cpu_name
from cmkit.editing.editor import default_edit_sigmas
from cmkit.editing.masks import builtin_mask
from cmkit.editing.tasks import inpaint, super_resolve
from cmkit.imageio import save_grid, to_uint8
from cmkit.load import load_model
from cmkit.metrics.evaluate import get_extractor
from cmkit.metrics.frechet import feature_statistics, frechet_distance_stats
from cmkit.metrics.reference import load_reference
from cmkit.schedules import training_grid

RESULTS = Path(__file__).parent / "results"


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean PSNR (dB) of images in [-1, 1] mapped to [0, 1]."""
    mse = ((x - y) / 2).square().flatten(1).mean(1).clamp(min=1e-10)
    return float((10 * torch.log10(1 / mse)).mean())


class BF16(torch.nn.Module):
    """Runs only the network under bf16 autocast; the editor's transforms and replacement stay fp32, so the
    known region is still preserved exactly."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        with torch.autocast(x.device.type, torch.bfloat16):
            return self.model(x, sigma, **cond)


def batched(fn, x: torch.Tensor, batch: int = 250) -> torch.Tensor:
    return torch.cat([fn(x[i : i + batch]) for i in range(0, len(x), batch)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="fmnist-cd")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument(
        "--steps",
        type=int,
        default=None,
        help="σ levels of the editor (default: every level of the model's training grid but σ_min, "
        "or 18 Karras levels for a continuous-time model)",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bf16", action="store_true", help="run the network under bf16 autocast (about 2× faster)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, cfg = load_model(args.model)
    model = BF16(model) if args.bf16 else model
    x = load_dataset("fashion_mnist", split="test").images[: args.n].float() / 127.5 - 1
    extractor = get_extractor("fmnist")
    reference = load_reference("fmnist-train", extractor, progress=False)

    def fd(images: torch.Tensor) -> float:
        feats = extractor.extract(to_uint8(images), progress=False)
        return frechet_distance_stats(feature_statistics(feats), reference.stats)

    sigmas = default_edit_sigmas(args.steps, grid=training_grid(cfg))
    args.levels = len(sigmas)
    g = torch.Generator().manual_seed(0)
    mask = builtin_mask("center", x.shape[-1])
    known = (1 - mask).bool()
    mean_fill = x * (1 - mask) + mask * (x * (1 - mask)).flatten(1).sum(1).div(known.sum()).view(-1, 1, 1, 1)
    inpainted = batched(lambda b: inpaint(model, b, mask, sigmas, generator=g), x)
    low = F.avg_pool2d(x, 4)
    nearest = F.interpolate(low, scale_factor=4, mode="nearest")
    bicubic = F.interpolate(low, scale_factor=4, mode="bicubic", align_corners=False).clamp(-1, 1)
    sr = batched(lambda b: super_resolve(model, F.avg_pool2d(b, 4), 4, sigmas, generator=g), x)
    consistency = float((F.avg_pool2d(sr, 4) - low).abs().max())

    rows = [
        ("unedited test images (floor)", "—", x),
        ("inpaint centre 14×14", "mean fill", mean_fill),
        ("inpaint centre 14×14", f"cmkit ({args.model})", inpainted),
        ("super-resolution ×4 (7×7 → 28×28)", "nearest", nearest),
        ("super-resolution ×4 (7×7 → 28×28)", "bicubic", bicubic),
        ("super-resolution ×4 (7×7 → 28×28)", f"cmkit ({args.model})", sr),
    ]
    table = [{"task": t, "method": m, "fd": fd(im), "psnr": psnr(im, x) if m != "—" else None} for t, m, im in rows]
    write(table, consistency, args, cfg)
    gallery = torch.stack([x[:8], mean_fill[:8], inpainted[:8], nearest[:8], bicubic[:8], sr[:8]], 1).flatten(0, 1)
    save_grid(gallery, RESULTS / "editing_gallery.png", nrow=6)


def write(table: list[dict], consistency: float, args: argparse.Namespace, cfg) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": args.model,
        "n": args.n,
        "editor_sigma_levels": args.levels,
        "feature_space": "FD (Fashion-MNIST classifier features)",
        "reference": "Fashion-MNIST train split",
        "sr_consistency_max_abs": consistency,
        "machine": f"{cpu_name()}, {args.threads} threads, torch {torch.__version__}",
        "network_precision": "bf16 autocast" if args.bf16 else "fp32",
        "command": f"python benchmarks/editing.py --model {args.model} --n {args.n}"
        + (f" --steps {args.steps}" if args.steps is not None else "")
        + (" --bf16" if args.bf16 else ""),
    }
    (RESULTS / "editing.json").write_text(json.dumps({"meta": meta, "rows": table}, indent=2))
    on_grid = " of the model's training grid" if training_grid(cfg) else ""
    lines = [
        f"# Zero-shot editing on {args.n:,} held-out Fashion-MNIST test images",
        "",
        f"Model `{args.model}` ({meta['network_precision']}), Algorithm 4 with {args.levels} σ levels{on_grid}. "
        "FD in the Fashion-MNIST classifier "
        "feature space (not FID) against the training split; PSNR against the ground truth.",
        f"Command: `{meta['command']}`.",
        "",
        "| task | method | FD ↓ | PSNR (dB) ↑ |",
        "|---|---|---|---|",
    ]
    for r in table:
        p = "—" if r["psnr"] is None else f"{r['psnr']:.2f}"
        lines.append(f"| {r['task']} | {r['method']} | {r['fd']:.3f} | {p} |")
    lines += [
        "",
        f"Super-resolution consistency: max |avg_pool4(output) − input| = {consistency:.2e} "
        "(the known patch means are kept exactly).",
        "",
        "Gallery (`editing_gallery.png`), columns: ground truth | mean fill | cmkit inpainting | nearest | "
        "bicubic | cmkit ×4 super-resolution.",
    ]
    (RESULTS / "editing.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
