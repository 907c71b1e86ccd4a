"""VGG16 LPIPS distance (Zhang et al. 2018) as used by the CM code (``piq.LPIPS(replace_pooling=True)``).

Max-pooling is replaced by average pooling, inputs in [-1, 1] are mapped to [0, 1] and normalised
with the ImageNet statistics, and images smaller than 256 px are bilinearly upsampled to 224 (CM §2.2).
Weights are never downloaded: pass a ``.safetensors`` (or plain tensor ``.pth``) file holding the 13
VGG16 convolutions as ``features.{i}.weight/bias`` (torchvision's numbering) and the five LPIPS linear
heads as ``lin{k}.weight`` of shape (1, C_k, 1, 1).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import CmkitError
from .files import load_state, read_safetensors, read_torch_state_dict

VGG_CFG = [64, 64, "P", 128, 128, "P", 256, 256, 256, "P", 512, 512, 512, "P", 512, 512, 512]
TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in torchvision numbering
TAP_CHANNELS = (64, 128, 256, 512, 512)
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def resize_bilinear(x: Tensor, size: int) -> Tensor:
    """Bilinear resize to ``size``×``size`` in float32 (the CM code upsamples images under 256 px to 224)."""
    return F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False)


def vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    cin = 3
    for v in VGG_CFG:
        if v == "P":
            layers.append(nn.AvgPool2d(2, 2))  # replace_pooling=True
        else:
            layers += [nn.Conv2d(cin, int(v), 3, padding=1), nn.ReLU()]
            cin = int(v)
    return nn.Sequential(*layers)


class LPIPS(nn.Module):
    """LPIPS(a, b) -> (B,) for images in [-1, 1]; grey images are repeated to 3 channels."""

    def __init__(self) -> None:
        super().__init__()
        self.features = vgg16_features()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in TAP_CHANNELS)
        self.requires_grad_(False).eval()

    @classmethod
    def from_file(cls, path: str | Path | None) -> "LPIPS":
        """The network from ``cmkit convert-lpips``'s safetensors file (or a plain tensor ``.pth`` of the same
        keys). A missing, unreadable, mismatched or non-finite file is one ``CmkitError`` line."""
        hint = (
            "set loss.lpips_weights=PATH; make the file from the official ones with `cmkit convert-lpips "
            "--lpips vgg.pth --vgg vgg16-397923af.pth`"
        )
        if not path or not Path(path).expanduser().is_file():
            raise CmkitError(f"LPIPS weights not found: {path or '(loss.lpips_weights is not set)'} ({hint})")
        p = Path(path).expanduser()
        if p.suffix == ".safetensors":
            sd = read_safetensors(p)
        else:
            sd = read_torch_state_dict(p, "LPIPS weights")
        model = cls()
        mapped = {k.replace("lin", "lins.", 1) if k.startswith("lin") else k: v for k, v in sd.items()}
        load_state(model, mapped, f"LPIPS weights {p}", "VGG16-LPIPS (13 convolutions, 5 heads)")
        return model.requires_grad_(False).eval()

    def _taps(self, x: Tensor) -> list[Tensor]:
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in TAPS:
                out.append(x / (x.square().sum(1, keepdim=True).sqrt() + 1e-10))
            if i == TAPS[-1]:
                break
        return out

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        def prep(x: Tensor) -> Tensor:
            x = x.float()
            if x.shape[1] == 1:
                x = x.repeat(1, 3, 1, 1)
            if x.shape[-1] < 256:
                x = resize_bilinear(x, 224)
            return ((x + 1) / 2 - MEAN.to(x.device)) / STD.to(x.device)

        with torch.autocast(a.device.type, enabled=False):
            fa, fb = self._taps(prep(a)), self._taps(prep(b))
            return sum(lin((x - y).square()).mean((1, 2, 3)) for lin, x, y in zip(self.lins, fa, fb))


class LazyLPIPS:
    """The LPIPS distance, its weights read at the first call (or ``load()``): a loss that uses it can be
    built and checked without the weights file (``cmkit train --dry-run``)."""

    def __init__(self, path: str | Path | None):
        self.path, self.net = path, None

    def load(self) -> LPIPS:
        """Read the weights now; a missing file is one ``CmkitError`` line."""
        if self.net is None:
            self.net = LPIPS.from_file(self.path)
        return self.net

    def __call__(self, a: Tensor, b: Tensor) -> Tensor:
        return self.load().to(a.device)(a, b)


LPIPS_FILE = "data/lpips-vgg16.safetensors"  #: where the LPIPS presets look for their weights


def convert_lpips(lpips_pth: str | Path, vgg_pth: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of ``cmkit.lpips.LPIPS`` from the official files: ``features.*`` from torchvision's VGG16
    (its classifier is dropped) and ``lin{k}.weight`` from the lpips heads (``lin{k}.model.1.weight``, or
    ``.model.0.`` when saved without dropout). Shapes and finiteness are checked by loading into ``LPIPS``."""
    heads, vgg = read_torch_state_dict(lpips_pth, "LPIPS heads"), read_torch_state_dict(vgg_pth, "VGG16 weights")
    sd = {k: v for k, v in vgg.items() if k.startswith("features.")}
    for k in range(5):
        found = [
            v
            for name, v in heads.items()
            if name in (f"lin{k}.model.1.weight", f"lin{k}.model.0.weight", f"lin{k}.weight")
        ]
        if not found:
            raise CmkitError(
                f"{lpips_pth} has no lin{k}.model.1.weight: expected the lpips package's weights/v0.1/vgg.pth"
            )
        sd[f"lin{k}.weight"] = found[0]
    model = LPIPS()
    load_state(
        model,
        {k.replace("lin", "lins.", 1) if k.startswith("lin") else k: v for k, v in sd.items()},
        f"{lpips_pth} + {vgg_pth}",
        "VGG16-LPIPS (13 convolutions, 5 heads)",
    )
    return {
        k.replace("lins.", "lin", 1) if k.startswith("lins.") else k: v.float().contiguous()
        for k, v in model.state_dict().items()
    }
