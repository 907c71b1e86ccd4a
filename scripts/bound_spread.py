"""The spread of every training-bound test over seeds and thread counts, against its limit.

Runs ``pytest -m training_bound`` once per (threads, seed) with ``CMKIT_TEST_SEED`` and ``OMP_NUM_THREADS`` set,
collects what each test passed to its ``bound`` fixture (``tests/conftest.py``), and prints one Markdown row per
quantity: the range over all runs, the limit, and the margin (limit / worst value; above 1 passes). A bound
fitted on one CPU can fail on another; a seed change moves the training about as much as a different CPU's
kernels do, so a margin over several seeds is the evidence that a bound holds elsewhere.

    python scripts/bound_spread.py --seeds 5 --threads 1,2 [-k sCD] [-o benchmarks/results/bound_spread.md]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(seeds: int, threads: list[int], select: str | None) -> list[dict]:
    rows: list[dict] = []
    for n in threads:
        for seed in range(seeds):
            with tempfile.NamedTemporaryFile("r", suffix=".jsonl") as log:
                env = {
                    **os.environ,
                    "CMKIT_TEST_SEED": str(seed),
                    "OMP_NUM_THREADS": str(n),
                    "CMKIT_BOUND_LOG": log.name,
                }
                cmd = [
                    sys.executable,
                    "-m",
                    "pytest",
                    "-m",
                    "training_bound",
                    "-p",
                    "no:cacheprovider",
                    *(["-k", select] if select else []),
                ]
                proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
                summary = [line for line in proc.stdout.splitlines() if " passed" in line or " failed" in line]
                print(f"threads {n} seed {seed}: {(summary or ['(no summary)'])[-1]}", file=sys.stderr, flush=True)
                rows += [json.loads(line) for line in log.read().splitlines()]
    return rows


def table(rows: list[dict]) -> str:
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["test"], r["quantity"])].append(r)
    out = [
        "| test | quantity | runs | min | max | limit | margin (limit / max) | fails |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (test, quantity), rs in groups.items():
        values = [r["value"] for r in rs]
        limit = min(r["limit"] for r in rs)
        fails = sum(r["value"] >= r["limit"] for r in rs)
        worst = max(values)
        margin = f"{limit / worst:.2f}×" if worst > 0 else "∞"
        out.append(
            f"| `{test.split('::', 1)[1]}` | {quantity} | {len(rs)} | {min(values):.4g} | {worst:.4g} | "
            f"{limit:.4g} | {margin} | {fails} |"
        )
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=5, help="seeds 0 … N−1 (default 5)")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    p.add_argument("-k", dest="select", help="pytest -k expression to run only some tests")
    p.add_argument("-o", "--output", help="also write the table to this Markdown file")
    a = p.parse_args()
    threads = [int(t) for t in a.threads.split(",")]
    text = table(run(a.seeds, threads, a.select))
    print(text)
    if a.output:
        Path(a.output).write_text(
            f"Seeds 0–{a.seeds - 1}, threads {a.threads}; `python scripts/bound_spread.py "
            f"--seeds {a.seeds} --threads {a.threads}`.\n\n{text}\n"
        )


if __name__ == "__main__":
    main()
