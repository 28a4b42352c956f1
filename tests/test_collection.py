"""Collections end to end on SQLite and PostgreSQL: ingest, dedup, bad input, delete, verify,
reindex, catch-up, a refused index from another model."""

from __future__ import annotations

import csv
import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import func, select

from vtfusion.indexer.collection import Collection, CollectionError
from vtfusion.indexer.ingest import ingest
from vtfusion.indexer.lifecycle import delete, reindex, select_items, stats, verify
from vtfusion.indexer.schema import Embedding, IngestError, Item
from vtfusion.indexer.vectors import read_meta


def _state(c: Collection) -> dict:
    """Everything an ingest can change, comparable across runs."""
    with c.Session() as s:
        items = s.execute(select(Item.id, Item.external_id, Item.content_hash, Item.status, Item.token_shard, Item.token_offset).order_by(Item.id)).all()
        n_emb = s.scalar(select(func.count()).select_from(Embedding))
        n_err = s.scalar(select(func.count()).select_from(IngestError))
    return {
        "items": [tuple(r) for r in items],
        "embeddings": n_emb,
        "errors": n_err,
        "faiss": {m: sorted(ix.ids().tolist()) for m, ix in c.indexes.items()},
        "tokens": c.tokens.total_records(),
    }


def _self_search(c: Collection, modality: str):
    """Each stored vector's nearest neighbour in its index is its own item."""
    with c.Session() as s:
        rows = s.execute(
            select(Embedding.item_id, Embedding.vector).join(Item, Item.id == Embedding.item_id)
            .where(Embedding.modality == modality, Item.status == "active")
        ).all()
    ids = np.array([r.item_id for r in rows])
    xq = np.stack([np.frombuffer(r.vector, np.float32) for r in rows])
    _, I = c.indexes[modality].search(xq, 1)
    return ids, I[:, 0]


def test_ingest_twice_is_identical_and_ids_resolve(tmp_path, model_dir, small_catalog, db_url):
    c = Collection.init(tmp_path / "col", model_dir, db_url=db_url)
    r1 = ingest(c, small_catalog / "train.csv", workers=0, progress=False)
    n_rows = sum(1 for _ in open(small_catalog / "train.csv")) - 1
    assert (r1.added, r1.duplicates, r1.failed) == (n_rows, 0, 0)
    first = _state(c)
    r2 = ingest(c, small_catalog / "train.csv", workers=0, progress=False)
    assert (r2.added, r2.duplicates, r2.failed) == (0, n_rows, 0)
    assert _state(c) == first
    st = stats(c)
    assert st["items_active"] == n_rows and st["embeddings"] == {"image": n_rows, "text": n_rows}
    assert st["indexes"]["image"]["count"] == n_rows
    ids, nearest = _self_search(c, "image")
    assert (ids == nearest).mean() > 0.95  # FAISS ids are the SQL keys
    with c.Session() as s:
        first_id = next(csv.DictReader(open(small_catalog / "train.csv")))["id"]
        meta = s.scalar(select(Item.meta).where(Item.external_id == first_id))
    assert isinstance(meta["price"], float) and meta["n_objects"] in (1, 2)
    assert verify(c).ok
    # reopening sees the same state
    c.close()
    c2 = Collection.open(tmp_path / "col")
    assert _state(c2) == first


def test_jsonl_parquet_and_folder_sources(tmp_path, model_dir, small_catalog):
    import pyarrow as pa
    import pyarrow.parquet as pq

    small_catalog = shutil.copytree(small_catalog, tmp_path / "cat")
    rows = list(csv.DictReader(open(small_catalog / "train.csv")))
    jl = small_catalog / "part.jsonl"
    jl.write_text("".join(json.dumps({**r, "price": float(r["price"])}) + "\n" for r in rows[:5]))
    pq.write_table(pa.Table.from_pylist(rows[5:9]), small_catalog / "part.parquet")
    folder = tmp_path / "folder"
    folder.mkdir()
    for r in rows[9:12]:
        shutil.copy(small_catalog / r["image"], folder / f"{r['id']}.png")
        (folder / f"{r['id']}.txt").write_text(r["caption"])
    shutil.copy(small_catalog / rows[12]["image"], folder / "no-caption.png")
    c = Collection.init(tmp_path / "col", model_dir)
    assert ingest(c, jl, workers=0, progress=False).added == 5
    assert ingest(c, small_catalog / "part.parquet", workers=0, progress=False).added == 4
    assert ingest(c, folder, workers=0, progress=False).added == 4
    st = stats(c)
    assert st["embeddings"] == {"image": 13, "text": 12}  # the caption-less image has no text vector
    assert verify(c).ok


def _bad_catalog(root, good_src):
    """A catalog whose rows hit every bad-input case, plus good rows around them."""
    img = root / "img"
    img.mkdir(parents=True)
    good = sorted(good_src.glob("images/*.png"))[:4]
    for i, p in enumerate(good):
        shutil.copy(p, img / f"good{i}.png")
    data = good[0].read_bytes()
    (img / "truncated.png").write_bytes(data[: len(data) // 2])
    (img / "empty.jpg").write_bytes(b"")
    (img / "text.jpg").write_text("this is not a jpeg")
    Image.new("L", (8200, 8200)).save(img / "bomb.png")  # 67 M pixels, over the 64 M cap
    (root / "outside.png").write_bytes(data)
    lines = [
        "id,image,caption,color,price",
        "g0,img/good0.png,a red mug,red,5",
        "t1,img/truncated.png,truncated image,red,5",
        "t2,img/empty.jpg,zero bytes,red,5",
        "t3,img/text.jpg,text named jpg,red,5",
        "t4,img/missing.png,missing file,red,5",
        "t5,img/bomb.png,decompression bomb,red,5",
        "t6,img/good1.png,,red,5",
        f"t7,img/good1.png,{'x' * 30000},red,5",
        "t8,../outside.png,escapes the folder,red,5",
        "t9,img/good1.png",
        "g1,img/good1.png,a blue mug,blue,7",
    ]
    raw = ("\n".join(lines) + "\n").encode() + b"t10,img/good2.png,caf\xe9 latin-1,red,5\ng2,img/good3.png,a green hat,green,9\n"
    (root / "bad.csv").write_bytes(raw)
    return root / "bad.csv"


def test_every_bad_input_is_recorded_and_good_rows_land(tmp_path, model_dir, small_catalog, db_url):
    path = _bad_catalog(tmp_path / "bad", small_catalog)
    c = Collection.init(tmp_path / "col", model_dir, db_url=db_url)
    r = ingest(c, path, workers=0, progress=False)
    assert r.added == 3 and r.failed == 10
    with c.Session() as s:
        errs = {e.line: e.reason for e in s.scalars(select(IngestError))}
        landed = sorted(s.scalars(select(Item.external_id)))
    assert landed == ["g0", "g1", "g2"]
    expect = {
        3: "corrupt or truncated", 4: "not an image", 5: "not an image", 6: "not found", 7: "over the cap",
        8: "no text", 9: "longer than", 10: "outside the catalog folder", 11: "wrong number of fields",
        13: "not UTF-8",
    }
    for line, words in expect.items():
        assert words in errs.get(line, ""), (line, errs.get(line))
    assert sorted(errs) == sorted(expect)
    with c.Session() as s:
        assert {e.file for e in s.scalars(select(IngestError))} == {str(path)}
    # re-running records nothing twice
    r2 = ingest(c, path, workers=0, progress=False)
    assert r2.added == 0 and r2.duplicates == 3
    with c.Session() as s:
        assert s.scalar(select(func.count()).select_from(IngestError)) == len(errs)
    assert verify(c).ok


def test_delete_never_comes_back(tmp_path, model_dir, small_catalog, db_url):
    c = Collection.init(tmp_path / "col", model_dir, db_url=db_url)
    ingest(c, small_catalog / "train.csv", workers=0, progress=False)
    by_ext = select_items(c, ids=[next(csv.DictReader(open(small_catalog / "train.csv")))["id"]])
    by_where = select_items(c, where="color = 'red' AND price < 1000")
    assert len(by_ext) == 1 and by_where
    gone = sorted(set(by_ext + by_where))
    assert delete(c, gone) == len(gone)
    assert delete(c, gone) == 0  # already tombstoned
    for m in ("image", "text"):
        assert not set(gone) & set(c.indexes[m].ids().tolist())
    # ingesting the same catalog again does not resurrect them (content dedup)
    ingest(c, small_catalog / "train.csv", workers=0, progress=False)
    reindex(c)
    reopened = Collection.open(tmp_path / "col")
    for m in ("image", "text"):
        assert not set(gone) & set(reopened.indexes[m].ids().tolist())
        ids, nearest = _self_search(reopened, m)
        assert not set(gone) & set(nearest.tolist())
    with c.Session() as s:
        assert s.scalar(select(func.count()).where(Item.status == "deleted")) == len(gone)
    assert verify(reopened).ok


def test_index_catches_up_after_a_crash_before_the_faiss_save(tmp_path, model_dir, small_catalog, monkeypatch):
    c = Collection.init(tmp_path / "col", model_dir)
    monkeypatch.setattr(Collection, "catch_up", lambda self: {})  # the process dies after the SQL commits
    ingest(c, small_catalog / "train.csv", workers=0, progress=False)
    monkeypatch.undo()
    assert not read_meta(tmp_path / "col" / "index") or read_meta(tmp_path / "col" / "index")["image"].count == 0
    c2 = Collection.open(tmp_path / "col")
    assert verify(c2).ok and c2.indexes["image"].ntotal == stats(c2)["items_active"]


def test_index_from_another_model_is_rebuilt_from_the_database(tmp_path, model_dir, small_catalog, caplog):
    """SQL's embeddings are the collection model's (reembed switches both in one transaction):
    an index stamped with another model is a leftover, rebuilt from them on open."""
    c = Collection.init(tmp_path / "col", model_dir)
    ingest(c, small_catalog / "test.csv", workers=0, progress=False)
    meta_path = tmp_path / "col" / "index" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["image"]["model_fingerprint"] = "0000000000000000"
    meta_path.write_text(json.dumps(meta))
    c2 = Collection.open(tmp_path / "col")
    assert "rebuilding it" in caplog.text
    assert json.loads(meta_path.read_text())["image"]["model_fingerprint"] == c.config.model_fingerprint
    assert verify(c2).ok


def test_reindex_with_another_factory(tmp_path, model_dir, small_catalog):
    c = Collection.init(tmp_path / "col", model_dir)
    ingest(c, small_catalog / "train.csv", workers=0, progress=False)
    before = {m: c.indexes[m].search(np.eye(24, dtype=np.float32)[:3], 5)[1] for m in ("image",)}
    built = reindex(c, "IVF1,Flat")  # one list probed exhaustively: same answers as exact
    assert built == {"image": "IVF1,Flat", "text": "IVF1,Flat"}
    assert Collection.open(tmp_path / "col").config.index_factory == "IVF1,Flat"
    np.testing.assert_array_equal(c.indexes["image"].search(np.eye(24, dtype=np.float32)[:3], 5)[1], before["image"])


def test_open_and_init_errors_are_actionable(tmp_path, model_dir):
    with pytest.raises(CollectionError, match="vtfusion init"):
        Collection.open(tmp_path / "nothing")
    with pytest.raises(CollectionError, match="not a vtfusion model folder"):
        Collection.init(tmp_path / "a", tmp_path)
    Collection.init(tmp_path / "b", model_dir)
    with pytest.raises(CollectionError, match="already holds"):
        Collection.init(tmp_path / "b", model_dir)


def test_database_url_takes_secrets_from_the_environment(tmp_path, model_dir, small_catalog, db_url, second_db_url, monkeypatch, caplog):
    """collection.toml may name ${VARIABLES} instead of holding a password; they are expanded
    (and URL-quoted) when the collection opens, also in ingest's worker processes; an unset one
    is a clear error. A password written out makes collection.toml owner-only, with a warning."""
    from sqlalchemy.engine import make_url

    secret = "p@ss/w:rd%"  # would break the URL if not quoted
    monkeypatch.setenv("VTF_TEST_PW", secret)
    if db_url:
        u = make_url(db_url)
        monkeypatch.setenv("VTF_TEST_DB", u.database)
        url = f"postgresql+psycopg://{u.username}:${{VTF_TEST_PW}}@{u.host}:{u.port}/${{VTF_TEST_DB}}"
    else:
        monkeypatch.setenv("VTF_TEST_DIR", str(tmp_path / "elsewhere"))
        (tmp_path / "elsewhere").mkdir()
        url = "sqlite:///${VTF_TEST_DIR}/cat.db"
    c = Collection.init(tmp_path / "c", model_dir, db_url=url)
    added = ingest(c, small_catalog / "test.csv", workers=2, progress=False).added
    c.close()
    toml = (tmp_path / "c" / "collection.toml").read_text()
    assert "${VTF_TEST_PW}" in toml or "${VTF_TEST_DIR}" in toml
    assert secret not in toml and str(tmp_path / "elsewhere") not in toml
    if not db_url:
        assert (tmp_path / "elsewhere" / "cat.db").exists()
    c = Collection.open(tmp_path / "c")
    assert stats(c)["items_active"] == added > 0
    c.close()
    monkeypatch.delenv("VTF_TEST_PW" if db_url else "VTF_TEST_DIR")
    with pytest.raises(CollectionError, match="VTF_TEST_(PW|DIR).*no such environment variable"):
        Collection.open(tmp_path / "c")

    if db_url:  # a password written out: kept, but owner-only and warned about
        u = make_url(second_db_url)
        with caplog.at_level("WARNING"):
            Collection.init(tmp_path / "d", model_dir, db_url=u.set(password="written-out").render_as_string(hide_password=False)).close()
        assert "plain text" in caplog.text
        assert (tmp_path / "d" / "collection.toml").stat().st_mode & 0o777 == 0o600
        assert Collection.open(tmp_path / "d").config.db_url.count("written-out") == 1


def test_resolve_url_quotes_each_part_and_reads_the_query_and_port(monkeypatch):
    from sqlalchemy.engine import make_url

    from vtfusion.indexer.collection import literal_password, resolve_url

    monkeypatch.setenv("VTF_PW", "p@ss/w:rd")
    monkeypatch.setenv("VTF_KEY", "/keys/a b.pem")
    monkeypatch.setenv("VTF_PORT", "5433")
    u = make_url(resolve_url("postgresql+psycopg://app:${VTF_PW}@db:5432/cat?sslkey=${VTF_KEY}"))
    assert (u.username, u.password, u.host, u.port, u.database, u.query["sslkey"]) == ("app", "p@ss/w:rd", "db", 5432, "cat", "/keys/a b.pem")
    assert make_url(resolve_url("postgresql://app@db:${VTF_PORT}/cat")).port == 5433
    assert resolve_url("sqlite:///x.db") == "sqlite:///x.db"
    assert literal_password("postgresql://app:secret@db/cat") and not literal_password("postgresql://app:${VTF_PW}@db/cat")
    assert not literal_password("postgresql://app@db/cat") and not literal_password("")


def test_filter_errors_are_clean(tmp_path, model_dir, small_catalog):
    from vtfusion.indexer.filters import FilterError

    c = Collection.init(tmp_path / "col", model_dir)
    ingest(c, small_catalog / "test.csv", workers=0, progress=False)
    for bad, msg in [
        ("colour = 'red'", "unknown column 'colour'"),
        ("color = 'red'; DROP TABLE items", "unexpected character"),
        ("price < 'cheap'", "holds numbers"),
        ("color = ", "expected a value"),
        ("(color = 'red'", "expected ')'"),
    ]:
        with pytest.raises(FilterError, match=re.escape(msg)):
            select_items(c, where=bad)
    with c.Session() as s:
        assert s.scalar(select(func.count()).select_from(Item)) > 0  # nothing was dropped
    assert select_items(c, where="color IN ('red', 'blue') OR price BETWEEN 0 AND 10") is not None


def _vectors(c: Collection, modality: str) -> dict[str, np.ndarray]:
    with c.Session() as s:
        rows = s.execute(
            select(Item.external_id, Embedding.vector).join(Item, Item.id == Embedding.item_id).where(Embedding.modality == modality)
        ).all()
    return {ext: np.frombuffer(v, np.float32) for ext, v in rows}


def _token_records(c: Collection) -> dict[str, np.ndarray]:
    with c.Session() as s:
        rows = s.execute(select(Item.external_id, Item.token_shard, Item.token_offset)).all()
    return {ext: c.tokens.read([(shard, off)])[0] for ext, shard, off in rows}


def test_worker_processes_give_the_same_collection(tmp_path, model_dir, small_catalog, db_url, second_db_url):
    """Worker processes (on a CPU they decode AND embed, each on one thread, against their own
    database connection) give what the main process alone gives: the same items, ids, errors,
    embeddings and token records, also when the same content comes twice in one batch, twice in
    batches that different workers embed at the same time, and alongside a bad row."""
    cat = tmp_path / "cat"
    shutil.copytree(small_catalog, cat)
    with open(cat / "train.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    dup = lambda r, new_id: {**r, "id": new_id}  # noqa: E731 - same image and text: same content
    rows = rows[:3] + [dup(rows[0], "same-batch")] + rows[3:] + [dup(rows[1], "later-batch"), dup(rows[9], "last-batch")]
    rows.insert(5, {**rows[5], "id": "gone", "image": "images/missing.png"})
    with open(cat / "train.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)

    a = Collection.init(tmp_path / "a", model_dir, db_url=db_url)
    ra = ingest(a, cat / "train.csv", workers=0, batch_size=8, progress=False)
    b = Collection.init(tmp_path / "b", model_dir, db_url=second_db_url)
    rb = ingest(b, cat / "train.csv", workers=2, batch_size=8, progress=False)
    assert (ra.added, ra.duplicates, ra.failed) == (rb.added, rb.duplicates, rb.failed) == (len(rows) - 4, 3, 1)
    assert _state(a) == _state(b)
    for modality in ("image", "text"):
        va, vb = _vectors(a, modality), _vectors(b, modality)
        assert va.keys() == vb.keys() and len(va) == ra.added
        assert all(np.allclose(va[k], vb[k], atol=1e-5) for k in va), modality
    ta, tb = _token_records(a), _token_records(b)
    assert ta.keys() == tb.keys()
    assert all(np.allclose(ta[k], tb[k], atol=1e-2) for k in ta)  # fp16 records of 1- vs 2-thread forwards
    assert verify(b).ok


def test_changed_row_replaces_its_older_version(tmp_path, model_dir, small_catalog, db_url):
    shutil.copytree(small_catalog, tmp_path / "cat")
    cat = tmp_path / "cat" / "train.csv"
    rows = list(csv.DictReader(open(cat)))
    c = Collection.init(tmp_path / "col", model_dir, db_url=db_url)
    ingest(c, cat, workers=0, progress=False)
    with c.Session() as s:
        old_id = s.scalar(select(Item.id).where(Item.external_id == rows[0]["id"]))
    rows[0]["caption"] = "a completely new caption for the first product"
    with open(cat, "w", newline="") as f:  # the catalog file edited in place
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    r = ingest(c, cat, workers=0, progress=False)
    assert (r.added, r.replaced, r.duplicates) == (1, 1, len(rows) - 1)
    with c.Session() as s:
        versions = s.execute(select(Item.id, Item.status, Item.text).where(Item.external_id == rows[0]["id"])).all()
    assert sorted(v.status for v in versions) == ["active", "replaced"]
    new = next(v for v in versions if v.status == "active")
    assert "completely new caption" in new.text
    assert old_id not in set(c.indexes["text"].ids().tolist()) and new.id in set(c.indexes["text"].ids().tolist())
    assert stats(c)["items_active"] == len(rows) and verify(c).ok


def test_migrations_build_exactly_the_models_schema(tmp_path, model_dir, db_url):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from vtfusion.indexer.schema import Base

    c = Collection.init(tmp_path / "col", model_dir, db_url=db_url)
    with c.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []
