"""EDM denoising loss for diffusion teachers (Karras et al. 2022, Eq. 2 with Table 1 weighting)."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor, nn

from .. import noise
from ..guidance import drop_labels
from ..schedules import SIGMA_DATA
from ..tensors import append_dims
from .options import P_MEAN, P_STD, Option, option, within


class EDMLoss:
    """ln σ ~ N(P_mean, P_std²); λ(σ) = (σ² + σ_d²)/(σ·σ_d)²; loss = λ·mean((D(x0 + σn, σ) - x0)²).

    ``label_dropout`` p > 0 (class-conditional models) trains the unconditional branch too: each label becomes
    the null label with probability p, so the model can serve as a classifier-free-guided teacher
    (``cmkit.guidance``; Ho & Salimans 2022 use p = 0.1–0.2).
    """

    needs_teacher = False

    OPTIONS: ClassVar[dict[str, Option]] = {
        "P_mean": P_MEAN,
        "P_std": P_STD,
        "label_dropout": option(
            "probability of replacing a label by the null label (a CFG teacher)", within(0, 1, high_open=True)
        ),
    }

    def __init__(
        self, P_mean: float = -1.2, P_std: float = 1.2, label_dropout: float = 0.0, sigma_data: float = SIGMA_DATA
    ):
        self.P_mean, self.P_std, self.label_dropout, self.sigma_data = P_mean, P_std, label_dropout, sigma_data

    def target_mu(self, step: int) -> float | None:
        return None

    def stats(self, step: int) -> dict[str, float]:
        return {}

    def __call__(
        self,
        model: nn.Module,
        x0: Tensor,
        *,
        step: int,
        target: nn.Module | None = None,
        teacher: nn.Module | None = None,
        **cond: Any,
    ) -> Tensor:
        sigma = (noise.randn(x0.shape[0], x0.device) * self.P_std + self.P_mean).exp()
        weight = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
        if self.label_dropout > 0 and cond.get("class_labels") is not None:
            cond = {**cond, "class_labels": drop_labels(cond["class_labels"], self.label_dropout)}
        D = model(x0 + append_dims(sigma, x0.ndim) * noise.randn_like(x0), sigma, **cond)
        return weight * (D - x0).square().flatten(1).mean(1)
