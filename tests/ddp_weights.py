"""Run by tests/test_continuous_time.py under torchrun: train a few steps, then check every rank holds the same
weights (the JVP pass runs outside DDP; the trainable pass must still be synchronised), rCM's critic included."""

import sys

import torch

from cmkit import distributed as dist
from cmkit.training.loop import Loop
from cmkit.training.presets import get_config

preset, out, *overrides = sys.argv[1:]
cfg = get_config(
    preset,
    [
        "model.model_channels=16",
        "model.channel_mult=1,2",
        "model.num_blocks=1",
        "train.batch_size=16",
        "train.sample_every=0",
        "train.ckpt_every=0",
        "train.log_every=1",
        "train.num_threads=1",
        "train.steps=3",
        f"train.out_dir={out}",
        *overrides,
    ],
)
loop = Loop(cfg, progress=False)
loop.run()
critic = getattr(loop.task, "fake", None)  # rCM's fake score trains too (its own DDP wrapper)
params = [*loop.model.parameters(), *(critic.parameters() if critic is not None else [])]
flat = torch.cat([p.detach().flatten() for p in params])
gathered = dist.all_gather_tensor(flat)
if dist.is_main():
    same = all(torch.equal(gathered[0], g) for g in gathered[1:])
    print(f"RESULT same={same} ranks={len(gathered)}")
dist.cleanup()
