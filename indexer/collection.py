"""A collection is a folder: ``collection.toml``, the SQL database, derived FAISS indexes, the
rerank token cache.

SQL is the record of truth; the FAISS indexes are a projection of it that ``catch_up``
brings up to the last change (``changes.seq``) whenever the collection is opened.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import threading
import tomllib
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from sqlalchemy import create_engine, event, func, inspect, select
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

# torch, transformers and the model code load when a model is first needed (opening a collection,
# stats, errors, verify and delete never need one): see ``bundle``
from vtfusion.models.files import ImageError, image_hash, read_image_bytes, write_text_atomic

from .locks import file_lock, try_file_lock
from .schema import ACTIVE, MODALITIES, Change, CollectionInfo, Embedding, Item
from .tokens import FORMAT as TOKEN_FORMAT
from .tokens import TokenCache, auto_dtype
from .vectors import (
    TRAIN_PER_LIST, IndexMeta, IndexTypeError, UnreadableIndexError, VectorIndex, auto_factory, check_factory, clean_index_folder,
    read_meta,
)

if TYPE_CHECKING:
    import torch

    from vtfusion.models.factory import Bundle

log = logging.getLogger(__name__)
TOKEN_LOCATIONS_KEPT = 200_000  # item token locations kept in memory (~30 MB)
CONFIG_NAME = "collection.toml"
MAINTENANCE_LOCK = "maintenance.lock"  # held by compact, repair and reembed (they move token records)
MIGRATIONS = Path(__file__).parent / "migrations"


class CollectionError(RuntimeError):
    """A collection folder that cannot be opened or created; the message says what to do."""


class StaleIndexError(CollectionError):
    """Indexes built from another database, or from a later state of this one (the database was
    restored from a backup or replaced): they are refused, and the message names the rebuild."""


# what the database's ``collection`` row decides (the toml mirrors it): the model and the layout
# of what was computed with it
MODEL_FIELDS = ("model", "model_fingerprint", "embed_dim", "num_tokens", "token_width", "token_dtype", "token_format", "tokens_dir")


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
    collection_id: str = ""  # the uid in the database's collection row ("" before it existed)
    token_format: int = 1  # token cache record format (1: no header, from before checksums; init writes 2)
    tokens_dir: str = "tokens"  # token cache folder inside the collection (reembed writes a new one)
    nprobe: int = 16  # IVF lists probed per search (a search may ask for another number)
    schema: str = ""  # declared metadata column types, "col:type,..." (number | text); others are inferred

    def dump(self) -> str:
        return "".join(f"{k} = {json.dumps(v)}\n" for k, v in asdict(self).items())

    def model_dict(self) -> dict:
        return {k: getattr(self, k) for k in MODEL_FIELDS}

    def write(self, folder: Path) -> None:
        """Replace ``collection.toml`` atomically (a crash leaves the old or the new file)."""
        write_text_atomic(folder / CONFIG_NAME, self.dump())


def _holder(engine: Engine) -> tuple[str, str, str]:
    """What holds the database, for a message ('' when nothing does), with its collection uid
    and the folder it was created in ('' when unknown)."""
    insp = inspect(engine)
    if insp.has_table("collection"):
        with engine.connect() as conn:
            row = conn.execute(select(CollectionInfo.uid, CollectionInfo.folder)).first()
            empty = conn.execute(select(Item.id).limit(1)).first() is None
        if row is not None:  # an empty one can be taken over by the folder it was made for (an init that stopped half-way)
            return f"collection {row.uid} created in {row.folder}", row.uid if empty else "", row.folder
    if insp.has_table("items"):
        return "the tables of a collection created before collection ids existed", "", ""
    return "", "", ""


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


def first_line(e: Exception) -> str:
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
    """Bring the schema to the newest Alembic revision. On SQLite foreign keys are off while it
    runs (a revision that rebuilds a table would otherwise trip them)."""
    from alembic import command
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    head = ScriptDirectory.from_config(cfg).get_current_head()
    with engine.connect() as conn:
        if MigrationContext.configure(conn).get_current_revision() == head:
            return  # the usual open: nothing to do, no write lock taken
    with engine.connect() as conn:
        sqlite = engine.dialect.name == "sqlite"
        if sqlite:
            conn.exec_driver_sql("PRAGMA foreign_keys=OFF")  # outside a transaction, where SQLite honours it
            conn.commit()
        with conn.begin():
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
        if sqlite:
            conn.exec_driver_sql("PRAGMA foreign_keys=ON")
            conn.commit()


def change_mark(session: Session, seq: int) -> str:
    """What identifies change ``seq`` of this database's history (item, op, time): an index
    records it with its watermark, so a restored or replaced database that reached the same
    ``seq`` by another history is told apart. '' when there is no such change."""
    if seq <= 0:
        return ""
    row = session.execute(select(Change.item_id, Change.op, Change.at).where(Change.seq == seq)).first()
    if row is None:
        return ""
    at = row.at
    if at.tzinfo is not None:
        at = at.astimezone(timezone.utc).replace(tzinfo=None)
    return f"{row.item_id}:{row.op}:{at.isoformat()}"


class Collection:
    def __init__(self, folder: Path, config: CollectionConfig, read_only: bool = False):
        self.folder = folder
        self.config = config
        # read_only: this process never writes the collection's files or schema (a search
        # process on another machine sharing the folder): indexes are caught up in memory,
        # token shards are not repaired, no lock files are taken
        self.read_only = read_only
        self._memory_metas: dict[str, IndexMeta] = {}  # read_only: what each in-memory index has applied
        url = resolve_url(config.db_url) if config.db_url else f"sqlite:///{folder / 'catalog.db'}"
        self.engine = make_engine(url)
        self.Session = sessionmaker(self.engine, expire_on_commit=False)
        self._bundle: Bundle | None = None
        self.indexes: dict[str, VectorIndex] = {}
        self._synced = -1  # last SQL change the in-memory indexes have applied
        self._lock = threading.RLock()  # index rebuilds / catch-ups: one at a time in this process...
        self._lock_depth = 0  # ...and across processes (flock on index/.lock, taken at depth 1)
        self.tokens = self._token_cache()
        # item id -> (token shard, offset, image path, content hash): fixed when the item is written
        # (repair and reembed, which move records, clear it), so kept (oldest dropped first) and a
        # rerank of items seen before needs no SQL round trip
        self._token_locs: dict[int, tuple[int | None, int | None, str, str]] = {}
        self.bad_token_records = 0  # records that failed their check and were re-encoded instead
        self._token_locs_lock = threading.Lock()
        self._store = None

    def _token_cache(self) -> TokenCache:
        c = self.config
        return TokenCache(self.folder / c.tokens_dir, c.num_tokens, c.token_width, c.token_dtype, fmt=c.token_format,
                          salt=c.model_fingerprint, repair=not self.read_only)

    # ---- create / open ---------------------------------------------------------------

    @classmethod
    def init(
        cls,
        folder: str | Path,
        model: str | Path,
        db_url: str = "",
        index_factory: str = "auto",
        token_dtype: str = "auto",
        nprobe: int = 16,
        schema: str = "",
    ) -> Collection:
        from vtfusion.models import factory

        folder = Path(folder)
        if (folder / CONFIG_NAME).exists():
            raise CollectionError(f"{folder} already holds a collection; open it, or pick another folder")
        ref = str(model) if factory.is_pretrained_ref(model) else str(Path(model).resolve())
        try:
            bundle = factory.load(ref)
        except factory.ModelLoadError as e:
            raise CollectionError(str(e)) from e
        m = bundle.model
        if token_dtype == "auto":
            token_dtype = auto_dtype(m.num_tokens, m.token_width)
        try:
            index_factory = check_factory(m.embed_dim, index_factory)
        except IndexTypeError as e:
            raise CollectionError(str(e)) from None
        if nprobe < 1:
            raise CollectionError(f"nprobe must be at least 1; got {nprobe}")
        from vtfusion.catalogs.sources import CatalogError, parse_schema

        try:
            schema = ",".join(f"{k}:{v}" for k, v in sorted(parse_schema(schema).items()))
        except CatalogError as e:
            raise CollectionError(str(e)) from None
        config = CollectionConfig(
            model=ref,
            model_fingerprint=bundle.fingerprint,
            db_url=db_url,
            index_factory=index_factory,
            token_dtype=token_dtype,
            embed_dim=m.embed_dim,
            num_tokens=m.num_tokens,
            token_width=m.token_width,
            collection_id=str(uuid.uuid4()),
            token_format=TOKEN_FORMAT,
            nprobe=nprobe,
            schema=schema,
        )
        url = resolve_url(db_url) if db_url else f"sqlite:///{folder / 'catalog.db'}"
        created = not folder.exists()
        folder.mkdir(parents=True, exist_ok=True)
        engine = make_engine(url)
        try:
            taken, uid, where = _holder(engine)
        except Exception as e:  # noqa: BLE001 - an unreachable server, a bad URL
            taken, uid, where = f"cannot reach the database {mask_url(url)}: {first_line(e)}", "", ""
        finally:
            engine.dispose()
        resumed = bool(uid) and where == str(folder.resolve())
        if resumed:  # an init of this folder that stopped before writing collection.toml: finish it
            config.collection_id, taken = uid, ""
        if taken:
            if created:
                shutil.rmtree(folder, ignore_errors=True)
            if taken.startswith("cannot reach"):
                raise CollectionError(taken)
            raise CollectionError(f"the database {mask_url(url)} already holds a collection ({taken}); give each "
                                  "collection its own database, or on PostgreSQL its own schema (see the README)")
        (folder / "index").mkdir(exist_ok=True)
        self = cls(folder, config)
        try:
            migrate(self.engine)
        except Exception as e:
            raise CollectionError(f"cannot create the schema in {mask_url(self.engine.url.render_as_string())}: {first_line(e)}") from e
        try:
            with self.Session.begin() as s:  # id 1: a second collection's insert fails, even a concurrent one
                if resumed:
                    s.get(CollectionInfo, 1).config = config.model_dict()
                else:
                    s.add(CollectionInfo(id=1, uid=config.collection_id, folder=str(folder.resolve()), config=config.model_dict()))
        except IntegrityError:
            raise CollectionError(f"the database {mask_url(url)} already holds a collection ({_holder(self.engine)[0]}); "
                                  "give each collection its own database or schema (see the README)") from None
        path = folder / CONFIG_NAME
        if literal_password(db_url):  # readable by its owner only; ${ENV} references are better
            path.touch(mode=0o600)
            log.warning(
                "%s holds the database password in plain text (readable by its owner only); "
                "write it as ${VARIABLE} in --db, or leave it out and use PGPASSWORD or ~/.pgpass", path
            )
        config.write(folder)  # replaced whole, keeping the owner-only mode just set
        self._bundle = bundle
        return self

    @classmethod
    def open(cls, folder: str | Path, catch_up: bool = True, read_only: bool = False) -> Collection:
        """``read_only``: for search processes sharing a collection with writers elsewhere (another
        machine's ingest): the database is only read (its schema must be current), nothing under
        the folder is written, cut or locked, and the indexes are caught up from the change log
        in memory (``refresh`` keeps them current). Index files a writer saved are loaded."""
        folder = Path(folder)
        path = folder / CONFIG_NAME
        if not path.exists():
            raise CollectionError(f"{folder} is not a collection (no {CONFIG_NAME}); create one with `vtfusion init`")
        config = CollectionConfig(**tomllib.loads(path.read_text()))
        if literal_password(config.db_url) and path.stat().st_mode & 0o077:
            log.warning("%s holds the database password in plain text and others can read it: chmod 600 it, "
                        "or write the password as ${VARIABLE}", path)
        self = cls(folder, config, read_only=read_only)
        if read_only:
            self._open_read_only()
            if catch_up:
                self.catch_up()
            return self
        try:
            migrate(self.engine)
            self._check_identity()
        except CollectionError:
            raise
        except Exception as e:  # noqa: BLE001 - say which database (password masked) and why
            raise CollectionError(f"cannot open the database {mask_url(config.db_url or str(self.engine.url))}: {first_line(e)}") from e
        with try_file_lock(folder / MAINTENANCE_LOCK) as idle:
            if idle:  # no compact or reembed is writing a new token folder right now
                self.clean_stray_token_dirs()
        if catch_up:
            self.catch_up()
        return self

    def writable(self, action: str) -> None:
        """Refuse ``action`` (a verb: "ingest", "delete", …) in a process that opened the
        collection read-only: it writes the database or the folder, which are the writers'."""
        if self.read_only:
            raise CollectionError(f"{self.folder} is open read-only here: {action} needs a process that opened it for writing "
                                  "(without --read-only)")

    def _open_read_only(self) -> None:
        """Check, without writing anything, that the database holds this collection at the
        current schema; follow its model fields (a reembed elsewhere) in memory."""
        from alembic.config import Config
        from alembic.runtime.migration import MigrationContext
        from alembic.script import ScriptDirectory

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        head = ScriptDirectory.from_config(cfg).get_current_head()
        where = mask_url(self.config.db_url or str(self.engine.url))
        try:
            with self.engine.connect() as conn:
                current = MigrationContext.configure(conn).get_current_revision()
                row = conn.execute(select(CollectionInfo.uid, CollectionInfo.config).where(CollectionInfo.id == 1)).first() if current else None
        except Exception as e:  # noqa: BLE001 - say which database (password masked) and why
            raise CollectionError(f"cannot open the database {where} read-only: {first_line(e)}") from e
        if current != head:
            raise CollectionError(f"the database {where} is at schema {current or 'none'}, not {head}: open the collection "
                                  "once without --read-only (a writer migrates it), then read-only")
        if row is None or (self.config.collection_id and row.uid != self.config.collection_id):
            raise CollectionError(f"the database {where} does not hold collection {self.config.collection_id or self.folder}")
        moved = {k: v for k, v in dict(row.config).items() if k in MODEL_FIELDS and getattr(self.config, k) != v}
        for k, v in moved.items():
            setattr(self.config, k, v)
        if moved:
            self.tokens = self._token_cache()

    def clean_stray_token_dirs(self) -> list[str]:
        """Delete token folders the collection does not use: what an interrupted compact, or a
        reembed whose staging was given up, left. The folder a reembed in progress stages into
        is kept (it resumes from it). Call with the maintenance lock held."""
        with self.Session() as s:
            row = s.get(CollectionInfo, 1)
            staged = row.config.get("reembed_tokens_dir") if row is not None else None
        gone = []
        for p in self.folder.glob("tokens*"):
            if p.is_dir() and p.name not in (self.config.tokens_dir, staged):
                shutil.rmtree(p, ignore_errors=True)
                gone.append(p.name)
        if gone:
            log.info("%s: removed token folders no longer in use: %s", self.folder, ", ".join(sorted(gone)))
        return gone

    def _check_identity(self) -> None:
        """The database must hold this collection: its uid matches collection.toml's. A
        database from before collection ids is claimed by the folder that opens it first (its
        uid written to both). The model fields follow the database (``reembed`` switches them
        there first; a toml left behind by a crash is rewritten)."""
        cfg, where = self.config, mask_url(self.config.db_url or str(self.engine.url))
        with self.Session.begin() as s:
            row = s.get(CollectionInfo, 1)
            if row is None:
                if cfg.collection_id:
                    raise CollectionError(
                        f"the database {where} holds no collection, but {self.folder} is collection {cfg.collection_id}: "
                        "collection.toml points at a new or emptied database. Point --db back at the right one"
                    )
                cfg.collection_id = str(uuid.uuid4())
                s.add(CollectionInfo(id=1, uid=cfg.collection_id, folder=str(self.folder.resolve()), config=cfg.model_dict()))
                log.info("%s: claimed its database as collection %s", self.folder, cfg.collection_id)
                db_cfg = cfg.model_dict()
            elif not cfg.collection_id and row.folder == str(self.folder.resolve()):
                cfg.collection_id, db_cfg = row.uid, dict(row.config)
            elif row.uid != cfg.collection_id:
                raise CollectionError(
                    f"the database {where} holds collection {row.uid} (created in {row.folder}), not this one "
                    f"({cfg.collection_id or 'a collection from before ids'}, {self.folder}). Two collections never "
                    "share a database: fix db_url in collection.toml"
                )
            else:
                db_cfg = dict(row.config)
        stale = {k: v for k, v in db_cfg.items() if k in MODEL_FIELDS and getattr(cfg, k) != v}
        on_disk = tomllib.loads((self.folder / CONFIG_NAME).read_text()).get("collection_id", "")
        if stale or on_disk != cfg.collection_id:
            if stale:
                log.warning("%s: collection.toml is behind its database (%s); rewriting it", self.folder, ", ".join(sorted(stale)))
            for k, v in stale.items():
                setattr(cfg, k, v)
            cfg.write(self.folder)
            self.tokens = self._token_cache()

    def close(self) -> None:
        self.engine.dispose()

    # ---- the model -------------------------------------------------------------------

    @property
    def bundle(self) -> Bundle:
        if self._bundle is None:
            from vtfusion.models import factory

            bundle = factory.load(self.config.model, device=factory.resolve_device("auto"))
            if bundle.fingerprint != self.config.model_fingerprint:
                raise CollectionError(
                    f"the model at {self.config.model} has changed since this collection was built "
                    f"(fingerprint {self.config.model_fingerprint} -> {bundle.fingerprint}); its stored embeddings "
                    f"came from the old one. Re-embed every item with the new model: `vtfusion reembed {self.folder} "
                    f"--model {self.config.model}` (or restore the old model)"
                )
            self._bundle = bundle
        return self._bundle

    def check_model(self, session: Session) -> None:
        """CollectionError if the database's collection model or token folder is no longer this
        process's (``reembed`` or ``compact`` switched it meanwhile): vectors of the old model, or
        token locations in the old folder, must not be committed. Call it last in a writing
        transaction: the row is read FOR UPDATE (PostgreSQL waits for a switch in flight; SQLite
        already holds the write lock)."""
        row = session.scalars(select(CollectionInfo).where(CollectionInfo.id == 1).with_for_update()).first()
        if row is None:
            return
        cfg = row.config
        if cfg.get("model_fingerprint") != self.config.model_fingerprint or cfg.get("tokens_dir", "tokens") != self.config.tokens_dir:
            raise CollectionError(
                f"{self.folder} was re-embedded or compacted while this process was writing to it (model "
                f"{self.config.model_fingerprint} -> {cfg.get('model_fingerprint')}, tokens {self.config.tokens_dir} -> "
                f"{cfg.get('tokens_dir')}): nothing of this batch was committed. Run the command again"
            )

    @property
    def store(self):
        """The narrow read side of this collection's SQL (``indexer.store.MetadataStore``): what
        search and front ends read items through."""
        from .store import MetadataStore

        if self._store is None:
            self._store = MetadataStore(self)
        return self._store

    def item_tokens(self, item_ids: list[int]) -> tuple[torch.Tensor, int]:
        """Image tokens of these items, in order, as (K, N, D_v) float32 on the CPU, and how many
        were re-encoded from their image files (no cache record: cache disabled, a miss, or a
        record that failed its check: logged, counted in ``bad_token_records``, fixed by
        ``vtfusion repair``)."""
        with self._token_locs_lock:
            locs = [self._token_locs.get(i) for i in item_ids]
        need = [i for i, loc in zip(item_ids, locs) if loc is None]
        if need:
            with self.engine.connect() as conn:  # Core, not an ORM session: this runs once per rerank chunk
                found = {
                    r.id: (r.token_shard, r.token_offset, r.image_path, r.content_hash)
                    for r in conn.execute(
                        select(Item.id, Item.token_shard, Item.token_offset, Item.image_path, Item.content_hash).where(Item.id.in_(need))
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
        import torch

        cached = [k for k, loc in enumerate(locs) if loc[0] is not None]
        tokens = torch.zeros(len(locs), self.config.num_tokens, self.config.token_width)
        ok = np.zeros(len(locs), dtype=bool)
        if cached:
            got, good = self.tokens.read_checked([locs[k][:2] for k in cached], [locs[k][3] for k in cached])
            tokens[cached] = torch.from_numpy(got)
            ok[cached] = good
            if not good.all():
                bad = [item_ids[cached[j]] for j in np.flatnonzero(~good)]
                self.bad_token_records += len(bad)
                log.warning("token cache: %d records failed their check (items %s); re-encoded from their images. "
                            "Run `vtfusion verify %s` and `vtfusion repair %s`", len(bad), bad[:5], self.folder, self.folder)
        missing = np.flatnonzero(~ok).tolist()
        if missing:
            try:
                tokens[missing] = self.encode_images([locs[k][2] for k in missing])
            except (OSError, ImageError) as e:
                raise CollectionError(
                    f"items {[item_ids[k] for k in missing][:5]} have no usable token record and cannot be re-encoded ({e}). "
                    f"Restore their image files and run `vtfusion repair {self.folder}`, or delete them"
                ) from e
        return tokens, len(missing)

    def encode_images(self, paths: list[str]) -> torch.Tensor:
        """Image files -> their image tokens under the collection's model, (K, N, D_v) float32 on
        the CPU: what a missing or bad token record is replaced with."""
        import torch

        with torch.no_grad():
            return self.bundle.image_tokens(self.bundle.transform.load(p) for p in paths).float().cpu()

    def forget_token_locations(self) -> None:
        """Drop the remembered token locations (after records moved: repair, compact, reembed)."""
        with self._token_locs_lock:
            self._token_locs.clear()

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
            .where(Embedding.modality == modality, Item.status == ACTIVE)
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

    def iter_vectors(self, modality: str, where=None, batch: int = 8192):
        """Active items' stored vectors in blocks of ``batch``, ascending by id: (ids (n,), xb
        (n, E)) each, read by keyset (one short query per block, never the whole table in
        memory). ``where``: a SQL condition on ``items`` (``filters.parse``) they must meet."""
        last = 0
        dim = self.config.embed_dim
        while True:
            q = (
                select(Embedding.item_id, Embedding.vector)
                .join(Item, Item.id == Embedding.item_id)
                .where(Embedding.modality == modality, Item.status == ACTIVE, Embedding.item_id > last)
                .order_by(Embedding.item_id)
                .limit(batch)
            )
            if where is not None:
                q = q.where(where)
            with self.Session() as s:
                rows = s.execute(q).all()
            if not rows:
                return
            last = rows[-1].item_id
            yield (np.array([r.item_id for r in rows], dtype=np.int64),
                   np.frombuffer(b"".join(r.vector for r in rows), dtype=np.float32).reshape(len(rows), dim))

    def count_vectors(self, modality: str, where=None) -> int:
        """How many active items ``iter_vectors`` yields."""
        q = select(func.count()).select_from(Embedding).join(Item, Item.id == Embedding.item_id).where(
            Embedding.modality == modality, Item.status == ACTIVE)
        if where is not None:
            q = q.where(where)
        with self.Session() as s:
            return int(s.scalar(q))

    def items_with_images(self, images: dict[str, Path], where=None, modality: str | None = None) -> dict[str, list[int]]:
        """Active items whose image bytes are those of ``images`` (sha256 of the bytes -> a
        file holding them), by that hash, ids ascending: matched by ``items.image_hash``
        whatever text, metadata or source they were ingested with. Items ingested before it
        existed (NULL) match when their image path is that file and their content hash is of
        these bytes (so a file changed since its ingest does not). ``where``: a SQL condition
        they must meet too; ``modality``: and have a stored vector of it."""
        from .ingest import content_hash

        out: dict[str, list[int]] = {}
        hashes = list(images)

        def restrict(q):
            if where is not None:
                q = q.where(where)
            if modality is not None:
                q = q.where(Item.id.in_(select(Embedding.item_id).where(Embedding.modality == modality)))
            return q

        with self.Session() as s:
            for start in range(0, len(hashes), 500):  # bound the bind parameters of one query
                part = hashes[start : start + 500]
                for iid, h in s.execute(restrict(select(Item.id, Item.image_hash).where(Item.status == ACTIVE, Item.image_hash.in_(part)))):
                    out.setdefault(h, []).append(int(iid))
            by_path: dict[str, list[str]] = {}
            for h, p in images.items():
                by_path.setdefault(str(p), []).append(h)
            paths = list(by_path)
            for start in range(0, len(paths), 500):
                legacy = s.execute(restrict(
                    select(Item.id, Item.image_path, Item.text, Item.meta, Item.content_hash)
                    .where(Item.status == ACTIVE, Item.image_hash.is_(None), Item.image_path.in_(paths[start : start + 500]))
                )).all()
                for it in legacy:
                    try:
                        data = read_image_bytes(it.image_path)
                    except ImageError:
                        continue
                    h = image_hash(data)
                    if h in by_path[it.image_path] and it.content_hash in (content_hash(data, it.text, it.meta), content_hash(data, it.text)):
                        out.setdefault(h, []).append(int(it.id))
        return {h: sorted(set(ids)) for h, ids in out.items()}

    @contextmanager
    def index_lock(self):
        """Exclusive access to the index folder: across threads (RLock, re-entrant) and across
        processes (flock), so that two writers never interleave a load, apply and save, and a
        reader never opens an index file another process is about to delete."""
        with self._lock:
            self._lock_depth += 1
            try:
                if self._lock_depth > 1 or self.read_only:  # re-entered, or a reader that writes no file: no flock
                    yield
                else:
                    (self.folder / "index").mkdir(parents=True, exist_ok=True)
                    with file_lock(self.folder / "index" / ".lock"):
                        yield
            finally:
                self._lock_depth -= 1

    def refresh(self) -> bool:
        """Catch the in-memory indexes up if SQL holds changes they have not applied (another
        process ingested or deleted), and follow a switch of model or token folder another
        process made (reembed, compact). Two indexed queries when nothing changed."""
        with self.Session() as s:
            last = self.last_change(s)
            row = s.get(CollectionInfo, 1)
            db_cfg = dict(row.config) if row is not None else {}
        moved = {k: v for k, v in db_cfg.items() if k in MODEL_FIELDS and getattr(self.config, k) != v}
        if moved:
            log.info("%s was switched by another process (%s): reloading", self.folder, ", ".join(sorted(moved)))
            if "model_fingerprint" in moved:
                self._bundle = None
            for k, v in moved.items():
                setattr(self.config, k, v)
            self.tokens = self._token_cache()
            self.forget_token_locations()
        elif last == self._synced:
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
            mark = change_mark(s, watermark)
            ids, xb = self.stored_vectors(s, modality)
        index = self.trained_index(modality, factory, len(ids), lambda want: xb)
        index.add(ids, xb)
        self._save(modality, index, watermark, mark)
        return index

    def trained_index(self, modality: str, factory: str | None, n: int, sample) -> VectorIndex:
        """An empty index of ``factory`` ("auto": chosen for ``n`` vectors) trained on
        ``sample(want)`` (called only when the index needs training; ``VectorIndex.train`` uses at
        most ``want`` of them); an exact one, with a warning, when ``n`` vectors are too few for
        its lists or training fails (PQ codebooks)."""
        factory = factory or self.config.index_factory
        if factory == "auto":
            factory = auto_factory(n)
        index = VectorIndex(self.config.embed_dim, factory)
        if not index.is_trained:
            try:
                if n < 39 * _nlist(factory):
                    raise RuntimeError(f"{n} vectors are fewer than 39 per inverted list")
                index.train(sample(TRAIN_PER_LIST * index.nlist))
            except RuntimeError as e:  # too few vectors for the lists or the PQ codebooks
                why = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                log.warning("cannot train %s on %d %s vectors (%s); using an exact index until a reindex", factory, n, modality, why)
                index = VectorIndex(self.config.embed_dim, "Flat")
        return index

    def _save(self, modality: str, index: VectorIndex, watermark: int, mark: str, layout: str = "") -> None:
        meta = IndexMeta(
            modality, self.config.model_fingerprint, self.config.embed_dim, index.factory, watermark=watermark,
            collection_id=self.config.collection_id, mark=mark, layout=layout,
        )
        if self.read_only:  # kept in memory only: the folder is the writers'
            self._memory_metas[modality] = dataclasses.replace(meta, count=index.ntotal)
        else:
            index.save(self.folder / "index", meta)
        index.nprobe = self.config.nprobe
        self.indexes[modality] = index

    def catch_up(self) -> dict[str, int]:
        """Apply every SQL change newer than each index's watermark; returns changes applied."""
        with self.index_lock():
            with self.Session() as s:
                last = self.last_change(s)
            applied = self._catch_up()
            self._synced = last
            return applied

    def check_stamp(self, meta: IndexMeta, session: Session) -> None:
        """StaleIndexError unless the index ``meta`` stamps was built from this database, at a
        point of its history that the database still has."""
        cfg, path = self.config, self.folder / "index" / meta.file
        fix = f"Rebuild the indexes from the database with `vtfusion reindex {self.folder}`"
        if meta.collection_id and cfg.collection_id and meta.collection_id != cfg.collection_id:
            raise StaleIndexError(f"{path} was built from collection {meta.collection_id}'s database, not this one's "
                                  f"({cfg.collection_id}). {fix}")
        last = self.last_change(session)
        if meta.watermark > last:
            raise StaleIndexError(
                f"the database is older than the indexes: its last change is {last}, {path} has applied changes up to "
                f"{meta.watermark} (was the database restored from a backup, or replaced?). Items added since that "
                f"backup are not in the database. {fix}"
            )
        if meta.mark and change_mark(session, meta.watermark) != meta.mark:
            raise StaleIndexError(
                f"the database's change {meta.watermark} is not the one {path} was built up to: the database was "
                f"restored or replaced and written to since. {fix}"
            )

    def _catch_up(self) -> dict[str, int]:
        try:
            check_factory(self.config.embed_dim, self.config.index_factory)
        except IndexTypeError as e:
            raise CollectionError(f"{self.folder / CONFIG_NAME}: {e}. Rebuild with a supported one: "
                                  f"`vtfusion reindex {self.folder} --index auto`") from None
        folder = self.folder / "index"
        if not self.read_only:
            clean_index_folder(folder)
        metas = read_meta(folder)
        applied = {}
        for modality in MODALITIES:
            meta = metas.get(modality)
            mem = self._memory_metas.get(modality)
            if (mem is not None and modality in self.indexes and mem.model_fingerprint == self.config.model_fingerprint
                    and (meta is None or meta.watermark <= mem.watermark)):
                # read-only: the in-memory index is at least as current as the saved one: catch it up in place
                index, meta = self.indexes[modality], mem
            else:
                if meta is None:
                    self.build_index(modality)
                    applied[modality] = -1  # built from scratch
                    continue
                if meta.model_fingerprint != self.config.model_fingerprint or meta.dim != self.config.embed_dim:
                    # the database's embeddings are the collection model's (reembed switches both at once):
                    # an index of another model is a leftover of an interrupted reembed, rebuilt from them
                    log.warning("%s was built by model %s; the collection's embeddings are model %s's: rebuilding it",
                                folder / meta.file, meta.model_fingerprint, self.config.model_fingerprint)
                    self.build_index(modality)
                    applied[modality] = -1
                    continue
                with self.Session() as s:
                    self.check_stamp(meta, s)
                try:
                    index = VectorIndex.load(folder, meta)
                except UnreadableIndexError as e:
                    log.warning("%s: rebuilding it from the database", e)
                    self.build_index(modality)
                    applied[modality] = -1
                    continue
            with self.Session() as s:
                rows = s.execute(
                    select(Change.seq, Change.item_id).where(Change.seq > meta.watermark).order_by(Change.seq)
                ).all()
                if not rows:
                    index.nprobe = self.config.nprobe
                    self.indexes[modality] = index
                    applied[modality] = 0
                    continue
                keep_ids, xb = self.stored_vectors(s, modality, since=meta.watermark)
                mark = change_mark(s, rows[-1].seq)
            index.remove(np.array(sorted({r.item_id for r in rows}), dtype=np.int64))
            index.add(keep_ids, xb)
            applied[modality] = len(rows)
            if self.config.index_factory == "auto" and index.factory == "Flat" and auto_factory(index.ntotal) != "Flat":
                log.info("%s index grew to %d vectors: rebuilding it as %s", modality, index.ntotal, auto_factory(index.ntotal))
                self.build_index(modality)
                continue
            self._save(modality, index, rows[-1].seq, mark, meta.layout)
        return applied


def _nlist(factory: str) -> int:
    head = factory.split(",")[0]
    return int(head[3:]) if head.startswith("IVF") and head[3:].isdigit() else 1
