"""The demo catalog: deterministic for a seed, unique items, attribute-swapped twins."""

from __future__ import annotations

import csv
import hashlib
import re
from collections import Counter

from vtfusion.catalogs.demo import CATEGORIES, COLORS, generate


def _digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _rows(folder):
    out = []
    for split in ("train", "test"):
        with open(folder / f"{split}.csv", newline="") as f:
            out += [dict(r, split=split) for r in csv.DictReader(f)]
    return out


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    generate(tmp_path / "a", n=40, seed=5, image_size=40)
    generate(tmp_path / "b", n=40, seed=5, image_size=40)
    generate(tmp_path / "c", n=40, seed=6, image_size=40)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_catalog_format_and_splits(small_catalog):
    rows = _rows(small_catalog)
    assert len(rows) == 64
    assert {r["split"] for r in rows} == {"train", "test"}
    assert len({r["id"] for r in rows}) == 64
    assert len({r["title"].lower() for r in rows}) == 64  # every item is a distinct attribute combination
    for r in rows:
        assert (small_catalog / r["image"]).is_file()  # relative to the CSV
        assert r["category"] in CATEGORIES and r["color"] in COLORS
        assert float(r["price"]) > 0 and r["n_objects"] in ("1", "2")


def _words(text):
    return Counter(re.findall(r"[a-z-]+", text.lower()))


def test_twins_share_words_but_not_images_and_stay_in_one_split(small_catalog):
    rows = {r["id"]: r for r in _rows(small_catalog)}
    twins = [(r, rows[r["twin_id"]]) for r in rows.values() if r["twin_id"]]
    assert len(twins) >= 10
    for a, b in twins:
        assert b["twin_id"] == a["id"]
        assert a["split"] == b["split"]
        assert _words(a["title"]) == _words(b["title"])  # a bag of words cannot tell them apart
        assert a["title"] != b["title"]
        assert (small_catalog / a["image"]).read_bytes() != (small_catalog / b["image"]).read_bytes()


def test_captions_bind_attributes_to_positions(small_catalog):
    rows = _rows(small_catalog)
    two = [r for r in rows if r["n_objects"] == "2"]
    assert two and all(re.search(r"left|right", r["caption"]) for r in two)
    assert len({re.sub(r"\ba (?:large|big|small|little) [a-z -]+?(?= to| on| with|,|$)", "X", r["caption"]) for r in two}) > 2


def test_swapped_twin_images_differ_where_the_attribute_moved(tmp_path):
    """Pixels agree with the words: in a colour-swapped twin the left object's colour changes."""
    from PIL import Image

    from vtfusion.catalogs.demo import COLORS as RGB

    generate(tmp_path, n=200, seed=11, image_size=64)
    rows = {r["id"]: r for r in _rows(tmp_path)}
    checked = 0
    for r in rows.values():
        t = rows.get(r["twin_id"])
        if not t or r["color"] == t["color"] or r["category"] != t["category"]:
            continue
        for row in (r, t):
            img = Image.open(tmp_path / row["image"]).convert("RGB")
            left = img.crop((0, 0, 32, 64))
            target = RGB[row["color"]]
            near = sum(1 for px in left.get_flattened_data() if sum(abs(a - b) for a, b in zip(px, target)) < 30)
            assert near > 5, (row["id"], row["color"])
        checked += 1
    assert checked >= 3


def test_default_catalog_text_is_unchanged_by_the_split_options(tmp_path):
    """The generalisation options are off by default and draw nothing when off: the CSVs of a
    seed are the ones written before they existed (digests recorded then)."""
    generate(tmp_path / "c", n=120, seed=5, image_size=48)
    md5 = {s: hashlib.md5((tmp_path / "c" / f"{s}.csv").read_bytes()).hexdigest() for s in ("train", "test")}
    assert md5 == {"train": "10ff8ca1a8a644f56b2c66713f2c967a", "test": "0b8c89fb44f094827646c6e0e05ca1ca"}
    assert not (tmp_path / "c" / "split.json").exists()


def test_a_generalisation_split(tmp_path):
    import json

    from vtfusion.catalogs.demo import HELD_OUT_PAIR, HELD_OUT_SINGLE

    counts = generate(tmp_path / "g", n=400, seed=2, image_size=32, train_twins=False, test_twins_only=True,
                      held_out_phrasings=True, held_out_combo_share=0.125)
    rows = _rows(tmp_path / "g")
    train, test = [r for r in rows if r["split"] == "train"], [r for r in rows if r["split"] == "test"]
    assert train and test and counts["train"] == len(train) and counts["test"] == len(test)
    assert all(r["twin_id"] == "" for r in train)  # no twins to learn from
    ids = {r["id"]: r for r in test}
    assert all(r["twin_id"] in ids and ids[r["twin_id"]]["twin_id"] == r["id"] for r in test)  # every test item has its twin
    held = json.loads((tmp_path / "g" / "split.json").read_text())["held_out_combos"]
    assert len(held) == 8 and held == counts["held_out_combos"]
    in_test = 0
    for combo in held:  # never in a training title; the test split has them
        color, category = combo.split(" ", 1)
        pattern = re.compile(rf"\b{color} \w+ {re.escape(category)}\b", re.I)
        assert not any(pattern.search(r["title"]) for r in train), combo
        in_test += any(pattern.search(r["title"]) for r in test)
    assert in_test >= len(held) // 2

    def held_out(text):
        forms = [t.replace("{p}", "X") for t in HELD_OUT_SINGLE] + [t.replace("{a}", "X").replace("{b}", "X") for t in HELD_OUT_PAIR]
        return any(re.fullmatch(re.escape(f).replace("X", ".+"), text) for f in forms)

    assert all(held_out(r["caption"]) for r in test)
    assert not any(held_out(r["caption"]) for r in train)


def test_demo_catalog_generalisation_from_the_cli(tmp_path):
    from typer.testing import CliRunner

    from vtfusion.ui.cli import app

    r = CliRunner().invoke(app, ["demo-catalog", str(tmp_path / "g"), "--n", "200", "--seed", "1", "--image-size", "32", "--generalisation"])
    assert r.exit_code == 0, r.output
    assert "combinations in the test split only:" in r.output and (tmp_path / "g" / "split.json").is_file()
    r = CliRunner().invoke(app, ["demo-catalog", str(tmp_path / "h"), "--n", "50", "--held-out-combos", "1.5"])
    assert r.exit_code == 1 and "[0, 1)" in r.output
