"""User-facing errors: the CLI prints these as one clear line (no traceback) and exits with status 2."""

from __future__ import annotations

import importlib
from types import ModuleType


class CmkitError(Exception):
    """A problem with the user's input (bad argument, missing file, wrong shape, unknown preset)."""


def optional_import(module: str, extra: str, what: str) -> ModuleType:
    """Import ``module`` (a package outside the core dependencies), or raise :class:`CmkitError` in one line.

    ``extra`` is the ``cmkit[extra]`` that installs it and ``what`` the feature that needs it, e.g.
    ``optional_import("scipy.linalg", "metrics", "cmkit eval")`` raises
    "cmkit eval needs scipy: pip install 'cmkit[metrics]'" when scipy is missing.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        package = module.split(".")[0]
        if e.name != package:
            raise  # the package is there but a sub-module or a dependency of it is not: show the real error
        raise CmkitError(f"{what} needs {package}: pip install 'cmkit[{extra}]'") from None


def one_line(text: object, limit: int = 500) -> str:
    """A message on one line (whitespace runs, newlines included, become one space), at most ``limit`` chars:
    how the CLI and the web page show every error."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."
