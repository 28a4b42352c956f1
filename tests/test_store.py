"""The narrow read side search and front ends use (``indexer.store``) against the catalog and
plain SQL: order kept, statuses as ``ItemStatus``, filters equal to Python over the catalog,
any number of ids bound without meeting SQLite's parameter limit."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from vtfusion.indexer.collection import Collection
from vtfusion.indexer.ingest import ingest
from vtfusion.indexer.lifecycle import delete, select_items
from vtfusion.indexer.store import ItemStatus


@pytest.fixture(scope="module")
def col(tmp_path_factory, model_dir, small_catalog):
    c = Collection.init(tmp_path_factory.mktemp("store") / "c", model_dir)
    ingest(c, small_catalog / "train.csv", workers=0, progress=False)
    return c


def test_items_texts_and_statuses(col, small_catalog):
    rows = {r["id"]: r for r in csv.DictReader(open(small_catalog / "train.csv"))}
    ids = col.store.active_ids()
    picked = [int(ids[5]), int(ids[0]), int(ids[3])]
    items = col.store.items(picked + [10**9])
    assert sorted(items) == sorted(picked)  # an unknown id is absent, not an error
    assert col.store.texts(picked) == [items[i].text for i in picked]  # in the order asked
    for it in items.values():
        assert it.status is ItemStatus.ACTIVE and it.status == "active"
        assert it.text == f"{rows[it.external_id]['title']} | {rows[it.external_id]['caption']}"
    with pytest.raises(KeyError):
        col.store.texts([10**9])
    delete(col, select_items(col, ids=[items[picked[0]].external_id]))
    assert col.store.items([picked[0]])[picked[0]].status is ItemStatus.DELETED
    assert col.store.active_vector(picked[0], "image") is None and picked[0] not in col.store.active_ids()
    assert col.store.active_vector(picked[1], "image").shape == (col.config.embed_dim,)


def test_active_ids_under_a_filter_equal_python_over_the_catalog(col, small_catalog):
    rows = list(csv.DictReader(open(small_catalog / "train.csv")))
    items = col.store.items(col.store.active_ids().tolist())
    by_ext = {it.external_id: i for i, it in items.items()}
    want = sorted(by_ext[r["id"]] for r in rows if r["id"] in by_ext and float(r["price"]) < 30 and r["color"] in ("red", "blue"))
    assert col.store.active_ids("price < 30 AND color IN ('red', 'blue')").tolist() == want
    assert col.store.count_vectors("image", "price < 30 AND color IN ('red', 'blue')") == len(want)


def test_any_number_of_ids_is_bound_in_parts(col):
    ids = col.store.active_ids()
    many = list(range(1, 40_001))  # over SQLite's 32,766 bound parameters in one statement
    found, xb = col.store.vectors("image", many)
    assert found.tolist() == ids.tolist() and xb.shape == (len(ids), col.config.embed_dim)
    assert sorted(col.store.items(many)) == sorted(col.store.items(ids.tolist()) | col.store.items(many))
    all_ids, all_xb = col.store.vectors("image")
    np.testing.assert_array_equal(all_xb, xb)
    blocks = list(col.store.iter_vectors("image", batch=7))
    assert np.concatenate([b[0] for b in blocks]).tolist() == ids.tolist() and max(len(b[0]) for b in blocks) == 7
