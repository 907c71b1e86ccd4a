"""Each loss declares its options once (``OPTIONS`` beside its constructor, cmkit.losses.options); the ``loss``
section of the config, its validation and --dry-run's listing are derived from them."""

from __future__ import annotations

import dataclasses
import re
import typing

import pytest

from cmkit.config import apply_overrides
from cmkit.denoiser_config import Config, LossConfig
from cmkit.errors import CmkitError
from cmkit.losses import LOSSES
from cmkit.losses.options import options_of, undeclared


def _cfg(overrides: list[str]) -> Config:
    """A default config with overrides, not validated as a whole (teachers and data are not the point here)."""
    return apply_overrides(Config(), overrides)


@pytest.mark.parametrize("method", sorted(LOSSES))
def test_every_constructor_parameter_is_a_declared_option(method):
    assert undeclared(LOSSES[method]) == ([], [])


@pytest.mark.parametrize("method", sorted(LOSSES))
def test_the_config_section_has_every_option_and_each_defaults_to_the_loss(method):
    fields = {f.name for f in dataclasses.fields(LossConfig)}
    options = options_of(LOSSES[method])
    assert set(options) <= fields
    cfg = Config()
    cfg.loss.method = method
    loss = cfg.loss.build(cfg.model, 123)
    for name, (_, default, _) in options.items():  # nothing set: the loss gets its constructor's defaults
        if name in ("distance", "total_steps", "solver", "lpips_weights"):
            continue  # held as derived objects (a distance function, K, a solver step)
        if hasattr(loss, name) and not callable(getattr(loss, name)):
            assert getattr(loss, name) == default, (method, name)


def _bad_values(opt):
    return [v for v in (-1, 0, 0.0, 1, 1.5, 65, 100, 1e9) if opt.check is not None and not opt.check(v)]


@pytest.mark.parametrize("method", sorted(LOSSES))
def test_every_range_is_enforced_in_one_line(method):
    ranged = {name: v for name, v in options_of(LOSSES[method]).items() if v[2].check is not None}
    for name, (hint, default, opt) in ranged.items():
        bad = _bad_values(opt)[0]
        base = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        value = int(bad) if base[0] is int else bad
        with pytest.raises(CmkitError, match=re.escape(f"loss.{name} must be {opt.must}, got")):
            _cfg([f"loss.method={method}", f"loss.{name}={value}"]).loss.check()
    assert ranged  # every method has at least one option with a range


@pytest.mark.parametrize(
    "method,key,value",
    [("cd", "mu", 0.5), ("ect", "q", 3.0), ("tcm", "df", 2.0), ("scd", "guidance", 2.0), ("meanflow", "imf", True)],
)
def test_a_set_option_reaches_the_loss(method, key, value):
    cfg = _cfg([f"loss.method={method}", f"loss.{key}={value}"])
    assert getattr(cfg.loss.build(cfg.model, 10), key) == value


def test_an_option_of_another_method_and_a_name_of_another_method_are_refused():
    with pytest.raises(CmkitError, match="loss.mu is not an option of method 'ict'"):
        _cfg(["loss.mu=0.5"]).loss.check()
    with pytest.raises(CmkitError, match="is not a weighting of method 'ct'"):
        _cfg(["loss.method=ct", "loss.weighting=inv_dt"]).loss.check()


def test_a_rule_across_options_uses_the_defaults_of_what_is_not_set():
    with pytest.raises(CmkitError, match="loss.s1 must be at least loss.s0"):  # ct's default s1 is 150
        _cfg(["loss.method=ct", "loss.s0=200"]).loss.check()


def test_dry_run_lists_the_methods_options_with_their_help(capsys):
    from cmkit.cli.main import main

    assert main(["train", "--preset", "digits-ict", "--dry-run", "loss.s1=100"]) == 0
    err = capsys.readouterr().err
    assert "loss.s1=100 " in err and "loss.s0=10 (default)" in err and "final discretisation steps" in err
    assert "loss.total_steps=1500 (default)" in err  # K is train.steps unless set
