"""Noise grids and training curricula, all in σ-space (EDM / Karras VE).

Sources: Karras et al. 2022 (EDM) Eq. 5; Song et al. 2023 (CM) Sec. 5 and the reference code's
``create_ema_and_scales_fn``; Song & Dhariwal 2023 (iCT) Sec. 3.3-3.5; Geng et al. 2024 (ECT) Sec. 3.
"""

from __future__ import annotations

import inspect
import math
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .errors import CmkitError

SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
SIGMA_DATA = 0.5
RHO = 7.0


def karras_sigmas(N: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO) -> Tensor:
    """Karras grid of N levels, descending (index 0 = σ_max, index N-1 = σ_min); EDM Eq. 5.

    σ(i; N) = (σ_max^{1/ρ} + i/(N-1) · (σ_min^{1/ρ} - σ_max^{1/ρ}))^ρ, computed in float64.
    """
    if N < 2:
        raise ValueError(f"a Karras grid needs N >= 2 points, got {N}")
    i = torch.arange(N, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + i / (N - 1) * (lo - hi)) ** rho
    sigmas[0], sigmas[-1] = sigma_max, sigma_min  # exact endpoints
    return sigmas.float()


# --- CM (Song et al. 2023): adaptive N(k) and μ(k), as in the reference code -----------------------


def ct_adaptive_schedule(k: int, K: int, s0: int = 2, s1: int = 150, mu0: float = 0.9) -> tuple[int, float]:
    """N(k) and μ(k) of the original CT (code form; the paper's μ uses N instead of N-1).

    s = ceil(sqrt(k/K · ((s1+1)² - s0²) + s0²) - 1), N = s + 1, μ = exp(s0 · ln μ0 / s).
    N keeps growing past K as in the reference code; training stops at K explicitly.
    """
    s = math.ceil(math.sqrt(k / K * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1)
    s = max(s, 1)
    mu = math.exp(s0 * math.log(mu0) / s)
    return s + 1, mu


# --- iCT (Song & Dhariwal 2023) --------------------------------------------------------------------


def ict_num_scales(k: int, K: int, s0: int = 10, s1: int = 1280) -> int:
    """Exponential curriculum N(k) = min(s0 · 2^{⌊k/K'⌋}, s1) + 1, K' = ⌊K / (log2⌊s1/s0⌋ + 1)⌋ (iCT Eq. 11)."""
    K_prime = max(1, math.floor(K / (math.log2(math.floor(s1 / s0)) + 1)))
    return min(s0 * 2 ** (k // K_prime), s1) + 1


def lognormal_index_probs(sigmas_ascending: Tensor, P_mean: float = -1.1, P_std: float = 2.0) -> Tensor:
    """Discretised lognormal over the N-1 intervals of an ascending σ grid (iCT Eq. 10).

    p(i) ∝ erf((ln σ_{i+1} - P_mean)/(√2 P_std)) - erf((ln σ_i - P_mean)/(√2 P_std)).
    """
    s = sigmas_ascending.double().log()
    cdf = torch.erf((s - P_mean) / (math.sqrt(2) * P_std))
    p = cdf[1:] - cdf[:-1]
    return (p / p.sum()).float()


# --- ECT (Geng et al. 2024) ------------------------------------------------------------------------


def ect_r_of_t(t: Tensor, stage: int, q: float = 2.0, k: float = 8.0, b: float = 1.0) -> Tensor:
    """ECT's "sigmoid" t → r map: r = max(0, t·(1 - q^{-(stage+1)}·(1 + k·sigmoid(-b·t)))).

    As in the ECT code, stage 0 already uses q^{-1} (the pure-diffusion stage is skipped because
    training starts from a diffusion model). Δt = t - r halves (for q = 2) at every stage.
    """
    ratio = 1 - q ** -(stage + 1) * (1 + k * torch.sigmoid(-b * t))
    return (t * ratio).clamp(min=0)


# --- the σ levels a consistency model was trained on ----------------------------------------------

#: A σ within this distance of a training level in log σ (1%) counts as on the grid: rounded values (0.585
#: for 0.58535) are on it, and on a grid as dense as iCT's final N = 1281 (gaps under 2%) every σ is.
GRID_LOG_TOL = 0.01
#: 2-step middle σ when a model records none: ECT's CIFAR-10 0.821 rounded; on the N = 18 grid it falls on
#: index 11 (σ = 0.5853), the published CIFAR-10 CD setting (ts = 0, 11, 17).
DEFAULT_SIGMA_MID = 0.8


def training_grid(cfg: Any) -> list[float] | None:
    """The σ levels (descending, exactly as training computed them) a consistency model was trained on, or None.

    * CD: the Karras grid of N = ``loss.num_scales`` (CDLoss's default, 18, when unset) between the model's
      σ_min and σ_max; every training pair (σ_i, σ_{i+1}) lies on it.
    * CT and iCT: N(k) grows during training; this is the grid of the **last** training step
      k = train.steps − 1 with K = loss.total_steps or train.steps (the same K the loss is built with). The last
      steps, which dominate the exported EMA, used it, and the CM paper samples its CT models on their final grid
      (ImageNet-64 CT: N = 201 = s1 + 1, ts = 0, 106, 200). iCT's grids are nested (N − 1 = s0·2^j), so its
      final grid holds every level it was ever trained on.
    * ECT (t and r continuous), EDM teachers and anything else: None (no grid; every σ was trained).

    ``cfg`` is a ``cmkit.config.Config``; the loss defaults are read from the loss class's signature, so this
    follows the loss without building it (no LPIPS weights, no teacher).
    """
    method = cfg.loss.method
    if method not in ("cd", "ct", "ict"):
        return None
    defaults = {name: p.default for name, p in inspect.signature(cfg.loss.loss_class()).parameters.items()}

    def opt(name: str) -> Any:
        value = getattr(cfg.loss, name)
        return defaults[name] if value is None else value

    if method == "cd":
        N = opt("num_scales")
    else:
        K = cfg.loss.total_steps or cfg.train.steps
        k = max(cfg.train.steps - 1, 0)
        N = (
            ct_adaptive_schedule(k, K, opt("s0"), opt("s1"), opt("mu0"))[0]
            if method == "ct"
            else ict_num_scales(k, K, opt("s0"), opt("s1"))
        )
    return karras_sigmas(N, cfg.model.sigma_min, cfg.model.sigma_max).tolist()


def nearest_grid_index(sigma: float, grid: Sequence[float], rho: float = RHO) -> int:
    """Index of the grid level nearest to σ in the Karras coordinate σ^{1/ρ} (in which a Karras grid is evenly
    spaced), i.e. σ's fractional grid index rounded: how a σ becomes one of the reference code's ``ts``."""
    u = max(float(sigma), 0.0) ** (1 / rho)
    return min(range(len(grid)), key=lambda i: abs(float(grid[i]) ** (1 / rho) - u))


def off_grid(
    sigmas: Sequence[float], grid: Sequence[float], tol: float = GRID_LOG_TOL
) -> list[tuple[float, list[float]]]:
    """(σ, its neighbouring grid levels) for every σ farther than ``tol`` in log σ from all levels of ``grid``."""
    out, grid = [], [float(g) for g in grid]
    for s in sigmas:
        s = float(s)
        if s <= 0 or min(abs(math.log(s / g)) for g in grid) <= tol:  # (σ ≤ 0 is refused by validate_sigmas)
            continue
        above = [g for g in grid if g > s]
        below = [g for g in grid if g < s]
        out.append((s, ([min(above)] if above else []) + ([max(below)] if below else [])))
    return out


def off_grid_note(sigmas: Sequence[float], grid: Sequence[float] | None) -> str | None:
    """One line naming the σ values that are not training levels and the nearest levels, or None."""
    bad = off_grid(sigmas, grid) if grid is not None and len(grid) else []
    if not bad:
        return None
    values = ", ".join(f"{s:g}" for s, _ in bad)
    near = ", ".join("/".join(f"{g:.4g}" for g in levels) for _, levels in bad)
    verb = "is" if len(bad) == 1 else "are"
    return (
        f"σ {values} {verb} off the {len(grid)}-level grid this model was trained on (nearest levels: {near}); "
        f"used as given, but the model was not trained there"
    )


def warn_off_grid(sigmas: Sequence[float], grid: Sequence[float] | None) -> bool:
    """Print ``off_grid_note`` to stderr as one ``cmkit: warning:`` line; True if it warned."""
    note = off_grid_note(sigmas, grid)
    if note:
        print(f"cmkit: warning: {note}", file=sys.stderr)
    return note is not None


def grid_levels(grid: Sequence[float], steps: int, start: int = 0, stop: int | None = None) -> list[float]:
    """``steps`` levels of ``grid`` evenly spaced in index from ``start`` to ``stop`` (both included; default the
    last level above σ_min, since a step at σ_min is the identity). The on-grid form of a Karras spacing between
    two levels, because a Karras grid is evenly spaced in σ^{1/ρ}."""
    stop = len(grid) - 2 if stop is None else stop
    if steps < 1:
        raise ValueError(f"need at least one step, got {steps}")
    if steps > stop - start + 1:
        raise CmkitError(
            f"{steps} σ levels do not fit between {grid[start]:.4g} and {grid[stop]:.4g} on the "
            f"{len(grid)}-level grid this model was trained on (at most {stop - start + 1}); "
            f"give explicit σ values (--sigmas) to sample off the grid"
        )
    if steps == 1:
        return [grid[start]]
    idx = [math.floor(start + j * (stop - start) / (steps - 1) + 0.5) for j in range(steps)]
    return [grid[i] for i in idx]
