"""``ingest --engine ray`` on a local Ray cluster (one per test session: Ray starts slowly on 2
cores): the same items, embeddings, token records and errors as the local ingest; an actor
killed mid-job loses and duplicates nothing; re-running adds nothing; the refusals."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from sqlalchemy import func, select

from vtfusion.catalogs.sources import Columns
from vtfusion.indexer.collection import Collection, CollectionError
from vtfusion.indexer.distributed import check_database, ingest_ray, require_ray
from vtfusion.indexer.ingest import ingest
from vtfusion.indexer.lifecycle import verify
from vtfusion.indexer.schema import ACTIVE, Embedding, IngestError, Item

from conftest import _pg_available, _pg_database


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray cluster for the session, 2 CPUs, no dashboard."""
    import ray

    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, object_store_memory=300 * 1024**2,
             logging_level="WARNING", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def pg_url():
    if not _pg_available():
        if os.environ.get("VTFUSION_REQUIRE_POSTGRES") == "1":
            pytest.fail("PostgreSQL is required (VTFUSION_REQUIRE_POSTGRES=1) but unreachable")
        pytest.skip("PostgreSQL unreachable")
    yield from _pg_database()


@pytest.fixture(scope="module")
def catalog(tmp_path_factory, small_catalog):
    """small_catalog's training rows plus a missing image, a corrupt image, a row repeated
    under another id (a content duplicate), a second row under a taken id (a duplicate id, an
    error) and a row with a field too many (a parse error)."""
    out = tmp_path_factory.mktemp("ray-catalog")
    for p in small_catalog.iterdir():
        (shutil.copytree if p.is_dir() else shutil.copy)(p, out / p.name)
    (out / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with open(out / "train.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    extra = [
        {**rows[0], "id": "missing-1", "image": "images/nowhere.png"},
        {**rows[1], "id": "corrupt-1", "image": "images/corrupt.png"},
        {**rows[2], "id": "again-1"},
        {**rows[3], "id": rows[0]["id"]},
    ]
    with open(out / "train.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows + extra)
        f.write(",".join(["x"] * (len(rows[0]) + 1)) + "\n")
    return out


def _state(c: Collection) -> dict:
    """content hash -> (external id, image embedding, text embedding, decoded tokens)."""
    with c.Session() as s:
        items = s.execute(select(Item.id, Item.content_hash, Item.external_id, Item.token_shard, Item.token_offset)
                          .where(Item.status == ACTIVE)).all()
        vecs = {(e.item_id, e.modality): np.frombuffer(e.vector, dtype="<f4") for e in s.scalars(select(Embedding))}
        errors = {(os.path.basename(e.file), e.line, e.reason.replace(str(c.folder), "")) for e in s.scalars(select(IngestError))}
    tokens = c.tokens.read([(sh, off) for _, _, _, sh, off in items], [h for _, h, _, _, _ in items])
    return {
        "items": {h: (ext, vecs[(i, "image")], vecs[(i, "text")], tokens[k]) for k, (i, h, ext, _, _) in enumerate(items)},
        "errors": errors,
    }


def _same(a: dict, b: dict) -> None:
    assert a["items"].keys() == b["items"].keys()
    for h, (ext, img, txt, tok) in a["items"].items():
        ext2, img2, txt2, tok2 = b["items"][h]
        # two rows of one catalog with the same content: the first to commit is stored (the
        # local ingest: the first in file order; Ray: whichever batch commits first)
        assert ext == ext2 or "again-1" in (ext, ext2)
        np.testing.assert_allclose(img, img2, atol=1e-5)
        np.testing.assert_allclose(txt, txt2, atol=1e-5)
        np.testing.assert_allclose(tok, tok2, atol=2e-3)  # fp16 records of float tokens
    assert a["errors"] == b["errors"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, model_dir, catalog):
    """The local ingest of ``catalog`` (in this process, no workers)."""
    c = Collection.init(tmp_path_factory.mktemp("ref") / "c", model_dir)
    r = ingest(c, catalog / "train.csv", Columns(), batch_size=16, workers=0, progress=False)
    return r, _state(c), c


def test_ray_ingest_into_postgresql_equals_the_local_ingest_and_resumes(ray_local, tmp_path, model_dir, catalog, reference, pg_url):
    ref_report, ref_state, _ = reference
    c = Collection.init(tmp_path / "c", model_dir, db_url=pg_url)
    nodes = {}
    r = ingest_ray(c, catalog / "train.csv", Columns(), batch_size=16, actors=2, progress=False,
                   on_batch=lambda out: nodes.update({out["pid"]: out["node"]}), block_bytes=700)  # read in ~8 blocks
    n = len(ref_state["items"])  # small_catalog's training rows
    assert (r.added, r.duplicates, r.failed) == (ref_report.added, ref_report.duplicates, ref_report.failed) == (n, 1, 4)
    reasons = [reason for _, _, reason in ref_state["errors"]]  # the reader's errors reach the table from the blocks too (_same)
    assert sum(r.startswith("wrong number of fields") for r in reasons) == sum(r.startswith("duplicate id") for r in reasons) == 1
    _same(ref_state, _state(c))
    assert len(set(nodes)) >= 1 and all(nodes.values())
    assert len(c.tokens.shards()) >= 1
    assert verify(c).ok
    # search sees them (the indexes caught up from SQL)
    assert c.indexes["image"].ntotal == n
    # again: nothing new, every row a duplicate, nothing recorded twice
    again = ingest_ray(c, catalog / "train.csv", Columns(), batch_size=16, actors=2, progress=False)
    assert (again.added, again.duplicates, again.failed) == (0, n + 1, 4)
    _same(ref_state, _state(c))


def test_an_actor_killed_mid_ingest_loses_and_duplicates_nothing(ray_local, tmp_path, model_dir, catalog, reference):
    """SIGKILL the actor that committed the first batch: Ray restarts it and retries its
    tasks; the result equals the reference and verify is clean (SQLite: one node)."""
    ref_report, ref_state, _ = reference
    c = Collection.init(tmp_path / "c", model_dir)
    killed = []

    def kill_first(out):
        if not killed:
            killed.append(int(out["pid"]))
            os.kill(int(out["pid"]), signal.SIGKILL)

    r = ingest_ray(c, catalog / "train.csv", Columns(), batch_size=8, actors=1, progress=False, on_batch=kill_first)
    assert killed
    assert (r.added, r.failed) == (ref_report.added, ref_report.failed)
    _same(ref_state, _state(c))
    assert verify(c).ok


def test_sqlite_on_a_multi_node_cluster_is_refused(tmp_path, model_dir):
    c = Collection.init(tmp_path / "c", model_dir)
    check_database(c, 1)  # one node: SQLite is fine
    with pytest.raises(CollectionError, match=r"SQLite.*2 nodes.*postgresql://"):
        check_database(c, 2)


def test_engine_ray_without_ray_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(CollectionError, match=r"pip install 'vtfusion\[ray\]'"):
        require_ray()


def test_nothing_imports_ray_unless_asked():
    """A fresh interpreter that imports the CLI, the collection, the local ingest and search
    has not imported ray (import-linter checks the code; this checks what actually runs)."""
    code = ("import sys; import vtfusion.ui.cli, vtfusion.indexer.ingest, vtfusion.search.engine, vtfusion.workflows.demo; "
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_two_node_cluster_ingest_runs_actors_on_both_nodes(tmp_path, model_dir, catalog, reference, pg_url):
    """`ray start --head` plus a second `ray start --address` raylet (one CPU each, so the two
    actors cannot share a node); `vtfusion ingest --engine ray` joins it in its own process."""
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    vtf = os.path.join(os.path.dirname(sys.executable), "vtfusion")
    port = _free_port()
    # loopback only: no token authentication (a real cluster keeps Ray's token auth, the token on every node)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    import tempfile

    temp = tempfile.mkdtemp(prefix="vtray-", dir="/tmp")  # Ray's socket paths must stay under 108 bytes
    common = ["--num-cpus=1", "--num-gpus=0", "--disable-usage-stats"]
    try:
        subprocess.run([ray_bin, "start", "--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp}", *common],
                       check=True, env=env, capture_output=True, timeout=180)
        subprocess.run([ray_bin, "start", f"--address=127.0.0.1:{port}", *common],
                       check=True, env=env, capture_output=True, timeout=180)
        subprocess.run([vtf, "init", str(tmp_path / "c"), "--model", str(model_dir), "--db", pg_url], check=True, env=env,
                       capture_output=True)
        out = subprocess.run([vtf, "ingest", str(tmp_path / "c"), str(catalog / "train.csv"), "--engine", "ray",
                              "--ray-address", f"127.0.0.1:{port}", "--actors", "2", "--batch-size", "4", "--json"],
                             env=env, capture_output=True, text=True, timeout=900)
        assert out.returncode == 1, out.stderr[-3000:]  # 1: rows failed (missing and corrupt image, duplicate id, bad line)
        import json

        report = json.loads(out.stdout)
        assert len(report["nodes"]) == 2, report["nodes"]  # batches committed on both nodes
        assert (report["added"], report["failed"]) == (reference[0].added, reference[0].failed)
        _same(reference[1], _state(Collection.open(tmp_path / "c")))
        # a SQLite collection is refused on this cluster
        subprocess.run([vtf, "init", str(tmp_path / "s"), "--model", str(model_dir)], check=True, env=env, capture_output=True)
        refused = subprocess.run([vtf, "ingest", str(tmp_path / "s"), str(catalog / "train.csv"), "--engine", "ray",
                                  "--ray-address", f"127.0.0.1:{port}"], env=env, capture_output=True, text=True, timeout=300)
        assert refused.returncode == 1 and "PostgreSQL" in refused.stderr, refused.stderr[-2000:]
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def test_cli_engine_options_are_checked_before_anything_runs(tmp_path):
    from typer.testing import CliRunner

    from vtfusion.ui.cli import app

    runner = CliRunner()
    for args, why in [
        (["--engine", "spark"], "--engine must be local or ray"),
        (["--actors", "2"], "need --engine ray"),
        (["--engine", "ray", "--workers", "2"], "--workers is for --engine local"),
    ]:
        r = runner.invoke(app, ["ingest", str(tmp_path / "c"), str(tmp_path / "x.csv"), *args])
        assert r.exit_code == 2 and why in r.output, r.output
    r = runner.invoke(app, ["reindex", str(tmp_path / "c"), "--shards", "4"])
    assert r.exit_code == 2 and "need --engine ray" in r.output, r.output


def test_writers_with_own_shards_never_write_into_one_shard(tmp_path):
    """What each Ray actor does: two writers on one token folder, interleaved, each filling
    shards it created; every record reads back as its item's tokens."""
    from vtfusion.indexer.tokens import TokenCache

    rng = np.random.default_rng(0)
    tok = rng.standard_normal((16, 3, 4)).astype(np.float32)
    hashes = [f"{k:064x}" for k in range(16)]
    a, b = (TokenCache(tmp_path, 3, 4, shard_records=5) for _ in range(2))
    a.own_shards = b.own_shards = True
    la = a.append(tok[:7], hashes[:7])
    lb = b.append(tok[7:14], hashes[7:14])
    la += a.append(tok[14:], hashes[14:])
    assert not {s for s, _ in la} & {s for s, _ in lb}
    assert len(set(la + lb)) == 16
    fresh = TokenCache(tmp_path, 3, 4, shard_records=5)  # a reader (and a shared-shard writer) after them
    np.testing.assert_allclose(fresh.read(la + lb, hashes[:7] + hashes[14:] + hashes[7:14]),
                               np.concatenate([tok[:7], tok[14:], tok[7:14]]), atol=1e-2)
    assert fresh.append(tok[:1], hashes[:1])[0][0] == max(s for s, _ in la + lb)  # appends to the last shard, as before


def _all_queries(c: Collection, modality: str, k: int, nprobe: int | None = None):
    ids, xb = c.stored_vectors(c.Session(), modality)
    return c.indexes[modality].search(xb, k, nprobe=nprobe), ids, xb


def test_sharded_reindex_equals_the_single_index_and_catches_up(ray_local, tmp_path, model_dir, catalog, small_catalog):
    """Flat (exact): the merged shards answer every stored vector's top-10 exactly as the
    one-process reindex; meta.json says how it was built; later ingests catch up on it."""
    from vtfusion.indexer.distributed import reindex_ray
    from vtfusion.indexer.lifecycle import reindex
    from vtfusion.indexer.vectors import read_meta

    c = Collection.init(tmp_path / "c", model_dir, index_factory="Flat")
    ingest(c, catalog / "train.csv", Columns(), batch_size=16, workers=0, progress=False)
    reindex(c)
    single = {m: _all_queries(c, m, 10)[0] for m in ("image", "text")}
    built = reindex_ray(c, shards=3)
    assert {m: (r["count"], r["shards"]) for m, r in built.items()} == {"image": (50, 3), "text": (50, 3)}
    for m in ("image", "text"):
        (D, I), _, _ = _all_queries(c, m, 10)
        np.testing.assert_array_equal(I, single[m][1])
        np.testing.assert_allclose(D, single[m][0], atol=1e-6)
        assert read_meta(c.folder / "index")[m].layout == "ray: 3 id-range shards merged in memory"  # exact: no lists to put on disk
    assert verify(c).ok
    assert not list((c.folder / "index").glob("build-*"))  # the parts are gone
    stale = c.folder / "index" / "build-deadbeef"  # what a sharded build killed midway leaves
    stale.mkdir()
    (stale / "part-0000.faiss").write_bytes(b"partial")
    Collection.open(c.folder)  # its catch-up cleans the index folder under the index lock
    assert not stale.exists()
    # the change log still drives it: new items arrive, deleted ones leave
    ingest(c, small_catalog / "test.csv", Columns(), batch_size=16, workers=0, progress=False)
    reopened = Collection.open(c.folder)
    assert reopened.indexes["image"].ntotal == reopened.count_vectors("image") > 50
    assert verify(reopened).ok


def test_sharded_ivf_reindex_equals_the_one_process_ivf_and_recalls_against_brute_force(ray_local, tmp_path, model_dir):
    """IVF on model-produced embeddings (300 generated items): the same training sample, so the
    merged shards — in memory, and merged on disk (the default) — equal the one-process IVF at
    every nprobe; recall@10 against numpy. The on-disk index then follows ingests and deletes
    (probing every list it is exact: equal to numpy over the stored vectors) without its base
    files being written, opens read-only, and a local reindex replaces it and removes them."""
    from vtfusion.catalogs.demo import generate
    from vtfusion.indexer.distributed import reindex_ray
    from vtfusion.indexer.lifecycle import delete, reindex
    from vtfusion.indexer.vectors import OnDiskIndex, read_meta

    generate(tmp_path / "cat", n=300, seed=5, image_size=48, test_frac=0.0)
    generate(tmp_path / "more", n=40, seed=6, image_size=40, test_frac=0.0)  # another size: other bytes, new items
    c = Collection.init(tmp_path / "c", model_dir, index_factory="IVF4,Flat")
    ingest(c, tmp_path / "cat" / "train.csv", Columns(), batch_size=32, workers=0, progress=False)
    reindex(c)
    assert c.indexes["image"].nlist == 4
    one = {p: _all_queries(c, "image", 10, nprobe=p)[0] for p in (1, 2)}
    for on_disk in (False, True):
        built = reindex_ray(c, shards=4, on_disk=on_disk)
        assert isinstance(c.indexes["image"], OnDiskIndex) == on_disk
        assert ("merged on disk" in built["image"]["layout"]) == on_disk
        assert read_meta(c.folder / "index")["image"].layout == built["image"]["layout"]
        for p in (1, 2):
            (D, I), ids, xb = _all_queries(c, "image", 10, nprobe=p)
            np.testing.assert_array_equal(I, one[p][1])
    (D, I), ids, xb = _all_queries(c, "image", 10)
    exact = ids[np.argsort(-(xb @ xb.T), axis=1, kind="stable")[:, :10]]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(I, exact)])
    assert recall >= 0.95, recall
    assert verify(c).ok

    index_dir = c.folder / "index"
    base = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in index_dir.glob("*-base-*")}
    assert sorted(p.rsplit(".", 1)[1] for p in base) == ["faiss", "faiss", "ivfdata", "ivfdata"]
    added = ingest(c, tmp_path / "more" / "train.csv", Columns(), batch_size=32, workers=0, progress=False).added
    assert added > 20
    delete(c, [int(i) for i in ids[:30]])
    reopened = Collection.open(c.folder)
    for m in ("image", "text"):
        assert isinstance(reopened.indexes[m], OnDiskIndex)
        (D, I), sids, sxb = _all_queries(reopened, m, 10, nprobe=4)
        assert reopened.indexes[m].ntotal == len(sids) == len(ids) + added - 30
        sims = sxb @ sxb.T  # ties (items with one caption) may come in any order: compare scores, and each hit's own score
        np.testing.assert_allclose(D, -np.sort(-sims, axis=1)[:, :10], atol=1e-5)
        np.testing.assert_allclose(D, np.take_along_axis(sims, np.searchsorted(sids, I), axis=1), atol=1e-5)
    assert verify(reopened).ok
    from vtfusion.indexer.lifecycle import stats

    assert stats(reopened)["indexes"]["image"]["delta"] == added  # the base items deleted are masked, not in the delta
    assert {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in index_dir.glob("*-base-*")} == base
    # a search process maps the lists; FAISS's own messages about it never reach stdout (it carries --json)
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "vtfusion.ui.cli", "-q", "search", str(c.folder), "a red mug", "--read-only",
                          "--json", "-k", "3"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)["hits"]) == 3
    reader = Collection.open(c.folder, read_only=True)
    np.testing.assert_array_equal(_all_queries(reader, "image", 10, nprobe=4)[0][1], _all_queries(reopened, "image", 10, nprobe=4)[0][1])
    reindex(reopened)  # a local rebuild: an ordinary index again, the base files gone
    assert not isinstance(reopened.indexes["image"], OnDiskIndex) and not list(index_dir.glob("*-base-*"))
    assert verify(reopened).ok


def test_a_catalog_refused_inside_a_read_task_is_reported_as_the_local_reader_reports_it(ray_local, tmp_path, model_dir):
    """A gzipped CSV is read whole by one task: its missing text column surfaces there, and
    comes back as the reader's CatalogError (not a Ray traceback); no run is opened."""
    import gzip

    from vtfusion.catalogs.sources import CatalogError
    from vtfusion.indexer.schema import IngestRun

    (tmp_path / "c.csv.gz").write_bytes(gzip.compress(b"id,image,colour\na,x.png,red\n"))
    c = Collection.init(tmp_path / "c", model_dir)
    with pytest.raises(CatalogError, match="no text column") as e:
        ingest_ray(c, tmp_path / "c.csv.gz", Columns(), progress=False)
    assert type(e.value) is CatalogError and str(e.value).startswith(f"{tmp_path / 'c.csv.gz'}: no text column")  # no task trace
    with c.Session() as s:
        assert s.scalar(select(func.count()).select_from(IngestRun)) == 0
