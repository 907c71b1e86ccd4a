"""A seeded, bounded fuzz of the ``cmkit`` command line: no exception may reach ``cmkit.cli.main``'s catch-all.

Valid command lines of sample, edit, eval, decode, convert-decoder, train --dry-run, presets and models are
mutated (flags dropped, duplicated, given junk values such as '', '-1', 'nan', '1e9', 'x', missing paths,
directories, existing or corrupt files; flags of the command added with junk values) and run in-process. Every
case must exit 0 or 2 (never 1: the one-line "(rerun with --debug ...)" catch-all counts as a failure, so each
cause is fixed where it arises), print exactly one error line when it fails, and finish within a time budget.
Cases are drawn by ``random.Random(0)``; the tiny shipped models and fixtures keep the whole run short.
"""

from __future__ import annotations

import argparse
import random
import signal
import struct
import time
import zlib

import numpy as np
import pytest

from cmkit.cli.main import build_parser, main

N_CASES = 500
CASE_BUDGET_S = 20  # one case; a valid mutation samples at most a handful of 28×28 images

JUNK = [
    "",
    "-1",
    "0",
    "nan",
    "inf",
    "1e9",
    "x",
    "@out/missing/none.png",
    "@dir",
    "@exists.png",
    "@garbage.png",
    "@trunc.png",
    "@float.npz",
    "@bomb.png",
    "@ok.npz",
    "-5,3",
    "1,x",
]
# junk a typed option is more likely to get past argparse with (half the time; else any JUNK)
INT_JUNK = ["-1", "0", "1", "2", "3", "29", "1025", "10001", "99999999999999999999"]
FLOAT_JUNK = ["nan", "inf", "-inf", "-1", "0", "1e-9", "1e9", "80.5", "0.001"]
CONFIG_KEYS = [
    "train.lr",
    "train.batch_size",
    "train.steps",
    "train.ema_rates",
    "train.num_threads",
    "model.channel_mult",
    "model.img_resolution",
    "model.sigma_max",
    "model.sigma_min",
    "model.num_classes",
    "model.model_channels",
    "loss.method",
    "data.name",
    "data.root",
    "sample.sigmas",
    "train.warmup_steps",
    "train.out_dir",
    "model.in_channels",
    "model.dropout",
    "train.grad_clip",
    "lr",
    "steps",
]

# (command line, flags that are never dropped or changed: dropping them would turn a check into a long run;
# -n is pinned since any -n is valid and a large one only takes long; its checks are in test_bad_input.py)
BASES: list[tuple[list[str], set[str]]] = [
    (["sample", "--model", "fmnist-cd", "-n", "2", "-o", "@out/s.png", "--overwrite"], {"-n"}),
    (
        [
            "sample",
            "--model",
            "fmnist-cd",
            "-n",
            "2",
            "--steps",
            "2",
            "-o",
            "",
            "--npz",
            "@out/s.npz",
            "--batch-size",
            "1",
            "--seed",
            "3",
        ],
        {"-n"},
    ),
    (
        ["sample", "--model", "fmnist-edm", "-n", "1", "--steps", "2", "-o", "@out/t.png", "--sampler", "euler"],
        {"-n", "--steps"},
    ),
    (
        [
            "sample",
            "--model",
            "fmnist-cd",
            "-n",
            "1",
            "--sigmas",
            "80,0.8",
            "-o",
            "@out/m.png",
            "--threads",
            "1",
            "--device",
            "cpu",
        ],
        {"-n"},
    ),
    (
        [
            "edit",
            "inpaint",
            "--model",
            "fmnist-cd",
            "--input",
            "@ok.png",
            "--steps",
            "2",
            "-o",
            "@out/e.png",
            "--box",
            "2,2,10,10",
            "--panel",
            "@out/p.png",
        ],
        set(),
    ),
    (
        [
            "edit",
            "inpaint",
            "--model",
            "fmnist-cd",
            "--input",
            "@ok.npz",
            "--index",
            "1",
            "--sigmas",
            "80,5",
            "-o",
            "@out/e2.png",
            "--mask",
            "@mask.png",
        ],
        set(),
    ),
    (
        [
            "edit",
            "superres",
            "--model",
            "fmnist-cd",
            "--input",
            "@low.png",
            "--factor",
            "4",
            "--steps",
            "1",
            "-o",
            "@out/sr.png",
        ],
        set(),
    ),
    (
        [
            "edit",
            "stroke",
            "--model",
            "fmnist-cd",
            "--input",
            "@ok.png",
            "--sigma-start",
            "5",
            "--steps",
            "2",
            "-o",
            "@out/st.png",
        ],
        set(),
    ),
    (
        [
            "edit",
            "denoise",
            "--model",
            "fmnist-cd",
            "--input",
            "@ok.png",
            "--sigma",
            "0.5",
            "--add-noise",
            "-o",
            "@out/dn.png",
        ],
        set(),
    ),
    (["edit", "interpolate", "--model", "fmnist-cd", "--seeds", "0,1", "--frames", "3", "-o", "@out/in.png"], set()),
    (
        [
            "edit",
            "interpolate",
            "--model",
            "fmnist-cd",
            "--input",
            "@ok.npz",
            "--input2",
            "@ok.npz",
            "--index",
            "0",
            "--frames",
            "2",
            "--sigma",
            "2",
            "-o",
            "@out/in2.png",
        ],
        set(),
    ),
    (
        ["eval", "--samples", "@s.npz", "--ref", "@r.npz", "--kid-subsets", "2", "--no-floor", "-o", "@out/r.json"],
        {"--ref", "--no-floor"},
    ),
    (
        ["eval", "--model", "fmnist-cd", "-n", "6", "--ref", "@r.npz", "--no-floor", "--kid-subsets", "2"],
        {"-n", "--ref", "--no-floor", "--model"},
    ),
    (["decode", "@z.npy", "--weights", "@dec", "-o", "@out/d.png", "--steps", "1"], set()),
    (["convert-decoder", "@dec", "-o", "@out/conv"], set()),
    (["train", "--preset", "digits-ict", "--dry-run", "train.lr=1e-4", "model.model_channels=16"], {"--dry-run"}),
    (["train", "--preset", "digits-edm", "--dry-run", "--threads", "1", "model.channel_mult=1,2"], {"--dry-run"}),
    (["train", "--preset", "fmnist-ect", "--dry-run", "sample.sigmas=80,0.8"], {"--dry-run"}),
    (["presets"], set()),
    (["models"], set()),
]


class CaseTimeout(BaseException):
    """Raised by SIGALRM inside a case (a BaseException: main's catch-all must not swallow it)."""


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    from PIL import Image

    from cmkit.decoder.config import DecoderConfig
    from cmkit.decoder.testing import random_decoder, raw_latents

    d = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(d / "ok.png")
    Image.fromarray(rng.integers(0, 256, (7, 7), dtype=np.uint8)).save(d / "low.png")
    mask = np.zeros((28, 28), np.uint8)
    mask[8:20, 8:20] = 255
    Image.fromarray(mask).save(d / "mask.png")
    ok = (d / "ok.png").read_bytes()
    (d / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\ngarbage")
    (d / "trunc.png").write_bytes(ok[: len(ok) // 2])
    (d / "bomb.png").write_bytes(_png_header_only(30_000, 30_000))
    (d / "exists.png").write_bytes(b"keep")
    (d / "dir").mkdir()
    np.savez(d / "ok.npz", arr_0=rng.integers(0, 256, (3, 28, 28, 1), dtype=np.uint8))
    np.savez(d / "float.npz", arr_0=np.zeros((2, 28, 28, 1), np.float32))
    np.savez(d / "s.npz", arr_0=rng.integers(0, 256, (12, 28, 28, 1), dtype=np.uint8))
    np.savez(d / "r.npz", arr_0=rng.integers(0, 256, (16, 28, 28, 1), dtype=np.uint8))
    np.save(d / "z.npy", raw_latents(1, 4, 4, seed=1).numpy())
    random_decoder(DecoderConfig.tiny(), seed=5).save_pretrained(d / "dec")
    return d


def _flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Every option string of a command's parser and its action, without --help and --debug."""
    return {
        s: a
        for a in parser._actions
        for s in a.option_strings
        if not set(a.option_strings) & {"-h", "--help", "--debug"}
    }


def _junk(rng: random.Random, action: argparse.Action | None) -> str:
    if action is not None and rng.random() < 0.5:
        if action.choices:
            return rng.choice([*action.choices, "x"])
        if action.type is int:
            return rng.choice(INT_JUNK)
        if action.type is float:
            return rng.choice(FLOAT_JUNK)
    return rng.choice(JUNK)


def _command_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = build_parser()
    words = list(argv)
    while True:
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if sub is None or not words or words[0] not in sub.choices:
            return parser
        parser = sub.choices[words.pop(0)]


def _split(argv: list[str], flags: dict[str, argparse.Action]) -> tuple[list[str], list[list[str]]]:
    """The command words and the rest as items: [flag], [flag, value] or [positional]."""
    head = [w for w in argv[:2] if not w.startswith("-")][: 2 if argv[0] == "edit" else 1]
    items, rest = [], argv[len(head) :]
    i = 0
    while i < len(rest):
        w = rest[i]
        if w in flags and flags[w].nargs != 0:
            items.append([w, rest[i + 1]])
            i += 2
        else:
            items.append([w])
            i += 1
    return head, items


def mutate(rng: random.Random, argv: list[str], pinned: set[str]) -> list[str]:
    flags = _flags(_command_parser(argv))
    head, items = _split(argv, flags)
    for _ in range(rng.choice([1, 1, 2, 3])):
        free = [i for i, it in enumerate(items) if it[0] not in pinned]
        op = rng.choice(["drop", "dup", "junk", "junk", "add", "add", "override"])
        if op == "drop" and free:
            items.pop(rng.choice(free))
        elif op == "dup" and free:
            it = items[rng.choice(free)]
            items.append([it[0], _junk(rng, flags.get(it[0]))] if len(it) == 2 and rng.random() < 0.5 else list(it))
        elif op == "junk" and free:
            it = items[rng.choice(free)]
            if len(it) == 2:
                it[1] = _junk(rng, flags.get(it[0]))
            elif "=" in it[0]:
                it[0] = it[0].split("=")[0] + "=" + rng.choice(JUNK + INT_JUNK + FLOAT_JUNK)
            elif not it[0].startswith("-"):
                it[0] = rng.choice(JUNK)  # a positional (decode's latents, convert's source)
        elif op == "add" and flags:
            flag = rng.choice(sorted(flags))
            if flag in pinned:
                continue
            item = [flag, _junk(rng, flags[flag])] if flags[flag].nargs != 0 else [flag]
            items.insert(rng.randrange(len(items) + 1), item)
        elif op == "override" and head[0] == "train":  # beside the other key=value words (one positional run)
            at = max((i + 1 for i, it in enumerate(items) if "=" in it[0]), default=len(items))
            items.insert(at, [f"{rng.choice(CONFIG_KEYS)}={rng.choice(JUNK + INT_JUNK + FLOAT_JUNK)}"])
    return head + [w for it in items for w in it]


def _resolve(argv: list[str], fixtures, out) -> list[str]:
    def one(word: str) -> str:
        key, eq, value = word.partition("=")
        if eq and value.startswith("@") and not key.startswith("-"):
            return f"{key}={one(value)}"
        if word.startswith("@out/"):
            return str(out / word[5:])
        if word.startswith("@"):
            return str(fixtures / word[1:])
        return word

    return [one(w) for w in argv]


def _alarm(signum, frame):
    raise CaseTimeout()


@pytest.mark.skipif(not hasattr(signal, "SIGALRM"), reason="the per-case budget uses SIGALRM (POSIX)")
def test_fuzz_command_lines(fixtures, tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.chdir(tmp_path)  # junk relative outputs ('x') land here
    monkeypatch.setenv("CMKIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    out.mkdir()
    rng = random.Random(0)
    cases = []
    for _ in range(N_CASES):
        argv, pinned = rng.choice(BASES)
        cases.append(mutate(rng, argv, pinned))
    failures, codes, slowest, catch_all = [], {0: 0, 2: 0}, (0.0, None), 0
    previous = signal.signal(signal.SIGALRM, _alarm)
    start = time.perf_counter()
    try:
        for case in cases:
            argv = _resolve(case, fixtures, out)
            t0 = time.perf_counter()
            signal.alarm(CASE_BUDGET_S)
            try:
                code = main(argv)
            except CaseTimeout:
                code = "timeout"
            except SystemExit as e:  # only --help may leave main this way, and it is never generated
                code = f"SystemExit({e.code})"
            except BaseException as e:  # noqa: BLE001 - an escaped exception is a finding
                code = f"escaped {type(e).__name__}: {e}"
            finally:
                signal.alarm(0)
            took = time.perf_counter() - t0
            slowest = max(slowest, (took, case), key=lambda s: s[0])
            err = capsys.readouterr().err
            error_lines = [line for line in err.splitlines() if "error:" in line]
            catch_all += "(rerun with --debug for the traceback)" in err
            if code == 0:
                codes[0] += 1
                continue
            if code == 2 and len(error_lines) == 1 and "Traceback" not in err:
                codes[2] += 1
                continue
            failures.append((case, code, error_lines[-1] if error_lines else err.strip()[-300:]))
    finally:
        signal.signal(signal.SIGALRM, previous)
    total = time.perf_counter() - start
    print(
        f"{len(cases)} cases in {total:.1f}s: {codes[0]} ran, {codes[2]} refused in one line, "
        f"{len(failures)} failures ({catch_all} through the catch-all); slowest {slowest[0]:.2f}s: "
        f"{' '.join(slowest[1] or [])}"
    )
    assert not failures, "\n".join(f"{' '.join(c)!r} -> {code}: {line}" for c, code, line in failures)
    assert catch_all == 0, f"{catch_all} cases reached main's catch-all (a bug where the input is not checked)"
    assert codes[0] > 10 and codes[2] > 100  # the fuzz exercises both the work and the checks
