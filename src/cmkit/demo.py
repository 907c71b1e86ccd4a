"""``make demo``: train a small digits teacher and distil it into a consistency model, then write grids.

Runs in a few minutes on a 2-core CPU. Re-running resumes finished runs instantly. Outputs:
demo/teacher_heun35.png (35 evaluations), demo/cd_1step.png (1 evaluation), demo/cd_2step.png, and an
editing gallery (``demo/gallery/TASK.png``) made with the shipped Fashion-MNIST CD model and the colour emoji
(``emoji-ect``) model on held-out images. It ends by printing the command of the web page (``cmkit serve``).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from .datasets import load_dataset
from .editing.gallery import write_gallery
from .errors import CmkitError
from .formats.run_dir import RunDir
from .formats.zoo import shipped_model_dir
from .generate import generate, multistep_sigmas
from .imageio import save_grid
from .load import load_model
from .schedules import training_grid
from .training.loop import train
from .training.presets import get_config

OUT = Path("demo")
#: the one command that opens the page of `cmkit serve` on the shipped models (and the demo's runs)
SERVE_COMMAND = f".venv/bin/python -m cmkit serve --runs {OUT / 'runs'}"


def ensure_trained(preset: str, out: Path, *overrides: str) -> None:
    """Train ``preset`` into ``out`` unless it already finished (resumes an interrupted run)."""
    run = RunDir(out)
    for note in run.recover():  # an earlier demo killed while writing a checkpoint
        print(note)
    if run.damage() and not run.checkpoint.exists():  # the demo's own run, killed before its first checkpoint
        print(f"{out}: an earlier attempt stopped before its first checkpoint; starting it again")
        shutil.rmtree(out)
    cfg = get_config(preset, [f"train.out_dir={out}", f"train.resume={run.has_checkpoint()}", *overrides])
    if run.has_checkpoint() and run.state()["step"] >= cfg.train.steps:
        print(f"{preset}: already trained in {out}")
        return
    print(f"training {preset} -> {out}")
    train(cfg)


def timed_grid(model_dir: Path, sampler: str, steps: int, name: str, n: int = 64) -> tuple[Path, float]:
    model, cfg = load_model(model_dir)
    sigmas = multistep_sigmas(cfg, steps) if sampler == "multistep" else [cfg.model.sigma_max]
    t0 = time.time()
    x, _ = generate(model, cfg, n, sampler, sigmas, steps, seed=0, progress=False)
    per_image = (time.time() - t0) / n
    return save_grid(x, OUT / name, nrow=8), per_image


def main() -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    runs = OUT / "runs"
    ensure_trained("digits-edm", runs / "digits-edm")
    ensure_trained(
        "digits-cd",
        runs / "digits-cd",
        f"train.teacher={runs / 'digits-edm'}",
        f"train.init_from={runs / 'digits-edm'}",
    )
    rows = [
        timed_grid(runs / "digits-edm", "heun", 18, "teacher_heun35.png"),
        timed_grid(runs / "digits-cd", "onestep", 1, "cd_1step.png"),
        timed_grid(runs / "digits-cd", "multistep", 2, "cd_2step.png"),
    ]
    print("\nwrote:")
    for (path, sec), nfe in zip(rows, (35, 1, 2)):
        print(f"  {path}  ({nfe:>2} network evaluations, {1000 * sec:.2f} ms/image)")
    print(f"one-step speed-up over the 35-evaluation teacher: {rows[0][1] / rows[1][1]:.0f}x")
    editing_gallery()
    print(f"\nweb page on the shipped models and these runs (then open http://127.0.0.1:7860/):\n  {SERVE_COMMAND}")


def held_out(model_name: str, dataset: str, n: int) -> tuple[torch.nn.Module, torch.Tensor, list[float] | None] | None:
    """A shipped model, ``n`` images of the held-out split it was not trained on, and the model's training σ
    grid (the editors' σ lists lie on it), or None if missing."""
    path = shipped_model_dir(model_name)
    if path is None:
        print(f"  (skipped {model_name}: not shipped)")
        return None
    model, cfg = load_model(path)
    try:
        data = load_dataset(dataset, split="test", resolution=cfg.model.img_resolution)
    except CmkitError as e:
        print(f"  (skipped {model_name}: {e})")
        return None
    return model, data.images[:n].float() / 127.5 - 1, training_grid(cfg)


def editing_gallery(out: Path = OUT / "gallery") -> None:
    """One panel per editing task with the shipped models on held-out images (also the README's pictures)."""
    print("\nzero-shot editing gallery (held-out images):")
    with torch.no_grad():
        write_gallery(out, held_out("fmnist-cd", "fashion_mnist", 8), held_out("emoji-ect", "emoji", 8))


if __name__ == "__main__":
    main()
