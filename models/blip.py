"""A BLIP image-text retrieval checkpoint (``transformers.BlipForImageTextRetrieval``) behind
the four model verbs.

The Hugging Face class only offers a paired ``forward`` (image and text together), which
cannot build an index. This adapter splits it along the lines BLIP itself uses:

    image_tokens(pixels)  = vision_model(pixels).last_hidden_state          (B, 1 + P, D_v)
    encode_image(pixels)  = normalize(vision_proj(image_tokens[:, 0]))      the ITC space
    encode_text(ids, mask) = normalize(text_proj(text_encoder(ids, mask)[:, 0]))
    itm_logits(tokens, ids, mask): text_encoder cross-attending to ``tokens`` -> itm_head ->
                                  (no-match, match) logits; returned as match - no-match, so that
                                  sigmoid(logit) is BLIP's softmax match probability.

Scores equal ``BlipForImageTextRetrieval(use_itm_head=False)`` (cosine) and
``use_itm_head=True`` (ITM) on the same inputs (tests/test_backends.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BlipAdapter(nn.Module):
    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model
        vc = hf_model.config.vision_config
        self.image_size = vc.image_size
        self._num_tokens = 1 + (vc.image_size // vc.patch_size) ** 2
        self._token_width = vc.hidden_size
        self._embed_dim = hf_model.vision_proj.out_features

    @property
    def embed_dim(self) -> int:
        return self._embed_dim

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    @property
    def token_width(self) -> int:
        return self._token_width

    @property
    def _dtype(self) -> torch.dtype:
        return self.hf.vision_proj.weight.dtype

    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        s = self.image_size
        if pixels.dim() != 4 or pixels.shape[1:] != (3, s, s):
            raise ValueError(f"pixels must be (B, 3, {s}, {s}); got {tuple(pixels.shape)}")
        return self.hf.vision_model(pixel_values=pixels.to(self._dtype)).last_hidden_state  # (B, N, D_v)

    def image_emb(self, image_tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.hf.vision_proj(image_tokens[:, 0]), dim=-1)  # (B, E)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.image_emb(self.image_tokens(pixels))

    def encode_text(
        self, ids: torch.Tensor, mask: torch.Tensor, return_tokens: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, None]:
        """(B, E) unit vectors; ``return_tokens``: (emb, None): BLIP's ITM runs its text encoder
        again with cross-attention, so there are no text tokens to reuse."""
        h = self.hf.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, D_t)
        emb = F.normalize(self.hf.text_proj(h[:, 0]), dim=-1)  # (B, E)
        return (emb, None) if return_tokens else emb

    def text_tokens(self, ids: torch.Tensor, mask: torch.Tensor) -> None:
        """None: nothing of the text tower's output is reusable by ``itm_logits`` (see ``encode_text``)."""
        return None

    def itm_logits(
        self,
        image_tokens: torch.Tensor,
        ids: torch.Tensor,
        mask: torch.Tensor,
        return_attention: bool = False,
        text_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """(B, N, D_v), (B, L) -> (B,); either side may have batch 1 (broadcast). With
        ``return_attention`` also the cross-attention weights per layer, each (B, H, L, N).
        ``text_tokens`` is accepted for the protocol and must be None (there are none)."""
        if text_tokens is not None:
            raise ValueError("BLIP's ITM takes no precomputed text tokens")
        b_img, b_txt = image_tokens.shape[0], ids.shape[0]
        if b_img != b_txt and 1 not in (b_img, b_txt):
            raise ValueError(f"batch sizes differ: {b_img} image token sets vs {b_txt} texts")
        B = max(b_img, b_txt)
        image_tokens = image_tokens.to(self._dtype).expand(B, -1, -1)  # (B, N, D_v)
        ids, mask = ids.expand(B, -1), mask.expand(B, -1)  # (B, L)
        image_mask = torch.ones(image_tokens.shape[:2], dtype=torch.long, device=image_tokens.device)  # (B, N)
        out = self.hf.text_encoder(
            input_ids=ids, attention_mask=mask, encoder_hidden_states=image_tokens,
            encoder_attention_mask=image_mask, output_attentions=return_attention,
        )
        two = self.hf.itm_head(out.last_hidden_state[:, 0])  # (B, 2): no-match, match
        logits = two[:, 1] - two[:, 0]
        if not return_attention:
            return logits
        maps = list(out.cross_attentions or [])
        if not maps:
            raise RuntimeError("this BLIP text encoder did not return cross-attention weights")
        return logits, maps

    def logit_scale_value(self) -> torch.Tensor:
        """BLIP fuses the ITM logit with the raw cosine (train_retrieval.py: ``score + topk_sim``)."""
        return torch.tensor(1.0)
