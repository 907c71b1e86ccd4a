"""One-step quality against training cost, per method (issue 21): which objective buys quality fastest.

For every Fashion-MNIST model of ``benchmarks/results/quality.json`` with a 1-step row, the x value is the
training compute of the model *and every stage it builds on* (the EDM teacher included: CD, ECT, CMT, PD start from
it; TCM from ECT; sCT and sCD from the TrigFlow re-tune of the teacher), the y value its 1-step FD (10,000 samples,
the table's protocol). Compute, not wall-clock time: the shipped models were trained on another CPU in bf16, the
newer ones here in fp32, so their seconds do not compare; FLOPs do. Each stage's FLOPs are one training step of its
preset (``torch.utils.flop_counter.FlopCounterMode``, every network pass: teacher, target, JVP, forward and
backward) × its steps × batch; a stage's steps come from its model's recipe when it is shipped, else its preset.
A latent model's steps count its network on latents, not the frozen autoencoder that encodes each batch.

Intermediate checkpoints of a run (``--snapshot NAME:STEP=DIR``, the run's ``checkpoint/`` copied at STEP) add
points along that model's curve; they are evaluated here at 1 step on the same 10,000 samples.

    python benchmarks/quality_vs_time.py --snapshot fmnist-cmt:500=runs/snapshots/fmnist-cmt_step_500
    python benchmarks/quality_vs_time.py --point fmnist-cmt:500=28.919   # a point measured before

Writes benchmarks/results/quality_vs_time.png and .json.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from cmkit.denoiser_config import Config
from cmkit.files import load_safetensors
from cmkit.formats.zoo import shipped_model_dir
from cmkit.generate import generate
from cmkit.imageio import to_uint8
from cmkit.load import load_model
from cmkit.metrics.evaluate import evaluate, get_extractor
from cmkit.metrics.reference import load_reference
from cmkit.training.presets import PRESETS, get_config

RESULTS = Path(__file__).parent / "results"


def stage_of(path: str | None) -> str | None:
    """The preset a ``train.teacher`` / ``train.init_from`` value names (``runs/fmnist-edm`` or ``fmnist-edm``)."""
    if not path:
        return None
    name = Path(path).name
    return name if name in PRESETS else None


def ancestors(name: str) -> list[str]:
    """``name`` and every stage it builds on (init_from, teacher and autoguidance's weak model, recursively), each
    once, earliest first."""
    out: list[str] = []

    def visit(n: str) -> None:
        values = PRESETS[n].values
        for key in ("train.init_from", "train.teacher", "train.autoguide"):  # autoguide: AYF's weak model
            parent = stage_of(values.get(key))
            if parent and parent not in out:
                visit(parent)
        if n not in out:
            out.append(n)

    visit(name)
    return out


def bare_config(name: str):
    """Preset ``name`` with nothing loaded: no init_from, and a placeholder teacher path where it needs one."""
    teacher = "unused" if PRESETS[name].values.get("train.teacher") else ""
    return get_config(name, ["train.init_from=", f"train.teacher={teacher}"])


def step_flops(name: str) -> float:
    """FLOPs of one training step of preset ``name`` at its batch size (random weights, fp32). A run whose steps
    differ (rCM: sCD alone up to its start, then a student step and its critic steps, 1…K simulated generator
    steps in turn) counts the mean step of the whole run, from one full period of its schedule."""
    from torch.utils.flop_counter import FlopCounterMode

    values = PRESETS[name].values
    cfg = bare_config(name)
    torch.manual_seed(0)
    model = cfg.model.build().train()
    objective = cfg.loss.build(cfg.model, cfg.train.steps)
    teacher = None
    if objective.needs_teacher:
        parent = stage_of(values["train.teacher"])
        teacher = bare_config(parent).model.build().eval().requires_grad_(False)
    m, b = cfg.model, cfg.train.batch_size
    x0 = torch.rand(b, m.in_channels, m.img_resolution, m.img_resolution) * 2 - 1  # a latent model: its latents
    cond = {"class_labels": torch.arange(b) % m.num_classes} if m.num_classes else {}
    reg = getattr(objective, "regulariser", None)
    extra = {"fake_score": copy.deepcopy(teacher).requires_grad_(True).train()} if reg is not None else {}

    def count(step: int) -> float:
        counter = FlopCounterMode(display=False)
        with counter:
            objective(model, x0, step=step, target=model, teacher=teacher, **extra, **cond).mean().backward()
        return float(counter.get_total_flops())

    if reg is None:
        return count(cfg.train.steps // 2)
    period = range(reg.start, reg.start + reg.max_steps * (reg.critic_steps + 1))  # the phase and n both cycle
    mean = sum(count(step) for step in period) / len(period)
    steps, before = cfg.train.steps, min(reg.start, cfg.train.steps)
    return (before * count(0) + (steps - before) * mean) / steps


def stage_steps(name: str) -> tuple[int, int]:
    """(steps, batch) a stage was trained with: its shipped recipe's, else its preset's."""
    shipped = shipped_model_dir(name)
    if shipped is not None:
        d = json.loads((shipped / "config.json").read_text())
        return int(d["recipe"]["steps"]), int(d["config"]["train"]["batch_size"])
    v = PRESETS[name].values
    return int(v["train.steps"]), int(v["train.batch_size"])


def load_snapshot(path: Path, weights: str):
    """A run's ``checkpoint/`` (its config.json is the run config) or a model directory: (model, Config)."""
    raw = json.loads((path / "config.json").read_text())
    if "kind" in raw:
        return load_model(path, weights=weights)
    cfg = Config.from_dict(raw)
    model = cfg.model.build()
    load_safetensors(model, path / weights)
    return model.eval().requires_grad_(False), cfg


def fd_one_step(model_dir: Path, weights: str, reference, extractor, n: int) -> float:
    model, cfg = load_snapshot(model_dir, weights)
    x, _ = generate(model, cfg, n, "onestep", [cfg.model.sigma_max], 1, seed=0, batch_size=500, progress=False)
    return float(evaluate(to_uint8(x), reference, extractor, progress=False)["fd"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--snapshot", action="append", default=[], metavar="NAME:STEP=DIR")
    ap.add_argument(
        "--point",
        action="append",
        default=[],
        metavar="NAME:STEP=FD",
        help="a snapshot's 1-step FD measured before with this script's fd_one_step (not re-evaluated)",
    )
    ap.add_argument("--weights", default="ema_0.995.safetensors", help="the snapshots' weights file")
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    table = json.loads((RESULTS / "quality.json").read_text())
    onestep = {  # a preset's rows (not MODEL+DECODER rows, whose decoder is a stage of another kind)
        r["model"]: r["fd"]
        for r in table["rows"]
        if r["sampler"] in ("onestep", "progdist") and r["nfe"] == 1 and r["model"] in PRESETS
    }
    flops: dict[str, float] = {}
    points: dict[str, list[dict]] = {}

    def at(name: str, step: int | None) -> tuple[float, list[str]]:
        """(PFLOP up to ``step`` of stage ``name``, the whole stage when None, earlier stages included; chain)."""
        chain = ancestors(name)
        for stage in chain:
            if stage not in flops:
                steps, _ = stage_steps(stage)
                flops[stage] = step_flops(stage) * steps
                print(f"{stage}: {flops[stage] / 1e15:.3f} PFLOP over {steps} steps", flush=True)
        share = 1.0 if step is None else step / stage_steps(name)[0]
        return (sum(flops[s] for s in chain[:-1]) + flops[name] * share) / 1e15, chain

    def add(name: str, step: int | None, fd: float) -> None:
        x, chain = at(name, step)
        points.setdefault(name, []).append({"pflop": x, "fd": fd, "stages": chain, "step": step or "final"})

    for name, fd in onestep.items():
        add(name, None, fd)
    if args.snapshot:
        extractor = get_extractor("fmnist")
        reference = load_reference("fmnist-test", extractor)
        for spec in args.snapshot:
            head, path = spec.split("=", 1)
            name, step = head.split(":")
            fd = fd_one_step(Path(path), args.weights, reference, extractor, args.n)
            print(f"{name} step {step}: 1-step FD {fd:.3f}", flush=True)
            add(name, int(step), fd)
    for spec in args.point:
        head, fd = spec.split("=", 1)
        name, step = head.split(":")
        add(name, int(step), float(fd))
    for series in points.values():
        series.sort(key=lambda p: p["pflop"])
    teacher = next(r["fd"] for r in table["rows"] if r["model"] == "fmnist-edm" and r["nfe"] == 35)
    out = {"teacher_heun35_fd": teacher, "stage_pflop": {k: v / 1e15 for k, v in flops.items()}, "points": points}
    (RESULTS / "quality_vs_time.json").write_text(json.dumps(out, indent=2))
    plot(points, teacher, RESULTS / "quality_vs_time.png")
    print(f"wrote {RESULTS / 'quality_vs_time.png'} and .json")


# --- a small log-x line plot with PIL (no plotting library needed) -----------------------------------------------

COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


def plot(points: dict[str, list[dict]], teacher: float, path: Path, size: tuple[int, int] = (1100, 700)) -> None:
    """FD against compute (log x), one polyline per model, the teacher's Heun-35 FD and 1.5× it as lines."""
    w, h = size
    left, right, top, bottom = 80, 260, 40, 70
    xs = [p["pflop"] for s in points.values() for p in s]
    ys = [p["fd"] for s in points.values() for p in s] + [teacher]
    x_lo, x_hi = math.log10(min(xs)) - 0.1, math.log10(max(xs)) + 0.1
    y_lo, y_hi = 0.0, max(ys) * 1.05

    def px(x: float, y: float) -> tuple[float, float]:
        u = left + (math.log10(x) - x_lo) / (x_hi - x_lo) * (w - left - right)
        v = h - bottom - (y - y_lo) / (y_hi - y_lo) * (h - top - bottom)
        return u, v

    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for e in range(math.floor(x_lo), math.ceil(x_hi) + 1):
        for m in (1, 2, 5):
            if x_lo <= math.log10(m * 10**e) <= x_hi:
                u, _ = px(m * 10**e, 0)
                d.line([u, top, u, h - bottom], fill="#dddddd")
                d.text((u - 10, h - bottom + 6), f"{m * 10**e:g}", fill="black")
    for k in range(0, int(y_hi) + 1, 10):
        _, v = px(10**x_lo, k)
        d.line([left, v, w - right, v], fill="#eeeeee")
        d.text((left - 28, v - 6), str(k), fill="black")
    for level, label in ((teacher, "teacher Heun-35"), (1.5 * teacher, "1.5x teacher (target)")):
        _, v = px(10**x_lo, level)
        d.line([left, v, w - right, v], fill="#999999", width=1)
        d.text((w - right + 6, v - 6), f"{label} {level:.1f}", fill="#555555")
    for i, (name, series) in enumerate(sorted(points.items())):
        colour = COLOURS[i % len(COLOURS)]
        coords = [px(p["pflop"], p["fd"]) for p in series]
        if len(coords) > 1:
            d.line(coords, fill=colour, width=2)
        for u, v in coords:
            d.ellipse([u - 4, v - 4, u + 4, v + 4], fill=colour)
        u, v = coords[-1]
        d.text((u + 6, v - 14), name.removeprefix("fmnist-"), fill=colour)
    d.text(
        (left, 12),
        "Fashion-MNIST: 1-step FD (10,000 samples) against training compute, earlier stages included",
        fill="black",
    )
    d.text(((w - right + left) // 2 - 120, h - 30), "training compute (PFLOP, log scale)", fill="black")
    d.text((8, top - 20), "1-step FD", fill="black")
    img.save(path)


if __name__ == "__main__":
    main()
