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
    from models.config import FusionConfig, VisionConfig
    from models.vision import VisionTower

    with pytest.raises(ValueError, match="equal length"):
        VisionTower(VisionConfig(stage_widths=(8, 8), stage_depths=(1,)))
    with pytest.raises(ValueError, match="divisible"):
        tiny_bundle(fusion=FusionConfig(num_heads=3))  # text width 20 is not divisible by 3
