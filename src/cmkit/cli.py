"""The ``cmkit`` command line: train, sample, presets, models (plus eval, edit, decode when present).

User errors print one line (``cmkit: error: ...``) and exit with status 2; no traceback.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from .errors import CmkitError

EXAMPLES = """examples:
  cmkit presets
  cmkit train --preset digits-edm
  cmkit train --preset digits-cd train.steps=2000 train.lr=1e-4 --dry-run
  cmkit sample --model runs/digits-cd --steps 2 -n 64 -o samples.png --npz samples.npz
  torchrun --nproc_per_node 2 -m cmkit train --preset digits-ict
"""


def cmd_presets(args: argparse.Namespace) -> int:
    from .presets import PRESETS

    width = max(map(len, PRESETS))
    for name, p in PRESETS.items():
        print(f"{name:<{width}}  {p.description}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .zoo import models_root, shipped_models

    names = shipped_models()
    if not names:
        print("no shipped models in this installation")
    for name in names:
        meta = json.loads((models_root() / name / "config.json").read_text())
        print(f"{name:<16} {meta.get('description', '')}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .presets import get_config

    cfg = get_config(args.preset, args.overrides)
    if args.out:
        cfg.train.out_dir = args.out
    if args.dry_run:
        print(cfg.to_json())
        return 0
    from .train import train

    summary = train(cfg)
    print(json.dumps(summary))
    return 0


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CmkitError(f"--sigmas expects comma-separated numbers like 80,0.8; got {text!r}") from None


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import load_model
    from .generate import generate, resolve_sampler
    from .utils import save_grid, save_npz

    if args.n < 1 or args.batch_size < 1:
        raise CmkitError("-n and --batch-size must be positive")
    for target in (args.out, args.npz):
        if target and Path(target).exists() and not args.overwrite:
            raise CmkitError(f"{target} exists; pass --overwrite to replace it")
    model, cfg = load_model(args.model, device=args.device)
    sampler, sigmas, steps = resolve_sampler(cfg, args.sampler, args.steps, _floats(args.sigmas) if args.sigmas else None)
    if args.threads:
        torch.set_num_threads(args.threads)
    x, labels = generate(model, cfg, args.n, sampler, sigmas, steps, args.seed, args.batch_size, args.device,
                         bf16=args.bf16)
    if args.out:
        save_grid(x, args.out)
        print(f"wrote {args.out}")
    if args.npz:
        save_npz(x, args.npz, labels)
        print(f"wrote {args.npz} ({len(x)} images, uint8 NHWC)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export a run's weights (EMA by default) as a compact model directory with its recipe."""
    import os

    import torch

    from .checkpoint import build_model, load_weights, read_config, save_model_dir
    from .utils import cpu_name

    run = Path(args.run)
    ckpt = run / "checkpoint"
    if not (ckpt / "state.json").is_file():
        raise CmkitError(f"{run} is not a training run directory (no checkpoint/state.json)")
    if Path(args.out).exists() and not args.overwrite:
        raise CmkitError(f"{args.out} exists; pass --overwrite to replace it")
    cfg, _ = read_config(ckpt)
    state = json.loads((ckpt / "state.json").read_text())
    weights = args.weights or (f"ema_{cfg.train.ema_rates[0]:g}" if cfg.train.ema_rates else "model")
    model = build_model(cfg.model)
    load_weights(model, ckpt / f"{weights}.safetensors")
    recipe = {"run": str(run), "weights": weights, "steps": state["step"], "wall_s": state.get("wall_s"),
              "machine": f"{cpu_name()}, {os.cpu_count()} CPUs, train.num_threads={cfg.train.num_threads}, "
                         f"torch {torch.__version__}",
              "note": args.note or ""}
    meta = {"description": args.description or "", "recipe": recipe}
    save_model_dir(args.out, model, cfg, meta, dtype=torch.float16 if args.fp16 else None)
    print(f"wrote {args.out} ({weights}, step {state['step']})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cmkit", description="Consistency models: train, sample, edit, evaluate.",
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("presets", help="list the training presets with a one-line description")
    s.set_defaults(func=cmd_presets)
    s = sub.add_parser("models", help="list the models shipped with cmkit")
    s.set_defaults(func=cmd_models)

    s = sub.add_parser("train", help="train a model from a preset, with key=value overrides",
                       description="Train from a preset. Overrides are key=value with dotted keys (train.lr=1e-4) "
                                   "or unique bare names (lr=1e-4). Runs go to runs/PRESET unless train.out_dir "
                                   "or --out is given; train.resume=true continues a run exactly.")
    s.add_argument("--preset", required=True, help="preset name (see `cmkit presets`)")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    s.add_argument("--out", help="output directory (same as train.out_dir=...)")
    s.add_argument("--dry-run", action="store_true", help="print the resolved config as JSON and exit")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("sample", help="generate images from a trained or shipped model",
                       description="Sample a model. Consistency models: --steps 1 (one network evaluation) or "
                                   "--steps 2, or an explicit descending σ list (--sigmas 80,0.8). Diffusion models: "
                                   "--sampler heun|euler --steps N (Heun: 2N-1 evaluations).")
    s.add_argument("--model", required=True, help="model directory, run directory, or shipped model name")
    s.add_argument("-n", type=int, default=64, help="number of images (default 64)")
    s.add_argument("--steps", type=int, help="number of sampling steps")
    s.add_argument("--sigmas", help="comma-separated descending σ values for multistep sampling")
    s.add_argument("--sampler", choices=["onestep", "multistep", "heun", "euler"], help="sampler (default: by model)")
    s.add_argument("--seed", type=int, default=0, help="sample i uses seed+i, independent of the batch size")
    s.add_argument("--batch-size", type=int, default=256)
    s.add_argument("--device", default="cpu")
    s.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    s.add_argument("--bf16", action="store_true", help="run the network under bfloat16 autocast (faster on CPU)")
    s.add_argument("-o", "--out", default="samples.png", help="PNG grid path ('' to skip)")
    s.add_argument("--npz", help="also write uint8 NHWC samples to this .npz (arr_0; labels in arr_1)")
    s.add_argument("--overwrite", action="store_true", help="replace existing output files")
    s.set_defaults(func=cmd_sample)

    s = sub.add_parser("export", help="export a run's EMA weights as a model directory (optionally fp16)")
    s.add_argument("run", help="training run directory")
    s.add_argument("-o", "--out", required=True, help="output model directory")
    s.add_argument("--weights", help="checkpoint weights to export: ema_RATE (default: first EMA) or model (online)")
    s.add_argument("--fp16", action="store_true", help="store weights in fp16 (loaded back as fp32)")
    s.add_argument("--description", help="one-line description stored in config.json")
    s.add_argument("--note", help="free-text note stored in the recipe")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_export)

    for module in ("cmkit.metrics.cli", "cmkit.editing.cli", "cmkit.decoder.cli"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and module.startswith(e.name):
                continue
            raise
        mod.add_cli(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CmkitError as e:
        print(f"cmkit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cmkit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `cmkit train ... --dry-run | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
