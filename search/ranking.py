"""Exact ranks over a streamed gallery (pure numpy; tested against from-the-definitions
oracles and ir_measures in ``tests/test_evaluate.py``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from vtfusion.models.progress import progress as progress_bar

from .rerank import rerank_order

BLOCK = 8192  # gallery vectors per block of the ITC pass


@dataclass
class Rankings:
    """Each query's ranking at each depth, as far as the metrics and the run files need it."""

    depths: list[int]
    first: dict[int, np.ndarray]  # depth -> (Q,) 1-based rank of the first relevant item
    ndcg: dict[int, np.ndarray]  # depth -> (Q,) nDCG@10, binary relevance, every relevant item
    runs: dict[int, np.ndarray]  # depth -> (Q, keep) gallery keys of the stage's top ``keep`` (-1: none)

    def rr(self, depth: int) -> np.ndarray:
        return 1.0 / self.first[depth]


def top_k(sims: np.ndarray, keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top ``k`` of each row of ``sims`` (c, b) as (scores, keys) (c, min(k, b)), score
    descending, ties to the lower key (``keys`` (b,) ascending); argpartition, then a full sort
    only of the rows where a tie straddles the cut and of the k kept."""
    c, nb = sims.shape
    kk = min(k, nb)
    if kk < nb:
        part = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
        kth = np.take_along_axis(sims, part, 1).min(axis=1)
        for r in np.flatnonzero((sims >= kth[:, None]).sum(axis=1) > kk):  # a tie straddles the cut: lowest keys win
            part[r] = np.argsort(-sims[r], kind="stable")[:kk]
    else:
        part = np.broadcast_to(np.arange(nb), (c, nb))
    s, kb = np.take_along_axis(sims, part, 1), keys[part]
    o = np.lexsort((kb, -s), axis=-1)
    return np.take_along_axis(s, o, 1), np.take_along_axis(kb, o, 1)


def _merge_top(ts: np.ndarray, tk: np.ndarray, sims: np.ndarray, keys: np.ndarray, k: int) -> None:
    """Merge a block's scores (c, b) with keys (b,) ascending, all above the keys already in
    the running top (c, k) lists ``ts``/``tk`` (score descending, key ascending among ties),
    in place."""
    s, kb = top_k(sims, keys, k)
    ms, mk = np.concatenate([ts, s], axis=1), np.concatenate([tk, kb], axis=1)
    o = np.argsort(-ms, axis=1, kind="stable")[:, : ts.shape[1]]  # stable: the running top's (lower) keys first among ties
    ts[:] = np.take_along_axis(ms, o, 1)
    tk[:] = np.take_along_axis(mk, o, 1)


def rank_queries(
    q_emb: np.ndarray,
    blocks: Iterable[tuple[np.ndarray, np.ndarray]],
    relevant: Sequence[tuple[np.ndarray, np.ndarray]],
    depths: Sequence[int],
    fusion: str,
    itm_fn: Callable[[int, np.ndarray], np.ndarray] | None,
    itc_scale: float = 1.0,
    chunk: int = 256,
    keep: int = 0,
    progress: bool = False,
    name: str = "",
    n_blocks: int | None = None,
    itm_weight: Callable[[int], float] | None = None,
) -> Rankings:
    """Exact ranks of every query's relevant items at every depth, in one pass over the gallery.

    ``blocks`` yields the gallery as (keys (b,) int64, vectors (b, E) float32), keys ascending
    across blocks: the key order is the tie order. ``relevant[q]`` is (keys, vectors) of query
    q's relevant items. One pass keeps each query's ITC top ``k = max(depths, 10, keep)`` and,
    for its best relevant items, the count of gallery items scored above them; an item inside
    a window of float32 rounding error around its score is compared again with the score the
    pass computed (that window is the bound E * 2^-24 * |q| |v| on a float32 dot product, times
    four), so a rank past every list is exact, not an estimate. ``itm_fn(q, candidate keys) ->
    ITM logits`` is called once per query for its top ``max(depths)``; depth d reorders the top
    d by the fused score, the ITM logit weighted by ``itm_weight(d)`` (1 when None). ``keep``:
    how many of each stage's ranking ``runs`` holds.
    """
    depths = sorted(set(int(d) for d in depths))
    max_d = max(depths)
    nq, dim = q_emb.shape
    k = max(max_d, 10, keep)
    top_s = np.full((nq, k), -np.inf, np.float32)
    top_k = np.full((nq, k), -1, np.int64)
    unit = dim * 2.0**-24 * 4
    qnorm = np.linalg.norm(q_emb.astype(np.float64), axis=1)
    cq, ck, cs, ce = [], [], [], []  # the candidates for each query's best relevant item
    for q, (keys, vecs) in enumerate(relevant):
        if not len(keys):
            raise ValueError(f"query {q} has no relevant item in the gallery")
        s64 = vecs.astype(np.float64) @ q_emb[q].astype(np.float64)
        eps = unit * qnorm[q] * np.linalg.norm(vecs.astype(np.float64), axis=1) + 1e-30
        best = s64 >= s64.max() - 2 * eps.max()
        cq += [q] * int(best.sum())
        ck += keys[best].tolist()
        cs += s64[best].tolist()
        ce += eps[best].tolist()
    cq, ck, cs, ce = np.array(cq, np.int64), np.array(ck, np.int64), np.array(cs), np.array(ce)
    above = np.zeros(len(cq), np.int64)
    s_pass = np.full(len(cq), np.nan)
    near: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for keys, vecs in progress_bar(blocks, desc=f"eval {name} ITC", unit="block", total=n_blocks, enabled=progress):
        keys = np.asarray(keys, np.int64)
        for a in range(0, nq, chunk):
            b = min(nq, a + chunk)
            sims = q_emb[a:b] @ vecs.T  # (c, block): the only scores, one block at a time
            _merge_top(top_s[a:b], top_k[a:b], sims, keys, k)
            lo, hi = np.searchsorted(cq, a), np.searchsorted(cq, b)
            if hi == lo:
                continue
            rows = sims[cq[lo:hi] - a].astype(np.float64)  # (candidates, block)
            above[lo:hi] += (rows > (cs[lo:hi] + ce[lo:hi])[:, None]).sum(axis=1)
            r, col = np.nonzero(np.abs(rows - cs[lo:hi, None]) <= ce[lo:hi, None])
            near.append((r + lo, rows[r, col], keys[col]))
            pos = np.minimum(np.searchsorted(keys, ck[lo:hi]), len(keys) - 1)
            here = keys[pos] == ck[lo:hi]
            s_pass[lo:hi][here] = rows[np.flatnonzero(here), pos[here]]
    if np.isnan(s_pass).any():
        raise ValueError(f"relevant items not in the gallery: keys {ck[np.isnan(s_pass)][:5].tolist()}")
    if np.any(np.abs(s_pass - cs) > ce):  # the float32 error bound failed: never guess a rank
        raise RuntimeError("a score moved past its float32 error bound between two computations; ranks not computed")
    deep = above + 1
    if near:
        nr, ns, nk = (np.concatenate(x) for x in zip(*near))
        ahead = (nk != ck[nr]) & ((ns > s_pass[nr]) | ((ns == s_pass[nr]) & (nk < ck[nr])))
        deep += np.bincount(nr[ahead], minlength=len(cq))
    deep_rank = np.full(nq, np.iinfo(np.int64).max)
    np.minimum.at(deep_rank, cq, deep)

    discount = 1.0 / np.log2(np.arange(2, 12))  # ranks 1..10
    first = {d: np.zeros(nq, np.int64) for d in depths}
    ndcg = {d: np.zeros(nq) for d in depths}
    runs = {d: np.full((nq, keep), -1, np.int64) for d in depths} if keep else {}
    for q in progress_bar(range(nq), desc=f"eval {name} ITM", unit="query", enabled=progress and max_d > 0):
        valid = int((top_k[q] >= 0).sum())
        keys_q, itc_q = top_k[q, :valid], top_s[q, :valid]
        is_rel = np.isin(keys_q, relevant[q][0])
        itm = itm_fn(q, keys_q[:max_d]) if max_d and valid else np.zeros(0, np.float32)
        idcg = discount[: min(10, len(relevant[q][0]))].sum()
        for d in depths:
            dd = min(d, valid)
            order = np.arange(valid)
            if dd:
                order[:dd] = rerank_order(itc_q[:dd], itm[:dd], fusion, itc_scale, itm_weight(d) if itm_weight else 1.0)
            rel_pos = np.flatnonzero(is_rel[order]) + 1
            first[d][q] = rel_pos[0] if len(rel_pos) else deep_rank[q]
            ndcg[d][q] = discount[rel_pos[rel_pos <= 10] - 1].sum() / idcg
            if keep:
                n = min(keep, valid)
                runs[d][q, :n] = keys_q[order[:n]]
    return Rankings(depths, first, ndcg, runs)


def array_blocks(emb: np.ndarray, block: int = BLOCK):
    """An in-memory gallery as ``rank_queries`` blocks: keys are row positions."""
    for start in range(0, len(emb), block):
        yield np.arange(start, min(len(emb), start + block), dtype=np.int64), emb[start : start + block]


def rank_direction(
    q_emb: np.ndarray,
    db_emb: np.ndarray,
    db_groups: np.ndarray,
    q_targets: np.ndarray,
    depths: Sequence[int],
    fusion: str,
    itm_fn,
    chunk: int = 256,
    progress: bool = False,
    name: str = "",
    itc_scale: float = 1.0,
    itm_weight: Callable[[int], float] | None = None,
) -> tuple[dict[int, list[int]], dict[int, list[float]], dict[int, dict[str, float]]]:
    """``rank_queries`` on an in-memory gallery whose relevant items are those of group
    ``q_targets[q]`` (one image for text -> image; all of an image's captions for image ->
    text), ties by gallery position. Returns, per depth, the first relevant ranks, nDCG@10 and
    per-query reciprocal ranks (keyed by the query's position as a string)."""
    where: dict[int, list[int]] = {}
    for j, g in enumerate(np.asarray(db_groups).tolist()):
        where.setdefault(g, []).append(j)
    relevant = []
    for t in np.asarray(q_targets).tolist():
        pos = np.array(where.get(t, []), np.int64)
        relevant.append((pos, db_emb[pos]))
    r = rank_queries(q_emb, array_blocks(db_emb), relevant, depths, fusion, itm_fn, itc_scale, chunk, 0, progress, name,
                     -(-len(db_emb) // BLOCK), itm_weight)
    return ({d: r.first[d].tolist() for d in r.depths}, {d: r.ndcg[d].tolist() for d in r.depths},
            {d: {str(q): float(x) for q, x in enumerate(r.rr(d))} for d in r.depths})
