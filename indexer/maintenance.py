"""Maintenance that moves token records or switches models: repair, compact, restore, reembed.

Each keeps SQL the record of truth: new bytes are written and fsync'ed first, then one SQL
transaction points items at them (and, for compact and reembed, switches the collection's token
folder or model in its ``collection`` row); files no longer referenced are removed only after
that commit. A kill at any point leaves the old state or the new one, and re-running finishes
the job. The three that move records hold ``maintenance.lock`` so they never run at once; an
ingest committing meanwhile is refused at its commit (``Collection.check_model``), never mixed in.
"""

from __future__ import annotations

import io
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sqlalchemy import delete as sql_delete
from sqlalchemy import bindparam, func, select, update

from vtfusion.models.files import ImageError
from vtfusion.models.progress import progress as progress_bar

from .collection import MAINTENANCE_LOCK, Collection, CollectionError
from .locks import file_lock
from .schema import ACTIVE, DELETED, MODALITIES, Change, CollectionInfo, Embedding, Item, Reembedding
from .tokens import FORMAT as TOKEN_FORMAT
from .tokens import TokenCache

log = logging.getLogger(__name__)
BATCH = 64  # images encoded per step (repair, reembed)
COPY_CHUNK = 1024  # records read, checked and appended per step (compact)


def _maintenance(c: Collection, action: str):
    c.writable(action)
    return file_lock(c.folder / MAINTENANCE_LOCK)


def _lock_collection_row(s) -> CollectionInfo:
    """The collection row, write-locked for this transaction (PostgreSQL: FOR UPDATE; SQLite:
    an UPDATE takes the database's write lock): ingest commits wait for the switch."""
    s.execute(update(CollectionInfo).where(CollectionInfo.id == 1).values(id=1))
    return s.scalars(select(CollectionInfo).where(CollectionInfo.id == 1).with_for_update()).one()


def _switch(row: CollectionInfo, changes: dict, drop: tuple[str, ...] = ()) -> None:
    """Set model fields in the database row, inside the caller's transaction."""
    row.config = {**{k: v for k, v in row.config.items() if k not in drop}, **changes}


def _after_switch(c: Collection, changes: dict, old_tokens: Path | None) -> None:
    """After the commit: this process and the toml follow the row, this process reads the new
    cache, the old folder goes."""
    for k, v in changes.items():
        setattr(c.config, k, v)
    c.config.write(c.folder)
    c.tokens = c._token_cache()
    c.forget_token_locations()
    if old_tokens is not None and old_tokens != c.folder / c.config.tokens_dir:
        shutil.rmtree(old_tokens, ignore_errors=True)


def _point_items(s, locations: dict[int, tuple[int | None, int | None]]) -> None:
    """Set items' token locations, one executemany (not a statement per item)."""
    if not locations:
        return
    t = Item.__table__
    s.execute(
        update(t).where(t.c.id == bindparam("b_id")).values(token_shard=bindparam("b_shard"), token_offset=bindparam("b_off")),
        [{"b_id": i, "b_shard": sh, "b_off": off} for i, (sh, off) in locations.items()],
    )


def _next_tokens_dir(c: Collection) -> str:
    n = 1
    while (c.folder / f"tokens-{n}").exists() or c.config.tokens_dir == f"tokens-{n}":
        n += 1
    return f"tokens-{n}"


# ---- repair ------------------------------------------------------------------------------------


@dataclass
class RepairReport:
    records_rewritten: int = 0  # token records re-encoded from their images
    unrepairable: list[str] = field(default_factory=list)  # items whose image could not be read
    indexes_rebuilt: list[str] = field(default_factory=list)


def bad_token_items(c: Collection, chunk: int = 1024, ids: list[int] | None = None) -> list[int]:
    """Active items (all, or those among ``ids``) whose token record is missing or fails its
    check (torn, shifted, corrupt, another item's or model's). [] when the cache is disabled."""
    if not c.tokens.enabled:
        return []
    q = select(Item.id, Item.token_shard, Item.token_offset, Item.content_hash).where(Item.status == ACTIVE).order_by(Item.id)
    with c.Session() as s:
        refs = s.execute(q if ids is None else q.where(Item.id.in_(ids))).all()
    bad = [r.id for r in refs if r.token_shard is None or r.token_offset is None]
    located = [r for r in refs if r.token_shard is not None and r.token_offset is not None]
    for i in range(0, len(located), chunk):
        part = located[i : i + chunk]
        recs, present = c.tokens.read_records([(r.token_shard, r.token_offset) for r in part])
        ok = present & c.tokens.check(recs, [r.content_hash for r in part])
        bad += [part[j].id for j in np.flatnonzero(~ok)]
    return sorted(bad)


def repair(c: Collection, progress: bool = True) -> RepairReport:
    """Re-encode exactly the token records that fail their check, and rebuild every index that
    is stale, unreadable or disagrees with SQL."""
    from .lifecycle import index_problems

    r = RepairReport()
    with _maintenance(c, "repair"):
        r.records_rewritten = _reencode(c, bad_token_items(c), r.unrepairable, progress, "repair")
        for m, problems in index_problems(c).items():
            if problems:
                log.info("rebuilding the %s index: %s", m, "; ".join(problems))
                c.build_index(m)
                r.indexes_rebuilt.append(m)
        c.catch_up()
    return r


def _reencode(c: Collection, ids: list[int], failures: list[str], progress: bool = False, desc: str = "repair") -> int:
    """New token records for ``ids`` from their image files, and the items pointed at them;
    items whose image cannot be read go to ``failures``. Returns the records written."""
    if not ids:
        return 0
    with c.Session() as s:
        items = s.execute(select(Item.id, Item.image_path, Item.content_hash).where(Item.id.in_(ids)).order_by(Item.id)).all()
    written = 0
    bar = progress_bar(total=len(items), desc=desc, unit="item", enabled=progress)
    try:
        for i in range(0, len(items), BATCH):
            part, tok = _encode_what_decodes(c, items[i : i + BATCH], failures)
            if part:
                locs = c.tokens.append(tok, [it.content_hash for it in part])
                with c.Session.begin() as s:
                    _point_items(s, {it.id: loc for it, loc in zip(part, locs)})
                written += len(part)
            bar.update(len(items[i : i + BATCH]))
    finally:
        bar.close()
    c.forget_token_locations()
    return written


def _encode_what_decodes(c: Collection, items, failures: list[str]) -> tuple[list, np.ndarray]:
    """(the items whose image decodes, their tokens (b, N, D_v)); the others go to ``failures``."""
    try:
        return list(items), c.encode_images([it.image_path for it in items]).numpy()
    except (OSError, ImageError, ValueError):  # find which: one at a time
        pass
    part, tok = [], []
    for it in items:
        try:
            tok.append(c.encode_images([it.image_path]).numpy())
            part.append(it)
        except (OSError, ImageError, ValueError) as e:
            failures.append(f"item {it.id}: {e}")
    return part, np.concatenate(tok) if tok else np.zeros((0, c.config.num_tokens, c.config.token_width), np.float32)


# ---- compact -----------------------------------------------------------------------------------


@dataclass
class CompactReport:
    records_kept: int
    records_dropped: int
    bytes_before: int
    bytes_after: int
    vacuumed: bool

    @property
    def bytes_reclaimed(self) -> int:
        return self.bytes_before - self.bytes_after


def compact(c: Collection, progress: bool = True, vacuum: bool = True) -> CompactReport:
    """Rewrite the token cache with only the active items' records (in the current record
    format, checked on the way: a bad record is re-encoded, never copied), switch to it in one
    transaction, delete the old folder; then VACUUM the database (SQLite) or ANALYZE-free
    ``VACUUM`` (PostgreSQL). Crash-safe: the old cache stays in use until the switch commits."""
    with _maintenance(c, "compact"):
        c.clean_stray_token_dirs()
        old_dir = c.folder / c.config.tokens_dir
        before = c.tokens.total_bytes() if c.tokens.enabled else 0
        total_before = c.tokens.total_records() if c.tokens.enabled else 0
        if not c.tokens.enabled:
            kept = 0
        else:
            new_name = _next_tokens_dir(c)
            cfg = c.config
            new = TokenCache(c.folder / new_name, cfg.num_tokens, cfg.token_width, cfg.token_dtype, c.tokens.shard_records,
                             salt=cfg.model_fingerprint)
            moved: dict[int, tuple[int, int]] = {}
            _copy_records(c, new, moved, progress)
            with c.Session.begin() as s:
                row = _lock_collection_row(s)
                _copy_records(c, new, moved, False, session=s)  # items committed since the first pass
                _point_items(s, moved)
                # the others' records are not copied: they must not point into the new folder's positions
                s.execute(update(Item).where(Item.status != ACTIVE).values(token_shard=None, token_offset=None))
                changes = {"tokens_dir": new_name, "token_format": TOKEN_FORMAT}
                _switch(row, changes)
            _after_switch(c, changes, old_dir)
            kept = len(moved)
        after = c.tokens.total_bytes() if c.tokens.enabled else 0
        vacuumed = _vacuum(c) if vacuum else False
    return CompactReport(kept, total_before - kept, before, after, vacuumed)


def _copy_records(c: Collection, new: TokenCache, moved: dict, progress: bool, session=None) -> None:
    """Append every active item's record not yet in ``moved`` to ``new`` (re-encoding records
    that fail their check), recording where each went."""
    def run(s):
        return s.execute(
            select(Item.id, Item.token_shard, Item.token_offset, Item.content_hash, Item.image_path)
            .where(Item.status == ACTIVE).order_by(Item.id)
        ).all()

    if session is not None:
        rows = run(session)
    else:
        with c.Session() as s:
            rows = run(s)
    rows = [r for r in rows if r.id not in moved]
    bar = progress_bar(total=len(rows), desc="compact", unit="item", enabled=progress)
    try:
        for i in range(0, len(rows), COPY_CHUNK):
            part = rows[i : i + COPY_CHUNK]
            located = [k for k, r in enumerate(part) if r.token_shard is not None]
            tokens = np.zeros((len(part), new.N, new.D), dtype=np.float32)
            ok = np.zeros(len(part), dtype=bool)
            if located:
                got, good = c.tokens.read_checked(
                    [(part[k].token_shard, part[k].token_offset) for k in located], [part[k].content_hash for k in located]
                )
                tokens[located], ok[located] = got, good
            redo = np.flatnonzero(~ok).tolist()
            if redo:
                log.warning("compact: %d records missing or failing their check are re-encoded from their images", len(redo))
                tokens[redo] = c.encode_images([part[k].image_path for k in redo]).numpy()
            locs = new.append(tokens, [r.content_hash for r in part])
            moved.update({r.id: loc for r, loc in zip(part, locs)})
            bar.update(len(part))
    finally:
        bar.close()


def _vacuum(c: Collection) -> bool:
    try:
        with c.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM")
        return True
    except Exception as e:  # noqa: BLE001 - a busy database: the token cache is compacted all the same
        log.warning("VACUUM skipped: %s", str(e).splitlines()[0])
        return False


# ---- restore -----------------------------------------------------------------------------------


@dataclass
class RestoreReport:
    restored: list[int] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # why an item was not restored
    no_tokens: list[str] = field(default_factory=list)  # restored, but its token record could not be re-encoded


def deleted_items(c: Collection, ids: list[str] | None = None, where: str | None = None) -> list[int]:
    """Deleted item ids matching external ids (or ``#<item id>``) and/or a filter expression."""
    from .lifecycle import select_items

    return select_items(c, ids, where, status=DELETED)


def restore(c: Collection, item_ids: list[int]) -> RestoreReport:
    """Bring deleted items back with their stored embeddings and token records: status active
    and an 'add' change (the indexes catch up). An item is skipped when a newer version of it
    (same source and external id) or an item with the same content is active. A restored item
    whose token record is gone (``compact`` drops deleted items' records) is re-encoded from
    its image; one whose image is gone too is reported, and reranking re-encodes nothing for it
    until ``repair`` can."""
    r = RestoreReport()
    if not item_ids:
        return r
    with _maintenance(c, "restore"):
        _restore(c, item_ids, r)
        if r.restored:
            _reencode(c, bad_token_items(c, ids=r.restored), r.no_tokens)
    c.catch_up()
    return r


def _restore(c: Collection, item_ids: list[int], r: RestoreReport) -> None:
    with c.Session.begin() as s:
        items = s.scalars(select(Item).where(Item.id.in_(item_ids), Item.status == DELETED).order_by(Item.id)).all()
        for it in items:
            newer = s.scalar(select(Item.id).where(Item.status == ACTIVE, Item.source == it.source, Item.external_id == it.external_id))
            same = s.scalar(select(Item.id).where(Item.status == ACTIVE, Item.content_hash == it.content_hash))
            if newer is not None or same is not None:
                r.skipped.append(f"{it.external_id} (#{it.id}): item #{newer or same} is active in its place")
                continue
            it.status = ACTIVE
            s.add(Change(item_id=it.id, op="add"))
            s.flush()  # one at a time: two deleted copies of one content must not both come back
            r.restored.append(it.id)


# ---- reembed -----------------------------------------------------------------------------------


@dataclass
class ReembedReport:
    model: str
    fingerprint: str
    embedded: int = 0  # items embedded by this run (earlier runs' work is kept)
    resumed: int = 0  # items an interrupted earlier run had already embedded
    failed: list[str] = field(default_factory=list)  # items whose image or text could not be re-embedded
    switched: bool = False
    stopped_by: str = ""  # "SIGINT" / "SIGTERM": stopped at a batch boundary, staged work kept
    stopped_signal: int = 0


def reembed(c: Collection, model: str | Path, progress: bool = True, batch_size: int = BATCH) -> ReembedReport:
    """Recompute both modalities' embeddings and the token cache of every active item with
    ``model``, from the item's image file and stored text, into staging rows and a new token
    folder (resumable: a re-run skips what is staged for the same model); then, when every
    active item has them, switch embeddings, token locations and the collection's model in
    one transaction and rebuild the indexes. An item whose image is gone or no longer matches
    its content hash fails: nothing is switched until it is fixed or deleted. SIGINT / SIGTERM
    stop it after the current batch (what is staged stays; re-running resumes)."""
    from vtfusion.models import factory

    from .ingest import StopOnSignal, content_hash

    ref = str(model) if factory.is_pretrained_ref(model) else str(Path(model).resolve())
    try:
        bundle = factory.load(ref, device=factory.resolve_device("auto"))
    except factory.ModelLoadError as e:
        raise CollectionError(str(e)) from e
    m, fp = bundle.model, bundle.fingerprint
    rep = ReembedReport(ref, fp)
    with _maintenance(c, "reembed"), StopOnSignal() as stop:
        old_dir = c.folder / c.config.tokens_dir
        with c.Session() as s:
            staged_dir = s.get(CollectionInfo, 1).config.get("reembed_tokens_dir")
        new_name = staged_dir if staged_dir and (c.folder / staged_dir).is_dir() else _next_tokens_dir(c)
        dtype = c.config.token_dtype
        new = TokenCache(c.folder / new_name, m.num_tokens, m.token_width, dtype, salt=fp) if dtype != "none" else None
        with c.Session.begin() as s:  # staging for another model, or without its token folder, is void
            s.execute(sql_delete(Reembedding).where(Reembedding.fingerprint != fp))
            if new_name != staged_dir:
                s.execute(sql_delete(Reembedding))
            row = s.get(CollectionInfo, 1)
            row.config = {**row.config, "reembed_tokens_dir": new_name}
        c.clean_stray_token_dirs()  # other leftovers of interrupted runs (new_name is now the staged one)
        failed_ids: set[int] = set()
        while True:
            with c.Session() as s:
                todo = s.execute(
                    select(Item.id, Item.image_path, Item.text, Item.meta, Item.content_hash)
                    .where(Item.status == ACTIVE, ~Item.id.in_(select(Reembedding.item_id).where(Reembedding.fingerprint == fp)))
                    .order_by(Item.id)
                ).all()
                staged = s.scalar(select(func.count()).select_from(Reembedding).where(Reembedding.fingerprint == fp))
            if rep.embedded == 0:
                rep.resumed = staged
            todo = [t for t in todo if t.id not in failed_ids]
            if not todo:
                break
            _embed_into_staging(c, bundle, new, todo, rep, failed_ids, progress, batch_size, content_hash, stop)
            if stop.signum:
                rep.stopped_by, rep.stopped_signal = stop.name, stop.signum
                return rep
        if rep.failed:
            log.warning("reembed: %d items failed; nothing switched. Fix or delete them and run the command again", len(rep.failed))
            return rep
        with c.Session.begin() as s:
            row = _lock_collection_row(s)
            missing = s.scalar(
                select(func.count()).select_from(Item)
                .where(Item.status == ACTIVE, ~Item.id.in_(select(Reembedding.item_id).where(Reembedding.fingerprint == fp)))
            )
            if missing:  # an ingest committed meanwhile: the next loop embeds them
                raise CollectionError(f"{missing} items were added while re-embedding; run the command again to embed them and switch")
            staged = s.execute(select(Reembedding).where(Reembedding.fingerprint == fp)).scalars().all()
            ids = [st.item_id for st in staged]
            for i in range(0, len(ids), 500):
                s.execute(sql_delete(Embedding).where(Embedding.item_id.in_(ids[i : i + 500])))
            vectors = [{"item_id": st.item_id, "modality": "image", "vector": st.image_vector} for st in staged]
            vectors += [{"item_id": st.item_id, "modality": "text", "vector": st.text_vector} for st in staged if st.text_vector is not None]
            if vectors:
                s.execute(Embedding.__table__.insert(), vectors)
            _point_items(s, {st.item_id: (st.token_shard, st.token_offset) for st in staged})
            s.execute(sql_delete(Reembedding))
            changes = {
                "model": ref, "model_fingerprint": fp, "embed_dim": m.embed_dim, "num_tokens": m.num_tokens,
                "token_width": m.token_width, "tokens_dir": new_name if new is not None else c.config.tokens_dir,
                "token_format": TOKEN_FORMAT,
            }
            _switch(row, changes, drop=("reembed_tokens_dir",))
        _after_switch(c, changes, old_dir if new is not None else None)
        c._bundle = bundle
        rep.switched = True
        for modality in MODALITIES:
            c.build_index(modality)
    return rep


def _embed_into_staging(c, bundle, new: TokenCache | None, todo, rep: ReembedReport, failed_ids: set[int], progress, batch_size,
                        content_hash, stop) -> None:
    import torch

    model, device = bundle.model, bundle.device
    bar = progress_bar(total=len(todo), desc="reembed", unit="item", enabled=progress)
    try:
        for i in range(0, len(todo), batch_size):
            part, pixels = [], []
            for it in todo[i : i + batch_size]:
                try:
                    data = Path(it.image_path).read_bytes()
                    if it.content_hash not in (content_hash(data, it.text, it.meta), content_hash(data, it.text)):
                        raise ImageError(f"{it.image_path} changed since it was ingested (content hash differs); ingest it again")
                    pixels.append(bundle.transform(bundle.transform.load(io.BytesIO(data), name=it.image_path)))
                    part.append(it)
                except (OSError, ImageError, ValueError) as e:
                    rep.failed.append(f"item #{it.id}: {e}")
                    failed_ids.add(it.id)
            if part:
                with torch.no_grad():
                    emb, tok = bundle.embed_pixels(torch.stack(pixels))  # (b, E), (b, N, D_v)
                    img = emb.float().cpu().numpy().astype("<f4")
                    has_text = [bool(it.text) for it in part]
                    txt = None
                    if any(has_text):
                        ids, mask = bundle.tokenizer([it.text for it in part if it.text])
                        txt = model.encode_text(ids.to(device), mask.to(device)).float().cpu().numpy().astype("<f4")  # (t, E)
                locs = new.append(tok.float().cpu().numpy(), [it.content_hash for it in part]) if new is not None else [(None, None)] * len(part)
                pos = np.cumsum(has_text) - 1
                with c.Session.begin() as s:
                    s.execute(
                        Reembedding.__table__.insert(),
                        [
                            {
                                "item_id": it.id, "fingerprint": bundle.fingerprint, "image_vector": img[k].tobytes(),
                                "text_vector": txt[pos[k]].tobytes() if has_text[k] else None,
                                "token_shard": locs[k][0], "token_offset": locs[k][1],
                            }
                            for k, it in enumerate(part)
                        ],
                    )
                rep.embedded += len(part)
            bar.update(len(todo[i : i + batch_size]))
            if stop.signum:
                return
    finally:
        bar.close()

