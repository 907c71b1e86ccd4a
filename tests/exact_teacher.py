"""What the exact-teacher tests share (CD, CMT, sCD, AYF, LCM on ``cmkit.toy``'s Gaussian mixture): the mixture,
the training loop, the fine PF-ODE solve a learned map is compared with, and the checks of samples against the
mixture's components. Each test seeds torch itself before building its model; these helpers draw in the order the
tests always did, so the measured bound spreads in their docstrings still apply."""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import Tensor, nn

from cmkit.ema import ema_update
from cmkit.sampling import sample_multistep
from cmkit.schedules import karras_sigmas
from cmkit.toy import GaussianMixture


def three_gaussians() -> GaussianMixture:
    """The 2-D mixture of three components (weights 0.5 / 0.3 / 0.2, std 0.08) that every exact-teacher test uses."""
    return GaussianMixture(torch.tensor([[-0.6, -0.6], [0.6, -0.6], [0.0, 0.7]]), torch.tensor([0.5, 0.3, 0.2]), 0.08)


def train_exact(
    model: nn.Module, loss: Callable[[int], Tensor], steps: int, ema_rate: float | None = None, lr: float = 2e-3
) -> nn.Module:
    """Adam with a one-cycle schedule (10% warm-up to ``lr``) on ``loss(step)`` (per-example values, averaged);
    with ``ema_rate`` an EMA of the weights is updated after every step and returned (in eval mode), else
    ``model`` itself."""
    ema = copy.deepcopy(model) if ema_rate is not None else None
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    for step in range(steps):
        value = loss(step).mean()
        opt.zero_grad()
        value.backward()
        opt.step()
        sched.step()
        if ema is not None:
            ema_update(ema, model, ema_rate)
    return (ema if ema is not None else model).eval()


def pf_ode_map(gm: GaussianMixture, x: Tensor, sigma: float, sigma_to: float = 0.0, n: int = 200) -> Tensor:
    """The exact probability-flow map from σ to ``sigma_to``: ``n`` Heun steps on a Karras grid with the mixture's
    own denoiser (Euler for the last step to σ = 0)."""
    levels = torch.cat([karras_sigmas(n, max(sigma_to, 0.002), sigma), torch.zeros(1)])
    if sigma_to > 0:
        levels = levels[:-1]
    xs = x.clone()
    with torch.no_grad():
        for i in range(len(levels) - 1):
            s0, s1 = levels[i], levels[i + 1]
            d = (xs - gm(xs, s0)) / s0
            xn = xs + (s1 - s0) * d
            if s1 > 0:
                xn = xs + (s1 - s0) * (d + (xn - gm(xn, s1)) / s1) / 2
            xs = xn
    return xs


def check_mixture_samples(bound, model: nn.Module, gm: GaussianMixture, sigmas_lists=([80.0], [80.0, 0.5])) -> None:
    """One- and multistep samples of ``model`` land on the mixture's components in the right proportions, near
    their means and clustered (the true std is 0.08; a Gaussian blob over the same range gives 0.5)."""
    for sigmas in sigmas_lists:
        x = sample_multistep(model, (4000, 2, 1, 1), sigmas, generator=torch.Generator().manual_seed(2))
        k = gm.assign(x)
        props = torch.bincount(k, minlength=3).float() / len(x)
        bound(f"{len(sigmas)}-step max |proportion - weight|", float((props - gm.weights).abs().max()), 0.03)
        means = torch.stack([x[k == j].flatten(1).mean(0) for j in range(3)])
        bound(f"{len(sigmas)}-step max |component mean - true mean|", float((means - gm.means).abs().max()), 0.06)
        stds = torch.stack([x[k == j].flatten(1).std(0) for j in range(3)])
        bound(f"{len(sigmas)}-step max component std", float(stds.max()), 0.28)
