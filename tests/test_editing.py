import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cmkit.editing.editor import edit
from cmkit.editing.masks import builtin_mask
from cmkit.editing.tasks import (
    colorize,
    denoise,
    inpaint,
    interpolate_images,
    interpolate_noise,
    stroke_guided,
    super_resolve,
    to_gray3,
)
from cmkit.editing.transforms import ColorBasis, Identity, PatchBasis
from cmkit.errors import CmkitError
from cmkit.nets.unet import UNet
from cmkit.precond import Precond
from cmkit.sampling import sample_onestep


def model(channels=1, size=8):
    torch.manual_seed(0)
    m = Precond(UNet(size, channels, model_channels=16, channel_mult=(1, 2), num_blocks=1), "cm").eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def images(b=2, c=1, size=8, seed=1):
    return torch.rand(b, c, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_color_basis_is_orthogonal_with_luminance_axis():
    Q = ColorBasis().Q
    assert torch.allclose(Q.T @ Q, torch.eye(3), atol=1e-6)
    luma = torch.tensor([0.2989, 0.5870, 0.1140])
    assert torch.allclose(Q[:, 0], luma / luma.norm(), atol=1e-6)
    x = images(c=3)
    A = ColorBasis()
    assert torch.allclose(A.inverse(A.forward(x)), x, atol=1e-6)


@pytest.mark.parametrize("p", [2, 4, 8])
def test_patch_basis_orthogonal_round_trip_and_mean_coefficient(p):
    A = PatchBasis(p)
    assert torch.allclose(A.Q.T @ A.Q, torch.eye(p * p), atol=1e-5)
    x = images(size=16)
    c = A.forward(x)
    assert torch.allclose(A.inverse(c), x, atol=1e-5)
    assert torch.allclose(c.norm(), x.norm(), rtol=1e-5)  # orthogonal: norms preserved
    coef0 = c[:, :, ::p, ::p]  # coefficient 0 lives at each patch's first pixel
    assert torch.allclose(coef0, p * F.avg_pool2d(x, p), atol=1e-5)


def test_inpainting_preserves_known_pixels_exactly():
    m, y = model(), images()
    mask = builtin_mask("center", 8)
    out = inpaint(m, y, mask, [80.0, 10.0, 1.0], generator=torch.Generator().manual_seed(0))
    known = mask == 0
    assert torch.allclose(out[..., known], y[..., known], atol=1e-6)
    assert not torch.allclose(out[..., ~known], y[..., ~known])


def test_gray_input_has_equal_channels_and_the_luminance_of_the_colour_image():
    x = images(c=3)
    gray = to_gray3(x)
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    A = ColorBasis()
    torch.testing.assert_close(A.forward(gray)[:, 0], A.forward(x)[:, 0], atol=1e-6, rtol=0)


def test_colorization_preserves_luminance():
    m, x = model(channels=3), images(c=3)
    gray = to_gray3(x)
    out = colorize(m, gray, [80.0, 5.0], generator=torch.Generator().manual_seed(0))
    A = ColorBasis()
    assert torch.allclose(A.forward(out)[:, 0], A.forward(x)[:, 0], atol=1e-5)


@pytest.mark.parametrize("p", [2, 4])
def test_super_resolution_downsamples_back_to_input(p):
    m, hi = model(), images()
    low = F.avg_pool2d(hi, p)
    out = super_resolve(m, low, p, [80.0, 2.0], generator=torch.Generator().manual_seed(0))
    assert out.shape == hi.shape
    assert torch.allclose(F.avg_pool2d(out, p), low, atol=1e-5)


def test_editor_with_no_unknowns_returns_the_reference():
    m, y = model(), images()
    out = edit(m, y, [80.0, 1.0], Identity(), torch.zeros(1, 1, 8, 8))
    assert torch.allclose(out, y)


def test_interpolation_endpoints_equal_one_step_samples():
    m = model()
    z1 = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    z2 = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    frames = interpolate_noise(m, z1, z2, frames=5)
    a = sample_onestep(m, (1, 1, 8, 8), generator=torch.Generator().manual_seed(3))
    b = sample_onestep(m, (1, 1, 8, 8), generator=torch.Generator().manual_seed(4))
    assert frames.shape == (5, 1, 1, 8, 8)
    assert torch.allclose(frames[0], a, atol=1e-6) and torch.allclose(frames[-1], b, atol=1e-6)
    assert not torch.allclose(frames[2], a)


def test_image_interpolation_and_denoise_shapes():
    m, x1, x2 = model(), images(1, seed=1), images(1, seed=2)
    frames = interpolate_images(m, x1, x2, frames=3, sigma=1.0, generator=torch.Generator().manual_seed(0))
    assert frames.shape == (3, 1, 1, 8, 8) and frames.abs().max() <= 1
    out = denoise(m, x1 + 0.002 * 0, 0.002)
    assert torch.allclose(out, x1.clamp(-1, 1))  # at σ_min the consistency function is the identity


def test_stroke_guided_starts_from_strokes():
    m, strokes = model(), images()
    calls = []
    out = stroke_guided(m, strokes, sigma_start=5.0, steps=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == strokes.shape and out.abs().max() <= 1
    # with a tiny starting σ the layout of the strokes survives almost unchanged
    near = stroke_guided(m, strokes, sigmas=[0.01], generator=torch.Generator().manual_seed(0))
    assert (near - strokes.clamp(-1, 1)).abs().max() < 0.05
    assert not calls


def test_wrong_shapes_are_rejected_with_clear_messages():
    m, y = model(), images()
    with pytest.raises(CmkitError, match="mask is 4×4"):
        inpaint(m, y, torch.zeros(4, 4))
    with pytest.raises(CmkitError, match="9×9 but the model expects 1×8×8"):
        super_resolve(m, torch.zeros(1, 1, 3, 3), 3)
    with pytest.raises(CmkitError, match="not divisible"):
        PatchBasis(3).forward(y)
    with pytest.raises(CmkitError, match="model expects 1×8×8"):
        denoise(m, images(size=16), 0.5)
    with pytest.raises(CmkitError, match="3-channel"):
        ColorBasis().forward(y)


def test_edit_cli_inpaint_and_errors(tmp_path, capsys):
    from PIL import Image

    from cmkit.cli.main import main
    from cmkit.formats.model_dir import save_model_dir
    from cmkit.training.presets import get_config

    cfg = get_config("digits-ict", ["model.model_channels=16", "model.channel_mult=1,2", "model.num_blocks=1"])
    save_model_dir(tmp_path / "m", model(), "denoiser", cfg.to_dict())
    Image.fromarray(np.full((8, 8), 200, np.uint8)).save(tmp_path / "in.png")
    Image.fromarray(np.zeros((6, 6), np.uint8)).save(tmp_path / "small.png")
    out = tmp_path / "out.png"
    assert (
        main(
            [
                "edit",
                "inpaint",
                "--model",
                str(tmp_path / "m"),
                "--input",
                str(tmp_path / "in.png"),
                "--box",
                "2,2,6,6",
                "--steps",
                "3",
                "-o",
                str(out),
                "--panel",
                str(tmp_path / "p.png"),
            ]
        )
        == 0
    )
    res = np.asarray(Image.open(out).convert("L"))
    assert res.shape[0] >= 8 and (tmp_path / "p.png").is_file()
    capsys.readouterr()
    for args, msg in [
        (["inpaint", "--input", str(tmp_path / "small.png")], "6×6"),
        (["inpaint", "--input", str(tmp_path / "in.png"), "--box", "1,2,3"], "four integers"),
        (["colorize", "--input", str(tmp_path / "in.png")], "colour"),
        (["superres", "--input", str(tmp_path / "in.png"), "--factor", "4"], "2×2"),
    ]:
        assert main(["edit", args[0], "--model", str(tmp_path / "m"), *args[1:], "-o", str(tmp_path / "x.png")]) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, err


def _cli_model(tmp_path):
    from PIL import Image

    from cmkit.formats.model_dir import save_model_dir
    from cmkit.training.presets import get_config

    cfg = get_config("digits-ict", ["model.model_channels=16", "model.channel_mult=1,2", "model.num_blocks=1"])
    save_model_dir(tmp_path / "m", model(), "denoiser", cfg.to_dict())
    Image.fromarray(np.full((8, 8), 200, np.uint8)).save(tmp_path / "in.png")
    Image.fromarray(np.full((8, 8), 60, np.uint8)).save(tmp_path / "in2.png")
    Image.fromarray(np.full((4, 4), 120, np.uint8)).save(tmp_path / "low.png")
    return str(tmp_path / "m")


def test_edit_cli_every_task_with_its_own_options(tmp_path, capsys, one_thread):
    from PIL import Image

    from cmkit.cli.main import main

    m, img = _cli_model(tmp_path), str(tmp_path / "in.png")
    runs = {
        "superres": ["--input", str(tmp_path / "low.png"), "--factor", "2", "--steps", "2"],
        "stroke": ["--input", img, "--sigma-start", "3", "--steps", "2"],
        "denoise": ["--input", img, "--sigma", "0.5", "--add-noise"],
        "interpolate": ["--input", img, "--input2", str(tmp_path / "in2.png"), "--frames", "3", "--sigma", "1"],
    }
    for task, extra in runs.items():
        out = tmp_path / f"{task}.png"
        panel = [] if task == "interpolate" else ["--panel", str(tmp_path / f"{task}-panel.png")]
        assert main(["edit", task, "--model", m, *extra, "-o", str(out), "--threads", "1", *panel]) == 0, task
        if task == "interpolate":  # three frames: three numbered images of the model's size
            assert [Image.open(tmp_path / f"interpolate_{i}.png").size for i in range(3)] == [(8, 8)] * 3
        else:
            assert Image.open(out).size == (8, 8) and (tmp_path / f"{task}-panel.png").is_file()
    assert "(3 images, 8×8)" in capsys.readouterr().out
    assert (
        main(
            [
                "edit",
                "interpolate",
                "--model",
                m,
                "--seeds",
                "2,5",
                "--frames",
                "4",
                "--grid",
                str(tmp_path / "seeds.png"),
            ]
        )
        == 0
    )
    assert Image.open(tmp_path / "seeds.png").size[0] > 4 * 8 * 2  # one enlarged row of 4 frames
    capsys.readouterr()
    for argv, msg in [
        (["interpolate", "--input", img], "--input and --input2"),
        (["interpolate", "--seeds", "1"], "two integers"),
        (["interpolate", "--frames", "1"], "--frames"),
        (["denoise", "--input", img, "--sigma", "0"], "--sigma must be positive"),
        (["stroke", "--input", img, "--steps", "0"], "--steps must be positive"),
        (["stroke", "--input", str(tmp_path / "nowhere.png")], "input image not found"),
    ]:
        assert main(["edit", argv[0], "--model", m, *argv[1:], "-o", str(tmp_path / "x.png")]) == 2, argv
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, err


def test_edit_outputs_are_the_next_commands_inputs(tmp_path, capsys, one_thread):
    """-o writes the edited image itself (model size, grey stays grey) and --npz the same pixels; each is accepted
    as --input by the next edit, and an output that exists is refused before any work."""
    import numpy as np
    from PIL import Image

    from cmkit.cli.main import main

    m = _cli_model(tmp_path)
    first = ["edit", "inpaint", "--model", m, "--input", str(tmp_path / "in.png"), "--steps", "2", "--threads", "1"]
    assert main([*first, "-o", str(tmp_path / "a.png"), "--npz", str(tmp_path / "a.npz")]) == 0
    png = np.asarray(Image.open(tmp_path / "a.png"))
    npz = np.load(tmp_path / "a.npz")["arr_0"]
    assert png.shape == (8, 8) and npz.shape == (1, 8, 8, 1) and np.array_equal(png, npz[0, ..., 0])
    for source in ("a.png", "a.npz"):
        assert (
            main(
                [
                    "edit",
                    "denoise",
                    "--model",
                    m,
                    "--input",
                    str(tmp_path / source),
                    "--sigma",
                    "0.1",
                    "-o",
                    str(tmp_path / f"d-{source}.png"),
                ]
            )
            == 0
        ), source
    assert np.array_equal(
        np.asarray(Image.open(tmp_path / "d-a.png.png")), np.asarray(Image.open(tmp_path / "d-a.npz.png"))
    )  # the same pixels either way
    capsys.readouterr()
    assert main([*first, "-o", str(tmp_path / "a.png")]) == 2 and "exists" in capsys.readouterr().err
    assert main([*first]) == 2 and "nothing to write" in capsys.readouterr().err


def test_edit_cli_panel_is_not_overwritten_without_overwrite(tmp_path, capsys, one_thread):
    from cmkit.cli.main import main

    m = _cli_model(tmp_path)
    panel = tmp_path / "panel.png"
    panel.write_bytes(b"keep")
    argv = [
        "edit",
        "inpaint",
        "--input",
        str(tmp_path / "in.png"),
        "--steps",
        "2",
        "-o",
        str(tmp_path / "out.png"),
        "--panel",
        str(panel),
    ]
    # refused before any work: even a model that does not exist is not looked at
    assert main([*argv, "--model", str(tmp_path / "no-model")]) == 2
    err = capsys.readouterr().err
    assert f"{panel} exists; pass --overwrite" in err and len(err.strip().splitlines()) == 1, err
    assert main([*argv, "--model", m]) == 2
    assert panel.read_bytes() == b"keep" and not (tmp_path / "out.png").exists()
    assert main([*argv, "--model", m, "--overwrite"]) == 0
    assert panel.read_bytes() != b"keep"
    assert "columns: input | masked | output" in capsys.readouterr().out


def test_stroke_painting_is_blockwise_flat_and_quantised():
    from cmkit.editing.gallery import stroke_painting

    s = stroke_painting(images(size=8), block=4, levels=4)
    assert torch.equal(s, F.interpolate(s[..., ::4, ::4], scale_factor=4, mode="nearest"))  # flat 4×4 blocks
    assert set(((s + 1) / 2 * 3).round().unique().tolist()) <= {0.0, 1.0, 2.0, 3.0}
    assert torch.allclose((s + 1) / 2 * 3, ((s + 1) / 2 * 3).round(), atol=1e-6)


def test_gallery_writes_every_task_with_panel_layout(tmp_path):
    from PIL import Image

    from cmkit.editing.gallery import COLUMNS, write_gallery

    written = write_gallery(tmp_path, (model(), images(b=4)), (model(3), images(b=2, c=3)), log=lambda s: None)
    assert set(written) == set(COLUMNS)
    w, h = Image.open(written["inpaint"]).size  # 3 columns × 4 rows of 8×8 images, 2 px padding, all ×8
    assert (w, h) == ((3 * (8 + 2) + 2) * 8, (4 * (8 + 2) + 2) * 8)
    assert Image.open(written["interpolate"]).size == ((9 * (8 + 2) + 2) * 8, (2 * (8 + 2) + 2) * 8)
