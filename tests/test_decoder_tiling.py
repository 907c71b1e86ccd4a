"""Tiled decoding: tile geometry, blending, noise consistency, bounded network input, difference to untiled."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cmkit.decoder.config import DecoderConfig
from cmkit.decoder.latents import normalize_latents
from cmkit.decoder.sampler import sample
from cmkit.decoder.schedule import DecoderSchedule
from cmkit.decoder.testing import random_decoder, raw_latents
from cmkit.decoder.tiling import blend_window, plan_tiles, spans
from cmkit.errors import CmkitError

pytestmark = pytest.mark.usefixtures("one_thread")


def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize("size,tile,overlap", [(24, 8, 2), (32, 12, 4), (17, 8, 3), (64, 64, 16), (9, 16, 4)])
def test_tiles_cover_with_min_overlap_and_windows_sum_to_one(size, tile, overlap):
    s = spans(size, tile, overlap)
    assert s[0][0] == 0 and s[-1][1] == size and all(e - b == min(tile, size) for b, e in s)
    assert all(prev[1] - nxt[0] >= overlap for prev, nxt in zip(s, s[1:]))
    tiles = plan_tiles(size, size + 3, tile, overlap)
    total = torch.zeros(size * 8, (size + 3) * 8)
    for t in tiles:
        py, px = t.pixels(8)
        total[py, px] += blend_window(t, 8)[0, 0]
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-6)


def test_bad_tile_arguments():
    with pytest.raises(CmkitError, match="overlap < tile"):
        plan_tiles(16, 16, 8, 8)
    with pytest.raises(CmkitError, match="tile >= 1"):
        plan_tiles(16, 16, 0, 0)


def test_one_tile_is_bitwise_the_untiled_decode():
    dec = random_decoder(seed=1)
    z = raw_latents(2, 6, 5, seed=1)
    ref = dec.decode(z, generator=gen())
    assert torch.equal(dec.decode(z, generator=gen(), tile=8), ref)


class PixelwiseNet(nn.Module):
    """A network without spatial context: tiling must then be exact (noise, windows, bookkeeping)."""

    def __init__(self):
        super().__init__()
        self.mix = nn.Conv2d(7, 6, 1)
        torch.nn.init.normal_(self.mix.weight, generator=torch.Generator().manual_seed(0))

    def forward(self, x, t):
        return torch.tanh(self.mix(x)) * (1 + t / 1024)


def test_tiling_is_exact_for_a_pixelwise_network():
    """Same noise for the same pixels in every tile, and a partition of unity: tiled == untiled."""
    cfg = DecoderConfig.tiny()
    net, schedule = PixelwiseNet(), DecoderSchedule.cosine()
    z = normalize_latents(raw_latents(2, 20, 13, seed=2), cfg)
    with torch.no_grad():
        ref = sample(net, z, [1008, 768, 512], schedule, cfg, generator=gen())
        tiled = sample(net, z, [1008, 768, 512], schedule, cfg, generator=gen(), tile=8, tile_overlap=3)
    torch.testing.assert_close(tiled, ref, rtol=0, atol=2e-6)


def decode_recording_sizes(dec, z, **kw):
    sizes = []
    hook = dec.unet.register_forward_pre_hook(lambda m, args: sizes.append(tuple(args[0].shape[2:])))
    try:
        return dec.decode(z, generator=gen(), **kw), sizes
    finally:
        hook.remove()


def test_tiled_difference_to_untiled_is_bounded_and_seamless():
    """Random tiny UNet on a 16×24 latent (128×192 px); reported numbers are in docs/decoder.md."""
    dec = random_decoder(seed=2)
    z = raw_latents(1, 16, 24, seed=3)
    ref, ref_sizes = decode_recording_sizes(dec, z)
    assert ref_sizes == [(128, 192)] * 2
    diffs = {}
    for tile, overlap in [(8, 2), (12, 4)]:
        out, sizes = decode_recording_sizes(dec, z, tile=tile, tile_overlap=overlap)
        n_tiles = len(plan_tiles(16, 24, tile, overlap))
        assert sizes == [(8 * tile, 8 * tile)] * (2 * n_tiles)  # the network never sees more than one tile
        d = (out - ref).abs()
        diffs[tile] = d.mean().item()
        assert d.mean().item() < 0.06 and d.max().item() < 0.4
        # no seams: gradients across tile borders are as in the untiled image (ratio ≈ 1)
        print(f"tile {tile}/{overlap}: mean |tiled - untiled| {d.mean():.4f}, max {d.max():.4f}")
        cols = sorted({8 * t.x0 - 1 for t in plan_tiles(16, 24, tile, overlap) if t.x0 > 0})
        grad = lambda x: (x[..., 1:] - x[..., :-1]).abs()[..., cols].mean().item()  # noqa: E731
        assert grad(out) < 1.1 * grad(ref)
    assert diffs[12] < diffs[8]  # larger tiles, closer to the untiled result


def test_tiled_batch_and_low_precision():
    dec = random_decoder(seed=3, dtype=torch.bfloat16, channels_last=True)
    z = raw_latents(2, 12, 10, seed=4)
    out = dec.decode(z, generator=gen(), tile=6, tile_overlap=2)
    assert out.shape == (2, 3, 96, 80) and torch.isfinite(out).all() and out.abs().max() <= 1
