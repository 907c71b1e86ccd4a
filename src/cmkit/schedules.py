"""Noise grids and training curricula, all in σ-space (EDM / Karras VE).

Sources: Karras et al. 2022 (EDM) Eq. 5; Song et al. 2023 (CM) Sec. 5 and the reference code's
``create_ema_and_scales_fn``; Song & Dhariwal 2023 (iCT) Sec. 3.3-3.5; Geng et al. 2024 (ECT) Sec. 3.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

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
