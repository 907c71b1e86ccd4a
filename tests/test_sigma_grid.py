"""σ levels that match the model: the grid each method trains on, on-grid defaults for sampling and editing,
and one warning line for a σ off the grid."""

import math

import pytest
import torch

from cmkit.denoiser_config import Config
from cmkit.editing.editor import default_edit_sigmas
from cmkit.editing.tasks import inpaint, interpolate_images, stroke_guided
from cmkit.errors import CmkitError
from cmkit.formats.model_dir import read_model_dir
from cmkit.generate import multistep_sigmas, resolve_sampler
from cmkit.schedules import (
    ct_adaptive_schedule,
    grid_levels,
    ict_num_scales,
    karras_sigmas,
    nearest_grid_index,
    off_grid,
    training_grid,
)
from cmkit.training.presets import get_config

G18 = karras_sigmas(18).tolist()  # the fmnist-cd / digits-cd / cifar10-cd grid (CM reference §1.1)


def preset(name, *overrides):
    return get_config(name, list(overrides))


def shipped(name):
    return Config.from_dict(read_model_dir(name).config)


# --- the training grid --------------------------------------------------------------------------------


def test_cd_grid_is_the_karras_grid_of_num_scales_with_the_loss_default():
    assert training_grid(preset("digits-cd")) == G18  # bit-identical to what CDLoss trains on
    assert training_grid(preset("digits-cd", "loss.num_scales=none")) == G18  # CDLoss's default N = 18
    g40 = training_grid(preset("imagenet64-cd"))
    assert len(g40) == 40 and g40[22] == pytest.approx(1.3824, rel=1e-4)  # ts = 22 of the published 2-step
    g = training_grid(preset("digits-cd", "model.sigma_min=0.01", "model.sigma_max=40", "sample.sigmas=40,0.5"))
    assert g == karras_sigmas(18, 0.01, 40.0).tolist()


def test_ct_and_ict_grids_are_those_of_the_last_training_step():
    cfg = preset("digits-ct", "train.steps=300")
    assert len(training_grid(cfg)) == ct_adaptive_schedule(299, 300)[0] == 151
    cfg = preset("digits-ct", "train.steps=300", "loss.total_steps=3000")  # stopped early in the curriculum
    N = ct_adaptive_schedule(299, 3000)[0]
    assert 2 < N < 151 and training_grid(cfg) == karras_sigmas(N).tolist()
    assert len(training_grid(preset("imagenet64-ct"))) == 201  # the CM paper's CT sampling grid (ts = 0,106,200)
    assert training_grid(preset("imagenet64-ct"))[106] == pytest.approx(1.9128, rel=1e-4)
    cfg = preset("digits-ict", "train.steps=80", "loss.s0=2", "loss.s1=8")
    assert len(training_grid(cfg)) == ict_num_scales(79, 80, 2, 8) == 9


def test_ict_grids_are_nested_so_the_final_grid_holds_every_level_ever_trained():
    final = training_grid(preset("digits-ict"))
    assert len(final) == 1281
    for N in (11, 21, 41, 81, 161, 321, 641):
        for s in karras_sigmas(N).tolist():
            assert min(abs(math.log(s / g)) for g in final) < 1e-5


def test_continuous_time_models_and_teachers_have_no_grid():
    assert training_grid(preset("digits-ect")) is None
    assert training_grid(preset("digits-edm")) is None
    assert len(training_grid(shipped("fmnist-cd"))) == 18
    assert len(training_grid(shipped("fmnist-ict"))) == 1281
    assert training_grid(shipped("fmnist-ect")) is None


def test_nearest_index_is_the_rounded_fractional_index_and_off_grid_uses_a_one_percent_log_tolerance():
    assert nearest_grid_index(0.8, G18) == 11  # fractional index 10.51
    assert nearest_grid_index(1.0, G18) == 10 and nearest_grid_index(1e-9, G18) == 17
    assert nearest_grid_index(100.0, G18) == 0
    assert off_grid([80.0, 0.5853, 0.585], G18) == []  # rounded grid values are on the grid
    bad = off_grid([0.8, 3.0], G18)
    assert [s for s, _ in bad] == [0.8, 3.0]
    assert bad[0][1] == [G18[10], G18[11]] and bad[1][1] == [G18[8], G18[9]]
    assert off_grid([0.8, 3.0, 0.0123, 37.0], training_grid(preset("digits-ict"))) == []  # gaps under 2%
    assert grid_levels(G18, 4, 0, 11) == [G18[i] for i in (0, 4, 7, 11)]
    with pytest.raises(CmkitError, match="at most 12"):
        grid_levels(G18, 13, 0, 11)


# --- multistep defaults -------------------------------------------------------------------------------


def test_cd_defaults_lie_on_the_grid():
    cfg = preset("digits-cd")  # sample.sigmas = (80, 0.8): 0.8 moves to its nearest level 0.5853
    assert multistep_sigmas(cfg, 1) == [80.0]
    assert multistep_sigmas(cfg, 2) == [80.0, G18[11]]
    assert multistep_sigmas(cfg, 3) == [80.0, G18[6], G18[11]]
    assert multistep_sigmas(cfg, 4) == [80.0, G18[4], G18[7], G18[11]]
    assert multistep_sigmas(cfg, 17) == G18[:-1]  # more steps than levels above the middle: go further down
    with pytest.raises(CmkitError, match="at most 17"):
        multistep_sigmas(cfg, 18)
    cfg.sample.sigmas = (80.0, 3.0)  # a model's own middle σ, off the grid: its nearest level
    assert multistep_sigmas(cfg, 2) == [80.0, G18[8]]
    cfg.sample.sigmas = ()
    assert multistep_sigmas(cfg, 2) == [80.0, G18[11]]  # none recorded: the level nearest 0.8
    for name, mid in (("imagenet64-cd", 1.3824), ("imagenet64-ct", 1.9128), ("cifar10-cd", 0.5853)):
        assert multistep_sigmas(preset(name), 2)[1] == pytest.approx(mid, rel=1e-4)  # the published settings


def test_continuous_time_defaults_are_unchanged():
    cfg = preset("digits-ect")
    assert multistep_sigmas(cfg, 2) == [80.0, 0.8]
    assert multistep_sigmas(cfg, 4) == [80.0] + karras_sigmas(4, 0.8, 80.0).tolist()[1:]
    cfg.sample.sigmas = (80.0, 5.0, 0.3)
    assert multistep_sigmas(cfg, 3) == [80.0, 5.0, 0.3]


def test_resolve_sampler_warns_once_for_sigmas_off_the_grid(capsys):
    cfg = preset("digits-cd")
    assert resolve_sampler(cfg, None, None, [80, 0.8]) == ("multistep", [80.0, 0.8], 2)  # used as given
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cmkit: warning: σ 0.8 is off the 18-level grid")
    assert "1.088/0.5853" in err
    resolve_sampler(cfg, None, None, [80, 3, 0.8])
    assert "σ 3, 0.8 are off" in capsys.readouterr().err
    for sigmas, steps in (([80, 0.5853], None), (None, 2), (None, 4), (None, 1)):
        sampler, s, _ = resolve_sampler(cfg, None, steps, sigmas)
        assert all(min(abs(math.log(v / g)) for g in G18) < 0.01 for v in s)
    for name in ("digits-ect", "digits-ict"):  # continuous time; a grid this dense
        resolve_sampler(preset(name), None, None, [80, 0.8, 0.05])
    assert capsys.readouterr().err == ""
    with pytest.raises(CmkitError, match="strictly decreasing"):  # validated before any warning
        resolve_sampler(cfg, None, None, [0.8, 80])


# --- editing defaults ---------------------------------------------------------------------------------


class Recorder(torch.nn.Module):
    """A consistency 'model' that records the σ of every call and returns its input."""

    def __init__(self):
        super().__init__()
        self.sigmas = []

    def forward(self, x, sigma, **cond):
        self.sigmas.append(float(sigma[0]))
        return x.clamp(-1, 1)


def test_default_edit_sigmas_without_a_grid_are_unchanged_and_with_one_are_its_levels():
    assert default_edit_sigmas() == karras_sigmas(19).tolist()[:-1]
    assert default_edit_sigmas(5) == karras_sigmas(6).tolist()[:-1]
    assert default_edit_sigmas(grid=G18) == G18[:-1]  # every level but σ_min, as the CM notebook edits
    assert default_edit_sigmas(6, grid=G18) == [G18[i] for i in (0, 3, 6, 9, 11, 14)]
    assert default_edit_sigmas(3, 0.002, 5.0, grid=G18) == [G18[i] for i in (7, 10, 14)]  # from 5.315
    with pytest.raises(CmkitError, match="at most 17"):
        default_edit_sigmas(18, grid=G18)


def test_editors_use_the_grid_and_warn_for_explicit_sigmas_off_it(capsys):
    y = torch.zeros(2, 1, 8, 8)
    mask = torch.ones(8, 8)
    m = Recorder()
    inpaint(m, y, mask, generator=torch.Generator().manual_seed(0), grid=G18)
    assert m.sigmas == [torch.tensor(s).item() for s in G18[:-1]]
    m = Recorder()
    inpaint(m, y, mask, [80.0, 0.8], generator=torch.Generator().manual_seed(0), grid=G18)
    assert m.sigmas == [80.0, torch.tensor(0.8).item()]
    assert capsys.readouterr().err.startswith("cmkit: warning: σ 0.8 is off the 18-level grid")
    m = Recorder()
    stroke_guided(m, y, 5.0, 3, generator=torch.Generator().manual_seed(0), grid=G18)
    assert m.sigmas == [torch.tensor(G18[i]).item() for i in (7, 10, 14)]
    m = Recorder()
    interpolate_images(m, y, y, frames=2, sigma=2.0, generator=torch.Generator().manual_seed(0), grid=G18)
    assert m.sigmas == [torch.tensor(G18[9]).item()] * 2  # 2.0 → the level 1.923
    m = Recorder()
    inpaint(m, y, mask, generator=torch.Generator().manual_seed(0))  # no grid: 18 Karras levels, no warning
    assert len(m.sigmas) == 18 and capsys.readouterr().err == ""
