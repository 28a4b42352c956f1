"""A subprocess ingest killed with SIGKILL at random moments, then resumed: nothing lost,
nothing duplicated, verify clean, and the same items as an uninterrupted ingest."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from vtfusion.indexer.collection import Collection
from vtfusion.catalogs.demo import generate
from vtfusion.indexer.lifecycle import select_items, verify
from vtfusion.indexer.schema import Item


def _ingest_cmd(col, catalog, workers: int = 0):
    return [sys.executable, "-m", "vtfusion.ui.cli", "-q", "ingest", str(col), str(catalog), "--workers", str(workers), "--batch-size", "2"]


def _processes_of(col) -> list[int]:
    """Live processes whose command line names this collection (an ingest and its workers)."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            cmd = (d / "cmdline").read_bytes()
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if str(col).encode() in cmd and state != "Z":
            pids.append(int(d.name))
    return pids


def _count(col) -> int:
    """Committed items, read straight from the SQLite file (WAL: never blocks the writer)."""
    import sqlite3

    con = sqlite3.connect(f"file:{col / 'catalog.db'}?mode=ro", uri=True, timeout=30)
    try:
        return con.execute("SELECT count(*) FROM items").fetchone()[0]
    finally:
        con.close()


def _run(cmd):
    out = subprocess.run(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def _run_and_kill(cmd, col, delay: float) -> None:
    """Start an ingest, wait until it commits its next batch, then SIGKILL it ``delay`` s later."""
    before = _count(col)
    p = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while _count(col) == before and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(delay)
    p.send_signal(signal.SIGKILL)
    p.wait()


def test_sigkill_at_random_points_then_resume(tmp_path, model_dir):
    generate(tmp_path / "cat", n=400, seed=9, image_size=48)
    catalog = tmp_path / "cat" / "train.csv"
    n_rows = sum(1 for _ in open(catalog)) - 1

    ingest_s = {}  # uninterrupted ingest time of each mode: the kills land within its first quarter
    for workers in (0, 2):
        Collection.init(tmp_path / f"ref{workers}", model_dir)
        out = _run(_ingest_cmd(tmp_path / f"ref{workers}", catalog, workers))
        ingest_s[workers] = float(out.split(" in ")[1].split(" s")[0])  # "added N, ... in X s (...)"

    Collection.init(tmp_path / "col", model_dir)
    rng = random.Random(0)
    partial = []
    for k in range(5):
        # odd kills hit an ingest whose worker processes decode and embed: only the main
        # process is killed (as the OOM killer would); its orphaned workers must exit by themselves
        workers = 2 * (k % 2)
        _run_and_kill(_ingest_cmd(tmp_path / "col", catalog, workers), tmp_path / "col", rng.uniform(0, 0.25 * ingest_s[workers]))
        deadline = time.monotonic() + 30
        while _processes_of(tmp_path / "col") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _processes_of(tmp_path / "col"), "worker processes outlived their killed ingest"
        c = Collection.open(tmp_path / "col")  # every intermediate state opens and is consistent
        r = verify(c)
        assert r.ok, r.problems
        with c.Session() as s:
            partial.append(s.scalar(select(func.count()).select_from(Item)))
        c.close()
    # the kills really landed mid-ingest: some items were committed, not yet all
    assert sum(0 < p < n_rows for p in partial) >= 2, partial
    _run(_ingest_cmd(tmp_path / "col", catalog))

    c, ref, ref2 = (Collection.open(tmp_path / name) for name in ("col", "ref0", "ref2"))
    with c.Session() as s, ref.Session() as rs, ref2.Session() as rs2:
        n = s.scalar(select(func.count()).select_from(Item))
        distinct = s.scalar(select(func.count(func.distinct(Item.external_id))))
        hashes = sorted(s.scalars(select(Item.content_hash)))
        ref_hashes = sorted(rs.scalars(select(Item.content_hash)))
        assert sorted(rs2.scalars(select(Item.content_hash))) == ref_hashes
    assert n == distinct == n_rows  # nothing lost, nothing twice
    assert hashes == ref_hashes  # the same items as the uninterrupted runs
    assert verify(c).ok
    assert c.indexes["image"].ntotal == ref.indexes["image"].ntotal == n_rows


# ---- the soak: 20 kills of an ingest, then delete and reindex killed mid-way --------------------


def _search_ids(col, queries) -> list[list[str]]:
    from vtfusion.search.engine import SearchEngine

    e = SearchEngine(Collection.open(col))
    return [[h.external_id for h in e.search(q, k=10, rerank_depth=16).hits] for q in queries]


def _kill_after(cmd, delay: float) -> int | None:
    p = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        return p.wait(timeout=delay)  # finished before the kill
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGKILL)
        p.wait()
        return None


@pytest.mark.slow
def test_soak_twenty_kills_then_delete_and_reindex_killed(tmp_path, model_dir):
    generate(tmp_path / "cat", n=500, seed=11, image_size=48)
    catalog = tmp_path / "cat" / "train.csv"
    n_rows = sum(1 for _ in open(catalog)) - 1
    queries = ["a large red checkered hat", "a small blue plain mug", "two bottles on the right", "a green dotted bag"]

    Collection.init(tmp_path / "ref", model_dir)
    out = _run(_ingest_cmd(tmp_path / "ref", catalog))
    ingest_s = float(out.split(" in ")[1].split(" s")[0])
    want = _search_ids(tmp_path / "ref", queries)

    col = tmp_path / "col"
    Collection.init(col, model_dir)
    rng = random.Random(1)
    kills = finished = 0
    for _ in range(20):
        # a random moment of the whole run: start-up, decode, embed, token-cache write, SQL commit, index save
        if _kill_after(_ingest_cmd(col, catalog), rng.uniform(2.0, 2.0 + ingest_s)) is None:
            kills += 1
        else:
            finished += 1
        c = Collection.open(col)
        r = verify(c)
        assert r.ok, r.problems
        c.close()
    _run(_ingest_cmd(col, catalog))
    c = Collection.open(col)
    with c.Session() as s:
        assert s.scalar(select(func.count()).select_from(Item)) == s.scalar(select(func.count(func.distinct(Item.external_id)))) == n_rows
    assert verify(c).ok
    assert _search_ids(col, queries) == want  # the same answers as the uninterrupted collection
    assert kills >= 10, (kills, finished)
    print(f"\ningest soak: {kills} kills landed mid-run, {finished} runs finished before their kill")

    # delete killed mid-way: all or nothing, and re-running finishes it
    where = "color IN ('red', 'blue')"
    to_delete = len(select_items(c, where=where))
    c.close()
    cmd = [sys.executable, "-m", "vtfusion.ui.cli", "-q", "delete", str(col), "--where", where]
    for delay in (0.5, 1.5, 2.5, 3.5):
        _kill_after(cmd, delay)
        c = Collection.open(col)
        with c.Session() as s:
            gone = s.scalar(select(func.count()).select_from(Item).where(Item.status == "deleted"))
        assert gone in (0, to_delete)
        assert verify(c).ok
        c.close()
    _run(cmd)
    c = Collection.open(col)
    with c.Session() as s:
        assert s.scalar(select(func.count()).select_from(Item).where(Item.status == "deleted")) == to_delete
    assert verify(c).ok
    c.close()

    # reindex killed mid-way: the old index or the new one, never a broken one
    cmd = [sys.executable, "-m", "vtfusion.ui.cli", "-q", "reindex", str(col), "--index", "IVF4,Flat"]
    for delay in (1.0, 2.0, 3.0, 4.0):
        _kill_after(cmd, delay)
        c = Collection.open(col)
        assert verify(c).ok
        assert c.indexes["image"].ntotal == n_rows - to_delete
        c.close()
    _run(cmd)
    c = Collection.open(col)
    assert c.indexes["image"].factory == "IVF4,Flat" and verify(c).ok


# ---- a full disk ---------------------------------------------------------------------------------


def test_full_disk_during_token_write_and_index_save(tmp_path, model_dir, small_catalog, monkeypatch):
    import errno

    import faiss

    from vtfusion.indexer import tokens as tokens_mod
    from vtfusion.indexer.ingest import ingest

    c = Collection.init(tmp_path / "c", model_dir)
    ingest(c, small_catalog / "test.csv", workers=0, progress=False)
    before = _count(tmp_path / "c")

    real_append = tokens_mod.TokenCache._append
    calls = []

    def append_then_fill_disk(self, recs):
        calls.append(1)
        if len(calls) == 3:  # the third batch: half a record reaches the disk, then ENOSPC
            with open(self._path(self.shards()[-1]), "ab") as f:
                f.write(recs[0].tobytes()[: self.record_bytes // 2])
            raise OSError(errno.ENOSPC, "No space left on device", str(self._path(self.shards()[-1])))
        return real_append(self, recs)

    monkeypatch.setattr(tokens_mod.TokenCache, "_append", append_then_fill_disk)
    with pytest.raises(OSError, match="No space left"):
        ingest(c, small_catalog / "train.csv", workers=0, progress=False, batch_size=4)
    monkeypatch.undo()
    c = Collection.open(tmp_path / "c")  # the torn half record is cut on open
    assert verify(c).ok
    assert _count(tmp_path / "c") == before + 8  # the two batches committed before the failure stay

    # the index save runs out of space: the old index file stays the current one
    real_write = faiss.write_index
    monkeypatch.setattr(faiss, "write_index", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(OSError, match="No space left"):
        ingest(c, small_catalog / "train.csv", workers=0, progress=False)
    monkeypatch.setattr(faiss, "write_index", real_write)
    c = Collection.open(tmp_path / "c")  # catches up from SQL
    assert verify(c).ok
    assert _count(tmp_path / "c") == 64

    # and the CLI says it clearly, with what to do
    from typer.testing import CliRunner

    from vtfusion.ui.cli import app

    Collection.init(tmp_path / "c2", model_dir)
    monkeypatch.setattr(tokens_mod.TokenCache, "_append", lambda self, recs: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device", "tokens/shard-00000.bin")))
    r = CliRunner().invoke(app, ["ingest", str(tmp_path / "c2"), str(small_catalog / "test.csv"), "--workers", "0"])
    assert r.exit_code == 1 and "No space left on device" in r.output and "run the same command again" in r.output
    assert "Traceback" not in r.output


def test_small_files_are_replaced_whole(tmp_path, model_dir, monkeypatch):
    """Configs and JSON sidecars (a model's config.json, word_slots.json, calibration.json, a
    checkpoint's state, a collection's collection.toml, an index's meta.json) are replaced whole:
    a write that fails part-way (a full disk at fsync) leaves the old file, readable, and no temp
    file; the old file's permission bits stay."""
    import errno
    import shutil
    import stat

    from vtfusion.models.config import ModelConfig

    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    old = ModelConfig.load(folder)
    before = sorted(p.name for p in folder.iterdir())
    os.chmod(folder / "config.json", 0o600)

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    changed = ModelConfig.from_dict({**old.to_dict(), "itm_weights": {"16": 0.5}})
    with pytest.raises(OSError, match="No space left"):
        changed.save(folder)
    monkeypatch.undo()
    assert ModelConfig.load(folder) == old
    assert sorted(p.name for p in folder.iterdir()) == before  # no temp file left behind
    changed.save(folder)
    assert ModelConfig.load(folder).itm_weights == {"16": 0.5}
    assert stat.S_IMODE((folder / "config.json").stat().st_mode) == 0o600
