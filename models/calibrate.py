"""Recall-safe reranking: the ITM weight of the fused score, chosen per rerank depth on pairs
training never saw.

Reranking sorts a query's top ``d`` ITC candidates by ``w x ITM logit + scale x cosine``
(``fusion.fused_score``). With ``w = 1`` an ITM that is confidently wrong about an item deep in
the list pulls it above the right one, and reranking deeper can *lower* R@5 and R@10 below ITC's
(issue 21 measured it). ``w = 0`` is ITC's own order. ``choose_weights`` picks, for each depth,
the largest ``w`` of ``WEIGHTS`` (0 to 1: the model is trained to rank by the plain sum, ``w =
1``, so calibration only ever takes ITM's say down) whose R@1, R@5 and R@10 are at least ITC's
in both directions on the calibration pairs; ``w = 0`` always qualifies, so the choice exists.
The largest rather than the best-R@1 one: on held-out pairs as easy as the training split's
(ITC R@1 95 on the generalisation split's) the R@1 differences between weights are one or two
queries, noise, while safety is what calibration is for. Search reads the weight of the depth it
reranks at (``fusion.weight_at``, through ``Bundle.itm_weight``).

The calibration pairs are held out of both training stages (``TrainConfig.calibration``),
grouped by image so no picture is on both sides.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .factory import Bundle
from .validate import embed_images

WEIGHTS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
DEPTHS = (16, 32, 64)  # the depths weights are chosen for; deeper searches use the deepest's
KS = (1, 5, 10)


@dataclass
class Candidates:
    """One direction's queries: each one's top-``d`` ITC candidates (in ITC order), their
    cosines and ITM logits, and where the query's own partner is."""

    cos: np.ndarray  # (n, d) float32
    itm: np.ndarray  # (n, d) float32
    pos: np.ndarray  # (n,) the partner's index in the top d, -1 when it is deeper
    itc_rank: np.ndarray  # (n,) the partner's 1-based ITC rank over the whole gallery

    def ranks(self, depth: int, w: float, scale: float) -> np.ndarray:
        """The partner's rank after reranking the top ``depth`` by ``w x itm + scale x cos``
        (ties keep ITC order), (n,)."""
        d = min(depth, self.cos.shape[1])
        fused = w * self.itm[:, :d] + scale * self.cos[:, :d]  # (n, d)
        out = self.itc_rank.astype(np.int64).copy()
        inside = np.flatnonzero((self.pos >= 0) & (self.pos < d))
        if len(inside):
            mine = fused[inside, self.pos[inside]][:, None]  # (m, 1)
            cols = np.arange(d)[None, :]
            ahead = (fused[inside] > mine) | ((fused[inside] == mine) & (cols < self.pos[inside, None]))
            out[inside] = 1 + ahead.sum(1)
        return out


def recall(ranks: np.ndarray) -> dict[int, float]:
    return {k: float(100.0 * np.mean(ranks <= k)) for k in KS}


@torch.no_grad()
def candidate_scores(bundle: Bundle, pixels_u8: torch.Tensor, texts: list[str], depth: int = max(DEPTHS), chunk: int = 64) -> dict[str, Candidates]:
    """Text -> image and image -> text candidates of ``n`` pairs (image i, text i), each query's
    top ``depth`` with ITM logits: what reranking would see on a gallery of these pairs."""
    model, device = bundle.model, bundle.device
    was_training = model.training
    model.eval()
    n = len(texts)
    image_emb, image_tokens = embed_images(bundle, pixels_u8)  # (n, E), (n, N, D_v)
    ids, mask = bundle.tokenizer(texts)  # (n, L)
    ids, mask = ids.to(device), mask.to(device)
    text_emb = torch.cat([model.encode_text(ids[i : i + 256], mask[i : i + 256]) for i in range(0, n, 256)])  # (n, E)
    sim = (text_emb.float() @ image_emb.float().t()).cpu().numpy()  # (n, n) text x image
    d = min(depth, n)
    out = {}
    for name, s in (("t2i", sim), ("i2t", sim.T)):
        order = np.argsort(-s, axis=1, kind="stable")  # (n, n): ITC order, ties to the lower index
        itc_rank = 1 + np.argmax(order == np.arange(n)[:, None], axis=1)
        top = order[:, :d]
        pos = np.where(itc_rank <= d, itc_rank - 1, -1)
        itm = np.zeros((n, d), np.float32)
        for q in range(n):
            cand = torch.as_tensor(top[q], device=device)
            for start in range(0, d, chunk):
                c = cand[start : start + chunk]
                if name == "t2i":  # one text against its candidate images
                    logits = model.itm_logits(image_tokens[c], ids[q : q + 1], mask[q : q + 1])
                else:  # one image against its candidate texts
                    logits = model.itm_logits(image_tokens[q : q + 1], ids[c], mask[c])
                itm[q, start : start + len(c)] = logits.float().cpu().numpy()
        out[name] = Candidates(np.take_along_axis(s, top, 1).astype(np.float32), itm, pos, itc_rank)
    model.train(was_training)
    return out


def choose_weights(cands: dict[str, Candidates], scale: float, depths=DEPTHS, weights=WEIGHTS) -> dict:
    """Per depth: the largest ITM weight whose reranking keeps ITC's R@1, R@5 and R@10 in both
    directions, and the calibration pairs' recalls at every weight tried.
    -> {"weights": {"16": w, ...}, "table": {"itc": {...}, "16": {"w": w, "t2i": {...}, "i2t": {...},
    "tried": {w: {...}}}, ...}}"""
    itc = {name: recall(c.itc_rank) for name, c in cands.items()}
    fmt = lambda r: {name: {f"R@{k}": round(v, 2) for k, v in r[name].items()} for name in r}  # noqa: E731
    chosen, table = {}, {"itc": fmt(itc)}
    for depth in depths:
        tried, best = {}, 0.0
        for w in sorted(weights):
            r = {name: recall(c.ranks(depth, w, scale)) for name, c in cands.items()}
            tried[str(w)] = fmt(r)
            if all(r[name][k] >= itc[name][k] for name in r for k in KS):
                best = w
        chosen[str(depth)] = best
        table[str(depth)] = {"w": best, **tried[str(best)], "tried": tried}
    return {"weights": chosen, "table": table}
