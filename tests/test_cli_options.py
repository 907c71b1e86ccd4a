"""The options shared by the commands (cmkit.cli.options) and the consistency of the CLI's spelling."""

from __future__ import annotations

import argparse

import pytest
import torch

from cmkit.cli.main import build_parser, main
from cmkit.errors import CmkitError
from cmkit.inputs import apply_threads, parse_sigmas

EDIT_TASKS = ("inpaint", "colorize", "superres", "stroke", "denoise", "interpolate")

# every command that writes something, with its other required arguments
OUTPUT_COMMANDS = {
    "sample": ["sample", "--model", "m"],
    "export": ["export", "run"],
    "eval": ["eval", "--samples", "s.npz"],
    **{
        f"edit {t}": ["edit", t, "--model", "m", *([] if t == "interpolate" else ["--input", "i.png"])]
        for t in EDIT_TASKS
    },
    "decode": ["decode", "z.npy", "--weights", "w"],
    "convert-decoder": ["convert-decoder", "src"],
}
# commands that accepted --output before -o/--out was used everywhere: the old spelling still works
OUTPUT_ALIAS = ("decode", "convert-decoder")


def _subparsers(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    """Every (nested) sub-command parser, by its command line ('edit inpaint')."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[prefix + name] = sub
                found.update(_subparsers(sub, prefix + name + " "))
    return found


@pytest.mark.parametrize("name", sorted(OUTPUT_COMMANDS))
@pytest.mark.parametrize("flag", ["-o", "--out"])
def test_every_output_is_spelled_o_out(name, flag):
    args = build_parser().parse_args([*OUTPUT_COMMANDS[name], flag, "result"])
    assert args.out == "result"
    if name in OUTPUT_ALIAS:
        assert build_parser().parse_args([*OUTPUT_COMMANDS[name], "--output", "old"]).out == "old"


def test_no_command_spells_its_output_differently():
    parsers = _subparsers(build_parser())
    assert set(OUTPUT_COMMANDS) <= set(parsers)
    for name, parser in parsers.items():
        for action in parser._actions:
            strings = set(action.option_strings)
            if "--output" in strings or action.dest in ("out", "output"):
                assert action.dest == "out" and {"-o", "--out"} <= strings, (name, action.option_strings)


def test_threads_wherever_work_runs():
    parsers = _subparsers(build_parser())
    for name in ["sample", "eval", "decode", "convert-decoder", "train", "train-autoencoder", "train-decoder"] + [
        f"edit {t}" for t in EDIT_TASKS
    ]:
        assert any("--threads" in a.option_strings for a in parsers[name]._actions), name
    assert build_parser().parse_args([*OUTPUT_COMMANDS["eval"], "--threads", "3"]).threads == 3


@pytest.mark.parametrize("text,expected", [("80,0.8", [80.0, 0.8]), (" 80, 20 ,5,", [80.0, 20.0, 5.0]), ("2", [2.0])])
def test_parse_sigmas(text, expected):
    assert parse_sigmas(text) == expected


@pytest.mark.parametrize("text", ["80;0.8", "a,b", "", " , ", "80,nan", "inf,1", "80,-1", "80,0", "80 0.8"])
def test_parse_sigmas_rejects_bad_text_in_one_line(text):
    with pytest.raises(CmkitError, match="--sigmas") as e:
        parse_sigmas(text)
    assert "\n" not in str(e.value)


def test_bad_sigmas_fail_before_any_model_is_loaded(tmp_path, capsys):
    """sample, eval --model and edit share the parser, and report bad text in one line (exit 2)."""
    (tmp_path / "i.png").write_bytes(b"")  # only its existence is checked before the σ list
    missing = str(tmp_path / "no-model")
    for argv in (
        ["sample", "--model", missing, "-o", str(tmp_path / "s.png")],
        ["eval", "--model", missing],
        ["edit", "inpaint", "--model", missing, "--input", str(tmp_path / "i.png"), "-o", str(tmp_path / "e.png")],
    ):
        assert main([*argv, "--sigmas", "80,x"]) == 2, argv
        err = capsys.readouterr().err
        assert "--sigmas expects comma-separated numbers" in err and len(err.strip().splitlines()) == 1, err


def test_apply_threads():
    before = torch.get_num_threads()
    try:
        apply_threads(0)
        assert torch.get_num_threads() == before
        apply_threads(1)
        assert torch.get_num_threads() == 1
        with pytest.raises(CmkitError, match="--threads"):
            apply_threads(-2)
    finally:
        torch.set_num_threads(before)


def test_edit_help_lists_the_tasks(capsys):
    with pytest.raises(SystemExit) as e:
        main(["edit", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    from cmkit.editing.run import TASKS

    listing = " ".join(out.split())  # argparse wraps the one-line descriptions
    assert all(f"{t} {TASKS[t].help}" in listing for t in EDIT_TASKS), out
    assert "--overwrite" not in out  # the tasks' options are in `cmkit edit TASK --help`


@pytest.mark.parametrize(
    "task,shown,hidden",
    [
        ("stroke", ["--sigma-start", "--steps", "--panel", "--threads"], ["--mask", "--box", "--factor", "--frames"]),
        ("inpaint", ["--mask", "--box", "--builtin", "--sigmas"], ["--factor", "--sigma ", "--add-noise", "--seeds"]),
        ("denoise", ["--sigma ", "--add-noise"], ["--steps", "--sigmas", "--mask"]),
        ("interpolate", ["--seeds", "--input2", "--frames"], ["--panel", "--steps", "--mask"]),
    ],
)
def test_each_edit_task_shows_only_its_options(task, shown, hidden, capsys):
    with pytest.raises(SystemExit):
        main(["edit", task, "--help"])
    out = capsys.readouterr().out
    for flag in shown:
        assert flag in out, flag
    for flag in hidden:
        assert flag not in out, flag


def test_edit_tasks_reject_other_tasks_options(capsys):
    base = ["edit", "inpaint", "--model", "m", "--input", "i.png", "-o", "o.png"]
    build_parser().parse_args(base)
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*base, "--factor", "2"])
    assert e.value.code == 2 and "unrecognized arguments: --factor" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # one mask source at a time
        build_parser().parse_args([*base, "--box", "1,1,4,4", "--builtin", "left"])
    with pytest.raises(SystemExit):  # noise seeds or images, not both
        build_parser().parse_args(
            ["edit", "interpolate", "--model", "m", "-o", "o.png", "--seeds", "0,1", "--input", "a.png"]
        )


def test_edit_stroke_still_takes_the_old_sigma_spelling():
    base = ["edit", "stroke", "--model", "m", "--input", "i.png", "-o", "o.png"]
    assert build_parser().parse_args(base).sigma_start == 5.0
    assert build_parser().parse_args([*base, "--sigma-start", "3"]).sigma_start == 3.0
    assert build_parser().parse_args([*base, "--sigma", "2"]).sigma_start == 2.0


def test_per_command_defaults_are_kept():
    assert build_parser().parse_args(OUTPUT_COMMANDS["sample"]).batch_size == 256
    assert build_parser().parse_args(OUTPUT_COMMANDS["eval"]).batch_size == 500
    assert build_parser().parse_args(OUTPUT_COMMANDS["sample"]).out == "samples.png"
    args = build_parser().parse_args([*OUTPUT_COMMANDS["edit stroke"], "-o", "o.png"])
    assert args.steps == 3 and not hasattr(args, "batch_size") and not hasattr(args, "sampler")
