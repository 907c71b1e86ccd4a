"""``cmkit serve``: the backend directly, then the real page in headless Chromium (Debian's ``chromium``, driven by
Playwright with ``executable_path``; ``make test`` installs it). The browser tests share one server and one page.

Why Playwright: it drives Debian's Chromium over the DevTools protocol through ``executable_path``, so it needs no
driver binary matched to the browser's version (Selenium would need Debian's ``chromium-driver`` as well) and never
uses its own browser download (which cannot be fetched here); its pip wheel carries everything else. Its locators
wait for the page by themselves, its mouse draws on the editor's canvas, ``set_input_files`` fills Gradio's hidden
file input, and ``page.request`` fetches the images the page shows with the page's own session.

Screenshots go to a temporary folder, or to ``$CMKIT_SERVE_SCREENSHOTS`` when set (the README's pictures:
``CMKIT_SERVE_SCREENSHOTS=docs/images/serve .venv/bin/python -m pytest tests/test_serve.py``).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from cmkit.cli.serve import bind_warning, is_loopback
from cmkit.errors import CmkitError
from cmkit.serve.backend import Backend
from cmkit.serve.common import PathPolicy, mask_from_layers, to_model_image

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = [
    os.environ.get("CMKIT_CHROMIUM", ""),
    "/usr/bin/chromium",
    shutil.which("chromium") or "",
    shutil.which("chromium-browser") or "",
]


def chromium_path() -> str | None:
    return next((p for p in CHROMIUM if p and os.access(p, os.X_OK)), None)


# --- backend, no browser ---------------------------------------------------------------------------------


def test_path_policy_refuses_dotdot_and_symlinks_out(tmp_path):
    allowed = tmp_path / "runs"
    (allowed / "a").mkdir(parents=True)
    (tmp_path / "secret.txt").write_text("secret")
    (allowed / "link").symlink_to(tmp_path / "secret.txt")
    policy = PathPolicy([allowed], base=tmp_path)
    assert policy.check("runs/a", "run") == (allowed / "a").resolve()
    assert policy.check(str(allowed / "a" / ".." / "a"), "run") == (allowed / "a").resolve()
    for bad in ("runs/../secret.txt", "../" * 8 + "etc/passwd", "/etc/passwd", "runs/link", "secret.txt"):
        with pytest.raises(CmkitError, match="outside the paths given on the command line"):
            policy.check(bad, "file")
    with pytest.raises(CmkitError, match="no path given"):
        policy.check("  ", "file")


def test_backend_refuses_paths_outside_and_unknown_models(tmp_path):
    b = Backend(runs=tmp_path, base=tmp_path)
    with pytest.raises(CmkitError, match="outside"):
        b.decode("../../../etc/passwd", str(tmp_path))
    with pytest.raises(CmkitError, match="outside"):
        b.load("../" * 6 + "etc")
    with pytest.raises(CmkitError, match="outside"):
        b.run_view("../" * 6 + "etc")
    with pytest.raises(CmkitError, match="unknown model 'no-such-model'"):
        b.load("no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CmkitError, match="model not found"):
        b.load(str(tmp_path / "empty"))


def test_missing_weights_is_one_line(tmp_path):
    from cmkit.formats.zoo import models_root

    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(models_root() / "fmnist-cd" / "config.json", d / "config.json")
    with pytest.raises(CmkitError, match="missing weights|no model.safetensors"):
        Backend(allow=[tmp_path]).load(str(d))


def test_models_are_loaded_once_and_sampling_is_reproducible():
    b = Backend()
    r1 = b.sample("fmnist-cd", "auto", 1, "", 3, 4)
    r2 = b.sample("fmnist-cd", "onestep", 1, "", 3, 4)
    assert b.models.loads == 1
    assert np.array_equal(r1.native, r2.native) and r1.native.shape == (4, 28, 28, 1)
    assert r1.extra["nfe"] == 1 and "ms per image" in r1.info
    r = b.sample("fmnist-cd", "multistep", 2, "", 0, 2)
    assert r.extra["nfe"] == 2 and b.models.loads == 1
    with pytest.raises(CmkitError, match="diffusion"):
        b.sample("fmnist-edm", "onestep", 1, "", 0, 1)
    with pytest.raises(CmkitError, match="between 1 and 64"):
        b.sample("fmnist-cd", "auto", 1, "", 0, 1000)


def test_edit_keeps_unmasked_pixels_and_checks_sizes():
    b = Backend()
    img = np.random.default_rng(0).integers(0, 256, (28, 28, 1), dtype=np.uint8)
    layer = np.zeros((280, 280, 4), np.uint8)
    layer[100:180, 60:140, 3] = 255
    mask = mask_from_layers([layer], 28).astype(bool)
    assert mask.sum() == 64 and mask[10:18, 6:14].all()
    r = b.edit("fmnist-cd", "inpaint", img, [layer], steps=3)
    assert np.array_equal(r.native[0][~mask], img[~mask])
    with pytest.raises(CmkitError, match="mask is empty"):
        b.edit("fmnist-cd", "inpaint", img, [])
    with pytest.raises(CmkitError, match="is 32×32 pixels but this model works on 28×28"):
        b.check_upload("fmnist-cd", np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(CmkitError, match="colour"):
        b.edit("fmnist-cd", "colorize", img)
    with pytest.raises(CmkitError, match="editing needs a consistency model"):
        b.edit("fmnist-edm", "denoise", img)
    assert b.edit("fmnist-cd", "interpolate", None, frames=3).native.shape == (3, 28, 28, 1)
    assert to_model_image(np.zeros((28, 28, 4), np.uint8), 1, 28).shape == (28, 28, 1)


def test_teacher_of_a_two_stage_model_is_the_diffusion_model_at_the_root():
    """TCM's recorded teacher is its frozen first stage (fmnist-ect, a consistency model); the comparison follows
    the chain to the diffusion model, and a diffusion model is its own teacher."""
    b = Backend()
    assert b.teacher_for("fmnist-tcm") == "fmnist-edm"
    assert b.teacher_for("fmnist-cd") == "fmnist-edm"
    assert b.teacher_for("fmnist-edm") == "fmnist-edm"


def test_decode_tab_backend(tmp_path):
    from cmkit.decoder.config import DecoderConfig
    from cmkit.decoder.testing import random_decoder, raw_latents

    random_decoder(DecoderConfig.tiny()).save_pretrained(tmp_path / "dec")
    np.save(tmp_path / "z.npy", raw_latents(1, 4, 4).numpy())
    b = Backend(allow=[tmp_path])
    r = b.decode(str(tmp_path / "z.npy"), str(tmp_path / "dec"), 1, "", "fp32", 0, 0)
    assert r.native.shape == (1, 32, 32, 3) and "peak memory" in r.info
    b.decode(str(tmp_path / "z.npy"), str(tmp_path / "dec"), 1, "", "fp32", 0, 0)
    assert b.decoders.loads == 1
    with pytest.raises(CmkitError, match="dtype"):
        b.decode(str(tmp_path / "z.npy"), str(tmp_path / "dec"), 1, "", "fp64")


def test_model_list_offers_only_runs_that_sample(tmp_path):
    """An autoencoder or decoder run cannot sample: the page's model lists leave it out; a diffusion run is in
    the sampling list but not the editing one."""
    import torch

    from cmkit.formats.model_dir import save_model_dir
    from cmkit.training.presets import get_config

    for name, preset in (("cd", "digits-cd"), ("edm", "digits-edm"), ("ae", "digits-ae")):
        run = tmp_path / "runs" / name
        cfg = get_config(preset)
        (run / "checkpoint").mkdir(parents=True)
        for f in (run / "config.json", run / "checkpoint" / "config.json"):
            f.write_text(cfg.to_json())
        kind = "autoencoder" if name == "ae" else "denoiser"  # the kind and config are all the list reads
        save_model_dir(run / "model", {"w": torch.zeros(1)}, kind, cfg.to_dict())
    b = Backend(runs=tmp_path / "runs")
    runs = [c for c in b.model_choices() if "/" in c]
    assert sorted(Path(r).name for r in runs) == ["cd", "edm"]
    assert [Path(r).name for r in b.model_choices(consistency_only=True) if "/" in r] == ["cd"]


def test_runs_are_listed_and_their_stamp_changes_with_the_log(tmp_path):
    run = tmp_path / "runs" / "a"
    (run / "checkpoint").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"train": {"steps": 10}}))
    (run / "checkpoint" / "config.json").write_text(json.dumps({"train": {"steps": 10}}))
    (tmp_path / "runs" / "not-a-run").mkdir()
    b = Backend(runs=tmp_path / "runs")
    assert b.list_runs() == ["a"]
    before = b.run_stamp("a")
    (run / "log.jsonl").write_text(json.dumps({"step": 1, "loss": 0.5}) + "\n")
    assert b.run_stamp("a") != before
    view = b.run_view("a")
    assert view["step"] == 1 and "step 1 of 10" in view["status"] and "loss 0.5" in view["status"]
    with pytest.raises(CmkitError, match="not a training run"):
        b.run_view("not-a-run")


def test_bind_warning_only_for_non_local_hosts():
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"))
    assert bind_warning("127.0.0.1") is None
    assert "warning" in bind_warning("0.0.0.0") and "0.0.0.0" in bind_warning("0.0.0.0")
    assert bind_warning("192.168.1.5") and bind_warning("example.org")


def test_demo_prints_a_valid_serve_command():
    from cmkit.cli.main import build_parser
    from cmkit.demo import SERVE_COMMAND

    argv = SERVE_COMMAND.split()
    assert argv[1:4] == ["-m", "cmkit", "serve"]
    args = build_parser().parse_args(argv[3:])
    assert args.host == "127.0.0.1" and args.runs == "demo/runs"


def test_serve_cli_defaults_to_localhost_and_warns_for_0000(monkeypatch, capsys):
    import cmkit.cli.serve
    from cmkit.cli.main import build_parser, main

    assert build_parser().parse_args(["serve"]).host == "127.0.0.1"
    launched = {}

    class Page:
        def queue(self, **kw):
            return self

        def launch(self, **kw):
            launched.update(kw)

    monkeypatch.setattr(cmkit.cli.serve, "build", lambda backend, refresh_s=5.0: Page())
    assert main(["serve", "--host", "0.0.0.0", "--port", "7999"]) == 0
    err = capsys.readouterr().err
    assert "warning: --host 0.0.0.0" in err and launched["server_name"] == "0.0.0.0"
    assert launched["allowed_paths"] == []
    assert main(["serve", "--port", "7999"]) == 0
    assert "warning" not in capsys.readouterr().err and launched["server_name"] == "127.0.0.1"
    assert main(["serve", "--port", "70000"]) == 2
    assert "--port must be between 0 and 65535" in capsys.readouterr().err
    assert main(["serve", "--runs", "/no/such/dir"]) == 2


def test_serve_without_the_ui_extra_is_one_line(tmp_path):
    """A core install: `cmkit --help` lists serve, and `cmkit serve` names the extra to install."""
    import cmkit

    (tmp_path / "sitecustomize.py").write_text(
        "import sys\n"
        "class _NoGradio:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.partition('.')[0] == 'gradio':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, _NoGradio())\n"
    )
    src = str(Path(cmkit.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), src])}
    run = subprocess.run(
        [sys.executable, "-m", "cmkit", "--help"], env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0 and "serve" in run.stdout
    run = subprocess.run(
        [sys.executable, "-m", "cmkit", "serve", "--port", "0"], env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 2
    assert run.stderr.strip() == "cmkit: error: cmkit serve needs gradio: pip install 'cmkit[ui]'"


# --- the real page in headless Chromium ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(a: np.ndarray, path: Path) -> Path:
    from PIL import Image

    Image.fromarray(a.squeeze()).save(path)
    return path


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A tiny training run, upload files, and `cmkit serve` on a free localhost port."""
    pytest.importorskip("gradio", reason="cmkit serve needs the ui extra: pip install 'cmkit[ui]'")
    tmp = tmp_path_factory.mktemp("serve")
    runs = tmp / "runs"
    env = {**os.environ, "GRADIO_TEMP_DIR": str(tmp / "gradio"), "GRADIO_ANALYTICS_ENABLED": "False"}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "cmkit",
            "train",
            "--preset",
            "digits-ict",
            "--no-progress",
            "--out",
            str(runs / "tiny-ict"),
            "train.steps=3",
            "train.log_every=1",
            "train.sample_every=3",
            "train.num_threads=1",
        ],
        check=True,
        env=env,
        capture_output=True,
        timeout=300,
    )
    x = (
        Backend().held_out("fmnist-cd", 0)
        if _has_fmnist()
        else np.random.default_rng(1).integers(0, 256, (28, 28, 1), dtype=np.uint8)
    )
    files = {
        "good": _png(x, tmp / "input28.png"),
        "image": x,
        "wrong": _png(np.zeros((32, 32, 3), np.uint8), tmp / "wrong32.png"),
    }
    (tmp / "allowed").mkdir()
    from cmkit.decoder.config import DecoderConfig
    from cmkit.decoder.testing import random_decoder, raw_latents

    random_decoder(DecoderConfig.tiny()).save_pretrained(tmp / "allowed" / "tiny-decoder")  # random weights
    np.save(tmp / "allowed" / "latents.npy", raw_latents(2, 8, 8).numpy())
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cmkit",
            "serve",
            "--port",
            str(port),
            "--runs",
            str(runs),
            "--allow",
            str(tmp / "allowed"),
            "--threads",
            "1",
            "--refresh",
            "2",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            break
        except (urllib.error.URLError, ConnectionError, OSError):
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"cmkit serve did not start: {proc.stdout.read()[-2000:]}")
            time.sleep(0.3)
    yield {"url": url, "runs": runs, "tmp": tmp, **files}
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log = proc.stdout.read()
    # cmkit's code must never fail under the page. Tracebacks that pass through no cmkit frame are the web
    # stack's own transport errors when the browser closes mid-transfer (Starlette's ClientDisconnect during an
    # upload, h11's "Too little data for declared Content-Length" on a file response; both seen in fresh-clone
    # runs), so only tracebacks with a frame in cmkit count
    failures = [
        t for t in log.split("Traceback (most recent call last):")[1:] if re.search(r'File "[^"]*/cmkit/[^"]*\.py"', t)
    ]
    assert not failures, failures[0][-3000:]


def _has_fmnist() -> bool:
    try:
        Backend().held_out("fmnist-cd", 0)
        return True
    except CmkitError:
        return False


@pytest.fixture(scope="module")
def page(site):
    exe = chromium_path()
    if exe is None:
        pytest.skip("Debian's chromium is not installed (`make test` installs it: apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright (test extra)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox"])
        pg = browser.new_page(viewport={"width": 1280, "height": 1000})
        pg.set_default_timeout(60_000)
        pg.goto(site["url"])
        pg.wait_for_selector("#sample-run")
        yield pg
        browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    d = Path(os.environ.get("CMKIT_SERVE_SCREENSHOTS") or tmp_path_factory.mktemp("shots"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def fetch_image(page, selector: str) -> np.ndarray:
    """The pixels of the <img> in ``selector``, fetched from the server as the browser shows them."""
    from PIL import Image

    page.wait_for_selector(f"{selector} img")
    src = page.locator(f"{selector} img").first.get_attribute("src")
    if src.startswith("data:"):
        import base64

        data = base64.b64decode(src.split(",", 1)[1])
    else:
        data = page.request.get(src).body()
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def wait_text(page, selector: str, text: str, timeout: float = 60, also: str | None = None) -> str:
    """The text of ``selector`` once it contains ``text`` (or ``also``)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        content = page.locator(selector).inner_text()
        if text in content or (also and also in content):
            return content
        time.sleep(0.2)
    raise AssertionError(f"{text!r} did not appear in {selector}; it shows {content!r}")


def test_page_samples_one_step_with_the_best_one_step_model(page, shots):
    from cmkit.formats.zoo import BEST_ONESTEP

    assert page.locator("#sample-model input").input_value() == BEST_ONESTEP
    page.fill("#sample-steps input", "1")
    page.fill("#sample-n input", "16")
    page.click("#sample-run")
    status = wait_text(page, "#sample-status", "ms per image")
    assert "1 network evaluation" in status and BEST_ONESTEP in status
    img = fetch_image(page, "#sample-out")
    assert img.shape[0] > 100 and img.shape[1] > 100
    assert img.std() > 20 and len(np.unique(img)) > 20, "the sample grid is blank"
    page.fill("#sample-n input", "8")
    page.click("#sample-compare")
    wait_text(page, "#compare-status", "measured speed-up")
    assert fetch_image(page, "#sample-teacher-out").std() > 20
    page.screenshot(path=str(shots / "sample.png"), full_page=True)
    page.fill("#sample-model input", "no-such-model")
    page.keyboard.press("Enter")
    status = wait_text(page, "#sample-status", "Error")
    assert "unknown model 'no-such-model'" in status and "Traceback" not in status


def test_page_inpaints_a_drawn_mask_keeping_the_other_pixels(page, site, shots):
    page.get_by_role("tab", name="Edit").click()
    page.set_input_files("#edit-upload input[type=file]", str(site["good"]))
    wait_text(page, "#edit-status", "uploaded image loaded (28×28)")
    canvas = page.locator("#edit-canvas canvas").first
    box = canvas.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    for attempt in range(3):  # a stroke drawn while the editor still sets up its new background can be lost
        time.sleep(0.5 * (attempt + 1))
        page.mouse.move(cx - 50, cy - 30)
        page.mouse.down()
        for i in range(1, 7):  # few events: each one is a software-rendered frame of the editor
            page.mouse.move(cx - 50 + 16 * i, cy - 30 + 10 * i)
        page.mouse.up()
        page.click("#edit-run")
        status = wait_text(page, "#edit-status", "inpainted", also="the mask is empty")
        if "inpainted" in status:
            break
    assert "inpainted" in status, status
    mask = fetch_image(page, "#edit-mask")[::10, ::10, 0] > 127  # shown ×10 (nearest): one pixel per 10
    out = fetch_image(page, "#edit-out")[::10, ::10, 0]
    x = site["image"][..., 0]
    assert mask.shape == (28, 28) and 10 <= mask.sum() <= 400, f"the drawn mask has {mask.sum()} pixels"
    assert mask[8:20, 8:20].any(), "the stroke was drawn over the middle of the image"
    assert np.array_equal(out[~mask], x[~mask]), "inpainting changed pixels outside the mask"
    assert (out[mask] != x[mask]).any()
    assert f"inpainted {mask.sum()} of 784 pixels" in status
    page.screenshot(path=str(shots / "edit.png"), full_page=True)


def test_page_shows_an_error_for_a_wrong_size_upload(page, site, shots):
    page.get_by_role("tab", name="Edit").click()
    page.set_input_files("#edit-upload input[type=file]", str(site["wrong"]))
    status = wait_text(page, "#edit-status", "Error")
    assert "32×32" in status and "28×28" in status
    body = page.locator("body").inner_text()
    assert "Traceback" not in body and 'File "' not in body
    page.locator("#edit-status").screenshot(path=str(shots / "error.png"))


def test_page_decodes_latents_with_a_decoder_given_on_the_command_line(page, site, shots):
    page.get_by_role("tab", name="Decode").click()
    page.fill("#decode-latents textarea, #decode-latents input", str(site["tmp"] / "allowed" / "latents.npy"))
    page.fill("#decode-weights textarea, #decode-weights input", str(site["tmp"] / "allowed" / "tiny-decoder"))
    page.click("#decode-run")
    status = wait_text(page, "#decode-status", "decoded")
    assert "(2, 4, 8, 8) → (2, 3, 64, 64)" in status and "peak memory" in status
    assert fetch_image(page, "#decode-out").std() > 5
    page.screenshot(path=str(shots / "decode.png"), full_page=True)


def test_page_refuses_a_dotdot_path(page, site, shots):
    page.get_by_role("tab", name="Decode").click()
    page.fill("#decode-latents textarea, #decode-latents input", "../../../../../../etc/passwd")
    page.fill("#decode-weights textarea, #decode-weights input", str(site["tmp"] / "allowed" / ".." / "runs"))
    page.click("#decode-run")
    status = wait_text(page, "#decode-status", "outside the paths given on the command line")
    assert "root:" not in status
    # gradio's own file route does not serve files it did not write
    for path in (
        "/etc/passwd",
        "../../../../../../etc/passwd",
        str(site["runs"] / "tiny-ict" / "config.json"),
        "README.md",
        str(ROOT / "pyproject.toml"),
    ):  # the last two: the server's working directory
        response = page.request.get(site["url"] + "gradio_api/file=" + path)
        assert response.status in (403, 404), (path, response.status)


def test_page_runs_tab_plots_the_loss_of_a_training_run(page, site, shots):
    page.get_by_role("tab", name="Runs").click()
    page.click("#runs-refresh")
    wait_text(page, "#runs-status", "tiny-ict")
    status = wait_text(page, "#runs-status", "step 3 of 3")
    assert "loss" in status
    page.wait_for_selector("#runs-loss canvas, #runs-loss svg")
    assert page.locator("#runs-loss").inner_text().count("loss") >= 1
    log = [json.loads(line) for line in (site["runs"] / "tiny-ict" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    page.wait_for_selector("#runs-samples img")
    page.screenshot(path=str(shots / "runs.png"), full_page=True)
    # the tab refreshes by itself while a run trains (every 2 s here): a new log row appears without a click
    with open(site["runs"] / "tiny-ict" / "log.jsonl", "a") as f:
        f.write(json.dumps({**log[-1], "step": 4, "loss": 1.25}) + "\n")
    assert "loss 1.25" in wait_text(page, "#runs-status", "step 4 of 3", timeout=30)
