"""The shipped Fashion-MNIST models: present, loadable by name, documented, and sampling correctly."""
import json

import pytest
import torch

from cmkit.checkpoint import load_model
from cmkit.cli import main
from cmkit.zoo import shipped_model_dir, shipped_models

SHIPPED = ("fmnist-edm", "fmnist-cd", "fmnist-ict", "fmnist-ect")


def test_the_four_fashion_mnist_models_are_shipped_with_recipes_under_40_mb():
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
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
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
