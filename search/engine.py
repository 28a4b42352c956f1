"""Two-stage search: ITC retrieval from FAISS (optionally filtered), then ITM reranking.

    engine = SearchEngine(Collection.open(path))
    result = engine.search("red striped mug", target="image", k=10, where="price < 20", rerank_depth=64)

Query is a text, an image (PIL image or path), or ``ItemQuery(id)`` for an indexed item (its
image is the query; the item itself is left out of its own results). Cross-modal searches
(text -> image, image -> text) can be reranked; same-modality searches have no image-text pair
to score and stay in ITC order (a note says so).
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vtfusion.indexer import filters
from vtfusion.indexer.collection import Collection
from vtfusion.indexer.store import ItemStatus
from vtfusion.models.preprocess import ImageError

from .ranking import top_k
from .rerank import FUSIONS, ITMScorer, Query, Scorer, fuse, rerank_order, sigmoid
from .results import STAGES, Hit, SearchResult

EXACT_FILTER_MAX = 20_000  # allowed sets up to this size are searched exhaustively (exact)
ALLOWED_CACHE = 32  # filter expressions whose id sets are kept


@dataclass(frozen=True)
class ItemQuery:
    item_id: str | int  # the catalog's external id or "#<item id>" (a str), or an item id (an int)


class SearchError(ValueError):
    """A search that cannot run as asked (unknown item, bad target or fusion, bad filter)."""


class SearchEngine:
    def __init__(self, collection: Collection, scorer: Scorer | None = None, chunk: int = 64, refresh: bool = True):
        """``refresh``: before each search, apply changes other processes committed (one SQL
        query when there are none)."""
        self.c = collection
        self.refresh = refresh
        self.scorer = scorer or ITMScorer(collection, chunk=chunk)
        self._allowed_cache: dict[tuple[str, int], np.ndarray] = {}  # (where, last change) -> ids, oldest first
        self._cache_lock = threading.Lock()

    # ---- stage 0: the query ----------------------------------------------------------

    @torch.no_grad()
    def _encode(self, query) -> tuple[str, str, np.ndarray, Query, int | None]:
        """-> (query kind, query modality, xq (1, E), ITM query, excluded item id)."""
        b = self.c.bundle
        if isinstance(query, ItemQuery):
            try:
                item_id = self.c.store.resolve_item(query.item_id)
            except LookupError as e:
                raise SearchError(str(e)) from e
            vec = self.c.store.active_vector(item_id, "image")
            if vec is None:
                raise SearchError(f"no active item with id {query.item_id!r}")
            tokens, _ = self.c.item_tokens([item_id])  # (1, N, D_v), re-encoded when not cached
            return "item", "image", vec[None, :], Query(image_tokens=tokens), item_id
        if isinstance(query, (Image.Image, Path)):
            try:
                img = b.transform.load(query)
            except ImageError as e:  # not an image, a format outside the allowlist, a bomb
                raise SearchError(str(e)) from e
            emb, tokens = b.embed_images([img])  # (1, E), (1, N, D_v)
            return "image", "image", emb.float().cpu().numpy(), Query(image_tokens=tokens.float().cpu()), None
        if isinstance(query, str):
            if not query.strip():
                raise SearchError("empty text query")
            ids, mask = b.tokenizer([query])
            # the text tokens (None where the backend has none to reuse) go to the reranker
            emb, tokens = b.model.encode_text(ids.to(b.device), mask.to(b.device), return_tokens=True)
            return "text", "text", emb.float().cpu().numpy(), Query(ids=ids, mask=mask, text_tokens=tokens), None
        raise SearchError(f"a query is a text, an image, a path to one, or ItemQuery(id); got {type(query).__name__}")

    # ---- stage 1: filter + retrieve ----------------------------------------------------

    def _allowed(self, where: str | None) -> np.ndarray | None:
        """Active item ids matching ``where`` (None: no filter). The id set of each expression is
        kept until the next change to the collection (facet filters repeat across queries)."""
        if not where:
            return None
        key = (where.strip(), self.c.store.last_change())
        with self._cache_lock:
            hit = self._allowed_cache.get(key)
        if hit is not None:
            return hit
        ids = self.c.store.active_ids(where)
        ids.flags.writeable = False
        with self._cache_lock:  # searches run in threads (one engine serves the web app)
            if len(self._allowed_cache) >= ALLOWED_CACHE:
                self._allowed_cache.pop(next(iter(self._allowed_cache)))
            self._allowed_cache[key] = ids
        return ids

    def _retrieve(
        self, target: str, xq: np.ndarray, n: int, allowed: np.ndarray | None, nprobe: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top n (scores, ids) by ITC among ``allowed`` (all when None); ids -1 where fewer exist.
        ``nprobe``: IVF lists to probe (default: the collection's)."""
        index = self.c.indexes[target]
        if allowed is None or index.factory == "Flat":
            D, I = index.search(xq, n, allowed, nprobe=nprobe)
            return D[0], I[0]
        nlist = index.nlist
        if len(allowed) <= EXACT_FILTER_MAX:
            if index.factory.startswith("IVF") and index.factory.endswith(",Flat"):
                # probing every list of an IVF,Flat index is exact; the selector skips the
                # distance work for ids outside the allowed set
                D, I = index.search(xq, n, allowed, nprobe=nlist)
                return D[0], I[0]
            ids, xb = self.c.store.vectors(target, allowed)  # other factories (lossy codes): exact over the stored vectors
            top_s, top_i = top_k(xq @ xb.T, ids, n)  # ties: the lower id first
            return top_s[0], top_i[0]
        # large allowed set: ANN with the id selector. Probe lists in inverse proportion to the
        # share of items allowed (so as many allowed vectors are scanned as an unfiltered search
        # scans), then keep probing more until enough survive.
        want = min(n, len(allowed))
        base = nprobe or index.nprobe
        nlist = nlist or base
        share = len(allowed) / max(1, index.ntotal)
        nprobe = min(nlist, max(base, int(np.ceil(base / max(share, 1e-9)))))
        while True:
            D, I = index.search(xq, n, allowed, nprobe=nprobe)
            if (I[0] >= 0).sum() >= want or nprobe >= nlist:
                return D[0], I[0]
            nprobe = min(nlist, nprobe * 4)

    # ---- the whole search ------------------------------------------------------------

    def search(
        self,
        query,
        target: str = "image",
        k: int = 10,
        where: str | None = None,
        rerank_depth: int = 32,
        fusion: str = "itm+itc",
        within: np.ndarray | None = None,
        nprobe: int | None = None,
    ) -> SearchResult:
        """``within``: restrict to these item ids as well (e.g. an evaluation set). ``nprobe``:
        IVF lists to probe (default: the collection's ``nprobe``; more is slower and closer to exact)."""
        if target not in ("image", "text"):
            raise SearchError(f"target must be 'image' or 'text'; got {target!r}")
        if fusion not in FUSIONS:
            raise SearchError(f"fusion must be one of {FUSIONS}; got {fusion!r}")
        if k < 1 or rerank_depth < 0:
            raise SearchError("k must be >= 1 and rerank depth >= 0")
        if nprobe is not None and nprobe < 1:
            raise SearchError(f"nprobe must be at least 1; got {nprobe}")
        timings = dict.fromkeys(STAGES, 0.0)
        with _timed(timings, "encode"):
            if self.refresh:
                self.c.refresh()  # another process may have ingested or deleted since the last search
            kind, modality, xq, itm_query, exclude = self._encode(query)
        res = SearchResult([], target, kind, k, 0, fusion)
        res.timings_ms = timings
        with _timed(timings, "filter"):
            allowed = self._filter(where, within, exclude)
            res.matching = None if allowed is None else int(len(allowed))
        with _timed(timings, "retrieve"):
            scores, ids = self._candidates(target, xq, max(k, rerank_depth), allowed, exclude, nprobe)
        with _timed(timings, "rerank"):
            scale = float(self.c.bundle.model.logit_scale_value().detach())  # ITC cosine -> ITM logit units
            order, logits = self._rerank(res, itm_query, modality, scores, ids, rerank_depth, scale)
        with _timed(timings, "metadata"):
            self._hydrate(res, scores, ids, order, logits, scale)
        if len(res.hits) < k:
            if allowed is not None:
                res.notes.append(f"only {res.matching} items match the filter; {len(res.hits)} returned")
            else:
                res.notes.append(f"the {target} index holds only {len(res.hits)} items")
        return res

    # ---- the stages ------------------------------------------------------------------

    def _filter(self, where: str | None, within, exclude: int | None) -> np.ndarray | None:
        """The item ids a search may return (None: all): the filter, ``within``, not the query item."""
        try:
            allowed = self._allowed(where)
        except filters.FilterError as e:
            raise SearchError(str(e)) from e
        if within is not None:
            within = np.asarray(within, dtype=np.int64)
            allowed = within if allowed is None else np.intersect1d(allowed, within)
        if allowed is not None and exclude is not None:
            allowed = allowed[allowed != exclude]
        return allowed

    def _candidates(self, target: str, xq: np.ndarray, n: int, allowed, exclude: int | None, nprobe: int | None):
        """The top ``n`` (ITC scores, ids) by retrieval, the query item and index padding left out."""
        scores, ids = self._retrieve(target, xq, n + (1 if exclude is not None else 0), allowed, nprobe)
        keep = (ids >= 0) & (ids != (exclude if exclude is not None else -2))
        return scores[keep][:n], ids[keep][:n]

    def _rerank(self, res: SearchResult, itm_query: Query, modality: str, scores: np.ndarray, ids: np.ndarray,
                rerank_depth: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
        """ITM logits of the top ``rerank_depth`` candidates and the final order (the rest keep
        ITC order); sets ``res.rerank_depth`` and notes why nothing was reranked."""
        cross = modality != res.target
        ready = getattr(self.scorer, "ready", True)  # ITMScorer: False for a model without a trained ITM head
        depth = min(rerank_depth, len(ids)) if cross and res.fusion != "itc" and ready else 0
        logits = np.full(len(ids), np.nan, dtype=np.float32)
        order = np.arange(len(ids))
        if depth:
            misses = getattr(self.scorer, "misses", 0)
            logits[:depth] = self.scorer.score(itm_query, ids[:depth].tolist())
            res.itm_weight = self.c.bundle.itm_weight(depth)
            order[:depth] = rerank_order(scores[:depth], logits[:depth], res.fusion, scale, res.itm_weight)
            res.cache_misses = getattr(self.scorer, "misses", 0) - misses
        elif rerank_depth and not cross:
            res.notes.append(f"{modality} -> {res.target} has no image-text pair to rerank: ITC order")
        elif rerank_depth and res.fusion != "itc" and not ready:
            res.notes.append(
                f"the model {self.c.config.model} has no trained ITM head (CLIP towers alone): ITC order; "
                "train fusion layers with `vtfusion train --init-from clip:…` to rerank"
            )
        res.rerank_depth = depth
        return order, logits

    def _hydrate(self, res: SearchResult, scores: np.ndarray, ids: np.ndarray, order: np.ndarray, logits: np.ndarray,
                 scale: float) -> None:
        """The top k of ``order`` as hits with their items' metadata; an item deleted or replaced
        after the index was read (a concurrent writer) is never shown."""
        final = order[: res.k]
        items = self.c.store.items(ids[final].tolist())
        gone = [int(ids[j]) for j in final if int(ids[j]) not in items or items[int(ids[j])].status != ItemStatus.ACTIVE]
        if gone:
            final = [j for j in final if int(ids[j]) not in gone]
            res.notes.append(f"{len(gone)} hits were deleted or replaced while this search ran and are left out")
        for rank, j in enumerate(final, 1):
            it = items[int(ids[j])]
            reranked = j < res.rerank_depth
            res.hits.append(
                Hit(
                    item_id=it.id,
                    external_id=it.external_id,
                    image_path=it.image_path,
                    text=it.text,
                    meta=dict(it.meta),
                    itc=float(scores[j]),
                    itm=float(sigmoid(logits[j])) if reranked else None,
                    itm_logit=float(logits[j]) if reranked else None,
                    fused=float(fuse(scores[j : j + 1], logits[j : j + 1], res.fusion, scale, res.itm_weight)[0]) if reranked else float(scores[j]),
                    retrieval_rank=int(j) + 1,
                    rank=rank,
                )
            )


@contextmanager
def _timed(timings: dict[str, float], stage: str):
    """Record the stage's wall time in ms under ``stage``."""
    t = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = (time.perf_counter() - t) * 1000.0
