"""Low-rank adapters (LoRA, Hu et al. 2021, Eq. 3) on a frozen network, in diffusers' and PEFT's file format.

A linear or convolutional layer W becomes ``h = W x + s · B(A(x))`` with A: in → r (for a convolution, A has W's
kernel, stride and padding and B is 1×1, as in PEFT), B: r → out initialised to zero, so the adapted network
starts equal to the original, and s = α / r. Only A and B train. LCM-LoRA (Luo et al. 2023, "LCM-LoRA: A
Universal Stable-Diffusion Acceleration Module") distils a latent consistency model into such adapters on the
teacher's own weights instead of a full copy.

Files: safetensors with the keys diffusers' ``load_lora_weights`` reads for a UNet in PEFT's layout,
``{prefix}.{module}.lora_A.weight`` (r, in[, k, k]) and ``{prefix}.{module}.lora_B.weight`` (out, r[, 1, 1]), with
s folded into B, so the file needs no ``alpha`` entries (diffusers then takes α = r, i.e. s = 1). ``merge_lora``
folds the adapters into W: W' = W + s·B·A.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..errors import CmkitError
from ..formats.model_dir import LORA_FILE

#: the layers LCM-LoRA adapts in Stable Diffusion's UNet (diffusers' names): attention projections, the
#: transformer feed-forward, the resnets' convolutions and time projections, the resamplers
LCM_LORA_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
)


class LoRALayer(nn.Module):
    """``base(x) + scale · lora_B(lora_A(x))`` for a frozen ``nn.Linear`` or ``nn.Conv2d`` ``base``."""

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int, alpha: float | None = None):
        super().__init__()
        if rank < 1:
            raise CmkitError(f"LoRA rank must be at least 1, got {rank}")
        self.base = base.requires_grad_(False)
        self.rank, self.scale = rank, (rank if alpha is None else alpha) / rank
        w = base.weight
        kw = dict(bias=False, device=w.device, dtype=w.dtype)
        if isinstance(base, nn.Linear):
            self.lora_A: nn.Module = nn.Linear(base.in_features, rank, **kw)
            self.lora_B: nn.Module = nn.Linear(rank, base.out_features, **kw)
        elif isinstance(base, nn.Conv2d) and base.groups == 1:
            conv = dict(stride=base.stride, padding=base.padding, dilation=base.dilation)
            self.lora_A = nn.Conv2d(base.in_channels, rank, base.kernel_size, **conv, **kw)
            self.lora_B = nn.Conv2d(rank, base.out_channels, 1, **kw)
        else:
            raise CmkitError(f"LoRA adapts nn.Linear and ungrouped nn.Conv2d layers, not {base}")
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's initialisation
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.scale * self.lora_B(self.lora_A(x))

    @property
    def weight(self) -> Tensor:
        """The effective weight W + s·B·A, for code that reads a layer's weight instead of calling it (cmkit's
        attention applies its 1×1 qkv/proj convolutions as matmuls); differentiable in A and B."""
        return self.base.weight + self.delta()

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    def delta(self) -> Tensor:
        """s·B·A in the shape of the base weight."""
        a, b = self.lora_A.weight, self.lora_B.weight
        d = b.flatten(1) @ a.flatten(1)  # (out, r) @ (r, in·k·k)
        return self.scale * d.view_as(self.base.weight)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, leaf = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), leaf


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """The adapted layers by their module name (the name of the layer they wrap)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALayer)}


def add_lora(
    model: nn.Module, rank: int, alpha: float | None = None, targets: Sequence[str] | None = None
) -> list[str]:
    """Freeze ``model`` and wrap its layers in ``LoRALayer`` (in place); returns the adapted names.

    ``targets``: module-name suffixes to adapt (``LCM_LORA_TARGETS`` for a diffusers UNet); None adapts every
    ``nn.Linear`` and ungrouped ``nn.Conv2d``. Nothing to adapt is one error line."""
    model.requires_grad_(False)
    names = [
        n
        for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
        and getattr(m, "groups", 1) == 1
        and (targets is None or any(n == t or n.endswith("." + t) for t in targets))
        and not any(isinstance(p, LoRALayer) for p in _ancestors(model, n))
    ]
    if not names:
        raise CmkitError(f"no layer of this network matches the LoRA targets {list(targets or [])}")
    for n in names:
        parent, leaf = _parent(model, n)
        setattr(parent, leaf, LoRALayer(getattr(parent, leaf), rank, alpha))
    return names


def _ancestors(model: nn.Module, name: str) -> list[nn.Module]:
    parts = name.split(".")
    return [model.get_submodule(".".join(parts[:i])) for i in range(1, len(parts))]


def lora_state_dict(model: nn.Module, prefix: str = "unet") -> dict[str, Tensor]:
    """The adapters in diffusers'/PEFT's keys, s folded into B (module docstring)."""
    out = {}
    for n, m in lora_layers(model).items():
        key = f"{prefix}.{n}" if prefix else n
        out[f"{key}.lora_A.weight"] = m.lora_A.weight.detach().float().contiguous()
        out[f"{key}.lora_B.weight"] = (m.scale * m.lora_B.weight.detach().float()).contiguous()
    return out


def save_lora(model: nn.Module, path: str | Path, prefix: str = "unet") -> Path:
    """Write the adapters as a safetensors file that diffusers' ``load_lora_weights`` loads."""
    state = lora_state_dict(model, prefix)
    if not state:
        raise CmkitError("this network has no LoRA adapters to save (add_lora first)")
    path = Path(path)
    save_file(state, str(path), metadata={"format": "pt"})
    return path


def read_lora(path: str | Path) -> dict[str, Tensor]:
    """A LoRA file's tensors; a missing, truncated or non-safetensors file is one error line."""
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise CmkitError(f"cannot read LoRA file {path}: {e} (expected a safetensors file of LoRA adapters)") from None


def _adapter_shapes(base: nn.Linear | nn.Conv2d, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes of A and B of a rank-``rank`` adapter of ``base``."""
    if isinstance(base, nn.Linear):
        return (rank, base.in_features), (base.out_features, rank)
    return (rank, base.in_channels, *base.kernel_size), (base.out_channels, rank, 1, 1)


def load_lora(model: nn.Module, state: dict[str, Tensor] | str | Path, prefix: str = "unet") -> list[str]:
    """Adapt ``model`` (in place) with the adapters of a file or state dict in ``save_lora``'s format; returns the
    adapted names. Keys that name no layer of the network or do not fit its shapes (a LoRA for another network)
    are one error line, and the network is left unchanged."""
    sd = read_lora(state) if isinstance(state, (str, Path)) else state
    pairs: dict[str, dict[str, Tensor]] = {}
    for k, v in sd.items():
        body = k.removeprefix(prefix + ".") if prefix else k
        for part in ("lora_A", "lora_B"):
            if body.endswith(f".{part}.weight") and (not prefix or k.startswith(prefix + ".")):
                pairs.setdefault(body[: -len(f".{part}.weight")], {})[part] = v
                break
        else:
            raise CmkitError(f"{k!r} is not a LoRA key of this format ({prefix}.<module>.lora_A/lora_B.weight)")
    layers = dict(model.named_modules())
    for name, ab in pairs.items():
        base = layers.get(name)
        if not isinstance(base, (nn.Linear, nn.Conv2d)) or set(ab) != {"lora_A", "lora_B"}:
            raise CmkitError(f"a LoRA for another network: {name!r} is not an adaptable layer of this one")
        shapes = _adapter_shapes(base, ab["lora_A"].shape[0])
        if (tuple(ab["lora_A"].shape), tuple(ab["lora_B"].shape)) != shapes:
            raise CmkitError(
                f"a LoRA for another network: {name!r} has adapters of shapes {tuple(ab['lora_A'].shape)}, "
                f"{tuple(ab['lora_B'].shape)}, this network's layer needs {shapes[0]}, {shapes[1]}"
            )
    for name, ab in pairs.items():
        parent, leaf = _parent(model, name)
        layer = LoRALayer(getattr(parent, leaf), ab["lora_A"].shape[0], None)
        with torch.no_grad():
            layer.lora_A.weight.copy_(ab["lora_A"])
            layer.lora_B.weight.copy_(ab["lora_B"])
        setattr(parent, leaf, layer)
    return sorted(pairs)


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its layer (W ← W + s·B·A) and unwrap it, in place: the plain network, as fast as
    the original."""
    for n, m in lora_layers(model).items():
        m.base.weight.add_(m.delta().to(m.base.weight.dtype))
        parent, leaf = _parent(model, n)
        setattr(parent, leaf, m.base)
    return model


__all__ = [
    "LCM_LORA_TARGETS",
    "LORA_FILE",
    "LoRALayer",
    "add_lora",
    "load_lora",
    "lora_layers",
    "lora_state_dict",
    "merge_lora",
    "read_lora",
    "save_lora",
]
