"""The shipped models (four Fashion-MNIST, one colour emoji): present, loadable by name, documented, and
sampling and editing correctly."""
import json

import pytest
import torch

from cmkit.checkpoint import load_model
from cmkit.cli import main
from cmkit.zoo import shipped_model_dir, shipped_models

SHIPPED = ("fmnist-edm", "fmnist-cd", "fmnist-ict", "fmnist-ect", "emoji-ect")


def test_the_models_are_shipped_with_recipes_under_40_mb():
    assert set(SHIPPED) <= set(shipped_models())
    total = 0
    for name in SHIPPED:
        d = shipped_model_dir(name)
        meta = json.loads((d / "config.json").read_text())
        recipe = meta["recipe"]
        assert recipe["steps"] > 0 and recipe["wall_s"] > 0 and "cmkit train --preset" in recipe["note"]
        total += sum(f.stat().st_size for f in d.iterdir())
    assert total < 40 * 2**20


@pytest.mark.parametrize("name", SHIPPED[1:])
def test_shipped_consistency_models_keep_the_boundary_condition(name):
    model, cfg = load_model(name)
    assert cfg.model.precond == "cm"
    C, R = cfg.model.in_channels, cfg.model.img_resolution
    x = torch.rand(2, C, R, R, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        out = model(x, torch.full((2,), cfg.model.sigma_min))
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)


def test_sample_cli_takes_a_shipped_name(tmp_path):
    out = tmp_path / "s.png"
    assert main(["sample", "--model", "fmnist-cd", "--steps", "2", "-n", "4", "-o", str(out),
                 "--npz", str(tmp_path / "s.npz")]) == 0
    import numpy as np

    a = np.load(tmp_path / "s.npz")["arr_0"]
    assert a.shape == (4, 28, 28, 1) and a.dtype == np.uint8 and a.std() > 10  # real images, not a constant


def test_edit_cli_takes_a_shipped_name(tmp_path, capsys, one_thread):
    out = tmp_path / "strip.png"
    assert main(["edit", "interpolate", "--model", "fmnist-cd", "--seeds", "0,1", "--frames", "3", "-o", str(out),
                 "--threads", "1"]) == 0
    assert out.is_file() and "(3 frames)" in capsys.readouterr().out


def test_the_colour_model_colorizes_keeping_the_luminance():
    """Colorization with the shipped emoji model: the input's luminance is kept exactly (Algorithm 4 with
    the luminance-axis Q) and the model puts colour into the chroma channels, which are zero in the input."""
    from cmkit.editing import colorize, to_gray3

    model, cfg = load_model("emoji-ect")
    assert cfg.model.in_channels == 3
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    disc = ((xx ** 2 + yy ** 2) < 0.6).float()  # a bright disc on black, like an emoji
    gray = to_gray3((disc * 1.6 - 0.8).expand(2, 3, 32, 32) + 0.05 * torch.randn(2, 3, 32, 32, generator=g))
    out = colorize(model, gray, generator=g)
    torch.testing.assert_close(to_gray3(out), gray, atol=1e-4, rtol=0)
    chroma = out - to_gray3(out)
    assert chroma.abs().mean() > 0.02  # not left grey
