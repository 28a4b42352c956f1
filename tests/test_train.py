"""Training: the loss falls, retrieval beats chance, runs are reproducible, resume is exact."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from conftest import TINY_VISION, tiny_bundle
from vtfusion.catalogs.sources import Columns, read_csv
from vtfusion.models import factory
from vtfusion.models.data import Pair, PairDataset
from vtfusion.models.losses import itc_loss, sample_hard_negatives
from vtfusion.models.train import JointConfig, RerankConfig, TrainConfig, latest_checkpoint, lr_factor, train
from vtfusion.models.train.mining import batch_plan as _batches
from vtfusion.models.train.mining import itc_candidates
from vtfusion.models.train.mining import sample_from_pool as _sample_from_pool
from vtfusion.models.validate import text_to_image_r1


def _dataset(catalog, b, cols=("title", "caption")):
    rows, errors = read_csv(catalog / "train.csv", Columns(text=cols))
    assert not errors
    ds = PairDataset([Pair(r.image, r.texts, r.source) for r in rows], b.transform)
    assert ds.preload(progress=False) == []
    return ds


def _fresh(catalog):
    rows, _ = read_csv(catalog / "train.csv", Columns(text=("title", "caption")))
    torch.manual_seed(0)
    return factory.build_scratch(
        [t for r in rows for t in r.texts], vision=TINY_VISION, vocab_size=200, hidden_size=32, num_layers=1,
        num_heads=2, embed_dim=24,
    )


def _weights(b):
    return {k: v.clone() for k, v in b.model.state_dict().items()}


def test_training_lowers_loss_and_retrieves_far_above_chance(small_catalog, tmp_path):
    b = _fresh(small_catalog)
    ds = _dataset(small_catalog, b, cols=("caption",))
    cfg = TrainConfig(epochs=30, batch_size=16, lr=2e-3, warmup_steps=10, checkpoint_every=0, progress=False)
    res = train(b, ds, tmp_path / "m", cfg)
    first, last = sum(res.losses[:5]) / 5, sum(res.losses[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    v = text_to_image_r1(b, ds.pixels_all(), [p.texts[0] for p in ds.pairs], rerank_k=8)
    chance = 1 / len(ds)
    assert v.itc_r1 > 10 * chance, v  # chance is ~2 %
    assert (tmp_path / "m" / "model.safetensors").exists()
    loaded = factory.load(tmp_path / "m")
    v2 = text_to_image_r1(loaded, ds.pixels_all(), [p.texts[0] for p in ds.pairs], rerank_k=8)
    assert v2 == v  # the saved model is the trained one


@pytest.mark.parametrize("mlm_weight", [0.0, 1.0])  # with MLM, its head's weights and moments are resumed too
def test_cpu_training_is_reproducible_and_resume_is_exact(small_catalog, tmp_path, mlm_weight):
    cfg = TrainConfig(epochs=3, batch_size=16, warmup_steps=2, checkpoint_every=4, progress=False, joint=JointConfig(mlm_weight=mlm_weight))
    runs = []
    for name in ("a", "b"):
        b = _fresh(small_catalog)
        res = train(b, _dataset(small_catalog, b), tmp_path / name, cfg)
        runs.append((res.losses, _weights(b)))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])

    # a run that crashes during step 6 (its newest checkpoint is from step 4), then resumed
    import vtfusion.models.train.joint as train_mod

    real_step, calls = train_mod.train_step, []

    def crashing_step(*a, **k):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt("simulated crash")
        return real_step(*a, **k)

    b = _fresh(small_catalog)
    train_mod.train_step = crashing_step
    try:
        with pytest.raises(KeyboardInterrupt):
            train(b, _dataset(small_catalog, b), tmp_path / "c", cfg)
    finally:
        train_mod.train_step = real_step
    ckpt = latest_checkpoint(tmp_path / "c")
    assert ckpt is not None and ckpt.name == "step-0000004"
    b = factory.load(ckpt)
    res = train(b, _dataset(small_catalog, b), tmp_path / "c", cfg, resume=True)
    assert res.steps == len(runs[0][0])
    assert res.losses == runs[0][0][4:]
    w = _weights(b)
    assert all(torch.equal(w[k], runs[0][1][k]) for k in w)


def test_a_seed_gives_one_model_through_train_catalog(small_catalog, tmp_path):
    """The product path (``vtfusion train``/``demo``) builds the model itself: its initial
    weights must come from the seed, not from the process's random state before the call."""
    from vtfusion.workflows.train import train_catalog

    cfg = TrainConfig(epochs=1, batch_size=16, warmup_steps=2, checkpoint_every=0, progress=False)
    weights = []
    for name, noise in (("a", 1), ("b", 2), ("c", 1)):
        torch.manual_seed(noise)  # whatever ran before in this process
        seed = 1 if name == "c" else 0
        report = train_catalog(small_catalog / "train.csv", tmp_path / name, dataclasses.replace(cfg, seed=seed),
                               text_tower="scratch", vision=TINY_VISION)
        assert report.result.steps == 3
        weights.append(_weights(factory.load(tmp_path / name)))
    a, b, c = weights
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)  # another seed, another model


def test_itc_candidates_match_brute_force_and_never_hold_the_positive():
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(50, 8, generator=g), dim=1)
    d = torch.nn.functional.normalize(torch.randn(50, 8, generator=g), dim=1)
    vals, idx = itc_candidates(q, d, pool=7, chunk=16)  # chunks of 16 over 50 queries
    sim = (q @ d.t()).numpy()
    for i in range(50):
        sim[i, i] = -np.inf
        want = np.argsort(-sim[i])[:7]
        assert idx[i].tolist() == want.tolist()
        assert np.allclose(vals[i].numpy(), sim[i, want], atol=1e-6)
        assert i not in idx[i].tolist()


def test_negatives_from_the_pool_are_distinct_candidates_weighted_by_itc():
    g = torch.Generator().manual_seed(1)
    values = torch.tensor([[0.9, 0.5, 0.4, 0.1], [0.3, 0.2, 0.2, 0.1]])
    index = torch.tensor([[5, 6, 7, 8], [1, 2, 3, 4]])
    counts = torch.zeros(9)
    for _ in range(300):
        neg = _sample_from_pool(values, index, torch.tensor([0, 1]), scale=20.0, k=2, gen=g)  # (2, 2)
        assert neg.shape == (2, 2) and neg[0, 0] != neg[0, 1] and neg[1, 0] != neg[1, 1]
        assert set(neg[0].tolist()) <= {5, 6, 7, 8} and set(neg[1].tolist()) <= {1, 2, 3, 4}
        counts.index_add_(0, neg[0], torch.ones(2))
    assert counts[5] == 300  # cosine 0.9 at scale 20 outweighs the rest by e^8: always drawn
    assert counts[6] > counts[8]  # then by likeness


def test_reranker_stage_trains_fusion_alone_reproducibly_and_survives_resume(small_catalog, tmp_path):
    cfg = TrainConfig(epochs=2, batch_size=16, warmup_steps=2, checkpoint_every=0, progress=False, rerank=RerankConfig(epochs=3, pool=6, negatives=2))
    joint = _fresh(small_catalog)
    train(joint, _dataset(small_catalog, joint), tmp_path / "joint", dataclasses.replace(cfg, rerank=RerankConfig(epochs=0)))
    runs = []
    for name in ("a", "b"):
        b = _fresh(small_catalog)
        ds = _dataset(small_catalog, b)
        res = train(b, ds, tmp_path / name, cfg)
        assert res.rerank_steps == 3 * (len(ds) // 16) and len(res.rerank_losses) == res.rerank_steps
        runs.append(_weights(factory.load(tmp_path / name)))
    a, b_, j = runs[0], runs[1], _weights(joint)
    assert all(torch.equal(a[k], b_[k]) for k in a)  # a seed gives one model, second stage included
    for k in a:
        fusion = k.startswith(("fusion.", "fusion_norm.", "itm_head."))
        assert torch.equal(a[k], j[k]) != fusion, k  # towers exactly as the joint run left them; fusion moved
    # resumed from the joint run's final checkpoint, the second stage is redone bit for bit
    b = factory.load(latest_checkpoint(tmp_path / "a"))
    res = train(b, _dataset(small_catalog, b), tmp_path / "a", cfg, resume=True)
    assert res.rerank_steps > 0
    w = _weights(factory.load(tmp_path / "a"))
    assert all(torch.equal(w[k], a[k]) for k in a)


def test_a_crash_in_the_reranker_stage_resumes_there_bit_for_bit(small_catalog, tmp_path, monkeypatch):
    """Both stages run through one loop: checkpoints are written in the reranker stage too, and
    a resumed run continues inside it (the joint stage is not rerun) to the same weights."""
    from vtfusion.models.train.checkpoints import read_meta
    from vtfusion.models.train.rerank import RerankStage

    cfg = TrainConfig(epochs=2, batch_size=16, warmup_steps=2, checkpoint_every=2, progress=False,
                      rerank=RerankConfig(epochs=3, pool=6, negatives=2))
    b = _fresh(small_catalog)
    full = train(b, _dataset(small_catalog, b), tmp_path / "a", cfg)
    want = _weights(factory.load(tmp_path / "a"))
    joint_steps, rerank_steps = full.steps, full.rerank_steps
    assert rerank_steps >= 6

    real, calls = RerankStage.step, []

    def crashing(self, *a, **k):
        calls.append(1)
        if len(calls) == 5:  # during reranker step 5: its newest checkpoint is from step 4
            raise KeyboardInterrupt("simulated crash")
        return real(self, *a, **k)

    monkeypatch.setattr(RerankStage, "step", crashing)
    b = _fresh(small_catalog)
    with pytest.raises(KeyboardInterrupt):
        train(b, _dataset(small_catalog, b), tmp_path / "c", cfg)
    monkeypatch.setattr(RerankStage, "step", real)
    ckpt = latest_checkpoint(tmp_path / "c")
    meta = read_meta(ckpt)
    assert meta["stage"] == "rerank" and meta["step"] == 4
    assert ckpt.name == f"step-{joint_steps + 4:07d}"  # folders count on from the joint stage's steps
    b = factory.load(ckpt)
    res = train(b, _dataset(small_catalog, b), tmp_path / "c", cfg, resume=True)
    assert res.steps == joint_steps and res.losses == []  # the joint stage was not run again
    assert res.rerank_steps == rerank_steps and res.rerank_losses == full.rerank_losses[4:]
    got = _weights(factory.load(tmp_path / "c"))
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_time_budget_stops_training(small_catalog, tmp_path):
    b = _fresh(small_catalog)
    res = train(b, _dataset(small_catalog, b), tmp_path / "m",
                TrainConfig(epochs=None, minutes=0.05, batch_size=16, checkpoint_every=0, progress=False))
    assert res.stopped_by == "minutes" and res.rerank_steps == 0  # rerank_share 0: the joint stage took it all
    assert 0 < res.seconds < 3 * 60 * 0.05 + 20  # stops within one step of the budget (+ final save)


def test_time_budget_keeps_a_share_for_the_reranker_stage(small_catalog, tmp_path):
    """With rerank_share the joint stage stops at (1 - rerank_share) of the budget and the
    second stage gets the rest (--minutes used to end every run before the second stage)."""
    b = _fresh(small_catalog)
    budget = 60 * 0.2
    cfg = TrainConfig(epochs=None, minutes=0.2, batch_size=16, checkpoint_every=0, progress=False, rerank=RerankConfig(epochs=100_000, share=0.4))  # only the clock can end the second stage
    res = train(b, _dataset(small_catalog, b), tmp_path / "m", cfg)
    assert res.stopped_by == "minutes"
    assert 0.6 * budget <= res.seconds < 0.6 * budget + 5  # the joint stage: its share, plus at most a step
    assert res.rerank_steps > 0
    assert res.seconds + res.rerank_seconds < budget + 10  # the second stage stops on the clock too


def test_lr_schedule_warms_up_then_decays():
    f = [lr_factor(s / 100, s, 10, 0.05) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert lr_factor(1.0, 100, 10, 0.05) == pytest.approx(0.05)


def test_itc_loss_matches_hand_computation():
    img = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8]]), dim=-1)
    txt = torch.nn.functional.normalize(torch.tensor([[1.0, 0.1], [0.0, 1.0]]), dim=-1)
    loss, sim = itc_loss(img, txt, torch.tensor(10.0))
    s = (img @ txt.T) * 10
    i2t = -(math.log(math.exp(s[0, 0]) / (math.exp(s[0, 0]) + math.exp(s[0, 1])))
            + math.log(math.exp(s[1, 1]) / (math.exp(s[1, 0]) + math.exp(s[1, 1])))) / 2
    t2i = -(math.log(math.exp(s[0, 0]) / (math.exp(s[0, 0]) + math.exp(s[1, 0])))
            + math.log(math.exp(s[1, 1]) / (math.exp(s[0, 1]) + math.exp(s[1, 1])))) / 2
    assert float(loss) == pytest.approx((i2t + t2i) / 2, rel=1e-5)


def test_hard_negatives_are_never_the_positive_and_follow_similarity():
    g = torch.Generator().manual_seed(0)
    B = 6
    logits = torch.zeros(B, B)
    logits[0, 3] = 20.0  # text 3 looks very much like image 0
    counts = torch.zeros(B)
    for _ in range(200):
        neg_t, neg_i = sample_hard_negatives(logits, g)
        assert (neg_t != torch.arange(B)).all() and (neg_i != torch.arange(B)).all()
        counts[neg_t[0]] += 1
    assert counts[3] > 190  # drawn in proportion to softmax(logits)
    with pytest.raises(ValueError):
        sample_hard_negatives(torch.zeros(1, 1), g)


def test_neighbour_batches_place_pairs_together():
    neighbour = [1, 0, 3, 2, 5, 4, 7, 6]
    batches = _batches(8, 4, seed=1, epoch=0, neighbour=neighbour)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(8))
    for b in batches:
        assert all(neighbour[i] in b for i in b)


def test_several_hard_negatives_per_pair():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 6) * 3
    neg_t, neg_i = sample_hard_negatives(logits, g, k=3)
    assert neg_t.shape == neg_i.shape == (6, 3)
    for row in range(6):
        assert row not in neg_t[row].tolist() and len(set(neg_t[row].tolist())) == 3
        assert row not in neg_i[row].tolist() and len(set(neg_i[row].tolist())) == 3


def test_itm_loss_weights_positives_as_one_third():
    from vtfusion.models.losses import itm_loss

    pos, neg = torch.zeros(4), torch.zeros(16)  # p = 0.5 everywhere: every pair costs log 2
    assert float(itm_loss(pos, neg)) == pytest.approx(math.log(2), rel=1e-6)
    pos_loss = float(itm_loss(torch.full((4,), -2.0), torch.full((16,), -50.0)))  # only positives err
    # positives carry 1/3 of the weight: loss = (1/3) * softplus(2)
    assert pos_loss == pytest.approx(math.log1p(math.exp(2.0)) / 3, rel=1e-4)


def test_itm_rank_loss_is_cross_entropy_over_each_querys_candidates():
    from vtfusion.models.losses import itm_rank_loss

    pos, neg = torch.tensor([2.0, 0.0]), torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    by_hand = (
        -math.log(math.exp(2) / (math.exp(2) + math.exp(0) + math.exp(1)))  # query 0: positive leads
        - math.log(1 / 3)  # query 1: all three tie
    ) / 2
    assert float(itm_rank_loss(pos, neg)) == pytest.approx(by_hand, rel=1e-6)
    # only the order inside a query matters: shifting one query's logits together changes nothing
    assert float(itm_rank_loss(pos + torch.tensor([5.0, -3.0]), neg + torch.tensor([[5.0], [-3.0]]))) == pytest.approx(by_hand, rel=1e-5)


@pytest.mark.parametrize("rank_weight", [0.0, 1.0, 0.5])
def test_listwise_itm_loss_in_a_train_step_by_hand(rank_weight):
    """Two pairs, one negative each way (more are asked for; a pair of two has one): the negatives are forced, so with a silenced ITM head
    (every logit 0) the ITM loss is BCE's log 2 plus the listwise term, which ranks ITM + ITC
    logits and is then exactly the batch's ITC InfoNCE."""
    from vtfusion.models.train.joint import train_step

    b = tiny_bundle()
    torch.nn.init.zeros_(b.model.itm_head.weight)
    torch.nn.init.zeros_(b.model.itm_head.bias)
    ids, mask = b.tokenizer(["a red mug on the left", "a big green dotted hat"])
    pixels = torch.randint(0, 256, (2, 3, TINY_VISION.image_size, TINY_VISION.image_size), dtype=torch.uint8)
    cfg = TrainConfig(epochs=1, itm_rank_weight=rank_weight, progress=False, joint=JointConfig(itm_negatives=2))  # 1 is all there is
    out = train_step(b, {"pixels": pixels, "ids": ids, "mask": mask}, torch.Generator().manual_seed(0), cfg, torch.device("cpu"))
    assert float(out["itm"]) == pytest.approx(math.log(2) + rank_weight * float(out["itc"]), rel=1e-5)


def test_itm_objective_places_several_compositional_negatives_per_image():
    """Extra rows (an image may have several compositional negatives, in any order) each join
    that image's listwise candidates; images with fewer leave their slots empty. Oracle: the
    listwise loss written out per query."""
    from vtfusion.models.fusion import fused_score
    from vtfusion.models.losses import itm_loss, itm_objective

    B, K = 3, 1
    g = torch.Generator().manual_seed(0)
    extra_rows = torch.tensor([2, 0, 2, 2])  # image 2 has three, image 0 one, image 1 none
    n = (1 + 2 * K) * B + len(extra_rows)
    logits, cos = torch.randn(n, generator=g), torch.rand(n, generator=g)
    scale = torch.tensor(10.0)
    got = itm_objective(logits, cos, scale, B, K, 1.0, extra_rows=extra_rows)
    f = fused_score(logits, cos, scale)
    pos, neg_t, neg_i, extra = f[:B], f[B : 2 * B], f[2 * B : 3 * B], f[3 * B :]

    def ce(p, negs):
        return -(p - torch.logsumexp(torch.stack([p, *negs]), 0))

    t_side = [ce(pos[i], [neg_t[i], *[extra[j] for j in range(len(extra_rows)) if extra_rows[j] == i]]) for i in range(B)]
    i_side = [ce(pos[i], [neg_i[i]]) for i in range(B)]
    want = itm_loss(logits[:B], logits[B:]) + (torch.stack(t_side).mean() + torch.stack(i_side).mean()) / 2
    assert float(got) == pytest.approx(float(want), rel=1e-5)


def test_training_with_four_negatives_runs_and_learns(small_catalog, tmp_path):
    b = _fresh(small_catalog)
    ds = _dataset(small_catalog, b, cols=("caption",))
    cfg = TrainConfig(epochs=6, batch_size=16, warmup_steps=5, checkpoint_every=0, progress=False, joint=JointConfig(itm_negatives=4))
    res = train(b, ds, tmp_path / "m", cfg)
    assert sum(res.losses[-3:]) / 3 < sum(res.losses[:3]) / 3


def test_mask_tokens_hides_only_ordinary_tokens_bert_style():
    from vtfusion.models.losses import IGNORE, mask_tokens

    ids = torch.randint(10, 100, (400, 50))
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = special[:, -5:] = True  # [CLS] and padding never masked
    out, labels = mask_tokens(ids, special, mask_id=3, vocab_size=100, generator=torch.Generator().manual_seed(0), prob=0.15)
    chosen = labels != IGNORE
    assert not chosen[special].any()
    assert torch.equal(labels[chosen], ids[chosen])  # the label is the original word
    assert torch.equal(out[~chosen], ids[~chosen])  # nothing else changes
    assert chosen.float().mean().item() == pytest.approx(0.15 * 44 / 50, abs=0.01)
    masked, kept = (out[chosen] == 3).float().mean().item(), (out[chosen] == ids[chosen]).float().mean().item()
    assert masked == pytest.approx(0.8, abs=0.03)
    assert kept == pytest.approx(0.1 + 0.9 * 0.01, abs=0.03)  # kept on purpose, or replaced by itself at random
    again = mask_tokens(ids, special, 3, 100, torch.Generator().manual_seed(0), 0.15)
    assert torch.equal(again[0], out) and torch.equal(again[1], labels)  # seeded: the same words every run


def test_mlm_loss_in_a_train_step_by_hand(monkeypatch):
    """The MLM loss is the cross-entropy of the head's predictions at the hidden positions of
    each text fused with ITS OWN image (recomputed here from the masked ids train_step drew)."""
    import torch.nn.functional as F

    import vtfusion.models.train.joint as train_mod

    b = tiny_bundle()
    b.model.eval()  # no dropout: the recomputation must see the same network
    texts = ["a red mug on the left", "a big green dotted hat", "a small blue striped sock", "a plain yellow cup"]
    ids, mask = b.tokenizer(texts)
    pixels = torch.randint(0, 256, (4, 3, TINY_VISION.image_size, TINY_VISION.image_size), dtype=torch.uint8)
    cfg = TrainConfig(epochs=1, progress=False, joint=JointConfig(mlm_weight=1.0, mlm_prob=0.5))
    head = train_mod.mlm_head_for(b, cfg)
    drawn = []
    real = train_mod.mask_tokens
    monkeypatch.setattr(train_mod, "mask_tokens", lambda *a, **k: drawn.append(real(*a, **k)) or drawn[-1])
    out = train_mod.train_step(b, {"pixels": pixels, "ids": ids, "mask": mask}, torch.Generator().manual_seed(0), cfg, torch.device("cpu"), mlm=head)
    m_ids, labels = drawn[0]
    chosen = labels != -100
    assert chosen.any() and not chosen[mask == 0].any() and not chosen[:, 0].any()  # never padding or [CLS]
    with torch.no_grad():
        img = b.model.vision(b.transform.normalize(pixels))
        fused, _ = b.model.fuse_tokens(img, b.model.text(m_ids, mask), mask)
        by_hand = F.cross_entropy(head(fused[chosen]), labels[chosen])
    assert float(out["mlm"]) == pytest.approx(float(by_hand), rel=1e-5)
    # and the total loss counts it once, weighted
    out0 = train_mod.train_step(b, {"pixels": pixels, "ids": ids, "mask": mask}, torch.Generator().manual_seed(0),
                                TrainConfig(epochs=1, progress=False, joint=JointConfig(mlm_weight=0.0)), torch.device("cpu"))
    assert "mlm" not in out0
    assert float(out["loss"].detach()) == pytest.approx(float(out0["loss"].detach()) + float(out["mlm"]), rel=1e-5)


def test_resuming_with_another_mlm_setting_is_refused(small_catalog, tmp_path):
    b = _fresh(small_catalog)
    train(b, _dataset(small_catalog, b), tmp_path / "m", TrainConfig(epochs=1, batch_size=16, checkpoint_every=0, progress=False))
    b = _fresh(small_catalog)
    with pytest.raises(ValueError, match="without masked language modelling"):
        train(b, _dataset(small_catalog, b), tmp_path / "m",
              TrainConfig(epochs=2, batch_size=16, checkpoint_every=0, progress=False, joint=JointConfig(mlm_weight=1.0)), resume=True)
