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


def _ondisk(tmp_path, xb, ids, nlist=8, parts=3):
    """An on-disk IVF built as `reindex --engine ray` builds one: trained once, parts added
    separately under their ids, merged with merge_ondisk; opened read-only."""
    import faiss

    from vtfusion.indexer.vectors import OnDiskIndex, merge_ondisk, read_ondisk

    trained = VectorIndex(xb.shape[1], f"IVF{nlist},Flat")
    trained.train(xb)
    blob = faiss.serialize_index(trained.index.index)
    files = []
    for k, (a, b) in enumerate(zip(*[np.linspace(0, len(ids), parts + 1).astype(int)[j:] for j in (0, 1)])):
        part = faiss.deserialize_index(blob)
        part.add_with_ids(xb[a:b], ids[a:b])
        files.append(str(tmp_path / f"part{k}.faiss"))
        faiss.write_index(part, files[-1])
    stem = tmp_path / "image-base-000000000001-abcd"
    merge_ondisk(blob, files, stem)
    return OnDiskIndex(read_ondisk(stem.with_suffix(".faiss")), stem.with_suffix(".faiss").name, f"IVF{nlist},Flat", xb.shape[1])


def test_on_disk_index_with_changes_equals_brute_force_and_never_writes_its_base(tmp_path, capfd, caplog, monkeypatch):
    """Probing every list, an IVF-Flat is exact: the on-disk base plus its delta and masked ids
    must answer as numpy over the live vectors, filtered or not, after adds, replacements and
    deletes, and again after save -> load; the base files are never written after the merge."""
    import os

    from vtfusion.indexer.vectors import OnDiskIndex, clean_index_folder

    d = 32
    xb = _clustered(3000, d, 12, seed=4)
    ids = np.arange(3000, dtype=np.int64) * 7 + 11
    index = _ondisk(tmp_path, xb, ids)
    base_files = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in tmp_path.glob("image-base-*")}
    assert len(base_files) == 2 and index.ntotal == 3000 and index.nlist == 8
    xq = _clustered(40, d, 12, seed=5)
    D, I = index.search(xq, 10, nprobe=8)
    np.testing.assert_array_equal(I, _brute(xb, ids, xq, 10)[1])

    # changes: 200 new items, 100 replaced (new vectors under old ids), 150 deleted (some twice)
    live = dict(zip(ids.tolist(), xb))
    new_ids = np.arange(200, dtype=np.int64) * 7 + 100_000
    new_x = _clustered(200, d, 12, seed=6)
    index.add(new_ids, new_x)
    live.update(zip(new_ids.tolist(), new_x))
    rep_ids, rep_x = ids[500:600], _clustered(100, d, 12, seed=7)
    index.add(rep_ids, rep_x)
    live.update(zip(rep_ids.tolist(), rep_x))
    gone = np.concatenate([ids[1000:1100], new_ids[:50]])
    assert index.remove(gone) == 150
    assert index.remove(gone) == 0
    for i in gone.tolist():
        del live[i]

    def check(ix):
        lid = np.array(sorted(live), dtype=np.int64)
        lx = np.stack([live[i] for i in lid.tolist()])
        assert ix.ntotal == len(lid) and np.array_equal(np.sort(ix.ids()), lid)
        D, I = ix.search(xq, 10, nprobe=8)
        bD, bI = _brute(lx, lid, xq, 10)
        np.testing.assert_array_equal(I, bI)
        np.testing.assert_allclose(D, bD, atol=1e-5)
        allowed = np.concatenate([lid[::5], gone[:20]])  # deleted ids in the filter stay out
        D, I = ix.search(xq, 10, allowed=allowed, nprobe=8)
        np.testing.assert_array_equal(I, _brute(lx, lid, xq, 10, allowed=allowed)[1])
        probe = np.array([lid[0], rep_ids[3], new_ids[-1]])
        np.testing.assert_allclose(ix.reconstruct(probe), np.stack([live[int(i)] for i in probe]), atol=1e-6)
        with pytest.raises(KeyError):  # a deleted base id is not there any more
            ix.reconstruct(gone[:1])

    check(index)
    from vtfusion.indexer import vectors

    monkeypatch.setattr(vectors, "DELTA_WARN_MIN", 0)  # 300 changed vectors over 5% of 3,000: the save says to reindex, once
    meta = index.save(tmp_path, IndexMeta("image", "fp", d, index.factory, watermark=9))
    index.save(tmp_path, IndexMeta("image", "fp", d, index.factory, watermark=9))
    assert sum("folds them into a new base" in r.getMessage() for r in caplog.records) == 1
    assert meta.base == "image-base-000000000001-abcd.faiss" and meta.file == "image-000000000009.delta.npz"
    assert sorted(clean_index_folder(tmp_path)) == ["part0.faiss", "part1.faiss", "part2.faiss"]  # meta.json names the rest
    loaded = VectorIndex.load(tmp_path, read_meta(tmp_path)["image"])
    assert isinstance(loaded, OnDiskIndex)
    check(loaded)
    assert {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in tmp_path.glob("image-base-*")} == base_files
    # a torn or missing part is unreadable (the collection then rebuilds from SQL), never half-loaded
    from vtfusion.indexer.vectors import UnreadableIndexError

    delta = tmp_path / meta.file
    good = delta.read_bytes()
    for bad in (good[: len(good) // 2], b""):
        delta.write_bytes(bad)
        with pytest.raises(UnreadableIndexError):
            VectorIndex.load(tmp_path, meta)
    delta.write_bytes(good)
    lists = tmp_path / "image-base-000000000001-abcd.ivfdata"
    whole = lists.read_bytes()
    lists.write_bytes(whole[: len(whole) // 2])  # a search would read past its end
    with pytest.raises(UnreadableIndexError, match="truncated"):
        VectorIndex.load(tmp_path, meta)
    lists.write_bytes(whole)
    lists.rename(lists.with_suffix(".gone"))
    with pytest.raises(UnreadableIndexError):
        VectorIndex.load(tmp_path, meta)
    lists.with_suffix(".gone").rename(lists)
    # a moved folder still opens (the lists file is found beside the index file, not by its old path)
    os.rename(tmp_path, tmp_path.with_name(tmp_path.name + "-moved"))
    capfd.readouterr()
    check(VectorIndex.load(tmp_path.with_name(tmp_path.name + "-moved"), meta))
    assert capfd.readouterr().out == ""  # FAISS's "updating ondisk filename" would corrupt `search --json`


def test_on_disk_base_files_are_cleaned_once_no_meta_names_them(tmp_path):
    from vtfusion.indexer.vectors import clean_index_folder

    xb = _clustered(1000, 16, 4, seed=1)
    index = _ondisk(tmp_path, xb, np.arange(1000, dtype=np.int64), nlist=4, parts=2)
    index.save(tmp_path, IndexMeta("image", "fp", 16, index.factory, watermark=3))
    for p in tmp_path.glob("part*"):
        p.unlink()
    assert clean_index_folder(tmp_path) == []  # the base and its lists are named by meta.json
    flat = VectorIndex(16, "Flat")
    flat.add(np.arange(1000, dtype=np.int64), xb)
    flat.save(tmp_path, IndexMeta("image", "fp", 16, "Flat", watermark=4))  # a later local reindex
    clean_index_folder(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image-000000000004.faiss", "meta.json"]


def test_meta_naming_a_file_outside_the_index_folder_is_corrupt(tmp_path):
    """meta.json names its files inside the folder: a path out of it (`../`, absolute) makes the
    stamps unreadable (the indexes are then rebuilt from SQL), never a file read from elsewhere."""
    import json

    flat = VectorIndex(4, "Flat")
    flat.add(np.arange(3, dtype=np.int64), _unit(np.eye(4)[:3]))
    flat.save(tmp_path, IndexMeta("image", "fp", 4, "Flat", watermark=1))
    assert read_meta(tmp_path)["image"].file == "image-000000000001.faiss"
    raw = json.loads((tmp_path / "meta.json").read_text())
    for bad in ({"file": "../image-000000000001.faiss"}, {"file": "/etc/passwd"}, {"base": "../../x.faiss"}, {"file": ".."}):
        (tmp_path / "meta.json").write_text(json.dumps({"image": {**raw["image"], **bad}}))
        assert read_meta(tmp_path) == {}
