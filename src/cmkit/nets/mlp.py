"""A small residual MLP backbone for toy data (e.g. 2-D Gaussian mixtures stored as (B, C, 1, 1))."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..guidance import label_embedding
from .embedding import make_embedding


class MLPNet(nn.Module):
    """F(x_in, c_noise) for flat data: x is flattened, the noise embedding is added to every hidden layer."""

    def __init__(
        self,
        img_resolution: int = 1,
        in_channels: int = 2,
        out_channels: int | None = None,
        hidden: int = 128,
        depth: int = 3,
        embedding: str = "positional",
        fourier_scale: float = 16.0,
        positional_scale: float = 1000.0,
        num_classes: int = 0,
        dropout: float = 0.0,
        time_inputs: int = 1,
        **_: object,
    ):
        super().__init__()
        d = in_channels * img_resolution**2
        self.img_resolution, self.in_channels = img_resolution, in_channels
        self.out_shape: Sequence[int] = ((out_channels or in_channels), img_resolution, img_resolution)
        self.emb = make_embedding(embedding, hidden, fourier_scale, positional_scale)
        self.emb_mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU())
        self.emb_mlp2 = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU()) if time_inputs == 2 else None
        self.label_emb = nn.Embedding(num_classes, hidden) if num_classes else None
        self.inp = nn.Linear(d, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Dropout(dropout), nn.Linear(hidden, hidden)
            )
            for _ in range(depth)
        )
        self.out = nn.Linear(hidden, int(torch.tensor(self.out_shape).prod()))

    def forward(
        self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None = None, c_noise2: Tensor | None = None
    ) -> Tensor:
        """``c_noise2``: the second time of a two-time backbone (``time_inputs=2``; MeanFlow's t − r)."""
        emb = self.emb_mlp(self.emb(c_noise))
        if self.emb_mlp2 is not None:
            if c_noise2 is None:
                raise ValueError("this backbone takes two times: pass c_noise2 of shape (B,)")
            emb = emb + self.emb_mlp2(self.emb(c_noise2))
        if self.label_emb is not None and class_labels is not None:
            emb = emb + label_embedding(self.label_emb, class_labels)
        h = self.inp(x.flatten(1))
        for block in self.blocks:
            h = h + block(h + emb)
        return self.out(h).reshape(x.shape[0], *self.out_shape)
