"""What a full-size training step costs, per paper network and method, and what each paper recipe would cost on GPUs
(a benchmark, not a test).

For each paper network (CIFAR-10 NCSN++ and DDPM++, ImageNet-64 ADM, LSUN-256 ADM) at its exact size and each
method's training step (EDM; CD with its Heun teacher; CT, iCT, ECT; sCT and sCD with the JVP; MeanFlow where the
network takes two times), in a fresh process each:

* parameters; FLOPs per image of one step (loss forward and backward, the teacher, target and JVP passes included),
  counted by ``torch.utils.flop_counter.FlopCounterMode``;
* CPU time and extra peak memory per image at a small batch (peak RSS during the step − RSS before it, sampled
  every 5 ms), with and without activation checkpointing (``model.checkpointing``);
* cmkit's ADM against diffusers' ``UNet2DModel`` with the Hub configuration, on identical weights and inputs;
* from the FLOPs, the projected GPU-hours of each paper recipe (its steps × batch) at a stated utilisation on named
  GPUs. Projections are projections: they assume the stated utilisation, and no data loading or evaluation time.

Random weights; the LPIPS recipes use a random-weight VGG16 LPIPS (the same FLOPs as the real one).

    .venv/bin/python benchmarks/scale.py            # everything (~30 min on 2 cores)
    .venv/bin/python benchmarks/scale.py --quick    # CIFAR-10 networks only, to check it works (~3 min)

Writes ``benchmarks/results/scale.md`` and ``scale.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = os.sysconf("SC_PAGE_SIZE")
MiB = 1 << 20

#: network name → (the preset whose network it is, batch of the CPU measurement, methods measured on it)
ALL_METHODS = ("edm", "cd", "ct", "ict", "ect", "sct", "scd", "meanflow")
NETWORKS = {
    "CIFAR-10 NCSN++ (56.4M)": ("cifar10-ct", 4, ALL_METHODS),
    "CIFAR-10 DDPM++ (55.7M)": ("cifar10-ect", 4, ALL_METHODS),
    "ImageNet-64 ADM (296M)": ("imagenet64-cd", 2, ALL_METHODS),
    "LSUN-256 ADM": ("lsun-bedroom-cd-lpips", 1, ("edm", "cd", "ct")),
}
#: the paper recipes projected: preset → (network name, method, what the paper reports, if anything)
RECIPES = {
    "cifar10-edm": ("CIFAR-10 DDPM++ (55.7M)", "edm", "EDM: about 2 days on 8 V100 [unconfirmed]"),
    "cifar10-cd": ("CIFAR-10 NCSN++ (56.4M)", "cd", "'hundreds of GPU hours' (ECT paper, of CD)"),
    "cifar10-ct": ("CIFAR-10 NCSN++ (56.4M)", "ct", "8 GPUs [unconfirmed]"),
    "cifar10-ict": ("CIFAR-10 NCSN++ (56.4M)", "ict", ""),
    "cifar10-ect": (
        "CIFAR-10 DDPM++ (55.7M)",
        "ect",
        "2-step FID 2.73 after 1 A100-hour (ECT paper; a short budget, not this full recipe)",
    ),
    "imagenet64-edm": ("ImageNet-64 ADM (296M)", "edm", ""),
    "imagenet64-cd": ("ImageNet-64 ADM (296M)", "cd", "64 A100 [unconfirmed]"),
    "imagenet64-ct": ("ImageNet-64 ADM (296M)", "ct", "64 GPUs [unconfirmed]"),
    "lsun-bedroom-edm": ("LSUN-256 ADM", "edm", ""),
    "lsun-bedroom-cd-lpips": ("LSUN-256 ADM", "cd", "64 GPUs [unconfirmed]"),
    "lsun-bedroom-ct": ("LSUN-256 ADM", "ct", "64 GPUs [unconfirmed]"),
}
#: dense bf16 tensor-core peaks (vendor data sheets), and the utilisation the projection assumes
GPUS = {"A100 SXM": 312e12, "H100 SXM": 989e12}
UTILISATION = 0.40


# --- worker (one measurement per process) ----------------------------------------------------------


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """The peak RSS of this process while the block runs (sampled every 5 ms in a thread)."""

    def __enter__(self) -> PeakRSS:
        self.peak, self._stop = rss(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(0.005)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def method_config(preset: str, method: str, checkpointing: bool):
    """The network of ``preset`` trained by ``method`` (its own preconditioning; MeanFlow takes two times), with the
    preset's distance where the method has one (LPIPS for the CM paper's CD and CT recipes)."""
    from cmkit.losses import PRECOND_OF
    from cmkit.training.presets import PRESETS

    overrides = [f"loss.method={method}", f"model.precond={PRECOND_OF.get(method, 'cm')}", "model.dropout=0"]
    overrides += [f"model.checkpointing={checkpointing}", "train.init_from="]
    overrides.append(f"train.teacher={'random-weights' if method in ('cd', 'scd') else ''}")
    distance = PRESETS[preset].values.get("loss.distance")
    if method in ("cd", "ct") and distance:  # iCT, ECT and the others keep their own (pseudo-Huber) distance
        overrides.append(f"loss.distance={distance}")
    if method == "meanflow":
        overrides.append("model.time_inputs=2")
    if method in ("sct", "scd", "meanflow"):
        overrides.append("loss.jvp=jvp")
    return _config(preset, overrides)


def _config(preset: str, overrides: list[str]):
    """The network and training sections of ``preset``, the loss section at the method's defaults, ``overrides``."""
    from cmkit.config import apply_overrides
    from cmkit.denoiser_config import Config
    from cmkit.training.presets import PRESETS

    keep = [f"{k}={_text(v)}" for k, v in PRESETS[preset].values.items() if not k.startswith(("loss.", "sample."))]
    cfg = apply_overrides(Config(), [*keep, *overrides])
    cfg.validate()
    return cfg


def _text(v) -> str:
    return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def measure_step(spec: dict) -> dict:
    """One method's training step on one network: FLOPs, CPU time and extra peak memory per image."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from cmkit.ema import make_copy
    from cmkit.lpips import LPIPS

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    cfg = method_config(spec["preset"], spec["method"], spec["checkpointing"])
    model = cfg.model.build().train()
    objective = cfg.loss.build(cfg.model, cfg.train.steps)
    if getattr(cfg.loss, "distance", "") == "lpips":
        objective.distance = LPIPS().requires_grad_(False).eval()  # random VGG16: the real one's FLOPs
    teacher = None
    if objective.needs_teacher:
        tcfg = method_config(spec["preset"], "edm", False)
        teacher = tcfg.model.build().eval().requires_grad_(False)
    target = make_copy(model) if objective.target_mu(0) is not None else None
    b, m = spec["batch"], cfg.model
    x0 = torch.rand(b, m.in_channels, m.img_resolution, m.img_resolution) * 2 - 1
    cond = {"class_labels": torch.arange(b) % m.num_classes} if m.num_classes else {}
    step = cfg.train.steps // 2  # mid-training: CT/iCT at their middle N

    def one_step() -> None:
        loss = objective(model, x0, step=step, target=target or model, teacher=teacher, **cond).mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    saved = [0]

    def pack(t):  # what autograd keeps for the backward pass
        saved[0] += t.numel() * t.element_size()
        return t

    counter = FlopCounterMode(display=False)
    before = rss()  # the first step of a fresh process: the allocator has not grown yet
    with PeakRSS() as peak, counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        one_step()
    t0 = time.perf_counter()
    one_step()
    seconds = time.perf_counter() - t0
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "gflop_per_image": counter.get_total_flops() / b / 1e9,
        "s_per_image": seconds / b,
        "extra_peak_mib_per_image": (peak.peak - before) / MiB / b,
        "saved_mib_per_image": saved[0] / MiB / b,
    }


def measure_adm_vs_diffusers(spec: dict) -> dict:
    """cmkit's ImageNet-64 ADM or diffusers' UNet2DModel (Hub configuration), the same weights and inputs: one
    forward (inference) or one forward+backward, time and extra peak memory per image, and the output."""
    import diffusers
    import torch

    from cmkit.formats.adm_weights import diffusers_unet_config, openai_to_diffusers
    from cmkit.nets import build_net

    torch.set_num_threads(spec["threads"])
    cfg = method_config("imagenet64-cd", "cd", False)
    torch.manual_seed(0)
    net = build_net("adm", **{k: getattr(cfg.model, k) for k in cfg.model.NET_KEYS if k != "dropout"})
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.02)
    if spec["impl"] == "diffusers":
        config = {k: v for k, v in diffusers_unet_config(cfg.to_dict()["model"]).items() if not k.startswith("_")}
        d = diffusers.UNet2DModel(**config)
        d.load_state_dict(openai_to_diffusers(net.state_dict()))
        del net

        def run(x, c, y):  # diffusers' timestep is ADM's t = 1000·c_noise = 250·ln σ
            return d(x, 1000 * c, class_labels=y).sample

        module = d
    else:

        def run(x, c, y):
            return net(x, c, y)

        module = net
    b = spec["batch"]
    g = torch.Generator().manual_seed(1)
    x, c, y = torch.randn(b, 3, 64, 64, generator=g), torch.rand(b, generator=g) * 4 - 2, torch.arange(b) % 1000
    module.train(spec["mode"] == "train")

    def once():
        if spec["mode"] == "train":
            run(x, c, y).square().mean().backward()
            module.zero_grad(set_to_none=True)
            return None
        with torch.no_grad():
            return run(x, c, y)

    out = once()  # warm-up (and the output, for the check)
    times = []
    before = rss()
    with PeakRSS() as peak:
        for _ in range(spec["repeats"]):
            t0 = time.perf_counter()
            once()
            times.append(time.perf_counter() - t0)
    result = {"s_per_image": min(times) / b, "extra_peak_mib_per_image": (peak.peak - before) / MiB / b}
    if out is not None:
        result["output_sum"] = float(out.double().sum())
        result["output_abs_sum"] = float(out.double().abs().sum())
    return result


def worker(spec_json: str) -> None:
    spec = json.loads(spec_json)
    fn = measure_step if spec["kind"] == "step" else measure_adm_vs_diffusers
    print("RESULT " + json.dumps(fn(spec)))


# --- driver ----------------------------------------------------------------------------------------


def run_worker(spec: dict, timeout: int = 3600) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, timeout=timeout
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        why = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": why[:200]}
    return json.loads(lines[-1][7:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the CIFAR-10 networks only, no diffusers comparison")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale"))
    ap.add_argument("--reuse-steps", action="store_true", help="keep the step rows of --out's .json; rerun the rest")
    ap.add_argument("--method", help="with --reuse-steps: measure this method's rows again")
    ap.add_argument("--no-diffusers", action="store_true", help="skip the comparison with diffusers' UNet2DModel")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker)
    import platform

    import torch

    sys.path.insert(0, str(ROOT / "src"))
    from cmkit.distributed import cpu_name

    started = time.strftime("%Y-%m-%d %H:%M")
    load_before = os.getloadavg()[0]
    nets = {k: v for k, v in NETWORKS.items() if not args.quick or k.startswith("CIFAR")}
    old = json.loads(Path(args.out + ".json").read_text()) if args.reuse_steps else {"steps": []}
    steps = [s for s in old["steps"] if s["method"] != args.method]
    for name, (preset, batch, methods) in nets.items() if not args.reuse_steps or args.method else ():
        for method in [m for m in methods if not args.method or m == args.method]:
            for ckpt in (False, True):
                spec = dict(kind="step", preset=preset, method=method, checkpointing=ckpt, batch=batch)
                r = run_worker({**spec, "threads": args.threads})
                steps.append({"network": name, **spec, **r})
                print(name, method, "ckpt" if ckpt else "    ", r, flush=True)
    steps.sort(key=lambda s: (list(NETWORKS).index(s["network"]), ALL_METHODS.index(s["method"]), s["checkpointing"]))
    versus = old.get("adm_vs_diffusers", []) if args.no_diffusers else []
    if not args.quick and not args.no_diffusers:
        for mode, batch in (("infer", 4), ("train", 2)):
            for impl in ("diffusers", "cmkit"):
                spec = dict(kind="adm", impl=impl, mode=mode, batch=batch, repeats=3, threads=args.threads)
                r = run_worker(spec)
                versus.append({**spec, **r})
                print("ADM", impl, mode, r, flush=True)
    meta = {
        "machine": f"{cpu_name()}, {os.cpu_count()} CPUs, {args.threads} threads",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "started": started,
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        # with --reuse-steps the step rows keep the date of the run that measured them
        "steps_started": old["meta"].get("steps_started", old["meta"]["started"]) if "meta" in old else started,
        "gpus": GPUS,
        "utilisation": UTILISATION,
    }
    Path(args.out + ".json").write_text(
        json.dumps({"meta": meta, "steps": steps, "adm_vs_diffusers": versus}, indent=2)
    )
    Path(args.out + ".md").write_text(report(meta, steps, versus))
    print(f"wrote {args.out}.md and .json")


def report(meta: dict, steps: list[dict], versus: list[dict]) -> str:
    lines = [
        "# Training at real scale: what a step costs, and what the paper recipes would cost",
        "",
        f"Machine: {meta['machine']}; torch {meta['torch']}, Python {meta['python']}; {meta['started']}. "
        f"Load average before/after: {meta['load_before']:.2f} / {meta['load_after']:.2f}."
        + (
            f" The step rows were measured on {meta['steps_started']}."
            if meta.get("steps_started", "") not in ("", meta["started"])
            else ""
        )
        + (f" {meta['note']}." if meta.get("note") else ""),
        "Command: `.venv/bin/python benchmarks/scale.py`. Every row is a fresh process; random weights, fp32, "
        "batch as shown. FLOPs count a whole training step (the method's every network pass, forward and backward, "
        "LPIPS included where the recipe uses it) per image; time and memory are per image at that batch on this "
        "CPU. Extra peak = peak RSS during the first step of a fresh process − RSS before it; saved for backward = "
        "the bytes autograd keeps (`saved_tensors_hooks`), the part checkpointing removes. The extra peak also holds "
        "the gradient buffers the first backward allocates (4 bytes per parameter, spread over the batch), which "
        "checkpointing does not change.",
        "",
        "## One training step, per network and method",
        "",
        "| network | method | batch | GFLOP / image | CPU s / image | extra peak MiB / image | saved for backward "
        "MiB / image | checkpointing: GFLOP / image | s / image | extra peak MiB / image | saved MiB / image |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by = {(s["network"], s["method"], s["checkpointing"]): s for s in steps}
    for (net, method, ckpt), s in by.items():
        if ckpt:
            continue
        c = by.get((net, method, True), {})
        if "error" in s:
            lines.append(f"| {net} | {method} | {s['batch']} | n/a: {s['error']} | | | | | | | |")
            continue
        nan = float("nan")
        lines.append(
            f"| {net} | {method} | {s['batch']} | {s['gflop_per_image']:.1f} | {s['s_per_image']:.2f} | "
            f"{s['extra_peak_mib_per_image']:.0f} | {s['saved_mib_per_image']:.0f} | "
            f"{c.get('gflop_per_image', nan):.1f} | {c.get('s_per_image', nan):.2f} | "
            f"{c.get('extra_peak_mib_per_image', nan):.0f} | {c.get('saved_mib_per_image', nan):.0f} |"
        )
    edm = {s["network"]: s for s in steps if s["method"] == "edm" and not s["checkpointing"] and "error" not in s}
    lines += ["", "Step FLOPs relative to a plain diffusion (EDM) step on the same network:", ""]
    for net, base in edm.items():
        rel = [
            f"{s['method']} {s['gflop_per_image'] / base['gflop_per_image']:.2f}×"
            for s in steps
            if s["network"] == net and not s["checkpointing"] and "error" not in s and s["method"] != "edm"
        ]
        lines.append(f"- {net}: {', '.join(rel)}")
    if versus:
        lines += [
            "",
            "## cmkit's ADM against diffusers' UNet2DModel (ImageNet-64 configuration, identical weights and inputs)",
            "",
            "| mode | batch | diffusers s / image | cmkit s / image | time ratio | diffusers MiB / image | "
            "cmkit MiB / image | memory ratio |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for mode in ("infer", "train"):
            d = next((v for v in versus if v["mode"] == mode and v["impl"] == "diffusers"), {})
            c = next((v for v in versus if v["mode"] == mode and v["impl"] == "cmkit"), {})
            if "s_per_image" not in d or "s_per_image" not in c:
                lines.append(f"| {mode} | | n/a: {d.get('error') or c.get('error')} | | | | | |")
                continue
            lines.append(
                f"| {mode} | {c['batch']} | {d['s_per_image']:.3f} | {c['s_per_image']:.3f} | "
                f"{c['s_per_image'] / d['s_per_image']:.2f} | {d['extra_peak_mib_per_image']:.0f} | "
                f"{c['extra_peak_mib_per_image']:.0f} | "
                f"{c['extra_peak_mib_per_image'] / max(d['extra_peak_mib_per_image'], 1e-9):.2f} |"
            )
        same = [v for v in versus if "output_abs_sum" in v]
        if len(same) == 2:
            rel = abs(same[0]["output_sum"] - same[1]["output_sum"]) / max(same[0]["output_abs_sum"], 1e-12)
            lines.append(f"\nSame function: the summed outputs differ by {rel:.1e} of their absolute sum.")
    lines += projections(steps, meta)
    return "\n".join(lines) + "\n"


def projections(steps: list[dict], meta: dict) -> list[str]:
    """GPU-hours of each paper recipe from its measured step FLOPs: steps × batch × FLOPs / (peak × utilisation)."""
    sys.path.insert(0, str(ROOT / "src"))
    from cmkit.training.presets import get_config

    gpus, u = meta["gpus"], meta["utilisation"]
    lines = [
        "",
        "## Projected cost of the paper recipes",
        "",
        f"**Projections, not measurements**: FLOPs above × the recipe's steps × batch, at {u:.0%} of the dense bf16 "
        "peak (" + ", ".join(f"{g} {p / 1e12:.0f} TFLOP/s" for g, p in gpus.items()) + "), with no time for data "
        "loading, evaluation or communication. What the papers report is beside them where the reference notes "
        "have it.",
        "",
        "| recipe | method | steps × batch | images (M) | PFLOP | " + " | ".join(f"{g} GPU-hours" for g in gpus) + " | "
        "paper |",
        "|---|---|---|---|---|" + "---|" * len(gpus) + "---|",
    ]
    by = {(s["network"], s["method"]): s for s in steps if not s["checkpointing"] and "error" not in s}
    for preset, (net, method, paper) in RECIPES.items():
        s = by.get((net, method))
        if s is None:
            continue
        t = get_config(preset, []).train
        images = t.steps * t.batch_size
        flop = images * s["gflop_per_image"] * 1e9
        hours = [flop / (p * u) / 3600 for p in gpus.values()]
        lines.append(
            f"| {preset} | {method} | {t.steps:,} × {t.batch_size:,} | {images / 1e6:,.0f} | {flop / 1e15:,.0f} | "
            + " | ".join(f"{h:,.0f}" for h in hours)
            + f" | {paper} |"
        )
    return lines


if __name__ == "__main__":
    main()
