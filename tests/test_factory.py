"""save -> load: bit-identical outputs, JSON + safetensors only, never unpickling."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from conftest import TINY_VISION, tiny_bundle
from vtfusion.models import factory
from vtfusion.models.config import ModelConfig


def _outputs(b):
    g = torch.Generator().manual_seed(7)
    px = b.transform.normalize(torch.randint(0, 256, (3, 3, 37, 37), dtype=torch.uint8, generator=g))
    ids, mask = b.tokenizer(["a large red striped mug", "a big green dotted hat", "bag"])
    with torch.no_grad():
        tokens = b.model.image_tokens(px)
        return [b.model.encode_image(px), b.model.encode_text(ids, mask), tokens, b.model.itm_logits(tokens, ids, mask)]


@pytest.fixture
def no_unpickling(monkeypatch):
    """Any unpickling during the test raises."""

    def refuse(*a, **k):
        raise AssertionError("something tried to unpickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)


def test_save_load_is_bit_identical(tmp_path, no_unpickling):
    b = tiny_bundle()
    b.model.eval()
    # move BatchNorm statistics away from their defaults so they must round-trip too
    for mod in b.model.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 1.5)
    before = _outputs(b)
    fp = factory.save(b, tmp_path / "m")
    names = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert "config.json" in names and "model.safetensors" in names and "tokenizer.json" in names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pkl", ".pth"))]
    loaded = factory.load(tmp_path / "m")
    assert loaded.fingerprint == fp and len(fp) == 16
    for x, y in zip(before, _outputs(loaded)):
        assert torch.equal(x, y)
    assert loaded.config == b.config


def test_config_json_round_trip(tmp_path):
    cfg = tiny_bundle().config
    cfg.save(tmp_path)
    assert ModelConfig.load(tmp_path) == cfg
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["vision"]["image_size"] == TINY_VISION.image_size and raw["text"]["bert"]["hidden_size"] == 20


def test_fingerprint_changes_with_weights(tmp_path):
    b = tiny_bundle()
    fp1 = factory.save(b, tmp_path / "a")
    with torch.no_grad():
        b.model.itm_head.bias.add_(1.0)
    assert factory.save(b, tmp_path / "b") != fp1


def test_missing_or_mismatched_folder_is_a_clear_error(tmp_path):
    with pytest.raises(factory.ModelLoadError, match="not a vtfusion model folder"):
        factory.load(tmp_path)
    b = tiny_bundle()
    factory.save(b, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["fusion"]["num_layers"] = 3
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(factory.ModelLoadError, match="does not match"):
        factory.load(tmp_path / "m")


def test_newer_format_is_refused(tmp_path):
    tiny_bundle().config.save(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["format_version"] = 99
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="newer"):
        ModelConfig.load(tmp_path)


def test_minilm_text_tower_loads_offline_and_round_trips(tmp_path, no_unpickling):
    from vtfusion.models.text import minilm_folder

    folder = minilm_folder()
    b = factory.build_pretrained_text(folder, vision=TINY_VISION)
    assert b.config.text.source == "pretrained" and b.model.text.width == 384
    ids, mask = b.tokenizer(["a red mug"])
    assert ids[0, 0].item() == 101  # BERT's [CLS]: the package's own vocabulary
    b.model.eval()
    # the text tower is really the pretrained one: its hidden states equal transformers' own load
    from transformers import BertModel

    ref = BertModel.from_pretrained(folder, add_pooling_layer=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(b.model.text(ids, mask), ref(input_ids=ids, attention_mask=mask).last_hidden_state)
    before = _outputs_minilm(b)
    factory.save(b, tmp_path / "m")
    loaded = factory.load(tmp_path / "m")  # rebuilt from config.json alone
    for x, y in zip(before, _outputs_minilm(loaded)):
        assert torch.equal(x, y)


def _outputs_minilm(b):
    ids, mask = b.tokenizer(["a large red striped mug", "hat"])
    with torch.no_grad():
        return [b.model.encode_text(ids, mask)]


def test_from_pretrained_and_save_pretrained(tmp_path, model_dir, monkeypatch):
    """Bundle.save_pretrained writes what Bundle.from_pretrained reads (today's folder format:
    config.json + model.safetensors + tokenizer), weights equal; a Hub id of a vtfusion model
    not in the cache, offline, is a clear error naming `hf download`."""
    from vtfusion.models.factory import Bundle, ModelLoadError

    b = Bundle.from_pretrained(model_dir)
    fp = b.save_pretrained(tmp_path / "copy")
    reports = {"word_slots.json", "calibration.json", "validation.json"}  # training's reports, not the model
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == sorted(
        p.name for p in model_dir.iterdir() if p.is_file() and p.name not in reports)
    again = Bundle.from_pretrained(tmp_path / "copy")
    assert again.fingerprint == fp == b.fingerprint
    for (n1, p1), (n2, p2) in zip(b.model.state_dict().items(), again.model.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelLoadError, match="hf download vtfusion-tests/no-such-model"):
        Bundle.from_pretrained("vtfusion-tests/no-such-model")
