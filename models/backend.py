"""The model-backend protocol: the verbs indexing and search use, whatever the model.

Implemented in full by the native ``FusionModel`` (scratch, pretrained-text and CLIP towers) and
by ``BlipAdapter``; nothing outside ``models/`` asks which one it holds. Text tokens are the
one optional part: a backend whose ITM cannot reuse the text tower's output (BLIP runs its
text encoder again with cross-attention) returns ``None`` for them, and callers pass ``None``
back to ``itm_logits``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Backend(Protocol):
    @property
    def embed_dim(self) -> int: ...  # E: the ITC space

    @property
    def num_tokens(self) -> int: ...  # N: image tokens per image

    @property
    def token_width(self) -> int: ...  # D_v: width of an image token

    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels (B, 3, S, S) -> image tokens (B, N, D_v)."""
        ...

    def image_emb(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """Image tokens (B, N, D_v) -> unit embeddings (B, E)."""
        ...

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels -> unit embeddings (B, E)."""
        ...

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor, return_tokens: bool = False):
        """ids, mask (B, L) -> unit embeddings (B, E); with ``return_tokens`` also the text tokens
        (B, L, D_t) for ``itm_logits``, or None where the backend has none to reuse."""
        ...

    def text_tokens(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        """The text tower's output (B, L, D_t) that ``itm_logits`` can reuse, or None."""
        ...

    def itm_logits(
        self,
        image_tokens: torch.Tensor,
        ids: torch.Tensor,
        mask: torch.Tensor,
        return_attention: bool = False,
        text_tokens: torch.Tensor | None = None,
    ):
        """Match logits (B,) of (image tokens, text) pairs, either side broadcast from batch 1;
        with ``return_attention`` also the cross-attention maps per layer."""
        ...

    def logit_scale_value(self) -> torch.Tensor:
        """The factor that puts an ITC cosine in ITM-logit units when the two are fused."""
        ...
