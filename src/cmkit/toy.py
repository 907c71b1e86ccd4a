"""A Gaussian mixture whose ideal denoiser is known in closed form: ground truth for CD and samplers.

For p(x0) = Σ_k π_k N(m_k, s²I), the noisy marginal at level σ is Σ_k π_k N(m_k, (s²+σ²)I) and the
ideal denoiser is D(x, σ) = E[x0 | x] = Σ_k w_k(x) (m_k + s²/(s²+σ²)·(x - m_k)), with posterior
weights w_k ∝ π_k N(x; m_k, (s²+σ²)I). Data have shape (B, D, 1, 1) so image code runs unchanged.

Class-conditional too: the class of a sample is its component, so D(x, σ, c) = m_c + s²/(s²+σ²)·(x − m_c) is the
exact conditional denoiser and the null label (``NULL_LABEL``) gives the mixture's: the exact teacher for
classifier-free guidance (``cmkit.guidance``) and for distilling it (LCM, sCD with guidance).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .guidance import NULL_LABEL
from .tensors import append_dims, as_sigma


class GaussianMixture(nn.Module):
    """Isotropic mixture with means (K, D), weights (K,), common std s; ``forward`` is the exact denoiser."""

    def __init__(self, means: Tensor, weights: Tensor, std: float):
        super().__init__()
        self.register_buffer("means", means.float())
        self.register_buffer("weights", weights.float() / weights.sum())
        self.std = std

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator | None = None, labels: bool = False) -> Tensor | tuple:
        """n samples (n, D, 1, 1); with ``labels=True`` also their components (n,), the class labels."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        x = (self.means[k] + self.std * torch.randn(n, self.dim, generator=generator))[:, :, None, None]
        return (x, k) if labels else x

    def log_posterior(self, x: Tensor, sigma: Tensor) -> Tensor:
        """log w_k(x) of the noisy marginal at σ; x: (B, D, 1, 1), σ: (B,) → (B, K)."""
        var = self.std**2 + sigma**2  # (B,)
        d2 = (x.flatten(1)[:, None, :] - self.means[None]).square().sum(-1)  # (B, K)
        logits = self.weights.log()[None] - d2 / (2 * var[:, None])
        return logits.log_softmax(dim=1)

    def forward(self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None, **_: object) -> Tensor:
        """E[x0 | x_σ], or E[x0 | x_σ, c] where ``class_labels`` c ≠ ``NULL_LABEL`` (c is the component)."""
        sigma = as_sigma(sigma, x.shape[0], x.device)
        w = self.log_posterior(x, sigma).exp()  # (B, K)
        if class_labels is not None:
            given = class_labels != NULL_LABEL
            onehot = torch.nn.functional.one_hot(class_labels.clamp(min=0), len(self.weights)).to(w.dtype)
            w = torch.where(given[:, None], onehot, w)
        shrink = append_dims(self.std**2 / (self.std**2 + sigma**2), 2)  # (B, 1)
        flat = x.flatten(1)
        per_k = self.means[None] + shrink[:, None] * (flat[:, None, :] - self.means[None])  # (B, K, D)
        return (w[..., None] * per_k).sum(1).reshape(x.shape)

    def assign(self, x: Tensor) -> Tensor:
        """Nearest mixture component of each sample (B,)."""
        return (x.flatten(1)[:, None, :] - self.means[None]).square().sum(-1).argmin(1)
