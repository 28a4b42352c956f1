"""CLIP towers behind the native model's interfaces.

A ``clip:`` model reference builds a :class:`~models.fusion.FusionModel` whose image and text
towers, ITC projections and temperature are a CLIP checkpoint's (``transformers.CLIPModel``),
with the native fusion layers and ITM head on top. Until those are trained
(``vtfusion train --init-from clip:…``) such a model only indexes: the bundle says
``has_itm=False`` and search keeps ITC order.

    image tokens  = vision_model(pixels).last_hidden_state          (B, 1 + P, D_v), pre post-LN
    image emb     = normalize(visual_projection(post_layernorm(tokens[:, 0])))
    text tokens   = text_model(ids, mask).last_hidden_state         (B, L, D_t), final-LN applied
    text emb      = normalize(text_projection(tokens[end of text]))

exactly what ``CLIPModel.get_image_features`` / ``get_text_features`` compute (the end-of-text
token is the last real token: CLIP's tokenizer ends every text with it and pads after it).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPConfig, CLIPModel

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipVisionTower(nn.Module):
    def __init__(self, vision_model: nn.Module):
        super().__init__()
        self.m = vision_model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, S, S) -> (B, 1 + P, D_v): CLS token then patch tokens."""
        return self.m(pixel_values=pixels).last_hidden_state


class ClipTextTower(nn.Module):
    def __init__(self, text_model: nn.Module):
        super().__init__()
        self.m = text_model

    @property
    def width(self) -> int:
        return self.m.config.hidden_size

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask (B, L) -> (B, L, D_t)."""
        return self.m(input_ids=ids, attention_mask=mask).last_hidden_state

    def pool(self, text_tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, L, D_t) -> (B, D_t): the end-of-text token, i.e. the last real position."""
        last = mask.long().sum(dim=1).clamp(min=1) - 1  # (B,)
        return text_tokens[torch.arange(text_tokens.shape[0], device=text_tokens.device), last]


def clip_parts(config: dict) -> dict[str, nn.Module]:
    """Towers, projections and logit scale of a CLIP model built from its config dict (random
    weights: a checkpoint's are loaded afterwards into the whole FusionModel)."""
    clip = CLIPModel(CLIPConfig.from_dict(config))
    return split(clip)


def split(clip: CLIPModel) -> dict[str, nn.Module]:
    post_ln = clip.vision_model.post_layernorm
    clip.vision_model.post_layernorm = nn.Identity()  # it moves into image_proj (it only touches the pooled token)
    return {
        "vision": ClipVisionTower(clip.vision_model),
        "text": ClipTextTower(clip.text_model),
        "image_proj": nn.Sequential(post_ln, clip.visual_projection),
        "text_proj": clip.text_projection,
        "logit_scale": clip.logit_scale,
    }
