"""The Consistency Decoder network: an attention-free ResNet UNet in pixel space (621,277,702 parameters).

Reference doc §1.5 (architecture table, ``ConvResblock``, ResDown/ResUp, skip connections) and §1.6
(parameter counts). Module and parameter names are those of diffusers' ``UNet2DModel`` as built by
``ConsistencyDecoderVAE`` (``conv_in``, ``time_proj``, ``down_blocks.k.resnets.i.norm1`` …), so a
diffusers ``decoder_unet`` state dict loads with only its prefix removed; OpenAI's TorchScript names
are mapped in ``keys.py``.

Inference needs no autograd, so with gradients disabled the blocks work in place (GroupNorm output,
scale-shift, SiLU, residual add), every skip tensor is released as soon as it is consumed, an up
block's concatenated input is released right after its shortcut conv (``ResBlock.forward_parts``), and
the ×2 skip of an upsampling block is added through a broadcast view. With gradients enabled (training)
the same blocks take the plain out-of-place path; both give identical results.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import DecoderConfig


class ResBlock(nn.Module):
    """``ConvResblock`` = diffusers ``ResnetBlock2D(time_embedding_norm="scale_shift")`` (§1.5).

    scale, shift = Linear(SiLU(temb)).chunk(2)
    h   = Conv3x3(SiLU(GN(x)))                       # resample(h) and resample(x) first if up/down
    h   = Conv3x3(SiLU(GN(h) · (1 + scale) + shift))
    out = skip(x) + h                                # 1×1 conv skip iff C_in ≠ C_out
    """

    def __init__(self, cin: int, cout: int, temb_dim: int, groups: int, eps: float, resample: str | None = None):
        super().__init__()
        self.resample = resample
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, 2 * cout)
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def _resample(self, x: Tensor) -> Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x

    @staticmethod
    def _add_upsampled_(h: Tensor, x: Tensor) -> Tensor:
        """h += nearest-×2(x) without materialising the upsampled x (a broadcast over 2×2 views of h)."""
        B, C, H, W = h.shape
        h.unflatten(2, (H // 2, 2)).unflatten(4, (W // 2, 2)).add_(x[:, :, :, None, :, None])
        return h

    def forward(self, x: Tensor, temb_act: Tensor) -> Tensor:
        """``temb_act`` is SiLU(time embedding), computed once per network call."""
        return self.forward_parts([x], temb_act)

    def forward_parts(self, parts: list[Tensor], temb_act: Tensor) -> Tensor:
        """The block on ``cat(parts, dim=1)``; empties ``parts`` so the (large) input can be freed early.

        With gradients off, the 1×1 shortcut is computed first and the concatenated input is released
        before conv1/conv2 run (same arithmetic as diffusers, in a different order: results are identical).
        """
        inplace = not torch.is_grad_enabled()
        x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        parts.clear()
        h = self._resample(F.silu(self.norm1(x), inplace=inplace))
        defer_up = inplace and self.resample == "up"  # add the ×2 skip lazily: saves one upsampled tensor
        if not defer_up:
            x = self._resample(x)
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        h = self.conv1(h)
        scale, shift = self.time_emb_proj(temb_act)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h)
        h = h.mul_(1 + scale).add_(shift) if inplace else h * (1 + scale) + shift
        h = self.conv2(F.silu(h, inplace=inplace))
        if defer_up:
            return self._add_upsampled_(h, x)
        return h.add_(x) if inplace else x + h


class TimestepEmbedding(nn.Module):
    """The time MLP ``linear_1 → SiLU → linear_2`` (OpenAI ``embed_time.f_1/f_2``)."""

    def __init__(self, dim_in: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim_in, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class DownBlock(nn.Module):
    """diffusers ``ResnetDownsampleBlock2D``: ``layers`` ResBlocks, then an avg-pool ResBlock (not at the bottom)."""

    def __init__(self, cin: int, cout: int, layers: int, downsample: bool, temb_dim: int, groups: int, eps: float):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResBlock(cin if i == 0 else cout, cout, temb_dim, groups, eps) for i in range(layers)]
        )
        if downsample:
            self.downsamplers = nn.ModuleList([ResBlock(cout, cout, temb_dim, groups, eps, resample="down")])
        else:
            self.downsamplers = None

    def forward(self, h: Tensor, temb_act: Tensor, skips: list[Tensor]) -> Tensor:
        for block in (*self.resnets, *(self.downsamplers or ())):
            h = block(h, temb_act)
            skips.append(h)
        return h


class MidBlock(nn.Module):
    """diffusers ``UNetMidBlock2D(add_attention=False)``: two ResBlocks at the bottom resolution."""

    def __init__(self, ch: int, temb_dim: int, groups: int, eps: float):
        super().__init__()
        self.resnets = nn.ModuleList([ResBlock(ch, ch, temb_dim, groups, eps) for _ in range(2)])

    def forward(self, h: Tensor, temb_act: Tensor) -> Tensor:
        for block in self.resnets:
            h = block(h, temb_act)
        return h


class UpBlock(nn.Module):
    """diffusers ``ResnetUpsampleBlock2D``: ``layers + 1`` ResBlocks on [h, skip] concatenations, then a ×2 ResBlock."""

    def __init__(
        self, cin: int, cprev: int, cout: int, layers: int, upsample: bool, temb_dim: int, groups: int, eps: float
    ):
        super().__init__()
        self.resnets = nn.ModuleList()
        for i in range(layers):
            skip_ch = cin if i == layers - 1 else cout
            self.resnets.append(ResBlock((cprev if i == 0 else cout) + skip_ch, cout, temb_dim, groups, eps))
        if upsample:
            self.upsamplers = nn.ModuleList([ResBlock(cout, cout, temb_dim, groups, eps, resample="up")])
        else:
            self.upsamplers = None

    def forward(self, carry: list[Tensor], temb_act: Tensor, skips: list[Tensor]) -> Tensor:
        """``carry`` = [h], emptied here so that h can be freed as soon as it is concatenated."""
        h = carry.pop()
        for block in self.resnets:
            parts = [h, skips.pop()]
            del h  # the block frees the pair once concatenated
            h = block.forward_parts(parts, temb_act)
        for block in self.upsamplers or ():
            h = block(h, temb_act)
        return h


class DecoderUNet(nn.Module):
    """F_θ(c_in · x_t ⊕ z_up, t): input (B, 7, H, W), integer timesteps t, output (B, 6, H, W) (§1.5).

    H and W must be multiples of ``config.pixel_multiple`` (8 for the released 4-level network).
    """

    def __init__(self, config: DecoderConfig | None = None):
        super().__init__()
        self.config = cfg = config or DecoderConfig()
        ch, L, temb = cfg.block_out_channels, len(cfg.block_out_channels), cfg.temb_dim
        groups, eps = cfg.norm_num_groups, cfg.norm_eps
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_proj = nn.Embedding(cfg.num_train_timesteps, ch[0])
        self.time_embedding = TimestepEmbedding(ch[0], temb)
        self.down_blocks = nn.ModuleList(
            [DownBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, i < L - 1, temb, groups, eps) for i in range(L)]
        )
        self.mid_block = MidBlock(ch[-1], temb, groups, eps)
        rev = ch[::-1]
        self.up_blocks = nn.ModuleList(
            [
                UpBlock(
                    rev[min(i + 1, L - 1)],
                    rev[max(i - 1, 0)],
                    rev[i],
                    cfg.layers_per_block + 1,
                    i < L - 1,
                    temb,
                    groups,
                    eps,
                )
                for i in range(L)
            ]
        )
        self.conv_norm_out = nn.GroupNorm(groups, ch[0], eps=eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def time_embed(self, t: Tensor | int, batch: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """Learned table lookup + MLP; t is an int, a 0-d tensor or a (B,) tensor of integer timesteps."""
        t = torch.as_tensor(t, device=device).long()
        t = t.expand(batch) if t.ndim == 0 else t
        return self.time_embedding(self.time_proj(t).to(dtype))

    def forward(self, x: Tensor, t: Tensor | int) -> Tensor:
        temb_act = F.silu(self.time_embed(t, x.shape[0], x.device, self.conv_in.weight.dtype))
        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            h = block(h, temb_act, skips)
        h = self.mid_block(h, temb_act)
        for block in self.up_blocks:
            carry = [h]
            del h  # only ``carry`` holds the block input now
            h = block(carry, temb_act, skips)
        h = F.silu(self.conv_norm_out(h), inplace=not torch.is_grad_enabled())
        return self.conv_out(h)
