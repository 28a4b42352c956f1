"""Compositional text negatives (models/negatives.py): what is learned from a catalog's texts,
and property tests of the negatives drawn from it."""

from __future__ import annotations

import random
import shutil
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import TINY_VISION
from vtfusion.catalogs.demo import _random_obj, caption, generate_specs, title
from vtfusion.models import factory
from vtfusion.models.negatives import STOP_WORDS, WordSlots, words
from vtfusion.models.train import RerankConfig, TrainConfig
from vtfusion.workflows.train import train_catalog


def _catalog_texts(n: int = 600, seed: int = 0) -> list[tuple[str, str]]:
    """(title, caption) of n demo-catalog items: the texts a training run learns slots from."""
    rng = random.Random(seed)
    return [(title(spec), caption(spec, rng)) for spec, _ in generate_specs(n, rng)]


@pytest.fixture(scope="module")
def slots() -> WordSlots:
    return WordSlots.learn(_catalog_texts())


def _bag(text: str) -> Counter:
    return Counter(w for _, _, w in words(text))


def test_slots_and_synonyms_are_learned_from_the_texts(slots):
    slot = {w: i for i, s in enumerate(slots.slots) for w in s}
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "black", "pink"]
    assert len({slot[c] for c in colours}) == 1  # one slot, learned from contexts alone
    assert slot["left"] == slot["right"] and slot["mug"] == slot["sneaker"] and slot["small"] == slot["large"]
    assert len({slot["red"], slot["mug"], slot["small"], slot["striped"], slot["left"]}) == 5  # kinds stay apart
    m = slots.meanings
    assert m["small"] == m["little"] and m["large"] == m["big"] and m["mug"] == m["cup"] and m["striped"] == m["stripy"]
    assert m["small"] != m["large"] and m["red"] != m["blue"]
    assert not STOP_WORDS & set(slot)  # "to" / "on", "of" / "and" share contexts but are no negative


def test_one_text_per_item_gives_slots_without_synonyms():
    s = WordSlots.learn([(c,) for _, c in _catalog_texts()])
    assert s.slots and len(set(s.meanings.values())) == len(s.meanings)


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_a_negative_differs_keeps_the_bag_for_swaps_and_changes_one_kind(slots, seed):
    rng = random.Random(seed)
    spec = (_random_obj(rng), _random_obj(rng)) if rng.random() < 0.7 else (_random_obj(rng),)
    text = caption(spec, rng)
    neg = slots.negative(text, rng)
    assert neg is not None and neg != text
    a, b = [w for _, _, w in words(text)], [w for _, _, w in words(neg)]
    assert len(a) == len(b)
    changed = [(x, y) for x, y in zip(a, b) if x != y]
    slot = slots.slot_of
    # every changed word is a slot word replaced by one of its slot with another meaning
    assert changed and all(slot[x] == slot[y] and slots.meanings[x] != slots.meanings[y] for x, y in changed)
    if len(changed) == 2:  # a swap: the same words, two of them exchanged
        assert _bag(neg) == _bag(text) and changed[0] == changed[1][::-1]
    else:
        assert len(changed) == 1


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_a_negative_never_equals_another_positive_of_the_batch(slots, seed):
    rng = random.Random(seed)
    a, b = _random_obj(rng), _random_obj(rng)
    # a batch of attribute-swapped twins: each one's most natural negative is the other
    left = f"a small {a.color} mug to the left of a large {b.color} hat"
    right = f"a small {b.color} mug to the left of a large {a.color} hat"
    batch = [left, right, f"a {a.color} lamp", f"a {a.color} lamp on the left"]
    for n, t in zip(slots.negatives(batch, rng), batch):
        assert n is None or (n != t and n not in batch)


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(2, 6))
def test_negatives_of_kinds_each_change_one_slot_and_differ(slots, seed, k):
    """Up to k negatives of a caption: distinct, none the caption or another text of the batch,
    each changing the words of one slot only (a different slot each), swaps keeping the bag."""
    rng = random.Random(seed)
    spec = (_random_obj(rng), _random_obj(rng)) if rng.random() < 0.7 else (_random_obj(rng),)
    text = caption(spec, rng)
    other = caption((_random_obj(rng),), rng)
    per = slots.negative_lists([text, other], rng, k)
    negs = per[0]
    in_text = {slots.slot_of[w] for _, _, w in words(text) if w in slots.slot_of}
    assert 1 <= len(negs) <= min(k, len(in_text)) and len(set(negs)) == len(negs)
    assert text not in negs and other not in negs
    kinds = []
    for neg in negs:
        a, b = [w for _, _, w in words(text)], [w for _, _, w in words(neg)]
        changed = [(x, y) for x, y in zip(a, b) if x != y]
        assert len(a) == len(b) and changed
        assert len({slots.slot_of[x] for x, _ in changed}) == 1  # one slot
        assert all(slots.slot_of[x] == slots.slot_of[y] and slots.meanings[x] != slots.meanings[y] for x, y in changed)
        if len(changed) == 2 and changed[0] == changed[1][::-1]:
            assert _bag(neg) == _bag(text)
        kinds.append(slots.slot_of[changed[0][0]])
    assert len(set(kinds)) == len(kinds)  # each negative another kind
    if len(in_text) >= k:
        assert len(negs) == k


def test_negatives_keep_case_and_punctuation(slots):
    rng = random.Random(0)
    neg = slots.negative("Small red striped mug | large blue plain hat", rng)
    assert neg[0].isupper() and " | " in neg and neg != "Small red striped mug | large blue plain hat"
    assert slots.negative("nothing from the catalog here", rng) is None


@pytest.mark.parametrize("per_text", [1, 3])
def test_training_with_text_negatives_runs_both_stages_and_resumes_the_same(tmp_path, small_catalog, per_text):
    """Negatives are drawn from (seed, stage, step): a run resumed from an earlier checkpoint
    ends with the weights of the uninterrupted run (one negative per caption, or three of
    different slots)."""
    cfg = TrainConfig(epochs=2, batch_size=16, progress=False, text_negatives=True, checkpoint_every=3,
                      rerank=RerankConfig(epochs=1), negatives_per_text=per_text)
    whole = train_catalog(small_catalog / "train.csv", tmp_path / "whole", cfg, vision=TINY_VISION)
    assert whole.result.rerank_steps > 0 and (tmp_path / "whole" / "word_slots.json").is_file()
    ref = factory.load(tmp_path / "whole").model.state_dict()
    ckpts = sorted((tmp_path / "whole" / "checkpoints").iterdir())
    assert len(ckpts) >= 2
    for c in ckpts[1:]:  # back to the oldest checkpoint kept
        shutil.rmtree(c)
    train_catalog(small_catalog / "train.csv", tmp_path / "whole", cfg, vision=TINY_VISION, resume=True)
    got = factory.load(tmp_path / "whole").model.state_dict()
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_cli_defaults_follow_the_training_config():
    """`vtfusion train` (whose module must not import torch to start fast) states its own
    defaults: they must be TrainConfig's, so `train`, `demo` and the library train alike."""
    import inspect

    from vtfusion.ui.cli import train_cmd

    params = inspect.signature(train_cmd).parameters
    cfg = TrainConfig()
    assert params["text_negatives"].default is cfg.text_negatives is True
    assert params["calibration"].default == cfg.calibration == 0.0
    assert params["negatives_per_text"].default == cfg.negatives_per_text
