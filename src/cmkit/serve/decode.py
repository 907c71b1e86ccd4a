"""The Decode tab: a latents file and decoder weights on the server → images."""

from __future__ import annotations

import time

import torch

from ..decoder.decoder import ConsistencyDecoder
from ..decoder.files import read_latents
from ..decoder.latents import check_latents, resolve_scaled
from ..decoder.schedule import DTYPES, MAX_DECODE_STEPS, parse_schedule, steps_to_schedule
from ..errors import CmkitError
from ..imageio import to_uint8
from .common import MAX_PAGE_STEPS, PeakRSS, Result, as_int, grid_image


class DecodeTab:
    """The Decode tab's work; a part of ``Backend``, which holds the models."""

    def decode(
        self,
        latents: str,
        weights: str,
        steps: int | None = 2,
        schedule: str = "",
        dtype: str = "fp32",
        tile: int | None = None,
        seed: int = 0,
    ) -> Result:
        """Latents file + decoder weights (paths on the server, under the allowed paths) → images."""
        lat_path = self.policy.check(latents, "latents file")
        w_path = self.policy.check(weights, "decoder weights")
        if not w_path.exists():
            raise CmkitError(f"decoder weights not found: {weights}")
        if dtype not in DTYPES:
            raise CmkitError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
        sched = (
            parse_schedule(schedule)
            if (schedule or "").strip()
            else steps_to_schedule(as_int(steps or 2, "steps", 1, min(MAX_DECODE_STEPS, MAX_PAGE_STEPS)))
        )
        tile = None if tile in (None, "", 0) else as_int(tile, "tile", 1, 4096)
        z = read_latents(lat_path)
        if z.ndim == 3:
            z = z[None]
        stamp = max((p.stat().st_mtime_ns for p in ([w_path] if w_path.is_file() else w_path.iterdir())), default=0)
        dec = self.decoders.get(
            (str(w_path), stamp, dtype),
            lambda: ConsistencyDecoder.from_pretrained(w_path, device=self.device, dtype=DTYPES[dtype], verify=True),
        )
        check_latents(z, dec.config)
        scaled = resolve_scaled(z, "auto", dec.config.scaling_factor)
        peak = PeakRSS()
        with peak:
            t0 = time.perf_counter()
            x = dec.decode(
                z,
                sched,
                torch.Generator().manual_seed(as_int(seed, "seed", 0, 2**62)),
                tile=tile,
                tile_overlap=None if tile is None else max(0, tile // 4),
                scaled=scaled,
            )
            seconds = time.perf_counter() - t0

        info = (
            f"decoded {tuple(z.shape)} → {tuple(x.shape)} with t = {dec.timesteps(sched)} ({dtype}"
            f"{f', tiles of {tile}' if tile else ''}) in **{seconds:.2f} s**; peak memory {peak.describe()}"
        )
        r = Result({"image": grid_image(x, nrow=min(4, len(x)), scale=max(1, 256 // x.shape[-1]))}, info, to_uint8(x))
        r.extra.update(seconds=seconds, peak_bytes=peak.peak)
        return r
