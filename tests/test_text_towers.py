"""The design's recurrent text tower (``--text-tower gru|lstm``): padding changes nothing, it
saves and loads exactly, and it trains through the product path."""

from __future__ import annotations

import pytest
import torch

from conftest import TEXTS, TINY_VISION
from vtfusion.models import factory


def _bundle(kind: str) -> factory.Bundle:
    torch.manual_seed(0)
    b = factory.build_scratch(TEXTS, vision=TINY_VISION, vocab_size=200, hidden_size=32, num_layers=2, num_heads=2,
                              embed_dim=24, text_kind=kind)
    b.model.eval()
    return b


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_padding_positions_change_nothing(kind):
    b = _bundle(kind)
    ids, mask = b.tokenizer(["a red mug", "a large red striped mug to the left of a small blue plain sneaker", "hat"])
    assert (mask == 0).any()  # the short texts are padded
    g = torch.Generator().manual_seed(1)
    noisy = torch.where(mask.bool(), ids, torch.randint(5, b.tokenizer.vocab_size, ids.shape, generator=g))
    with torch.no_grad():
        a, z = b.model.text(ids, mask), b.model.text(noisy, mask)
        real = mask.bool()
        assert torch.equal(a[real], z[real])
        assert torch.equal(b.model.encode_text(ids, mask), b.model.encode_text(noisy, mask))
        img = b.model.image_tokens(torch.zeros(1, 3, TINY_VISION.image_size, TINY_VISION.image_size))
        assert torch.equal(b.model.itm_logits(img, ids, mask), b.model.itm_logits(img, noisy, mask))
    # and a text alone gives what it gives inside a padded batch
    one_ids, one_mask = b.tokenizer(["a red mug"])
    with torch.no_grad():
        alone = b.model.text(one_ids, one_mask)[0, : int(one_mask.sum())]
        assert torch.allclose(alone, a[0, : int(one_mask.sum())], atol=1e-6)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_recurrent_tower_saves_and_loads_exactly(kind, tmp_path):
    b = _bundle(kind)
    factory.save(b, tmp_path / "m")
    back = factory.load(tmp_path / "m")
    back.model.eval()
    assert back.config.text.recurrent["kind"] == kind and type(back.model.text).__name__ == "RecurrentTextTower"
    ids, mask = b.tokenizer(TEXTS[:3])
    with torch.no_grad():
        assert torch.equal(b.model.encode_text(ids, mask), back.model.encode_text(ids, mask))
    assert sum(p.numel() for p in b.model.parameters()) == sum(p.numel() for p in back.model.parameters())


def test_train_a_gru_model_from_the_cli(tmp_path, small_catalog):
    import json

    from typer.testing import CliRunner

    from vtfusion.ui.cli import app

    r = CliRunner().invoke(app, ["train", str(small_catalog / "train.csv"), "--out", str(tmp_path / "m"), "--epochs", "1",
                                 "--rerank-epochs", "1", "--batch-size", "16", "--device", "cpu", "--text-tower", "gru",
                                 "--image-size", "32"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "m" / "config.json").read_text())["text"]["recurrent"]["kind"] == "gru"
