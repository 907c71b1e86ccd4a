"""Quality benchmark (issue: measured quality): every shipped Fashion-MNIST model and sampler setting.

For each setting: network evaluations (NFE), FD / KID / precision / recall (k=3) in the feature space of
the project's Fashion-MNIST classifier on N samples against the test split, and images per second, plus
the real-vs-real floor (N training images vs the test split). The 2-step middle σ is chosen by FD
with fewer samples, as the CM paper did by ternary search: over the levels of the training grid for models
trained on one (CD, CT; iCT's fine final grid is searched as a continuum and snapped to it), by golden-section
search for continuous-time models (ECT); the 4-step list is Karras-spaced down to it (on the grid when there is
one, ``multistep_sigmas``). The chosen σ are the shipped models' ``sample.sigmas`` defaults.
Writes benchmarks/results/quality.md, quality.json and sample grids under benchmarks/results/quality/.

    python benchmarks/quality.py                 # N = 10,000, every shipped model (bf16 autocast)
    python benchmarks/quality.py --only fmnist-edm   # one model; its rows replace those in quality.json
    python benchmarks/quality.py --n 2000 --heun-steps 18 --search-iters 3   # a quick smoke run

Sampling runs the network under bf16 autocast by default (about 2× faster on a CPU with native bf16; the sampler
state and preconditioning stay fp32); ``--fp32`` turns it off, as it must on an AVX2-only CPU, where autocast is
about 17× slower than fp32. Each row says which was used (column net) and on which machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from cmkit.decoder.decoder import ConsistencyDecoder, LatentDecoder
from cmkit.decoder.schedule import steps_to_schedule
from cmkit.distributed import cpu_name
from cmkit.formats.model_dir import read_model_dir
from cmkit.formats.zoo import shipped_model_dir
from cmkit.generate import cfg_guidance, generate, multistep_sigmas
from cmkit.imageio import save_grid, to_uint8
from cmkit.load import load_model
from cmkit.metrics.evaluate import evaluate, get_extractor, real_floor
from cmkit.metrics.frechet import feature_statistics, frechet_distance_stats
from cmkit.metrics.reference import load_reference
from cmkit.metrics.schedule_search import search_sigma_mid
from cmkit.sampling import nfe
from cmkit.schedules import training_grid

RESULTS = Path(__file__).parent / "results"
TEACHER = "fmnist-edm"
STUDENTS = ("fmnist-cd", "fmnist-ict", "fmnist-ect")
PD = "fmnist-pd"  # progressive distillation from the same teacher with the same budget as fmnist-cd
# continuous-time and flow-map objectives (issue 12): sCT/sCD tuned/distilled from the same teacher, MeanFlow from
# scratch, TCM as a second stage after fmnist-ect; MeanFlow also with its deterministic flow-map sampler
CONTINUOUS = ("fmnist-sct", "fmnist-scd", "fmnist-meanflow", "fmnist-tcm")
# sCT and sCD start from the EDM teacher re-tuned to sCM's time input c_noise = t (fmnist-trigflow); its own
# Heun-35 row shows what that conversion costs
SCM_TEACHER = "fmnist-trigflow"
# one-step quality (issue 21): consistency mid-training from the teacher, then ECT at a small Δt after it; Align Your
# Flow's flow map distilled from the teacher autoguided by fmnist-edm-weak; the shipped fmnist-tcm trained longer;
# rCM (sCD with the DMD score regulariser) from fmnist-trigflow
ONESTEP = ("fmnist-cmt", "fmnist-cmt-ect", "fmnist-cmt-tcm", "fmnist-ayf", "fmnist-tcm-long", "fmnist-rcm")
#: the two-time flow maps, also measured with their deterministic flow-map sampler (no re-noising)
FLOW_MAPS = ("fmnist-meanflow", "fmnist-ayf")
# the latent stack in miniature (issue 22): a class-conditional latent EDM teacher on fmnist-ae's 2×8×8 latents and
# the LCM distilled from it (at its sample.guidance w); both decoded by the autoencoder, FD of the decoded images.
# The teacher is sampled under classifier-free guidance at the LCM's w (two evaluations per step): what LCM distils
LATENT_TEACHER = "fmnist-ldm"
LATENT = ("fmnist-lcm",)
# the same LCM decoded by the consistency decoder trained for fmnist-ae (one decoder step, t = 1008) instead of the
# autoencoder's decoder: MODEL+DECODER, the σ levels those of MODEL's own rows (no second σ_mid search)
DECODED = ("fmnist-lcm+fmnist-cdec",)


def settings(heun: list[int]) -> list[tuple[str, str, int]]:
    """(model, sampler, steps): the teacher's Heun levels (18 = 35 NFE, then lower budgets); each CM at 1, 2, 4
    steps."""
    rows = [(TEACHER, "heun", s) for s in heun]
    for name in STUDENTS:
        rows += [(name, "onestep", 1), (name, "multistep", 2), (name, "multistep", 4)]
    rows += [(PD, "progdist", s) for s in (1, 2, 4)]  # the baseline CD is compared with (CM paper §6)
    rows.append((SCM_TEACHER, "heun", 18))
    for name in CONTINUOUS:
        rows += [(name, "onestep", 1), (name, "multistep", 2), (name, "multistep", 4)]
    for name in ONESTEP:
        rows += [(name, "onestep", 1), (name, "multistep", 2), (name, "multistep", 4)]
    rows += [(name, "flowmap", s) for name in FLOW_MAPS for s in (2, 4)]
    rows.append((LATENT_TEACHER, "heun", 18))
    for name in (*LATENT, *DECODED):
        rows += [(name, "onestep", 1), (name, "multistep", 2), (name, "multistep", 4)]
    return rows


def decoded(name: str, local: dict[str, str]) -> tuple[str, LatentDecoder | None]:
    """MODEL+DECODER → (MODEL, the consistency decoder at one step); a plain name → (name, None)."""
    base, _, dec = name.partition("+")
    if not dec:
        return name, None
    path = model_dir(dec, local)
    if path is None:
        raise SystemExit(f"{name}: the decoder {dec} is not shipped; give it with --model {dec}=DIR")
    return base, ConsistencyDecoder.from_pretrained(path, channels_last=False).latent_decoder(steps_to_schedule(1))


def known_mid(name: str) -> float | None:
    """The 2-step σ_mid of ``name``'s rows in quality.json, when it has them."""
    old = RESULTS / "quality.json"
    rows = json.loads(old.read_text())["rows"] if old.is_file() else []
    return next((r["sigmas"][1] for r in rows if r["model"] == name and r["steps"] == 2), None)


def model_dir(name: str, local: dict[str, str]) -> Path | None:
    """A shipped model, or the directory given with --model NAME=DIR (a trained model not shipped, or not yet)."""
    return Path(local[name]) if name in local else shipped_model_dir(name)


def timed_generate(model, cfg, n, sampler, sigmas, steps, batch, bf16, guidance=None, decoder=None):
    t0 = time.perf_counter()
    x, _ = generate(
        model,
        cfg,
        n,
        sampler,
        sigmas,
        steps,
        seed=0,
        batch_size=batch,
        progress=False,
        bf16=bf16,
        guidance=guidance,
        decoder=decoder,
    )
    return x, n / (time.perf_counter() - t0)


def teacher_guidance(name: str, local: dict[str, str]) -> float | None:
    """The classifier-free guidance scale of the latent teacher's row: the w its LCM samples at (None otherwise)."""
    path = model_dir(LATENT[0], local)
    if name != LATENT_TEACHER or path is None:
        return None
    return float(read_model_dir(path).config["sample"]["guidance"])


def search_mid(model, cfg, reference, extractor, n: int, iters: int, bf16: bool) -> float:
    """The 2-step middle σ with the lowest FD on ``n`` samples (seeds apart from the table's), in [0.1, 10]:
    over the levels of the model's training grid when it has one (the CM paper's search over ``ts``), else
    by golden-section search."""

    def score(sigmas: list[float]) -> float:
        x, _ = generate(model, cfg, n, "multistep", sigmas, 2, seed=10_000, progress=False, bf16=bf16)
        feats = extractor.extract(to_uint8(x), progress=False)
        return frechet_distance_stats(feature_statistics(feats), reference.stats)

    grid = training_grid(cfg)
    if grid is None:
        return search_sigma_mid(score, 0.1, 10.0, iters).sigmas[1]
    candidates = [s for s in grid if 0.1 <= s <= 10.0]
    if len(candidates) > 16:  # a fine grid (iCT's final N = 1281): search it like a continuum, then snap
        return min(grid, key=lambda s: abs(s - search_sigma_mid(score, 0.1, 10.0, iters).sigmas[1]))
    scores = {s: score([cfg.model.sigma_max, s]) for s in candidates}
    print("grid search of σ_mid:", ", ".join(f"{s:.4g}: {v:.3f}" for s, v in scores.items()))
    return min(scores, key=scores.get)


def measure_speed(rows: list[dict], args: argparse.Namespace) -> None:
    """Replace each row's img/s by the best of ``args.repeats`` timings of ``args.speed_n`` images, all taken
    in this process, the rows interleaved within each repeat."""
    models: dict[str, tuple] = {}
    best: dict[int, float] = {}
    for _ in range(args.repeats):
        for i, r in enumerate(rows):
            if r["model"] not in models:
                base, decoder = decoded(r["model"], args.local)
                models[r["model"]] = (*load_model(model_dir(base, args.local)), decoder)
            model, cfg, decoder = models[r["model"]]
            bf16 = r.get("net", "bf16" if args.bf16 else "fp32") == "bf16"  # in the row's own precision
            w = r.get("guidance") if not getattr(model, "takes_guidance", False) else None  # a guided teacher's w
            _, ips = timed_generate(
                model, cfg, args.speed_n, r["sampler"], r["sigmas"], r["steps"], args.speed_n, bf16, w, decoder
            )
            best[i] = max(best.get(i, 0.0), ips)
            print(f"{r['model']} {r['sampler']} {r['steps']}: {ips:.1f} img/s")
    for i, r in enumerate(rows):
        r["img_per_s"] = best[i]


def printed_rows(log: str) -> dict[tuple[str, str, int], dict]:
    """The result rows (one JSON object per line) that an earlier run of this script printed."""
    rows = {}
    for line in Path(log).read_text().splitlines():
        if line.startswith('{"model"'):
            r = json.loads(line)
            rows[(r["model"], r["sampler"], r["steps"])] = r
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--search-n", type=int, default=1000, help="samples per probe of the σ_mid search")
    ap.add_argument("--search-iters", type=int, default=7)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--heun-steps", default="18,9,5", help="teacher Heun levels (NFE = 2·levels − 1)")
    ap.add_argument("--only", action="append", help="benchmark only this model (repeatable); other rows are kept")
    ap.add_argument("--fp32", action="store_true", help="sample in fp32 instead of bf16 autocast")
    ap.add_argument(
        "--speed",
        action="store_true",
        help="only re-time every row of quality.json in this one process (best of --repeats on "
        "--speed-n images), so that the speed-ups compare runs under the same load",
    )
    ap.add_argument(
        "--steps",
        default="1,2,4",
        help="the consistency models' step counts to measure (comma-separated; the teacher's Heun rows are kept)",
    )
    ap.add_argument("--speed-n", type=int, default=500)
    ap.add_argument("--resume-log", help="stdout of an interrupted run: the rows it printed are reused, not recomputed")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="take model NAME from DIR instead of the shipped models (repeatable)",
    )
    args = ap.parse_args()
    args.local = dict(m.split("=", 1) for m in args.model)
    args.bf16 = not args.fp32
    torch.set_num_threads(args.threads)
    if args.speed:
        prev = json.loads((RESULTS / "quality.json").read_text())
        measure_speed(prev["rows"], args)
        write(prev["rows"], prev["floor"], args)
        return
    extractor = get_extractor("fmnist")
    reference = load_reference("fmnist-test", extractor)
    floor = real_floor(reference, extractor, args.n, progress=False)
    grids = RESULTS / "quality"
    rows, mids = [], {}
    done = printed_rows(args.resume_log) if args.resume_log else {}
    for name, sampler, steps in settings([int(v) for v in args.heun_steps.split(",")]):
        if (args.only and name not in args.only) or (sampler != "heun" and str(steps) not in args.steps.split(",")):
            continue
        if (name, sampler, steps) in done:
            rows.append(done[(name, sampler, steps)])
            print(f"reused from {args.resume_log}: {name} {sampler} {steps}")
            continue
        base, decoder = decoded(name, args.local)
        path = model_dir(base, args.local)
        if path is None:
            print(f"skip {name}: not shipped yet")
            continue
        model, cfg = load_model(path)
        sigmas: list[float] = []
        if sampler == "onestep":
            sigmas = [cfg.model.sigma_max]
        elif sampler in ("multistep", "flowmap"):
            if name not in mids and decoder is not None:
                mids[name] = mids.get(base) or known_mid(base)
            if mids.get(name) is None:
                mids[name] = search_mid(model, cfg, reference, extractor, args.search_n, args.search_iters, args.bf16)
                print(f"{name}: searched σ_mid = {mids[name]:.4g}")
            cfg.sample.sigmas = (cfg.model.sigma_max, mids[name])
            sigmas = multistep_sigmas(cfg, steps)  # on the training grid when the model has one
        guidance = teacher_guidance(name, args.local)
        x, ips = timed_generate(model, cfg, args.n, sampler, sigmas, steps, args.batch, args.bf16, guidance, decoder)
        m = evaluate(to_uint8(x), reference, extractor, progress=False)
        label = f"{name} {sampler} {steps}" if sampler != "onestep" else f"{name} 1-step"
        save_grid(x[:64], grids / f"{label.replace(' ', '_')}.png", nrow=8)
        row = {
            "model": name,
            "sampler": sampler,
            "steps": steps,
            "nfe": nfe(sampler, steps) * (2 if cfg_guidance(model, cfg, guidance) is not None else 1),
            "sigmas": [round(s, 4) for s in sigmas],
            "fd": m["fd"],
            "kid": m["kid_mean"],
            "precision": m["precision"],
            "recall": m["recall"],
            "img_per_s": ips,
            "net": "bf16" if args.bf16 else "fp32",
            "machine": cpu_name(),
        }
        if getattr(model, "takes_guidance", False):  # an LCM: the guidance scale w it was sampled at
            row["guidance"] = cfg.sample.guidance
        elif guidance is not None:  # a teacher under classifier-free guidance
            row["guidance"] = guidance
        if cfg.latent.autoencoder:  # a latent model: its samples cost one evaluation of a decoder too
            row["decoder"] = name.partition("+")[2] or Path(cfg.latent.autoencoder).name
        rows.append(row)
        print(json.dumps(row))
    write(rows, floor, args)


def commands(args: argparse.Namespace) -> list[str]:
    """The command lines whose rows the table holds (several with --only)."""
    this = "python " + " ".join(["benchmarks/quality.py", *sys.argv[1:]])
    old = RESULTS / "quality.json"
    keep = args.only or args.speed
    prev = json.loads(old.read_text())["meta"].get("commands", []) if keep and old.is_file() else []
    return [c for c in prev if c != this] + [this]


def merge(rows: list[dict], args: argparse.Namespace) -> list[dict]:
    """With --only, keep the other models' rows from the existing quality.json (same n; each row says in which
    precision its network ran: on a CPU without native bf16, autocast is slower than fp32)."""
    old = RESULTS / "quality.json"
    if not args.only or not old.is_file():
        return rows
    prev = json.loads(old.read_text())
    if prev["meta"]["n_samples"] != args.n:
        raise SystemExit(f"{old} was written with another --n ({prev['meta']['n_samples']}); rerun without --only")
    was = "bf16" if prev["meta"].get("bf16", True) else "fp32"
    machine = prev["meta"]["machine"].split(",")[0]
    kept = [{"net": was, "machine": machine, **r} for r in prev["rows"] if r["model"] not in args.only]
    teachers = (TEACHER, SCM_TEACHER, LATENT_TEACHER)
    order = {m: i for i, m in enumerate((TEACHER, *STUDENTS, PD, SCM_TEACHER, *CONTINUOUS, *ONESTEP, *teachers[2:]))}
    order.update({m: len(order) + i for i, m in enumerate((*LATENT, *DECODED))})
    return sorted(
        kept + rows, key=lambda r: (order.get(r["model"], 99), r["nfe"] if r["model"] not in teachers else -r["nfe"])
    )


def write(rows: list[dict], floor: dict | None, args: argparse.Namespace) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = merge(rows, args)
    teacher = next((r for r in rows if r["model"] == TEACHER and r["nfe"] == 35), None)
    for r in rows:
        r["fd_vs_teacher35"] = r["fd"] / teacher["fd"] if teacher else None
        r["speedup_vs_teacher35"] = r["img_per_s"] / teacher["img_per_s"] if teacher else None
    machine = f"{cpu_name()}, {args.threads} torch threads, torch {torch.__version__}"
    nets = sorted({(r.get("machine", cpu_name()), r.get("net", "bf16" if args.bf16 else "fp32")) for r in rows})
    precision = "; ".join(f"{n} on {m}" for m, n in nets) + " (bf16 = autocast with an fp32 sampler state; column net)"
    timing = (
        f"img/s: best of {args.repeats} timings of {args.speed_n} images per row, all rows in one process "
        f"({args.threads} threads, batch {args.speed_n})"
        if args.speed
        else "img/s: timed while generating the N samples, one process per --only group (load differs between groups)"
    )
    meta = {
        "n_samples": args.n,
        "bf16": args.bf16,
        "precision": precision,
        "timing": timing,
        "feature_space": "FD (Fashion-MNIST classifier features)",
        "reference": "Fashion-MNIST test split (10,000)",
        "machine": machine,
        "commands": commands(args),
    }
    (RESULTS / "quality.json").write_text(json.dumps({"meta": meta, "floor": floor, "rows": rows}, indent=2))
    lines = [
        f"# Quality on Fashion-MNIST ({args.n:,} samples vs the test split)",
        "",
        f"Feature space: **FD (Fashion-MNIST classifier features)** — not FID. Machine: {machine}. "
        f"Network precision while sampling: {precision}. {timing}.",
        "Commands: " + ", ".join(f"`{c}`" for c in meta["commands"]) + ".",
        "",
        "| model | sampler | NFE | σ levels | net | FD | FD / teacher-35 | KID | precision | recall | img/s "
        "| speed-up vs teacher-35 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = f"{r['model']} (w = {r['guidance']:g})" if "guidance" in r else r["model"]
        evals = f"{r['nfe']} + 1 decoder" if "decoder" in r else r["nfe"]
        lines.append(
            f"| {name} | {r['sampler']} | {evals} | {', '.join(map(str, r['sigmas'])) or '—'} | "
            f"{r.get('net', '—')} | {r['fd']:.3f} | {_f(r['fd_vs_teacher35'], 2)} | {r['kid']:.5f} | "
            f"{r['precision']:.3f} | {r['recall']:.3f} | {r['img_per_s']:.1f} | {_f(r['speedup_vs_teacher35'], 1)}× |"
        )
    if floor:
        lines.append(
            f"| real vs real (floor) | — | — | — | — | {floor['fd']:.3f} | — | {floor['kid_mean']:.5f} | "
            f"{floor['precision']:.3f} | {floor['recall']:.3f} | — | — |"
        )
        lines += ["", f"Floor: {floor['description']}."]
    lines += ["", "Sample grids (first 64 samples of each setting) are in `benchmarks/results/quality/`."]
    (RESULTS / "quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _f(v: float | None, digits: int) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


if __name__ == "__main__":
    main()
