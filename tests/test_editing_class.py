"""``cmkit edit TASK --class C``: class-conditional editing with a tiny class-conditional consistency model
(ADM, 10 classes, 8×8 digits): the label reaches the network, known regions stay exact, and a label out of range
or given to an unconditional model is one error line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cmkit.cli.main import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from cmkit.formats.model_dir import save_model_dir
    from cmkit.training.presets import get_config

    root = tmp_path_factory.mktemp("edit_class")
    cfg = get_config(
        "digits-ict",
        [
            "model.arch=adm",
            "model.model_channels=32",
            "model.channel_mult=1,2",
            "model.attn_resolutions=4",
            "model.head_channels=16",
            "model.num_classes=10",
        ],
    )
    model = cfg.model.build()
    torch.manual_seed(0)
    for name, p in model.named_parameters():  # a strong label embedding: classes visibly differ in 8 bits
        torch.nn.init.normal_(p, std=3.0 if "label_emb" in name else 0.05)
    save_model_dir(root / "m", model, "denoiser", cfg.to_dict())
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(root / "in.png")
    Image.fromarray(rng.integers(0, 256, (4, 4), dtype=np.uint8)).save(root / "low.png")
    return root


def _run(root, task, cls, *extra):
    out = root / f"{task}-{cls}.png"
    argv = [
        "edit",
        task,
        "--model",
        str(root / "m"),
        *extra,
        "--npz",
        str(out.with_suffix(".npz")),
        "--overwrite",
        "--threads",
        "1",
    ]
    assert main(argv + (["--class", cls] if cls is not None else [])) == 0, (task, cls)
    a = np.load(out.with_suffix(".npz"))["arr_0"].astype(int)  # the edited 8×8 image(s), uint8 NHWC
    return a[0, ..., 0] if len(a) == 1 else a


TASKS = {
    "inpaint": ["--builtin", "center", "--steps", "2"],
    "superres": ["--factor", "2", "--steps", "2"],
    "stroke": ["--steps", "2"],
    "denoise": ["--sigma", "0.5"],
    "interpolate": ["--seeds", "0,1", "--frames", "2"],
}


@pytest.mark.parametrize("task", sorted(TASKS))
def test_the_class_reaches_the_network_in_every_task(setup, task, one_thread):
    extra = list(TASKS[task])
    if task != "interpolate":
        extra = ["--input", str(setup / ("low.png" if task == "superres" else "in.png")), *extra]
    a, b = _run(setup, task, "3", *extra), _run(setup, task, "7", *extra)
    assert not np.array_equal(a, b)  # a different label, a different edit
    assert np.array_equal(a, _run(setup, task, "3", *extra))  # and the same label, the same edit


def test_inpainting_with_a_class_keeps_the_known_pixels(setup, one_thread):
    from cmkit.editing.masks import builtin_mask

    known = builtin_mask("center", 8).numpy() == 0
    original = np.asarray(Image.open(setup / "in.png")).astype(int)
    for cls in ("0", "5", "9"):
        out = _run(setup, "inpaint", cls, "--input", str(setup / "in.png"), "--builtin", "center", "--steps", "2")
        assert out.shape == (8, 8) and np.array_equal(out[known], original[known]), cls
        assert not np.array_equal(out[~known], original[~known])


def test_without_a_class_labels_are_random_from_the_seed(setup, capsys, one_thread):
    extra = ["--input", str(setup / "in.png"), "--sigma", "0.5"]
    a = _run(setup, "denoise", None, *extra)
    assert "random class labels" in capsys.readouterr().out
    label = int(torch.randint(10, (1,), generator=torch.Generator().manual_seed(0)))
    assert np.array_equal(a, _run(setup, "denoise", str(label), *extra))


def test_class_errors_are_one_line(setup, tmp_path, capsys):
    base = ["edit", "denoise", "--input", str(setup / "in.png"), "-o", str(tmp_path / "x.png")]
    for model, cls, msg in (
        (str(setup / "m"), "10", "must lie in [0, 9]"),
        (str(setup / "m"), "-1", "must lie in"),
        (str(setup / "m"), "a", "integer labels"),
        ("fmnist-cd", "1", "unconditional"),
    ):
        capsys.readouterr()
        assert main(base + ["--model", model, "--class", cls]) == 2, (model, cls)
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("precond", ["trigflow", "meanflow"])
def test_scm_and_meanflow_models_edit_like_consistency_models(precond, tmp_path, capsys, one_thread):
    """Editing takes any one-step generator (CM, sCM's TrigFlow f_θ, MeanFlow's flow map to 0): inpainting keeps
    the known pixels. A TrigFlow network trained with the diffusion loss (sCM's teacher) is refused in one line."""
    from cmkit.editing.masks import builtin_mask
    from cmkit.formats.model_dir import save_model_dir
    from cmkit.training.presets import get_config

    preset, extra = {"trigflow": ("digits-sct", ["train.init_from="]), "meanflow": ("digits-meanflow", [])}[precond]
    cfg = get_config(preset, extra)
    model = cfg.model.build()
    torch.manual_seed(0)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    save_model_dir(tmp_path / "m", model, "denoiser", cfg.to_dict())
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(tmp_path / "in.png")
    out = tmp_path / "out.png"
    argv = [
        "edit",
        "inpaint",
        "--input",
        str(tmp_path / "in.png"),
        "--builtin",
        "center",
        "--steps",
        "2",
        "--threads",
        "1",
    ]
    assert main(argv + ["-o", str(out), "--model", str(tmp_path / "m")]) == 0
    known = builtin_mask("center", 8).numpy() == 0
    edited = np.asarray(Image.open(out)).astype(int)  # the 8×8 result itself
    assert np.array_equal(edited[known], np.asarray(Image.open(tmp_path / "in.png")).astype(int)[known])
    if precond == "trigflow":
        cfg.loss.method = "edm"  # the same network as a TrigFlow diffusion model
        save_model_dir(tmp_path / "d", model, "denoiser", cfg.to_dict())
        capsys.readouterr()
        assert main(argv + ["-o", str(tmp_path / "x.png"), "--model", str(tmp_path / "d")]) == 2
        err = capsys.readouterr().err
        assert "editing needs a consistency model" in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("task", ["denoise", "interpolate"])
def test_the_page_edits_with_the_class_and_matches_the_cli(setup, task, one_thread):
    """The web page's backend and ``cmkit edit`` run one dispatcher (cmkit.editing.run): the same image, seed and
    class give the same output from both, and the page's class reaches the network too."""
    from cmkit.serve.backend import Backend

    backend = Backend(allow=[setup])
    image = np.asarray(Image.open(setup / "in.png"))[..., None]
    kw = dict(sigma=0.5, seed=0, frames=2, seed2=1)
    page = {
        c: backend.edit(str(setup / "m"), task, None if task == "interpolate" else image, classes=c, **kw)
        for c in ("3", "7")
    }
    assert not np.array_equal(page["3"].native, page["7"].native) and "(class 3" in page["3"].info
    if task == "denoise":  # the page adds the noise it removes; the CLI does with --add-noise
        cli = _run(setup, task, "3", "--input", str(setup / "in.png"), "--sigma", "0.5", "--add-noise")
        assert np.array_equal(page["3"].native[0, ..., 0].astype(int), cli)
    else:
        cli = _run(setup, task, "3", "--seeds", "0,1", "--frames", "2")
        assert np.array_equal(page["3"].native[..., 0].astype(int), cli[..., 0])
