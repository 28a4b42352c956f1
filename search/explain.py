"""Why this result: where the fusion layers' cross-attention from a query text lands on an image.

    ex = explain(collection, "red striped mug", item_id)
    ex.overlay  # PIL image: the item's image (framed as the model sees it) with the heatmap

The map is the cross-attention weight from the query's word tokens ([CLS] and padding left
out) onto the image's grid tokens, averaged over fusion layers and heads: (B, H, L, N) ->
(g, g). It is attention, not attribution: it shows where the matching head looked, which is
usually but not always what decided the score.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from vtfusion.indexer.collection import Collection
from vtfusion.models.preprocess import fit, load_image


@dataclass
class Explanation:
    heat: np.ndarray  # (g, g) in [0, 1], row-major over the image grid
    image: Image.Image  # the item's image, made square the way the model's preprocessing does
    overlay: Image.Image  # image with the heatmap blended in
    itm: float  # ITM match probability of (text, image)


def attention_map(maps: list[torch.Tensor], mask: torch.Tensor) -> np.ndarray:
    """Per-layer cross-attention weights, each (1, H, L, N) with N = 1 pooled + g*g grid tokens,
    and the text mask (1, L) -> (g, g) heatmap scaled to [0, 1]."""
    w = torch.stack([m.float() for m in maps]).mean(dim=(0, 2))[0]  # (L, N): mean over layers, heads
    words = mask[0].bool().clone()
    words[0] = False  # [CLS]
    last = int(mask[0].sum()) - 1
    if last > 0:
        words[last] = False  # [SEP]
    if not words.any():
        words = mask[0].bool()
    grid = w[words].mean(dim=0)[1:]  # (N - 1,) over the grid tokens
    g = int(round(grid.numel() ** 0.5))
    if g * g != grid.numel():
        raise ValueError(f"{grid.numel()} image tokens after the pooled one do not form a square grid")
    heat = grid.view(g, g)  # (g, g)
    heat = heat - heat.min()
    return (heat / heat.max().clamp(min=1e-12)).cpu().numpy()


def blend(image: Image.Image, heat: np.ndarray, alpha: float = 0.45) -> Image.Image:
    """``heat`` (g, g) in [0, 1] upsampled onto the square ``image`` as a colour map."""
    from matplotlib import colormaps

    size = image.size
    up = Image.fromarray((heat * 255).astype(np.uint8)).resize(size, Image.Resampling.BILINEAR)
    rgb = (colormaps["jet"](np.asarray(up) / 255.0)[..., :3] * 255).astype(np.uint8)  # (S, S, 3)
    return Image.blend(image.convert("RGB"), Image.fromarray(rgb), alpha)


@torch.no_grad()
def explain(c: Collection, text: str, item_id: int, size: int = 320) -> Explanation:
    if not text or not text.strip():
        raise ValueError("explaining a hit needs the query text")
    path = c.store.image_path(item_id)
    if path is None:
        raise ValueError(f"no item with id {item_id}")
    b = c.bundle
    img = load_image(path)
    tokens = b.image_tokens([img])  # (1, N, D_v)
    ids, mask = b.tokenizer([text])
    ids, mask = ids.to(b.device), mask.to(b.device)
    logit, maps = b.model.itm_logits(tokens, ids, mask, return_attention=True)
    heat = attention_map(maps, mask)
    view = fit(img, size, b.transform.mode, b.transform.resample)
    return Explanation(heat, view, blend(view, heat), float(torch.sigmoid(logit.float())[0]))
