"""The README's command blocks, top to bottom, in one fresh directory: every command that needs only what the
README itself made (or a shipped model) runs and exits 0; every other one (long trainings, released files the
reader must obtain, servers) parses, and a `cmkit train` line also builds its config. The Python block runs with
its trainings cut to two steps. So the README cannot drift from the code."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
#: sub-commands that are quick on shipped models and files made by earlier lines
QUICK = {"presets", "models", "images", "edit", "sample"}  # eval: the real-vs-real floor takes minutes
INPUT_FLAGS = ("--model", "--input", "--input2", "--mask", "--samples", "--ref", "--resume", "--weights")


def blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", README.read_text(), flags=re.S)


COMMANDS = ("cmkit ", "torchrun ", "python ", "make ", ". ")


def commands(block: str) -> list[list[str]]:
    """Shell lines of a command block (backslash continuations joined), split as a shell would, comments
    dropped; a block that is not commands (the Layout tree) gives none."""
    lines = [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    code = [line for line in lines if not line.lstrip().startswith("#")]
    if not code or not code[0].startswith(COMMANDS):
        return []
    return [argv for line in lines if (argv := shlex.split(line, comments=True))]


def _available(value: str) -> bool:
    from cmkit.formats.zoo import shipped_models

    return Path(value).exists() or value in shipped_models() or value == "fmnist-test"


def runnable(argv: list[str]) -> bool:
    """A quick command whose every input exists here (a file made above, a shipped model or reference)."""
    if argv[0] != "cmkit" or len(argv) < 2:
        return False
    if argv[1] == "train":  # a dry run, when the files its preset reads exist here (a teacher run, data)
        if "--dry-run" not in argv:
            return False
        from cmkit.cli.main import build_parser
        from cmkit.training.presets import get_config, missing_inputs

        args, extra = build_parser().parse_known_args(argv[1:])
        return not missing_inputs(get_config(args.preset, list(args.overrides) + extra))
    if argv[1] not in QUICK or ("-n" in argv and int(argv[argv.index("-n") + 1]) > 1000):
        return False
    inputs = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in INPUT_FLAGS]
    return all(_available(v) for v in inputs)


def parses(argv: list[str]) -> None:
    """argparse accepts the line; a training line's preset and overrides build a valid config."""
    from cmkit.cli.main import build_parser
    from cmkit.training.presets import get_config

    args, extra = build_parser().parse_known_args(argv)
    assert all("=" in e for e in extra), (argv, extra)
    if args.command == "train" and args.preset:
        get_config(args.preset, list(args.overrides) + extra)


def test_every_readme_command_runs_or_parses(tmp_path, monkeypatch, capsys):
    from cmkit.cli.main import main

    monkeypatch.chdir(tmp_path)
    ran, parsed = [], []
    for block in blocks("text") + blocks("bash"):
        for argv in commands(block):
            if argv[0] in ("make", ".") or argv[:2] == ["python", "benchmarks/decoder_quality.py"]:
                if argv[0] == "python":
                    assert (README.parent / argv[1]).is_file(), argv
                continue
            if argv[0] == "python":  # a one-liner that makes an input file
                assert subprocess.run([sys.executable, *argv[1:]], timeout=60).returncode == 0, argv
                ran.append(argv)
                continue
            if argv[0] == "torchrun":
                argv = ["cmkit", *argv[argv.index("cmkit") + 1 :]]
            assert argv[0] == "cmkit", f"README line that is not a cmkit command: {argv}"
            if runnable(argv):
                code = main(argv[1:])
                assert code == 0, (argv, capsys.readouterr().err[-2000:])
                ran.append(argv)
            else:
                parses(argv[1:])
                parsed.append(argv)
    # the quick start's inputs, every editing task and the samplers really ran; long ones were only parsed
    assert len(ran) >= 20 and len(parsed) >= 30, (len(ran), len(parsed))
    edits = {a[2] for a in ran if a[1] == "edit"}
    assert edits == {"inpaint", "superres", "colorize", "stroke", "denoise", "interpolate"}, edits
    assert (tmp_path / "inpainted.png").is_file() and (tmp_path / "frame_8.png").is_file()


def test_the_python_example_runs(tmp_path, monkeypatch):
    """The API example as written, with each training cut to 2 steps (the example itself trains for minutes)."""
    import cmkit

    monkeypatch.chdir(tmp_path)
    real = cmkit.get_config
    monkeypatch.setattr(
        cmkit,
        "get_config",
        lambda preset, overrides=(): real(
            preset, [*overrides, "train.steps=2", "train.sample_every=0", "model.model_channels=16"]
        ),
    )
    (code,) = blocks("python")
    exec(compile(code, str(README), "exec"), {})
    assert (tmp_path / "api_1step.png").is_file() and (tmp_path / "api_cd.png").is_file()
    assert (tmp_path / "runs" / "api-cd" / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize("kind", ["text", "bash", "python"])
def test_readme_has_the_blocks_it_should(kind):
    assert blocks(kind), kind
