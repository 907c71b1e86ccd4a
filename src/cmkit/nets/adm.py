"""The ADM UNet of OpenAI's released consistency models (Dhariwal & Nichol 2021; ``cm/unet.py`` of
openai/consistency_models), written for cmkit with the same module tree, so released state dicts load by name.

Differences from cmkit's own ``UNet`` that the released weights depend on:
* residual blocks keep ADM's layout (``in_layers``, ``emb_layers``, ``out_layers``, ``skip_connection``), with
  scale-shift (``h·(1 + s) + b``, ImageNet-64) or additive (LSUN-256) noise conditioning, and do the
  resolution changes themselves when ``resblock_updown`` (avg-pool / nearest ×2 inside the block);
* attention splits qkv as (three, heads, head_dim) — the order the released flash-attention path reads —
  with softmax scale 1/√head_dim (q and k each scaled by head_dim^-1/4 in the reference);
* GroupNorm(32) computed in fp32; the time input is 1000·c_noise = 250·ln σ, embedded as [cos, sin]
  (``timestep_embedding``), then Linear–SiLU–Linear to 4·model_channels, plus a class embedding.

``attn_resolutions`` are feature-map sides (64-pixel images with attention at downsample factors 2, 4, 8
have it at 32, 16, 8), as everywhere in cmkit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..guidance import label_embedding
from .blocks import Block, pixel_attention
from .embedding import PositionalEmbedding


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32, C) evaluated in fp32 and cast back (ADM ``normalization``)."""

    def __init__(self, channels: int):
        super().__init__(32, channels)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).type(x.dtype)


def zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def resample(x: Tensor, mode: str) -> Tensor:
    """×2 nearest upsampling (``up``), 2×2 average pooling (``down``), or nothing."""
    if mode == "up":
        return F.interpolate(x, scale_factor=2, mode="nearest")
    if mode == "down":
        return F.avg_pool2d(x, 2)
    return x


class ResBlock(Block):
    """GN–SiLU–[resample]–conv, noise conditioning (scale-shift or add), GN–SiLU–dropout–conv, plus a skip."""

    def __init__(
        self, cin: int, emb_dim: int, dropout: float, cout: int | None = None, scale_shift: bool = True, mode: str = ""
    ):
        super().__init__()
        cout = cout or cin
        self.mode, self.scale_shift = mode, scale_shift
        self.in_layers = nn.Sequential(GroupNorm32(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * cout if scale_shift else cout))
        self.out_layers = nn.Sequential(
            GroupNorm32(cout), nn.SiLU(), nn.Dropout(dropout), zero(nn.Conv2d(cout, cout, 3, padding=1))
        )
        self.skip_connection = nn.Identity() if cout == cin else nn.Conv2d(cin, cout, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers[2](resample(self.in_layers[1](self.in_layers[0](x)), self.mode))
        x = resample(x, self.mode)
        e = self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[3](self.out_layers[2](self.out_layers[1](h)))
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class AttentionBlock(Block):
    """Self-attention over pixels; qkv channels ordered (three, heads, head_dim)."""

    def __init__(self, channels: int, head_channels: int):
        super().__init__()
        if channels % head_channels:
            raise ValueError(f"{channels} attention channels are not divisible by head_channels={head_channels}")
        self.heads = channels // head_channels
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x + pixel_attention(self.norm(x), self.qkv, self.proj_out, self.heads)


class Resample(nn.Module):
    """ADM's ``Downsample`` (stride-2 conv, key ``op``) or ``Upsample`` (nearest ×2 then conv, key ``conv``)."""

    def __init__(self, ch: int, mode: str):
        super().__init__()
        self.mode = mode
        conv = nn.Conv2d(ch, ch, 3, stride=2 if mode == "down" else 1, padding=1)
        setattr(self, "op" if mode == "down" else "conv", conv)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x) if self.mode == "down" else self.conv(resample(x, "up"))


class EmbedSequential(nn.Sequential):
    """A sequence of blocks, the residual ones receiving the noise (and class) embedding."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class ADMUNet(nn.Module):
    """``net(x_in, c_noise, class_labels=None) -> F`` with ADM's architecture and state-dict layout.

    Args:
        img_resolution, in_channels: image side and channels (``out_channels`` = ``in_channels``).
        model_channels, channel_mult, num_blocks: widths and residual blocks per level.
        attn_resolutions: feature-map sides with self-attention (and always the middle block).
        dropout, num_classes (0 = unconditional), head_channels (channels per attention head).
        scale_shift: scale-shift noise conditioning (``use_scale_shift_norm``).
        resblock_updown: resample inside residual blocks instead of strided/upsampling convolutions.
    """

    def __init__(
        self,
        img_resolution: int = 64,
        in_channels: int = 3,
        model_channels: int = 192,
        channel_mult: Sequence[int] = (1, 2, 3, 4),
        num_blocks: int = 3,
        attn_resolutions: Sequence[int] = (32, 16, 8),
        dropout: float = 0.0,
        num_classes: int = 0,
        head_channels: int = 64,
        scale_shift: bool = True,
        resblock_updown: bool = True,
    ):
        super().__init__()
        emb_dim, attn = 4 * model_channels, set(attn_resolutions)
        self.embed = PositionalEmbedding(model_channels)  # no parameters: the state dict is ADM's
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(num_classes, emb_dim) if num_classes else None

        def res(cin: int, cout: int | None = None, mode: str = "") -> ResBlock:
            return ResBlock(cin, emb_dim, dropout, cout, scale_shift, mode)

        def resize(ch: int, mode: str) -> nn.Module:
            return res(ch, ch, mode) if resblock_updown else Resample(ch, mode)

        ch = channel_mult[0] * model_channels
        self.input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skips, side = [ch], img_resolution
        for level, mult in enumerate(channel_mult):
            for _ in range(num_blocks):
                layers: list[nn.Module] = [res(ch, mult * model_channels)]
                ch = mult * model_channels
                if side in attn:
                    layers.append(AttentionBlock(ch, head_channels))
                self.input_blocks.append(EmbedSequential(*layers))
                skips.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(EmbedSequential(resize(ch, "down")))
                skips.append(ch)
                side //= 2
        self.middle_block = EmbedSequential(res(ch), AttentionBlock(ch, head_channels), res(ch))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_blocks + 1):
                layers = [res(ch + skips.pop(), mult * model_channels)]
                ch = mult * model_channels
                if side in attn:
                    layers.append(AttentionBlock(ch, head_channels))
                if level and i == num_blocks:
                    layers.append(resize(ch, "up"))
                    side *= 2
                self.output_blocks.append(EmbedSequential(*layers))
        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), zero(nn.Conv2d(ch, in_channels, 3, padding=1)))

    def forward(self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """F(x_in, t = 1000·c_noise = 250·ln σ) — the reference's ``rescaled_t``."""
        emb = self.time_embed(self.embed(c_noise))
        if self.label_emb is not None:
            if class_labels is None:
                raise ValueError("this network is class-conditional: pass class_labels")
            emb = emb + label_embedding(self.label_emb, class_labels)
        hs, h = [], x
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)
