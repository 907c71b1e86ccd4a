"""The source keeps its floors (scripts/layout_report.py): no import cycle, no import that points up the layers,
no function-local import of a cmkit module, and one table of run kinds that matches the model directory's kinds."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from cmkit.formats.model_dir import MODEL_KINDS
from cmkit.training.kinds import RUN_KINDS

spec = importlib.util.spec_from_file_location(
    "layout_report", Path(__file__).parents[1] / "scripts" / "layout_report.py"
)
layout = sys.modules["layout_report"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(layout)
SOURCE = layout.read_source()


def test_every_module_has_a_layer():
    assert not [m for m in SOURCE.modules if layout.layer(m) is None]


def test_no_import_cycle():
    assert layout.cycles(SOURCE.imports) == []


def test_no_import_points_up_the_layers():
    assert layout.upward(SOURCE) == []


def test_cmkit_imports_are_at_the_top_of_their_module():
    assert layout.local_imports(SOURCE) == []


def test_the_checker_sees_a_cycle_and_an_upward_import():
    """The checks above can fail: a two-module loop is a cycle, and a math module importing training is upward."""
    assert layout.cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    fake = layout.Source(imports={"schedules": {"training.loop"}, "training.loop": {"schedules"}})
    assert layout.upward(fake) == [("schedules", "training.loop")]


def test_one_table_of_run_kinds():
    assert tuple(RUN_KINDS) == MODEL_KINDS
    for kind, entry in RUN_KINDS.items():
        assert entry.config.kind == kind


def test_the_readmes_layout_names_every_module():
    """The README's Layout section is the tree's map: every module of src/cmkit appears in it by its file name."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    missing = [
        m
        for m, path in SOURCE.modules.items()
        if path.name != "__init__.py" and path.name not in layout and m.replace(".", "/") + ".py" not in layout
    ]
    assert not missing, missing


def test_no_function_is_over_80_lines():
    """Long functions are split into named steps (the page per tab, the parser per command, a network per part)."""
    assert [where for n, where in SOURCE.functions if n > 80] == []
