"""Ingest on a Ray cluster (``vtfusion ingest --engine ray``): the local ingest's stages, spread.

- read: the catalog is cut into blocks (``catalogs.blocks``: ~32 MB of CSV / JSONL from a line
  start, runs of Parquet row groups, runs of image files) that Ray tasks scan; the driver
  reconciles their summaries (line offsets, duplicate ids, column types: what the single reader
  decides over the whole file) and Ray Data reads the blocks again (``flat_map``), each row typed
  and each duplicate or misfit turned into its error, streaming into the next stage. Rows and
  errors are exactly the local reader's (``tests/test_blocks.py``); the driver holds 24 bytes
  per row while it reconciles, never the rows;
- decode: ``map_batches`` in Ray *tasks* (CPU): image bytes read, hashed with the text
  (content hash) and transformed to uint8, on whichever node has a free CPU;
- embed + write: ``map_batches`` in an *actor pool* (``--actors N``, ``num_gpus`` per actor
  when asked): each actor opens the collection once (model loaded once per actor), drops items
  already stored, embeds the rest, appends their token-cache records to shard files of its own
  (``TokenCache.own_shards``) and commits the batch to SQL in one transaction, exactly as the
  local writer does (``ingest._write_batch``).

Why every write is idempotent, so that Ray retrying a task or restarting a killed actor never
loses or duplicates an item: an item's identity is its content hash, unique among active items
in SQL (``uq_items_active_hash``). A batch re-run after its commit finds its hashes stored and
counts them as duplicates; a batch whose actor died before the commit left at most token-cache
records nothing references (reported by ``verify``, reclaimed by ``compact``) and is embedded
again; two actors racing on one hash: the second commit fails on the unique key and is retried
without it (``WRITE_RETRIES``). Errors are recorded once per (file, line, reason).

The driver only counts: the run's added items are read back from SQL at the end (a batch Ray
ran twice is not counted twice), the indexes are brought up to date (``catch_up``) and the run
is marked done. The collection folder (its ``index/`` and token shards) must be on a filesystem
every node mounts at the same path, and a cluster of more than one node needs a server
database (PostgreSQL): SQLite is refused there.

Nothing else in vtfusion imports Ray: it is the optional extra ``vtfusion[ray]``.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from sqlalchemy import func, select

from vtfusion.catalogs import blocks
from vtfusion.catalogs.sources import CatalogRow, Columns, RowError
from .collection import Collection, CollectionError
from .ingest import (
    DecodeStage,
    IngestReport,
    _prepare,
    _stored_hashes,
    _write_batch,
    column_kinds,
    end_run,
    start_run,
)
from .schema import ACTIVE, Item

log = logging.getLogger(__name__)
RAY_EXTRA = "pip install 'vtfusion[ray]'"
DECODE_CPUS = 0.25  # logical CPUs a decode task reserves (a scheduling share: decoding is light next to the model)


def require_ray():
    """The ``ray`` module, or a CollectionError that names the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401 - Ray Data comes with the [data] extra only
    except ImportError as e:
        raise CollectionError(f"--engine ray needs Ray Data, which is not installed ({e}): {RAY_EXTRA}") from None
    return ray


def connect(address: str | None = None, num_cpus: int | None = None):
    """Join the cluster at ``address`` ("HOST:PORT", "ray://…", "auto"; "local": a new local
    cluster for this process; None: Ray's default — RAY_ADDRESS, else the cluster `ray start`
    last started on this machine, else a new local one). ``num_cpus`` sizes a new local
    cluster. A process already connected keeps its cluster."""
    ray = require_ray()
    if not ray.is_initialized():
        kw = {"address": address} if address else {}
        if address in (None, "local") and num_cpus is not None:
            kw["num_cpus"] = num_cpus
        ray.init(logging_level=logging.WARNING, log_to_driver=False, **kw)
    return ray


def alive_nodes(ray) -> list[dict]:
    return [n for n in ray.nodes() if n.get("Alive")]


def check_database(collection: Collection, nodes: int) -> None:
    """A collection on SQLite can take one node's actors (one file, WAL); more than one node
    needs a database every node reaches with its own connections."""
    if nodes > 1 and collection.engine.dialect.name == "sqlite":
        raise CollectionError(
            f"{collection.folder} keeps its items in SQLite, which only processes on one machine can share, and this Ray "
            f"cluster has {nodes} nodes. Create the collection on PostgreSQL instead: `vtfusion init COLLECTION --model "
            "MODEL --db postgresql://USER@HOST/DB` (the README's 'Scaling out' says how), or run on one node"
        )


def _actor_cpus(ray, actors: int, gpus_per_actor: float) -> float:
    """Logical CPUs each embedding actor reserves: one, but never so many that the actors fill
    every node and no decode task can run (Ray would wait forever: the actors for decoded
    batches, the decode tasks for a free CPU). Each node keeps room for one decode task."""
    nodes = alive_nodes(ray)
    total = sum(float(n.get("Resources", {}).get("CPU", 0)) for n in nodes) or 1.0
    free_for_actors = max(total - DECODE_CPUS * max(1, len(nodes)), DECODE_CPUS)
    return round(min(1.0, free_for_actors / actors), 3)


def _row_record(row: CatalogRow | RowError) -> dict:
    """A catalog row as a Ray Data record (plain columns; metadata as JSON, its types kept); a
    RowError (a duplicate, a misfit) as a record that carries its reason to the writer, which
    records it with the batch."""
    if isinstance(row, RowError):
        return {"external_id": "", "image": "", "texts": "[]", "meta": "{}", "source": f"{row.file}:{row.line}", "row_error": row.reason}
    return {
        "external_id": row.external_id, "image": str(row.image), "texts": json.dumps(list(row.texts)),
        "meta": json.dumps(row.metadata, default=str), "source": row.source, "row_error": "",
    }


def read_plan(ray, source: Path, cols: Columns, kinds: dict[str, str], block_bytes: int | None = None) -> blocks.Plan:
    """Plan the catalog's blocks (driver; by default about four per cluster CPU, so that decoding
    spreads), scan them in Ray tasks, settle CSV cuts inside quoted fields, reconcile
    (``catalogs.blocks``)."""
    def get(refs):
        try:
            return ray.get(refs)
        except Exception as e:  # noqa: BLE001 - re-raised, unwrapped when it is the reader's
            raise _catalog_error(e) or e

    scan = ray.remote(num_cpus=DECODE_CPUS)(blocks.scan)
    cpus = int(sum(float(n.get("Resources", {}).get("CPU", 0)) for n in alive_nodes(ray)))
    planned = blocks.plan(source, cols, block_bytes, min_blocks=4 * max(1, cpus))
    scans = get([scan.remote(b, cols) for b in planned])
    settled, scans = blocks.settle(planned, scans, lambda bs: get([scan.remote(b, cols) for b in bs]))
    recheck = ray.remote(num_cpus=DECODE_CPUS)(blocks.numbers_apart_from)
    return blocks.reconcile(settled, scans, kinds, recheck=lambda b, skip: get(recheck.remote(b, cols, skip)), cols=cols)


def _catalog_error(e: BaseException) -> blocks.CatalogError | None:
    """The reader's CatalogError inside a Ray task's error (a catalog refused, or changed while it
    was read), to report as the local reader reports it: without the task's trace."""
    seen = 0
    while e is not None and seen < 8:
        if type(e) is blocks.CatalogError:
            return e
        e = getattr(e, "cause", None) or e.__cause__
        seen += 1
    return None


def finish_block(item: dict, cols: Columns, types: dict[str, str]) -> list[dict]:
    """Ray Data ``flat_map``: one planned block -> its records, in order (``blocks.finish``)."""
    block, drops = pickle.loads(item["block"])
    return [_row_record(x) for x in blocks.finish(block, cols, types, drops)]


def _rows_of(batch: dict) -> list[CatalogRow]:
    return [
        CatalogRow(str(e), Path(str(im)), tuple(json.loads(t)), json.loads(m), str(s))
        for e, im, t, m, s in zip(batch["external_id"], batch["image"], batch["texts"], batch["meta"], batch["source"])
    ]


def decode_batch(batch: dict, transform) -> dict:
    """Ray task: rows -> the same rows with uint8 pixels (zeros where decoding failed), content
    hash, image hash and error (``ingest.DecodeStage``: the local decoder, row for row)."""
    rows = _rows_of(batch)
    stage = DecodeStage(rows, transform)
    out = [(k, None, None, None, str(why)) if why else stage[k] for k, why in enumerate(batch["row_error"])]
    pixels = np.zeros((len(rows), 3, transform.size, transform.size), dtype=np.uint8)
    for k, (_, px, _, _, _) in enumerate(out):
        if px is not None:
            pixels[k] = px.numpy()
    return {
        **batch,
        "pixels": pixels,
        "hash": np.array([h or "" for _, _, h, _, _ in out], dtype=object),
        "image_hash": np.array([ih or "" for _, _, _, ih, _ in out], dtype=object),
        "error": np.array([err or "" for _, _, _, _, err in out], dtype=object),
    }


class EmbedWrite:
    """Ray actor UDF: opens the collection once (the model loads once per actor), then per batch
    embeds what is not stored yet and commits it (token records to this actor's own shards,
    then one SQL transaction). Returns one row of counts per batch."""

    def __init__(self, folder: str, run_id: int, source: str, threads: int = 1):
        if not torch.cuda.is_available():
            torch.set_num_threads(max(1, threads))
        self.collection = Collection.open(folder, catch_up=False)
        self.collection.tokens.own_shards = True
        self.bundle = self.collection.bundle
        self.encode = self.collection.tokens.encode if self.collection.tokens.enabled else None
        self.run_id, self.source = run_id, source
        import ray

        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: dict) -> dict:
        t0 = time.perf_counter()
        rows = _rows_of(batch)
        decoded = [
            (k, None if err else torch.from_numpy(np.ascontiguousarray(batch["pixels"][k])), h or None, ih or None, err or None)
            for k, (h, ih, err) in enumerate(zip(batch["hash"], batch["image_hash"], batch["error"]))
        ]
        p = _prepare(self.bundle, rows, decoded, lambda hs: _stored_hashes(self.collection.engine, hs), set(), self.encode)
        t1 = time.perf_counter()
        report = IngestReport(self.run_id)
        _write_batch(self.collection, rows, p, report, self.source)
        return {
            "rows": [len(rows)], "added": [report.added], "replaced": [report.replaced], "duplicates": [report.duplicates],
            "failed": [report.failed], "embed_s": [t1 - t0], "write_s": [report.stages["write"]],
            "node": [self.node], "pid": [os.getpid()], "committed_at": [time.time()],
        }


def ingest_ray(
    collection: Collection,
    source: str | Path,
    cols: Columns = Columns(),
    batch_size: int = 64,
    actors: int = 1,
    gpus_per_actor: float = 0.0,
    address: str | None = None,
    progress: bool = True,
    source_name: str | None = None,
    schema: str | dict[str, str] | None = None,
    on_batch: Callable[[dict], None] | None = None,
    block_bytes: int | None = None,
) -> IngestReport:
    """``ingest`` on a Ray cluster (see the module doc). ``on_batch(counts)`` is called on the
    driver for each committed batch (its counts, the actor's node id and pid, ``committed_at``:
    the actor's wall clock). ``block_bytes``: the size of a CSV / JSONL read block
    (``catalogs.blocks``; default: about four per cluster CPU).

    The report's ``added`` is what SQL holds for this run at the end; ``duplicates`` the rest of
    the rows that did not fail; ``stages`` hold ``read``, the actors' summed ``embed`` (decode
    included: Ray overlaps it) and ``write``, and the driver's ``index``."""
    if actors < 1 or gpus_per_actor < 0 or batch_size < 1:
        raise CollectionError("--actors and --batch-size must be at least 1 and --gpus-per-actor at least 0")
    collection.writable("ingest")
    t_start = time.perf_counter()
    ray = connect(address)
    check_database(collection, len(alive_nodes(ray)))
    source = Path(source)
    plan = read_plan(ray, source, cols, column_kinds(collection, schema), block_bytes)
    row_errors = plan.errors
    ident = source_name or os.path.realpath(source)
    report = start_run(collection, ident, row_errors, t_start)
    transform = collection.bundle.transform
    status = "interrupted"
    bar = restore = None
    try:
        from vtfusion.models.progress import progress as progress_bar

        bar = progress_bar(total=plan.rows, desc="ingest (ray)", unit="item", enabled=progress)
        if plan.rows:
            import ray.data

            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = False  # the project's bar below counts committed items
            # one output block per decoded batch (pixels are most of it): the actor pool hands out
            # whole blocks, so a block of thousands of rows would leave the other actors idle
            restore = ctx.target_max_block_size
            ctx.target_max_block_size = int(0.9 * batch_size * 3 * transform.size**2)
            ds = ray.data.from_items([{"block": pickle.dumps((b, d))} for b, d in zip(plan.blocks, plan.drops)],
                                     override_num_blocks=len(plan.blocks))
            ds = ds.flat_map(finish_block, fn_kwargs={"cols": cols, "types": plan.types}, num_cpus=DECODE_CPUS)
            actor_cpus = _actor_cpus(ray, actors, gpus_per_actor)
            ds = ds.map_batches(decode_batch, fn_kwargs={"transform": transform}, batch_size=batch_size,
                                batch_format="numpy", num_cpus=DECODE_CPUS)
            ds = ds.map_batches(
                EmbedWrite, fn_constructor_args=(str(collection.folder.resolve()), report.run_id, ident, max(1, int(actor_cpus))),
                batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
                num_gpus=gpus_per_actor or None, num_cpus=actor_cpus,
            )  # Ray Data restarts a killed actor and retries its tasks (max_restarts / max_task_retries -1): safe, every write is idempotent
            for out in ds.iter_rows():
                report.replaced += int(out["replaced"])
                report.failed += int(out["failed"])
                report.stages["embed"] += float(out["embed_s"])
                report.stages["write"] += float(out["write_s"])
                report.nodes[str(out["node"])] = report.nodes.get(str(out["node"]), 0) + 1
                bar.update(int(out["rows"]))
                if on_batch is not None:
                    on_batch(dict(out))
        status = "done"
    except Exception as e:  # a batch Ray could not complete (its error is raised): what was committed stays
        status = "failed"
        err = _catalog_error(e)
        if err is not None:
            raise err from None
        raise
    finally:
        if restore is not None:
            ray.data.DataContext.get_current().target_max_block_size = restore
        if bar is not None:
            bar.close()
        end_run(collection, report.run_id, status)
    with collection.Session() as s:  # counted in SQL: a batch Ray ran twice is not counted twice
        report.added = s.scalar(select(func.count()).select_from(Item).where(Item.run_id == report.run_id)) or 0
    report.duplicates = max(0, plan.rows - report.added - (report.failed - len(row_errors)))
    t = time.perf_counter()
    collection.catch_up()
    report.stages["index"] = time.perf_counter() - t
    report.seconds = time.perf_counter() - t_start
    log.info("ingest run %d on Ray (%d actors): %d added, %d duplicates, %d failed in %.1f s",
             report.run_id, actors, report.added, report.duplicates, report.failed, report.seconds)
    return report


__all__ = ["RAY_EXTRA", "alive_nodes", "check_database", "connect", "ingest_ray", "require_ray"]


# ---- sharded index build ---------------------------------------------------------------------


def merge_into(base, other) -> None:
    """Append ``other``'s vectors to ``base`` (both ``IDMap2`` over one trained index, both read
    from the same serialized bytes, so their inner types match): the inner index is merged with
    its positions offset where it stores them (IVF lists; flat codes append in order), the id map
    is concatenated and its reverse map rebuilt. (``IndexIDMap2.merge_from`` itself leaves the
    inner positions colliding: ``remove_ids`` then aborts the process.)"""
    import faiss

    ids = np.concatenate([faiss.vector_to_array(base.id_map), faiss.vector_to_array(other.id_map)]).astype(np.int64)
    ivf = isinstance(faiss.downcast_index(base.index), faiss.IndexIVF)
    base.index.merge_from(other.index, base.index.ntotal if ivf else 0)
    base.id_map.clear()
    faiss.copy_array_to_vector(ids, base.id_map)
    base.ntotal = base.index.ntotal
    base.construct_rev_map()


def _add_shard(folder: str, modality: str, trained: np.ndarray, lo: int, hi: int, out: str) -> tuple[str, int]:
    """Ray task: the trained empty index plus the active vectors of items lo <= id < hi, written
    to ``out`` (on the collection's shared storage); returns (out, vectors added)."""
    import faiss

    c = Collection.open(folder, catch_up=False)
    try:
        index = faiss.deserialize_index(trained)
        n = 0
        for ids, xb in c.iter_vectors(modality, where=(Item.id >= lo) & (Item.id < hi)):
            index.add_with_ids(np.ascontiguousarray(xb), ids)
            n += len(ids)
        faiss.write_index(index, out)
        return out, n
    finally:
        c.close()


def _training_sample(c: Collection, modality: str, n: int, want: int) -> np.ndarray:
    """About ``want`` of the ``n`` active vectors, every k-th by id (one pass, any database)."""
    step = max(1, n // max(1, want))
    parts = [xb for _, xb in c.iter_vectors(modality, where=(Item.id % step == 0))] if step > 1 else [xb for _, xb in c.iter_vectors(modality)]
    return np.concatenate(parts) if parts else np.zeros((0, c.config.embed_dim), np.float32)


def reindex_ray(
    c: Collection, factory: str | None = None, shards: int = 2, address: str | None = None, on_disk: bool = True
) -> dict[str, dict]:
    """``reindex`` on a Ray cluster: per modality, the quantizer is trained once on a sample of
    the stored embeddings (on the driver), each of ``shards`` id ranges is added in its own Ray
    task (reading its vectors from SQL, writing its part under ``index/``), and the parts are
    combined:

    - ``on_disk`` (IVF factories): merged into one IVF whose inverted lists are an ``.ivfdata``
      file under ``index/``, memory-mapped read-only (``faiss.contrib.ondisk.merge_ondisk``;
      ``vectors.OnDiskIndex``): neither the merge nor a search process needs the lists in RAM;
      later changes go to a small exact delta saved beside it;
    - otherwise (and for exact factories, which have no lists): merged in memory into one
      ordinary index.

    Saved as ``reindex`` saves: search, ``verify`` and the change-log catch-up work on either;
    ``meta.json`` records the layout. Returns {modality: {"factory", "count", "shards",
    "seconds", "layout"}}."""
    import shutil
    import uuid

    import faiss

    from .collection import change_mark
    from .schema import Embedding
    from .vectors import OnDiskIndex, check_factory, merge_ondisk, read_ondisk

    c.writable("reindex")
    if shards < 1:
        raise CollectionError("--shards must be at least 1")
    ray = connect(address)
    check_database(c, len(alive_nodes(ray)))
    checked = check_factory(c.config.embed_dim, factory or c.config.index_factory)
    if factory:
        c.config.index_factory = checked
        c.config.write(c.folder)
    add = ray.remote(num_cpus=DECODE_CPUS)(_add_shard)
    out: dict[str, dict] = {}
    for modality in ("image", "text"):
        t0 = time.perf_counter()
        with c.index_lock():
            with c.Session() as s:
                watermark = c.last_change(s)
                mark = change_mark(s, watermark)
                lo, hi, n = s.execute(
                    select(func.min(Embedding.item_id), func.max(Embedding.item_id), func.count())
                    .join(Item, Item.id == Embedding.item_id).where(Embedding.modality == modality, Item.status == ACTIVE)
                ).one()
            index = c.trained_index(modality, None, n, lambda want: _training_sample(c, modality, n, want))
            disk = on_disk and index.nlist > 0
            # the parts: the bare IVF (its lists keep the item ids) for the on-disk merge, else the id-mapped index
            trained = faiss.serialize_index(index.index.index if disk else index.index)
            tag = uuid.uuid4().hex[:8]
            work = c.folder / "index" / f"build-{tag}"
            work.mkdir(parents=True)
            try:
                bounds = np.linspace(lo or 0, (hi or 0) + 1, shards + 1).round().astype(np.int64) if n else np.zeros(2, np.int64)
                refs = [add.remote(str(c.folder.resolve()), modality, trained, int(a), int(b), str(work / f"part-{k:04d}.faiss"))
                        for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])) if b > a]
                parts = [path for path, _ in ray.get(refs)]
                if disk:  # new file names, named by meta.json only once saved (clean_index_folder removes them otherwise)
                    stem = c.folder / "index" / f"{modality}-base-{watermark:012d}-{tag}"
                    merge_ondisk(trained, parts, stem)
                    index = OnDiskIndex(read_ondisk(stem.with_suffix(".faiss")), stem.with_suffix(".faiss").name, index.factory,
                                        c.config.embed_dim)
                    layout = f"ray: {len(refs)} id-range shards merged on disk (lists memory-mapped from {stem.name}.ivfdata)"
                else:
                    merged = faiss.deserialize_index(trained)
                    for path in parts:
                        merge_into(merged, faiss.read_index(path))
                    index.index = merged
                    layout = f"ray: {len(refs)} id-range shards merged in memory"
            finally:
                shutil.rmtree(work, ignore_errors=True)
            index.nprobe = c.config.nprobe
            c._save(modality, index, watermark, mark, layout=layout)
        out[modality] = {"factory": index.factory, "count": index.ntotal, "shards": len(refs), "layout": layout,
                         "seconds": round(time.perf_counter() - t0, 2)}
    c.catch_up()  # changes committed while the shards were read
    return out
