"""The SQL record of truth (SQLAlchemy 2 typed models; migrations in ``indexer/migrations``).

FAISS ids are ``items.id``. Every change to what an index should contain appends a row to
``changes`` (its ``seq`` is the watermark an index records as applied); deletes are
tombstones (``items.status = 'deleted'`` plus a change row), never row removals, so a
catch-up can always tell an index what to drop.
"""

from __future__ import annotations

from datetime import datetime, timezone
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, DateTime, ForeignKey, Index, Integer, LargeBinary, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

MODALITIES = ("image", "text")
class ItemStatus(StrEnum):
    """``items.status``: stored as its string value (an enum member compares equal to it)."""

    ACTIVE = "active"  # searchable, in the indexes
    DELETED = "deleted"  # a tombstone: `vtfusion restore` brings it back
    REPLACED = "replaced"  # an older version of an item ingested again with other content


ACTIVE, DELETED, REPLACED = ItemStatus.ACTIVE, ItemStatus.DELETED, ItemStatus.REPLACED


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)  # = FAISS id
    source: Mapped[str] = mapped_column(String(1024))  # catalog file or folder it came from
    external_id: Mapped[str] = mapped_column(String(512), index=True)  # the catalog's own id
    image_path: Mapped[str] = mapped_column(String(2048))  # absolute path of the image file
    text: Mapped[str] = mapped_column(Text)  # the texts joined by " | " (what the text index embeds)
    content_hash: Mapped[str] = mapped_column(String(64), index=True)  # sha256 of image bytes + text + metadata (unique among active items)
    image_hash: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)  # sha256 of the image bytes alone (NULL: ingested before 0003)
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # metadata columns, typed
    status: Mapped[str] = mapped_column(String(16), default=ACTIVE, index=True)  # active | deleted | replaced
    run_id: Mapped[int | None] = mapped_column(ForeignKey("ingest_runs.id"), nullable=True)
    token_shard: Mapped[int | None] = mapped_column(Integer, nullable=True)  # rerank token cache location
    token_offset: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Embedding(Base):
    __tablename__ = "embeddings"

    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"), primary_key=True)
    modality: Mapped[str] = mapped_column(String(8), primary_key=True)  # image | text
    vector: Mapped[bytes] = mapped_column(LargeBinary)  # float32, little-endian, dim from the collection


class Change(Base):
    """Append-only log of index-relevant changes; ``seq`` orders them (the watermark)."""

    __tablename__ = "changes"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"), index=True)
    op: Mapped[str] = mapped_column(String(8))  # add | delete | update (the old version's tombstone)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class IngestRun(Base):
    __tablename__ = "ingest_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    source: Mapped[str] = mapped_column(String(1024))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    added: Mapped[int] = mapped_column(Integer, default=0)
    duplicates: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(16), default="running")  # running | done | interrupted


class IngestError(Base):
    __tablename__ = "ingest_errors"
    __table_args__ = (UniqueConstraint("file", "line", "reason", name="uq_ingest_error"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("ingest_runs.id"), nullable=True)
    file: Mapped[str] = mapped_column(String(2048))
    line: Mapped[int] = mapped_column(Integer)  # 0 when the source has no lines (a folder entry)
    reason: Mapped[str] = mapped_column(String(1024))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class MetaColumn(Base):
    """The metadata keys seen at ingest and their kind: what filter expressions may name."""

    __tablename__ = "meta_columns"

    name: Mapped[str] = mapped_column(String(256), primary_key=True)
    kind: Mapped[str] = mapped_column(String(8))  # number | text


class CollectionInfo(Base):
    """The collection this database holds: one row, written at ``init``. Its ``uid`` is also in
    ``collection.toml`` and stamped on the indexes, so a folder never opens another collection's
    database (or indexes built from another database). ``config`` holds the model the stored
    embeddings came from (the toml mirrors it): ``reembed`` switches it in the same transaction
    that switches the embeddings."""

    __tablename__ = "collection"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)  # always 1: one collection per database
    uid: Mapped[str] = mapped_column(String(36))
    folder: Mapped[str] = mapped_column(String(2048))  # where it was created (for messages)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)  # model, model_fingerprint, dims, token cache layout
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Reembedding(Base):
    """Work in progress of ``reembed``: an item's vectors and token location under the new
    model, kept until every active item has them, then swapped in one transaction."""

    __tablename__ = "reembed_staging"

    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64), primary_key=True)  # the new model's
    image_vector: Mapped[bytes] = mapped_column(LargeBinary)
    text_vector: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    token_shard: Mapped[int | None] = mapped_column(Integer, nullable=True)
    token_offset: Mapped[int | None] = mapped_column(Integer, nullable=True)


Index("ix_items_source_external", Item.source, Item.external_id)
Index(
    "uq_items_active_hash", Item.content_hash, unique=True,
    sqlite_where=Item.status == ItemStatus.ACTIVE.value, postgresql_where=Item.status == ItemStatus.ACTIVE.value,
)
