"""Two-stage search: fake-scorer reordering, chunked == unchunked ITM, filters (exactness and
recall at 1/10/100 % selectivity), item and image queries, clean errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sqlalchemy import select

from vtfusion.indexer.collection import Collection
from vtfusion.indexer.ingest import ingest
from vtfusion.indexer.lifecycle import reindex
from vtfusion.indexer.schema import Change, Embedding, Item, MetaColumn
from vtfusion.search.engine import ItemQuery, SearchEngine, SearchError
from vtfusion.search.rerank import ITMScorer, Query


@pytest.fixture(scope="module")
def col(tmp_path_factory, model_dir, small_catalog):
    c = Collection.init(tmp_path_factory.mktemp("col") / "c", model_dir)
    ingest(c, small_catalog / "train.csv", workers=0, progress=False)
    ingest(c, small_catalog / "test.csv", workers=0, progress=False)
    return c


class FakeScorer:
    """Scores candidates by a fixed table: the reranker must follow it exactly."""

    def __init__(self, table):
        self.table, self.calls = table, []

    def score(self, query, candidate_ids):
        self.calls.append(list(candidate_ids))
        return np.array([self.table[i] for i in candidate_ids], dtype=np.float32)


def test_fake_scorer_reorders_exactly(col):
    base = SearchEngine(col).search("a red mug", k=8, rerank_depth=0)
    ids = [h.item_id for h in base.hits]
    table = {i: float(r) * 100.0 for r, i in enumerate(ids)}  # reverse the ITC order, by a wide margin
    fake = FakeScorer(table)
    res = SearchEngine(col, scorer=fake).search("a red mug", k=8, rerank_depth=8, fusion="itm")
    assert fake.calls == [ids]
    assert [h.item_id for h in res.hits] == ids[::-1]
    assert [h.retrieval_rank for h in res.hits] == list(range(8, 0, -1))
    assert [h.moved for h in res.hits] == [7, 5, 3, 1, -1, -3, -5, -7]
    # itm+itc adds the cosine; itc ignores the scorer
    res = SearchEngine(col, scorer=FakeScorer(table)).search("a red mug", k=8, rerank_depth=8, fusion="itc")
    assert [h.item_id for h in res.hits] == ids


def test_depth_shorter_than_k_keeps_the_tail_in_itc_order(col):
    base = SearchEngine(col).search("a blue bag", k=10, rerank_depth=0)
    ids = [h.item_id for h in base.hits]
    table = {i: float(r) for r, i in enumerate(ids)}
    res = SearchEngine(col, scorer=FakeScorer(table)).search("a blue bag", k=10, rerank_depth=4, fusion="itm")
    assert [h.item_id for h in res.hits] == ids[:4][::-1] + ids[4:]
    assert all(h.itm is None for h in res.hits[4:]) and all(h.itm is not None for h in res.hits[:4])


def test_chunked_itm_scoring_equals_unchunked(col):
    with col.Session() as s:
        ids = s.scalars(select(Item.id).order_by(Item.id)).all()
    b = col.bundle
    q_ids, q_mask = b.tokenizer(["a large red striped mug to the left of a small blue sneaker"])
    text_q = Query(ids=q_ids, mask=q_mask)
    one = ITMScorer(col, chunk=1000).score(text_q, ids)
    chunked = ITMScorer(col, chunk=7).score(text_q, ids)
    np.testing.assert_allclose(chunked, one, rtol=1e-5, atol=1e-5)
    # and both equal the model's own call, pair by pair (the naive oracle)
    tokens = torch.from_numpy(col.tokens.read([(s_, o) for s_, o in _locs(col, ids[:5])]))
    naive = torch.stack([b.model.itm_logits(tokens[i : i + 1], q_ids, q_mask)[0] for i in range(5)])
    np.testing.assert_allclose(one[:5], naive.detach().numpy(), rtol=1e-4, atol=1e-4)
    # image query against candidate texts
    img_q = Query(image_tokens=tokens[:1])
    np.testing.assert_allclose(ITMScorer(col, chunk=3).score(img_q, ids), ITMScorer(col, chunk=500).score(img_q, ids), rtol=1e-5, atol=1e-5)


def _locs(col, ids):
    with col.Session() as s:
        rows = {r.id: (r.token_shard, r.token_offset) for r in s.execute(select(Item.id, Item.token_shard, Item.token_offset).where(Item.id.in_(ids)))}
    return [rows[i] for i in ids]


def test_cache_miss_re_encodes_and_is_counted(col):
    with col.Session() as s:
        ids = s.scalars(select(Item.id).order_by(Item.id).limit(4)).all()
    b = col.bundle
    q = Query(*b.tokenizer(["a green hat"]))
    cached = ITMScorer(col).score(q, ids)
    with col.Session.begin() as s:
        saved = {i.id: (i.token_shard, i.token_offset) for i in s.scalars(select(Item).where(Item.id.in_(ids[:2])))}
        for i in s.scalars(select(Item).where(Item.id.in_(ids[:2]))):
            i.token_shard = i.token_offset = None
    try:
        scorer = ITMScorer(Collection.open(col.folder))  # a fresh process's view (``col`` keeps the locations it read)
        again = scorer.score(q, ids)
        assert scorer.misses == 2
        np.testing.assert_allclose(again, cached, atol=2e-2)  # fp16 cache vs fresh fp32 tokens
    finally:
        with col.Session.begin() as s:
            for i in s.scalars(select(Item).where(Item.id.in_(ids[:2]))):
                i.token_shard, i.token_offset = saved[i.id]


def test_token_locations_are_read_from_sql_once(col):
    from sqlalchemy import event

    c = Collection.open(col.folder)
    with c.Session() as s:
        ids = s.scalars(select(Item.id).order_by(Item.id).limit(6)).all()
    statements = []
    event.listen(c.engine, "before_cursor_execute", lambda conn, cur, stmt, params, *rest: statements.append(params))
    first, misses = c.item_tokens(ids[:4])
    assert misses == 0 and len(statements) == 1
    again, _ = c.item_tokens(list(reversed(ids)))  # four known, two new: one query for the two
    assert len(statements) == 2 and sorted(statements[1]) == sorted(ids[4:])
    torch.testing.assert_close(again[2:], first.flip(0))
    c.item_tokens(ids)
    assert len(statements) == 2  # all known now: no SQL
    with pytest.raises(KeyError, match="no items"):
        c.item_tokens([ids[0], 10**9])


def test_filtered_search_returns_only_matching_items(col):
    res = SearchEngine(col).search("a mug", k=5, where="color IN ('red', 'blue') AND price >= 0", rerank_depth=8)
    assert res.hits and all(h.meta["color"] in ("red", "blue") for h in res.hits)
    assert res.matching is not None and res.matching >= len(res.hits)
    res = SearchEngine(col).search("a mug", k=50, where="color = 'red'", rerank_depth=0)
    assert len(res.hits) == res.matching < 50 and res.notes and "match the filter" in res.notes[0]


def test_query_by_item_and_image_to_text(col, small_catalog):
    with col.Session() as s:
        item = s.scalars(select(Item).order_by(Item.id).limit(1)).one()
    res = SearchEngine(col).search(ItemQuery(item.id), target="image", k=5)
    assert item.id not in [h.item_id for h in res.hits] and len(res.hits) == 5
    assert res.query_kind == "item" and res.rerank_depth == 0 and res.notes  # image -> image: no ITM
    res = SearchEngine(col).search(ItemQuery(item.id), target="text", k=5, rerank_depth=16)
    assert res.rerank_depth == 16 and all(h.itm is not None for h in res.hits)
    from pathlib import Path

    res = SearchEngine(col).search(Path(item.image_path), target="text", k=3, rerank_depth=8)
    assert res.query_kind == "image" and len(res.hits) == 3 and all(0 <= h.itm <= 1 for h in res.hits)
    assert set(res.timings_ms) == {"encode", "filter", "retrieve", "rerank", "metadata"}


@pytest.mark.parametrize(
    "where,msg",
    [("colour = 'red'", "unknown column"), ("color = 'x' OR 1=1; DROP TABLE items --", "unexpected character"),
     ("price > 'abc'", "holds numbers"), ("color =", "expected a value")],
)
def test_bad_filters_fail_cleanly(col, where, msg):
    with pytest.raises(SearchError, match=msg):
        SearchEngine(col).search("a mug", where=where)
    with col.Session() as s:
        assert s.scalar(select(Item.id).limit(1)) is not None


def test_bad_arguments(col):
    with pytest.raises(SearchError, match="target"):
        SearchEngine(col).search("x", target="video")
    with pytest.raises(SearchError, match="fusion"):
        SearchEngine(col).search("x", fusion="sum")
    with pytest.raises(SearchError, match="no active item"):
        SearchEngine(col).search(ItemQuery(10**9))


# ---- filtered ANN recall on a synthetic collection of clustered vectors ------------------------


def _clustered(n, d, k, seed):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d))
    x = centers[rng.integers(0, k, n)] + 0.35 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def big(tmp_path_factory, model_dir):
    """40,000 items with clustered embeddings written straight to SQL, indexed with IVF."""
    c = Collection.init(tmp_path_factory.mktemp("big") / "c", model_dir, index_factory="auto")
    E = c.config.embed_dim
    xb = _clustered(40_000, E, 300, seed=1)
    rng = np.random.default_rng(2)
    bucket = rng.integers(0, 100, len(xb))  # bucket < 1: 1 %, < 10: 10 %
    with c.Session.begin() as s:
        s.add(MetaColumn(name="bucket", kind="number"))
        s.add_all(
            Item(id=i + 1, source="synthetic", external_id=f"s{i}", image_path="", text="", content_hash=f"h{i}",
                 meta={"bucket": int(bucket[i])}, status="active")
            for i in range(len(xb))
        )
        s.flush()
        s.add_all(Embedding(item_id=i + 1, modality="image", vector=xb[i].tobytes()) for i in range(len(xb)))
        s.add_all(Change(item_id=i + 1, op="add") for i in range(len(xb)))
    reindex(c)
    assert c.indexes["image"].factory.startswith("IVF")
    return c, xb, bucket


@pytest.mark.parametrize("path", ["exact-small-sets", "ann-selector"])
@pytest.mark.parametrize("where,share", [("bucket < 1", 0.01), ("bucket < 10", 0.10), (None, 1.0)])
def test_filtered_recall_at_10_vs_exact(big, where, share, path, monkeypatch):
    import vtfusion.search.engine as engine_mod

    if path == "ann-selector":  # push every filtered search through IVF + id selector + re-probing
        monkeypatch.setattr(engine_mod, "EXACT_FILTER_MAX", 0)
    c, xb, bucket = big
    engine = SearchEngine(c)
    xq = _clustered(50, xb.shape[1], 300, seed=3)
    allowed = engine._allowed(where)
    mask = np.ones(len(xb), bool) if where is None else (bucket < (1 if share == 0.01 else 10))
    assert (allowed is None and where is None) or len(allowed) == mask.sum()
    recalls = []
    for q in xq:
        _, got = engine._retrieve("image", q[None, :], 10, allowed)
        sims = xb @ q
        sims[~mask] = -np.inf
        exact = np.argsort(-sims)[:10] + 1
        assert np.isin(got, exact).sum() <= 10 and (mask[got[got > 0] - 1]).all()  # only matching items
        recalls.append(len(set(got.tolist()) & set(exact.tolist())) / 10)
    assert np.mean(recalls) >= 0.95, (where, np.mean(recalls))
    if path == "exact-small-sets" and where is not None:  # all lists probed: exact, not approximate
        assert np.mean(recalls) == 1.0


def test_filter_id_sets_are_reused_until_the_collection_changes(big):
    from vtfusion.indexer.lifecycle import delete

    c, xb, bucket = big
    engine = SearchEngine(c)
    first = engine._allowed("bucket < 1")
    assert engine._allowed("bucket < 1") is first  # cached: no second SQL scan
    victim = int(first[0])
    try:
        delete(c, [victim])
        again = engine._allowed("bucket < 1")
        assert victim not in again and len(again) == len(first) - 1
    finally:
        with c.Session.begin() as s:  # restore for the other tests (status back, index caught up)
            s.get(Item, victim).status = "active"
            s.add(Change(item_id=victim, op="add"))
        c.catch_up()


def test_itm_plus_itc_adds_the_itc_logit(col):
    """Default fusion: ITM logit + (learned ITC scale x cosine), both in logit units."""
    base = SearchEngine(col).search("a red mug", k=8, rerank_depth=0)
    ids = [h.item_id for h in base.hits]
    itc = np.array([h.itc for h in base.hits])
    table = {i: float(v) for i, v in zip(ids, np.linspace(0.0, 0.3, 8))}  # small nudges up the list
    res = SearchEngine(col, scorer=FakeScorer(table)).search("a red mug", k=8, rerank_depth=8)
    scale = float(col.bundle.model.logit_scale_value().detach())
    expect = [ids[j] for j in np.argsort(-(np.array([table[i] for i in ids]) + scale * itc), kind="stable")]
    assert [h.item_id for h in res.hits] == expect
    np.testing.assert_allclose([h.fused for h in res.hits], [table[i] + scale * h.itc for i, h in zip(expect, res.hits)], rtol=1e-5)
