"""A read-only search process sharing a collection with a writer (issue 22, part 3): it writes,
cuts and locks nothing under the folder, and follows the writer through the change log."""

from __future__ import annotations

import os

import numpy as np

from vtfusion.catalogs.sources import Columns
from vtfusion.indexer.collection import Collection
from vtfusion.indexer.ingest import ingest


def _files(folder) -> dict[str, tuple[int, int]]:
    """Every file under ``folder``: (size, mtime in ns)."""
    out = {}
    for root, _, names in os.walk(folder):
        for n in names:
            st = os.stat(os.path.join(root, n))
            out[os.path.relpath(os.path.join(root, n), folder)] = (st.st_size, st.st_mtime_ns)
    return out


def test_a_read_only_reader_writes_nothing_and_follows_the_writer(tmp_path, model_dir, small_catalog, db_url):
    writer = Collection.init(tmp_path / "c", model_dir, db_url=db_url)
    ingest(writer, small_catalog / "train.csv", Columns(), batch_size=16, workers=0, progress=False)
    n_train = writer.indexes["image"].ntotal
    shard = writer.tokens._path(writer.tokens.shards()[-1])
    with open(shard, "ab") as f:  # a record another machine's writer is half-way through
        f.write(b"\x01" * 100)
    before = _files(tmp_path / "c")

    reader = Collection.open(tmp_path / "c", read_only=True)
    assert reader.indexes["image"].ntotal == reader.indexes["text"].ntotal == n_train
    assert _files(tmp_path / "c") == before  # no save, no cut tail, no lock file, no stray-folder cleanup

    os.truncate(shard, before[os.path.relpath(shard, tmp_path / "c")][0] - 100)  # the writer finished its record
    ingest(writer, small_catalog / "test.csv", Columns(), batch_size=16, workers=0, progress=False)
    after_writer = _files(tmp_path / "c")
    assert reader.refresh()
    assert reader.indexes["image"].ntotal == writer.indexes["image"].ntotal > n_train
    assert _files(tmp_path / "c") == after_writer
    # the reader answers as the writer does: every stored image vector's top 5
    ids, xb = writer.stored_vectors(writer.Session(), "image")
    np.testing.assert_array_equal(reader.indexes["image"].search(xb, 5)[1], writer.indexes["image"].search(xb, 5)[1])
    assert not reader.refresh()  # nothing new: two queries, no work

    # a deletion by the writer reaches the reader; then a folder whose indexes were never saved
    from vtfusion.indexer.lifecycle import delete

    delete(writer, [int(ids[0])])
    reader.refresh()
    assert int(ids[0]) not in set(reader.indexes["image"].ids().tolist())
    (tmp_path / "c" / "index" / "meta.json").unlink()
    listing = _files(tmp_path / "c")
    fresh = Collection.open(tmp_path / "c", read_only=True)  # built in memory from SQL
    assert fresh.indexes["image"].ntotal == writer.count_vectors("image")
    assert _files(tmp_path / "c") == listing


def test_search_read_only_from_the_cli_writes_nothing(tmp_path, model_dir, small_catalog):
    import json

    from typer.testing import CliRunner

    from vtfusion.ui.cli import app

    c = Collection.init(tmp_path / "c", model_dir)
    ingest(c, small_catalog / "train.csv", Columns(), batch_size=16, workers=0, progress=False)
    (tmp_path / "c" / "index" / "meta.json").unlink()  # a writer would rebuild and save them here
    listing = _files(tmp_path / "c")
    r = CliRunner().invoke(app, ["search", str(tmp_path / "c"), "a red mug", "--read-only", "--json", "-k", "3"])
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.output)["hits"]) == 3
    assert {k for k in _files(tmp_path / "c") if not k.startswith("catalog.db")} == {k for k in listing if not k.startswith("catalog.db")}
    assert not (tmp_path / "c" / "index" / "meta.json").exists()


def test_a_read_only_process_refuses_every_write(tmp_path, model_dir, small_catalog):
    """Ingest, delete, reindex and the maintenance verbs refuse a read-only collection with a
    message, before they write anything."""
    import pytest

    from vtfusion.indexer import lifecycle, maintenance
    from vtfusion.indexer.collection import CollectionError

    c = Collection.init(tmp_path / "c", model_dir)
    ingest(c, small_catalog / "train.csv", Columns(), batch_size=16, workers=0, progress=False)
    listing = _files(tmp_path / "c")
    reader = Collection.open(tmp_path / "c", read_only=True)
    item = int(reader.indexes["image"].ids()[0])
    for verb, call in [
        ("ingest", lambda: ingest(reader, small_catalog / "test.csv", Columns(), workers=0, progress=False)),
        ("delete", lambda: lifecycle.delete(reader, [item])),
        ("reindex", lambda: lifecycle.reindex(reader)),
        ("compact", lambda: maintenance.compact(reader, progress=False)),
        ("repair", lambda: maintenance.repair(reader, progress=False)),
        ("restore", lambda: maintenance.restore(reader, [item])),
        ("reembed", lambda: maintenance.reembed(reader, model_dir, progress=False)),
    ]:
        with pytest.raises(CollectionError, match=f"read-only here: {verb}"):
            call()
    assert _files(tmp_path / "c") == listing
    assert Collection.open(tmp_path / "c").indexes["image"].ntotal == reader.indexes["image"].ntotal
