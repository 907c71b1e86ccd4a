"""A core install (``pip install cmkit``, no extras) runs the CLI: help, sampling and editing work, and what
needs an extra fails with one line naming the package and the extra.

The optional packages are hidden from ``python -m cmkit`` subprocesses by a ``sitecustomize`` on PYTHONPATH
whose ``sys.meta_path`` finder refuses them, so these tests run in the full test environment.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cmkit

OPTIONAL = ("scipy", "diffusers")  # everything outside pyproject's core dependencies that cmkit uses

BLOCKER = f"""
import sys

class _NoExtras:
    BLOCKED = {OPTIONAL!r}

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in self.BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, _NoExtras())
"""


@pytest.fixture(scope="module")
def core_env(tmp_path_factory) -> dict[str, str]:
    """Environment for a subprocess that sees cmkit (this checkout) but none of the optional packages."""
    site = tmp_path_factory.mktemp("no_extras")
    (site / "sitecustomize.py").write_text(textwrap.dedent(BLOCKER))
    src = str(Path(cmkit.__file__).resolve().parent.parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CMKIT_")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), src, *filter(None, [os.environ.get("PYTHONPATH")])])
    env["OMP_NUM_THREADS"] = "1"
    return env


def cmkit_run(env: dict[str, str], cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cmkit", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_the_blocker_hides_the_optional_packages(core_env, tmp_path):
    code = (
        "import importlib\n"
        f"for name in {OPTIONAL + ('scipy.linalg', 'diffusers.models')!r}:\n"
        "    try:\n        importlib.import_module(name)\n    except ModuleNotFoundError:\n        continue\n"
        "    raise SystemExit(f'{name} imported')\n"
        "import cmkit, cmkit.metrics, cmkit.cli.eval, cmkit.cli.edit, cmkit.cli.decoder, cmkit.cli.serve\n"
        "import cmkit.decoder.interop, cmkit.lpips, cmkit.distances\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=core_env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr


def test_help(core_env, tmp_path):
    r = cmkit_run(core_env, tmp_path, "--help")
    assert r.returncode == 0, r.stderr
    for command in ("sample", "edit", "eval"):
        assert command in r.stdout


def test_one_step_sample_from_a_shipped_model(core_env, tmp_path):
    r = cmkit_run(
        core_env, tmp_path, "sample", "--model", "fmnist-cd", "-n", "4", "--steps", "1", "-o", "x.png", "--npz", "x.npz"
    )
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "x.png").size[0] > 28
    assert np.load(tmp_path / "x.npz")["arr_0"].shape == (4, 28, 28, 1)


def test_inpainting_with_a_shipped_model(core_env, tmp_path):
    img = (np.add.outer(np.arange(28), np.arange(28)) * 4).astype(np.uint8)
    Image.fromarray(img, mode="L").save(tmp_path / "in.png")
    r = cmkit_run(
        core_env,
        tmp_path,
        "edit",
        "inpaint",
        "--model",
        "fmnist-cd",
        "--input",
        "in.png",
        "--builtin",
        "center",
        "--steps",
        "2",
        "-o",
        "out.png",
    )
    assert r.returncode == 0, r.stderr
    assert min(Image.open(tmp_path / "out.png").size) >= 28


def _error_lines(stderr: str) -> list[str]:
    """Non-empty stderr lines, progress-bar redraws (\\r) split apart."""
    return [s for line in stderr.splitlines() for s in line.split("\r") if s.strip()]


def _assert_needs_scipy(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    last = _error_lines(r.stderr)[-1]
    assert last.startswith("cmkit: error:") and "scipy" in last and "pip install 'cmkit[metrics]'" in last


def test_eval_without_scipy_is_one_line_naming_the_extra(core_env, tmp_path):
    samples = tmp_path / "s.npz"
    np.savez(samples, np.zeros((8, 28, 28, 1), np.uint8))
    r = cmkit_run(core_env, tmp_path, "eval", "--samples", str(samples))
    _assert_needs_scipy(r)
    assert len(_error_lines(r.stderr)) == 1, r.stderr


def test_eval_of_a_model_without_scipy_fails_cleanly(core_env, tmp_path):
    r = cmkit_run(core_env, tmp_path, "eval", "--model", "fmnist-cd", "-n", "8", "--steps", "1")
    _assert_needs_scipy(r)
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr  # refused before any sampling (no progress bar)


def test_diffusers_adapter_without_diffusers_names_the_extra(core_env, tmp_path):
    code = textwrap.dedent("""
        from cmkit.decoder.interop import DiffusersDecoderAdapter
        from cmkit.decoder.testing import random_decoder, raw_latents
        from cmkit.errors import CmkitError
        try:
            DiffusersDecoderAdapter(random_decoder()).decode(raw_latents(1, 4, 4))
        except CmkitError as e:
            print(e)
        """)
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=core_env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "DiffusersDecoderAdapter needs diffusers: pip install 'cmkit[diffusers]'"


def test_package_data_ships_every_asset():
    """pyproject's package-data globs cover every file under src/cmkit/assets (the shipped models included)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file() or not (root / "src" / "cmkit" / "assets").is_dir():
        pytest.skip("not a source checkout")
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["cmkit"]
    package = root / "src" / "cmkit"
    files = [p for p in (package / "assets").rglob("*") if p.is_file()]
    assert any(p.parent.parent.name == "models" for p in files)
    missed = [
        str(p.relative_to(package))
        for p in files
        if not any(
            p.relative_to(package).match(g) and len(p.relative_to(package).parts) == len(Path(g).parts) for g in globs
        )
    ]
    assert not missed, f"not in package-data {globs}: {missed}"
