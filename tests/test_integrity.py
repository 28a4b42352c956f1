"""The record of truth holds (issue 16): token cache, database and indexes never silently disagree.

Each test reproduces an event that used to give wrong results without an error: a token write
that failed half-way and was retried in the same process, a second writer killed mid-record,
two collections in one database, a database restored from an older copy, a corrupt meta.json,
a truncated index or token shard, a model changed in place, a catalog path typed two ways, a
metadata-only change or a revert, a delete that could not be undone.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from sqlalchemy import func, select
from typer.testing import CliRunner

from vtfusion.indexer.collection import Collection, CollectionError, StaleIndexError
from vtfusion.indexer.ingest import ingest
from vtfusion.indexer.lifecycle import delete, select_items, stats, verify
from vtfusion.indexer.maintenance import bad_token_items, compact, reembed, repair, restore
from vtfusion.indexer.schema import Embedding, Item
from vtfusion.models import factory
from vtfusion.ui.cli import app


def _tokens_of_every_item(c: Collection) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """(ids, tokens as the cache gives them, tokens re-encoded from the images now)."""
    with c.Session() as s:
        rows = s.execute(select(Item.id, Item.image_path).where(Item.status == "active").order_by(Item.id)).all()
    c.forget_token_locations()
    cached, _ = c.item_tokens([r.id for r in rows])
    with torch.no_grad():
        fresh = c.bundle.image_tokens(c.bundle.transform.load(r.image_path) for r in rows).float()
    return [r.id for r in rows], cached, fresh


def _assert_tokens_right(c: Collection) -> None:
    ids, cached, fresh = _tokens_of_every_item(c)
    bad = [i for i, a, b in zip(ids, cached, fresh) if not torch.allclose(a, b, atol=2e-2, rtol=1e-2)]
    assert not bad, f"{len(bad)} of {len(ids)} items read another record's tokens"
    assert c.bad_token_records == 0


# ---- 1. token cache that cannot shift ------------------------------------------------------------


def test_enospc_mid_record_then_a_retry_in_the_same_process(tmp_path, model_dir, small_catalog, monkeypatch, db_url):
    """The web UI case: a write fails half-way (disk full), the same long-lived process ingests
    again. Offsets used to come from the file size while bytes went after the torn half: every
    later record was shifted (199 of 231 wrong) and verify said ok."""
    from vtfusion.indexer import tokens as tokens_mod

    c = Collection.init(tmp_path / "c", model_dir, db_url=db_url)
    ingest(c, small_catalog / "test.csv", workers=0, progress=False)
    real = os.pwrite
    calls = []

    def half_then_enospc(fd, data, offset):
        calls.append(1)
        if len(calls) == 2:
            real(fd, bytes(data)[: len(data) // 2 + 7], offset)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(tokens_mod.os, "pwrite", half_then_enospc)
    with pytest.raises(OSError, match="No space left"):
        ingest(c, small_catalog / "train.csv", workers=0, progress=False, batch_size=4)
    monkeypatch.undo()
    ingest(c, small_catalog / "train.csv", workers=0, progress=False, batch_size=4)  # the retry, same objects
    assert verify(c).ok
    _assert_tokens_right(c)


def test_a_second_writer_killed_mid_record(tmp_path, model_dir, small_catalog, db_url):
    """Another process dies half-way through a record while this one has the cache open."""
    c = Collection.init(tmp_path / "c", model_dir, db_url=db_url)
    ingest(c, small_catalog / "test.csv", workers=0, progress=False)
    shard = c.tokens._path(c.tokens.shards()[-1])
    with open(shard, "ab") as f:
        f.write(os.urandom(c.tokens.record_bytes // 3))  # the dead writer's torn record
    ingest(c, small_catalog / "train.csv", workers=0, progress=False, batch_size=8)
    assert verify(c).ok
    _assert_tokens_right(c)


def test_verify_names_bad_records_search_never_uses_them_and_repair_reencodes_exactly_those(tmp_path, model_dir, small_catalog, db_url):
    from vtfusion.search.engine import SearchEngine

    c = Collection.init(tmp_path / "c", model_dir, db_url=db_url)
    ingest(c, small_catalog / "train.csv", workers=0, progress=False)
    want = SearchEngine(c).search("a red mug", k=5, rerank_depth=16)
    with c.Session() as s:
        victims = s.execute(select(Item.id, Item.token_shard, Item.token_offset).order_by(Item.id).limit(3)).all()
    shard = c.tokens._path(victims[0].token_shard)
    raw = bytearray(shard.read_bytes())
    for v in victims[:2]:  # flip payload bytes of two records
        raw[v.token_offset * c.tokens.record_bytes + 40] ^= 0xFF
    shard.write_bytes(bytes(raw))
    c2 = Collection.open(tmp_path / "c")
    r = verify(c2)
    assert not r.ok and any("2 active items' records" in p and "vtfusion repair" in p for p in r.problems), r.problems
    assert bad_token_items(c2) == sorted(v.id for v in victims[:2])
    got = SearchEngine(c2).search("a red mug", k=5, rerank_depth=16)  # re-encoded, never the corrupt bytes
    assert [h.item_id for h in got.hits] == [h.item_id for h in want.hits]
    assert c2.bad_token_records >= 0
    rep = repair(c2, progress=False)
    assert rep.records_rewritten == 2 and not rep.unrepairable
    assert verify(Collection.open(tmp_path / "c")).ok
    _assert_tokens_right(Collection.open(tmp_path / "c"))


def test_truncated_token_shard_is_reported_searched_around_and_repaired(tmp_path, model_dir, small_catalog, db_url):
    from vtfusion.search.engine import SearchEngine

    c = Collection.init(tmp_path / "c", model_dir, db_url=db_url)
    ingest(c, small_catalog / "train.csv", workers=0, progress=False)
    shard = c.tokens._path(0)
    os.truncate(shard, shard.stat().st_size - 3 * c.tokens.record_bytes - 11)
    c2 = Collection.open(tmp_path / "c")
    assert not verify(c2).ok
    assert len(bad_token_items(c2)) == 4
    SearchEngine(c2).search("a red mug", k=5, rerank_depth=64)  # reranks every item: no crash
    assert repair(c2, progress=False).records_rewritten == 4
    c3 = Collection.open(tmp_path / "c")
    assert verify(c3).ok
    _assert_tokens_right(c3)


def test_repair_names_items_whose_image_is_gone_and_repairs_the_rest(tmp_path, model_dir, small_catalog):
    cat = tmp_path / "cat"
    shutil.copytree(small_catalog, cat)
    c = Collection.init(tmp_path / "c", model_dir)
    ingest(c, cat / "test.csv", workers=0, progress=False)
    with c.Session() as s:
        rows = s.execute(select(Item.id, Item.image_path).order_by(Item.id).limit(3)).all()
    shard = c.tokens._path(0)
    os.truncate(shard, 0)  # every record gone
    Path(rows[0].image_path).write_bytes(b"not an image any more")
    Path(rows[1].image_path).unlink()
    r = repair(Collection.open(tmp_path / "c"), progress=False)
    assert sorted(x.split(":")[0] for x in r.unrepairable) == sorted(f"item {x.id}" for x in rows[:2])
    assert r.records_rewritten == stats(c)["items_active"] - 2
    assert bad_token_items(Collection.open(tmp_path / "c")) == sorted(x.id for x in rows[:2])
    res = CliRunner().invoke(app, ["repair", str(tmp_path / "c")])
    assert res.exit_code == 1 and f"cannot repair item {rows[1].id}" in res.output
    # a search that must rerank them says so, instead of a traceback
    res = CliRunner().invoke(app, ["search", str(tmp_path / "c"), "a red mug", "--rerank-depth", "64"])
    assert res.exit_code == 1 and "no usable token record" in res.output and "vtfusion repair" in res.output


# ---- 2. one collection per database --------------------------------------------------------------


def test_a_second_collection_in_one_database_is_refused(tmp_path, model_dir, small_catalog, db_url):
    url = db_url or f"sqlite:///{tmp_path / 'shared.db'}"
    a = Collection.init(tmp_path / "a", model_dir, db_url=url)
    ingest(a, small_catalog / "test.csv", workers=0, progress=False)
    with pytest.raises(CollectionError, match="already holds a collection"):
        Collection.init(tmp_path / "b", model_dir, db_url=url)
    assert not (tmp_path / "b").exists()
    r = CliRunner().invoke(app, ["init", str(tmp_path / "b2"), "--model", str(model_dir), "--db", url])
    assert r.exit_code == 1 and "already holds a collection" in r.output and "Traceback" not in r.output
    # a folder whose toml points at another collection's database is refused on open
    other = Collection.init(tmp_path / "o", model_dir, db_url=f"sqlite:///{tmp_path / 'other.db'}")
    cfg = (tmp_path / "o" / "collection.toml").read_text().replace(other.config.db_url, url)
    (tmp_path / "o" / "collection.toml").write_text(cfg)
    with pytest.raises(CollectionError, match="holds collection .* not this one"):
        Collection.open(tmp_path / "o")
    assert verify(Collection.open(tmp_path / "a")).ok


def test_each_collection_its_own_postgresql_schema(tmp_path, model_dir, small_catalog, db_url):
    """What the README shows: one database, a schema per collection (search_path in the URL)."""
    if not db_url:
        pytest.skip("PostgreSQL only")
    import sqlalchemy as sa

    eng = sa.create_engine(db_url, isolation_level="AUTOCOMMIT")
    with eng.connect() as conn:
        conn.execute(sa.text("CREATE SCHEMA shop_a"))
        conn.execute(sa.text("CREATE SCHEMA shop_b"))
    eng.dispose()
    a = Collection.init(tmp_path / "a", model_dir, db_url=db_url + "?options=-csearch_path%3Dshop_a")
    b = Collection.init(tmp_path / "b", model_dir, db_url=db_url + "?options=-csearch_path%3Dshop_b")
    added = ingest(a, small_catalog / "test.csv", workers=0, progress=False).added
    assert added > 0 and stats(Collection.open(tmp_path / "a"))["items_active"] == added and stats(b)["items_active"] == 0
    assert verify(Collection.open(tmp_path / "b")).ok


# ---- 3. stale or broken projections ----------------------------------------------------------------


def _backup(db_url: str, folder: Path, name: str) -> None:
    """Copy the collection's database aside (SQLite: the file; PostgreSQL: a template copy)."""
    if not db_url:
        shutil.copy(folder / "catalog.db", folder.parent / f"{name}.db")  # WAL checkpointed by close
        return
    import sqlalchemy as sa

    admin = sa.create_engine(db_url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{db_url.rsplit("/", 1)[1]}_{name}" TEMPLATE "{db_url.rsplit("/", 1)[1]}"'))
    admin.dispose()


def _restore(db_url: str, folder: Path, name: str) -> None:
    if not db_url:
        for suffix in ("-wal", "-shm"):
            (folder / f"catalog.db{suffix}").unlink(missing_ok=True)
        shutil.copy(folder.parent / f"{name}.db", folder / "catalog.db")
        return
    import sqlalchemy as sa

    db = db_url.rsplit("/", 1)[1]
    admin = sa.create_engine(db_url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE "{db}" WITH (FORCE)'))
        conn.execute(sa.text(f'CREATE DATABASE "{db}" TEMPLATE "{db}_{name}"'))
        conn.execute(sa.text(f'DROP DATABASE "{db}_{name}"'))
    admin.dispose()


def test_a_database_older_than_its_indexes_is_refused_with_the_rebuild(tmp_path, model_dir, small_catalog, db_url):
    c = Collection.init(tmp_path / "c", model_dir, db_url=db_url)
    ingest(c, small_catalog / "test.csv", workers=0, progress=False)
    c.close()
    _backup(db_url, tmp_path / "c", "backup")
    c = Collection.open(tmp_path / "c")
    ingest(c, small_catalog / "train.csv", workers=0, progress=False)
    c.close()
    _restore(db_url, tmp_path / "c", "backup")  # restored from the backup
    with pytest.raises(StaleIndexError, match="older than the indexes.*vtfusion reindex"):
        Collection.open(tmp_path / "c")
    r = CliRunner().invoke(app, ["search", str(tmp_path / "c"), "a red mug"])
    assert r.exit_code == 1 and "vtfusion reindex" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(app, ["verify", str(tmp_path / "c")])
    assert r.exit_code == 1 and "older than the indexes" in r.output
    # written to since the restore until it reaches the same change number: still refused
    c = Collection.open(tmp_path / "c", catch_up=False)
    ingest_rows_later = small_catalog / "train.csv"
    from vtfusion.catalogs.sources import read_source
    from vtfusion.indexer.ingest import ingest_rows

    rows, _ = read_source(ingest_rows_later)
    with pytest.raises(StaleIndexError):
        ingest_rows(c, rows, [], "x", workers=0, progress=False)  # its final catch-up refuses
    c.close()
    with pytest.raises(StaleIndexError, match="restored or replaced"):
        Collection.open(tmp_path / "c")
    assert CliRunner().invoke(app, ["reindex", str(tmp_path / "c")]).exit_code == 0
    c = Collection.open(tmp_path / "c")
    assert verify(c).ok and c.indexes["image"].ntotal == stats(c)["items_active"]


def test_corrupt_meta_json_truncated_index_and_leftover_temp_files(tmp_path, model_dir, small_catalog, db_url):
    c = Collection.init(tmp_path / "c", model_dir, db_url=db_url)
    ingest(c, small_catalog / "train.csv", workers=0, progress=False)
    folder = tmp_path / "c" / "index"
    (folder / "meta.json").write_text('{"image": {"modality": "ima')
    (folder / "image-000000000001.faiss.123.456.tmp").write_bytes(b"x" * 100)
    (folder / "text-000000000002.faiss").write_bytes(b"stale")
    for argv in (["search", str(tmp_path / "c"), "a red mug"], ["reindex", str(tmp_path / "c")], ["verify", str(tmp_path / "c")]):
        r = CliRunner().invoke(app, argv)
        assert r.exit_code == 0 and "Traceback" not in r.output, (argv, r.output)
    assert sorted(p.name for p in folder.iterdir() if p.name != ".lock") == sorted(
        [m["file"] for m in json.loads((folder / "meta.json").read_text()).values()] + ["meta.json"]
    )
    meta = json.loads((folder / "meta.json").read_text())
    path = folder / meta["image"]["file"]
    path.write_bytes(path.read_bytes()[:200])  # truncated
    c = Collection.open(tmp_path / "c")
    assert verify(c).ok


# ---- 4. model changes re-embed ---------------------------------------------------------------------


def _another_model(model_dir: Path, out: Path) -> Path:
    b = factory.load(model_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in b.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    factory.save(b, out)
    return out


def _stored(c: Collection, modality: str) -> dict[int, np.ndarray]:
    with c.Session() as s:
        return {
            i: np.frombuffer(v, dtype=np.float32)
            for i, v in s.execute(
                select(Embedding.item_id, Embedding.vector).join(Item, Item.id == Embedding.item_id)
                .where(Embedding.modality == modality, Item.status == "active")
            )
        }


def test_reembed_switches_embeddings_tokens_and_model_together(tmp_path, model_dir, small_catalog, db_url):
    c = Collection.init(tmp_path / "c", model_dir, db_url=db_url)
    ingest(c, small_catalog / "train.csv", workers=0, progress=False)
    new_dir = _another_model(model_dir, tmp_path / "m2")
    rep = reembed(c, new_dir, progress=False, batch_size=16)
    assert rep.switched and rep.embedded == stats(c)["items_active"] and not rep.failed
    c2 = Collection.open(tmp_path / "c")
    nb = factory.load(new_dir)
    assert c2.config.model_fingerprint == nb.fingerprint == json.loads((tmp_path / "c" / "index" / "meta.json").read_text())["image"]["model_fingerprint"]
    with c2.Session() as s:
        rows = s.execute(select(Item.id, Item.image_path, Item.text).where(Item.status == "active").order_by(Item.id)).all()
    with torch.no_grad():
        tok = nb.image_tokens(nb.transform.load(r.image_path) for r in rows)
        img = nb.model.image_emb(tok).numpy()
        txt = nb.model.encode_text(*nb.tokenizer([r.text for r in rows])).numpy()
    stored_img, stored_txt = _stored(c2, "image"), _stored(c2, "text")
    np.testing.assert_allclose(np.stack([stored_img[r.id] for r in rows]), img, atol=1e-4)
    np.testing.assert_allclose(np.stack([stored_txt[r.id] for r in rows]), txt, atol=1e-4)
    assert verify(c2).ok
    _assert_tokens_right(c2)
    assert [p.name for p in (tmp_path / "c").glob("tokens*")] == [c2.config.tokens_dir]


def test_a_model_changed_in_place_names_reembed(tmp_path, model_dir, small_catalog):
    m = tmp_path / "m"
    shutil.copytree(model_dir, m)
    c = Collection.init(tmp_path / "c", m)
    ingest(c, small_catalog / "test.csv", workers=0, progress=False)
    _another_model(m, m)  # retrained in place
    r = CliRunner().invoke(app, ["search", str(tmp_path / "c"), "a red mug"])
    assert r.exit_code == 1 and f"vtfusion reembed {tmp_path / 'c'}" in r.output
    r = CliRunner().invoke(app, ["reembed", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["search", str(tmp_path / "c"), "a red mug"])
    assert r.exit_code == 0, r.output


def test_reembed_refuses_to_switch_while_an_item_cannot_be_embedded(tmp_path, model_dir, small_catalog):
    cat = tmp_path / "cat"
    shutil.copytree(small_catalog, cat)
    c = Collection.init(tmp_path / "c", model_dir)
    ingest(c, cat / "test.csv", workers=0, progress=False)
    with c.Session() as s:
        victim = s.execute(select(Item.id, Item.image_path).order_by(Item.id).limit(1)).one()
    Path(victim.image_path).unlink()
    before = _stored(c, "image")
    rep = reembed(c, _another_model(model_dir, tmp_path / "m2"), progress=False)
    assert not rep.switched and len(rep.failed) == 1 and f"#{victim.id}" in rep.failed[0]
    c2 = Collection.open(tmp_path / "c")
    assert c2.config.model_fingerprint == c.config.model_fingerprint
    assert all(np.array_equal(before[i], v) for i, v in _stored(c2, "image").items())
    delete(c2, [victim.id])
    rep = reembed(c2, tmp_path / "m2", progress=False)  # resumes: only the switch is left
    assert rep.switched and rep.embedded == 0 and rep.resumed == stats(c2)["items_active"]
    assert verify(Collection.open(tmp_path / "c")).ok


# ---- 5. identity and updates ---------------------------------------------------------------------


def _write_catalog(path: Path, rows: list[tuple[str, str, str, str]]) -> None:
    path.write_text("id,image,caption,price\n" + "".join(f"{a},{b},{c},{d}\n" for a, b, c, d in rows))


def test_one_file_named_two_ways_metadata_changes_and_reverts_are_updates(tmp_path, model_dir, small_catalog, db_url, monkeypatch):
    cat = tmp_path / "cat"
    shutil.copytree(small_catalog, cat)
    img = sorted((cat / "images").iterdir())
    rows = [("u1", f"images/{img[0].name}", "a red mug", "10"), ("u2", f"images/{img[1].name}", "a blue hat", "5")]
    _write_catalog(cat / "upd.csv", rows)
    c = Collection.init(tmp_path / "c", model_dir, db_url=db_url)
    monkeypatch.chdir(tmp_path)
    ingest(c, Path("cat/upd.csv"), workers=0, progress=False)

    def active(ext):
        with c.Session() as s:
            return s.execute(select(Item.id, Item.text, Item.meta).where(Item.external_id == ext, Item.status == "active")).all()

    _write_catalog(cat / "upd.csv", [("u1", rows[0][1], "a red striped mug", "10"), rows[1]])
    r = ingest(c, (cat / "upd.csv").resolve(), workers=0, progress=False)  # the same file, spelled absolutely
    assert (r.added, r.replaced, r.duplicates) == (1, 1, 1)
    assert [x.text for x in active("u1")] == ["a red striped mug"]
    (tmp_path / "alias").symlink_to(cat)  # and through a symlinked folder
    _write_catalog(cat / "upd.csv", [("u1", rows[0][1], "a red striped mug", "12"), rows[1]])  # price only
    r = ingest(c, tmp_path / "alias" / ".." / "alias" / "upd.csv", workers=0, progress=False)
    assert (r.added, r.replaced) == (1, 1) and [x.meta["price"] for x in active("u1")] == [12]
    _write_catalog(cat / "upd.csv", rows)  # back to the first version: an update, not a duplicate
    r = ingest(c, Path("cat/upd.csv"), workers=0, progress=False)
    assert (r.added, r.replaced) == (1, 1)
    assert [(x.text, x.meta["price"]) for x in active("u1")] == [("a red mug", 10)] and len(active("u2")) == 1
    assert verify(c).ok
    # --source-name: the same rows from another file are the same items
    shutil.copy(cat / "upd.csv", cat / "copy.csv")
    r = ingest(c, cat / "copy.csv", workers=0, progress=False, source_name=str((cat / "upd.csv").resolve()))
    assert (r.added, r.duplicates) == (0, 2)


# ---- 6. deletes a user can trust -------------------------------------------------------------------


def test_delete_preview_confirmation_unknown_ids_and_restore(tmp_path, model_dir, small_catalog, db_url):
    from vtfusion.search.engine import SearchEngine

    c = Collection.init(tmp_path / "c", model_dir, db_url=db_url)
    ingest(c, small_catalog / "train.csv", workers=0, progress=False)
    col, run = str(tmp_path / "c"), CliRunner().invoke
    n = stats(c)["items_active"]
    want = SearchEngine(c).search("a red mug", k=8, rerank_depth=16)
    r = run(app, ["delete", col, "--where", "price > 0", "--dry-run"])
    assert r.exit_code == 0 and f"would delete {n} items" in r.output and stats(c)["items_active"] == n
    r = run(app, ["delete", col, "--where", "price > 0"])  # no terminal, above the threshold, no --yes
    assert r.exit_code == 1 and "--yes" in r.output and stats(c)["items_active"] == n
    ext = [h.external_id for h in want.hits[:3]]
    r = run(app, ["delete", col, "--ids", ext[0], "--ids", "nope-1", "--ids", "#999999"])
    assert r.exit_code == 1 and "deleted 1 items" in r.output and "nope-1" in r.output and "#999999" in r.output
    r = run(app, ["delete", col, "--where", "price > 0", "--yes"])
    assert r.exit_code == 0 and f"deleted {n - 1} items" in r.output
    c = Collection.open(tmp_path / "c")
    assert stats(c)["items_active"] == 0 and c.indexes["image"].ntotal == 0
    r = run(app, ["restore", col, "--where", "price > 0"])
    assert r.exit_code == 0 and f"restored {n} items" in r.output
    c = Collection.open(tmp_path / "c")
    assert stats(c)["items_active"] == n and verify(c).ok
    got = SearchEngine(c).search("a red mug", k=8, rerank_depth=16)
    assert [h.item_id for h in got.hits] == [h.item_id for h in want.hits]  # same items, same tokens, same order
    # a deleted item whose content was ingested again is not restored over it
    delete(c, select_items(c, [ext[1]]))
    ingest(c, small_catalog / "train.csv", workers=0, progress=False)  # re-ingesting brings it back, as a new item
    assert stats(c)["items_active"] == n
    r2 = restore(c, select_items(c, [ext[1]], status="deleted"))
    assert not r2.restored and "is active in its place" in r2.skipped[0]


def test_compact_reclaims_deleted_records_keeps_the_rest_and_upgrades_the_format(tmp_path, model_dir, small_catalog, db_url):
    from vtfusion.search.engine import SearchEngine

    c = Collection.init(tmp_path / "c", model_dir, db_url=db_url)
    n_all = ingest(c, small_catalog / "train.csv", workers=0, progress=False).added
    before = c.tokens.total_bytes()
    delete(c, select_items(c, where="price > 30"))
    n_active = stats(c)["items_active"]
    want = SearchEngine(c).search("a red mug", k=5, rerank_depth=16)
    rep = compact(c, progress=False)
    assert rep.records_kept == n_active and rep.records_dropped == n_all - n_active > 0
    assert rep.bytes_reclaimed == before - c.tokens.total_bytes() == rep.records_dropped * c.tokens.record_bytes > 0
    c2 = Collection.open(tmp_path / "c")
    assert verify(c2).ok and c2.config.tokens_dir != "tokens"
    assert [h.item_id for h in SearchEngine(c2).search("a red mug", k=5, rerank_depth=16).hits] == [h.item_id for h in want.hits]
    _assert_tokens_right(c2)
    r = CliRunner().invoke(app, ["compact", str(tmp_path / "c")])
    assert r.exit_code == 0 and "reclaimed 0 bytes" in r.output
    # items deleted before the compact lost their records: restoring them re-encodes their tokens
    gone = select_items(c2, where="price > 30", status="deleted")
    r2 = restore(Collection.open(tmp_path / "c"), gone)
    assert sorted(r2.restored) == gone and not r2.no_tokens and not r2.skipped
    c3 = Collection.open(tmp_path / "c")
    assert verify(c3).ok and stats(c3)["items_active"] == n_all
    _assert_tokens_right(c3)


# ---- 7. signals and exit codes -----------------------------------------------------------------------


def test_ingest_exits_nonzero_when_rows_failed(tmp_path, model_dir, small_catalog):
    cat = tmp_path / "cat"
    shutil.copytree(small_catalog, cat)
    lines = (cat / "test.csv").read_text().splitlines()
    (cat / "bad.csv").write_text("\n".join(lines[:3] + [lines[3].replace(".png", "-missing.png")]) + "\n")
    Collection.init(tmp_path / "c", model_dir)
    r = CliRunner().invoke(app, ["ingest", str(tmp_path / "c"), str(cat / "bad.csv"), "--workers", "0"])
    assert r.exit_code == 1 and "1 rows failed" in r.output and "added 2" in r.output


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_ingest_at_a_batch_boundary_with_a_message(tmp_path, model_dir, sig):
    from vtfusion.catalogs.demo import generate

    generate(tmp_path / "cat", n=300, seed=5, image_size=48)
    Collection.init(tmp_path / "c", model_dir)
    cmd = [sys.executable, "-m", "vtfusion.ui.cli", "ingest", str(tmp_path / "c"), str(tmp_path / "cat" / "train.csv"),
           "--workers", "0", "--batch-size", "4"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    db = tmp_path / "c" / "catalog.db"
    import sqlite3

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        time.sleep(0.05)
        try:
            con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
            n = con.execute("SELECT count(*) FROM items").fetchone()[0]
            con.close()
        except sqlite3.Error:
            continue
        if n >= 8:
            break
    p.send_signal(sig)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 128 + sig, (p.returncode, out, err)
    assert f"stopped by {signal.Signals(sig).name} at a batch boundary" in err and "run the same command again" in err
    c = Collection.open(tmp_path / "c")
    assert verify(c).ok and 8 <= stats(c)["items_active"] < 240
    with c.Session() as s:
        assert s.scalar(select(func.count()).select_from(Item)) == stats(c)["items_active"]


def test_migration_0002_keeps_existing_rows_and_allows_reverts(tmp_path, db_url):
    """A database made before collection ids (revision 0001) upgrades in place: rows kept, the
    content hash unique among active items only."""
    import sqlalchemy as sa
    from alembic import command
    from alembic.config import Config

    from vtfusion.indexer.collection import MIGRATIONS, make_engine, migrate

    eng = make_engine(db_url or f"sqlite:///{tmp_path / 'old.db'}")
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with eng.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
    item = "INSERT INTO items (source, external_id, image_path, text, content_hash, meta, status, created_at) VALUES ('s', 'e', '/x', 't', :h, '{}', :st, '2026-01-01')"
    with eng.begin() as conn:
        conn.execute(sa.text(item), [{"h": "h1", "st": "replaced"}, {"h": "h2", "st": "active"}])
        conn.execute(sa.text("INSERT INTO embeddings (item_id, modality, vector) VALUES (1, 'image', :v)"), {"v": b"\x00\x01"})
        conn.execute(sa.text("INSERT INTO changes (item_id, op, at) VALUES (1, 'add', '2026-01-01')"))
    migrate(eng)
    with eng.begin() as conn:
        assert conn.execute(sa.text("SELECT id, content_hash, status FROM items ORDER BY id")).all() == [(1, "h1", "replaced"), (2, "h2", "active")]
        assert conn.execute(sa.text("SELECT vector FROM embeddings")).scalar() == b"\x00\x01"
        conn.execute(sa.text(item), {"h": "h1", "st": "active"})  # back to the replaced version's content
    with pytest.raises(sa.exc.IntegrityError), eng.begin() as conn:
        conn.execute(sa.text(item), {"h": "h1", "st": "active"})  # two active items with one content: refused
    eng.dispose()


def _run_and_kill_at(cmd: list[str], delay: float, started=lambda: True) -> int:
    """Run ``cmd``; once ``started()`` (polled) is true, SIGKILL it ``delay`` s later. Its exit code."""
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not started() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        p.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGKILL)
        p.wait()
    return p.returncode


def test_compact_and_reembed_killed_at_random_points_lose_nothing(tmp_path, model_dir, db_url):
    """SIGKILL at random points of compact and reembed (three seeds each): every state in between
    opens, verifies clean and has every item; re-running finishes the job."""
    import random

    from vtfusion.catalogs.demo import generate

    generate(tmp_path / "cat", n=240, seed=7, image_size=48)
    c = Collection.init(tmp_path / "c", model_dir, db_url=db_url)
    ingest(c, tmp_path / "cat" / "train.csv", workers=0, progress=False)
    delete(c, select_items(c, where="price > 40"))
    n = stats(c)["items_active"]
    m2 = _another_model(model_dir, tmp_path / "m2")
    col = str(tmp_path / "c")
    # the CLI, with every token append 0.3 s slower and compact copying 8 records a step, so that
    # random kills land inside the work and not only in the interpreter's start-up
    slow = ("import sys, time; import vtfusion.indexer.tokens as t, vtfusion.indexer.maintenance as m; m.COPY_CHUNK = 8; a = t.TokenCache.append; "
            "t.TokenCache.append = lambda self, *x, **k: (time.sleep(0.3), a(self, *x, **k))[1]; "
            "from vtfusion.ui.cli import app; sys.argv[0] = 'vtfusion'; app()")
    cli = [sys.executable, "-c", slow, "-q"]
    rng = random.Random(0)
    from vtfusion.indexer.schema import Reembedding

    for argv, seconds in ((["compact", col], 2.5), (["reembed", col, "--model", str(m2), "--batch-size", "8"], 2.5)):
        caught_midway = 0
        for _ in range(3):
            # both write a new token folder first: the kill comes a random moment after it appears
            have = {p.name for p in (tmp_path / "c").glob("tokens*")}
            rc = _run_and_kill_at(cli + argv, rng.uniform(0, seconds),
                                  started=lambda: {p.name for p in (tmp_path / "c").glob("tokens*")} - have)
            folders = len(list((tmp_path / "c").glob("tokens*")))  # before opening: it removes a killed compact's
            c = Collection.open(tmp_path / "c")
            r = verify(c)
            assert r.ok, (argv, rc, r.problems)
            assert stats(c)["items_active"] == n
            with c.Session() as s:  # a half-written token folder, or staged rows not switched yet
                staged = s.scalar(select(func.count()).select_from(Reembedding))
            caught_midway += rc == -signal.SIGKILL and (staged > 0 or folders > 1)
            c.close()
        assert caught_midway >= 1, f"no kill of {argv[0]} landed mid-way"
        if argv[0] == "compact":  # opening removed what the killed compacts left
            assert len(list((tmp_path / "c").glob("tokens*"))) == 1
        assert _run_and_kill_at(cli + argv, 300) == 0, argv
    c = Collection.open(tmp_path / "c")
    assert verify(c).ok and stats(c)["items_active"] == n
    assert c.config.model_fingerprint == factory.load(m2).fingerprint
    _assert_tokens_right(c)
    assert len(list((tmp_path / "c").glob("tokens*"))) == 1


def test_sigterm_stops_reembed_at_a_batch_boundary_and_it_resumes(tmp_path, model_dir):
    from vtfusion.catalogs.demo import generate
    from vtfusion.indexer.schema import Reembedding

    generate(tmp_path / "cat", n=240, seed=8, image_size=48)
    c = Collection.init(tmp_path / "c", model_dir)
    ingest(c, tmp_path / "cat" / "train.csv", workers=0, progress=False)
    before = _stored(c, "image")
    m2 = _another_model(model_dir, tmp_path / "m2")
    p = subprocess.Popen([sys.executable, "-m", "vtfusion.ui.cli", "reembed", str(tmp_path / "c"), "--model", str(m2), "--batch-size", "4"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.05)
        with c.Session() as s:
            if s.scalar(select(func.count()).select_from(Reembedding)) >= 8:
                break
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, (out, err)
    assert "stopped by SIGTERM at a batch boundary" in err and "nothing switched" in err
    c = Collection.open(tmp_path / "c")
    assert verify(c).ok and _stored(c, "image").keys() == before.keys()
    assert all(np.array_equal(before[i], v) for i, v in _stored(c, "image").items())  # still the old model's
    rep = reembed(c, m2, progress=False)
    assert rep.switched and rep.resumed >= 8 and rep.resumed + rep.embedded == len(before)
    assert verify(Collection.open(tmp_path / "c")).ok


def test_an_init_stopped_before_its_toml_can_be_run_again_but_never_over_items(tmp_path, model_dir, small_catalog, db_url):
    url = db_url or f"sqlite:///{tmp_path / 'shared.db'}"
    Collection.init(tmp_path / "a", model_dir, db_url=url)
    (tmp_path / "a" / "collection.toml").unlink()  # as if killed between the database row and the toml
    c = Collection.init(tmp_path / "a", model_dir, db_url=url)
    ingest(c, small_catalog / "test.csv", workers=0, progress=False)
    (tmp_path / "a" / "collection.toml").unlink()  # a toml lost under a populated database: refused
    with pytest.raises(CollectionError, match="already holds a collection"):
        Collection.init(tmp_path / "a", model_dir, db_url=url)
