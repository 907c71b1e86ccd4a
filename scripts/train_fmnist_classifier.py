#!/usr/bin/env python
"""Train the Fashion-MNIST feature classifier shipped in ``cmkit/assets`` (used for "FD (Fashion-MNIST classifier
features)").

Trains ``cmkit.metrics.fmnist_classifier.FMNISTClassifier`` on the 60k training split with AdamW and a
one-cycle learning-rate schedule, light augmentation (random ±2 px shift, horizontal flip), then measures
top-1 accuracy on the 10k test split and writes

    src/cmkit/assets/fmnist_classifier.safetensors   (fp16 weights)
    src/cmkit/assets/fmnist_classifier.json          (test accuracy, epochs, wall time, machine, recipe)

Usage: ``python scripts/train_fmnist_classifier.py [--epochs 7] [--threads 1] [--out DIR]``.
On a busy 2-core machine ``--threads 1`` is faster than 2 (no oversubscription).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from cmkit.metrics.fmnist_classifier import ASSETS, FMNISTClassifier, accuracy
from cmkit.metrics.idx import load_fmnist


def to_input(images_uint8: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1] (the classifier's input convention)."""
    return torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float() / 127.5 - 1


def augment(x: torch.Tensor, gen: torch.Generator, shift: int) -> torch.Tensor:
    """Per-image random translation by up to ``shift`` pixels (background-filled) and horizontal flip (p = 0.5)."""
    b, _, h, w = x.shape
    padded = F.pad(x[:, 0], (shift, shift, shift, shift), value=-1.0)
    rows = torch.randint(0, 2 * shift + 1, (b, 1), generator=gen) + torch.arange(h)
    cols = torch.randint(0, 2 * shift + 1, (b, 1), generator=gen) + torch.arange(w)
    flip = torch.rand(b, generator=gen) < 0.5
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    out = padded[torch.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return out.unsqueeze(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=7)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--shift", type=int, default=2, help="max random translation in pixels (0: none)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=None, help="folder with the Fashion-MNIST IDX .gz files")
    ap.add_argument("--out", default=str(ASSETS))
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    x_train, y_train = load_fmnist("train", args.data)
    x_test, y_test = load_fmnist("test", args.data)
    xs, ys = to_input(x_train), torch.from_numpy(y_train)

    model = FMNISTClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = len(xs) // args.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch, pct_start=0.2
    )
    t0 = time.time()
    history = []
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(xs), generator=gen)
        total, correct, loss_sum = 0, 0, 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch_size : (i + 1) * args.batch_size]
            xb, yb = augment(xs[idx], gen, args.shift), ys[idx]
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
            total += len(idx)
        model.eval()
        test_acc = accuracy(model, x_test, y_test)
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": loss_sum / total,
                "train_acc": correct / total,
                "test_acc": test_acc,
                "elapsed_s": round(time.time() - t0, 1),
            }
        )
        print(json.dumps(history[-1]), flush=True)
    wall = time.time() - t0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "fmnist_classifier.safetensors"))
    os.chmod(out / "fmnist_classifier.safetensors", 0o644)
    # Accuracy of the weights exactly as shipped (fp16 storage, loaded back to fp32).
    from cmkit.metrics.fmnist_classifier import load_classifier

    shipped = load_classifier(out / "fmnist_classifier.safetensors")
    record = {
        "model": "cmkit.metrics.fmnist_classifier.FMNISTClassifier",
        "feature_dim": 128,
        "feature_layer": "embed (post-ReLU penultimate layer)",
        "parameters": sum(p.numel() for p in model.parameters()),
        "test_accuracy": accuracy(shipped, x_test, y_test),
        "test_accuracy_fp32": history[-1]["test_acc"],
        "epochs": args.epochs,
        "wall_time_s": round(wall, 1),
        "recipe": {
            "optimizer": "AdamW",
            "lr": args.lr,
            "weight_decay": args.weight_decay,
            "schedule": "OneCycle",
            "batch_size": args.batch_size,
            "augment": f"random shift ±{args.shift} px, horizontal flip p=0.5",
            "seed": args.seed,
            "train_split": "Fashion-MNIST train (60,000)",
        },
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "threads": args.threads,
            "torch": torch.__version__,
        },
        "history": history,
        "storage": "fp16 safetensors",
        "command": "python " + " ".join(sys.argv),
    }
    (out / "fmnist_classifier.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"test accuracy {record['test_accuracy']:.4f} after {args.epochs} epochs in {wall:.0f} s")


if __name__ == "__main__":
    main()
