"""The narrow read side of a collection's SQL record, for search and front ends.

``search/`` and ``ui/`` read items through this and never touch the tables (import-linter
checks that ``vtfusion.search`` imports neither ``indexer.schema`` nor SQLAlchemy): items by id
in the order asked, texts, image paths, the active ids under a filter expression, stored
vectors (all, by id, or streamed in blocks), the change mark, and items by image bytes. Every
id list is bound in parts of ``ID_BATCH``, so no query meets a database's parameter limit
(SQLite: 32,766) however many ids a filter or an evaluation names.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import select

from . import filters
from .schema import Embedding, Item, ItemStatus  # ItemStatus: the status vocabulary of search and front ends too

if TYPE_CHECKING:
    from .collection import Collection

__all__ = ["ID_BATCH", "ItemRecord", "ItemStatus", "MetadataStore"]
ID_BATCH = 500  # ids bound in one query


@dataclass(frozen=True)
class ItemRecord:
    """What search shows of an item."""

    id: int
    external_id: str
    image_path: str
    text: str
    meta: dict[str, Any]
    status: ItemStatus


def _parts(ids: Sequence[int]) -> Iterator[list[int]]:
    ids = [int(i) for i in ids]
    for start in range(0, len(ids), ID_BATCH):
        yield ids[start : start + ID_BATCH]


class MetadataStore:
    """Read-only queries over one collection's items (``Collection.store``)."""

    def __init__(self, collection: Collection):
        self.c = collection

    def items(self, ids: Sequence[int]) -> dict[int, ItemRecord]:
        """The items with these ids, whatever their status, by id (unknown ids are absent)."""
        out = {}
        with self.c.Session() as s:
            for part in _parts(ids):
                for r in s.execute(
                    select(Item.id, Item.external_id, Item.image_path, Item.text, Item.meta, Item.status).where(Item.id.in_(part))
                ):
                    out[r.id] = ItemRecord(r.id, r.external_id, r.image_path, r.text, dict(r.meta or {}), ItemStatus(r.status))
        return out

    def texts(self, ids: Sequence[int]) -> list[str]:
        """The texts of these items, in the order given (KeyError for an unknown id)."""
        found = {}
        with self.c.Session() as s:
            for part in _parts(ids):
                found.update(s.execute(select(Item.id, Item.text).where(Item.id.in_(part))).all())
        return [found[int(i)] for i in ids]

    def image_path(self, item_id: int) -> str | None:
        with self.c.Session() as s:
            return s.scalar(select(Item.image_path).where(Item.id == int(item_id)))

    def active_vector(self, item_id: int, modality: str) -> np.ndarray | None:
        """The stored vector (E,) of an active item, or None (unknown, deleted, replaced, none
        of that modality)."""
        with self.c.Session() as s:
            row = s.execute(
                select(Item.status, Embedding.vector)
                .join(Embedding, (Embedding.item_id == Item.id) & (Embedding.modality == modality))
                .where(Item.id == int(item_id))
            ).first()
        if row is None or row.status != ItemStatus.ACTIVE:
            return None
        return np.frombuffer(row.vector, np.float32)

    def resolve_item(self, ref: str | int) -> int:
        """The active item a user names: its catalog (external) id, or ``#<item id>``; a bare
        number that is no item's external id is taken as an item id. An ``int`` is an item id.
        LookupError, with the choices, when the name fits no active item or several (one
        external id in two sources)."""
        if isinstance(ref, int) or (isinstance(ref, str) and ref.startswith("#") and ref[1:].isdigit()):
            item_id = int(ref) if isinstance(ref, int) else int(ref[1:])
            with self.c.Session() as s:
                if 0 < item_id < 2**63 and s.scalar(select(Item.id).where(Item.id == item_id, Item.status == ItemStatus.ACTIVE)):
                    return item_id
            raise LookupError(f"no active item #{item_id}")
        ref = str(ref)
        with self.c.Session() as s:
            rows = s.execute(
                select(Item.id, Item.source).where(Item.external_id == ref, Item.status == ItemStatus.ACTIVE).order_by(Item.id).limit(11)
            ).all()
        if len(rows) == 1:
            return rows[0].id
        if rows:
            named = ", ".join(f"#{r.id} (source {r.source})" for r in rows[:10])
            raise LookupError(f"{ref!r} is the id of {len(rows)}{'+' if len(rows) > 10 else ''} active items, one per source: {named}; name one as #ITEM_ID")
        if ref.isdigit():
            return self.resolve_item("#" + ref)
        raise LookupError(f"no active item with id {ref!r}")

    def where(self, expr: str | None):
        """A filter expression as a SQL condition on items (None: no filter); FilterError when
        it does not parse or names an unknown column."""
        if not expr:
            return None
        with self.c.Session() as s:
            return filters.parse(expr, filters.known_columns(s))

    def active_ids(self, expr: str | None = None) -> np.ndarray:
        """Ids of the active items matching a filter expression, ascending (int64)."""
        q = select(Item.id).where(Item.status == ItemStatus.ACTIVE)
        cond = self.where(expr)
        if cond is not None:
            q = q.where(cond)
        with self.c.Session() as s:
            ids = np.array(s.scalars(q).all(), dtype=np.int64)
        ids.sort()
        return ids

    def last_change(self) -> int:
        with self.c.Session() as s:
            return self.c.last_change(s)

    def vectors(self, modality: str, ids: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Active items' stored vectors as (ids (n,), xb (n, E)), ascending by id: all of them,
        or those among ``ids``."""
        if ids is None:
            with self.c.Session() as s:
                return self.c.stored_vectors(s, modality)
        found, blocks = [], []
        for part in _parts(ids):
            with self.c.Session() as s:
                i, xb = self.c.stored_vectors(s, modality, ids=part)
            found.append(i)
            blocks.append(xb)
        if not found:
            return np.zeros(0, np.int64), np.zeros((0, self.c.config.embed_dim), np.float32)
        i, xb = np.concatenate(found), np.concatenate(blocks)
        order = np.argsort(i, kind="stable")
        return i[order], xb[order]

    def vectors_by_id(self, modality: str, ids: Sequence[int]) -> dict[int, np.ndarray]:
        found, xb = self.vectors(modality, ids)
        return {int(i): xb[n] for n, i in enumerate(found)}

    def iter_vectors(self, modality: str, expr: str | None = None, batch: int = 8192):
        """Active items' stored vectors (matching ``expr``) in keyset blocks, ascending by id."""
        return self.c.iter_vectors(modality, where=self.where(expr), batch=batch)

    def count_vectors(self, modality: str, expr: str | None = None) -> int:
        return self.c.count_vectors(modality, where=self.where(expr))

    def items_with_images(self, images: dict, expr: str | None = None, modality: str | None = None) -> dict[str, list[int]]:
        """Active items by the sha256 of their image bytes (``Collection.items_with_images``)."""
        return self.c.items_with_images(images, where=self.where(expr), modality=modality)
