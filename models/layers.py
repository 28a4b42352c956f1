"""Attention building blocks shared by the image tower and the fusion encoder.

Shape glossary (used in every module of ``models/``):
    B  batch                     N  image tokens (1 pooled + grid)
    L  text tokens               D  width (D_v image tokens, D_t text / fusion)
    E  ITC embedding dim         H  attention heads, hs = D / H
    K  rerank candidates

``*_tokens`` are (B, N|L, D) hidden states; ``*_emb`` are (B, E) unit vectors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head attention; keys/values may come from another sequence of another width.

    ``key_mask`` is (B, S) with 1/True for real tokens. When ``return_weights`` is set the
    attention probabilities (B, H, T, S) are returned too (the UI's "why this result" heatmap).
    """

    def __init__(self, width: int, num_heads: int, kv_width: int | None = None, dropout: float = 0.0):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
        kv_width = kv_width or width
        self.num_heads = num_heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(kv_width, 2 * width)
        self.out = nn.Linear(width, width)
        self.dropout = dropout

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
        return_weights: bool = False,
        context_index: torch.Tensor | None = None,
        context_kv: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``context_index`` (B,): row b attends to ``context[context_index[b]]``; the keys and
        values are then projected once per distinct context (U, S, ·) and gathered, which is what
        makes scoring many texts against few images (ITM negatives, image→text rerank) cheap.
        ``x`` with batch 1 against a context of batch B is projected once and broadcast (one
        query text against B candidate images). ``context_kv``: ``self.kv(context)`` (U, S, 2D)
        computed by the caller (inference projects every fusion layer's image keys and values
        in one product)."""
        context = x if context is None else context
        Bq, T, D = x.shape
        U, S = context.shape[:2]
        H = self.num_heads
        q = self.q(x).view(Bq, T, H, D // H).transpose(1, 2)  # (Bq, H, T, hs)
        kv = self.kv(context) if context_kv is None else context_kv  # (U, S, 2D)
        k, v = kv.view(U, S, 2, H, D // H).permute(2, 0, 3, 1, 4)  # 2 x (U, H, S, hs)
        if context_index is not None:
            k, v = gather_rows(k, context_index), gather_rows(v, context_index)  # 2 x (B, H, S, hs)
        B = max(Bq, k.shape[0])
        q, k, v = q.expand(B, -1, -1, -1), k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)
        bias = None
        if key_mask is not None:
            # (B | 1, 1, 1, S) additive mask: 0 for real keys, -inf for padding
            bias = torch.zeros(key_mask.shape[0], 1, 1, S, dtype=q.dtype, device=q.device)
            bias = bias.masked_fill(~key_mask.bool()[:, None, None, :], float("-inf"))
        if return_weights:
            scores = (q @ k.transpose(-2, -1)) / (D // H) ** 0.5  # (B, H, T, S)
            if bias is not None:
                scores = scores + bias
            weights = scores.softmax(dim=-1)
            y = F.dropout(weights, self.dropout, self.training) @ v  # (B, H, T, hs)
        else:
            weights = None
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0
            )  # (B, H, T, hs)
        y = y.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        return self.out(y), weights


def gather_rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t[index]`` along dim 0. Under autograd as a one-hot matrix product: indexing's backward
    accumulates with atomics and is not bit-reproducible on CPU; a matmul's is."""
    if not (torch.is_grad_enabled() and t.requires_grad):
        return t.index_select(0, index)
    onehot = F.one_hot(index, t.shape[0]).to(t.dtype)  # (B, U)
    return (onehot @ t.reshape(t.shape[0], -1)).view(index.shape[0], *t.shape[1:])


class MLP(nn.Sequential):
    def __init__(self, width: int, mlp_ratio: float, dropout: float = 0.0):
        hidden = int(width * mlp_ratio)
        super().__init__(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width), nn.Dropout(dropout))


class SelfAttentionBlock(nn.Module):
    """Pre-norm transformer encoder block (image tower)."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, num_heads, dropout=dropout)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_ratio, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))[0]
        return x + self.mlp(self.norm2(x))


class FusionBlock(nn.Module):
    """Text self-attention, then cross-attention from text to image tokens, then FFN (pre-norm).

    The ALBEF/BLIP fusion layer: each text token gathers evidence from the image tokens, so
    an attribute word can be checked against the object it is bound to.
    """

    def __init__(self, width: int, kv_width: int, num_heads: int, mlp_ratio: float, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.self_attn = Attention(width, num_heads, dropout=dropout)
        self.norm2 = nn.LayerNorm(width)
        self.norm_kv = nn.LayerNorm(kv_width)
        self.cross_attn = Attention(width, num_heads, kv_width=kv_width, dropout=dropout)
        self.norm3 = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_ratio, dropout)

    def forward(
        self,
        text_tokens: torch.Tensor,  # (B, L, D_t)
        text_mask: torch.Tensor,  # (B, L)
        image_tokens: torch.Tensor,  # (B, N, D_v)
        return_weights: bool = False,
        image_index: torch.Tensor | None = None,  # (B,): row b reads image_tokens[image_index[b]] (U, N, D_v)
        image_kv: torch.Tensor | None = None,  # (U, N, 2 D_t): cross_attn.kv(norm_kv(image_tokens)), precomputed
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = text_tokens
        x = x + self.self_attn(self.norm1(x), key_mask=text_mask)[0]
        context = image_tokens if image_kv is not None else self.norm_kv(image_tokens)
        y, weights = self.cross_attn(
            self.norm2(x), context, return_weights=return_weights, context_index=image_index, context_kv=image_kv
        )
        x = x + y
        return x + self.mlp(self.norm3(x)), weights  # (B, L, D_t), (B, H, L, N) | None


class MutualFusionBlock(nn.Module):
    """The design's mutual attention layer (pre-norm): the text update is the *sum* of text
    self-attention and text -> image attention; then the image tokens attend to the updated
    text (``update_image``; the last layer skips it, nothing would read it); then an FFN on each
    side.

    The image side no longer holds one set of tokens per image: after this layer each (image,
    text) row has its own, (B, N, D_v). The first layer's image keys and values are still one
    per distinct image (``image_index``, ``image_kv``); later layers read per-row tokens.
    """

    def __init__(self, width: int, kv_width: int, num_heads: int, mlp_ratio: float, dropout: float = 0.0, update_image: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.self_attn = Attention(width, num_heads, dropout=dropout)
        self.norm_kv = nn.LayerNorm(kv_width)
        self.cross_attn = Attention(width, num_heads, kv_width=kv_width, dropout=dropout)
        self.norm3 = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_ratio, dropout)
        self.update_image = update_image
        if update_image:
            if kv_width % num_heads:
                raise ValueError(f"image width {kv_width} is not divisible by num_heads {num_heads}")
            self.norm_img = nn.LayerNorm(kv_width)
            self.norm_txt = nn.LayerNorm(width)
            self.image_attn = Attention(kv_width, num_heads, kv_width=width, dropout=dropout)
            self.norm_img_mlp = nn.LayerNorm(kv_width)
            self.image_mlp = MLP(kv_width, mlp_ratio, dropout)

    def forward(
        self,
        text_tokens: torch.Tensor,  # (B | 1, L, D_t)
        text_mask: torch.Tensor,  # (B | 1, L)
        image_tokens: torch.Tensor,  # (U | B, N, D_v)
        return_weights: bool = False,
        image_index: torch.Tensor | None = None,  # (B,): row b reads image_tokens[image_index[b]]
        image_kv: torch.Tensor | None = None,  # (U, N, 2 D_t): cross_attn.kv(norm_kv(image_tokens)), precomputed
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """-> (text tokens (B, L, D_t), text -> image weights (B, H, L, N) | None, image tokens
        (B, N, D_v) after attending to the text, or None when this layer does not update them)."""
        x = text_tokens
        h = self.norm1(x)
        context = image_tokens if image_kv is not None else self.norm_kv(image_tokens)
        y, weights = self.cross_attn(h, context, return_weights=return_weights, context_index=image_index, context_kv=image_kv)
        x = x + self.self_attn(h, key_mask=text_mask)[0] + y  # (B, L, D_t): sum of both attentions
        img = None
        if self.update_image:
            img = image_tokens if image_index is None else gather_rows(image_tokens, image_index)  # (B | 1, N, D_v)
            z, _ = self.image_attn(self.norm_img(img), self.norm_txt(x), key_mask=text_mask)
            B = max(img.shape[0], z.shape[0])
            img = img.expand(B, -1, -1) + z
            img = img + self.image_mlp(self.norm_img_mlp(img))
        return x + self.mlp(self.norm3(x)), weights, img
