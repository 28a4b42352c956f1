"""Held-out validation run at the end of training: text->image Recall@1, ITC only and after
ITM reranking of the top-k candidates (pure torch; the full evaluation lives in ``search/``).

Texts are scored in chunks against all images, so memory stays at (chunk, N) similarities
plus the image tokens of the split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .factory import Bundle
from .fusion import fused_score
from .progress import progress as progress_bar


@dataclass(frozen=True)
class Validation:
    n: int  # pairs in the split (text i belongs to image i)
    itc_r1: float  # text->image R@1 by ITC cosine
    itm_r1: float  # after reranking the top `rerank_k` by the ITM logit
    fused_r1: float  # after reranking by ITM logit + ITC logit (scale x cosine)
    itc_recall_at_k: float  # how often the right image is among the reranked candidates at all
    rerank_k: int

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@torch.no_grad()
def embed_images(bundle: Bundle, pixels_u8: torch.Tensor, batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, 3, S, S) -> (image_emb (N, E), image_tokens (N, N_tok, D_v)) on the model's device."""
    embs, toks = [], []
    for i in range(0, pixels_u8.shape[0], batch_size):
        e, t = bundle.embed_pixels(pixels_u8[i : i + batch_size])  # (b, E), (b, N, D_v)
        embs.append(e)
        toks.append(t)
    return torch.cat(embs), torch.cat(toks)


@torch.no_grad()
def text_to_image_r1(
    bundle: Bundle, pixels_u8: torch.Tensor, texts: list[str], rerank_k: int = 32, chunk: int = 64, progress: bool = False
) -> Validation:
    if pixels_u8.shape[0] != len(texts):
        raise ValueError(f"{pixels_u8.shape[0]} images but {len(texts)} texts; pair i must be (image i, text i)")
    model, device = bundle.model, bundle.device
    was_training = model.training
    model.eval()
    image_emb, image_tokens = embed_images(bundle, pixels_u8)  # (N, E), (N, N_tok, D_v)
    n = len(texts)
    k = min(rerank_k, n)
    hits = {"itc": 0, "itm": 0, "fused": 0, "in_k": 0}
    itc_scale = model.logit_scale_value()
    for start in progress_bar(range(0, n, chunk), desc="validate", unit="chunk", enabled=progress):
        ids, mask = bundle.tokenizer(texts[start : start + chunk])
        ids, mask = ids.to(device), mask.to(device)
        sim = model.encode_text(ids, mask) @ image_emb.t()  # (c, N)
        top_sim, top_idx = sim.topk(k, dim=1)  # (c, k)
        target = torch.arange(start, start + ids.shape[0], device=device)  # (c,)
        hits["itc"] += int((top_idx[:, 0] == target).sum())
        hits["in_k"] += int((top_idx == target[:, None]).any(dim=1).sum())
        for row in range(ids.shape[0]):
            logits = model.itm_logits(image_tokens[top_idx[row]], ids[row : row + 1], mask[row : row + 1])  # (k,)
            hits["itm"] += int(top_idx[row, logits.argmax()] == target[row])
            fused = fused_score(logits, top_sim[row], itc_scale)
            hits["fused"] += int(top_idx[row, fused.argmax()] == target[row])
    model.train(was_training)
    return Validation(
        n=n,
        itc_r1=hits["itc"] / n,
        itm_r1=hits["itm"] / n,
        fused_r1=hits["fused"] / n,
        itc_recall_at_k=hits["in_k"] / n,
        rerank_k=k,
    )
