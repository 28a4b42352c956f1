"""Lifecycle of a collection: stats, delete (tombstones), verify, reindex, ingest errors."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sqlalchemy import func, select

from . import filters
from .collection import Collection, StaleIndexError, mask_url
from .schema import ACTIVE, DELETED, MODALITIES, REPLACED, Change, Embedding, IngestError, IngestRun, Item
from .vectors import OnDiskIndex, UnreadableIndexError, VectorIndex, check_factory, read_meta

log = logging.getLogger(__name__)


def stats(c: Collection) -> dict:
    metas = read_meta(c.folder / "index")
    with c.Session() as s:
        by_status = dict(s.execute(select(Item.status, func.count()).group_by(Item.status)).all())
        emb = dict(
            s.execute(
                select(Embedding.modality, func.count())
                .join(Item, Item.id == Embedding.item_id)
                .where(Item.status == ACTIVE)
                .group_by(Embedding.modality)
            ).all()
        )
        runs = s.scalar(select(func.count()).select_from(IngestRun))
        n_errors = s.scalar(select(func.count()).select_from(IngestError))
    return {
        "collection": str(c.folder),
        "collection_id": c.config.collection_id,
        "model": c.config.model,
        "model_fingerprint": c.config.model_fingerprint,
        "db": mask_url(c.engine.url.render_as_string(hide_password=False)),
        "items_active": by_status.get(ACTIVE, 0),
        "items_deleted": by_status.get(DELETED, 0),
        "items_replaced": by_status.get(REPLACED, 0),
        "embeddings": {m: emb.get(m, 0) for m in MODALITIES},
        "indexes": {m: {"factory": v.factory, "count": v.count, "watermark": v.watermark, **_layout(c, m, v)} for m, v in metas.items()},
        "token_cache": {
            "dtype": c.config.token_dtype, "format": c.config.token_format, "folder": c.config.tokens_dir,
            "records": c.tokens.total_records(), "bytes": c.tokens.total_bytes(), "bytes_per_image": c.tokens.record_bytes,
        },
        "ingest_runs": runs,
        "ingest_errors": n_errors,
    }


def _layout(c: Collection, modality: str, meta) -> dict:
    """How an index is laid out, when not as one in-memory file: {"layout", and for an on-disk
    index "delta" (vectors changed since its build, searched exactly)}."""
    out = {"layout": meta.layout} if meta.layout else {}
    index = c.indexes.get(modality)
    if isinstance(index, OnDiskIndex):
        out["delta"] = index.delta.ntotal
    return out


def select_items(c: Collection, ids: list[str] | None = None, where: str | None = None, status: str = ACTIVE) -> list[int]:
    """Item ids (of items with ``status``) matching external ids (or ``#<item id>``) and/or a
    filter expression."""
    if not ids and not where:
        raise ValueError("say what to select: --ids and/or --where")
    with c.Session() as s:
        q = select(Item.id).where(Item.status == status)
        if ids:
            internal = [int(x[1:]) for x in ids if x.startswith("#") and x[1:].isdigit()]
            external = [x for x in ids if not (x.startswith("#") and x[1:].isdigit())]
            q = q.where(Item.external_id.in_(external) | Item.id.in_(internal))
        if where:
            q = q.where(filters.parse(where, filters.known_columns(s)))
        return list(s.scalars(q.order_by(Item.id)))


def unknown_ids(c: Collection, ids: list[str], status: str = ACTIVE) -> list[str]:
    """The ones of ``ids`` (external ids or ``#<item id>``) that name no item with ``status``."""
    found = set()
    with c.Session() as s:
        for x in ids:
            q = select(Item.id).where(Item.status == status)
            q = q.where(Item.id == int(x[1:])) if x.startswith("#") and x[1:].isdigit() else q.where(Item.external_id == x)
            if s.scalar(q.limit(1)) is not None:
                found.add(x)
    return [x for x in ids if x not in found]


def describe(c: Collection, item_ids: list[int], limit: int = 10) -> list[tuple[int, str, str]]:
    """(item id, external id, text) of the first ``limit`` of ``item_ids``: what a preview shows."""
    with c.Session() as s:
        rows = s.execute(select(Item.id, Item.external_id, Item.text).where(Item.id.in_(item_ids[:limit])).order_by(Item.id)).all()
    return [(r.id, r.external_id, r.text) for r in rows]


def delete(c: Collection, item_ids: list[int]) -> int:
    """Tombstone items in one transaction (status + change rows), then catch the indexes up."""
    c.writable("delete")
    if not item_ids:
        return 0
    with c.Session.begin() as s:
        rows = s.scalars(select(Item).where(Item.id.in_(item_ids), Item.status == ACTIVE)).all()
        for item in rows:
            item.status = DELETED
            s.add(Change(item_id=item.id, op="delete"))
        n = len(rows)
    c.catch_up()
    return n


def reindex(c: Collection, factory: str | None = None) -> dict[str, str]:
    """Rebuild every index from the stored embeddings (optionally with another factory, checked
    first: IndexTypeError when FAISS cannot build it or its index cannot remove vectors)."""
    c.writable("reindex")
    checked = check_factory(c.config.embed_dim, factory or c.config.index_factory)
    if factory:
        c.config.index_factory = checked
        c.config.write(c.folder)
    return {m: c.build_index(m, factory).factory for m in MODALITIES}


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # harmless findings (unreferenced cache records)

    @property
    def ok(self) -> bool:
        return not self.problems


def index_problems(c: Collection) -> dict[str, list[str]]:
    """What is wrong with each FAISS index against SQL: missing, unreadable, stale, built
    from another database, ids or vectors that differ. Empty lists when all is well."""
    out: dict[str, list[str]] = {}
    metas = read_meta(c.folder / "index")
    with c.Session() as s:
        last = c.last_change(s)
        for m in MODALITIES:
            out[m] = problems = []
            meta = metas.get(m)
            if meta is None:
                problems.append(f"{m} index: missing, or meta.json unreadable (opening the collection or `vtfusion reindex` rebuilds it)")
                continue
            try:
                c.check_stamp(meta, s)
            except StaleIndexError as e:
                problems.append(f"{m} index: {e}")
                continue
            if meta.model_fingerprint != c.config.model_fingerprint:
                problems.append(f"{m} index: built by model {meta.model_fingerprint}, collection uses {c.config.model_fingerprint}")
                continue
            index = c.indexes.get(m)
            if index is None:
                try:
                    index = VectorIndex.load(c.folder / "index", meta)
                except UnreadableIndexError as e:
                    problems.append(f"{m} index: {e}")
                    continue
            want = set(
                s.scalars(
                    select(Embedding.item_id)
                    .join(Item, Item.id == Embedding.item_id)
                    .where(Embedding.modality == m, Item.status == ACTIVE)
                )
            )
            have_arr = index.ids()
            have = set(have_arr.tolist())
            if len(have_arr) != len(have):
                problems.append(f"{m} index: {len(have_arr) - len(have)} duplicate ids")
            if meta.watermark != last:
                problems.append(f"{m} index: watermark {meta.watermark} behind the last change {last}")
            missing, extra = sorted(want - have), sorted(have - want)
            if missing:
                problems.append(f"{m} index: {len(missing)} stored items missing (first ids {missing[:5]})")
            if extra:
                problems.append(f"{m} index: {len(extra)} ids not active in SQL (first ids {extra[:5]})")
            # stored vectors equal the indexed ones (spot check a sample)
            sample = sorted(want & have)[:: max(1, len(want & have) // 50)][:50]
            if sample and index.factory == "Flat":
                stored = {
                    i: np.frombuffer(v, dtype=np.float32)
                    for i, v in s.execute(
                        select(Embedding.item_id, Embedding.vector).where(Embedding.modality == m, Embedding.item_id.in_(sample))
                    )
                }
                got = index.reconstruct(np.array(sample))
                bad = [i for i, g in zip(sample, got) if not np.allclose(stored[i], g, atol=1e-6)]
                if bad:
                    problems.append(f"{m} index: vectors differ from SQL for ids {bad[:5]}")
    return out


def verify(c: Collection) -> VerifyReport:
    """Reconcile SQL against both FAISS indexes and the token cache (every active item's record
    read and checked: present, whole, this item's)."""
    from .maintenance import bad_token_items

    r = VerifyReport()
    for problems in index_problems(c).values():
        r.problems += problems
    if any(r.problems):
        r.problems.append(f"rebuild the indexes from the database with `vtfusion reindex {c.folder}` (or `vtfusion repair {c.folder}`)")
    if not c.tokens.enabled:
        r.notes.append("token cache: disabled (token_dtype none); reranking re-encodes candidate images")
        return r
    with c.Session() as s:
        refs = s.execute(select(Item.id, Item.token_shard, Item.token_offset).where(Item.status == ACTIVE)).all()
    bad = bad_token_items(c)
    if bad:
        r.problems.append(
            f"token cache: {len(bad)} active items' records are missing, torn, misaligned or corrupt (first ids {bad[:5]}); "
            f"searches re-encode them from their images meanwhile. Re-encode exactly those with `vtfusion repair {c.folder}`"
        )
    locs = [(sh, off) for _, sh, off in refs if sh is not None]
    if len(set(locs)) != len(locs):
        r.problems.append(f"token cache: {len(locs) - len(set(locs))} records shared by two items")
    if c.config.token_format < 2:
        r.notes.append(f"token cache: format {c.config.token_format} has no checksums; `vtfusion compact {c.folder}` rewrites it with them")
    unreferenced = c.tokens.total_records() - len(set(locs))
    if unreferenced > 0:
        r.notes.append(f"token cache: {unreferenced} records not referenced by an active item (deleted items, or bytes written "
                       f"before an interrupted commit); `vtfusion compact {c.folder}` reclaims them")
    return r


def errors(c: Collection, limit: int = 100) -> list[IngestError]:
    with c.Session() as s:
        return list(s.scalars(select(IngestError).order_by(IngestError.id.desc()).limit(limit)))


# ---- what front ends need: filter facets and the files they may serve ------------------------


@dataclass(frozen=True)
class Facet:
    """One metadata column as a filter widget sees it."""

    name: str
    kind: str  # number | text
    values: tuple[str, ...] = ()  # text: the distinct values (empty when there are more than the cap)
    low: float | None = None  # number: the range over active items
    high: float | None = None


def facets(c: Collection, max_values: int = 50) -> list[Facet]:
    """Filterable metadata columns (names the filter grammar accepts), with their values or range.

    Text columns with more than ``max_values`` distinct values come back without values (a
    front end then offers a free-text filter instead of a multiselect).
    """
    out = []
    with c.Session() as s:
        for name, kind in filters.known_columns(s).items():
            if not filters.is_name(name):
                continue
            active = Item.status == ACTIVE
            if kind == "number":
                col = Item.meta[name].as_float()
                lo, hi = s.execute(select(func.min(col), func.max(col)).where(active, col.is_not(None))).one()
                if lo is not None:
                    out.append(Facet(name, kind, low=float(lo), high=float(hi)))
            else:
                col = Item.meta[name].as_string()
                vals = s.scalars(select(col).where(active, col.is_not(None)).distinct().order_by(col).limit(max_values + 1)).all()
                out.append(Facet(name, kind, values=tuple(vals) if len(vals) <= max_values else ()))
    return out


class MediaError(PermissionError):
    """A file a front end was asked to serve that is not under a registered source root."""


def source_roots(c: Collection) -> list[Path]:
    """Folders whose files this collection may serve: each ingested catalog's folder (a
    catalog file's parent, or the ingested folder itself)."""
    with c.Session() as s:
        sources = s.scalars(select(IngestRun.source).distinct()).all()
    roots = set()
    for src in sources:
        if not src:
            continue
        p = Path(src)
        roots.add((p if p.is_dir() else p.parent).resolve())
    return sorted(roots)


def media_path(path: str | Path, roots: list[Path]) -> Path:
    """``path`` resolved, if it is an existing file under one of ``roots``; MediaError otherwise.

    Symlinks are resolved first, so a link inside a root that points outside it is refused too.
    """
    p = Path(path).resolve()
    if not any(p.is_relative_to(r) for r in roots):
        raise MediaError(f"{path} is not under a registered source root of this collection")
    if not p.is_file():
        raise MediaError(f"{path} is not a file")
    return p
