"""Issue 17: real catalogs in, nothing broken. Column types per column, once; every row stands alone."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vtfusion.indexer.collection import Collection
from vtfusion.indexer.ingest import ingest
from vtfusion.indexer.lifecycle import errors, select_items, stats, verify
from vtfusion.ui.cli import app


@pytest.fixture
def cat(tmp_path, small_catalog):
    d = tmp_path / "cat"
    shutil.copytree(small_catalog, d)
    return d


def _imgs(cat: Path) -> list[str]:
    return sorted(f"images/{p.name}" for p in (cat / "images").iterdir() if p.suffix == ".png")


def _exts(c, where: str) -> list[str]:
    from sqlalchemy import select

    from vtfusion.indexer.schema import Item

    ids = select_items(c, where=where)
    with c.Session() as s:
        return sorted(s.scalars(select(Item.external_id).where(Item.id.in_(ids))))


def test_nan_brands_and_zip_codes_stay_text_and_every_filter_works(tmp_path, model_dir, cat, db_url):
    """The issue's repro: a brand 'Nan' was stored as a float NaN (SQLite: every --where then
    failed with 'malformed JSON'; PostgreSQL: the ingest crashed), '02139' became 2139."""
    im = _imgs(cat)
    brands = ["Nan", "NAN", "inf", "Infinity", "Acme"]
    (cat / "shop.csv").write_text("id,image,caption,brand,zip,price\n" + "".join(
        f"t{i},{im[i]},thing {i},{b},0213{i},{10 + i}\n" for i, b in enumerate(brands)))
    c = Collection.init(tmp_path / "c", model_dir, db_url=db_url)
    r = ingest(c, cat / "shop.csv", workers=0, progress=False)
    assert (r.added, r.failed) == (5, 0)
    assert _exts(c, "zip = '02132'") == ["t2"]
    assert _exts(c, "brand = 'Nan'") == ["t0"] and _exts(c, "brand IN ('inf', 'Infinity')") == ["t2", "t3"]
    assert _exts(c, "price >= 13") == ["t3", "t4"]
    for where in ("zip > 0", "brand = 'x' OR price < 11"):
        res = CliRunner().invoke(app, ["search", str(tmp_path / "c"), "thing", "--where", where, "--rerank-depth", "0"])
        assert res.exit_code == 0 and "Traceback" not in res.output, res.output
    res = CliRunner().invoke(app, ["search", str(tmp_path / "c"), "thing", "--where", "price = 'cheap'"])
    assert res.exit_code == 1 and "holds numbers" in res.output
    assert verify(c).ok


def test_declared_and_registered_types_hold_for_later_rows(tmp_path, model_dir, cat, db_url):
    im = _imgs(cat)
    (cat / "a.csv").write_text("id,image,caption,price,code\n" + "".join(f"a{i},{im[i]},a {i},{v},{k}\n" for i, (v, k) in enumerate(
        [("1.5", "7"), ("NaN", "8"), ("inf", "9"), ("3", "10")])))
    c = Collection.init(tmp_path / "c", model_dir, db_url=db_url, schema="price:number,code:text")
    r = ingest(c, cat / "a.csv", workers=0, progress=False)
    assert (r.added, r.failed) == (2, 2)  # NaN and inf do not fit a declared number column
    assert sorted(e.reason.split(";")[0] for e in errors(c)) == ["column 'price' holds numbers"] * 2
    assert _exts(c, "code = '7'") == ["a0"] and _exts(c, "price < 2") == ["a0"]
    (cat / "b.csv").write_text("id,image,caption,price,code\n" + f"b0,{im[4]},b 0,cheap,11\nb1,{im[5]},b 1,4,12\n")
    r = ingest(c, cat / "b.csv", workers=0, progress=False)  # 'price' is a number column now: 'cheap' is a row error
    assert (r.added, r.failed) == (1, 1) and _exts(c, "price >= 3") == ["a3", "b1"]
    res = CliRunner().invoke(app, ["ingest", str(tmp_path / "c"), str(cat / "b.csv"), "--schema", "price:text"])
    assert res.exit_code == 1 and "'price' is number in this collection already" in res.output
    assert "schema = \"code:text,price:number\"" in (tmp_path / "c" / "collection.toml").read_text()


def test_gzipped_catalogs_and_a_folder_of_parquet_files(tmp_path, model_dir, cat):
    import datetime
    import decimal

    import pyarrow as pa
    import pyarrow.parquet as pq

    im = _imgs(cat)
    with gzip.open(cat / "g.csv.gz", "wt") as f:
        f.write("id,image,caption,zip\n" + "".join(f"g{i},{im[i]},gz {i},0{i}\n" for i in range(3)))
    with gzip.open(cat / "j.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"id": f"j{i}", "image": im[3 + i], "caption": f"json {i}", "n": i, "tags": ["a", "b"]}) + "\n" for i in range(2))
    shutil.copytree(cat / "images", cat / "pq" / "images")
    for part in range(2):
        pq.write_table(pa.table({
            "id": [f"p{part}{i}" for i in range(2)], "image": [im[5 + 2 * part + i] for i in range(2)],
            "caption": [f"parquet {part} {i}" for i in range(2)],
            "when": [datetime.datetime(2026, 1, 1 + i) for i in range(2)],
            "price": pa.array([decimal.Decimal("1.25"), decimal.Decimal("2.50")], pa.decimal128(6, 2)),
        }), cat / "pq" / f"part-{part}.parquet")
    c = Collection.init(tmp_path / "c", model_dir)
    assert ingest(c, cat / "g.csv.gz", workers=0, progress=False).added == 3
    assert ingest(c, cat / "j.jsonl.gz", workers=0, progress=False).added == 2
    r = ingest(c, cat / "pq", workers=0, progress=False)
    assert (r.added, r.failed) == (4, 0)
    assert _exts(c, "zip = '01'") == ["g1"] and _exts(c, "n = 1") == ["j1"]
    assert _exts(c, "tags = '[\"a\",\"b\"]'") == ["j0", "j1"]
    assert _exts(c, "price > 2") == ["p01", "p11"] and _exts(c, "when = '2026-01-02T00:00:00'") == ["p01", "p11"]


def test_one_bad_row_never_stops_the_read(tmp_path, model_dir, cat, db_url):
    im = _imgs(cat)
    deep = "[" * 100_000 + "]" * 100_000
    (cat / "bad.jsonl").write_text("\n".join([
        json.dumps({"id": "ok1", "image": im[0], "caption": "fine"}),
        '{"id": "deep", "image": "' + im[1] + '", "caption": "x", "nest": ' + deep + "}",
        json.dumps({"id": "nulpath", "image": "ima\x00ges/x.png", "caption": "x"}),
        json.dumps({"id": "nultext", "image": im[2], "caption": "a\x00b"}),
        json.dumps({"id": "nulmeta", "image": im[3], "caption": "x", "m": {"k": "a\x00"}}),
        json.dumps({"id": "ok2", "image": im[4], "caption": "fine too"}),
    ]) + "\n")
    c = Collection.init(tmp_path / "c", model_dir, db_url=db_url)
    r = ingest(c, cat / "bad.jsonl", workers=0, progress=False)
    assert (r.added, r.failed) == (2, 4)
    reasons = sorted(e.reason for e in errors(c))
    assert any("nested too deeply" in x for x in reasons) and sum("NUL byte" in x for x in reasons) == 3
    r = ingest(c, cat / "bad.jsonl", workers=0, progress=False)  # and again: the same, nothing duplicated
    assert (r.added, r.duplicates, r.failed) == (0, 2, 4) and stats(c)["items_active"] == 2


def test_a_row_that_fails_to_store_or_embed_is_isolated_from_its_batch(tmp_path, model_dir, cat, monkeypatch, db_url):
    from vtfusion.indexer import ingest as ingest_mod

    im = _imgs(cat)
    (cat / "x.csv").write_text("id,image,caption\n" + "".join(f"x{i},{im[i]},caption {i}\n" for i in range(6)))
    c = Collection.init(tmp_path / "c", model_dir, db_url=db_url)
    real_text = ingest_mod.item_text

    def poisoned(row):  # x2's text cannot be stored (an object the driver refuses), x4's cannot be embedded
        t = real_text(row)
        return object() if row.external_id == "x2" and poisoned.writing else t

    poisoned.writing = False
    real_embed = ingest_mod._embed

    def embed(bundle, rows, fresh, encode, p):
        if any(rows[i].external_id == "x4" for i, _, _ in fresh):
            raise RuntimeError("the model choked")
        poisoned.writing = True
        return real_embed(bundle, rows, fresh, encode, p)

    monkeypatch.setattr(ingest_mod, "_embed", embed)
    real_commit = ingest_mod._commit_batch

    def commit(collection, rows, p, keep, *a, **k):
        monkeypatch.setattr(ingest_mod, "item_text", poisoned)
        try:
            return real_commit(collection, rows, p, keep, *a, **k)
        finally:
            monkeypatch.setattr(ingest_mod, "item_text", real_text)

    monkeypatch.setattr(ingest_mod, "_commit_batch", commit)
    r = ingest(c, cat / "x.csv", workers=0, progress=False, batch_size=6)
    assert (r.added, r.failed) == (4, 2), r
    reasons = {e.line: e.reason for e in errors(c)}
    assert "could not be embedded" in reasons[6] and "could not be stored" in reasons[4]
    assert verify(c).ok
