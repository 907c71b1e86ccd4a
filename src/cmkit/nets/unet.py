"""A configurable UNet backbone of the DDPM++/ADM family (Dhariwal & Nichol 2021; Song et al. 2021).

Residual blocks with scale-shift noise conditioning, attention via ``scaled_dot_product_attention`` at
chosen resolutions, dropout, optional class conditioning, positional or Fourier noise embedding.
The same class builds the tiny CPU presets and the paper-size ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..guidance import label_embedding
from .blocks import Block, pixel_attention
from .embedding import make_embedding


def norm(ch: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups of at least 4 channels (tiny nets keep a valid group count)."""
    g = min(32, max(1, ch // 4))
    while ch % g:
        g -= 1
    return nn.GroupNorm(g, ch, eps=1e-6)


def zero(module: nn.Module) -> nn.Module:
    """Zero-initialise the last layer of a residual branch (ADM)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(Block):
    """GN-SiLU-conv, scale-shift by the noise embedding, GN-SiLU-dropout-conv, plus a (1×1) skip."""

    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2, self.drop = norm(cout), nn.Dropout(dropout)
        self.conv2 = zero(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(x) + h


class Attention(Block):
    """Multi-head self-attention over pixels (qkv split as (three, heads, head_dim), as in the CM code)."""

    def __init__(self, ch: int, head_channels: int = 64):
        super().__init__()
        self.heads = max(1, ch // head_channels)
        self.norm, self.qkv = norm(ch), nn.Conv2d(ch, 3 * ch, 1)
        self.proj = zero(nn.Conv2d(ch, ch, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x + pixel_attention(self.norm(x), self.qkv, self.proj, self.heads)


class Down(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Up(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor, size: Sequence[int]) -> Tensor:
        return self.conv(F.interpolate(x, size=tuple(size), mode="nearest"))


class UNet(nn.Module):
    """F_θ(x_in, c_noise, class_labels) for images of shape (B, in_channels, R, R).

    Args:
        img_resolution: R (any size; odd sizes are handled by the resampling).
        model_channels: base width C; level l has C·channel_mult[l] channels.
        num_blocks: residual blocks per level.
        attn_resolutions: resolutions at which an attention block follows each residual block.
        embedding: ``"positional"`` (ADM; of ``positional_scale``·c_noise, 1000 as in ADM) or ``"fourier"``
            (NCSN++; scale ``fourier_scale``).
        num_classes: > 0 enables class conditioning (label embedding added to the noise embedding).
        time_inputs: 2 adds a second time input ``c_noise2`` (a flow map's gap t − r, MeanFlow), embedded like
            the first and added to it; its last layer starts at zero, so a fresh second input changes nothing.
    """

    def __init__(
        self,
        img_resolution: int = 32,
        in_channels: int = 3,
        out_channels: int | None = None,
        model_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_blocks: int = 2,
        attn_resolutions: Sequence[int] = (),
        dropout: float = 0.0,
        num_classes: int = 0,
        embedding: str = "positional",
        fourier_scale: float = 16.0,
        positional_scale: float = 1000.0,
        head_channels: int = 64,
        time_inputs: int = 1,
        **_: object,
    ):
        super().__init__()
        C, emb_dim = model_channels, 4 * model_channels
        self.img_resolution, self.in_channels = img_resolution, in_channels
        self.emb = make_embedding(embedding, C, fourier_scale, positional_scale)
        self.emb_mlp = nn.Sequential(nn.Linear(C, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.emb_mlp2 = (
            nn.Sequential(nn.Linear(C, emb_dim), nn.SiLU(), zero(nn.Linear(emb_dim, emb_dim)))
            if time_inputs == 2
            else None
        )
        self.label_emb = nn.Embedding(num_classes, emb_dim) if num_classes else None
        self.conv_in = nn.Conv2d(in_channels, C, 3, padding=1)

        self.enc, skips, ch, res = nn.ModuleList(), [C], C, img_resolution
        for level, mult in enumerate(channel_mult):
            for _ in range(num_blocks):
                self.enc.append(self._stage(ch, C * mult, emb_dim, dropout, res in attn_resolutions, head_channels))
                ch = C * mult
                skips.append(ch)
            if level < len(channel_mult) - 1:
                self.enc.append(Down(ch))
                skips.append(ch)
                res = (res + 1) // 2
        self.mid = nn.ModuleList(
            [
                self._stage(ch, ch, emb_dim, dropout, True, head_channels),
                self._stage(ch, ch, emb_dim, dropout, False, head_channels),
            ]
        )
        self.dec = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_blocks + 1):
                self.dec.append(
                    self._stage(ch + skips.pop(), C * mult, emb_dim, dropout, res in attn_resolutions, head_channels)
                )
                ch = C * mult
            if level > 0:
                self.dec.append(Up(ch))
                res = res * 2
        self.out = nn.Sequential(norm(ch), nn.SiLU(), zero(nn.Conv2d(ch, out_channels or in_channels, 3, padding=1)))

    @staticmethod
    def _stage(cin: int, cout: int, emb_dim: int, dropout: float, attn: bool, head_channels: int) -> nn.ModuleList:
        stage = nn.ModuleList([ResBlock(cin, cout, emb_dim, dropout)])
        if attn:
            stage.append(Attention(cout, head_channels))
        return stage

    @staticmethod
    def _run(stage: nn.ModuleList, h: Tensor, emb: Tensor) -> Tensor:
        h = stage[0](h, emb)
        for block in stage[1:]:
            h = block(h)
        return h

    def forward(
        self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None = None, c_noise2: Tensor | None = None
    ) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):  # noise embedding in fp32
            emb = self.emb_mlp(self.emb(c_noise))
            if self.emb_mlp2 is not None:
                if c_noise2 is None:
                    raise ValueError("this backbone takes two times: pass c_noise2 of shape (B,)")
                emb = emb + self.emb_mlp2(self.emb(c_noise2))
            if self.label_emb is not None:
                if class_labels is None:
                    raise ValueError("this model is class-conditional: pass class_labels of shape (B,)")
                emb = emb + label_embedding(self.label_emb, class_labels)
        h = self.conv_in(x)
        hs = [h]
        for m in self.enc:
            h = m(h) if isinstance(m, Down) else self._run(m, h, emb)
            hs.append(h)
        for m in self.mid:
            h = self._run(m, h, emb)
        for m in self.dec:
            if isinstance(m, Up):
                h = m(h, hs[-1].shape[-2:])
            else:
                h = self._run(m, torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)
