"""Multi-process helpers for ``torchrun`` (DDP): gloo on CPU, NCCL on GPU. Single process needs nothing."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist


def init() -> tuple[int, int, torch.device]:
    """Initialise the process group when launched by torchrun; returns (rank, world_size, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_gather_tensor(t: torch.Tensor) -> list[torch.Tensor]:
    """Gather a same-shaped tensor from every rank (identity in a single process)."""
    if not dist.is_initialized():
        return [t]
    # NCCL gathers CUDA tensors only (e.g. the CPU RNG states); gloo takes them where they are
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else t.device
    out = [torch.empty_like(t, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.to(device))
    return [o.to(t.device) for o in out]


def all_reduce_mean(x: float, device: torch.device) -> float:
    if not dist.is_initialized():
        return x
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def cleanup() -> None:
    """Leave the process group: every rank first reaches a barrier, so no rank closes its connections (gloo's
    sockets) while a peer is still in a collective with it."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (``platform.processor()`` is empty on Linux), for benchmark records."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
