"""User-facing errors: the CLI prints these as one clear line (no traceback) and exits with status 2."""
from __future__ import annotations


class CmkitError(Exception):
    """A problem with the user's input (bad argument, missing file, wrong shape, unknown preset)."""
