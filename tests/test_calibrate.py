"""Recall-safe reranking (models/calibrate.py): the ITM weight per depth is chosen on held-out
pairs so that reranking never costs ITC's R@5 / R@10 there, and search uses it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from vtfusion.models import factory
from vtfusion.models.calibrate import WEIGHTS, Candidates, candidate_scores, choose_weights, recall
from vtfusion.models.config import ModelConfig
from vtfusion.models.fusion import weight_at
from vtfusion.search.ranking import rank_direction

SCALE = 20.0


def _constructed(n: int, seed: int) -> dict[str, Candidates]:
    """Queries whose partner ITC ranks 1-12 and ITM helps a little, while ITM is confidently
    wrong about eight items deep in each list (ITC ranks 30-63): reranking 64 deep by the plain
    sum pulls those above the partner."""
    rng = np.random.default_rng(seed)
    d = 64
    out = {}
    for name in ("t2i", "i2t"):
        cos = np.sort(rng.uniform(0.2, 0.6, (n, d)).astype(np.float32), axis=1)[:, ::-1].copy()  # ITC order
        pos = rng.integers(0, 12, n)
        itm = rng.normal(0.0, 0.5, (n, d)).astype(np.float32)
        itm[np.arange(n), pos] += 1.0  # ITM prefers the partner a little...
        for q in range(n):
            itm[q, rng.choice(np.arange(30, d), 8, replace=False)] = 10.0  # ...but eight deep strangers a lot
        out[name] = Candidates(cos, itm, pos, pos + 1)
    return out


def test_plain_sum_costs_r10_deep_in_the_list_and_the_calibrated_weight_does_not():
    cal, test = _constructed(200, seed=0), _constructed(400, seed=1)
    itc = {k: recall(c.itc_rank) for k, c in test.items()}
    plain = {k: recall(c.ranks(64, 1.0, SCALE)) for k, c in test.items()}
    assert all(plain[k][10] < itc[k][10] - 5 for k in test)  # the failure: R@10 falls below ITC's
    chosen = choose_weights(cal, SCALE, depths=(16, 64))
    w64 = chosen["weights"]["64"]
    assert 0 < w64 < 1.0  # not the plain sum, and not reranking switched off
    for k, c in test.items():  # on pairs the choice never saw
        after = recall(c.ranks(64, w64, SCALE))
        assert after[5] >= itc[k][5] and after[10] >= itc[k][10]
        assert after[1] > itc[k][1]  # and the reranker still lifts R@1
    # at depth 16 the strangers are out of reach: the plain sum is safe there
    assert chosen["weights"]["16"] == 1.0
    assert set(chosen["table"]["64"]["tried"]) == {str(w) for w in WEIGHTS}


def test_ranks_equal_the_evaluation_ranking_oracle():
    """Candidates.ranks (used to choose weights) ranks as search's evaluation does."""
    rng = np.random.default_rng(3)
    n, g, d, w = 30, 50, 16, 0.4
    q = rng.standard_normal((n, 8)).astype(np.float32)
    db = rng.standard_normal((g, 8)).astype(np.float32)
    itm_table = rng.normal(0, 2, (n, g)).astype(np.float32)
    targets = rng.integers(0, g, n)
    first, _, _ = rank_direction(q, db, np.arange(g), targets, [d], "itm+itc", lambda qi, cand: itm_table[qi, cand],
                                 itc_scale=SCALE, itm_weight=lambda depth: w)
    sim = q @ db.T
    order = np.argsort(-sim, axis=1, kind="stable")
    itc_rank = 1 + np.argmax(order == targets[:, None], axis=1)
    top = order[:, :d]
    cand = Candidates(np.take_along_axis(sim, top, 1), np.take_along_axis(itm_table, top, 1),
                      np.where(itc_rank <= d, itc_rank - 1, -1), itc_rank)
    assert cand.ranks(d, w, SCALE).tolist() == first[d]


def test_weight_lookup_and_config_round_trip():
    assert weight_at({}, 32) == 1.0 and weight_at(None, 8) == 1.0
    w = {"16": 1.0, "32": 0.5, "64": 0.2}
    assert [weight_at(w, d) for d in (1, 16, 17, 32, 64, 65, 256)] == [1.0, 1.0, 0.5, 0.5, 0.2, 0.2, 0.2]
    cfg = dataclasses.replace(ModelConfig(), itm_weights=w)
    assert ModelConfig.from_dict(cfg.to_dict()).itm_weights == w
    assert ModelConfig.from_dict({k: v for k, v in cfg.to_dict().items() if k != "itm_weights"}).itm_weights == {}
    for bad in ({"16": float("nan")}, {"16": -1.0}, {"x": 0.5}, {"0": 0.5}, {"16": float("inf")}):
        with pytest.raises(ValueError, match="itm_weights"):  # a hand-edited config.json cannot sort silently wrong
            ModelConfig.from_dict({**cfg.to_dict(), "itm_weights": bad})


def test_candidate_scores_match_the_model_pair_by_pair(bundle):
    torch.manual_seed(0)
    s = bundle.config.vision.image_size
    px = torch.randint(0, 256, (4, 3, s, s), dtype=torch.uint8)
    texts = ["a red mug", "a blue shoe on the left", "a big green hat", "a small pink bag"]
    c = candidate_scores(bundle, px, texts, depth=3)
    emb, tok = bundle.embed_pixels(px)
    ids, mask = bundle.tokenizer(texts)
    with torch.no_grad():
        sim = bundle.model.encode_text(ids, mask) @ emb.t()  # (text, image)
        for q in range(4):
            top = torch.argsort(-sim[q], stable=True)[:3]
            np.testing.assert_allclose(c["t2i"].cos[q], sim[q, top].numpy(), rtol=1e-5, atol=1e-6)
            want = bundle.model.itm_logits(tok[top], ids[q : q + 1], mask[q : q + 1]).numpy()
            np.testing.assert_allclose(c["t2i"].itm[q], want, rtol=1e-4, atol=1e-5)
            assert c["t2i"].itc_rank[q] == 1 + int((torch.argsort(-sim[q], stable=True) == q).nonzero())


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_training_calibrates_saves_the_weights_and_search_uses_them(tmp_path, small_catalog, db_url, monkeypatch):
    from vtfusion.catalogs.sources import Columns
    from vtfusion.indexer.collection import Collection
    from vtfusion.indexer.ingest import ingest
    from vtfusion.models.train import RerankConfig, TrainConfig
    from vtfusion.search.engine import SearchEngine
    from vtfusion.workflows.train import train_catalog

    from conftest import TINY_VISION

    monkeypatch.setattr("vtfusion.models.train.CALIBRATION_MIN", 10)  # the small catalog holds ~50 images
    cfg = TrainConfig(epochs=1, batch_size=8, progress=False, calibration=0.4, rerank=RerankConfig(epochs=1))
    r = train_catalog(small_catalog / "train.csv", tmp_path / "m", cfg, vision=TINY_VISION)
    cal = r.result.calibration
    assert cal["pairs"] >= 15 and set(cal["weights"]) == {"16", "32", "64"}
    assert (tmp_path / "m" / "calibration.json").is_file()
    b = factory.load(tmp_path / "m")
    assert b.config.itm_weights == cal["weights"]
    for depth, row in cal["table"].items():  # what was chosen keeps ITC's recalls on the held-out pairs
        if depth != "itc":
            assert all(row[d][f"R@{k}"] >= cal["table"]["itc"][d][f"R@{k}"] for d in ("t2i", "i2t") for k in (1, 5, 10))
    c = Collection.init(tmp_path / "col", tmp_path / "m", db_url=db_url)
    ingest(c, small_catalog / "train.csv", Columns(), progress=False)
    res = SearchEngine(c).search("a red mug", k=5, rerank_depth=32)
    assert res.itm_weight == b.itm_weight(32) == cal["weights"]["32"]
