"""Classifier-free guidance (Ho & Salimans 2022) for the teachers of distillation.

A class-conditional teacher trained with label dropout (``loss.label_dropout`` of the EDM loss: each label is
replaced by the null label with probability p) also models the unconditional data. Its guided denoiser is

    D_w(x, σ, c) = D(x, σ, ∅) + w·(D(x, σ, c) − D(x, σ, ∅))

(w = 1: the conditional teacher; w = 0: the unconditional one). sCD distils a teacher with guidance
(Lu & Song 2025, sCM: its class-conditional models are distilled from guided teachers, on ImageNet-512 with
w up to 2.0),
so the student samples guided images in one step.

The null label is the integer ``NULL_LABEL`` (−1). cmkit's UNet and MLP give it a zero label embedding, and
EDM's networks a zero one-hot row: EDM's own label-dropout convention.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import noise

#: The class label that means "no class" (the unconditional branch of a label-dropout model).
NULL_LABEL = -1


def drop_labels(class_labels: Tensor, p: float) -> Tensor:
    """Replace each label by ``NULL_LABEL`` with probability p (label dropout, for CFG training)."""
    if p <= 0:
        return class_labels
    drop = noise.rand(class_labels.shape[0], class_labels.device) < p
    return torch.where(drop, torch.full_like(class_labels, NULL_LABEL), class_labels)


def keep_mask(class_labels: Tensor, classes: int) -> Tensor:
    """(B, 1) with 0 where the label is ``NULL_LABEL`` and 1 elsewhere; a label outside [0, classes) otherwise is
    one error."""
    bad = (class_labels < NULL_LABEL) | (class_labels >= classes)
    if bool(bad.any()):
        raise ValueError(
            f"class labels must lie in [0, {classes}) or be {NULL_LABEL} (no class); got "
            f"{sorted(set(class_labels[bad].tolist()))[:5]}"
        )
    return (class_labels != NULL_LABEL).unsqueeze(1)


def label_embedding(table: nn.Embedding, class_labels: Tensor) -> Tensor:
    """``table(class_labels)`` with a zero row for ``NULL_LABEL``; other labels outside [0, classes) are an error."""
    if class_labels.ndim != 1 or class_labels.is_floating_point():
        raise ValueError(f"class_labels must be (B,) integers, got {tuple(class_labels.shape)} {class_labels.dtype}")
    keep = keep_mask(class_labels, table.num_embeddings)
    return table(class_labels.clamp(min=0)) * keep


def guided(denoiser: nn.Module, x: Tensor, sigma: Tensor, class_labels: Tensor, w: float | Tensor) -> Tensor:
    """D_w(x, σ, c) = D(x, σ, ∅) + w·(D(x, σ, c) − D(x, σ, ∅)): one call on the doubled batch. ``w`` is one
    scale or one per sample (B,) (LCM draws it per example)."""
    if not isinstance(w, Tensor) and w == 1.0:
        return denoiser(x, sigma, class_labels=class_labels)
    null = torch.full_like(class_labels, NULL_LABEL)
    D = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), class_labels=torch.cat([class_labels, null]))
    D_c, D_u = D.chunk(2)
    if isinstance(w, Tensor):
        w = w.reshape(-1, *([1] * (x.ndim - 1)))
    return D_u + w * (D_c - D_u)


def guided_text(denoiser: nn.Module, x: Tensor, sigma: Tensor, text: Tensor, null: Tensor, w: float | Tensor) -> Tensor:
    """D_w for a text model (Stable Diffusion's classifier-free guidance): the null branch is the empty prompt's
    ``encoder_hidden_states`` ``null`` (1, L, D), one call on the doubled batch; ``w`` one scale or one per sample."""
    null = null.to(text).expand_as(text)
    D = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), encoder_hidden_states=torch.cat([text, null]))
    D_c, D_u = D.chunk(2)
    if isinstance(w, Tensor):
        w = w.reshape(-1, *([1] * (x.ndim - 1)))
    return D_u + w * (D_c - D_u)


class _Wrapped(nn.Module):
    """A guided denoiser wrapping ``self.denoiser``: attributes it does not have are the wrapped model's, which the
    samplers and losses read (sigma_data, kind, ...)."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.denoiser, name)


class Guided(_Wrapped):
    """A diffusion model sampled under classifier-free guidance: the denoiser D_w at one scale w, in the samplers'
    convention ``model(x, sigma, **cond)``. The null branch is the null label for a label-dropout model
    (``class_labels``), or ``null`` for a text model: the empty prompt's ``encoder_hidden_states`` (1, L, D), as
    Stable Diffusion's pipelines guide. Each evaluation is one call of the network on the doubled batch, i.e. two
    network evaluations per image."""

    def __init__(self, denoiser: nn.Module, w: float, null: Tensor | None = None):
        super().__init__()
        self.denoiser, self.w, self.null = denoiser, float(w), null

    def forward(self, x: Tensor, sigma: Tensor, **cond: Tensor) -> Tensor:
        if set(cond) == {"encoder_hidden_states"} and self.null is not None:
            return guided_text(self.denoiser, x, sigma, cond["encoder_hidden_states"], self.null, self.w)
        if set(cond) != {"class_labels"}:
            raise ValueError("a guided denoiser takes class labels (or prompt embeddings with a null prompt) only")
        return guided(self.denoiser, x, sigma, cond["class_labels"], self.w)


class AutoGuided(_Wrapped):
    """Autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself", Eq. 1): a
    diffusion model guided by a weaker version of itself (smaller, or trained for less long),

        D_w(x, σ, c) = D_weak(x, σ, c) + w·(D(x, σ, c) − D_weak(x, σ, c)),

    which sharpens the samples like CFG but keeps their variety, and needs no unconditional branch. Align Your
    Flow (Sabour et al. 2025, §4) distils an autoguided teacher. w = 1 is the good model alone; each evaluation
    costs one call of each model."""

    def __init__(self, denoiser: nn.Module, weak: nn.Module, w: float):
        super().__init__()
        self.denoiser, self.weak, self.w = denoiser, weak, float(w)

    def forward(self, x: Tensor, sigma: Tensor, **cond: Tensor) -> Tensor:
        good = self.denoiser(x, sigma, **cond)
        if self.w == 1.0:
            return good
        bad = self.weak(x, sigma, **cond)
        return bad + self.w * (good - bad)
