"""``cmkit eval``: FD, KID and precision/recall of samples against a reference, with the real-vs-real floor; with
``--features inception`` also the Inception Score and sFID of the ADM evaluator (the CM paper's numbers).

Registered on the main parser by ``add_cli(subparsers)``. The handler only parses and prints; the work is done
by :func:`cmkit.metrics.evaluate.evaluate_images`, so other sources of images (e.g. ``--model``) can reuse it.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from .. import distributed as dist
from ..errors import CmkitError
from ..imageio import to_uint8
from ..inputs import (
    MAX_BATCH,
    MAX_IMAGES,
    MAX_STEPS,
    apply_threads,
    check_device,
    check_int,
    check_model_arg,
    check_output,
    check_seed,
    check_threads,
    parse_sigmas,
)
from ..metrics.evaluate import FEATURE_SPACES, evaluate_images, extractor_class
from ..metrics.frechet import require_scipy
from ..metrics.images import load_images_npz
from ..metrics.reference import read_reference_npz
from .options import (
    add_class_option,
    add_output_option,
    add_sampling_options,
    sample_from_args,
    sample_npz_from_args,
)

MAX_KID_SUBSETS = 10_000  # the reference code uses 100
_ROWS = (("fd", "FD"), ("kid", "KID"), ("precision", "precision"), ("recall", "recall"))
_INCEPTION_ROWS = (("inception_score", "IS"), ("sfid", "sFID"))


def add_cli(subparsers: Any) -> None:
    """Register the ``eval`` subcommand on an argparse subparsers object."""
    p = subparsers.add_parser(
        "eval",
        help="FD, KID, precision/recall of samples against a reference",
        description="Fréchet distance, KID and precision/recall (k=3) of samples against a reference set, "
        "with the real-vs-real floor (Fashion-MNIST train vs test) beside them; with --features "
        "inception also the Inception Score and sFID, as OpenAI's evaluator (evaluations/evaluator.py) "
        "reports them, e.g. --ref VIRTUAL_imagenet64_labeled.npz.",
    )
    p.add_argument("--samples", metavar="S.npz", help="samples as uint8 NHWC images under arr_0")
    p.add_argument(
        "--ref",
        default="fmnist-test",
        metavar="R.npz|fmnist-test|fmnist-train",
        help="reference: an .npz of images (arr_0), of statistics (mu, sigma[, mu_s, sigma_s, "
        "features]) or both (OpenAI's reference batches), or a Fashion-MNIST split "
        "(default: fmnist-test)",
    )
    p.add_argument(
        "--features",
        choices=FEATURE_SPACES,
        default="fmnist",
        help="feature space: the shipped Fashion-MNIST classifier (reported as 'FD (Fashion-MNIST "
        "classifier features)') or the FID Inception (reported as 'FID'); default fmnist",
    )
    p.add_argument(
        "--inception-weights",
        metavar="PATH",
        default=None,
        help="pt_inception-2015-12-05-6726825d.pth (or set CMKIT_INCEPTION_WEIGHTS)",
    )
    add_output_option(p, metavar="results.json", help="also write the results as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace an existing -o file")
    p.add_argument("--no-floor", action="store_true", help="skip the real-vs-real floor")
    p.add_argument("--data-root", default=None, help="folder with the Fashion-MNIST IDX .gz files")
    p.add_argument("--kid-subsets", type=int, default=100, help="number of KID subsets (default 100)")
    g = p.add_argument_group("sampling from a model (instead of --samples)")
    g.add_argument("--model", help="model directory, run directory or shipped model name")
    g.add_argument("-n", type=int, default=10_000, help="number of samples (default 10000)")
    # --device and --threads land on the main parser: they also govern feature extraction
    add_sampling_options(
        p,
        group=g,
        batch_size=500,
        steps_help="sampling steps (consistency: 1, 2, ...; Heun: levels)",
        sigmas_help="explicit descending σ list for multistep sampling, e.g. 80,0.8",
        seed_help="sample i uses seed+i (default 0)",
    )
    add_class_option(g)
    p.set_defaults(func=run_eval_cli)


FMNIST_REFS = ("fmnist-test", "fmnist-train")


def check_eval_args(args: argparse.Namespace) -> None:
    """Everything ``cmkit eval`` can check before extracting features or sampling (one line each); the samples
    file is read (and checked) next, by :func:`run_eval_cli`."""
    if args.model is None and not args.samples:
        raise CmkitError("cmkit eval: give --samples S.npz (uint8 NHWC images under arr_0) or --model M to sample")
    check_threads(args.threads)
    args.device = check_device(args.device)
    check_output(args.out, "-o", getattr(args, "overwrite", False), example="results.json")
    check_int(args.kid_subsets, "--kid-subsets", maximum=MAX_KID_SUBSETS)
    if args.inception_weights is not None and not Path(args.inception_weights).expanduser().is_file():
        raise CmkitError(f"--inception-weights: file not found: {args.inception_weights}")
    if args.data_root is not None and not Path(args.data_root).expanduser().is_dir():
        raise CmkitError(f"--data-root {args.data_root} is not a directory (expected the Fashion-MNIST IDX files)")
    if str(args.ref) not in FMNIST_REFS:
        ref = Path(args.ref).expanduser()
        if not ref.is_file():
            raise CmkitError(f"reference file not found: {ref} (give an .npz, {' or '.join(FMNIST_REFS)})")
        _check_reference_npz(ref, args.features)
    if args.model is not None:
        if args.samples:
            raise CmkitError("give either --samples or --model, not both")
        check_model_arg(args.model)
        check_int(args.n, "-n", maximum=MAX_IMAGES)
        check_int(args.batch_size, "--batch-size", maximum=MAX_BATCH)
        check_int(args.steps, "--steps", maximum=MAX_STEPS)
        check_seed(args.seed, count=args.n)
        if args.sigmas:
            parse_sigmas(args.sigmas)


def _check_reference_npz(path: Path, features: str = "fmnist") -> None:
    """A reference .npz with images (arr_0) and/or statistics of the shapes of the ``features`` space, checked
    before any sampling or feature extraction (images by their header only)."""
    cls = extractor_class(features)
    read_reference_npz(path, cls.dim, cls.extra_dims.get("spatial"), cls.name, images=False)


def run_eval_cli(args: argparse.Namespace) -> int:
    """``cmkit eval``: samples from --samples, or generated from --model with the chosen sampler."""
    require_scipy()  # before any sampling: a core install says which extra to add, at once
    check_eval_args(args)
    apply_threads(args.threads)
    if args.model is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _run_eval_distributed(args)
    if args.model is not None:
        return run_eval(args, to_uint8(sample_from_args(args).images))
    return run_eval(args, load_images_npz(args.samples) if args.samples else None)


def _run_eval_distributed(args: argparse.Namespace) -> int:
    """Under torchrun: every process draws its share of the samples into one streamed .npz beside ``-o`` (or in
    the working directory), then rank 0 evaluates it; the file is removed afterwards."""
    port = os.environ.get("MASTER_PORT", "0")
    npz = Path(f"{args.out}.samples.npz" if args.out else f"cmkit-eval-samples-{port}.npz").expanduser()
    try:
        sample_npz_from_args(args, npz)
        code = run_eval(args, load_images_npz(npz)) if dist.is_main() else 0
    finally:
        if dist.is_main():
            npz.unlink(missing_ok=True)
        dist.cleanup()
    return code


def format_results(result: dict[str, Any]) -> str:
    """A small table: the samples' metrics and the real-vs-real floor side by side."""
    floor = result.get("floor")
    head = (
        f"{result['label']}  |  reference {result['reference']} ({result['n_reference']} images)  |  "
        f"{result['n_samples']} samples"
    )
    lines = [head, f"{'':<10} {'samples':>22} {'real-vs-real floor':>22}"]

    def cell(r: dict[str, Any] | None, key: str) -> str:
        if r is None:
            return "n/a"
        if key == "kid":
            return "n/a" if r["kid_mean"] is None else f"{r['kid_mean']:.5f} ± {r['kid_std']:.5f}"
        return "n/a" if r.get(key) is None else f"{r[key]:.4f}"

    rows = _ROWS + (_INCEPTION_ROWS if result.get("feature_space") == "inception" else ())
    for key, name in rows:
        lines.append(f"{name:<10} {cell(result, key):>22} {cell(floor, key):>22}")
    if floor is not None:
        lines.append(f"floor: {floor['description']}")
    else:
        lines.append("floor: n/a (defined for the fmnist-test and fmnist-train references)")
    if result["kid_mean"] is None:
        lines.append("KID and precision/recall need reference features (the reference .npz holds only mu/sigma)")
    if result.get("feature_space") == "inception" and result.get("sfid") is None:
        lines.append("sFID needs the reference's spatial statistics (mu_s, sigma_s) or its images (arr_0)")
    return "\n".join(lines)


def run_eval(args: argparse.Namespace, images: Any = None) -> int:
    """Handler of ``cmkit eval``: load the samples (or take ``images``), evaluate, print, write JSON."""
    if images is None:
        if not getattr(args, "samples", None):
            raise CmkitError("cmkit eval: give --samples S.npz (uint8 NHWC images under arr_0)")
        images = load_images_npz(args.samples)
    result = evaluate_images(
        images,
        args.ref,
        args.features,
        inception_weights=args.inception_weights,
        floor=not args.no_floor,
        data_root=args.data_root,
        device=args.device,
        kid_subsets=args.kid_subsets,
    )
    print(format_results(result))
    if args.out:
        out = Path(args.out)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=2) + "\n")
        except OSError as e:
            raise CmkitError(f"cannot write {out}: {e.strerror or e}") from None
        print(f"wrote {out}")
    return 0
