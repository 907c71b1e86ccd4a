"""Run by tests/test_fsdp.py under torchrun: the same short runs with DDP and with FSDP (one process group for all),
an FSDP run interrupted and resumed, and sCT (the JVP objective) under both."""

import sys

from conftest import tiny_config

from cmkit import distributed as dist
from cmkit.training.loop import Loop

COMMON = [
    "train.batch_size=16",
    "train.noise=per_sample",
    "train.num_threads=1",
    "model.dropout=0",
    "train.ema_rates=0.9",
    "train.log_every=1",
    "train.sample_every=0",
    "train.ckpt_every=0",
    "train.accum=2",
]
CT = ["model.attn_resolutions=4"]  # an attention block among the sharded units too


def main(out: str, teacher: str) -> None:
    runs = {
        "ct-ddp": ("digits-ct", [*CT, "train.parallel=ddp", "train.steps=4"]),
        "ct-fsdp": ("digits-ct", [*CT, "train.parallel=fsdp", "train.steps=4"]),
        "sct-ddp": ("digits-sct", ["train.parallel=ddp", "train.steps=3", f"train.init_from={teacher}"]),
        "sct-fsdp": ("digits-sct", ["train.parallel=fsdp", "train.steps=3", f"train.init_from={teacher}"]),
    }
    for name, (preset, overrides) in runs.items():
        Loop(tiny_config(preset, f"{out}/{name}", *COMMON, *overrides), progress=False).run()
    # interrupted after 2 of 4 steps, then resumed by a new Loop
    fsdp = [*COMMON, *CT, "train.parallel=fsdp", "train.steps=4"]
    first = Loop(tiny_config("digits-ct", f"{out}/ct-fsdp-resumed", *fsdp), progress=False)
    while first.step < 2:
        first.train_step()
    first.save_checkpoint()
    first.close()
    Loop(tiny_config("digits-ct", f"{out}/ct-fsdp-resumed", *fsdp, "train.resume=true"), progress=False).run()
    if dist.is_main():
        print("RESULT done")
    dist.cleanup()


if __name__ == "__main__":
    main(*sys.argv[1:3])
