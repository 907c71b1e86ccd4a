"""Run by tests/test_accum.py under torchrun: train a few steps with train.accum = 1 and 2 and count the gradient
all-reduces of DDP (a communication hook sees every bucket it reduces)."""

import json
import sys

import torch.distributed as torch_dist
from conftest import tiny_config
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from cmkit import distributed as dist
from cmkit.training.loop import Loop

out, *overrides = sys.argv[1:]
calls = {}
for accum in (1, 2):
    cfg = tiny_config("digits-ict", f"{out}/accum{accum}", f"train.accum={accum}", *overrides)
    loop = Loop(cfg, progress=False)
    count = [0]

    def hook(state, bucket, count=count):
        count[0] += 1
        return default_hooks.allreduce_hook(torch_dist.group.WORLD, bucket)

    loop.net.register_comm_hook(None, hook)
    loop.run()
    calls[accum] = count[0]
if dist.is_main():
    print("RESULT " + json.dumps(calls))
dist.cleanup()
