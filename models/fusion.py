"""The native fusion model (ALBEF/BLIP family) and its four public verbs.

    encode_image(pixels)                 -> (B, E)  unit vectors, the image index space
    encode_text(ids, mask)               -> (B, E)  unit vectors, the text index space
    image_tokens(pixels)                 -> (B, N, D_v)  what the rerank token cache stores
    itm_logits(image_tokens, ids, mask)  -> (B,)    full cross-attention match logit
    logit_scale_value()                  -> ()      ITC logit = scale x cosine (to fuse ITM with ITC)

Nothing outside ``models/`` touches anything else. Preprocessing (image transform,
tokenizer) lives in ``models/preprocess.py``; this module never sees a path or a PIL image.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import FusionBlock, MutualFusionBlock
from .text import RecurrentTextTower, TextTower
from .vision import VisionTower


def fused_score(itm_logits, itc_cosine, itc_scale, itm_weight: float = 1.0):
    """The score reranking sorts candidates by: ITM logit + ITC logit (the learned scale x the
    cosine). Training's listwise ITM loss ranks by it, validation and search sort by it; tensors
    or numpy arrays alike. ``itm_weight``: the calibrated weight of the ITM logit at the depth
    being reranked (``calibrate.weight_at``; 1 for the plain sum)."""
    if itm_weight == 1.0:
        return itm_logits + itc_scale * itc_cosine
    return itm_weight * itm_logits + itc_scale * itc_cosine


def weight_at(weights: dict[str, float] | None, depth: int) -> float:
    """The ITM weight for reranking ``depth`` candidates: that of the smallest calibrated depth
    at or above it, else the deepest's; 1.0 (the plain sum) for a model never calibrated."""
    if not weights:
        return 1.0
    ds = sorted(int(d) for d in weights)
    d = next((x for x in ds if x >= depth), ds[-1])
    return float(weights[str(d)])


class FusionModel(nn.Module):
    def __init__(self, cfg: ModelConfig, text_bert: nn.Module | None = None, clip_model: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        clip = None
        if cfg.vision.kind == "clip":  # CLIP towers, projections and temperature (models/clip.py)
            from .clip import clip_parts, split

            clip = split(clip_model) if clip_model is not None else clip_parts(cfg.clip)
            self.vision, self.text = clip["vision"], clip["text"]
        else:
            self.vision = VisionTower(cfg.vision)
            self.text = RecurrentTextTower(cfg.text) if cfg.text.recurrent else TextTower(cfg.text, text_bert)
        d_t, d_v, f = self.text.width, cfg.vision.width, cfg.fusion
        if f.mode == "mutual":  # image tokens attend to the text too, in every layer but the last
            blocks = (MutualFusionBlock(d_t, d_v, f.num_heads, f.mlp_ratio, f.dropout, update_image=i + 1 < f.num_layers)
                      for i in range(f.num_layers))
        else:
            blocks = (FusionBlock(d_t, d_v, f.num_heads, f.mlp_ratio, f.dropout) for _ in range(f.num_layers))
        self.fusion = nn.ModuleList(blocks)
        self.fusion_norm = nn.LayerNorm(d_t)
        self.itm_head = nn.Linear(d_t, 1)
        if clip is not None:
            self.image_proj, self.text_proj, self.logit_scale = clip["image_proj"], clip["text_proj"], clip["logit_scale"]
        else:
            self.image_proj = nn.Linear(d_v, cfg.embed_dim)
            self.text_proj = nn.Linear(d_t, cfg.embed_dim)
            # ITC temperature, learned in log space as CLIP does; logit scale is capped at 100
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))

    # ---- sizes the index and the token cache need ----------------------------------------

    @property
    def embed_dim(self) -> int:
        return self.cfg.embed_dim  # E

    @property
    def num_tokens(self) -> int:
        return self.cfg.vision.num_tokens  # N

    @property
    def token_width(self) -> int:
        return self.cfg.vision.width  # D_v

    # ---- public verbs -------------------------------------------------------------------

    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, S, S), normalised by ``ImageTransform`` -> (B, N, D_v)."""
        s = self.cfg.vision.image_size
        if pixels.dim() != 4 or pixels.shape[1:] != (3, s, s):
            raise ValueError(f"pixels must be (B, 3, {s}, {s}); got {tuple(pixels.shape)}")
        return self.vision(pixels.to(self._dtype))

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, S, S) -> (B, E) unit vectors."""
        return self.image_emb(self.image_tokens(pixels))

    def encode_text(
        self, ids: torch.Tensor, mask: torch.Tensor, return_tokens: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """ids, mask (B, L) -> (B, E) unit vectors; with ``return_tokens`` also the text tokens
        (B, L, D_t) they were pooled from (a search reuses them for ITM reranking)."""
        tokens = self.text_tokens(ids, mask)  # (B, L, D_t)
        emb = self.text_emb(tokens, mask)
        return (emb, tokens) if return_tokens else emb

    def text_tokens(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask (B, L) -> (B, L, D_t): the text tower's hidden states (what fusion attends from)."""
        self._check_text(ids, mask)
        return self.text(ids, mask)

    def itm_logits(
        self,
        image_tokens: torch.Tensor,
        ids: torch.Tensor,
        mask: torch.Tensor,
        return_attention: bool = False,
        text_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Match logit for each (image, text) pair: (B, N, D_v), (B, L) -> (B,).

        Either side may have batch 1 and is then broadcast against the other (one query
        image scored against K candidate texts, or one query text against K images).
        ``sigmoid`` of the logit is the ITM probability. With ``return_attention`` the
        cross-attention weights of every fusion layer, each (B, H, L, N), come back too.
        ``text_tokens``: ``self.text_tokens(ids, mask)`` computed beforehand (a reranker
        scoring one query text against many chunks of images runs the text tower once).
        """
        self._check_text(ids, mask)
        if image_tokens.dim() != 3 or image_tokens.shape[-1] != self.cfg.vision.width:
            raise ValueError(f"image_tokens must be (B, N, {self.cfg.vision.width}); got {tuple(image_tokens.shape)}")
        b_img, b_txt = image_tokens.shape[0], ids.shape[0]
        if b_img != b_txt and 1 not in (b_img, b_txt):
            raise ValueError(f"batch sizes differ: {b_img} image token sets vs {b_txt} texts")
        if text_tokens is None:
            text_tokens = self.text(ids, mask)  # (b_txt, L, D_t)
        B = max(b_img, b_txt)
        image_tokens = image_tokens.to(self._dtype)
        # one image against B texts: its keys/values are projected once, not B times; one text
        # against B images: the first layer's text self-attention and queries run once
        index = torch.zeros(B, dtype=torch.long, device=image_tokens.device) if b_img < B else None
        return self.fuse(image_tokens, text_tokens, mask, return_attention, image_index=index)

    # ---- internals shared with training (same package) ----------------------------------

    def image_emb(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D_v) -> (B, E): project the pooled token 0."""
        return F.normalize(self.image_proj(image_tokens[:, 0]), dim=-1)

    def text_emb(self, text_tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, L, D_t) -> (B, E)."""
        return F.normalize(self.text_proj(self.text.pool(text_tokens, mask)), dim=-1)

    def fuse(
        self,
        image_tokens: torch.Tensor,  # (B, N, D_v)
        text_tokens: torch.Tensor,  # (B, L, D_t)
        mask: torch.Tensor,  # (B, L)
        return_attention: bool = False,
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """ITM logits (B,) for text rows against ``image_tokens`` (B, N, D_v), or against
        ``image_tokens[image_index]`` when ``image_index`` (B,) is given (U distinct images).
        Text tokens and mask of batch 1 are broadcast against B images."""
        x, maps = self.fuse_tokens(image_tokens, text_tokens, mask, return_attention, image_index)  # (B, L, D_t)
        if self.cfg.fusion.itm_pool == "mean":
            m = mask.to(x.dtype).unsqueeze(-1)  # (B | 1, L, 1)
            pooled = (x * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, D_t)
        else:
            pooled = x[:, 0]  # the [CLS] position
        logits = self.itm_head(pooled).squeeze(-1)  # (B,)
        return (logits, maps) if return_attention else logits

    def fuse_tokens(
        self,
        image_tokens: torch.Tensor,  # (B | U, N, D_v)
        text_tokens: torch.Tensor,  # (B, L, D_t)
        mask: torch.Tensor,  # (B, L)
        return_attention: bool = False,
        image_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """The fusion encoder's output tokens (B, L, D_t), normed, and each layer's cross-attention
        weights (None unless ``return_attention``): what the ITM head pools and what masked
        language modelling (training only) predicts words from."""
        B = max(text_tokens.shape[0], image_tokens.shape[0] if image_index is None else image_index.shape[0])
        mutual = self.cfg.fusion.mode == "mutual"
        kvs = [None] * len(self.fusion)
        if not torch.is_grad_enabled() and len(self.fusion):
            # mutual layers after the first read image tokens the text has changed: only the
            # first layer's keys and values are one per image
            kvs[: 1 if mutual else len(kvs)] = self._image_kv(image_tokens, self.fusion[:1] if mutual else self.fusion)
        x, maps = text_tokens, []
        for block, kv in zip(self.fusion, kvs):
            if mutual:
                x, weights, updated = block(x, mask, image_tokens, return_weights=return_attention, image_index=image_index, image_kv=kv)
                if updated is not None:  # (B, N, D_v): one set of image tokens per row from here on
                    image_tokens, image_index = updated, None
            else:
                x, weights = block(x, mask, image_tokens, return_weights=return_attention, image_index=image_index, image_kv=kv)
            maps.append(weights)
        return self.fusion_norm(x).expand(B, -1, -1), maps

    def _image_kv(self, image_tokens: torch.Tensor, blocks) -> list[torch.Tensor]:
        """Every fusion layer's image keys and values in one matrix product (inference).

        Each layer computes ``kv(norm_kv(x))``. The normalisation is the same for every layer but
        its affine part: LN_l(x) = x̂ * g_l + b_l, so kv_l(LN_l(x)) = x̂ @ (W_l * g_l)^T + (W_l b_l + c_l).
        x̂ is computed once and one product with the layers' folded weights stacked gives all
        of them: at rerank depth 16 the image side is most of the work (65 image tokens
        against ~12 text tokens per candidate)."""
        xhat = F.layer_norm(image_tokens, image_tokens.shape[-1:], eps=blocks[0].norm_kv.eps)  # (U, N, D_v): every layer's norm_kv is the same LayerNorm(D_v)
        weight = torch.cat([blk.cross_attn.kv.weight * blk.norm_kv.weight for blk in blocks])  # (layers*2D, D_v)
        bias = torch.cat([blk.cross_attn.kv.weight @ blk.norm_kv.bias + blk.cross_attn.kv.bias for blk in blocks])
        return list(F.linear(xhat, weight.to(xhat.dtype), bias.to(xhat.dtype)).chunk(len(blocks), dim=-1))  # layers x (U, N, 2D)

    def logit_scale_value(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=100.0)

    @property
    def _dtype(self) -> torch.dtype:
        return self.text_proj.weight.dtype

    def _check_text(self, ids: torch.Tensor, mask: torch.Tensor) -> None:
        if ids.dim() != 2 or ids.shape != mask.shape:
            raise ValueError(f"ids and mask must both be (B, L); got {tuple(ids.shape)} and {tuple(mask.shape)}")
