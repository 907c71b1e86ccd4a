"""Consistency Decoder speed and memory: cmkit vs diffusers, untiled and tiled (a benchmark, not a test).

Every measurement runs in a fresh subprocess (so the peaks of one do not hide another's): the worker
builds the network with random weights (the same ones for cmkit and diffusers), records its RSS, then
decodes while a thread samples the RSS every 5 ms (``/proc/self/statm``); ``ru_maxrss`` is reported too.
"extra peak" = peak RSS during decoding − RSS after building, i.e. activation memory (reference doc §3.3).

    .venv/bin/python benchmarks/decoder_speed.py     # full size: 256², 512², tiled 256²–1024² (~1.5 h on 2 cores)
    .venv/bin/python benchmarks/decoder_speed.py --repeats 1 --no-fidelity   # the same, ~50 min
    .venv/bin/python benchmarks/decoder_speed.py --repeats 1 --no-fidelity --tiled-schedule 1.0   # ~35 min
    .venv/bin/python benchmarks/decoder_speed.py --quick    # reduced width and sizes (~2 min), to check it works

Peak memory of a tiled decode does not depend on the number of steps (every step decodes the tiles one at
a time), so ``--tiled-schedule 1.0`` measures the same peaks in half the time; the steps column says so.

Writes ``benchmarks/results/decoder_speed.md`` and ``.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = os.sysconf("SC_PAGE_SIZE")
MiB = 1 << 20
FULL_WIDTHS = (320, 640, 1024, 1024)
QUICK_WIDTHS = (64, 128, 192, 192)


# --- worker (one measurement per process) ----------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """Samples the process RSS every ``interval`` seconds in a thread; ``.peak`` is the maximum seen."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self._stop = interval, rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def build_cmkit(spec: dict):
    import torch

    from cmkit.decoder.config import DecoderConfig
    from cmkit.decoder.decoder import ConsistencyDecoder
    from cmkit.decoder.testing import randomize_

    dec = ConsistencyDecoder(DecoderConfig(block_out_channels=tuple(spec["widths"])))
    randomize_(dec.unet, spec["seed"])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[spec["dtype"]]
    dec.prepare(dtype=dtype, channels_last=spec["layout"] == "channels_last")

    def decode(z, seed):
        return dec.decode(
            z,
            spec["schedule"],
            torch.Generator().manual_seed(seed),
            tile=spec.get("tile"),
            tile_overlap=spec.get("tile_overlap"),
        )

    return decode


def build_diffusers(spec: dict):
    """``ConsistencyDecoderVAE`` with cmkit's random decoder weights (identical names), encoder left unused."""
    import torch
    from diffusers import ConsistencyDecoderVAE
    from diffusers.schedulers import ConsistencyDecoderScheduler

    from cmkit.decoder.config import DecoderConfig
    from cmkit.decoder.testing import randomize_
    from cmkit.decoder.unet import DecoderUNet

    with torch.device("meta"):
        vae = ConsistencyDecoderVAE(decoder_block_out_channels=tuple(spec["widths"]))
    unet = randomize_(DecoderUNet(DecoderConfig(block_out_channels=tuple(spec["widths"]))), spec["seed"])
    vae.decoder_unet.load_state_dict(unet.state_dict(), assign=True)
    del unet
    vae.encoder.to_empty(device="cpu")
    vae.quant_conv.to_empty(device="cpu")
    vae.means = torch.tensor([0.38862467, 0.02253063, 0.07381133, -0.0171294])[None, :, None, None]
    vae.stds = torch.tensor([0.9654121, 1.0440036, 0.76147926, 0.77022034])[None, :, None, None]
    vae.decoder_scheduler = ConsistencyDecoderScheduler()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[spec["dtype"]]
    vae = vae.to(dtype).eval()

    def decode(z, seed):
        return vae.decode(z.to(dtype), generator=torch.Generator().manual_seed(seed)).sample

    return decode


def tiling_difference(spec: dict) -> dict:
    """|tiled − untiled| for the same weights, latents and generator seed (cmkit, fp32)."""
    import torch

    from cmkit.decoder.testing import raw_latents

    decode = build_cmkit({**spec, "tile": None})
    z = raw_latents(1, spec["res"] // 8, spec["res"] // 8, seed=0)
    with torch.inference_mode():
        ref = decode(z, 0)
        tiled = build_cmkit(spec)(z, 0)
    d = (tiled - ref).abs()
    return {
        "wall_s": [0.0],
        "max_abs_diff": d.max().item(),
        "mean_abs_diff": d.mean().item(),
        "rmse": d.pow(2).mean().sqrt().item(),
        "weights_mib": 0.0,
        "extra_peak_mib": 0.0,
        "ru_maxrss_mib": 0.0,
    }


def worker(spec: dict) -> dict:
    import gc

    import torch

    from cmkit.decoder.testing import raw_latents

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if spec["task"] == "tiling-diff":
        return {**tiling_difference(spec), "threads": torch.get_num_threads()}
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    decode = (build_cmkit if spec["impl"] == "cmkit" else build_diffusers)(spec)
    build_s = time.perf_counter() - t0
    gc.collect()
    rss_built = rss_bytes()
    z = raw_latents(1, spec["res"] // 8, spec["res"] // 8, seed=0)
    walls, peak = [], 0
    with torch.inference_mode():
        for i in range(spec["warmup"] + spec["repeats"]):
            with PeakRSS() as mon:
                t = time.perf_counter()
                out = decode(z, i)
                wall = time.perf_counter() - t
            if i >= spec["warmup"]:
                walls.append(wall)
                peak = max(peak, mon.peak)
            del out
            gc.collect()
    return {
        "build_s": build_s,
        "wall_s": walls,
        "weights_mib": (rss_built - rss0) / MiB,
        "rss_after_build_mib": rss_built / MiB,
        "peak_rss_mib": peak / MiB,
        "extra_peak_mib": (peak - rss_built) / MiB,
        "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
    }


# --- driver ------------------------------------------------------------------------------------------------


def measure(spec: dict) -> dict:
    """Run one spec in a fresh interpreter and return its measurements merged into the spec."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, env=env, cwd=ROOT
    )
    if proc.returncode != 0:
        return {**spec, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return {**spec, **json.loads(proc.stdout.strip().splitlines()[-1])}


def plan(args: argparse.Namespace) -> list[dict]:
    widths = QUICK_WIDTHS if args.quick else FULL_WIDTHS
    base = {
        "widths": list(widths),
        "seed": 0,
        "schedule": [1.0, 0.5],
        "warmup": args.warmup,
        "repeats": args.repeats,
        "threads": args.threads,
    }
    specs = []
    for res in args.sizes:
        for impl, dtype, layout in [
            ("diffusers", "fp32", "nchw"),
            ("cmkit", "fp32", "channels_last"),
            ("cmkit", "fp32", "nchw"),
            ("diffusers", "bf16", "nchw"),
            ("cmkit", "bf16", "channels_last"),
        ]:
            secondary = dtype == "bf16" or layout == "nchw" and impl == "cmkit"
            if impl == "diffusers" and args.skip_diffusers or secondary and res != args.sizes[0]:
                continue  # bf16 and cmkit-NCHW rows only at the first size
            specs.append({**base, "task": "decode", "impl": impl, "dtype": dtype, "layout": layout, "res": res})
    for res in args.tiled_sizes:
        specs.append(
            {
                **base,
                "task": "tiled",
                "impl": "cmkit",
                "dtype": "fp32",
                "layout": "channels_last",
                "res": res,
                "tile": args.tile,
                "tile_overlap": args.tile_overlap,
                "repeats": 1,
                "schedule": list(args.tiled_schedule),
            }
        )
    bigger = [r for r in args.tiled_sizes if r > 8 * args.tile]
    if args.fidelity and bigger:
        specs.append(
            {
                **base,
                "task": "tiling-diff",
                "impl": "cmkit",
                "dtype": "fp32",
                "layout": "channels_last",
                "res": bigger[0],
                "tile": args.tile,
                "tile_overlap": args.tile_overlap,
                "repeats": 1,
            }
        )
    return specs


def summarize(results: list[dict], args: argparse.Namespace) -> str:
    import torch

    from cmkit.distributed import cpu_name

    try:
        import diffusers

        dv = diffusers.__version__
    except ImportError:
        dv = "not installed"
    mode = "QUICK (reduced width and sizes; not the full-size benchmark)" if args.quick else "full size"
    lines = [
        "# Consistency Decoder: decode speed and memory",
        "",
        f"Mode: **{mode}**. Network widths {results[0]['widths'] if results else '-'}"
        f" ({'621,277,702 parameters' if not args.quick else 'reduced'}), random weights, batch 1, "
        f"schedule (1.0, 0.5) = 2 steps unless the steps column says otherwise, `torch.inference_mode()`.",
        f"Machine: {cpu_name()}, {os.cpu_count()} CPUs; torch {torch.__version__}, "
        f"diffusers {dv}, Python {platform.python_version()}; {time.strftime('%Y-%m-%d %H:%M')}.",
        f"Load average (1 min) before/after: {args.load_before:.2f} / {os.getloadavg()[0]:.2f} "
        "(other processes on the CPU make timings noisy). Threads: "
        f"{results[0].get('threads', '-') if results else '-'}.",
        "Each row is a fresh process; extra peak = peak RSS while decoding − RSS after building (sampled every 5 ms).",
        "",
        "| task | impl | dtype | layout | image | tile | steps | wall best (s) | wall mean (s) | weights (MiB) "
        "| extra peak (MiB) | ru_maxrss (MiB) | time vs diffusers |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ref = {(r["res"], r["dtype"]): min(r["wall_s"]) for r in results if r.get("impl") == "diffusers" and "wall_s" in r}
    diffs = [r for r in results if r.get("task") == "tiling-diff" and "error" not in r]
    for r in results:
        if r.get("task") == "tiling-diff":
            continue
        if "error" in r:
            lines.append(
                f"| {r['task']} | {r['impl']} | {r['dtype']} | {r['layout']} | {r['res']}² | - | "
                f"{len(r['schedule'])} | error: {r['error'][:80]} | | | | | |"
            )
            continue
        best, mean = min(r["wall_s"]), sum(r["wall_s"]) / len(r["wall_s"])
        ratio = ref.get((r["res"], r["dtype"]))
        ratio_s = f"{best / ratio:.2f}×" if ratio and r["impl"] == "cmkit" and r["task"] == "decode" else ""
        tile = f"{r['tile']}/{r['tile_overlap']} lat" if r.get("tile") else "-"
        lines.append(
            f"| {r['task']} | {r['impl']} | {r['dtype']} | {r['layout']} | {r['res']}² | {tile} | "
            f"{len(r['schedule'])} | {best:.2f} | "
            f"{mean:.2f} | {r['weights_mib']:.0f} | {r['extra_peak_mib']:.0f} | {r['ru_maxrss_mib']:.0f} | "
            f"{ratio_s} |"
        )
    for r in diffs:
        lines += [
            "",
            f"Tiled vs untiled decode at {r['res']}² (tile {r['tile']}, overlap {r['tile_overlap']} latents, "
            f"same weights, latents and noise; random weights): max |Δ| = {r['max_abs_diff']:.4f}, "
            f"mean |Δ| = {r['mean_abs_diff']:.4f}, RMSE = {r['rmse']:.4f} (images in [−1, 1]).",
        ]
    lines += [
        "",
        "Ratio = cmkit best wall time / diffusers best wall time at the same size and dtype (< 1: cmkit faster).",
        "Tiled rows: tile side / overlap in latents (×8 pixels); their extra peak should not grow with the image.",
        "diffusers' weights column includes the SD encoder of ConsistencyDecoderVAE (34M parameters, unused by "
        "decode).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="reduced width (64..192) and sizes, 1 thread")
    p.add_argument("--sizes", type=int, nargs="*", default=None, help="untiled image sides (default 256 512)")
    p.add_argument("--tiled-sizes", type=int, nargs="*", default=None, help="tiled image sides (default 256 512 1024)")
    p.add_argument("--tile", type=int, default=None, help="latent tile side (default 32 = 256 px)")
    p.add_argument("--tile-overlap", type=int, default=None, help="latent overlap (default tile/4)")
    p.add_argument(
        "--tiled-schedule",
        type=float,
        nargs="+",
        default=[1.0, 0.5],
        help="schedule of the tiled rows (default 1.0 0.5; peak memory does not depend on it)",
    )
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's choice; 1 with --quick, robust on a shared CPU)",
    )
    p.add_argument("--skip-diffusers", action="store_true")
    p.add_argument(
        "--no-fidelity",
        dest="fidelity",
        action="store_false",
        help="skip the tiled-vs-untiled difference (two more decodes at the smallest tiled size > tile)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    args.sizes = args.sizes if args.sizes is not None else ([64, 128] if args.quick else [256, 512])
    args.tiled_sizes = (
        args.tiled_sizes if args.tiled_sizes is not None else ([64, 128, 256] if args.quick else [256, 512, 1024])
    )
    args.tile = args.tile or (8 if args.quick else 32)
    args.tile_overlap = args.tile_overlap if args.tile_overlap is not None else args.tile // 4
    args.repeats = args.repeats or 2
    args.threads = args.threads if args.threads is not None else (1 if args.quick else 0)
    try:
        import diffusers  # noqa: F401
    except ImportError:
        print("diffusers is not installed: measuring cmkit only", file=sys.stderr)
        args.skip_diffusers = True
    args.load_before = os.getloadavg()[0]
    results = []
    for spec in plan(args):
        r = measure(spec)
        results.append(r)
        if "error" in r:
            shown = "error: " + r["error"]
        elif spec["task"] == "tiling-diff":
            shown = f"tiled vs untiled: max {r['max_abs_diff']:.4f} mean {r['mean_abs_diff']:.4f}"
        else:
            shown = f"best {min(r['wall_s']):.2f}s extra {r['extra_peak_mib']:.0f} MiB"
        print(
            f"{spec['task']:6s} {spec['impl']:9s} {spec['dtype']} {spec['layout']:13s} {spec['res']}²: {shown}",
            flush=True,
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decoder_speed.json").write_text(json.dumps({"quick": args.quick, "results": results}, indent=2) + "\n")
    (args.out / "decoder_speed.md").write_text(summarize(results, args))
    print(f"wrote {args.out / 'decoder_speed.md'} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
