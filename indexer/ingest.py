"""Bulk ingest as stages: reader -> decoder -> embedder -> writer, each timed.

- reader: ``catalog.read_source`` (CSV / JSONL / Parquet / folder), bad rows recorded;
- decoder: reads each image's bytes, hashes them with the text (the content hash), decodes
  with a pixel cap and transforms to uint8;
- embedder: drops items already stored, then ``image_tokens`` -> image embedding,
  ``encode_text`` -> text embedding, batched; token-cache records encoded;
- writer (a thread, so SQL and fsync overlap the next batch's decode and embed): token-cache
  bytes appended and fsync'ed, then ONE SQL transaction per batch for the items, their
  embeddings, their change-log rows, the batch's errors and the run's counters.

Where decoding and embedding run depends on the device (see ``default_workers``):
- GPU: worker processes decode, the main process embeds on the GPU;
- CPU with worker processes: each worker decodes AND embeds whole batches on one core
  (data parallel: on 2 cores two one-thread forwards do 1.0-1.2x the images/s of one
  two-thread forward, whose intra-op threads wait on each other, and end-to-end ingest runs
  1.3x faster than with everything in the main process);
- ``workers=0``: everything in the main process, the model on all of torch's threads.

Stage times are each stage's busy time; the writer's overlaps the others, and with embedding
workers ``decode`` and ``embed`` are summed over the workers (they overlap each other too).

Items whose content hash is already stored are counted as duplicates and skipped, so running
the same ingest twice adds nothing, and an interrupted ingest resumes where it stopped. The
FAISS indexes are brought up to date from SQL at the end (and on every open).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sqlalchemy import insert, select, tuple_, update
from sqlalchemy.exc import DataError, IntegrityError, InterfaceError, OperationalError, StatementError
from torch.utils.data import DataLoader, Dataset

from vtfusion.models import factory  # noqa: F401 - the model code loads with this module, not inside ingest's clock
from vtfusion.models.preprocess import DEFAULT_MAX_PIXELS, MAX_IMAGE_BYTES, ImageError, ImageTransform, image_hash, read_image_bytes
from vtfusion.models.progress import progress as progress_bar

from vtfusion.catalogs.sources import CatalogError, CatalogRow, Columns, RowError, parse_schema, read_source
from .collection import Collection, first_line, make_engine
from .schema import ACTIVE, REPLACED, Change, Embedding, IngestError, IngestRun, Item, MetaColumn, utcnow

log = logging.getLogger(__name__)
WRITE_RETRIES = 3  # re-commits of a batch that raced another writer on a unique key


@dataclass
class IngestReport:
    run_id: int
    added: int = 0
    replaced: int = 0  # earlier versions (same source and external id, other content) tombstoned
    duplicates: int = 0
    failed: int = 0
    seconds: float = 0.0
    stopped_by: str = ""  # "SIGINT" / "SIGTERM" when a signal stopped the run at a batch boundary
    stopped_signal: int = 0
    stages: dict[str, float] = field(default_factory=lambda: {"read": 0.0, "decode": 0.0, "embed": 0.0, "write": 0.0, "index": 0.0})
    nodes: dict[str, int] = field(default_factory=dict)  # --engine ray: batches committed per Ray node id

    @property
    def items_per_s(self) -> float:
        return (self.added + self.duplicates) / self.seconds if self.seconds else 0.0


def content_hash(image_bytes: bytes, text: str, meta: dict | None = None) -> str:
    """sha256 of everything an item is: image bytes, text and metadata (canonical JSON), so any
    change to any of them, back to an earlier value too, is an update and never a duplicate."""
    h = hashlib.sha256(image_bytes)
    h.update(b"\0")
    h.update(text.encode("utf-8"))
    if meta:
        h.update(b"\0")
        h.update(json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode("utf-8"))
    return h.hexdigest()


def item_text(row: CatalogRow) -> str:
    return " | ".join(row.texts)


class StopOnSignal:
    """While active (in the main thread), SIGINT and SIGTERM only set ``signum``: long work
    checks it between batches, commits what it has and stops, instead of dying mid-batch with
    nothing said. Worker processes forked meanwhile inherit the handler (they finish their
    batch and are shut down by the parent). A second signal of the same kind acts as before."""

    def __init__(self):
        self.signum = 0
        self._old: dict[int, object] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum == signum:  # asked twice: stop now
            signal.signal(signum, self._old.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.signum = signum
        log.warning("%s: stopping after the current batch (send it again to stop at once)", signal.Signals(signum).name)

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""


class DecodeStage(Dataset):
    """Row i -> (i, uint8 (3,S,S) or None, content hash or None, image-bytes sha256 or None,
    error or None)."""

    def __init__(self, rows: list[CatalogRow], transform: ImageTransform, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.rows, self.transform, self.max_pixels = rows, transform, max_pixels

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = self.rows[i]
        try:
            data = read_image_bytes(row.image, MAX_IMAGE_BYTES)  # a regular file, read no further than the cap
            img = self.transform.load(io.BytesIO(data), self.max_pixels, name=str(row.image))
            return i, self.transform(img), content_hash(data, item_text(row), row.metadata), image_hash(data), None
        except FileNotFoundError:
            return i, None, None, None, f"image file not found: {row.image}"
        except (ImageError, OSError, ValueError) as e:
            return i, None, None, None, str(e) or type(e).__name__
        except Exception as e:  # noqa: BLE001 - one bad file must never stop the batch
            return i, None, None, None, f"unexpected {type(e).__name__} while decoding {row.image}: {e}"


def _collate(batch):
    return batch  # rows stay separate: some failed, the rest are stacked by the embedder


def default_workers(device: torch.device | None = None) -> int:
    """Worker processes. With a GPU the CPU cores are free: up to 8 decode while the main
    process embeds. On a CPU every core runs a worker that decodes and embeds (one torch
    thread each; see ``embeds_in_workers``), up to 16; a single core decodes and embeds inline.

    Measured on 2 cores (demo PNGs, default model), end-to-end ingest against the same run's
    model forward (2 threads, images decoded beforehand): 0.61-0.70 inline, 0.52 with one
    decode-only worker process, and decode threads in step with the model were slower still
    (PIL's per-image Python holds the GIL). Two decode-and-embed workers: see bench/README."""
    cores = os.cpu_count() or 1
    if device is not None and device.type == "cuda":
        return max(1, min(8, cores - 1))
    return min(16, cores) if cores >= 2 else 0


def embeds_in_workers(device: torch.device, workers: int) -> bool:
    """Worker processes embed too: on a CPU device, where ``fork`` shares the model with them
    (copy on write: no second load, no pickling of weights)."""
    return workers > 0 and device.type == "cpu" and "fork" in multiprocessing.get_all_start_methods()


def ingest(
    collection: Collection,
    source: str | Path,
    cols: Columns = Columns(),
    batch_size: int = 64,
    workers: int | None = None,
    progress: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
    source_name: str | None = None,
    schema: str | dict[str, str] | None = None,
) -> IngestReport:
    """``on_progress(done, total)`` is called after each batch (front ends draw their own bar).

    An item is identified by (source, external id): the source is ``source_name`` when given,
    else the catalog's real path (symlinks and ``..`` resolved), so one file named two ways is
    one source, and a row ingested again with other content replaces its earlier version.

    Metadata columns get one type each (``catalog.type_columns``): the collection's registered
    type, else the declared one (``schema``, "col:type,..." or a dict; new declarations are kept
    in collection.toml), else inferred from the whole column."""
    t_start = time.perf_counter()
    source = Path(source)
    rows, row_errors = read_source(source, cols, column_kinds(collection, schema))
    ident = source_name or os.path.realpath(source)
    return ingest_rows(collection, rows, row_errors, ident, batch_size, workers, progress, t_start, on_progress)


def column_kinds(collection: Collection, schema: str | dict[str, str] | None = None) -> dict[str, str]:
    """The column types a catalog read for ``collection`` must follow: registered ones, then
    declared ones (``schema`` is added to collection.toml's; CatalogError on a conflict with a
    registered column, whose type never changes)."""
    from .filters import known_columns

    with collection.Session() as s:
        registered = known_columns(s)
    declared = parse_schema(collection.config.schema)
    new = parse_schema(schema) if isinstance(schema, str) else dict(schema or {})
    for name, kind in {**declared, **new}.items():
        if registered.get(name, kind) != kind:
            raise CatalogError(f"column {name!r} is {registered[name]} in this collection already; it cannot be declared {kind}")
    if new and {**declared, **new} != declared:
        collection.config.schema = ",".join(f"{k}:{v}" for k, v in sorted({**declared, **new}.items()))
        collection.config.write(collection.folder)
    return {**declared, **new, **registered}


def ingest_rows(
    collection: Collection,
    rows: list[CatalogRow],
    row_errors: list[RowError] = (),
    source: str = "",
    batch_size: int = 64,
    workers: int | None = None,
    progress: bool = True,
    t_start: float | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> IngestReport:
    """Ingest rows already read (what ``ingest`` does after reading its source). ``source``
    identifies them (items are (source, external id)); '' takes each row's own file."""
    bundle = collection.bundle
    t_start = time.perf_counter() if t_start is None else t_start
    report = start_run(collection, source, row_errors, t_start)

    workers = default_workers(bundle.device) if workers is None else workers
    encode = collection.tokens.encode if collection.tokens.enabled else None
    in_workers = embeds_in_workers(bundle.device, workers)
    if in_workers:
        url = collection.engine.url.render_as_string(hide_password=False)
        loader = DataLoader(
            EmbedStage(rows, bundle, url, batch_size, encode),
            batch_size=None,
            num_workers=workers,
            collate_fn=_collate,
            multiprocessing_context="fork",
        )
    else:
        loader = DataLoader(
            DecodeStage(rows, bundle.transform),
            batch_size=batch_size,
            num_workers=workers,
            collate_fn=_collate,
            pin_memory=bundle.device.type == "cuda",
            persistent_workers=False,
        )
    writer = _Writer(lambda p: _write_batch(collection, rows, p, report, source))
    seen: set[str] = set()  # hashes taken by this run (its last batches may not be committed yet)
    status = "interrupted"
    done = 0
    bar = None
    stop = StopOnSignal().__enter__()  # before the fork: workers inherit it
    batches = None
    try:
        batches = iter(loader)  # forks the workers before this run starts threads (the writer, tqdm's monitor)
        bar = progress_bar(total=len(rows), desc="ingest", unit="item", enabled=progress)
        writer.start()
        t_wait = time.perf_counter()
        for batch in batches:
            if in_workers:
                prepared = batch
                report.stages["decode"] += prepared.decode_s
                report.stages["embed"] += prepared.embed_s
            else:
                report.stages["decode"] += time.perf_counter() - t_wait
                t = time.perf_counter()
                prepared = _prepare(bundle, rows, batch, lambda hs: _stored_hashes(collection.engine, hs), seen, encode)
                report.stages["embed"] += time.perf_counter() - t
            prepared.drop_taken(seen)
            writer.put(prepared)
            bar.update(prepared.rows)
            bar.set_postfix(added=report.added, dup=report.duplicates, failed=report.failed, refresh=False)
            done += prepared.rows
            if on_progress is not None:
                on_progress(done, len(rows))
            if stop.signum:
                break
            t_wait = time.perf_counter()
        status = "interrupted" if stop.signum else "done"
    finally:
        stop.__exit__()
        batches = None  # shuts the worker processes down
        try:
            if writer.is_alive():
                writer.close()  # commits what is already embedded, or re-raises the writer's error
        except BaseException:
            status = "failed"
            raise
        finally:
            if bar is not None:  # closed once the writer has committed: the last line has the final counts
                bar.set_postfix(added=report.added, dup=report.duplicates, failed=report.failed, refresh=False)
                bar.close()
            end_run(collection, report.run_id, status)
    report.stopped_by, report.stopped_signal = stop.name, stop.signum
    t = time.perf_counter()
    collection.catch_up()
    report.stages["index"] = time.perf_counter() - t
    report.seconds = time.perf_counter() - t_start
    log.info(
        "ingest run %d: %d added, %d duplicates, %d failed in %.1f s (%.1f items/s)",
        report.run_id, report.added, report.duplicates, report.failed, report.seconds, report.items_per_s,
    )
    return report


def start_run(collection: Collection, source: str, row_errors, t_start: float) -> IngestReport:
    """Open an ingest run (status running) with the rows the reader refused already recorded;
    its report, with the read stage timed from ``t_start``."""
    collection.writable("ingest")
    with collection.Session.begin() as s:
        run = IngestRun(source=source, status="running")
        s.add(run)
        s.flush()
        report = IngestReport(run.id)
        report.failed += _record_errors(s, run.id, list(row_errors))
    report.stages["read"] = time.perf_counter() - t_start
    return report


def end_run(collection: Collection, run_id: int, status: str) -> None:
    with collection.Session.begin() as s:
        s.execute(update(IngestRun).where(IngestRun.id == run_id).values(status=status, finished_at=utcnow()))


def _record_errors(session, run_id: int, errors: list[RowError]) -> int:
    """Insert errors not already recorded (re-running an ingest does not duplicate them)."""
    if not errors:
        return 0
    files = {e.file for e in errors}
    seen = {tuple(r) for r in session.execute(select(IngestError.file, IngestError.line, IngestError.reason).where(IngestError.file.in_(files)))}
    new = {(e.file, e.line, e.reason[:1024]) for e in errors} - seen
    session.add_all(IngestError(run_id=run_id, file=f, line=ln, reason=r) for f, ln, r in sorted(new))
    return len(errors)


def _kind(v) -> str:
    return "number" if isinstance(v, (int, float)) and not isinstance(v, bool) else "text"


def _register_columns(session, metas: list[dict]) -> dict[str, str]:
    """The kind of every metadata key in ``metas``: as registered, or (a new key) registered now
    with the kind of its first value. A column's kind never changes once registered."""
    first: dict[str, str] = {}
    for meta in metas:
        for k, v in meta.items():
            first.setdefault(k, _kind(v))
    if not first:
        return {}
    kinds = {c.name: c.kind for c in session.scalars(select(MetaColumn).where(MetaColumn.name.in_(first)))}
    for name, kind in first.items():
        if name not in kinds:
            session.add(MetaColumn(name=name, kind=kind))
            kinds[name] = kind
    return kinds


def _misfit(meta: dict, kinds: dict[str, str]) -> str | None:
    """Why ``meta`` does not fit the collection's column kinds (None when it does)."""
    for k, v in meta.items():
        if _kind(v) != kinds.get(k, _kind(v)):
            return f"column {k!r} holds {kinds[k]}s in this collection; {str(v)[:40]!r} is not one"
    return None


def _source_of(row: CatalogRow, source: str = "") -> str:
    return source or row.source.rpartition(":")[0] or row.source


def _replace_older_versions(session, new_rows: list[CatalogRow], source: str) -> int:
    """An item whose (source, external id) is stored with other content is an update: the old
    version becomes a tombstone (status 'replaced' + an 'update' change), the new one is added."""
    keys = {(_source_of(r, source), r.external_id) for r in new_rows}
    if not keys:
        return 0
    old = session.scalars(
        select(Item).where(Item.status == ACTIVE, tuple_(Item.source, Item.external_id).in_(sorted(keys)))
    ).all()
    for item in old:
        item.status = REPLACED
        session.add(Change(item_id=item.id, op="update"))
    return len(old)


@dataclass
class _Prepared:
    """One embedded batch, ready for the writer (CPU tensors: from a worker process they
    travel through shared memory, not pipes)."""

    rows: int  # catalog rows this batch covered (progress)
    fresh: list[tuple[int, str]]  # (row index, content hash) of the items to add
    errors: list[RowError]
    duplicates: int
    image_emb: torch.Tensor | None = None  # (b, E) float32
    text_emb: torch.Tensor | None = None  # (t, E) for the items that have text, in order
    has_text: list[bool] = field(default_factory=list)
    records: torch.Tensor | None = None  # (b, record_bytes) uint8 token-cache records
    image_hashes: dict[int, str] = field(default_factory=dict)  # row index -> sha256 of its image bytes
    decode_s: float = 0.0  # busy time in a worker process
    embed_s: float = 0.0

    def text_rows(self) -> list[int]:
        """Item k -> its row in ``text_emb`` (meaningful where ``has_text[k]``)."""
        return (np.cumsum(self.has_text, dtype=np.int64) - 1).tolist()

    def drop_taken(self, taken: set[str]) -> None:
        """Drop items whose hash is in ``taken`` (an earlier batch of this run has them: workers
        embed before they can know), counting them as duplicates; add the rest to ``taken``."""
        keep = [k for k, (_, h) in enumerate(self.fresh) if h not in taken]
        taken.update(self.fresh[k][1] for k in keep)
        if len(keep) == len(self.fresh):
            return
        self.duplicates += len(self.fresh) - len(keep)
        if self.text_emb is not None:
            pos = self.text_rows()
            rows = [pos[k] for k in keep if self.has_text[k]]
            self.text_emb = self.text_emb[rows] if rows else None
        self.fresh = [self.fresh[k] for k in keep]
        self.has_text = [self.has_text[k] for k in keep]
        if self.image_emb is not None:
            self.image_emb = self.image_emb[keep] if keep else None
        if self.records is not None:
            self.records = self.records[keep] if keep else None


def _stored_hashes(engine, hashes: list[str]) -> set[str]:
    if not hashes:
        return set()
    with engine.connect() as conn:
        return set(conn.scalars(select(Item.content_hash).where(Item.content_hash.in_(hashes), Item.status == ACTIVE)))


@torch.no_grad()
def _prepare(
    bundle, rows: list[CatalogRow], batch, stored: Callable[[list[str]], set[str]], seen: set[str], encode: Callable | None
) -> _Prepared:
    """Split off failures, drop duplicates (``stored(hashes)``, or in ``seen``: already taken by
    this run), embed the rest; ``encode`` turns image tokens into token-cache records. A batch
    that fails to embed is embedded row by row: the row that fails is recorded, the rest kept."""
    errors, ok, image_hashes = [], [], {}
    for i, px, h, ih, err in batch:
        if err is not None:
            errors.append(RowError(*rows[i].location, err))
        else:
            ok.append((i, px, h))
            image_hashes[i] = ih
    known = stored([h for _, _, h in ok])
    fresh, taken = [], set()
    for i, px, h in ok:
        if h not in known and h not in seen and h not in taken:
            taken.add(h)
            fresh.append((i, px, h))
    try:
        return _embed(bundle, rows, fresh, encode,
                      _Prepared(len(batch), [(i, h) for i, _, h in fresh], errors, len(ok) - len(fresh), image_hashes=image_hashes))
    except Exception as e:  # noqa: BLE001 - a batch that fails to embed: find the row, keep the rest
        log.warning("a batch failed to embed (%s: %s); embedding its rows one by one", type(e).__name__, e)
    parts = []
    for item in fresh:
        try:
            parts.append(_embed(bundle, rows, [item], encode, _Prepared(0, [(item[0], item[2])], [], 0)))
        except Exception as e:  # noqa: BLE001 - this row's error alone
            errors.append(RowError(*rows[item[0]].location, f"could not be embedded: {type(e).__name__}: {str(e)[:200]}"))
    p = _Prepared(len(batch), [x for q in parts for x in q.fresh], errors, len(ok) - len(fresh), image_hashes=image_hashes)
    if parts:
        p.has_text = [x for q in parts for x in q.has_text]
        p.image_emb = torch.cat([q.image_emb for q in parts])
        texts = [q.text_emb for q in parts if q.text_emb is not None]
        p.text_emb = torch.cat(texts) if texts else None
        p.records = torch.cat([q.records for q in parts]) if encode is not None else None
    return p


def _embed(bundle, rows: list[CatalogRow], fresh, encode: Callable | None, p: _Prepared) -> _Prepared:
    """Embed ``fresh`` [(row index, uint8 pixels, hash)] into ``p``: image and text embeddings,
    token-cache records."""
    model, device = bundle.model, bundle.device
    if not fresh:
        return p
    texts = [item_text(rows[i]) for i, _, _ in fresh]
    p.has_text = [bool(x) for x in texts]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        emb, tok = bundle.embed_pixels(torch.stack([px for _, px, _ in fresh]))  # (b, E), (b, N, D_v)
        p.image_emb = emb.float().cpu()
        if any(p.has_text):
            ids, mask = bundle.tokenizer([x for x in texts if x])
            p.text_emb = model.encode_text(ids.to(device), mask.to(device)).float().cpu()  # (t, E)
    if encode is not None:
        p.records = torch.from_numpy(encode(tok.float().cpu().numpy(), [h for _, _, h in fresh]))
    return p


class EmbedStage(Dataset):
    """Batch k of the rows -> a ``_Prepared``: decoded, checked against the stored hashes and
    embedded, in a worker process (forked: it shares the model; its own database connection)."""

    def __init__(self, rows: list[CatalogRow], bundle, db_url: str, batch_size: int, encode: Callable | None):
        self.rows, self.bundle, self.db_url, self.batch_size, self.encode = rows, bundle, db_url, batch_size, encode
        self.decode = DecodeStage(rows, bundle.transform)
        self._engine, self._pid = None, None

    def __len__(self) -> int:
        return -(-len(self.rows) // self.batch_size)

    def _stored(self, hashes: list[str]) -> set[str]:
        if self._pid != os.getpid():  # never a connection inherited from the parent
            self._engine, self._pid = make_engine(self.db_url), os.getpid()
        return _stored_hashes(self._engine, hashes)

    def __getitem__(self, k: int) -> _Prepared:
        t0 = time.perf_counter()
        batch = [self.decode[i] for i in range(k * self.batch_size, min(len(self.rows), (k + 1) * self.batch_size))]
        t1 = time.perf_counter()
        p = _prepare(self.bundle, self.rows, batch, self._stored, set(), self.encode)
        p.decode_s, p.embed_s = t1 - t0, time.perf_counter() - t1
        return p


def _write_batch(collection: Collection, rows: list[CatalogRow], p: _Prepared, report: IngestReport, source: str = "") -> None:
    """Token-cache bytes (fsync'ed) first, then one SQL transaction for the whole batch.

    If another writer committed some of the same items (or metadata columns) in the meantime,
    the transaction fails on a unique key; it is rolled back, those items count as duplicates,
    and the rest is committed again (their token records stay unreferenced: harmless)."""
    t = time.perf_counter()
    locations = collection.tokens.append_records(p.records.numpy()) if p.fresh and p.records is not None else [(None, None)] * len(p.fresh)
    text_pos = p.text_rows()  # fresh item k -> its row in p.text_emb
    keep = list(range(len(p.fresh)))
    for attempt in range(WRITE_RETRIES + 1):
        try:
            replaced, n_err, keep = _commit_batch(collection, rows, p, keep, locations, text_pos, report, source, p.errors)
            break
        except IntegrityError:
            if attempt == WRITE_RETRIES:
                raise
            with collection.Session() as s:
                taken = set(s.scalars(select(Item.content_hash).where(Item.content_hash.in_([p.fresh[k][1] for k in keep]), Item.status == ACTIVE)))
            log.info("ingest batch raced another writer: %d of its items were committed meanwhile; retrying", len(taken))
            p.duplicates += sum(1 for k in keep if p.fresh[k][1] in taken)
            keep = [k for k in keep if p.fresh[k][1] not in taken]
        except (DataError, StatementError, ValueError, TypeError) as e:
            if isinstance(e, (OperationalError, InterfaceError, IntegrityError)):  # the database, not a row: stop
                raise
            log.warning("ingest batch failed to commit (%s); committing its rows one by one to find the bad one", first_line(e))
            replaced, n_err, keep = _commit_rows_alone(collection, rows, p, keep, locations, text_pos, report, source)
            break
    report.added += len(keep)
    report.replaced += replaced
    report.duplicates += p.duplicates
    report.failed += n_err
    report.stages["write"] += time.perf_counter() - t


def _commit_rows_alone(collection, rows, p: _Prepared, keep, locations, text_pos, report, source) -> tuple[int, int, list[int]]:
    """After a batch failed for a reason of its data: each row in its own transaction, a row
    that fails again recorded as its error (file, line, reason); the batch's own errors first."""
    replaced, n_err, kept = 0, 0, []
    _, n, _ = _commit_batch(collection, rows, p, [], locations, text_pos, report, source, p.errors, dup=True)
    n_err += n
    for k in keep:
        try:
            r, n, ok = _commit_batch(collection, rows, p, [k], locations, text_pos, report, source, [], dup=False)
            replaced, n_err, kept = replaced + r, n_err + n, kept + ok
        except IntegrityError:
            p.duplicates += 1  # taken by a concurrent writer meanwhile
        except (DataError, StatementError, ValueError, TypeError) as e:
            if isinstance(e, (OperationalError, InterfaceError)):
                raise
            err = RowError(*rows[p.fresh[k][0]].location, f"could not be stored: {first_line(e)}")
            _, n, _ = _commit_batch(collection, rows, p, [], locations, text_pos, report, source, [err], dup=False)
            n_err += n
    return replaced, n_err, kept


def _commit_batch(
    collection, rows, p: _Prepared, keep: list[int], locations, text_pos, report, source: str, errors: list[RowError], dup: bool = True
) -> tuple[int, int, list[int]]:
    """One transaction of Core executemany INSERTs: the items, then (their ids read back by
    content hash, which is unique) their embeddings and change rows. No ORM objects and no
    RETURNING: the writer thread holds the GIL while it builds statements (ORM objects cost
    ~0.5 ms per item), and RETURNING in parameter order made SQLite run one INSERT per item.
    Writer CPU per item, 2,012 items in batches of 64: 0.31-0.37 ms with ORM inserts and
    RETURNING, 0.25-0.31 ms now (the rest is SQLAlchemy's per-row parameter processing). At
    ~0.3 ms a GIL-holding writer caps ingest near 3,000 items/s: the bound on a fast GPU.

    Items whose metadata does not fit the collection's column kinds become row errors here,
    under the transaction (two writers registering a new column race to one kind). ``dup``:
    count the batch's duplicates in the run (once per batch). Returns (replaced, errors
    recorded, the fresh items committed)."""
    with collection.Session.begin() as s:
        kinds = _register_columns(s, [rows[p.fresh[k][0]].metadata for k in keep])
        misfits = {k: why for k in keep if (why := _misfit(rows[p.fresh[k][0]].metadata, kinds))}
        errors = [*errors, *(RowError(*rows[p.fresh[k][0]].location, why) for k, why in misfits.items())]
        keep = [k for k in keep if k not in misfits]
        fresh = [p.fresh[k] for k in keep]
        replaced = _replace_older_versions(s, [rows[i] for i, _ in fresh], source)
        n_added = 0
        if fresh:
            now = utcnow()
            s.execute(
                insert(Item.__table__),
                [
                    {
                        "source": _source_of(rows[i], source),
                        "external_id": rows[i].external_id,
                        "image_path": str(rows[i].image),
                        "text": item_text(rows[i]),
                        "content_hash": h,
                        "image_hash": p.image_hashes.get(i),
                        "meta": rows[i].metadata,
                        "status": ACTIVE,
                        "run_id": report.run_id,
                        "token_shard": locations[k][0],
                        "token_offset": locations[k][1],
                        "created_at": now,
                    }
                    for k, (i, h) in zip(keep, fresh)
                ],
            )
            hashes = [h for _, h in fresh]
            id_of = dict(s.execute(select(Item.content_hash, Item.id).where(Item.content_hash.in_(hashes), Item.status == ACTIVE)).all())
            ids = [id_of[h] for h in hashes]  # the FAISS ids
            image_emb = p.image_emb.numpy().astype("<f4", copy=False)
            text_emb = p.text_emb.numpy().astype("<f4", copy=False) if p.text_emb is not None else None
            vectors = [{"item_id": item_id, "modality": "image", "vector": image_emb[k].tobytes()} for k, item_id in zip(keep, ids)]
            vectors += [
                {"item_id": item_id, "modality": "text", "vector": text_emb[text_pos[k]].tobytes()}
                for k, item_id in zip(keep, ids)
                if p.has_text[k]
            ]
            s.execute(insert(Embedding.__table__), vectors)
            s.execute(insert(Change.__table__), [{"item_id": item_id, "op": "add", "at": now} for item_id in ids])
            n_added = len(ids)
        n_err = _record_errors(s, report.run_id, errors)
        collection.check_model(s)  # last: a reembed or compact that switched meanwhile voids this batch
        s.execute(
            update(IngestRun)
            .where(IngestRun.id == report.run_id)
            .values(
                added=IngestRun.added + n_added,
                duplicates=IngestRun.duplicates + (p.duplicates if dup else 0),
                failed=IngestRun.failed + n_err,
            )
        )
    return replaced, n_err, keep


class _Writer(threading.Thread):
    """Runs ``_write_batch`` for queued batches in order, overlapping SQL and fsync with the
    next batch's decoding and embedding (both release the GIL)."""

    def __init__(self, write):
        super().__init__(name="vtfusion-ingest-writer", daemon=True)
        self.write, self.queue, self.error = write, queue.Queue(maxsize=2), None

    def run(self) -> None:
        while (p := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.write(p)
                except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                    self.error = e

    def put(self, p: _Prepared) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.queue.put(p, timeout=0.1)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        self.queue.put(None)
        self.join()
        if self.error is not None:
            raise self.error
