"""Which weights of a training run to export: FD of each EMA (and the online model) on a few samples.

The FD is measured against the Fashion-MNIST **training** split, so that choosing the weights does not
look at the test split that the quality benchmark reports on. Consistency models are scored at one step,
diffusion models with the Heun sampler at their preset's steps.

    python scripts/compare_weights.py runs/fmnist-cd --n 1000
"""

from __future__ import annotations

import argparse

import torch

from cmkit.denoiser_config import Config
from cmkit.files import load_safetensors
from cmkit.formats.run_dir import RunDir
from cmkit.generate import default_sampler, generate
from cmkit.imageio import to_uint8
from cmkit.metrics.evaluate import get_extractor
from cmkit.metrics.frechet import feature_statistics, frechet_distance_stats
from cmkit.metrics.reference import load_reference


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="training run directory (with checkpoint/)")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    run = RunDir(args.run)
    cfg = Config.from_dict(run.saved_config())
    names = [RunDir.weights_name(r) for r in cfg.train.ema_rates] + [RunDir.weights_name(None)]
    extractor = get_extractor("fmnist")
    reference = load_reference("fmnist-train", extractor, progress=False)
    sampler, sigmas, steps = default_sampler(cfg)
    for name in names:
        model = cfg.model.build().eval()
        load_safetensors(model, run.checkpoint / f"{name}.safetensors")
        x, _ = generate(model, cfg, args.n, sampler, sigmas, steps, seed=0, progress=False, bf16=True)
        fd = frechet_distance_stats(feature_statistics(extractor.extract(to_uint8(x), progress=False)), reference.stats)
        print(f"{args.run}  {name:<12} {sampler} ({steps} steps)  FD vs train split ({args.n} samples): {fd:.3f}")


if __name__ == "__main__":
    main()
