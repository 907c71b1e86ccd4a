"""Every bad input to the ``cmkit`` command line is one clear error line (exit 2), raised before any network runs.

One table (``CASES``): a command line, the fixture files it needs (all made once, tiny, by ``files``) and a
fragment of the expected message. ``@name`` in a command line is the path of fixture ``name``; ``@out/...`` a path
in a fresh output folder. The shipped ``fmnist-cd`` (28×28) and ``fmnist-edm`` models are the models; a guard
makes any network evaluation fail the test, so a case passes only when it is refused before sampling or editing.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch

from cmkit.cli.main import main

# ---------------------------------------------------------------------------------------------------------------
# fixtures: tiny files, made once


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width×height pixels (8-bit grey) and holds no image data: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from PIL import Image

    d = tmp_path_factory.mktemp("bad-input")
    f = {}

    def save_png(name, array, **kw):
        Image.fromarray(array, **kw).save(d / name)
        f[name] = d / name

    save_png("ok.png", np.full((28, 28), 200, np.uint8))
    save_png("wide.png", np.full((28, 36), 200, np.uint8))  # 36 wide, 28 high
    save_png("tall.png", np.full((36, 28), 200, np.uint8))  # 28 wide, 36 high
    save_png("small.png", np.full((20, 20), 200, np.uint8))
    save_png("i16.png", (np.arange(28 * 28).reshape(28, 28) * 83).astype(np.uint16))
    ok = (d / "ok.png").read_bytes()
    for name, data in {
        "empty.png": b"",
        "trunc.png": ok[: len(ok) // 2],
        "garbage.png": b"\x89PNG\r\n\x1a\nnot a png",
        "text.jpg": b"hello, I am not a JPEG",
        "bomb.png": _png_header_only(30_000, 30_000),
    }.items():
        (d / name).write_bytes(data)
        f[name] = d / name
    Image.fromarray(np.full((28, 28, 3), 90, np.uint8)).save(d / "ok.jpg")
    f["ok.jpg"] = d / "ok.jpg"
    (d / "trunc.jpg").write_bytes((d / "ok.jpg").read_bytes()[:200])
    f["trunc.jpg"] = d / "trunc.jpg"

    def save_npz(name, **arrays):
        np.savez(d / name, **arrays)
        f[name] = d / name

    save_npz("ok.npz", arr_0=np.full((3, 28, 28, 1), 100, np.uint8))
    save_npz("nokey.npz", images_=np.zeros((1, 28, 28, 1), np.uint8))
    save_npz("nothing.npz")
    save_npz("empty.npz", arr_0=np.zeros((0, 28, 28, 1), np.uint8))
    save_npz("float.npz", arr_0=np.zeros((2, 28, 28, 1), np.float32))
    save_npz("int64.npz", arr_0=np.zeros((2, 28, 28, 1), np.int64))
    save_npz("ndim.npz", arr_0=np.zeros((28,), np.uint8))
    save_npz("nchw.npz", arr_0=np.zeros((2, 1, 28, 28), np.uint8))
    save_npz("nonsquare.npz", arr_0=np.zeros((2, 28, 20, 1), np.uint8))
    save_npz("big.npz", arr_0=np.zeros((2, 32, 32, 1), np.uint8))
    save_npz("badlabels.npz", arr_0=np.zeros((4, 8, 8, 1), np.uint8), arr_1=np.array([0, 1]))
    np.save(d / "array.npy", np.zeros((1, 28, 28, 1), np.uint8))
    f["array.npy"] = d / "array.npy"
    (d / "array.npz").write_bytes((d / "array.npy").read_bytes())  # a .npy named .npz
    f["array.npz"] = d / "array.npz"
    (d / "garbage.npz").write_bytes(b"PK\x03\x04 not really a zip")
    f["garbage.npz"] = d / "garbage.npz"
    np.save(d / "latents.npy", np.random.default_rng(0).normal(0, 5, (1, 4, 4, 4)).astype(np.float32))
    f["latents.npy"] = d / "latents.npy"
    np.save(d / "latents2.npy", np.random.default_rng(0).normal(0, 5, (2, 4, 4, 4)).astype(np.float32))
    f["latents2.npy"] = d / "latents2.npy"

    for name in ("exists.png", "exists.npz", "exists.json", "exists_1.png"):
        (d / name).write_bytes(b"keep")
        f[name] = d / name
    (d / "full").mkdir()
    (d / "full" / "config.json").write_text("{}")
    f["full"] = d / "full"
    f["dir"] = d / "full"
    (d / "a-file").write_text("not a directory")
    f["a-file"] = d / "a-file"
    bad = d / "badfolder"
    bad.mkdir()
    (bad / "a.png").write_bytes(ok)
    (bad / "b.png").write_bytes(ok[: len(ok) // 2])
    f["badfolder"] = bad
    bomb = d / "bombfolder"
    bomb.mkdir()
    (bomb / "x.png").write_bytes(_png_header_only(30_000, 30_000))
    f["bombfolder"] = bomb
    return f


@pytest.fixture
def network_guard(monkeypatch):
    """Any evaluation of a consistency/diffusion network fails the case (exit 1 through the catch-all)."""
    from cmkit.precond import Precond

    def forbidden(self, *args, **kwargs):
        raise AssertionError("a network ran before the bad input was refused")

    monkeypatch.setattr(Precond, "forward", forbidden)


def _argv(line: str, files, out_dir) -> list[str]:
    def path(ref: str) -> str:  # '@name' or '@name/rest' or '@out/rest'
        name, _, rest = ref[1:].partition("/")
        base = out_dir if name == "out" else files[name]
        return str(base / rest) if rest else str(base)

    argv = []
    for word in line.split():
        key, eq, value = word.partition("=")
        if word.startswith("@"):
            word = path(word)
        elif eq and value.startswith("@"):  # key=@name (train overrides)
            word = f"{key}={path(value)}"
        elif word == "''":
            word = ""
        argv.append(word)
    return argv


EDIT = "edit inpaint --model fmnist-cd -o @out/e.png --steps 1 --input"
SAMPLE = "sample --model fmnist-cd -n 1 -o @out/s.png"
EVAL = "eval --no-floor --samples @ok.npz"
DECODE = "decode @latents.npy --weights @out/no-weights -o @out/d.png"
TRAIN = "train --preset digits-ict --out @out/run model.model_channels=16 model.channel_mult=1,2 train.steps=1"

CASES = [
    # 1. devices and threads
    ("device-bogus", f"{SAMPLE} --device bogus", "--device 'bogus' is not a device"),
    ("device-empty", f"{SAMPLE} --device ''", "is not a device; expected auto, cpu, cuda"),
    ("device-meta", f"{SAMPLE} --device meta", "--device meta holds no data"),
    ("device-cuda-index", f"{SAMPLE} --device cuda:99", "--device cuda:99"),
    ("device-tpu", f"{SAMPLE} --device xla", "does not run on 'xla' devices"),
    ("eval-device", f"{EVAL} --device bogus", "--device 'bogus' is not a device"),
    ("decode-device", f"{DECODE} --device meta", "--device meta holds no data"),
    ("threads-negative", f"{SAMPLE} --threads -1", "--threads must be 0"),
    ("threads-huge", f"{SAMPLE} --threads 100000", "--threads must be 0"),
    ("edit-threads", f"{EDIT} @ok.png --threads -1", "--threads must be 0"),
    ("eval-threads", f"{EVAL} --threads -3", "--threads must be 0"),
    ("decode-threads", f"{DECODE} --threads -1", "--threads must be 0"),
    # 2. image inputs
    ("png-empty", f"{EDIT} @empty.png", "is empty (0 bytes)"),
    ("png-truncated", f"{EDIT} @trunc.png", "cannot be read as an image"),
    ("png-garbage", f"{EDIT} @garbage.png", "cannot be read as an image"),
    ("jpeg-not", f"{EDIT} @text.jpg", "cannot be read as an image"),
    ("jpeg-truncated", f"{EDIT} @trunc.jpg", "corrupt or truncated"),
    ("png-bomb", f"{EDIT} @bomb.png", "possible decompression bomb"),
    ("png-wide", f"{EDIT} @wide.png", "is 36×28 but 28×28 images are expected"),
    ("png-tall", f"{EDIT} @tall.png", "is 28×36 but 28×28 images are expected"),
    ("png-small", f"{EDIT} @small.png", "is 20×20 but 28×28"),
    ("png-directory", f"{EDIT} @dir", "input image not found"),
    ("png-missing", f"{EDIT} @out/nowhere.png", "input image not found"),
    ("model-empty", "sample --model '' -n 1 -o @out/s.png", "--model is empty"),
    ("edit-model-empty", "edit denoise --model '' --input @ok.png -o @out/d.png", "--model is empty"),
    ("mask-truncated", f"{EDIT} @ok.png --mask @trunc.png", "mask"),
    ("mask-wide", f"{EDIT} @ok.png --mask @wide.png", "mask"),
    ("mask-missing", f"{EDIT} @ok.png --mask @out/none.png", "mask file not found"),
    (
        "input2-corrupt",
        "edit interpolate --model fmnist-cd -o @out/i.png --input @ok.png --input2 @trunc.jpg",
        "corrupt or truncated",
    ),
    ("stroke-bomb", "edit stroke --model fmnist-cd -o @out/s.png --input @bomb.png", "decompression bomb"),
    (
        "folder-truncated",
        f"{TRAIN} data.name=folder data.root=@badfolder model.img_resolution=8",
        "b.png cannot be read as an image",
    ),
    ("folder-bomb", f"{TRAIN} data.name=folder data.root=@bombfolder model.img_resolution=8", "decompression bomb"),
    # 3. array inputs
    ("npz-no-arr0", f"{EDIT} @nokey.npz", "under 'arr_0'; found keys"),
    ("npz-no-arrays", f"{EDIT} @nothing.npz", "it holds no arrays"),
    ("npz-empty", f"{EDIT} @empty.npz", "holds no images"),
    ("npz-float", f"{EDIT} @float.npz", "float32 values; expected uint8 NHWC"),
    ("npz-int64", f"{EDIT} @int64.npz", "int64 values; expected uint8 NHWC"),
    ("npz-ndim", f"{EDIT} @ndim.npz", "expected uint8 NHWC images (N, H, W, 1|3)"),
    ("npz-nchw", f"{EDIT} @nchw.npz", "looks like NCHW"),
    ("npz-nonsquare", f"{EDIT} @nonsquare.npz", "expected square images"),
    ("npz-size", f"{EDIT} @big.npz", "32×32 images but 28×28"),
    ("npz-is-npy", f"{EDIT} @array.npz", "is a .npy array, not an .npz"),
    ("npz-garbage", f"{EDIT} @garbage.npz", "not an .npz archive"),
    ("index-negative", f"{EDIT} @ok.npz --index -1", "--index must be 0 or more"),
    ("index-range", f"{EDIT} @ok.npz --index 3", "--index 3 is out of range"),
    ("index-single", f"{EDIT} @ok.png --index 2", "is a single image"),
    ("eval-float", "eval --no-floor --samples @float.npz", "float32 values"),
    ("eval-nokey", "eval --no-floor --samples @nokey.npz", "under 'arr_0'"),
    ("eval-png", "eval --no-floor --samples @ok.png", "not an .npz archive"),
    ("eval-ref-float", f"{EVAL} --ref @float.npz", "float32 values"),
    ("eval-ref-npy", f"{EVAL} --ref @array.npy", "is a .npy array"),
    ("npz-dataset-float", f"{TRAIN} data.name=npz data.root=@float.npz model.img_resolution=28", "float32 values"),
    ("npz-dataset-labels", f"{TRAIN} data.name=npz data.root=@badlabels.npz", "must be 4 integers"),
    # 4. numbers
    ("sigmas-nan", f"{SAMPLE} --sigmas nan", "--sigmas values must be positive finite"),
    ("sigmas-inf", f"{SAMPLE} --sigmas inf,1", "--sigmas values must be positive finite"),
    ("edit-sigmas-range", f"{EDIT} @ok.png --sigmas 500,1", "--sigmas: σ values must lie in"),
    (
        "denoise-negative",
        "edit denoise --model fmnist-cd --input @ok.png -o @out/d.png --sigma -1",
        "--sigma must be positive",
    ),
    (
        "denoise-nan",
        "edit denoise --model fmnist-cd --input @ok.png -o @out/d.png --sigma nan",
        "--sigma must be a finite number",
    ),
    (
        "denoise-range",
        "edit denoise --model fmnist-cd --input @ok.png -o @out/d.png --sigma 1e9",
        "outside the model's σ range",
    ),
    (
        "stroke-above-max",
        "edit stroke --model fmnist-cd --input @ok.png -o @out/s.png --sigma-start 500",
        "--sigma-start 500 is outside the model's σ range [0.002, 80]",
    ),
    (
        "superres-factor-0",
        "edit superres --model fmnist-cd --input @ok.png -o @out/s.png --factor 0",
        "--factor must be positive",
    ),
    (
        "superres-factor-3",
        "edit superres --model fmnist-cd --input @ok.png -o @out/s.png --factor 3",
        "--factor 3 does not divide",
    ),
    ("interpolate-frames-0", "edit interpolate --model fmnist-cd -o @out/i.png --frames 0", "--frames must be"),
    ("interpolate-seeds", "edit interpolate --model fmnist-cd -o @out/i.png --seeds=-1,2", "--seeds must be"),
    (
        "interpolate-sigma",
        "edit interpolate --model fmnist-cd -o @out/i.png --input @ok.png --input2 @ok.png --sigma inf",
        "--sigma must be a finite number",
    ),
    ("kid-subsets-0", f"{EVAL} --kid-subsets 0", "--kid-subsets must be positive; got 0"),
    ("sample-n-0", "sample --model fmnist-cd -n 0 -o @out/s.png", "-n must be positive"),
    ("sample-batch-0", f"{SAMPLE} --batch-size 0", "--batch-size must be positive"),
    ("sample-steps-0", f"{SAMPLE} --steps 0", "--steps must be positive"),
    ("sample-seed", f"{SAMPLE} --seed -5", "--seed must be between"),
    ("heun-steps-1", "sample --model fmnist-edm -n 1 -o @out/s.png --steps 1", "needs at least 2 σ levels"),
    ("eval-n-0", "eval --no-floor --model fmnist-cd -n 0", "-n must be positive"),
    ("eval-batch-0", "eval --no-floor --model fmnist-cd -n 2 --batch-size 0", "--batch-size must be positive"),
    ("decode-schedule-nan", f"{DECODE} --schedule nan", "finite numbers in (0, 1]"),
    ("decode-schedule-zero", f"{DECODE} --schedule 0,0", "finite numbers in (0, 1]"),
    ("decode-schedule-up", f"{DECODE} --schedule 0.5,1", "must decrease"),
    ("decode-tile-0", f"{DECODE} --tile 0", "--tile must be positive"),
    ("decode-overlap", f"{DECODE} --tile 4 --tile-overlap 4", "must be smaller than --tile"),
    (
        "sample-n-huge",
        "sample --model fmnist-cd -n 99999999999999999999 -o @out/s.png",
        "-n must be at most 10,000,000",
    ),
    ("sample-steps-huge", f"{SAMPLE} --steps 99999999999999999999", "--steps must be at most 10,000"),
    ("edit-steps-huge", f"{EDIT} @ok.png --steps 99999999999999999999", "--steps must be at most 10,000"),
    ("kid-subsets-huge", f"{EVAL} --kid-subsets 99999999999999999999", "--kid-subsets must be at most"),
    ("decode-steps-huge", f"{DECODE} --steps 99999999999999999999", "--steps must be at most 1,024"),
    (
        "frames-huge",
        "edit interpolate --model fmnist-cd -o @out/i.png --frames 100000000",
        "--frames must be at most 1,000",
    ),
    ("argparse-int", f"{SAMPLE} -n x", "invalid int value: 'x'"),
    (
        "argparse-float",
        "edit denoise --model fmnist-cd --input @ok.png -o @out/d.png --sigma x",
        "invalid float value: 'x'",
    ),
    # 5. output paths
    ("sample-exists", "sample --model fmnist-cd -n 1 -o @exists.png", "exists; pass --overwrite"),
    ("sample-npz-exists", f"{SAMPLE} --npz @exists.npz", "exists; pass --overwrite"),
    ("sample-npz-suffix", f"{SAMPLE} --npz @out/s.dat", "expected a .npz file name"),
    ("sample-png-suffix", "sample --model fmnist-cd -n 1 -o @out/s", "expected a .png or .jpg or .jpeg file name"),
    ("sample-o-dir", "sample --model fmnist-cd -n 1 -o @dir", "is a directory"),
    ("sample-parent-file", "sample --model fmnist-cd -n 1 -o @a-file/s.png", "is not a directory"),
    ("sample-nothing", "sample --model fmnist-cd -n 1 -o ''", "nothing to write"),
    ("edit-exists", "edit inpaint --model fmnist-cd --input @ok.png -o @exists.png", "exists; pass --overwrite"),
    ("edit-panel-exists", f"{EDIT} @ok.png --panel @exists.png", "exists; pass --overwrite"),
    ("edit-panel-same", "edit inpaint --model fmnist-cd --input @ok.png -o @out/x.png --panel @out/x.png", "both name"),
    ("edit-o-empty", "edit inpaint --model fmnist-cd --input @ok.png -o ''", "nothing to write"),
    ("edit-o-dir", "edit inpaint --model fmnist-cd --input @ok.png -o @dir", "is a directory"),
    ("eval-exists", f"{EVAL} -o @exists.json", "exists; pass --overwrite"),
    ("eval-o-dir", f"{EVAL} -o @dir", "is a directory"),
    ("decode-exists", "decode @latents.npy --weights @out/w -o @exists.png", "exists; pass --overwrite"),
    ("decode-batch-exists", "decode @latents2.npy --weights @out/w -o @exists.png", "exists_1.png exists"),
    ("decode-o-empty", "decode @latents.npy --weights @out/w -o ''", "-o is empty"),
    ("decode-o-jpg", "decode @latents.npy --weights @out/w -o @out/d.jpg", "expected a .png file name"),
    ("convert-exists", "convert-decoder @out/src -o @full", "exists; pass --overwrite"),
    ("convert-file", "convert-decoder @out/src -o @a-file", "is a file; expected a directory"),
    ("convert-empty", "convert-decoder @out/src -o ''", "-o is empty"),
]


@pytest.mark.parametrize("line,fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(line, fragment, files, tmp_path, capsys, network_guard, one_thread):
    if "cuda" in line and torch.cuda.is_available() and "cuda:99" not in line:
        pytest.skip("a CUDA device is present")
    out_dir = tmp_path / "out"
    argv = _argv(line, files, out_dir)
    code = main(argv)
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2, (code, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert fragment in lines[0], (fragment, lines[0])
    if not line.startswith("train"):
        assert not out_dir.exists() or not any(out_dir.rglob("*")), "an output was written"
    for name in ("exists.png", "exists.npz", "exists.json", "exists_1.png"):
        assert files[name].read_bytes() == b"keep"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_device_cuda_without_cuda(files, tmp_path, capsys):
    assert main(_argv(f"{SAMPLE} --device cuda", files, tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cmkit: error: --device cuda: ") and "--device cpu" in err and "\n" not in err


def test_sixteen_bit_png_is_scaled_not_clipped(files):
    from PIL import Image

    from cmkit.imageio import read_image

    raw = np.asarray(Image.open(files["i16.png"])).astype(np.float64)
    grey = read_image(files["i16.png"], "L")
    assert grey.dtype == np.uint8 and np.array_equal(grey, np.round(raw / 257).astype(np.uint8))
    assert len(np.unique(grey)) > 200  # Pillow's convert("L") clips everything above 255 to white
    assert np.array_equal(read_image(files["i16.png"], "RGB")[..., 1], grey)


def test_good_inputs_still_work(files, tmp_path, capsys, one_thread):
    """The same checks accept the good inputs: a 16-bit PNG, a JPEG, one image of an .npz, both outputs."""
    out, panel = tmp_path / "o.png", tmp_path / "p.png"
    for inp in ("i16.png", "ok.jpg"):
        assert (
            main(
                [
                    "edit",
                    "denoise",
                    "--model",
                    "fmnist-cd",
                    "--input",
                    str(files[inp]),
                    "-o",
                    str(out),
                    "--panel",
                    str(panel),
                    "--overwrite",
                ]
            )
            == 0
        )
    assert (
        main(
            [
                "edit",
                "inpaint",
                "--model",
                "fmnist-cd",
                "--input",
                str(files["ok.npz"]),
                "--index",
                "2",
                "--steps",
                "1",
                "-o",
                str(out),
                "--overwrite",
            ]
        )
        == 0
    )
    assert main(["sample", "--model", "fmnist-cd", "-n", "1", "-o", "", "--npz", str(tmp_path / "s.npz")]) == 0
    assert np.load(tmp_path / "s.npz")["arr_0"].shape == (1, 28, 28, 1)
    capsys.readouterr()


def test_unwritable_output_directory_is_refused_before_work(files, tmp_path, monkeypatch, capsys, network_guard):
    import cmkit.inputs

    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = cmkit.inputs.os.access
    monkeypatch.setattr(
        cmkit.inputs.os, "access", lambda p, mode: False if str(p) == str(locked) else real_access(p, mode)
    )  # root may write anywhere: simulate a read-only folder
    for argv in (
        ["sample", "--model", "fmnist-cd", "-n", "1", "-o", str(locked / "new" / "s.png")],
        ["edit", "denoise", "--model", "fmnist-cd", "--input", str(files["ok.png"]), "-o", str(locked / "d.png")],
        ["eval", "--samples", str(files["ok.npz"]), "--no-floor", "-o", str(locked / "r.json")],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert (
            err.strip() == f"cmkit: error: -o {argv[argv.index('-o') + 1]}: cannot write in {locked} "
            "(permission denied)"
        ), err
    assert not any(locked.iterdir())


def test_syntax_errors_are_one_line(capsys):
    for argv, fragment in (
        (["sample"], "the following arguments are required: --model"),
        ([], "the following arguments are required: COMMAND"),
        (
            ["edit", "inpaint", "--model", "m", "--input", "i.png", "-o", "o.png", "--factor", "2"],
            "unrecognized arguments: --factor 2",
        ),
        (["sample", "--model", "m", "--sampler", "fast"], "invalid choice: 'fast'"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and fragment in err and "usage:" not in err, err


def test_unexpected_errors_are_one_line_and_debug_reraises(monkeypatch, capsys):
    import cmkit.cli.main

    def broken(args):
        raise RuntimeError("something\nwent wrong")

    monkeypatch.setattr(cmkit.cli.main, "cmd_presets", broken)
    assert main(["presets"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "cmkit: error: RuntimeError: something went wrong (rerun with --debug for the traceback)"
    ]
    for argv in (["--debug", "presets"], ["presets", "--debug"]):
        with pytest.raises(RuntimeError, match="went wrong"):
            main(argv)


def test_interrupt_and_broken_pipe_are_kept(monkeypatch, capsys):
    import cmkit.cli.main

    for exc, code in ((KeyboardInterrupt, 130), (BrokenPipeError, 0)):

        def raising(args, exc=exc):
            raise exc()

        monkeypatch.setattr(cmkit.cli.main, "cmd_presets", raising)
        assert main(["presets"]) == code
    assert capsys.readouterr().err.strip() == "cmkit: interrupted"
