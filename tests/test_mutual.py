"""The design's mutual fusion (``FusionConfig(mode="mutual")``, layers.MutualFusionBlock): the
text update sums self-attention and text -> image attention, image tokens attend to the text.
Every way search scores pairs must give the pair-by-pair answer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sqlalchemy import select
from conftest import TEXTS, TINY_VISION, tiny_bundle

from vtfusion.catalogs.sources import Columns, read_csv
from vtfusion.indexer.collection import Collection
from vtfusion.indexer.ingest import ingest
from vtfusion.indexer.schema import Item
from vtfusion.models import factory
from vtfusion.models.config import FusionConfig, ModelConfig
from vtfusion.models.data import Pair, PairDataset
from vtfusion.models.layers import FusionBlock, MutualFusionBlock
from vtfusion.models.train import RerankConfig, TrainConfig, train
from vtfusion.search.rerank import ITMScorer, Query


@pytest.fixture(scope="module")
def mutual():
    b = tiny_bundle(fusion=FusionConfig(num_heads=2, num_layers=3, mode="mutual"))
    b.model.eval()
    return b


def _inputs(b, n=len(TEXTS), seed=1):
    s = b.model.cfg.vision.image_size
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        tokens = b.model.image_tokens(torch.randn(n, 3, s, s, generator=g))
    ids, mask = b.tokenizer(TEXTS[:n])
    return tokens, ids, mask


def test_layers_are_mutual_except_the_last_and_the_config_round_trips(mutual, tmp_path):
    blocks = list(mutual.model.fusion)
    assert all(isinstance(x, MutualFusionBlock) for x in blocks)
    assert [x.update_image for x in blocks] == [True, True, False]  # nothing reads the last layer's image side
    assert ModelConfig.from_dict(mutual.model.cfg.to_dict()).fusion.mode == "mutual"
    assert isinstance(tiny_bundle().model.fusion[0], FusionBlock)  # "text" stays the default
    factory.save(mutual, tmp_path)
    back = factory.load(tmp_path)
    tokens, ids, mask = _inputs(mutual)
    with torch.no_grad():
        assert torch.equal(back.model.itm_logits(tokens, ids, mask), mutual.model.itm_logits(tokens, ids, mask))
    with pytest.raises(ValueError, match="fusion.mode"):
        FusionConfig(mode="both")


def test_batch1_broadcasting_equals_batched_and_pair_by_pair(mutual):
    m = mutual.model
    tokens, ids, mask = _inputs(mutual)
    n = len(TEXTS)
    with torch.no_grad():
        batched = m.itm_logits(tokens, ids, mask)
        one_text = torch.stack([m.itm_logits(tokens, ids[i : i + 1], mask[i : i + 1])[i] for i in range(n)])
        one_image = torch.stack([m.itm_logits(tokens[i : i + 1], ids, mask)[i] for i in range(n)])
        pairs = torch.stack([m.itm_logits(tokens[i : i + 1], ids[i : i + 1], mask[i : i + 1])[0] for i in range(n)])
    torch.testing.assert_close(one_text, batched, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(one_image, batched, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pairs, batched, rtol=1e-5, atol=1e-6)
    with torch.enable_grad():  # training's path (no folded keys/values, one-hot gathers)
        torch.testing.assert_close(m.itm_logits(tokens, ids, mask).detach(), batched, rtol=1e-5, atol=1e-6)
    # the image index path training uses: rows against distinct images, each image projected once
    index = torch.tensor([2, 0, 2, 1])
    with torch.no_grad():
        text_tokens = m.text_tokens(ids, mask)
        indexed = m.fuse(tokens, text_tokens, mask, image_index=index)
        gathered = m.fuse(tokens[index], text_tokens, mask)
    torch.testing.assert_close(indexed, gathered, rtol=1e-5, atol=1e-6)


def test_padding_changes_nothing_and_the_heatmap_is_text_to_image(mutual):
    m = mutual.model
    tokens, ids, mask = _inputs(mutual)
    pad = mutual.tokenizer.hf.pad_token_id
    wider_ids = torch.cat([ids, torch.full((len(ids), 5), pad)], dim=1)
    wider_mask = torch.cat([mask, torch.zeros(len(ids), 5, dtype=mask.dtype)], dim=1)
    with torch.no_grad():
        a = m.itm_logits(tokens, ids, mask)
        b, maps = m.itm_logits(tokens, wider_ids, wider_mask, return_attention=True)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert len(maps) == 3 and maps[0].shape == (len(ids), 2, wider_ids.shape[1], tokens.shape[1])  # (B, H, L, N)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(maps[0].shape[:-1]))


@pytest.fixture(scope="module")
def mutual_model_dir(tmp_path_factory, small_catalog):
    rows, _ = read_csv(small_catalog / "train.csv")
    torch.manual_seed(0)
    b = factory.build_scratch([t for r in rows for t in r.texts], vision=TINY_VISION, vocab_size=200, hidden_size=32,
                              num_layers=1, num_heads=2, embed_dim=24, fusion=FusionConfig(num_heads=2, mode="mutual"))
    ds = PairDataset([Pair(r.image, r.texts, r.source) for r in rows], b.transform)
    ds.preload(progress=False)
    out = tmp_path_factory.mktemp("mutual-model")
    train(b, ds, out, TrainConfig(epochs=2, batch_size=16, checkpoint_every=0, progress=False, rerank=RerankConfig(epochs=1)))
    return out


def _ids(c: Collection) -> list[int]:
    with c.Session() as s:
        return s.scalars(select(Item.id).order_by(Item.id)).all()[:30]


def test_chunked_and_token_cache_scoring_equal_the_model_pair_by_pair(tmp_path, mutual_model_dir, small_catalog):
    cached = Collection.init(tmp_path / "fp16", mutual_model_dir)
    fresh = Collection.init(tmp_path / "none", mutual_model_dir, token_dtype="none")  # re-encodes every candidate
    for c in (cached, fresh):
        ingest(c, small_catalog / "train.csv", Columns(), progress=False)
    ids = _ids(cached)
    assert _ids(fresh) == ids  # the same items under the same ids
    q_ids, q_mask = cached.bundle.tokenizer(["a large red striped mug to the left of a small blue sneaker"])
    query = Query(ids=q_ids, mask=q_mask)
    one = ITMScorer(cached, chunk=1000).score(query, ids)
    np.testing.assert_allclose(ITMScorer(cached, chunk=7).score(query, ids), one, rtol=1e-5, atol=1e-5)
    reencoded = ITMScorer(fresh, chunk=7)
    got = reencoded.score(query, ids)
    assert reencoded.misses == len(ids)
    np.testing.assert_allclose(one, got, rtol=1e-2, atol=2e-2)  # the cache holds float16 tokens
    # the oracle: the model on each image's freshly encoded tokens, one pair at a time
    m = fresh.bundle.model
    tokens, _ = fresh.item_tokens(ids)
    with torch.no_grad():
        naive = np.array([float(m.itm_logits(tokens[i : i + 1], q_ids, q_mask)[0]) for i in range(len(ids))])
    np.testing.assert_allclose(got, naive, rtol=1e-4, atol=1e-4)
    # image query against candidate texts, chunked and not
    img_q = Query(image_tokens=tokens[:1])
    np.testing.assert_allclose(ITMScorer(cached, chunk=3).score(img_q, ids), ITMScorer(cached, chunk=500).score(img_q, ids),
                               rtol=1e-5, atol=1e-5)
    # the UI's "why this result": the heatmap is still text -> image attention, and its match
    # probability is the model's ITM logit for the pair
    from vtfusion.search.explain import explain

    e = explain(fresh, "a large red striped mug to the left of a small blue sneaker", ids[0])
    g = fresh.bundle.config.vision.grid
    assert e.heat.shape == (g, g) and 0 <= e.heat.min() and e.heat.max() <= 1
    assert e.itm == pytest.approx(float(torch.sigmoid(torch.tensor(naive[0]))), abs=1e-4)
