"""``cmkit decode`` and ``cmkit convert-decoder``: argparse subcommands registered by ``add_cli(subparsers)``.

    cmkit decode LATENTS.{npy,pt,safetensors} --weights PATH -o out.png [--steps N | --schedule 1.0,0.5]
                 [--tile 64 --tile-overlap 16] [--dtype bf16] [--seed 0] [--latents auto|raw|scaled] [--threads N]
    cmkit convert-decoder SRC -o OUT_DIR [--dtype fp16] [--no-verify] [--threads N]

``decode`` turns SD-1.x/2.x VAE latents (or the latents of a cmkit autoencoder) into images with a consistency
decoder; ``convert-decoder`` rewrites OpenAI's decoder.pt or diffusers safetensors as a cmkit decoder directory
(config.json + model.safetensors), optionally cast. ``-o/--out`` names the output (``--output`` is still
accepted). Each handler returns an exit status and raises ``CmkitError`` (one line) for user errors.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from ..decoder.config import DecoderConfig
from ..decoder.decoder import ConsistencyDecoder
from ..decoder.files import read_latents, write_images
from ..decoder.latents import check_latents, resolve_scaled
from ..decoder.schedule import DTYPES, MAX_DECODE_STEPS, parse_schedule, steps_to_schedule
from ..decoder.weights import convert_decoder
from ..errors import CmkitError, optional_import
from ..files import read_json
from ..imageio import from_uint8, read_image, read_npz_images
from ..inputs import (
    apply_threads,
    check_device,
    check_int,
    check_numbered_outputs,
    check_output,
    check_seed,
    check_threads,
)
from ..latent import pad_images
from ..nets.autoencoder import KLAutoencoder
from .options import add_device_option, add_output_option, add_threads_option


def resolve_schedule(args: argparse.Namespace) -> tuple[float, ...]:
    if args.schedule is not None and args.steps is not None:
        raise CmkitError("give either --steps or --schedule, not both")
    if args.schedule is not None:
        return parse_schedule(args.schedule)
    check_int(args.steps, "--steps", maximum=MAX_DECODE_STEPS)
    return steps_to_schedule(args.steps if args.steps is not None else 2)


def run_decode(args: argparse.Namespace) -> int:
    """Handler of ``cmkit decode``."""
    schedule = resolve_schedule(args)
    check_threads(args.threads)
    device = check_device(args.device)
    check_seed(args.seed)
    check_int(args.tile, "--tile")
    if args.tile_overlap is not None:
        check_int(args.tile_overlap, "--tile-overlap", minimum=0)
        if args.tile is None:
            raise CmkitError("--tile-overlap needs --tile")
        if args.tile_overlap >= args.tile:
            raise CmkitError(f"--tile-overlap {args.tile_overlap} must be smaller than --tile {args.tile}")
    check_output(args.out, "-o", True, required=True, suffixes=(".png",))  # a writable .png path; which files next
    apply_threads(args.threads)
    latents = read_latents(args.latents)
    if latents.ndim != 4:
        check_latents(latents, DecoderConfig())  # fail fast (3-D input), before loading 2.5 GB of weights
    # a batch: OUT_0.png, OUT_1.png, ...
    check_numbered_outputs(args.out, 1 if args.grid else latents.shape[0], getattr(args, "overwrite", False))
    decoder = ConsistencyDecoder.from_pretrained(
        args.weights,
        device=device,
        dtype=DTYPES[args.dtype],
        channels_last=not args.no_channels_last,
        verify=not args.no_verify,
    )
    check_latents(latents, decoder.config)
    scaled = resolve_scaled(latents, args.latents_mode, decoder.config.scaling_factor)
    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    images = decoder.decode(
        latents,
        schedule,
        generator,
        clamp=not args.no_clamp,
        tile=args.tile,
        tile_overlap=args.tile_overlap,
        scaled=scaled,
    )
    seconds = time.perf_counter() - start
    paths = write_images(images, args.out, grid=args.grid)
    print(
        f"decoded {tuple(latents.shape)} -> {tuple(images.shape)} with t={decoder.timesteps(schedule)} "
        f"in {seconds:.1f}s; wrote {', '.join(map(str, paths))}"
    )
    return 0


def run_convert(args: argparse.Namespace) -> int:
    """Handler of ``cmkit convert-decoder``."""
    check_output(args.out, "-o", getattr(args, "overwrite", False), required=True, directory=True)
    apply_threads(args.threads)
    out = convert_decoder(
        args.src, args.out, dtype=DTYPES[args.dtype] if args.dtype else None, verify=not args.no_verify
    )
    print(f"wrote {out}/model.safetensors and {out}/config.json")
    return 0


def _add_decode(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "decode",
        help="decode SD latents to images with the consistency decoder",
        description="Decode latents to images with a consistency decoder: OpenAI's (raw "
        "SD-1.x/2.x VAE latents) or one trained by cmkit.",
    )
    p.add_argument("latents", help="latent file (.npy, .pt, .safetensors) of shape (B, 4, h, w)")
    p.add_argument("--weights", required=True, help="decoder.pt, diffusers safetensors (file or dir) or cmkit dir")
    add_output_option(
        p, required=True, metavar="OUT.png", output_alias=True, help="output .png (batches: OUT_0.png, OUT_1.png, ...)"
    )
    p.add_argument("--steps", type=int, default=None, help="number of steps (default 2: t = 1008, 512)")
    p.add_argument("--schedule", default=None, help="explicit fractions, e.g. 1.0,0.5 (OpenAI's default)")
    p.add_argument("--tile", type=int, default=None, help="latent tile side for bounded memory (e.g. 64)")
    p.add_argument("--tile-overlap", type=int, default=None, help="latent overlap of tiles (default tile/4)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="network precision (default fp32)")
    add_device_option(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the decoder's noise (default 0)")
    add_threads_option(p)
    p.add_argument(
        "--latents",
        dest="latents_mode",
        choices=("auto", "raw", "scaled"),
        default="auto",
        help="raw VAE latents (OpenAI's convention), already scaled by 0.18215, or auto-detect",
    )
    p.add_argument("--no-clamp", action="store_true", help="do not clamp x0 estimates (diffusers' behaviour)")
    p.add_argument("--no-channels-last", action="store_true", help="keep NCHW convolutions")
    p.add_argument("--no-verify", action="store_true", help="skip the SHA-256 check of OpenAI's decoder.pt")
    p.add_argument("--grid", action="store_true", help="write a batch as one grid image")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.set_defaults(func=run_decode)


def _add_convert(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "convert-decoder",
        help="convert consistency decoder weights to cmkit's format",
        description="Convert diffusers safetensors or OpenAI's decoder.pt to "
        "cmkit's format (config.json + model.safetensors).",
    )
    p.add_argument("src", help="decoder.pt, diffusers safetensors (file or dir) or a cmkit dir")
    add_output_option(
        p,
        required=True,
        metavar="OUT_DIR",
        output_alias=True,
        help="output directory (config.json + model.safetensors)",
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast weights (default: keep)")
    p.add_argument("--no-verify", action="store_true", help="skip the SHA-256 check of OpenAI's decoder.pt")
    add_threads_option(p)
    p.add_argument("--overwrite", action="store_true", help="replace the files of an existing output directory")
    p.set_defaults(func=run_convert)


def load_encoder(path: str, device: str) -> tuple[Any, int, Any]:
    """(encode function x → raw latents, image channels, its name) of a cmkit autoencoder (a model directory,
    a run, or its ``model/``) or of a diffusers ``AutoencoderKL`` directory (Stable Diffusion's VAE: a ``vae/``
    folder, or a pipeline holding one; latents are the posterior mean, unscaled, as ``cmkit decode`` reads)."""
    from pathlib import Path

    root = Path(path).expanduser()
    vae_dir = root / "vae" if (root / "vae" / "config.json").is_file() else root
    config = read_json(vae_dir / "config.json", "model config") if (vae_dir / "config.json").is_file() else {}
    if isinstance(config, dict) and config.get("_class_name") == "AutoencoderKL":
        diffusers = optional_import("diffusers", "diffusers", "encoding with a diffusers AutoencoderKL")
        vae = diffusers.AutoencoderKL.from_pretrained(str(vae_dir)).to(device).eval().requires_grad_(False)
        return (lambda x: vae.encode(x).latent_dist.mean), int(vae.config.in_channels), f"AutoencoderKL {vae_dir}"
    ae = KLAutoencoder.from_pretrained(root, device=device)
    return ae.encode, ae.config.in_channels, f"autoencoder {root}"


def run_encode(args: argparse.Namespace) -> int:
    """Handler of ``cmkit encode``: images → raw latents in a file that ``cmkit decode`` reads."""
    from pathlib import Path

    import numpy as np

    check_threads(args.threads)
    device = check_device(args.device)
    out = check_output(args.out, "-o", args.overwrite, required=True, suffixes=(".npy", ".pt", ".safetensors"))
    src = Path(args.images)
    if not src.is_file():
        raise CmkitError(f"input image not found: {src}")
    apply_threads(args.threads)
    encode, channels, name = load_encoder(args.autoencoder, device)
    if src.suffix.lower() == ".npz":
        a = read_npz_images(src, "input images", square=False)
    else:
        a = read_image(src, "L" if channels == 1 else "RGB", "input image")[None]
    if a.ndim == 3:  # grey: NHW → NHWC
        a = a[..., None]
    if args.pad_to:
        check_int(args.pad_to, "--pad-to")
        a = pad_images(torch.from_numpy(a.copy()).permute(0, 3, 1, 2), args.pad_to).permute(0, 2, 3, 1).numpy()
    x = from_uint8(a)
    if x.shape[1] != channels:  # grey ↔ RGB as Pillow converts
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x.mean(1, keepdim=True)
    with torch.no_grad():
        z = encode(x.contiguous().to(device)).float().cpu()
    if out.suffix == ".npy":
        np.save(out, z.numpy())
    elif out.suffix == ".pt":
        torch.save(z, out)
    else:
        from safetensors.torch import save_file

        save_file({"latents": z.contiguous()}, out)
    print(f"encoded {tuple(x.shape)} -> {tuple(z.shape)} raw latents with the {name}; wrote {out}")
    return 0


def _add_encode(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "encode",
        help="encode images to latents with an autoencoder (cmkit's or SD's VAE)",
        description="Encode images to raw latents (the posterior mean) with a cmkit "
        "autoencoder or a diffusers AutoencoderKL directory (Stable Diffusion's "
        "vae/, needs diffusers); `cmkit decode` reads the file.",
    )
    p.add_argument(
        "images",
        help="an image (.png/.jpg) or an .npz of uint8 NHWC images; sides divisible by the "
        "autoencoder's downsampling factor",
    )
    p.add_argument(
        "--autoencoder",
        required=True,
        help="cmkit autoencoder (model or run directory) or a diffusers AutoencoderKL directory",
    )
    add_output_option(p, required=True, metavar="OUT.npy", help="latent file: .npy, .pt or .safetensors")
    p.add_argument(
        "--pad-to",
        type=int,
        metavar="N",
        help="pad the images, centred on black, to N×N first (as "
        "an autoencoder trained on padded images saw them: "
        "fmnist-ae, 28 → 32)",
    )
    add_device_option(p)
    add_threads_option(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=run_encode)


def add_cli(subparsers: Any) -> None:
    """Register ``encode``, ``decode`` and ``convert-decoder`` on an argparse subparsers object."""
    _add_encode(subparsers)
    _add_decode(subparsers)
    _add_convert(subparsers)
