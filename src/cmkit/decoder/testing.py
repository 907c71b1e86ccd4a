"""Random-weight decoders and synthetic checkpoints in every supported layout, for tests and benchmarks.

Nothing here is downloaded: the OpenAI-layout TorchScript file is a real ``torch.jit.script`` archive of
an attribute tree named like the released ``decoder.pt`` (openai/consistencydecoder), whose forward even pins
``cuda:0`` as the released graph does; the diffusers layout is ``decoder_unet.*`` (+ optional encoder keys).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from .config import SD_LATENT_MEAN, SD_LATENT_STD, SD_SCALING_FACTOR, DecoderConfig
from .decoder import ConsistencyDecoder
from .keys import DIFFUSERS_PREFIX, cmkit_to_openai


@torch.no_grad()
def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Deterministic random weights with non-trivial norms/biases (default init leaves GN at 1/0)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if name.endswith("time_proj.weight"):
            value = noise
        elif p.ndim == 1:
            value = 0.1 * noise + (1.0 if ".norm" in name or "norm_out" in name else 0.0)
        else:
            value = noise / math.sqrt(p[0].numel())
        p.copy_(value)
    return module


def random_decoder(
    config: DecoderConfig | None = None,
    seed: int = 0,
    *,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
) -> ConsistencyDecoder:
    """A ``ConsistencyDecoder`` (tiny by default) with ``randomize_`` weights, ready for inference."""
    dec = ConsistencyDecoder(config or DecoderConfig.tiny())
    randomize_(dec.unet, seed)
    return dec.prepare(dtype=dtype, channels_last=channels_last)


def raw_latents(batch: int = 1, h: int = 8, w: int = 8, seed: int = 0) -> Tensor:
    """Latents distributed like raw SD-VAE latents: (N(mean, std²) per channel) / 0.18215 (§1.3)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, 4, h, w, generator=g)
    mean = torch.tensor(SD_LATENT_MEAN)[None, :, None, None]
    std = torch.tensor(SD_LATENT_STD)[None, :, None, None]
    return (z * std + mean) / SD_SCALING_FACTOR


class _Node(nn.Module):
    """An attribute holder: one level of the OpenAI ``blocks.<name>.<sub>.<w|b|g>`` tree."""


class _OpenAIRoot(nn.Module):
    """The scripted top module; like the released graph its forward pins cuda:0 (never run by cmkit)."""

    def __init__(self, blocks: nn.Module):
        super().__init__()
        self.blocks = blocks

    def forward(self, x: Tensor) -> Tensor:
        return x.to(torch.device("cuda:0"))


def openai_module(state: dict[str, Tensor], num_levels: int = 4) -> nn.Module:
    """A module tree with OpenAI's TorchScript parameter names holding ``state`` (cmkit names)."""
    blocks = _Node()
    for key, value in state.items():
        parts = cmkit_to_openai(key, num_levels).split(".")[1:]  # drop "blocks"
        node = blocks
        for part in parts[:-1]:
            if not hasattr(node, part):
                node.add_module(part, _Node())
            node = getattr(node, part)
        node.register_parameter(parts[-1], nn.Parameter(value.detach().clone(), requires_grad=False))
    return _OpenAIRoot(blocks)


def write_openai_torchscript(state: dict[str, Tensor], path: str | Path, num_levels: int = 4) -> Path:
    """A real TorchScript archive (``torch.jit.script(...).save``) laid out like OpenAI's ``decoder.pt``."""
    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated, but decoder.pt is TorchScript
        torch.jit.script(openai_module(state, num_levels)).save(str(path))
    return path


def diffusers_vae_state(state: dict[str, Tensor], with_encoder: bool = True) -> dict[str, Tensor]:
    """``ConsistencyDecoderVAE``-layout keys: ``decoder_unet.*`` plus (optionally) stand-in encoder keys."""
    out = {DIFFUSERS_PREFIX + k: v for k, v in state.items()}
    if with_encoder:
        out["encoder.conv_in.weight"] = torch.zeros(4, 3, 3, 3)
        out["quant_conv.weight"] = torch.zeros(8, 8, 1, 1)
    return out


def diffusers_vae_config(config: DecoderConfig) -> dict:
    """A ``ConsistencyDecoderVAE`` ``config.json`` for ``config`` (the keys ``DecoderConfig.from_diffusers`` reads)."""
    return {
        "_class_name": "ConsistencyDecoderVAE",
        "scaling_factor": config.scaling_factor,
        "latent_channels": config.latent_channels,
        "block_out_channels": [1] * (int(math.log2(config.upscale)) + 1),
        "decoder_add_attention": False,
        "decoder_block_out_channels": list(config.block_out_channels),
        "decoder_down_block_types": ["ResnetDownsampleBlock2D"] * len(config.block_out_channels),
        "decoder_up_block_types": ["ResnetUpsampleBlock2D"] * len(config.block_out_channels),
        "decoder_in_channels": config.in_channels,
        "decoder_out_channels": config.out_channels,
        "decoder_layers_per_block": config.layers_per_block,
        "decoder_norm_eps": config.norm_eps,
        "decoder_norm_num_groups": config.norm_num_groups,
        "decoder_num_train_timesteps": config.num_train_timesteps,
        "decoder_resnet_time_scale_shift": "scale_shift",
        "decoder_time_embedding_type": "learned",
    }


def write_diffusers_checkpoint(
    state: dict[str, Tensor],
    config: DecoderConfig,
    out_dir: str | Path,
    *,
    dtype: torch.dtype = torch.float16,
    with_encoder: bool = True,
    with_config: bool = True,
) -> Path:
    """A diffusers-style ``ConsistencyDecoderVAE`` directory: ``config.json`` +
    ``diffusion_pytorch_model(.fp16).safetensors``."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = (
        "diffusion_pytorch_model.fp16.safetensors" if dtype == torch.float16 else "diffusion_pytorch_model.safetensors"
    )
    tensors = {k: v.detach().to(dtype).contiguous() for k, v in diffusers_vae_state(state, with_encoder).items()}
    save_file(tensors, str(out_dir / name), metadata={"format": "pt"})
    if with_config:
        (out_dir / "config.json").write_text(json.dumps(diffusers_vae_config(config), indent=2))
    return out_dir / name
