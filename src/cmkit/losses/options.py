"""The options of a loss, declared once beside its constructor.

A loss class lists its options in ``OPTIONS`` (name → ``Option``: one line of help and the values it takes); the
constructor's signature gives each option's type and the method's published default. The ``loss`` section of a
run config (``cmkit.denoiser_config.LossConfig``), its validation, ``--dry-run``'s listing and the tests that
every constructor parameter is declared are all derived from these two, so a new loss touches its own file and
the ``LOSSES`` table of ``cmkit.losses`` only.
"""

from __future__ import annotations

import inspect
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: Constructor parameters that are not options: the model's σ range and σ_data (and ρ of the Karras grid)
#: reach every loss from the ``model`` section.
FROM_MODEL = ("sigma_min", "sigma_max", "sigma_data", "rho")


@dataclass(frozen=True)
class Option:
    """One option: its help line, the names it takes (``choices``) or a ``check`` of its value with the phrase
    that says what ``check`` requires (``must``, e.g. "at least 2")."""

    help: str
    choices: tuple[str, ...] | None = None
    check: Callable[[Any], bool] | None = None
    must: str = ""

    def problem(self, value: Any) -> str | None:
        """What is wrong with ``value`` (None when it is fine)."""
        if value is None:
            return None
        if self.choices is not None and value not in self.choices:
            return f"one of {', '.join(self.choices)}"
        if self.check is not None and not self.check(value):
            return self.must
        return None


def at_least(low: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v >= low), (f"at least {low:g}" if low else "0 or more")


def positive() -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v > 0 and math.isfinite(v)), "positive"


def within(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> tuple[Callable, str]:
    """[low, high] with either end open: ``within(0, 1, high_open=True)`` is [0, 1)."""

    def check(v: Any) -> bool:
        return (v > low if low_open else v >= low) and (v < high if high_open else v <= high)

    return check, f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def option(
    help: str, rule: tuple[Callable[[Any], bool], str] | None = None, choices: tuple[str, ...] | None = None
) -> Option:
    """``Option(help, choices, *rule)``: ``option("N of the grid", at_least(2))``."""
    check, must = rule if rule is not None else (None, "")
    return Option(help, choices, check, must)


# --- options several losses share -----------------------------------------------------------------------

DISTANCES = ("l2", "l1", "pseudo_huber", "lpips")
DISTANCE = option("distance d(x, y) between student and target", choices=DISTANCES)
HUBER_C = option("pseudo-Huber c (None: 0.00054·√d, iCT §3.3)", at_least(0))
LPIPS_WEIGHTS = option("VGG16+LPIPS safetensors for distance=lpips (`cmkit convert-lpips` writes it)")
P_MEAN = option("mean of the lognormal ln σ (training-time σ distribution)")
P_STD = option("std of the lognormal ln σ", positive())
TOTAL_STEPS = option("curriculum length K in optimisation steps (None: train.steps)", at_least(1))
S0 = option("initial discretisation steps N(0)", at_least(1))
S1 = option("final discretisation steps N(K)", at_least(1))
#: A rule across options: (check of the values the method will use, message, the options it names).
S1_AT_LEAST_S0 = (lambda o: o["s1"] >= o["s0"], "loss.s1 must be at least loss.s0", ("s0", "s1"))  # CT, iCT
JVP = option("tangent by forward-mode AD (jvp) or a central difference (fd)", choices=("jvp", "fd"))
FD_STEP = option("step of the central difference (jvp=fd)", within(0, 0.1, low_open=True))


def parameters(cls: type) -> dict[str, tuple[Any, Any]]:
    """{name: (type, default)} of the keyword parameters a loss class takes: its constructor's, and its base
    classes' where the constructor passes ``**kwargs`` on (sCD's on to sCT's)."""
    out: dict[str, tuple[Any, Any]] = {}
    for klass in cls.__mro__:
        params = inspect.signature(klass.__init__).parameters.values()
        hints = typing.get_type_hints(klass.__init__)
        for p in params:
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self" and p.name not in out:
                out[p.name] = (hints.get(p.name, Any), p.default)
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return out


def options_of(cls: type) -> dict[str, tuple[Any, Any, Option]]:
    """{name: (type, default, Option)} of a loss class, type and default from its constructor."""
    params = parameters(cls)
    return {name: (*params[name], opt) for name, opt in cls.OPTIONS.items()}


def undeclared(cls: type) -> tuple[list[str], list[str]]:
    """(constructor parameters missing from ``OPTIONS``, ``OPTIONS`` entries the constructor does not take)."""
    params = [p for p in parameters(cls) if p not in FROM_MODEL]
    return [p for p in params if p not in cls.OPTIONS], [o for o in cls.OPTIONS if o not in params]
