"""EDM's networks (Karras et al. 2022, ``training/networks.py`` of NVlabs/edm), written for cmkit with the same
module tree, so the state dicts of EDM's released pickles (and ECT's, and the CM paper's JAX CIFAR-10 models
once renamed) load by name.

* ``SongUNet``: DDPM++ (``DDPMpp``: positional embedding, standard encoder, [1, 1] resampling filter) and
  NCSN++ (``NCSNpp``: Fourier embedding of width 2·model_channels, residual encoder, FIR filter [1, 3, 3, 1]),
  the reimplementation by EDM of score_sde's networks (Song et al. 2021). Residual blocks scale by √½,
  GroupNorm ε = 1e-6, one attention head, the noise embedding enters as [sin, cos].
* ``DhariwalUNet``: EDM's ADM (Dhariwal & Nichol 2021): scale-shift conditioning, 64 channels per head.
* Attention reads qkv channels as (heads, head_dim, 3), interleaved — EDM's order, not ADM's (three, heads,
  head_dim) — with softmax(qᵀk/√head_dim) computed in fp32.
* Resampling filters are buffers (``resample_filter``) as in EDM; NCSN++'s Fourier frequencies are the
  buffer ``map_noise.freqs``.

Every network here is a cmkit backbone ``net(x_in, c_noise, class_labels=None) -> F`` with c_noise = ln(σ)/4
(EDM's preconditioning), so ``cmkit.precond.Precond`` makes it a denoiser, EDM-preconditioned or with the
CM boundary-shifted scalings. ``class_labels`` are integer labels (B,) or EDM's one-hot rows (B, num_classes).
``VPPrecond`` and ``VEPrecond`` are the preconditionings of EDM's ``baseline-*`` pickles (Song et al. 2021's
VP and VE formulations as EDM Table 1 writes them), for sampling those models as teachers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..guidance import keep_mask
from ..tensors import append_dims, as_sigma
from .blocks import Block, pixel_attention
from .embedding import FourierEmbedding, PositionalEmbedding


def init_weight_(t: Tensor, mode: str, fan_in: int, fan_out: int, gain: float = 1.0) -> Tensor:
    """EDM's weight initialisations (xavier/kaiming, uniform/normal) scaled by ``gain``, in place."""
    with torch.no_grad():
        if mode == "xavier_uniform":
            return t.uniform_(-1, 1).mul_(gain * math.sqrt(6 / (fan_in + fan_out)))
        if mode == "xavier_normal":
            return t.normal_().mul_(gain * math.sqrt(2 / (fan_in + fan_out)))
        if mode == "kaiming_uniform":
            return t.uniform_(-1, 1).mul_(gain * math.sqrt(3 / fan_in))
        if mode == "kaiming_normal":
            return t.normal_().mul_(gain * math.sqrt(1 / fan_in))
    raise ValueError(f"unknown init mode {mode!r}")


class Linear(nn.Module):
    """A dense layer (keys ``weight`` [out, in], ``bias``) with EDM's initialisation options."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        init_mode: str = "kaiming_normal",
        init_weight: float = 1.0,
        init_bias: float = 0.0,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(
            init_weight_(torch.empty(out_features, in_features), init_mode, in_features, out_features, init_weight)
        )
        self.bias = (
            nn.Parameter(init_weight_(torch.empty(out_features), init_mode, in_features, out_features, init_bias))
            if bias
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class Conv2d(nn.Module):
    """A convolution (``kernel`` 0: none) with optional ×2 up/down resampling by the FIR filter
    ``resample_filter`` (a buffer, ff/Σ², only when resampling); ``fused`` resamples after (down) or before (up)
    the convolution in one padding, as EDM's ``fused_resample``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        bias: bool = True,
        up: bool = False,
        down: bool = False,
        resample_filter: Sequence[int] = (1, 1),
        fused: bool = False,
        init_mode: str = "kaiming_normal",
        init_weight: float = 1.0,
        init_bias: float = 0.0,
    ):
        super().__init__()
        if up and down:
            raise ValueError("a convolution resamples up or down, not both")
        self.in_channels, self.out_channels, self.up, self.down, self.fused = in_channels, out_channels, up, down, fused
        fan_in, fan_out = in_channels * kernel * kernel, out_channels * kernel * kernel
        self.weight = (
            nn.Parameter(
                init_weight_(
                    torch.empty(out_channels, in_channels, kernel, kernel), init_mode, fan_in, fan_out, init_weight
                )
            )
            if kernel
            else None
        )
        self.bias = (
            nn.Parameter(init_weight_(torch.empty(out_channels), init_mode, fan_in, fan_out, init_bias))
            if kernel and bias
            else None
        )
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        self.register_buffer("resample_filter", (torch.outer(f, f) / f.sum() ** 2)[None, None] if up or down else None)

    def forward(self, x: Tensor) -> Tensor:
        w = None if self.weight is None else self.weight.to(x.dtype)
        f = None if self.resample_filter is None else self.resample_filter.to(x.dtype)
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        if self.fused and self.up and w is not None:
            x = F.conv_transpose2d(
                x,
                (4 * f).tile(self.in_channels, 1, 1, 1),
                groups=self.in_channels,
                stride=2,
                padding=max(f_pad - w_pad, 0),
            )
            x = F.conv2d(x, w, padding=max(w_pad - f_pad, 0))
        elif self.fused and self.down and w is not None:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, f.tile(self.out_channels, 1, 1, 1), groups=self.out_channels, stride=2)
        else:
            if self.up:
                x = F.conv_transpose2d(
                    x, (4 * f).tile(self.in_channels, 1, 1, 1), groups=self.in_channels, stride=2, padding=f_pad
                )
            if self.down:
                x = F.conv2d(x, f.tile(self.in_channels, 1, 1, 1), groups=self.in_channels, stride=2, padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype)[None, :, None, None]
        return x


class GroupNorm(nn.Module):
    """GroupNorm with min(32, C/4) groups (EDM's ``min_channels_per_group`` = 4); keys ``weight``, ``bias``."""

    def __init__(self, num_channels: int, num_groups: int = 32, eps: float = 1e-5):
        super().__init__()
        self.num_groups, self.eps = min(num_groups, num_channels // 4), eps
        if self.num_groups < 1 or num_channels % self.num_groups:
            raise ValueError(f"{num_channels} channels do not split into {self.num_groups} normalisation groups")
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class UNetBlock(Block):
    """EDM's residual block (norm0–conv0, ``affine`` noise conditioning, norm1–dropout–conv1, ``skip``), scaled by
    ``skip_scale``, optionally followed by self-attention (norm2, qkv, proj)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        up: bool = False,
        down: bool = False,
        attention: bool = False,
        num_heads: int | None = None,
        channels_per_head: int = 64,
        dropout: float = 0.0,
        skip_scale: float = 1.0,
        eps: float = 1e-5,
        resample_filter: Sequence[int] = (1, 1),
        resample_proj: bool = False,
        adaptive_scale: bool = True,
        init: dict | None = None,
        init_zero: dict | None = None,
        init_attn: dict | None = None,
    ):
        super().__init__()
        init = init or {}
        init_zero = init_zero if init_zero is not None else {"init_weight": 0.0}
        self.in_channels, self.out_channels = in_channels, out_channels
        self.num_heads = (
            0 if not attention else num_heads if num_heads is not None else out_channels // channels_per_head
        )
        self.dropout, self.skip_scale, self.adaptive_scale = dropout, skip_scale, adaptive_scale
        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(
                in_channels, out_channels, kernel, up=up, down=down, resample_filter=resample_filter, **init
            )
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, 3 * out_channels, 1, **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(out_channels, out_channels, 1, **init_zero)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = F.silu(self.norm1(x + params))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = (x + (self.skip(orig) if self.skip is not None else orig)) * self.skip_scale
        if self.num_heads:
            # qkv channels ordered (heads, head_dim, 3), EDM's layout; softmax(qᵀk/√d) in fp32, as EDM
            attn = pixel_attention(self.norm2(x), self.qkv, self.proj, self.num_heads, "interleaved", fp32=True)
            x = (attn.to(x.dtype) + x) * self.skip_scale
        return x


def decoder_level(
    dec: nn.ModuleDict,
    res: int,
    lowest: bool,
    cout: int,
    width: int,
    skips: list[int],
    num_blocks: int,
    attention: Callable[[int], bool],
    block: dict[str, Any],
) -> int:
    """One resolution of EDM's decoder (SongUNet and DhariwalUNet build it alike): at the lowest resolution two
    middle blocks ``in0`` (with attention) and ``in1``, elsewhere an ``up`` block; then ``num_blocks + 1`` blocks
    that each take one encoder skip (``attention(idx)`` says which attend). Returns the output width."""
    if lowest:
        dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
        dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
    else:
        dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
    for idx in range(num_blocks + 1):
        cin, cout = cout + skips.pop(), width
        dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attention(idx), **block)
    return cout


def takes_skip(name: str) -> bool:
    """Decoder blocks named ``…_block<i>`` concatenate an encoder skip to their input (``decoder_level``)."""
    return "_block" in name


def one_hot(class_labels: Tensor | None, classes: int, batch: int) -> Tensor:
    """Integer labels (B,) or one-hot rows (B, classes) as float one-hot rows; one clear error otherwise. The null
    label (``cmkit.guidance.NULL_LABEL``) is EDM's label-dropout row of zeros."""
    if class_labels is None:
        raise ValueError("this network is class-conditional: pass class_labels")
    if class_labels.ndim == 1 and not class_labels.is_floating_point():  # NULL_LABEL (-1): a zero row
        keep = keep_mask(class_labels, classes)
        return F.one_hot(class_labels.long().clamp(min=0), classes).float() * keep
    if class_labels.shape != (batch, classes):
        raise ValueError(
            f"class_labels must be (B,) integers or (B, {classes}) one-hot rows, got {tuple(class_labels.shape)}"
        )
    return class_labels.float()


#: SongUNet's initialisations (EDM ``training/networks.py``): xavier-uniform, near-zero for output layers.
SONG_INIT = {"init_mode": "xavier_uniform"}
SONG_INIT_ZERO = {"init_mode": "xavier_uniform", "init_weight": 1e-5}


def song_block(emb_channels: int, dropout: float, resample_filter: Sequence[int]) -> dict[str, Any]:
    """The ``UNetBlock`` arguments every SongUNet block shares (one attention head, √½ skip scale)."""
    return dict(
        emb_channels=emb_channels,
        num_heads=1,
        dropout=dropout,
        skip_scale=math.sqrt(0.5),
        eps=1e-6,
        resample_filter=resample_filter,
        resample_proj=True,
        adaptive_scale=False,
        init=SONG_INIT,
        init_zero=SONG_INIT_ZERO,
        init_attn={"init_mode": "xavier_uniform", "init_weight": math.sqrt(0.2)},
    )


class SongUNet(nn.Module):
    """EDM's ``SongUNet``: DDPM++ or NCSN++ (score_sde's networks), ``net(x_in, c_noise, class_labels) -> F``.

    Arguments as EDM's (``label_dim`` is ``num_classes``); ``augment_dim`` > 0 adds EDM's ``map_augment``
    (its released CIFAR-10/FFHQ/AFHQ networks have 9; cmkit passes no augmentation labels, which EDM's own
    sampling does too). ``fourier_scale`` sets the spread of NCSN++'s frequencies at initialisation.
    """

    def __init__(
        self,
        img_resolution: int = 32,
        in_channels: int = 3,
        out_channels: int | None = None,
        num_classes: int = 0,
        augment_dim: int = 0,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (2, 2, 2),
        channel_mult_emb: int = 4,
        num_blocks: int = 4,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.10,
        label_dropout: float = 0.0,
        embedding_type: str = "positional",
        channel_mult_noise: int = 1,
        encoder_type: str = "standard",
        decoder_type: str = "standard",
        resample_filter: Sequence[int] = (1, 1),
        fourier_scale: float = 16.0,
    ):
        super().__init__()
        if (
            embedding_type not in ("fourier", "positional")
            or encoder_type not in ("standard", "skip", "residual")
            or decoder_type not in ("standard", "skip")
        ):
            raise ValueError(f"unknown SongUNet variant {embedding_type}/{encoder_type}/{decoder_type}")
        out_channels = out_channels or in_channels
        self.num_classes, self.label_dropout = num_classes, label_dropout
        emb_channels, noise_channels = model_channels * channel_mult_emb, model_channels * channel_mult_noise
        init, init_zero = SONG_INIT, SONG_INIT_ZERO
        block = song_block(emb_channels, dropout, resample_filter)

        self.map_noise = (
            PositionalEmbedding(noise_channels, scale=1.0, endpoint=True)
            if embedding_type == "positional"
            else FourierEmbedding(noise_channels, fourier_scale, buffer="freqs")
        )
        self.map_label = Linear(num_classes, noise_channels, **init) if num_classes else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        self.enc, cout = _song_encoder(
            img_resolution,
            in_channels,
            model_channels,
            channel_mult,
            num_blocks,
            attn_resolutions,
            encoder_type,
            resample_filter,
            block,
            init,
        )
        skips = [b.out_channels for name, b in self.enc.items() if "aux" not in name]
        self.dec = _song_decoder(
            img_resolution,
            out_channels,
            model_channels,
            channel_mult,
            num_blocks,
            attn_resolutions,
            decoder_type,
            resample_filter,
            block,
            init_zero,
            cout,
            skips,
        )

    def forward(
        self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None = None, augment_labels: Tensor | None = None
    ) -> Tensor:
        emb = self.map_noise(c_noise)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(emb.shape)  # [sin, cos], as score_sde
        if self.map_label is not None:
            labels = one_hot(class_labels, self.num_classes, x.shape[0])
            if self.training and self.label_dropout:
                labels = labels * (torch.rand(x.shape[0], 1, device=x.device) >= self.label_dropout).float()
            emb = emb + self.map_label(labels * math.sqrt(self.num_classes))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb)))).to(x.dtype)

        skips, aux = [], x
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + block(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)
        aux = tmp = None
        for name, block in self.dec.items():
            if "aux_up" in name:
                aux = block(aux)
            elif "aux_norm" in name:
                tmp = block(x)
            elif "aux_conv" in name:
                tmp = block(F.silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if takes_skip(name):
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux


def _song_encoder(
    img_resolution: int,
    in_channels: int,
    model_channels: int,
    channel_mult: Sequence[int],
    num_blocks: int,
    attn_resolutions: Sequence[int],
    encoder_type: str,
    resample_filter: Sequence[int],
    block: dict[str, Any],
    init: dict[str, Any],
) -> tuple[nn.ModuleDict, int]:
    """SongUNet's encoder (EDM ``training/networks.py``), named as EDM names it, and its output width."""
    enc = nn.ModuleDict()
    cout = caux = in_channels
    for level, mult in enumerate(channel_mult):
        res = img_resolution >> level
        if level == 0:
            cin, cout = cout, model_channels
            enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3, **init)
        else:
            enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
            if encoder_type == "skip":
                enc[f"{res}x{res}_aux_down"] = Conv2d(caux, caux, 0, down=True, resample_filter=resample_filter)
                enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, 1, **init)
            if encoder_type == "residual":
                enc[f"{res}x{res}_aux_residual"] = Conv2d(
                    caux, cout, 3, down=True, fused=True, resample_filter=resample_filter, **init
                )
                caux = cout
        for idx in range(num_blocks):
            cin, cout = cout, model_channels * mult
            enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
    return enc, cout


def _song_decoder(
    img_resolution: int,
    out_channels: int,
    model_channels: int,
    channel_mult: Sequence[int],
    num_blocks: int,
    attn_resolutions: Sequence[int],
    decoder_type: str,
    resample_filter: Sequence[int],
    block: dict[str, Any],
    init_zero: dict[str, Any],
    cout: int,
    skips: list[int],
) -> nn.ModuleDict:
    """SongUNet's decoder, consuming the encoder's skip widths ``skips`` from the end."""
    dec = nn.ModuleDict()
    for level, mult in reversed(list(enumerate(channel_mult))):
        res = img_resolution >> level
        cout = decoder_level(
            dec,
            res,
            level == len(channel_mult) - 1,
            cout,
            model_channels * mult,
            skips,
            num_blocks,
            lambda idx: idx == num_blocks and res in attn_resolutions,
            block,
        )
        if decoder_type == "skip" or level == 0:
            if decoder_type == "skip" and level < len(channel_mult) - 1:
                dec[f"{res}x{res}_aux_up"] = Conv2d(
                    out_channels, out_channels, 0, up=True, resample_filter=resample_filter
                )
            dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
            dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, 3, **init_zero)
    return dec


class DDPMpp(SongUNet):
    """DDPM++ as EDM's ``train.py --arch=ddpmpp`` builds it (positional embedding, [1, 1] filter)."""

    def __init__(
        self,
        img_resolution: int = 32,
        in_channels: int = 3,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (2, 2, 2),
        num_blocks: int = 4,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.10,
        num_classes: int = 0,
        augment_dim: int = 0,
    ):
        super().__init__(
            img_resolution,
            in_channels,
            None,
            num_classes,
            augment_dim,
            model_channels,
            channel_mult,
            4,
            num_blocks,
            attn_resolutions,
            dropout,
            embedding_type="positional",
            channel_mult_noise=1,
            encoder_type="standard",
            decoder_type="standard",
            resample_filter=(1, 1),
        )


class NCSNpp(SongUNet):
    """NCSN++ as EDM's ``train.py --arch=ncsnpp`` builds it (Fourier embedding, residual encoder, [1, 3, 3, 1])."""

    def __init__(
        self,
        img_resolution: int = 32,
        in_channels: int = 3,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (2, 2, 2),
        num_blocks: int = 4,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.10,
        num_classes: int = 0,
        augment_dim: int = 0,
        fourier_scale: float = 16.0,
    ):
        super().__init__(
            img_resolution,
            in_channels,
            None,
            num_classes,
            augment_dim,
            model_channels,
            channel_mult,
            4,
            num_blocks,
            attn_resolutions,
            dropout,
            embedding_type="fourier",
            channel_mult_noise=2,
            encoder_type="residual",
            decoder_type="standard",
            resample_filter=(1, 3, 3, 1),
            fourier_scale=fourier_scale,
        )


class DhariwalUNet(nn.Module):
    """EDM's ``DhariwalUNet`` (its ADM), ``net(x_in, c_noise, class_labels) -> F``; module tree ``map_*``,
    ``enc``, ``dec``, ``out_norm``, ``out_conv`` as EDM's (not openai's ``input_blocks``: see ``nets.adm``)."""

    def __init__(
        self,
        img_resolution: int = 64,
        in_channels: int = 3,
        out_channels: int | None = None,
        num_classes: int = 0,
        augment_dim: int = 0,
        model_channels: int = 192,
        channel_mult: Sequence[int] = (1, 2, 3, 4),
        channel_mult_emb: int = 4,
        num_blocks: int = 3,
        attn_resolutions: Sequence[int] = (32, 16, 8),
        dropout: float = 0.10,
        label_dropout: float = 0.0,
        head_channels: int = 64,
    ):
        super().__init__()
        out_channels = out_channels or in_channels
        self.num_classes, self.label_dropout = num_classes, label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = {"init_mode": "kaiming_uniform", "init_weight": math.sqrt(1 / 3), "init_bias": math.sqrt(1 / 3)}
        init_zero = {"init_mode": "kaiming_uniform", "init_weight": 0.0, "init_bias": 0.0}
        block = dict(
            emb_channels=emb_channels, channels_per_head=head_channels, dropout=dropout, init=init, init_zero=init_zero
        )
        self.map_noise = PositionalEmbedding(model_channels, scale=1.0)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = (
            Linear(
                num_classes, emb_channels, bias=False, init_mode="kaiming_normal", init_weight=math.sqrt(num_classes)
            )
            if num_classes
            else None
        )
        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
        skips = [b.out_channels for b in self.enc.values()]
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            cout = decoder_level(
                self.dec,
                res,
                level == len(channel_mult) - 1,
                cout,
                model_channels * mult,
                skips,
                num_blocks,
                lambda idx: res in attn_resolutions,
                block,
            )
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, 3, **init_zero)

    def forward(
        self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None = None, augment_labels: Tensor | None = None
    ) -> Tensor:
        emb = self.map_noise(c_noise)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            labels = one_hot(class_labels, self.num_classes, x.shape[0])
            if self.training and self.label_dropout:
                labels = labels * (torch.rand(x.shape[0], 1, device=x.device) >= self.label_dropout).float()
            emb = emb + self.map_label(labels)
        emb = F.silu(emb).to(x.dtype)
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        for name, block in self.dec.items():
            if takes_skip(name):
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))


# --- EDM's baseline preconditionings (VP, VE); EDM and CM ones are cmkit.precond.Precond ----------------


class VPPrecond(nn.Module):
    """VP preconditioning (EDM Table 1): D = x − σ·F(x/√(σ²+1), (M−1)·t(σ)), t(σ) the VP schedule's inverse."""

    def __init__(
        self, net: nn.Module, beta_d: float = 19.9, beta_min: float = 0.1, M: int = 1000, epsilon_t: float = 1e-5
    ):
        super().__init__()
        self.net, self.beta_d, self.beta_min, self.M = net, beta_d, beta_min, M
        t = torch.tensor([epsilon_t, 1.0], dtype=torch.float64)  # (EDM's fp32 gives σ_min = 0.00098, not 0.0010)
        self.sigma_min, self.sigma_max = (float(v) for v in self.sigma(t))

    def sigma(self, t: Tensor) -> Tensor:
        return ((0.5 * self.beta_d * t**2 + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma: Tensor) -> Tensor:
        return ((self.beta_min**2 + 2 * self.beta_d * (1 + sigma**2).log()).sqrt() - self.beta_min) / self.beta_d

    def forward(self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None) -> Tensor:
        x = x.float()
        sigma = as_sigma(sigma, x.shape[0], x.device)
        s = append_dims(sigma, x.ndim)
        F_x = self.net(x / (s**2 + 1).sqrt(), (self.M - 1) * self.sigma_inv(sigma), class_labels)
        return x - s * F_x.float()


class VEPrecond(nn.Module):
    """VE preconditioning (EDM Table 1): D = x + σ·F(x, ln(σ/2))."""

    def __init__(self, net: nn.Module, sigma_min: float = 0.02, sigma_max: float = 100.0):
        super().__init__()
        self.net, self.sigma_min, self.sigma_max = net, sigma_min, sigma_max

    def forward(self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None) -> Tensor:
        x = x.float()
        sigma = as_sigma(sigma, x.shape[0], x.device)
        F_x = self.net(x, (0.5 * sigma).log(), class_labels)
        return x + append_dims(sigma, x.ndim) * F_x.float()
