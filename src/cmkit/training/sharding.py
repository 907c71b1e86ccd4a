"""Sharded data parallelism (``train.parallel=fsdp``) with PyTorch's own FSDP (``torch.distributed.fsdp.fully_shard``,
"FSDP2"; Zhao et al. 2023, "PyTorch FSDP").

Each process holds 1/world of every parameter, gradient, Adam moment and EMA: the network is all-gathered block by
block for the forward and backward passes and its gradients are reduce-scattered. Every residual and attention
block (``cmkit.nets.blocks.Block``) is its own FSDP unit, then the rest of the network; the evaluation EMAs and the
target network θ⁻ are sharded the same way, so their updates are local; a teacher stays whole on every process.

Checkpoints hold full tensors, in the same files as an unsharded run's: a full state is gathered for saving
(``full_state_dict``, ``full_optimizer_state``), and a checkpoint is loaded into the whole modules before they are
sharded (``shard_optimizer_state`` cuts the optimizer's moments like their parameters).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as torch_dist
from torch import Tensor, nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from ..nets.blocks import Block


def broadcast_from_rank0(modules: list[nn.Module]) -> None:
    """Give every process rank 0's parameters and buffers (processes initialise with their own seeds)."""
    for module in modules:
        for t in [*module.parameters(), *module.buffers()]:
            torch_dist.broadcast(t.data, src=0)


def shard(module: nn.Module) -> nn.Module:
    """``fully_shard`` every block of ``module``, then ``module`` itself (in place)."""
    for block in module.modules():
        if isinstance(block, Block):
            fully_shard(block)
    fully_shard(module)
    return module


def full(t: Any) -> Any:
    """A DTensor gathered into a whole tensor on every process (a collective); anything else as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def full_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """The whole state dict of a (sharded) module, on the CPU; every process must call it."""
    return {k: full(v).detach().cpu() for k, v in module.state_dict().items()}


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every sharded moment gathered whole (the unsharded optimizer's format)."""
    sd = optimizer.state_dict()
    state = {
        i: {k: full(v).detach().cpu() if torch.is_tensor(v) else v for k, v in s.items()}
        for i, s in sd["state"].items()
    }
    return {"state": state, "param_groups": sd["param_groups"]}


def shard_optimizer_state(sd: dict[str, Any], params: list[Tensor]) -> dict[str, Any]:
    """An unsharded optimizer state dict cut like its (sharded) parameters: moments become DTensors with the
    parameter's mesh and placements; scalars (Adam's step) stay as they are."""

    def cut(v: Any, p: Tensor) -> Any:
        if isinstance(p, DTensor) and torch.is_tensor(v) and v.shape == p.shape:
            return distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
        return v

    state = {i: {k: cut(v, params[int(i)]) for k, v in s.items()} for i, s in sd["state"].items()}
    return {"state": state, "param_groups": sd["param_groups"]}
