"""VectorIndex against brute-force numpy: exact equality for Flat, stated recall for IVF."""

from __future__ import annotations

import numpy as np
import pytest

from vtfusion.indexer.vectors import IndexMeta, VectorIndex, auto_factory, read_meta


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _clustered(n, d, k, seed):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d))
    return _unit(centers[rng.integers(0, k, n)] + 0.35 * rng.normal(size=(n, d)))


def _brute(xb, ids, xq, k, allowed=None):
    sims = xq @ xb.T
    if allowed is not None:
        sims[:, ~np.isin(ids, allowed)] = -np.inf
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, 1), ids[order]


def test_flat_equals_brute_force_with_sparse_ids():
    rng = np.random.default_rng(0)
    xb, xq = _unit(rng.normal(size=(500, 33))), _unit(rng.normal(size=(20, 33)))
    ids = np.sort(rng.choice(10**9, 500, replace=False)).astype(np.int64)  # SQL keys, not positions
    index = VectorIndex(33, "Flat")
    index.add(ids, xb)
    D, I = index.search(xq, 10)
    D0, I0 = _brute(xb, ids, xq, 10)
    np.testing.assert_array_equal(I, I0)
    np.testing.assert_allclose(D, D0, rtol=1e-5, atol=1e-6)


def test_selector_restricts_results_exactly():
    rng = np.random.default_rng(1)
    xb, xq = _unit(rng.normal(size=(300, 16))), _unit(rng.normal(size=(5, 16)))
    ids = np.arange(1000, 1300, dtype=np.int64)
    index = VectorIndex(16)
    index.add(ids, xb)
    allowed = ids[::7]
    D, I = index.search(xq, 8, allowed=allowed)
    assert np.isin(I, allowed).all()
    np.testing.assert_array_equal(I, _brute(xb, ids, xq, 8, allowed)[1])
    _, I = index.search(xq, 8, allowed=ids[:3])  # fewer than k exist: -1 pads
    assert (I[:, 3:] == -1).all() and np.isin(I[:, :3], ids[:3]).all()


def test_ivf_reaches_stated_recall_on_clustered_data():
    xb = _clustered(30_000, 64, 200, seed=2)
    xq = _clustered(200, 64, 200, seed=3)
    ids = np.arange(1, 30_001, dtype=np.int64) * 3
    factory = auto_factory(len(xb))
    assert factory.startswith("IVF")
    index = VectorIndex(64, factory)
    index.train(xb)
    index.add(ids, xb)
    _, I = index.search(xq, 10)
    _, I0 = _brute(xb, ids, xq, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(I, I0)])
    assert recall >= 0.95, recall


def test_remove_and_re_add_keep_ids_right():
    rng = np.random.default_rng(4)
    xb = _unit(rng.normal(size=(100, 8)))
    ids = np.arange(10, 110, dtype=np.int64)
    index = VectorIndex(8)
    index.add(ids, xb)
    assert index.remove(ids[:30]) == 30
    index.add(ids[:5], xb[:5])  # re-add some
    index.add(ids[:5], xb[:5])  # twice: replaced, not duplicated
    assert index.ntotal == 75 and sorted(index.ids()) == sorted([*ids[:5], *ids[30:]])
    _, I = index.search(xb[:5], 1)
    np.testing.assert_array_equal(I[:, 0], ids[:5])
    _, I = index.search(xb[10:20], 1)
    assert not np.isin(I, ids[5:30]).any()


def test_save_load_round_trip_and_stamp(tmp_path):
    rng = np.random.default_rng(5)
    xb = _unit(rng.normal(size=(50, 12)))
    index = VectorIndex(12)
    index.add(np.arange(50, dtype=np.int64), xb)
    meta = index.save(tmp_path, IndexMeta("image", "abc123", 12, "Flat", watermark=7))
    assert read_meta(tmp_path)["image"] == meta and meta.count == 50 and meta.file
    loaded = VectorIndex.load(tmp_path, meta)
    np.testing.assert_array_equal(loaded.search(xb[:3], 5)[1], index.search(xb[:3], 5)[1])
    meta2 = index.save(tmp_path, IndexMeta("image", "abc123", 12, "Flat", watermark=9))
    assert not (tmp_path / meta.file).exists() and (tmp_path / meta2.file).exists()


def test_bad_shapes_are_refused():
    index = VectorIndex(4)
    with pytest.raises(ValueError, match=r"\(n, 4\)"):
        index.add(np.arange(2), np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match="ids for"):
        index.add(np.arange(3), np.zeros((2, 4), np.float32))


def test_gpu_search_path_maps_positions_to_ids(monkeypatch):
    """The GPU path searches a clone of the inner index and maps positions back to SQL ids.
    Exercised here with a CPU clone standing in for the GPU copy."""
    import faiss

    import vtfusion.indexer.vectors as v

    rng = np.random.default_rng(6)
    xb, xq = _unit(rng.normal(size=(200, 16))), _unit(rng.normal(size=(10, 16)))
    ids = np.arange(200, dtype=np.int64) * 7 + 3
    index = VectorIndex(16)
    index.add(ids, xb)
    index.remove(ids[:50])  # positions shift: the map must follow
    cpu = index.search(xq, 5)
    monkeypatch.setattr(v, "gpu_count", lambda: 1)
    monkeypatch.setattr(v, "_gpu_resources", lambda: None)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", lambda res, dev, idx: faiss.clone_index(idx))
    gpu = index.search(xq, 5)
    assert index._gpu_index is not None
    np.testing.assert_array_equal(gpu[1], cpu[1])
    index.add(ids[:3], xb[:3])  # a change drops the GPU copy
    assert index._gpu_index is None
    np.testing.assert_array_equal(index.search(xb[:3], 1)[1][:, 0], ids[:3])
