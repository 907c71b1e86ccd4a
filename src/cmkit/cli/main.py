"""The ``cmkit`` command line: train, sample, presets, models (plus eval, edit, decode, serve when present).

User errors print one line (``cmkit: error: ...``) and exit with status 2; no traceback. Command-line syntax errors
(argparse) are one line too, exit 2. Anything else that goes wrong is a bug: one line naming the exception, exit 1;
``cmkit --debug ...`` (or ``--debug`` anywhere after the command) re-raises it with the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from .. import distributed as dist
from ..config import set_value
from ..datasets import DATASETS, SPLIT_DATASETS, load_dataset
from ..denoiser_config import Config
from ..distributed import cpu_name
from ..editing.gallery import stroke_painting
from ..errors import CmkitError, one_line
from ..files import load_state, read_safetensors
from ..formats.adm_weights import (
    RELEASED_MODELS,
    export_diffusers_pipeline,
    read_released,
    released_model_config,
    released_name,
    released_overrides,
)
from ..formats.cifar10 import CIFAR10_TRAIN, prepare_cifar10
from ..formats.detect import checkpoint_format, read_released_net
from ..formats.model_dir import read_model_dir, save_model_dir
from ..formats.run_dir import RunDir
from ..formats.zoo import models_root, shipped_models
from ..imageio import CROPS, from_uint8, save_grid, save_images, save_npz
from ..inputs import (
    IMAGE_SUFFIXES,
    MAX_BATCH,
    MAX_IMAGES,
    MAX_STEPS,
    apply_threads,
    check_device,
    check_int,
    check_model_arg,
    check_numbered_outputs,
    check_output,
    check_seed,
    check_threads,
)
from ..latent import same_autoencoder
from ..load import config_for
from ..lpips import LPIPS_FILE, convert_lpips
from ..schedules import training_grid
from ..shards import INDEX as SHARD_INDEX
from ..shards import prepare_folder, shards_from_arrays
from ..training.loop import dry_run, train
from ..training.presets import PRESETS, get_config, missing_inputs, run_config
from .decoder import add_cli as add_decoder
from .edit import add_cli as add_edit
from .eval import add_cli as add_eval
from .options import (
    PREVIEW_IMAGES,
    add_class_option,
    add_output_option,
    add_sampling_options,
    add_threads_option,
    sample_from_args,
    sample_npz_from_args,
)
from .serve import add_cli as add_serve

EXAMPLES = """examples:
  cmkit presets
  cmkit train --preset digits-edm
  cmkit train --preset digits-cd train.steps=2000 train.lr=1e-4 --dry-run
  cmkit train --resume runs/digits-cd train.steps=3000      # continue a run (Ctrl-C saves a checkpoint)
  cmkit sample --model runs/digits-cd --steps 2 -n 64 -o samples.png --npz samples.npz
  cmkit images fashion_mnist --index 3 -o img.png          # a held-out test image to edit
  cmkit edit inpaint --model fmnist-cd --input img.png --builtin center -o inpainted.png
  torchrun --nproc_per_node 2 -m cmkit train --preset digits-ict
"""


def cmd_presets(args: argparse.Namespace) -> int:
    width = max(map(len, PRESETS))
    for name, p in PRESETS.items():
        kind = "" if p.kind == "denoiser" else f"[{p.kind}] "
        print(f"{name:<{width}}  {kind}{p.description}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    names = shipped_models()
    if not names:
        print("no shipped models in this installation")
    for name in names:
        meta = json.loads((models_root() / name / "config.json").read_text())
        print(f"{name:<16} {meta.get('description', '')}")
    return 0


def cmd_images(args: argparse.Namespace) -> int:
    """Write images of a data set to files: editing inputs (held-out test images, their low-resolution or stroke
    versions) and .npz sets, without writing any Python."""
    import torch

    if args.data not in DATASETS:
        raise CmkitError(f"unknown data set {args.data!r}; expected one of {', '.join(DATASETS)}")
    suffix = Path(args.out or "").suffix.lower()
    out = check_output(args.out, "-o", args.overwrite, required=True, suffixes=(*IMAGE_SUFFIXES, ".npz"))
    check_int(args.n, "-n")
    check_int(args.index, "--index", minimum=0)
    check_int(args.downsample, "--downsample")
    args.split = args.split or ("test" if args.data in SPLIT_DATASETS else "train")
    data = load_dataset(args.data, args.root or "", args.split)
    start = args.index or 0
    if start + args.n > len(data):
        raise CmkitError(
            f"--index {start} with -n {args.n} needs {start + args.n} images; the {args.split} split of "
            f"{args.data} holds {len(data)}"
        )
    x = from_uint8(data.take(torch.arange(start, start + args.n)).permute(0, 2, 3, 1).numpy())
    labels = data.labels[start : start + args.n] if data.labels is not None else None
    if args.downsample > 1:
        if x.shape[-1] % args.downsample:
            raise CmkitError(f"--downsample {args.downsample} does not divide the {x.shape[-1]}×{x.shape[-2]} images")
        x = torch.nn.functional.avg_pool2d(x, args.downsample)  # the patch averages that `edit superres` keeps
    if args.strokes:
        x = stroke_painting(x)
    if suffix == ".npz":
        save_npz(x, out, labels)
        print(f"wrote {out} ({len(x)} images, {x.shape[-1]}×{x.shape[-2]}, uint8 NHWC)")
        return 0
    check_numbered_outputs(out, len(x), args.overwrite)
    files = save_images(x, out)
    print(
        f"wrote {files[0]}"
        + (f" … {files[-1].name}" if len(files) > 1 else "")
        + f" ({len(x)} image{'s' if len(x) > 1 else ''}, {x.shape[-1]}×{x.shape[-2]})"
    )
    return 0


PREPARE_KINDS = ("cifar10", "folder", "npz")


def cmd_prepare_data(args: argparse.Namespace) -> int:
    """``cmkit prepare-data cifar10 ARCHIVE``: the official archive → the .npz the CIFAR-10 presets read;
    ``folder DIR`` / ``npz FILE``: images → a shard set (``cmkit.shards``) that training reads from disk."""
    if args.dataset not in PREPARE_KINDS:
        raise CmkitError(f"prepare-data knows {', '.join(PREPARE_KINDS)}, not {args.dataset!r}")
    if args.dataset != "cifar10":
        return _prepare_shards(args)
    default = CIFAR10_TRAIN if args.split == "train" else CIFAR10_TRAIN.replace("train", "test")
    out = check_output(args.out or default, "-o", args.overwrite, suffixes=(".npz",))
    n, path = prepare_cifar10(args.source, out, args.split)
    print(f"wrote {path} ({n} CIFAR-10 {args.split} images, 32×32 uint8 NHWC, labels in arr_1)")
    return 0


def _prepare_shards(args: argparse.Namespace) -> int:
    """A folder of images or an .npz → a shard set directory (refusing to replace anything but a shard set)."""
    out = check_output(args.out, "-o", args.overwrite, required=True, directory=True)
    if out.is_dir() and any(out.iterdir()) and not (out / SHARD_INDEX).is_file():
        raise CmkitError(f"{out} holds files that are not a shard set; choose a new or empty directory")
    check_int(args.workers, "--workers", minimum=0)
    if args.dataset == "npz":
        data = load_dataset("npz", args.source)
        labels = data.labels.numpy() if data.labels is not None else None
        shards = shards_from_arrays(out, data.images.numpy(), labels)
    else:
        check_int(args.resolution, "--resolution")
        shards = prepare_folder(
            args.source, out, args.resolution, args.channels, args.crop, args.labels, args.workers, progress=True
        )
    c, h, w = shards.shape
    labelled = f", {shards.num_classes} classes" if shards.num_classes else ", unlabelled"
    print(
        f"wrote {out} ({len(shards):,} images, {w}×{h}×{c} uint8, {len(shards.shards)} shards{labelled}): "
        f"train with data.name=shards data.root={out}"
    )
    return 0


def cmd_convert_lpips(args: argparse.Namespace) -> int:
    """``cmkit convert-lpips``: the lpips package's heads + torchvision's VGG16 → loss.lpips_weights."""
    from safetensors.torch import save_file

    out = check_output(args.out or LPIPS_FILE, "-o", args.overwrite, suffixes=(".safetensors",))
    sd = convert_lpips(args.lpips, args.vgg)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, out)
    print(f"wrote {out} (VGG16-LPIPS, {len(sd)} tensors): pass loss.lpips_weights={out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Resolve a preset of any kind with overrides; --dry-run builds model, loss and optimizer, then prints."""
    overrides = list(args.overrides) + ([f"train.out_dir={args.out}"] if args.out else [])
    overrides += [f"train.num_threads={args.threads}"] if args.threads else []
    if args.resume and args.preset and args.preset != args.default_preset:
        raise CmkitError("give --preset or --resume RUN_DIR, not both (a resumed run keeps its own settings)")
    if args.resume:
        cfg = run_config(args.resume, overrides)
    elif args.preset:
        cfg = get_config(args.preset, overrides)
    else:
        raise CmkitError("give --preset NAME (see `cmkit presets`) or --resume RUN_DIR")
    if args.kind and cfg.kind != args.kind:
        raise CmkitError(
            f"preset {args.preset!r} trains a {cfg.kind}, not the {args.kind} this command trains; "
            f"use `cmkit train --preset {args.preset}`"
        )
    if args.dry_run:
        summary = dry_run(cfg)
        print(cfg.to_json())
        print(summary, file=sys.stderr)
        missing_inputs(cfg, raise_error=True)
        return 0
    missing_inputs(cfg, raise_error=True)
    summary = train(cfg, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun: one summary, from rank 0
        print(json.dumps(summary))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
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
    apply_threads(args.threads)
    if npz is not None:  # streamed in bounded memory, spread over the processes of torchrun
        try:
            s = sample_npz_from_args(args, npz, grid=PREVIEW_IMAGES if out is not None else 0)
            if dist.is_main():
                if out is not None:
                    save_grid(s.images, out)
                    print(f"wrote {out} (the first {len(s.images)} images)")
                print(f"wrote {npz} ({args.n} images, uint8 NHWC)")
        finally:
            dist.cleanup()
        return 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CmkitError("under torchrun, cmkit sample writes --npz FILE.npz (the processes share the work)")
    s = sample_from_args(args)
    save_grid(s.images, out)
    print(f"wrote {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export a run's weights (first EMA by default) of any kind as a compact model directory with its recipe."""
    import os

    import torch

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
    recipe = {
        "run": str(run.root),
        "weights": weights,
        "steps": state["step"],
        "wall_s": state.get("wall_s"),
        "machine": f"{cpu_name()}, {os.cpu_count()} CPUs, train.num_threads={train_cfg['num_threads']}, "
        f"torch {torch.__version__}",
        "note": args.note or "",
    }
    config = _renamed_autoencoder(model.config, args.autoencoder, run.root) if args.autoencoder else model.config
    save_model_dir(
        args.out,
        read_safetensors(file),
        model.kind,
        config,
        {"description": args.description or "", "recipe": recipe},
        dtype=torch.float16 if args.fp16 else None,
    )
    print(f"wrote {args.out} ({model.kind}, {weights}, step {state['step']})")
    return 0


def _renamed_autoencoder(config: dict[str, Any], name: str, run: Path) -> dict[str, Any]:
    """A latent model's config naming the autoencoder ``name`` (e.g. a shipped one) instead of the path it was trained
    with; both must hold the same weights, since the model's latent statistics were measured with them."""
    trained = (config.get("latent") or {}).get("autoencoder")
    if not trained:
        raise CmkitError(f"--autoencoder names a latent model's autoencoder; {run} is not a latent model")
    if not same_autoencoder(trained, name):
        raise CmkitError(
            f"--autoencoder {name} holds other weights than {trained}, the autoencoder {run} was trained with (its "
            "latent statistics hold for that one only); ship the autoencoder in fp32 (cmkit export without --fp16)"
        )
    return {**config, "latent": {**config["latent"], "autoencoder": name}}


def cmd_convert(args: argparse.Namespace) -> int:
    """A released consistency-models checkpoint (openai .pt or diffusers UNet2DModel) → a cmkit model directory."""
    if not args.out:
        raise CmkitError("convert needs an output directory: -o DIR")
    if Path(args.out).exists() and not args.overwrite:
        raise CmkitError(f"{args.out} exists; pass --overwrite to replace it")

    if checkpoint_format(args.src) in ("edm-pickle", "flax-msgpack"):
        return _convert_released_net(args)
    args.precond = args.precond or "cm"
    state, known = read_released(args.src)
    name = args.family or released_name(args.src)
    cfg = Config()
    for key, value in released_model_config(state, known, args.precond, args.image_size).items():
        set_value(cfg, f"model.{key}", value)
    cfg.model.head_channels = attention_head_width(args, known, name, cfg.model)
    cfg.loss.method = "edm" if args.precond == "edm" else "cd"
    cfg.sample.sampler = "heun" if args.precond == "edm" else "onestep"
    if name and args.precond == "cm":  # the published grid and 2-step σ of a released model
        for key, value in released_overrides(name).items():
            set_value(cfg, key, value)
    cfg.model.check()
    return _write_converted(args, cfg, state, "diffusers" if known else "openai-pt")


def attention_head_width(args: argparse.Namespace, known: dict[str, Any], name: str | None, model: Any) -> int:
    """The channels per attention head of a converted ADM: ``--head-channels``, else what the file tells (a
    diffusers config's ``attention_head_dim``; a released checkpoint's name: 64, as ``launch.sh`` trained
    them). An openai ``.pt`` alone cannot tell: its qkv weights are laid out alike for any head width, so a
    wrong guess would convert into a different function; that is refused in one line."""
    width = args.head_channels or known.get("head_channels") or (64 if name else None)
    channels = sorted(
        {
            model.model_channels * m
            for level, m in enumerate(model.channel_mult)
            if model.img_resolution >> level in model.attn_resolutions
        }
        | {model.model_channels * model.channel_mult[-1]}
    )  # the middle block's attention
    if width is None:
        raise CmkitError(
            f"{args.src}: an openai .pt does not record its attention head width (the qkv weights look "
            "the same for any); give --head-channels N (the released checkpoints use 64: "
            "--head-channels 64, or name the file as released, e.g. cd_imagenet64_l2.pt)"
        )
    bad = [c for c in channels if c % width]
    if width < 1 or bad:
        raise CmkitError(
            f"--head-channels {width} does not divide the {bad[0] if bad else channels[0]} channels "
            f"of an attention block (attention widths here: {', '.join(map(str, channels))})"
        )
    return int(width)


def _convert_released_net(args: argparse.Namespace) -> int:
    """An EDM-style pickle (NVlabs/edm, ECT; read without running its code) or a Flax CIFAR-10 checkpoint
    (openai/consistency_models_cifar10; its EMA parameters) → a cmkit model directory."""
    section, state, fmt = read_released_net(args.src, args.precond, args.image_size)
    return _write_converted(args, config_for(section), state, fmt)


def _write_converted(args: argparse.Namespace, cfg: Any, state: dict[str, Any], fmt: str) -> int:
    """Load a converted backbone state into the network ``cfg`` describes and write the model directory."""
    import torch

    model = cfg.model.build()
    m = cfg.model
    load_state(model.net, state, str(args.src), f"the {m.arch} network its shapes describe")
    meta = {
        "description": args.description or f"converted from {Path(args.src).name}",
        "source": {"path": str(args.src), "format": fmt},
    }
    save_model_dir(args.out, model, "denoiser", cfg.to_dict(), meta, dtype=torch.float16 if args.fp16 else None)
    print(
        f"wrote {args.out} ({m.arch} {m.img_resolution}px, {sum(p.numel() for p in model.parameters()):,} "
        f"parameters, {'class-conditional' if m.num_classes else 'unconditional'}, precond {m.precond})"
    )
    return 0


def cmd_export_diffusers(args: argparse.Namespace) -> int:
    """A cmkit ADM consistency model → a diffusers ConsistencyModelPipeline directory."""
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
    s = sub.add_parser(
        name,
        help=help_text,
        description="Train from a preset (see `cmkit presets`). Overrides are key=value with dotted "
        "keys (train.lr=1e-4) or unique bare names (lr=1e-4). Runs go to runs/PRESET "
        "unless train.out_dir or --out is given; train.resume=true continues a run "
        "exactly (only steps, logging, checkpoint intervals, threads may change).",
    )
    s.add_argument(
        "--preset",
        default=default,
        help="preset name (see `cmkit presets`)" + (f"; default {default}" if default else ""),
    )
    s.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR exactly, with its own settings (= its preset and overrides "
        "with train.resume=true); key=value may change only steps, logging, checkpoints, threads",
    )
    s.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    add_output_option(s, help="run directory (same as train.out_dir=...; default runs/PRESET)")
    add_threads_option(s)
    s.add_argument(
        "--dry-run",
        action="store_true",
        help="check the config, build model, loss and optimizer (no data), print the config as JSON",
    )
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_train, kind=kind, default_preset=default)


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


def _add_data_commands(sub: Any) -> None:
    """``images``, ``prepare-data`` and ``convert-lpips``: the files a user needs before training or editing."""
    s = sub.add_parser(
        "images",
        help="write images of a data set to files (e.g. held-out inputs for `cmkit edit`)",
        description="Write images of a data set (the held-out test split by default) as PNG files "
        "of their own size (OUT.png for one image, OUT_0.png, OUT_1.png, ... for several) or as "
        "one .npz (uint8 NHWC, labels in arr_1): inputs for `cmkit edit` and `cmkit "
        "eval`.",
        epilog="examples:\n"
        "  cmkit images fashion_mnist --index 3 -o img.png\n"
        "  cmkit images fashion_mnist -n 16 -o test.npz\n"
        "  cmkit images fashion_mnist --index 3 --downsample 4 -o low7x7.png\n"
        "  cmkit images fashion_mnist --index 3 --strokes -o strokes.png\n"
        "  cmkit images emoji --index 0 -o emoji.png",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("data", metavar="DATA", help="data set: digits, fashion_mnist, mnist, emoji, folder or npz")
    s.add_argument(
        "--split", choices=("test", "train"), help="test (held out; the default where the data set has one) or train"
    )
    s.add_argument("--root", help="data.root of the data set (default: where cmkit looks for it)")
    s.add_argument("--index", type=int, default=0, help="first image (default 0)")
    s.add_argument("-n", type=int, default=1, help="number of images (default 1)")
    s.add_argument(
        "--downsample",
        type=int,
        default=1,
        help="average F×F patches (the low-resolution input of `edit superres --factor F`)",
    )
    s.add_argument(
        "--strokes", action="store_true", help="a coarse stroke painting of each image (the input of `edit stroke`)"
    )
    add_output_option(s, metavar="OUT", help="OUT.png (one file per image) or OUT.npz")
    s.add_argument("--overwrite", action="store_true", help="replace existing output files")
    s.set_defaults(func=cmd_images)
    _add_prepare_data(sub)

    s = sub.add_parser(
        "convert-lpips",
        help="make loss.lpips_weights from the official LPIPS and VGG16 files",
        description="Combine the lpips package's linear heads (weights/v0.1/vgg.pth) and "
        "torchvision's ImageNet VGG16 (vgg16-397923af.pth) into the safetensors file "
        "that loss.lpips_weights takes. Both are read with torch.load(weights_only=True).",
    )
    s.add_argument("--lpips", required=True, metavar="vgg.pth", help="the LPIPS v0.1 VGG heads")
    s.add_argument("--vgg", required=True, metavar="vgg16-397923af.pth", help="torchvision's VGG16 weights")
    add_output_option(s, help="output .safetensors (default data/lpips-vgg16.safetensors)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output")
    s.set_defaults(func=cmd_convert_lpips)


def _add_prepare_data(sub: Any) -> None:
    """``prepare-data``: CIFAR-10's archive → .npz; an image folder or an .npz → a shard set."""
    s = sub.add_parser(
        "prepare-data",
        help="turn downloaded data into the files a preset reads (CIFAR-10's archive, image folders → shards)",
        description="cifar10: the official cifar-10-python.tar.gz (read without running code) → "
        "data/cifar10-train.npz, the cifar10-* presets' data.root. folder: a folder of images (ImageNet's "
        "class subfolders, or LSUN exported as images) → a shard set (uint8 .npy shards and index.json) that "
        "training reads batch by batch from disk (data.name=shards), decoded in parallel and cropped as the "
        "papers did. npz: an .npz of uint8 NHWC images (labels in arr_1) → a shard set.",
        epilog="examples:\n"
        "  cmkit prepare-data cifar10 cifar-10-python.tar.gz\n"
        "  cmkit prepare-data folder ILSVRC2012/train -o data/imagenet64 --resolution 64\n"
        "  cmkit prepare-data folder lsun-bedroom-images -o data/lsun-bedroom --resolution 256 --labels none\n"
        "  cmkit prepare-data npz data/cifar10-train.npz -o data/cifar10-shards",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("dataset", metavar="KIND", help="cifar10, folder or npz")
    s.add_argument("source", metavar="SOURCE", help="the archive (cifar10), the image folder, or the .npz")
    s.add_argument("--split", choices=("train", "test"), default="train", help="cifar10: default train (50,000)")
    add_output_option(s, help="cifar10: output .npz (default data/cifar10-train.npz); folder/npz: the shard set")
    s.add_argument("--resolution", type=int, default=64, help="folder: the side of the square images (default 64)")
    s.add_argument("--channels", type=int, choices=(1, 3), default=3, help="folder: 3 (RGB, default) or 1 (grey)")
    s.add_argument(
        "--crop",
        choices=CROPS,
        default="adm",
        help="folder: adm (ADM's center_crop_arr, as the CM paper's ImageNet-64 and LSUN data; default) or "
        "center (crop the centred square, then resize)",
    )
    s.add_argument(
        "--labels",
        choices=("auto", "subfolders", "none"),
        default="auto",
        help="folder: class labels from the first-level subfolders (auto: when there are at least two)",
    )
    s.add_argument("--workers", type=int, default=0, help="folder: decoding processes (default: one per CPU)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output")
    s.set_defaults(func=cmd_prepare_data)


def build_parser() -> argparse.ArgumentParser:
    """The ``cmkit`` parser: one small function adds each command (or group of commands)."""
    p = Parser(
        prog="cmkit",
        description="Consistency models: train, sample, edit, evaluate.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        _add_listings,
        _add_data_commands,
        _add_train_commands,
        _add_sample,
        _add_convert,
        _add_exports,
        add_eval,
        add_edit,
        add_decoder,
        add_serve,
    ):
        add(sub)
    _add_debug_everywhere(p)
    return p


def _add_listings(sub: Any) -> None:
    """``cmkit presets`` and ``cmkit models``."""
    s = sub.add_parser("presets", help="list the training presets with a one-line description")
    s.set_defaults(func=cmd_presets)
    s = sub.add_parser("models", help="list the models shipped with cmkit")
    s.set_defaults(func=cmd_models)


def _add_train_commands(sub: Any) -> None:
    """``cmkit train`` (any kind of preset) and its two named forms."""
    _add_train(sub, "train", None, None, "train a model from a preset (any kind), with key=value overrides")
    _add_train(
        sub,
        "train-autoencoder",
        "autoencoder",
        "fmnist-ae",
        "train a KL autoencoder (= cmkit train with an autoencoder preset)",
    )
    _add_train(
        sub,
        "train-decoder",
        "decoder",
        "fmnist-cdec",
        "train a consistency decoder for an autoencoder's latents (= cmkit train with a decoder preset)",
    )


def _add_sample(sub: Any) -> None:
    """``cmkit sample``."""
    s = sub.add_parser(
        "sample",
        help="generate images from a trained or shipped model",
        description="Sample a model. Consistency models: --steps 1 (one network evaluation) or "
        "--steps 2, or an explicit descending σ list (--sigmas 80,0.8). Diffusion models: "
        "--sampler heun|euler --steps N (Heun: 2N-1 evaluations).",
    )
    s.add_argument(
        "--model",
        required=True,
        help="model directory, run directory, shipped model name, or a diffusers directory (a DDPM-type UNet and "
        "its scheduler config: sampled in σ-space by Heun/Euler)",
    )
    s.add_argument("-n", type=int, default=64, help="number of images (default 64)")

    add_sampling_options(
        s,
        batch_size=256,
        sigmas_help="comma-separated descending σ values for multistep sampling",
        seed_help="sample i uses seed+i, independent of the batch size",
    )
    add_output_option(s, default="samples.png", help="PNG grid path (default samples.png; '' to skip)")
    s.add_argument(
        "--npz",
        help="write uint8 NHWC samples to this .npz (arr_0; labels in arr_1), streamed in bounded memory; under "
        f"torchrun the processes share the work (then -o shows the first {PREVIEW_IMAGES})",
    )
    s.add_argument("--overwrite", action="store_true", help="replace existing output files")
    add_class_option(s)
    s.set_defaults(func=cmd_sample)


def _add_convert(sub: Any) -> None:
    """``cmkit convert``: released checkpoints → model directories."""
    s = sub.add_parser(
        "convert",
        help="convert released models (OpenAI .pt/diffusers, EDM .pkl, JAX CIFAR-10) to a model directory",
        description="Convert a checkpoint of openai/consistency_models (a .pt state dict, read with "
        "weights_only) or of the diffusers openai/diffusers-* repositories (a UNet2DModel "
        "directory), an EDM-style pickle (NVlabs/edm or ECT .pkl snapshots and training "
        "states, read without running any code from the file), or a Flax checkpoint_N of "
        "openai/consistency_models_cifar10 (its EMA parameters, read without JAX) into a "
        "cmkit model directory that every --model option accepts.",
    )
    s.add_argument(
        "src", help="the .pt/.pkl/checkpoint_N file, or the diffusers directory (holding config.json, or unet/)"
    )
    s.add_argument("-o", "--out", required=True, help="output model directory")
    s.add_argument(
        "--precond",
        choices=("cm", "edm"),
        help="cm for the CD/CT models (boundary condition), edm for the EDM teachers (default cm; an EDM "
        "pickle says which it holds)",
    )
    s.add_argument("--image-size", type=int, help="image side, when the channel_mult does not tell it (JAX: 32)")

    s.add_argument(
        "--family",
        choices=sorted(RELEASED_MODELS),
        help="which released model this is, when the file name does not say (sets its training grid "
        "and the published 2-step σ)",
    )
    s.add_argument(
        "--head-channels",
        type=int,
        metavar="N",
        help="channels per attention head of an openai .pt ADM (its file does not record it; the "
        "released checkpoints, recognised by name, use 64)",
    )
    s.add_argument("--fp16", action="store_true", help="store weights in fp16 (loaded back as fp32)")
    s.add_argument("--description", help="one-line description stored in config.json")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_convert)


def _add_exports(sub: Any) -> None:
    """``cmkit export`` (a run → a model directory) and ``cmkit export-diffusers``."""
    s = sub.add_parser(
        "export-diffusers", help="write an ADM consistency model as a diffusers ConsistencyModelPipeline directory"
    )
    s.add_argument("--model", required=True, help="model directory, run directory or shipped name (model.arch=adm)")
    s.add_argument("-o", "--out", required=True, help="output pipeline directory")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_export_diffusers)

    s = sub.add_parser("export", help="export a run's EMA weights (any kind) as a model directory (optionally fp16)")
    s.add_argument("run", help="training run directory")
    s.add_argument("-o", "--out", required=True, help="output model directory")
    s.add_argument("--weights", help="checkpoint weights to export: ema_RATE (default: first EMA) or model (online)")
    s.add_argument(
        "--head-channels",
        type=int,
        metavar="N",
        help="channels per attention head of an openai .pt ADM (its file does not record it; the "
        "released checkpoints, recognised by name, use 64)",
    )
    s.add_argument("--fp16", action="store_true", help="store weights in fp16 (loaded back as fp32)")
    s.add_argument("--description", help="one-line description stored in config.json")
    s.add_argument("--note", help="free-text note stored in the recipe")
    s.add_argument(
        "--autoencoder",
        metavar="DIR|NAME",
        help="a latent model's autoencoder as the exported config names it (e.g. a shipped name), in place of the "
        "path the run used; it must hold the same weights",
    )
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_export)


def main(argv: list[str] | None = None) -> int:
    """Run ``cmkit``: 0 on success, 2 for a user error (one line), 1 for an unexpected error (one line;
    ``--debug`` re-raises it), 130 when interrupted. ``--help`` still exits through SystemExit(0)."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        # key=value overrides may follow flags (`train --preset X a=1 --dry-run b=2`); anything else is an error
        if (
            extra
            and isinstance(getattr(args, "overrides", None), list)
            and all("=" in v and not v.startswith("-") for v in extra)
        ):
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
    except KeyboardInterrupt as e:  # TrainingInterrupted says where its checkpoint is and how to resume
        print(f"cmkit: interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return getattr(e, "exit_code", 130)
    except BrokenPipeError:  # e.g. `cmkit train ... --dry-run | head`
        return 0
    except Exception as e:  # a bug, not a user error: one line, and the traceback with --debug
        if debug:
            raise
        print(
            f"cmkit: error: {type(e).__name__}: {one_line(e) or '(no message)'} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
