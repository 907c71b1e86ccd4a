"""The ``cmkit`` command line: train, sample, presets, models (plus eval, edit, decode, serve when present).

User errors print one line (``cmkit: error: ...``) and exit with status 2; no traceback. Command-line syntax errors
(argparse) are one line too, exit 2. Anything else that goes wrong is a bug: one line naming the exception, exit 1;
``cmkit --debug ...`` (or ``--debug`` anywhere after the command) re-raises it with the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

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
        kind = "" if p.kind == "denoiser" else f"[{p.kind}] "
        print(f"{name:<{width}}  {kind}{p.description}")
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
    """Resolve a preset of any kind with overrides; --dry-run builds model, loss and optimizer, then prints."""
    from .loop import dry_run, train
    from .presets import get_config

    overrides = list(args.overrides) + ([f"train.out_dir={args.out}"] if args.out else [])
    overrides += [f"train.num_threads={args.threads}"] if args.threads else []
    cfg = get_config(args.preset, overrides)
    if args.kind and cfg.kind != args.kind:
        raise CmkitError(f"preset {args.preset!r} trains a {cfg.kind}, not the {args.kind} this command trains; "
                         f"use `cmkit train --preset {args.preset}`")
    if args.dry_run:
        summary = dry_run(cfg)
        print(cfg.to_json())
        print(summary, file=sys.stderr)
        return 0
    print(json.dumps(train(cfg, progress=not args.no_progress)))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from .checkpoint import load_model
    from .cli_options import (IMAGE_SUFFIXES, MAX_BATCH, MAX_IMAGES, MAX_STEPS, apply_threads, check_device, check_int,
                              check_model_arg, check_output, check_sampler_steps, check_seed, check_threads,
                              parse_sigmas)
    from .generate import generate, resolve_sampler
    from .utils import save_grid, save_npz

    check_model_arg(args.model)
    check_int(args.n, "-n", maximum=MAX_IMAGES)
    check_int(args.batch_size, "--batch-size", maximum=MAX_BATCH)
    check_int(args.steps, "--steps", maximum=MAX_STEPS)
    check_seed(args.seed, count=args.n)
    check_threads(args.threads)
    args.device = check_device(args.device)
    out = check_output(args.out, "-o", args.overwrite, suffixes=IMAGE_SUFFIXES)
    npz = check_output(args.npz, "--npz", args.overwrite, suffixes=(".npz",))
    if out is None and npz is None:
        raise CmkitError("nothing to write: give -o FILE.png and/or --npz FILE.npz")
    sigmas = parse_sigmas(args.sigmas) if args.sigmas else None
    apply_threads(args.threads)
    model, cfg = load_model(args.model, device=args.device)
    sampler, sigmas, steps = resolve_sampler(cfg, args.sampler, args.steps, sigmas)
    check_sampler_steps(sampler, steps)
    from .cli_options import class_labels

    x, labels = generate(model, cfg, args.n, sampler, sigmas, steps, args.seed, args.batch_size, args.device,
                         labels=class_labels(args.classes, cfg.model.num_classes, args.n), bf16=args.bf16)
    if args.out:
        save_grid(x, args.out)
        print(f"wrote {args.out}")
    if args.npz:
        save_npz(x, args.npz, labels)
        print(f"wrote {args.npz} ({len(x)} images, uint8 NHWC)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export a run's weights (first EMA by default) of any kind as a compact model directory with its recipe."""
    import os

    import torch

    from .checkpoint import RunDir, read_model_dir, read_safetensors, save_model_dir
    from .utils import cpu_name

    run = RunDir(args.run)
    if not args.out:
        raise CmkitError("export needs an output directory: -o DIR")
    if not run.has_checkpoint():
        raise CmkitError(f"{run.root} is not a training run directory (no checkpoint/{RunDir.STATE})")
    if Path(args.out).exists() and not args.overwrite:
        raise CmkitError(f"{args.out} exists; pass --overwrite to replace it")
    model = read_model_dir(run.model)  # kind and model config of the run's export
    train_cfg = run.saved_config()["train"]
    state = run.state()
    weights = args.weights or RunDir.weights_name(train_cfg["ema_rates"][0] if train_cfg["ema_rates"] else None)
    file = run.checkpoint / f"{weights}.safetensors"
    if not file.is_file():
        found = sorted(p.stem for p in run.checkpoint.glob("*.safetensors"))
        raise CmkitError(f"no weights {weights!r} in {run.checkpoint}; choose one of {', '.join(found)}")
    recipe = {"run": str(run.root), "weights": weights, "steps": state["step"], "wall_s": state.get("wall_s"),
              "machine": f"{cpu_name()}, {os.cpu_count()} CPUs, train.num_threads={train_cfg['num_threads']}, "
                         f"torch {torch.__version__}",
              "note": args.note or ""}
    save_model_dir(args.out, read_safetensors(file), model.kind, model.config,
                   {"description": args.description or "", "recipe": recipe},
                   dtype=torch.float16 if args.fp16 else None)
    print(f"wrote {args.out} ({model.kind}, {weights}, step {state['step']})")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """A released consistency-models checkpoint (openai .pt or diffusers UNet2DModel) → a cmkit model directory."""
    from .config import Config, set_value
    from .nets.adm_weights import read_released, released_model_config, released_name, released_overrides

    if not args.out:
        raise CmkitError("convert needs an output directory: -o DIR")
    if Path(args.out).exists() and not args.overwrite:
        raise CmkitError(f"{args.out} exists; pass --overwrite to replace it")
    from .nets.released import checkpoint_format

    if checkpoint_format(args.src) in ("edm-pickle", "flax-msgpack"):
        return _convert_released_net(args)
    args.precond = args.precond or "cm"
    state, known = read_released(args.src)
    cfg = Config()
    for key, value in released_model_config(state, known, args.precond, args.image_size).items():
        set_value(cfg, f"model.{key}", value)
    cfg.loss.method = "edm" if args.precond == "edm" else "cd"
    cfg.sample.sampler = "heun" if args.precond == "edm" else "onestep"
    name = args.family or released_name(args.src)
    if name and args.precond == "cm":  # the published grid and 2-step σ of a released model
        for key, value in released_overrides(name).items():
            set_value(cfg, key, value)
    cfg.model.check()
    return _write_converted(args, cfg, state, "diffusers" if known else "openai-pt")


def _convert_released_net(args: argparse.Namespace) -> int:
    """An EDM-style pickle (NVlabs/edm, ECT; read without running its code) or a Flax CIFAR-10 checkpoint
    (openai/consistency_models_cifar10; its EMA parameters) → a cmkit model directory."""
    from .nets.released import config_for, read_released_net

    section, state, fmt = read_released_net(args.src, args.precond, args.image_size)
    return _write_converted(args, config_for(section), state, fmt)


def _write_converted(args: argparse.Namespace, cfg: Any, state: dict[str, Any], fmt: str) -> int:
    """Load a converted backbone state into the network ``cfg`` describes and write the model directory."""
    import torch

    from .checkpoint import load_state, save_model_dir

    model = cfg.model.build()
    m = cfg.model
    load_state(model.net, state, str(args.src), f"the {m.arch} network its shapes describe")
    meta = {"description": args.description or f"converted from {Path(args.src).name}",
            "source": {"path": str(args.src), "format": fmt}}
    save_model_dir(args.out, model, "denoiser", cfg.to_dict(), meta, dtype=torch.float16 if args.fp16 else None)
    print(f"wrote {args.out} ({m.arch} {m.img_resolution}px, {sum(p.numel() for p in model.parameters()):,} "
          f"parameters, {'class-conditional' if m.num_classes else 'unconditional'}, precond {m.precond})")
    return 0


def cmd_export_diffusers(args: argparse.Namespace) -> int:
    """A cmkit ADM consistency model → a diffusers ConsistencyModelPipeline directory."""
    from .checkpoint import read_model_dir, read_safetensors
    from .cli_options import check_output
    from .config import Config
    from .nets.adm_weights import export_diffusers_pipeline
    from .schedules import training_grid

    check_output(args.out, "-o", args.overwrite, required=True, directory=True)
    d = read_model_dir(args.model, "denoiser")
    cfg = Config.from_dict(d.config)
    state = {k.removeprefix("net."): v for k, v in read_safetensors(d.weights).items()}
    grid = training_grid(cfg)
    out = export_diffusers_pipeline(state, d.config["model"], args.out, len(grid) if grid else 40)
    print(f"wrote {out} (ConsistencyModelPipeline: model_index.json, unet/, scheduler/)")
    return 0


def _add_train(sub: Any, name: str, kind: str | None, default: str | None, help_text: str) -> None:
    """``cmkit train`` (any preset) and its kind-restricted aliases ``train-autoencoder``/``train-decoder``."""
    from .cli_options import add_output_option, add_threads_option

    s = sub.add_parser(name, help=help_text,
                       description="Train from a preset (see `cmkit presets`). Overrides are key=value with dotted "
                                   "keys (train.lr=1e-4) or unique bare names (lr=1e-4). Runs go to runs/PRESET "
                                   "unless train.out_dir or --out is given; train.resume=true continues a run "
                                   "exactly (only steps, logging, checkpoint intervals, threads may change).")
    s.add_argument("--preset", required=default is None, default=default,
                   help="preset name (see `cmkit presets`)" + (f"; default {default}" if default else ""))
    s.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    add_output_option(s, help="run directory (same as train.out_dir=...; default runs/PRESET)")
    add_threads_option(s)
    s.add_argument("--dry-run", action="store_true",
                   help="check the config, build model, loss and optimizer (no data), print the config as JSON")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_train, kind=kind)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``cmkit sample: error: argument -n: invalid int value: 'x' (see ...)``.

    Sub-command parsers are of the same class (``add_subparsers`` uses the class of its parser)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        message = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


DEBUG_HELP = "show the full traceback of an unexpected error instead of one line"


def _add_debug_everywhere(parser: argparse.ArgumentParser) -> None:
    """``--debug`` after any (nested) command too; it only sets ``debug`` when given (the top level's default)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                if not any("--debug" in a.option_strings for a in sub._actions):
                    sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
                _add_debug_everywhere(sub)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="cmkit", description="Consistency models: train, sample, edit, evaluate.",
               epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("presets", help="list the training presets with a one-line description")
    s.set_defaults(func=cmd_presets)
    s = sub.add_parser("models", help="list the models shipped with cmkit")
    s.set_defaults(func=cmd_models)

    _add_train(sub, "train", None, None, "train a model from a preset (any kind), with key=value overrides")
    _add_train(sub, "train-autoencoder", "autoencoder", "fmnist-ae",
               "train a KL autoencoder (= cmkit train with an autoencoder preset)")
    _add_train(sub, "train-decoder", "decoder", "fmnist-cdec",
               "train a consistency decoder for an autoencoder's latents (= cmkit train with a decoder preset)")

    s = sub.add_parser("sample", help="generate images from a trained or shipped model",
                       description="Sample a model. Consistency models: --steps 1 (one network evaluation) or "
                                   "--steps 2, or an explicit descending σ list (--sigmas 80,0.8). Diffusion models: "
                                   "--sampler heun|euler --steps N (Heun: 2N-1 evaluations).")
    s.add_argument("--model", required=True, help="model directory, run directory, or shipped model name")
    s.add_argument("-n", type=int, default=64, help="number of images (default 64)")
    from .cli_options import add_class_option, add_output_option, add_sampling_options

    add_sampling_options(s, batch_size=256, sigmas_help="comma-separated descending σ values for multistep sampling",
                         seed_help="sample i uses seed+i, independent of the batch size")
    add_output_option(s, default="samples.png", help="PNG grid path (default samples.png; '' to skip)")
    s.add_argument("--npz", help="also write uint8 NHWC samples to this .npz (arr_0; labels in arr_1)")
    s.add_argument("--overwrite", action="store_true", help="replace existing output files")
    add_class_option(s)
    s.set_defaults(func=cmd_sample)

    s = sub.add_parser("convert", help="convert released models (OpenAI .pt/diffusers, EDM .pkl, JAX CIFAR-10) to a "
                                       "model directory",
                       description="Convert a checkpoint of openai/consistency_models (a .pt state dict, read with "
                                   "weights_only) or of the diffusers openai/diffusers-* repositories (a UNet2DModel "
                                   "directory), an EDM-style pickle (NVlabs/edm or ECT .pkl snapshots and training "
                                   "states, read without running any code from the file), or a Flax checkpoint_N of "
                                   "openai/consistency_models_cifar10 (its EMA parameters, read without JAX) into a "
                                   "cmkit model directory that every --model option accepts.")
    s.add_argument("src", help="the .pt/.pkl/checkpoint_N file, or the diffusers directory (holding config.json, "
                               "or unet/)")
    s.add_argument("-o", "--out", required=True, help="output model directory")
    s.add_argument("--precond", choices=("cm", "edm"),
                   help="cm for the CD/CT models (boundary condition), edm for the EDM teachers (default cm; an EDM "
                        "pickle says which it holds)")
    s.add_argument("--image-size", type=int, help="image side, when the channel_mult does not tell it (JAX: 32)")
    from .nets.adm_weights import RELEASED_MODELS

    s.add_argument("--family", choices=sorted(RELEASED_MODELS),
                   help="which released model this is, when the file name does not say (sets its training grid "
                        "and the published 2-step σ)")
    s.add_argument("--fp16", action="store_true", help="store weights in fp16 (loaded back as fp32)")
    s.add_argument("--description", help="one-line description stored in config.json")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_convert)

    s = sub.add_parser("export-diffusers", help="write an ADM consistency model as a diffusers "
                                                "ConsistencyModelPipeline directory")
    s.add_argument("--model", required=True, help="model directory, run directory or shipped name (model.arch=adm)")
    s.add_argument("-o", "--out", required=True, help="output pipeline directory")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_export_diffusers)

    s = sub.add_parser("export", help="export a run's EMA weights (any kind) as a model directory (optionally fp16)")
    s.add_argument("run", help="training run directory")
    s.add_argument("-o", "--out", required=True, help="output model directory")
    s.add_argument("--weights", help="checkpoint weights to export: ema_RATE (default: first EMA) or model (online)")
    s.add_argument("--fp16", action="store_true", help="store weights in fp16 (loaded back as fp32)")
    s.add_argument("--description", help="one-line description stored in config.json")
    s.add_argument("--note", help="free-text note stored in the recipe")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_export)

    for module in ("cmkit.metrics.cli", "cmkit.editing.cli", "cmkit.decoder.cli", "cmkit.serve.cli"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and module.startswith(e.name):
                continue
            raise
        mod.add_cli(sub)
    _add_debug_everywhere(p)
    return p


def one_line(text: object, limit: int = 500) -> str:
    """A message on one line (whitespace runs, newlines included, become one space), at most ``limit`` chars."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[:limit - 3] + "..."


def main(argv: list[str] | None = None) -> int:
    """Run ``cmkit``: 0 on success, 2 for a user error (one line), 1 for an unexpected error (one line;
    ``--debug`` re-raises it), 130 when interrupted. ``--help`` still exits through SystemExit(0)."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        # key=value overrides may follow flags (`train --preset X a=1 --dry-run b=2`); anything else is an error
        if extra and isinstance(getattr(args, "overrides", None), list) and \
                all("=" in v and not v.startswith("-") for v in extra):
            args.overrides += extra
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as e:  # argparse: --help (0) or a syntax error (2, one line already printed)
        if e.code in (None, 0):
            raise
        return e.code if isinstance(e.code, int) else 2
    debug = bool(getattr(args, "debug", False))
    try:
        return int(args.func(args) or 0)
    except CmkitError as e:
        if debug:
            raise
        print(f"cmkit: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cmkit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `cmkit train ... --dry-run | head`
        return 0
    except Exception as e:  # a bug, not a user error: one line, and the traceback with --debug
        if debug:
            raise
        print(f"cmkit: error: {type(e).__name__}: {one_line(e) or '(no message)'} "
              "(rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
