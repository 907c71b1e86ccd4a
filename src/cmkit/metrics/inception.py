"""The FID Inception-v3 network (pool_3, 2048-d), state-dict compatible with ``pt_inception-2015-12-05-6726825d.pth``.

This is the TF "inception-2015-12-05" graph used by FID (Heusel et al. 2017; TTUR) as ported to PyTorch by
pytorch-fid (Seitzer 2020): torchvision's Inception3 layout with 1008 classes and no auxiliary head, whose
Mixed_5b-d, Mixed_6b-e, Mixed_7b and Mixed_7c blocks are the "FID" variants: their average-pool branches do not
count padded zeros (TF semantics), and the last block's pool branch uses max pooling. Key names follow
torchvision (``Conv2d_1a_3x3.conv.weight``, ``Mixed_7c.branch_pool.bn.running_var``, ``fc.weight``, ...), so the
pytorch-fid weights file loads as is. Input handling follows pytorch-fid: uint8 -> [0, 1], bilinear resize to
299×299 (``align_corners=False``), then 2x − 1; grey images are repeated to three channels.

Besides pool_3, the extractor returns what the ADM evaluator (openai/guided-diffusion
``evaluations/evaluator.py``) uses for its other metrics: sFID's spatial features, the TF graph's
``mixed_6/conv`` (the ReLU output of ``Mixed_6d.branch1x1``, 192 × 17 × 17) cut to its first 7 channels and
flattened in TF's NHWC order (7 · 17 · 17 = 2023), and the Inception Score's logits, pool_3 times the
softmax weights without their bias (the evaluator multiplies by ``softmax/logits/MatMul``'s weight only).

Weights are never downloaded: pass a path, or set ``CMKIT_INCEPTION_WEIGHTS``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import CmkitError
from .features import FeatureExtractor

WEIGHTS_ENV = "CMKIT_INCEPTION_WEIGHTS"
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
NUM_CLASSES = 1008  # the TF graph's softmax size
FID_LABEL = "FID"
SPATIAL_CHANNELS = 7  # the evaluator's ``spatial[..., :7]`` of mixed_6/conv
SPATIAL_DIM = SPATIAL_CHANNELS * 17 * 17  # 2023


class BasicConv2d(nn.Module):
    """Conv (no bias) + BatchNorm (eps 1e-3) + ReLU, torchvision's ``BasicConv2d`` (keys ``conv.*``, ``bn.*``)."""

    def __init__(self, cin: int, cout: int, **kwargs: object) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kwargs)  # type: ignore[arg-type]
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: Tensor) -> Tensor:
    """3×3 stride-1 average pool that ignores padding, as TensorFlow's (the FID patch)."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_tf_avg_pool(x))], 1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17 (``Mixed_6a``; unchanged from torchvision)."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionC(nn.Module):
    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for layer in (
            self.branch7x7dbl_1,
            self.branch7x7dbl_2,
            self.branch7x7dbl_3,
            self.branch7x7dbl_4,
            self.branch7x7dbl_5,
        ):
            d = layer(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_tf_avg_pool(x))], 1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8 (``Mixed_7a``; unchanged from torchvision)."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionE(nn.Module):
    """``Mixed_7b`` (TF average pool, ``max_pool=False``) and ``Mixed_7c`` (max pool branch, ``max_pool=True``)."""

    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """FID Inception-v3: ``forward(x)`` maps (B, 3, 299, 299) in [-1, 1] to pool_3 features (B, 2048)."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, c7=128)
        self.Mixed_6c = FIDInceptionC(768, c7=160)
        self.Mixed_6d = FIDInceptionC(768, c7=160)
        self.Mixed_6e = FIDInceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, max_pool=False)
        self.Mixed_7c = FIDInceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, NUM_CLASSES)  # unused for pool_3; present so the weights file loads strictly

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_spatial(x, spatial=False)[0]

    def forward_spatial(self, x: Tensor, spatial: bool = True) -> tuple[Tensor, Tensor | None]:
        """pool_3 (B, 2048) and sFID's spatial features (B, 2023): the first 7 channels of ``mixed_6/conv``
        (``Mixed_6d.branch1x1``'s output, the ReLU after its batch norm) flattened as (17, 17, 7), TF's order."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        s = None
        for block in (
            self.Mixed_5b,
            self.Mixed_5c,
            self.Mixed_5d,
            self.Mixed_6a,
            self.Mixed_6b,
            self.Mixed_6c,
            self.Mixed_6d,
            self.Mixed_6e,
            self.Mixed_7a,
            self.Mixed_7b,
            self.Mixed_7c,
        ):
            if spatial and block is self.Mixed_6d:  # a 1×1 conv recomputed: cheap, and the blocks stay plain
                s = self.Mixed_6d.branch1x1(x)[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)
            x = block(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1), s

    def logits(self, pool: Tensor) -> Tensor:
        """The Inception Score's logits of pool_3 features, as the ADM evaluator forms them: ``pool @ W``
        with the softmax layer's weight and no bias."""
        return pool @ self.fc.weight.T


def resolve_weights(path: str | Path | None) -> Path:
    """The Inception weights file: ``path``, else ``$CMKIT_INCEPTION_WEIGHTS``; CmkitError if neither exists."""
    given = path or os.environ.get(WEIGHTS_ENV)
    if not given:
        raise CmkitError(
            f"Inception weights not given: pass --inception-weights PATH or set {WEIGHTS_ENV} "
            f"to {WEIGHTS_FILE} (pytorch-fid's release; cmkit never downloads it)"
        )
    p = Path(given).expanduser()
    if not p.is_file():
        raise CmkitError(
            f"Inception weights file not found: {p} (expected {WEIGHTS_FILE}; set --inception-weights or {WEIGHTS_ENV})"
        )
    return p


def load_inception(path: str | Path | None = None) -> FIDInceptionV3:
    """FID Inception with the weights from ``path`` or ``$CMKIT_INCEPTION_WEIGHTS`` (.pth or .safetensors)."""
    p = resolve_weights(path)
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a user error
        raise CmkitError(f"{p}: cannot read Inception weights ({type(e).__name__}: {str(e).splitlines()[0]})") from e
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    model = FIDInceptionV3()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise CmkitError(
            f"{p}: not the FID Inception state dict ({len(missing)} missing keys, e.g. {missing[:2]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:2]})"
        )
    return model.eval().requires_grad_(False)


def _file_digest(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


class InceptionExtractor(FeatureExtractor):
    """pool_3 features (2048-d) of the FID Inception; Fréchet distances here are reported as "FID"."""

    name = "inception"
    label = FID_LABEL
    dim = 2048
    extra_dims = {"spatial": SPATIAL_DIM, "logits": NUM_CLASSES}

    def __init__(
        self,
        weights: str | Path | None = None,
        *,
        model: FIDInceptionV3 | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 50,
    ) -> None:
        super().__init__(device, batch_size)
        if model is None:
            self._weights: Path | None = resolve_weights(weights)
            model = load_inception(self._weights)
        else:
            self._weights = None  # e.g. random weights in tests: never cached
        self.model = model.to(self.device).eval().requires_grad_(False)
        self._digest: str | None = None

    @property
    def cache_key(self) -> str | None:
        if self._weights is None:
            return None
        if self._digest is None:
            self._digest = _file_digest(self._weights)
        return f"inception-{self._digest}"

    @staticmethod
    def _prepare(batch: Tensor) -> Tensor:
        x = batch.float() / 255.0
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return 2 * x - 1

    def _forward(self, batch: Tensor) -> Tensor:
        return self.model(self._prepare(batch))

    def _forward_extras(self, batch: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        pool, spatial = self.model.forward_spatial(self._prepare(batch))
        return pool, {"spatial": spatial, "logits": self.model.logits(pool)}


def random_inception(seed: int = 0) -> FIDInceptionV3:
    """An FID Inception with random (He-normal) weights, for testing the pipeline; its features mean nothing."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FIDInceptionV3()
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return model.eval().requires_grad_(False)


__all__ = [
    "FIDInceptionV3",
    "InceptionExtractor",
    "load_inception",
    "random_inception",
    "resolve_weights",
    "WEIGHTS_ENV",
    "FID_LABEL",
    "SPATIAL_DIM",
]
