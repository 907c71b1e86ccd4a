"""Colorization benchmark (issue: zero-shot editing) on the held-out emoji split.

Every held-out emoji (the split no model was trained on) is turned grey (R = G = B = its luminance,
``cmkit.editing.to_gray3``) and coloured again by Algorithm 4 with the luminance-axis Q. Baselines: the grey
image itself (colourfulness 0) and the grey image plus the training split's mean chroma image. Reported:

* PSNR of the RGB result against the ground truth (a plausible but different colour loses here; shown anyway);
* chroma RMSE (the two chroma coordinates of Q, in image units);
* colourfulness (Hasler & Süsstrunk 2003, on 0–255 RGB): how much colour the result has, against the
  ground truth's (grey is 0);
* luminance preservation: max |luminance(output) − luminance(input)|, which Algorithm 4 keeps exactly.

    python benchmarks/colorize.py --model emoji-ect --bf16

Writes benchmarks/results/colorize.md / .json and colorize_gallery.png (ground truth | grey | mean chroma |
cmkit, 16 rows).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from editing import BF16, psnr  # benchmarks/editing.py, beside this script

from cmkit.datasets import load_dataset
from cmkit.distributed import cpu_name
from cmkit.editing.editor import default_edit_sigmas
from cmkit.editing.tasks import colorize, to_gray3
from cmkit.editing.transforms import ColorBasis
from cmkit.imageio import save_grid
from cmkit.load import load_model

RESULTS = Path(__file__).parent / "results"


def chroma(x: torch.Tensor) -> torch.Tensor:
    """The two chroma coordinates of Q (everything but the luminance axis)."""
    return ColorBasis().forward(x)[:, 1:]


def colourfulness(x: torch.Tensor) -> float:
    """Hasler & Süsstrunk (2003) M on 0–255 RGB, averaged over images."""
    r, g, b = ((x.clamp(-1, 1) + 1) * 127.5).unbind(1)
    rg, yb = r - g, 0.5 * (r + g) - b
    std = (rg.flatten(1).var(1) + yb.flatten(1).var(1)).sqrt()
    mean = (rg.flatten(1).mean(1).square() + yb.flatten(1).mean(1).square()).sqrt()
    return float((std + 0.3 * mean).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="emoji-ect")
    ap.add_argument("--steps", type=int, default=18, help="σ levels of the editor")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bf16", action="store_true", help="run the network under bf16 autocast")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, cfg = load_model(args.model)
    model = BF16(model) if args.bf16 else model
    R = cfg.model.img_resolution
    x = load_dataset("emoji", split="test", resolution=R).images.float() / 127.5 - 1
    train = load_dataset("emoji", split="train", resolution=R).images.float() / 127.5 - 1
    gray = to_gray3(x)
    mean_chroma = ColorBasis().inverse(
        torch.cat(
            [ColorBasis().forward(gray)[:, :1], chroma(train).mean(0, keepdim=True).expand(len(x), -1, -1, -1)], 1
        )
    )
    with torch.no_grad():
        out = colorize(model, gray, default_edit_sigmas(args.steps), generator=torch.Generator().manual_seed(0))
    lum_err = float((ColorBasis().forward(out)[:, :1] - ColorBasis().forward(gray)[:, :1]).abs().max())
    rows = []
    for name, im in [
        ("ground truth", x),
        ("grey input", gray),
        ("grey + mean training chroma", mean_chroma),
        (f"cmkit colorize ({args.model})", out),
    ]:
        rows.append(
            {
                "method": name,
                "psnr": None if im is x else psnr(im, x),
                "chroma_rmse": None if im is x else float((chroma(im) - chroma(x)).square().mean().sqrt()),
                "colourfulness": colourfulness(im),
            }
        )
    command = f"python benchmarks/colorize.py --model {args.model}" + (" --bf16" if args.bf16 else "")
    meta = {
        "model": args.model,
        "n": len(x),
        "editor_sigma_levels": args.steps,
        "luminance_max_abs_error": lum_err,
        "network_precision": "bf16 autocast" if args.bf16 else "fp32",
        "command": command,
        "machine": f"{cpu_name()}, {args.threads} threads, torch {torch.__version__}",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "colorize.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        f"# Zero-shot colorization on the {len(x)} held-out emoji",
        "",
        f"Model `{args.model}` ({meta['network_precision']}), Algorithm 4 with the luminance-axis Q and "
        f"{args.steps} σ levels; one sample per image (seed 0). Command: `{command}`.",
        "",
        "| method | PSNR vs truth (dB) ↑ | chroma RMSE ↓ | colourfulness (truth-like is better) |",
        "|---|---|---|---|",
    ]
    for r in rows:
        p = "—" if r["psnr"] is None else f"{r['psnr']:.2f}"
        c = "—" if r["chroma_rmse"] is None else f"{r['chroma_rmse']:.3f}"
        lines.append(f"| {r['method']} | {p} | {c} | {r['colourfulness']:.1f} |")
    lines += [
        "",
        f"Luminance preservation: max |luminance(output) − luminance(input)| = {lum_err:.2e} "
        "(the known coordinate is kept exactly).",
        "A colorization is one plausible choice among many, so PSNR and chroma RMSE against the one true "
        "colouring reward timid (greyish) answers; colourfulness shows whether the output has the amount "
        "of colour real emoji have.",
        "",
        "Gallery (`colorize_gallery.png`), columns: ground truth | grey input | grey + mean chroma | cmkit.",
    ]
    (RESULTS / "colorize.md").write_text("\n".join(lines) + "\n")
    save_grid(
        torch.stack([x[:16], gray[:16], mean_chroma[:16], out[:16]], 1).flatten(0, 1),
        RESULTS / "colorize_gallery.png",
        nrow=4,
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
