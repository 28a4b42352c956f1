"""The fusion model's public verbs: shapes, unit norms, padding invariance, broadcasting."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_VISION, tiny_bundle


def _pixels(b, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    u8 = torch.randint(0, 256, (n, 3, TINY_VISION.image_size, TINY_VISION.image_size), dtype=torch.uint8, generator=g)
    return b.transform.normalize(u8)


def test_shapes_with_odd_tiny_sizes(bundle):
    m = bundle.model
    px = _pixels(bundle, 5)
    ids, mask = bundle.tokenizer(["a red mug", "a big green dotted hat", "x", "a", "blue"])
    tokens = m.image_tokens(px)
    assert tokens.shape == (5, TINY_VISION.num_tokens, 18)
    assert TINY_VISION.num_tokens == 1 + 10 * 10  # 37 -> 19 (stem) -> 19 -> 10 (stage 2)
    assert m.encode_image(px).shape == (5, 14)
    assert m.encode_text(ids, mask).shape == (5, 14)
    assert m.itm_logits(tokens, ids, mask).shape == (5,)


def test_embeddings_are_unit_norm(bundle):
    px = _pixels(bundle, 3)
    ids, mask = bundle.tokenizer(["a red mug", "a big green dotted hat", "bag"])
    for emb in (bundle.model.encode_image(px), bundle.model.encode_text(ids, mask)):
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))


def test_padding_does_not_change_outputs(bundle):
    m, tok = bundle.model, bundle.tokenizer
    tokens = m.image_tokens(_pixels(bundle, 1))
    ids, mask = tok(["a large red striped mug"])
    pad = torch.full((1, 9), tok.pad_token_id)
    ids_p, mask_p = torch.cat([ids, pad], 1), torch.cat([mask, torch.zeros_like(pad)], 1)
    with torch.no_grad():
        torch.testing.assert_close(m.itm_logits(tokens, ids, mask), m.itm_logits(tokens, ids_p, mask_p))
        torch.testing.assert_close(m.encode_text(ids, mask), m.encode_text(ids_p, mask_p))
    # and the padded positions really were looked at: unmasking them changes the logit
    with torch.no_grad():
        assert not torch.allclose(m.itm_logits(tokens, ids, mask), m.itm_logits(tokens, ids_p, torch.ones_like(mask_p)))


def test_batch_of_one_broadcasts_against_many(bundle):
    m, tok = bundle.model, bundle.tokenizer
    tokens = m.image_tokens(_pixels(bundle, 4))
    ids, mask = tok(["a big green dotted hat"])
    with torch.no_grad():
        broadcast = m.itm_logits(tokens, ids, mask)
        one_by_one = torch.cat([m.itm_logits(tokens[i : i + 1], ids, mask) for i in range(4)])
        torch.testing.assert_close(broadcast, one_by_one)
        _, maps = m.itm_logits(tokens, ids, mask, return_attention=True)  # the text runs once, maps per image
        _, maps_2 = m.itm_logits(tokens[2:3], ids, mask, return_attention=True)
        assert maps[0].shape[0] == 4
        torch.testing.assert_close(maps[-1][2:3], maps_2[-1])
        texts_vs_one_image = m.itm_logits(tokens[:1], *tok(["a red mug", "a blue mug", "a big green dotted hat", "bag"]))
    assert texts_vs_one_image.shape == (4,)


def test_cross_attention_depends_on_the_image(bundle):
    m, tok = bundle.model, bundle.tokenizer
    ids, mask = tok(["a red mug"])
    with torch.no_grad():
        a = m.itm_logits(m.image_tokens(_pixels(bundle, 1, seed=1)), ids, mask)
        b = m.itm_logits(m.image_tokens(_pixels(bundle, 1, seed=2)), ids, mask)
        _, maps = m.itm_logits(m.image_tokens(_pixels(bundle, 1, seed=1)), ids, mask, return_attention=True)
    assert not torch.allclose(a, b)
    assert len(maps) == m.cfg.fusion.num_layers
    assert maps[0].shape == (1, m.cfg.fusion.num_heads, ids.shape[1], TINY_VISION.num_tokens)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(maps[0].shape[:-1]))


@pytest.mark.parametrize(
    "call",
    [
        lambda m, px, ids, mask: m.image_tokens(px[:, :, :30]),
        lambda m, px, ids, mask: m.encode_text(ids, mask[:, :-1]),
        lambda m, px, ids, mask: m.itm_logits(m.image_tokens(px)[:, :, :5], ids, mask),
        lambda m, px, ids, mask: m.itm_logits(m.image_tokens(px[:2]), ids[:3], mask[:3]),
    ],
    ids=["wrong-image-size", "mask-shape", "token-width", "batch-mismatch"],
)
def test_bad_shapes_fail_with_a_clear_message(bundle, call):
    px = _pixels(bundle, 3)
    ids, mask = bundle.tokenizer(["a", "b c", "d"])
    with pytest.raises(ValueError, match="must|differ"):
        call(bundle.model, px, ids, mask)


def test_config_validation():
    from vtfusion.models.config import FusionConfig, VisionConfig
    from vtfusion.models.vision import VisionTower

    with pytest.raises(ValueError, match="equal length"):
        VisionTower(VisionConfig(stage_widths=(8, 8), stage_depths=(1,)))
    with pytest.raises(ValueError, match="divisible"):
        tiny_bundle(fusion=FusionConfig(num_heads=3))  # text width 20 is not divisible by 3


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_itm_pools_ignore_padding_and_saved_pool_round_trips(pool, tmp_path):
    from vtfusion.models import factory
    from vtfusion.models.config import FusionConfig, ModelConfig

    b = tiny_bundle(fusion=FusionConfig(num_heads=2, itm_pool=pool))
    m, tok = b.model.eval(), b.tokenizer
    tokens = m.image_tokens(_pixels(b, 2))
    ids, mask = tok(["a red mug", "a large red striped mug to the left of a hat"])  # row 0 is padded
    with torch.no_grad():
        both = m.itm_logits(tokens, ids, mask)
        alone = m.itm_logits(tokens[:1], *tok(["a red mug"]))
    torch.testing.assert_close(both[:1], alone)
    factory.save(b, tmp_path)
    assert factory.load(tmp_path).model.cfg.fusion.itm_pool == pool
    # a config written before the field existed reads as the [CLS] head it was trained with
    d = b.model.cfg.to_dict()
    assert d["format_version"] == 3
    del d["fusion"]["itm_pool"], d["fusion"]["mode"], d["itm_weights"]
    d["format_version"] = 1
    old = ModelConfig.from_dict(d)
    assert (old.fusion.itm_pool, old.fusion.mode, old.itm_weights) == ("cls", "text", {})
    with pytest.raises(ValueError, match="itm_pool"):
        FusionConfig(itm_pool="max")


def test_mean_pool_head_is_the_mean_of_per_token_head_outputs(bundle):
    """The "mean" ITM logit is the linear head applied to the masked mean of the fused tokens
    (hand-checked here by running the fusion blocks directly)."""
    m, tok = bundle.model, bundle.tokenizer
    assert m.cfg.fusion.itm_pool == "mean"  # the default for new models
    tokens = m.image_tokens(_pixels(bundle, 1))
    ids, mask = tok(["a big green dotted hat"])
    with torch.no_grad():
        x = m.text(ids, mask)
        for block in m.fusion:
            x, _ = block(x, mask, tokens)
        x = m.fusion_norm(x)[0]  # (L, D)
        expected = m.itm_head(x).squeeze(-1).mean()  # linear head: mean of per-token logits
        torch.testing.assert_close(m.itm_logits(tokens, ids, mask), expected.reshape(1))


def test_fuse_with_image_index_equals_gathered_images_in_value_and_gradient(bundle):
    """Training scores (1 + 2K)B rows against B images through ``image_index`` (keys/values
    projected once per image); it must equal fusing the gathered copies, gradients included."""
    m, tok = bundle.model, bundle.tokenizer
    m.train()
    tokens = m.image_tokens(_pixels(bundle, 3)).detach()
    ids, mask = tok(["a red mug", "a big green dotted hat", "bag", "blue", "a red mug to the left of a hat"])
    text = m.text(ids, mask).detach()
    index = torch.tensor([2, 0, 0, 1, 2])
    results = []
    for indexed in (False, True):
        t = tokens.clone().requires_grad_()
        logits = m.fuse(t, text, mask, image_index=index) if indexed else m.fuse(t[index], text, mask)
        (logits * torch.arange(1.0, 6.0)).sum().backward()
        results.append((logits.detach(), t.grad))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def test_inference_folds_the_image_layer_norm_into_one_kv_product():
    """Without autograd the fusion layers' image keys/values come from one product with the
    LayerNorm affines folded in; that must equal each layer's own LayerNorm + projection."""
    b = tiny_bundle()
    m = b.model
    with torch.no_grad():
        for blk in m.fusion:  # affines away from (1, 0): folding them must matter
            blk.norm_kv.weight.uniform_(0.5, 1.5)
            blk.norm_kv.bias.normal_()
    assert len(m.fusion) >= 1
    img = torch.randn(3, m.cfg.vision.num_tokens, m.cfg.vision.width)
    ids, mask = b.tokenizer(["a red mug on the left", "a big hat", "two small blue socks"])
    with torch.no_grad():
        fast, maps_fast = m.itm_logits(img, ids, mask, return_attention=True)
    slow, maps_slow = m.itm_logits(img.clone().requires_grad_(True), ids, mask, return_attention=True)
    assert slow.requires_grad  # the per-layer path ran
    torch.testing.assert_close(fast, slow.detach(), atol=1e-5, rtol=1e-5)
    for a, c in zip(maps_fast, maps_slow):
        torch.testing.assert_close(a, c.detach(), atol=1e-5, rtol=1e-5)
