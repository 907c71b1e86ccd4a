"""Text prompts → a text-to-image UNet's ``encoder_hidden_states`` (Stable Diffusion's conditioning).

``PromptEncoder`` holds a pipeline's tokenizer and text encoder (read by ``cmkit.formats.diffusers_dir``) and
makes the embeddings exactly as diffusers' Stable Diffusion and LCM pipelines do (their ``encode_prompt``): the
prompt's CLIP tokens padded to the tokenizer's ``model_max_length`` (77 for SD) and truncated there, through the
text encoder, whose last hidden state (B, 77, D) is the UNet's cross-attention input. The attention mask is passed
only when the encoder's config asks for it (``use_attention_mask``), as there.

``load_denoiser`` attaches one to a pipeline directory's denoiser (``model.prompt_encoder``), so that
``sample_images(..., prompts=[...])`` and ``cmkit sample --prompt`` can run a local SD or LCM directory.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import CmkitError
from .formats.diffusers_dir import load_text_parts


class PromptEncoder(nn.Module):
    """A tokenizer and its text encoder: ``encoder(prompts) -> (len(prompts), max_length, D)`` float32."""

    def __init__(self, tokenizer: Any, text_encoder: nn.Module):
        super().__init__()
        self.tokenizer, self.text_encoder = tokenizer, text_encoder

    @classmethod
    def load(cls, root: str | Path) -> PromptEncoder | None:
        """The prompt encoder of a pipeline directory, or None when it has no ``text_encoder/``."""
        parts = load_text_parts(Path(root))
        return None if parts is None else cls(*parts)

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> Tensor:
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise CmkitError("prompts must be a list of strings")
        tokens = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        device = next(self.text_encoder.parameters()).device
        use_mask = getattr(self.text_encoder.config, "use_attention_mask", False)
        mask = tokens.attention_mask.to(device) if use_mask else None
        return self.text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0].float()

    def embed(self, prompts: Sequence[str], n: int) -> Tensor:
        """Embeddings of ``n`` samples whose prompts cycle through ``prompts`` (each distinct prompt encoded once)."""
        unique = list(dict.fromkeys(prompts))
        table = self(unique)
        index = torch.tensor([unique.index(prompts[i % len(prompts)]) for i in range(n)])
        return table[index.to(table.device)]


__all__ = ["PromptEncoder"]
