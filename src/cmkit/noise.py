"""The random draws of the training losses (noise ε, noise levels σ or t, grid indices), from one of two sources.

* **stream** (the default): torch's global generator, seeded per process (``train.seed + rank``) and saved in
  every checkpoint. A step's draws depend on how its batch is split into processes and microbatches.
* **per sample** (``train.noise=per_sample``): every draw of sample ``i`` of the global batch of step ``k`` comes
  from its own generator, seeded by (seed, k, i, the draw's number within the loss call). A step then computes
  the same mean loss and gradient whatever the split, into any number of processes (DDP, FSDP) and gradient-
  accumulation microbatches (``train.accum``): the full-batch step, to floating-point tolerance. Dropout masks
  still come from the stream.

The losses call the functions below instead of ``torch.randn_like`` etc.; the training task chooses the source
for each loss call with :func:`per_sample`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor

_MASK = (1 << 64) - 1


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 on each, chained): nearby keys give unrelated streams."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _MASK)) + 0x9E3779B97F4A7C15 & _MASK
        h = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9 & _MASK
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & _MASK
        h ^= h >> 31
    return h >> 1


class _PerSample:
    """The keys of the samples of one loss call and a counter of its draws."""

    def __init__(self, seed: int, step: int, ids: list[int]):
        self.seed, self.step, self.ids, self.calls = seed, step, ids, 0

    def generators(self, device: torch.device) -> list[torch.Generator]:
        call, self.calls = self.calls, self.calls + 1
        return [torch.Generator(device).manual_seed(_mix(self.seed, self.step, i, call)) for i in self.ids]


_active: list[_PerSample] = []


@contextmanager
def per_sample(seed: int, step: int, ids: Tensor | list[int]) -> Iterator[None]:
    """Inside: the draws of a loss call on the samples ``ids`` (positions in the global batch of ``step``)
    come from per-sample generators; the batch dimension of every draw must equal ``len(ids)``."""
    _active.append(_PerSample(seed, step, [int(i) for i in ids]))
    try:
        yield
    finally:
        _active.pop()


def _keyed(n: int, device: torch.device | str) -> list[torch.Generator] | None:
    if not _active:
        return None
    keys = _active[-1]
    if n != len(keys.ids):
        raise ValueError(f"a per-sample draw of {n} values in a loss call on {len(keys.ids)} samples")
    return keys.generators(torch.device(device))


def randn_like(x: Tensor) -> Tensor:
    """Standard normal noise shaped like ``x`` (batch first)."""
    gens = _keyed(x.shape[0], x.device)
    if gens is None:
        return torch.randn_like(x)
    return torch.stack([torch.randn(x.shape[1:], generator=g, device=x.device, dtype=x.dtype) for g in gens])


def rand_like(x: Tensor) -> Tensor:
    """Uniform values in [0, 1) shaped like ``x`` (batch first)."""
    gens = _keyed(x.shape[0], x.device)
    if gens is None:
        return torch.rand_like(x)
    return torch.stack([torch.rand(x.shape[1:], generator=g, device=x.device, dtype=x.dtype) for g in gens])


def randn(n: int, device: torch.device | str = "cpu") -> Tensor:
    """``n`` standard normal values, one per sample."""
    gens = _keyed(n, device)
    if gens is None:
        return torch.randn(n, device=device)
    return torch.cat([torch.randn(1, generator=g, device=device) for g in gens])


def rand(n: int, device: torch.device | str = "cpu") -> Tensor:
    """``n`` uniform values in [0, 1), one per sample."""
    gens = _keyed(n, device)
    if gens is None:
        return torch.rand(n, device=device)
    return torch.cat([torch.rand(1, generator=g, device=device) for g in gens])


def randint(high: int, n: int, device: torch.device | str = "cpu") -> Tensor:
    """``n`` integers uniform in [0, high), one per sample."""
    gens = _keyed(n, device)
    if gens is None:
        return torch.randint(0, high, (n,), device=device)
    return torch.cat([torch.randint(0, high, (1,), generator=g, device=device) for g in gens])


def choice(probs: Tensor, n: int) -> Tensor:
    """``n`` indices drawn with replacement from the distribution ``probs`` (on its device), one per sample."""
    gens = _keyed(n, probs.device)
    if gens is None:
        return torch.multinomial(probs, n, replacement=True)
    return torch.cat([torch.multinomial(probs, 1, generator=g) for g in gens])
