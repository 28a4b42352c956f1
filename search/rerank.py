"""Second stage: score candidates with full cross-attention ITM, in fixed-size chunks.

The reranker takes a scorer (STYLE: swappable parts by injection): anything with
``score(query, candidate_ids) -> (K,) logits``. ``ITMScorer`` is the real one: candidate image
tokens come from the token cache (re-encoded from the image file on a miss or when the cache is
disabled, and counted), the query text is
tokenised once, and the fusion layers run over ``chunk`` candidates at a time, so depth 256 costs
the memory of one chunk. For image -> text the query image's tokens are computed once and
scored against each chunk of candidate texts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from vtfusion.indexer.collection import Collection
from vtfusion.models.fusion import fused_score

FUSIONS = ("itm+itc", "itm", "itc")


class Scorer(Protocol):
    """Scores candidates for a query. Optional attributes the engine reads: ``ready`` (False
    when it cannot score, e.g. a model without a trained ITM head; taken as True when absent)
    and ``misses`` (image tokens re-encoded so far)."""

    def score(self, query: Query, candidate_ids: Sequence[int]) -> np.ndarray: ...


@dataclass
class Query:
    """What the ITM scorer needs of a query: its text (ids, mask) or its image tokens."""

    ids: torch.Tensor | None = None  # (1, L)
    mask: torch.Tensor | None = None  # (1, L)
    image_tokens: torch.Tensor | None = None  # (1, N, D_v)
    text_tokens: torch.Tensor | None = None  # (1, L, D_t): the text tower's output, when the query encoder kept it


class ITMScorer:
    def __init__(self, collection: Collection, chunk: int = 64):
        self.c = collection
        self.chunk = chunk
        self.misses = 0

    @property
    def ready(self) -> bool:
        """Whether this collection's model can rerank (it has a trained ITM head)."""
        return self.c.bundle.has_itm

    @torch.inference_mode()
    def score(self, query: Query, candidate_ids: Sequence[int]) -> np.ndarray:
        """ITM logits of the stored items ``candidate_ids`` for ``query``: their image tokens
        (token cache) for a text query, their texts for an image query."""
        self._check()
        if query.ids is None:  # image query -> candidate texts
            return self.score_texts(query.image_tokens, self.c.store.texts(candidate_ids))
        query = self._with_text_tokens(query)
        out = []
        for start in range(0, len(candidate_ids), self.chunk):
            tokens, misses = self.c.item_tokens(list(candidate_ids[start : start + self.chunk]))  # (c, N, D_v)
            self.misses += misses
            out.append(self.score_tokens(query, tokens))
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def _check(self) -> None:
        if not self.c.bundle.has_itm:
            raise ValueError(f"the model {self.c.config.model} has no trained ITM head; rerank with a model trained by `vtfusion train`")

    def _with_text_tokens(self, query: Query) -> Query:
        """The query with its text tower output attached (native models), so that scoring
        chunk after chunk runs the tower once."""
        model, device = self.c.bundle.model, self.c.bundle.device
        if query.text_tokens is None:
            tokens = model.text_tokens(query.ids.to(device), query.mask.to(device))  # None where the backend has none
            if tokens is not None:
                return Query(ids=query.ids, mask=query.mask, text_tokens=tokens)
        return query

    @torch.inference_mode()
    def score_tokens(self, query: Query, image_tokens: torch.Tensor) -> np.ndarray:
        """ITM logits of a text query against candidate image tokens (K, N, D_v), ``chunk`` at a
        time; the query's text tower runs once."""
        self._check()
        model, device = self.c.bundle.model, self.c.bundle.device
        query = self._with_text_tokens(query)
        q_ids, q_mask = query.ids.to(device), query.mask.to(device)
        extra = {} if query.text_tokens is None else {"text_tokens": query.text_tokens.to(device)}
        out = [
            model.itm_logits(image_tokens[start : start + self.chunk].to(device), q_ids, q_mask, **extra).float().cpu().numpy()
            for start in range(0, len(image_tokens), self.chunk)
        ]
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    @torch.inference_mode()
    def score_texts(self, image_tokens: torch.Tensor, texts: Sequence[str]) -> np.ndarray:
        """ITM logits of a query image's tokens (1, N, D_v) against candidate texts, ``chunk``
        at a time."""
        self._check()
        b = self.c.bundle
        out = []
        for start in range(0, len(texts), self.chunk):
            ids, mask = b.tokenizer(list(texts[start : start + self.chunk]))  # (c, L)
            out.append(b.model.itm_logits(image_tokens.to(b.device), ids.to(b.device), mask.to(b.device)).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0, np.float32)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def fuse(itc: np.ndarray, itm_logits: np.ndarray, fusion: str, itc_scale: float = 1.0, itm_weight: float = 1.0) -> np.ndarray:
    """The score candidates are sorted by: ITM logit + ITC logit, ITM alone, or ITC alone.

    ``itc_scale`` is the model's learned ITC logit scale (1 / temperature), which puts the
    cosine in logit units like the ITM logit. BLIP adds the raw cosine (``itc_scale=1``); with
    our models the ITM logits span several units and a raw cosine is drowned. Native models are
    trained to rank by this very sum (``models/losses.py``, ``itm_objective``); the README's
    model section compares the three. ``itm_weight`` scales the ITM logit in ``itm+itc``: a
    model's calibrated weight for the depth reranked (``Bundle.itm_weight``), which keeps
    reranking from costing ITC's R@5 / R@10.
    """
    if fusion == "itm+itc":
        return fused_score(itm_logits, itc, itc_scale, itm_weight)
    if fusion == "itm":
        return itm_logits
    if fusion == "itc":
        return itc
    raise ValueError(f"fusion must be one of {FUSIONS}; got {fusion!r}")


def rerank_order(itc: np.ndarray, itm_logits: np.ndarray, fusion: str, itc_scale: float = 1.0, itm_weight: float = 1.0) -> np.ndarray:
    """Indices of the candidates in final order (stable: ties keep the retrieval order)."""
    return np.argsort(-fuse(itc, itm_logits, fusion, itc_scale, itm_weight), kind="stable")


def finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else x
