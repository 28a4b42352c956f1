"""A collection is a folder: ``collection.toml``, the SQL database, derived FAISS indexes, the
rerank token cache.

SQL is the record of truth; the FAISS indexes are a projection of it that ``catch_up``
brings up to the last change (``changes.seq``) whenever the collection is opened.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import tomllib
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from sqlalchemy import create_engine, event, func, select
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

from models import checkpoint

from .locks import file_lock
from .schema import MODALITIES, Change, Embedding, Item
from .tokens import TokenCache, auto_dtype
from .vectors import IndexMeta, IndexMismatchError, VectorIndex, auto_factory, read_meta

log = logging.getLogger(__name__)
TOKEN_LOCATIONS_KEPT = 200_000  # item token locations kept in memory (~30 MB)
CONFIG_NAME = "collection.toml"
MIGRATIONS = Path(__file__).parent / "migrations"


class CollectionError(RuntimeError):
    """A collection folder that cannot be opened or created; the message says what to do."""


@dataclass
class CollectionConfig:
    model: str  # model reference: a vtfusion model folder, hf:<BLIP id or folder>, clip:<CLIP id or folder>
    model_fingerprint: str  # the model the stored embeddings came from
    db_url: str  # SQLAlchemy URL; "" = catalog.db (SQLite) inside the folder
    index_factory: str = "auto"  # FAISS factory string, or "auto" (exact when small, IVF when large)
    token_dtype: str = "fp16"  # rerank token cache precision: fp16 | int8 | none (re-encode at query time)
    embed_dim: int = 0
    num_tokens: int = 0  # N of the model's image_tokens
    token_width: int = 0  # D_v

    def dump(self) -> str:
        return "".join(f"{k} = {json.dumps(v)}\n" for k, v in asdict(self).items())


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand(text: str) -> str:
    def value(m: re.Match) -> str:
        v = os.environ.get(m.group(1))
        if v is None:
            raise CollectionError(f"the database URL refers to ${{{m.group(1)}}}, but no such environment variable is set")
        return v

    return _ENV_REF.sub(value, text)


def resolve_url(url: str) -> str:
    """``url`` with every ``${NAME}`` replaced by that environment variable, so that
    ``collection.toml`` can hold ``postgresql://app:${VTF_DB_PASSWORD}@db/catalog`` instead of a
    password. Values in the user, password, host, database and query parts are URL-quoted as
    each part needs (a password may hold ``@`` or ``/``); a URL that does not parse before
    expansion (``${PORT}``) gets them as they are."""
    if not _ENV_REF.search(url):
        return url
    try:
        u = make_url(url)
    except Exception:  # noqa: BLE001 - e.g. ${PORT}: not a number until expanded
        return _expand(url)
    parts = {k: _expand(v) for k in ("username", "password", "host", "database") if (v := getattr(u, k)) and _ENV_REF.search(v)}
    query = {k: [_expand(x) for x in v] if isinstance(v, tuple) else _expand(v) for k, v in u.query.items()}
    return u.set(**parts, query=query).render_as_string(hide_password=False)


def literal_password(url: str) -> bool:
    """Whether ``url`` carries a password written out (not an ``${ENV}`` reference)."""
    try:
        pw = make_url(url).password
    except Exception:  # noqa: BLE001
        return False
    return bool(pw) and not _ENV_REF.fullmatch(str(pw))


def mask_url(url: str) -> str:
    """A database URL safe for logs and messages (password hidden)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - never fail while reporting
        return "<unparseable url>"


def _first_line(e: Exception) -> str:
    """The driver's message without SQLAlchemy's trailer (statement, parameters, help link)."""
    msg = str(getattr(e, "orig", None) or e).strip()
    return msg.splitlines()[0] if msg else type(e).__name__


def make_engine(url: str) -> Engine:
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    kwargs = {}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 30}
    engine = create_engine(url, **kwargs)
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")  # readers never block the ingest writer
            cur.execute("PRAGMA synchronous=FULL")  # a committed batch survives power loss
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

    return engine


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


class Collection:
    def __init__(self, folder: Path, config: CollectionConfig):
        self.folder = folder
        self.config = config
        url = resolve_url(config.db_url) if config.db_url else f"sqlite:///{folder / 'catalog.db'}"
        self.engine = make_engine(url)
        self.Session = sessionmaker(self.engine, expire_on_commit=False)
        self._bundle: checkpoint.Bundle | None = None
        self.indexes: dict[str, VectorIndex] = {}
        self._synced = -1  # last SQL change the in-memory indexes have applied
        self._lock = threading.RLock()  # index rebuilds / catch-ups: one at a time in this process...
        self._lock_depth = 0  # ...and across processes (flock on index/.lock, taken at depth 1)
        self.tokens = TokenCache(folder / "tokens", config.num_tokens, config.token_width, config.token_dtype)
        # item id -> (token shard, offset, image path): fixed when the item is written, so kept
        # (oldest dropped first) and a rerank of items seen before needs no SQL round trip
        self._token_locs: dict[int, tuple[int | None, int | None, str]] = {}
        self._token_locs_lock = threading.Lock()

    # ---- create / open ---------------------------------------------------------------

    @classmethod
    def init(
        cls,
        folder: str | Path,
        model: str | Path,
        db_url: str = "",
        index_factory: str = "auto",
        token_dtype: str = "auto",
    ) -> Collection:
        folder = Path(folder)
        if (folder / CONFIG_NAME).exists():
            raise CollectionError(f"{folder} already holds a collection; open it, or pick another folder")
        ref = str(model) if checkpoint.is_pretrained_ref(model) else str(Path(model).resolve())
        try:
            bundle = checkpoint.load(ref)
        except checkpoint.ModelLoadError as e:
            raise CollectionError(str(e)) from e
        m = bundle.model
        if token_dtype == "auto":
            token_dtype = auto_dtype(m.num_tokens, m.token_width)
        config = CollectionConfig(
            model=ref,
            model_fingerprint=bundle.fingerprint,
            db_url=db_url,
            index_factory=index_factory,
            token_dtype=token_dtype,
            embed_dim=m.embed_dim,
            num_tokens=m.num_tokens,
            token_width=m.token_width,
        )
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "index").mkdir(exist_ok=True)
        self = cls(folder, config)
        try:
            migrate(self.engine)
        except Exception as e:
            raise CollectionError(f"cannot create the schema in {mask_url(self.engine.url.render_as_string())}: {_first_line(e)}") from e
        path = folder / CONFIG_NAME
        if literal_password(db_url):  # readable by its owner only; ${ENV} references are better
            path.touch(mode=0o600)
            log.warning(
                "%s holds the database password in plain text (readable by its owner only); "
                "write it as ${VARIABLE} in --db, or leave it out and use PGPASSWORD or ~/.pgpass", path
            )
        path.write_text(config.dump())
        self._bundle = bundle
        return self

    @classmethod
    def open(cls, folder: str | Path, catch_up: bool = True) -> Collection:
        folder = Path(folder)
        path = folder / CONFIG_NAME
        if not path.exists():
            raise CollectionError(f"{folder} is not a collection (no {CONFIG_NAME}); create one with `vtfusion init`")
        config = CollectionConfig(**tomllib.loads(path.read_text()))
        if literal_password(config.db_url) and path.stat().st_mode & 0o077:
            log.warning("%s holds the database password in plain text and others can read it: chmod 600 it, "
                        "or write the password as ${VARIABLE}", path)
        self = cls(folder, config)
        try:
            migrate(self.engine)
        except Exception as e:  # noqa: BLE001 - say which database (password masked) and why
            raise CollectionError(f"cannot open the database {mask_url(config.db_url or str(self.engine.url))}: {_first_line(e)}") from e
        if catch_up:
            self.catch_up()
        return self

    def close(self) -> None:
        self.engine.dispose()

    # ---- the model -------------------------------------------------------------------

    @property
    def bundle(self) -> checkpoint.Bundle:
        if self._bundle is None:
            bundle = checkpoint.load(self.config.model, device=checkpoint.resolve_device("auto"))
            if bundle.fingerprint != self.config.model_fingerprint:
                raise CollectionError(
                    f"the model at {self.config.model} has changed since this collection was built "
                    f"(fingerprint {self.config.model_fingerprint} -> {bundle.fingerprint}); its stored embeddings "
                    "came from the old one. Restore that model, or create a new collection and ingest again"
                )
            self._bundle = bundle
        return self._bundle

    @torch.no_grad()
    def item_tokens(self, item_ids: list[int]) -> tuple[torch.Tensor, int]:
        """Image tokens of these items, in order, as (K, N, D_v) float32 on the CPU, and how many
        were re-encoded from their image files (no cache record: cache disabled, or a miss)."""
        with self._token_locs_lock:
            locs = [self._token_locs.get(i) for i in item_ids]
        need = [i for i, loc in zip(item_ids, locs) if loc is None]
        if need:
            with self.engine.connect() as conn:  # Core, not an ORM session: this runs once per rerank chunk
                found = {
                    r.id: (r.token_shard, r.token_offset, r.image_path)
                    for r in conn.execute(
                        select(Item.id, Item.token_shard, Item.token_offset, Item.image_path).where(Item.id.in_(need))
                    )
                }
            unknown = [i for i in need if i not in found]
            if unknown:
                raise KeyError(f"no items with ids {unknown[:5]}")
            with self._token_locs_lock:
                for i, loc in found.items():
                    if len(self._token_locs) >= TOKEN_LOCATIONS_KEPT:
                        self._token_locs.pop(next(iter(self._token_locs)))
                    self._token_locs[i] = loc
            locs = [found[i] if loc is None else loc for i, loc in zip(item_ids, locs)]
        cached = [k for k, loc in enumerate(locs) if loc[0] is not None]
        if len(cached) == len(locs):  # the usual case: one read, no re-encoding
            return torch.from_numpy(self.tokens.read([loc[:2] for loc in locs])), 0
        tokens = torch.empty(len(locs), self.config.num_tokens, self.config.token_width)
        if cached:
            tokens[cached] = torch.from_numpy(self.tokens.read([locs[k][:2] for k in cached]))
        missing = [k for k, loc in enumerate(locs) if loc[0] is None]
        tokens[missing] = self.bundle.image_tokens(self.bundle.transform.load(locs[k][2]) for k in missing).float().cpu()
        return tokens, len(missing)

    # ---- FAISS projection ------------------------------------------------------------

    def last_change(self, session: Session) -> int:
        return int(session.scalar(select(func.coalesce(func.max(Change.seq), 0))))

    def stored_vectors(
        self, session: Session, modality: str, since: int | None = None, ids: list[int] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Active items' stored vectors as (ids (n,), xb (n, E)), by id: all of them, those touched
        by changes after ``since``, and/or those among ``ids``."""
        q = (
            select(Embedding.item_id, Embedding.vector)
            .join(Item, Item.id == Embedding.item_id)
            .where(Embedding.modality == modality, Item.status == "active")
            .order_by(Embedding.item_id)
        )
        if since is not None:  # a subquery, not a bound id list: no parameter limit at any size
            q = q.where(Embedding.item_id.in_(select(Change.item_id).where(Change.seq > since)))
        if ids is not None:
            q = q.where(Embedding.item_id.in_(ids))
        rows = session.execute(q).all()
        dim = self.config.embed_dim
        xb = np.frombuffer(b"".join(r.vector for r in rows), dtype=np.float32).reshape(len(rows), dim)
        return np.array([r.item_id for r in rows], dtype=np.int64), xb

    @contextmanager
    def index_lock(self):
        """Exclusive access to the index folder: across threads (RLock, re-entrant) and across
        processes (flock), so that two writers never interleave a load, apply and save, and a
        reader never opens an index file another process is about to delete."""
        with self._lock:
            self._lock_depth += 1
            try:
                if self._lock_depth > 1:  # re-entered (catch-up rebuilding an index): already held
                    yield
                else:
                    (self.folder / "index").mkdir(parents=True, exist_ok=True)
                    with file_lock(self.folder / "index" / ".lock"):
                        yield
            finally:
                self._lock_depth -= 1

    def refresh(self) -> bool:
        """Catch the in-memory indexes up if SQL holds changes they have not applied (another
        process ingested or deleted). One indexed query when nothing changed."""
        with self.Session() as s:
            last = self.last_change(s)
        if last == self._synced:
            return False
        self.catch_up()
        return True

    def build_index(self, modality: str, factory: str | None = None) -> VectorIndex:
        """A fresh index from every active stored embedding (what reindex and first open do)."""
        with self.index_lock():
            return self._build_index(modality, factory)

    def _build_index(self, modality: str, factory: str | None = None) -> VectorIndex:
        with self.Session() as s:
            watermark = self.last_change(s)
            ids, xb = self.stored_vectors(s, modality)
        factory = factory or self.config.index_factory
        if factory == "auto":
            factory = auto_factory(len(ids))
        index = VectorIndex(self.config.embed_dim, factory)
        if not index.is_trained:
            if len(ids) < 39 * _nlist(factory):
                log.warning("%d %s vectors are too few to train %s; using an exact index", len(ids), modality, factory)
                index = VectorIndex(self.config.embed_dim, "Flat")
            else:
                index.train(xb)
        index.add(ids, xb)
        self._save(modality, index, watermark)
        return index

    def _save(self, modality: str, index: VectorIndex, watermark: int) -> None:
        meta = IndexMeta(modality, self.config.model_fingerprint, self.config.embed_dim, index.factory, watermark=watermark)
        index.save(self.folder / "index", meta)
        self.indexes[modality] = index

    def catch_up(self) -> dict[str, int]:
        """Apply every SQL change newer than each index's watermark; returns changes applied."""
        with self.index_lock():
            with self.Session() as s:
                last = self.last_change(s)
            applied = self._catch_up()
            self._synced = last
            return applied

    def _catch_up(self) -> dict[str, int]:
        metas = read_meta(self.folder / "index")
        applied = {}
        for modality in MODALITIES:
            meta = metas.get(modality)
            if meta is None:
                self.build_index(modality)
                applied[modality] = -1  # built from scratch
                continue
            if meta.model_fingerprint != self.config.model_fingerprint or meta.dim != self.config.embed_dim:
                raise IndexMismatchError(
                    f"{self.folder / 'index' / meta.file} was built by model {meta.model_fingerprint} (dim {meta.dim}); "
                    f"this collection uses {self.config.model_fingerprint} (dim {self.config.embed_dim}). "
                    f"Rebuild it from the stored embeddings with `vtfusion reindex {self.folder}`"
                )
            index = VectorIndex.load(self.folder / "index", meta)
            with self.Session() as s:
                rows = s.execute(
                    select(Change.seq, Change.item_id).where(Change.seq > meta.watermark).order_by(Change.seq)
                ).all()
                if not rows:
                    self.indexes[modality] = index
                    applied[modality] = 0
                    continue
                keep_ids, xb = self.stored_vectors(s, modality, since=meta.watermark)
            index.remove(np.array(sorted({r.item_id for r in rows}), dtype=np.int64))
            index.add(keep_ids, xb)
            applied[modality] = len(rows)
            if self.config.index_factory == "auto" and index.factory == "Flat" and auto_factory(index.ntotal) != "Flat":
                log.info("%s index grew to %d vectors: rebuilding it as %s", modality, index.ntotal, auto_factory(index.ntotal))
                self.build_index(modality)
                continue
            self._save(modality, index, rows[-1].seq)
        return applied


def _nlist(factory: str) -> int:
    head = factory.split(",")[0]
    return int(head[3:]) if head.startswith("IVF") and head[3:].isdigit() else 1
