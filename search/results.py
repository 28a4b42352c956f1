"""Result types: every score kept apart, plus where each hit stood before reranking."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

STAGES = ("encode", "filter", "retrieve", "rerank", "metadata")


@dataclass
class Hit:
    item_id: int  # SQL key = FAISS id
    external_id: str
    image_path: str
    text: str
    meta: dict[str, Any]
    itc: float  # cosine similarity in the ITC space
    itm: float | None  # ITM match probability (sigmoid of the logit); None when not reranked
    itm_logit: float | None
    fused: float  # the score the final order is sorted by
    retrieval_rank: int  # 1-based rank by ITC before reranking
    rank: int = 0  # 1-based final rank

    @property
    def moved(self) -> int:
        """Positions gained by reranking (positive: moved up)."""
        return self.retrieval_rank - self.rank


@dataclass
class SearchResult:
    hits: list[Hit]
    target: str  # image | text
    query_kind: str  # text | image | item
    k: int
    rerank_depth: int  # candidates actually reranked (0: ITC order)
    fusion: str
    timings_ms: dict[str, float] = field(default_factory=lambda: {s: 0.0 for s in STAGES})
    itm_weight: float = 1.0  # the ITM logit's weight in the fused score at this depth (the model's calibration)
    matching: int | None = None  # items that pass the filter (None: no filter)
    cache_misses: int = 0  # reranked images whose tokens were re-encoded
    notes: list[str] = field(default_factory=list)  # e.g. "only 3 items match the filter"

    def to_dict(self) -> dict:
        d = asdict(self)
        for h, hit in zip(d["hits"], self.hits):
            h["moved"] = hit.moved
        d["timings_ms"]["total"] = sum(self.timings_ms.values())
        return d
