"""One FAISS index per modality; numpy in, numpy out (never imports torch).

FAISS ids are SQL primary keys (``IndexIDMap2``), never row positions. Vectors are unit
length and compared by inner product (= cosine). The factory string is chosen by collection
size unless the user gives one: exact (``Flat``) below ``EXACT_MAX``, IVF above (IVF keeps
``remove_ids``, which deletes need; HNSW does not). When faiss sees a GPU, unfiltered searches
run on a GPU clone of the index; the CPU index stays the one that is saved and updated.

Each saved index is stamped in ``meta.json`` (model fingerprint, dim, factory, metric, count,
watermark = the last SQL change applied). The index file is written under a new name and
``meta.json`` is then atomically replaced to point at it, so a crash leaves either the old
or the new index, never a half-written one.

``OnDiskIndex`` is the layout ``reindex --engine ray`` builds for IVF factories: the merged
inverted lists live in an ``.ivfdata`` file that is memory-mapped read-only (``merge_ondisk``),
so the index need not fit in RAM, and it is never written again; what changes afterwards
(adds, deletes, replacements from the change log) is kept beside it in a small exact part and
a set of masked ids, saved atomically like any index.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import contextlib
import sys
import threading
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np

from vtfusion.models.files import write_text_atomic

log = logging.getLogger(__name__)
EXACT_MAX = 20_000  # below this many vectors an exact index is fast enough
META_NAME = "meta.json"
DELTA_WARN, DELTA_WARN_MIN = 0.05, 10_000  # an on-disk index whose delta outgrows this share of its base (and this many) says to reindex


class IndexMismatchError(RuntimeError):
    """An index built by another model, or of another dimension, than the collection uses."""


class IndexTypeError(ValueError):
    """A factory string FAISS cannot build, or whose index cannot do what a collection needs."""


SUPPORTED = "Flat, IVF<n>,Flat, IVF<n>,SQ8, IVF<n>,PQ<m>, OPQ<m>,IVF<n>,PQ<m>, PCA<d>,IVF<n>,Flat, PQ<m>, SQ8"


def check_factory(dim: int, factory: str) -> str:
    """``factory`` if FAISS builds it for ``dim`` and its index can remove vectors (deletes and
    updates need ``remove_ids``); IndexTypeError naming what is wrong otherwise. Graph indexes
    (HNSW) and refinement wrappers cannot remove vectors and are refused: use IVF."""
    factory = (factory or "").strip()
    if factory == "auto":
        return factory
    if not factory or "IDMap" in factory:
        raise IndexTypeError(f"index factory {factory!r}: give a FAISS factory string such as {SUPPORTED} (ids are mapped by vtfusion)")
    try:
        index = faiss.index_factory(dim, f"IDMap2,{factory}", faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        why = str(e).strip().splitlines()[-1] if str(e).strip() else "not a factory string"
        raise IndexTypeError(
            f"FAISS cannot build index {factory!r} for {dim}-d vectors ({why.split(': ', 1)[-1][:200]}). Factory strings "
            f"read like {SUPPORTED} (FAISS's index_factory syntax)"
        ) from None
    try:
        index.remove_ids(faiss.IDSelectorBatch(np.zeros(1, dtype=np.int64)))
    except RuntimeError:
        raise IndexTypeError(
            f"index {factory!r} cannot remove vectors, which deletes and updates need (HNSW graphs and Refine wrappers "
            f"cannot). Use one of {SUPPORTED}; IVF<n>,Flat is the usual choice above 20,000 items"
        ) from None
    return factory


class UnreadableIndexError(IndexMismatchError):
    """An index file that is missing, truncated or not what ``meta.json`` says: rebuilt from SQL."""


TRAIN_PER_LIST = 64  # k-means training sample per IVF list


def auto_factory(n: int) -> str:
    """Exact below EXACT_MAX vectors, else IVF with ~4*sqrt(n) lists."""
    if n < EXACT_MAX:
        return "Flat"
    nlist = int(2 ** round(math.log2(4 * math.sqrt(n))))
    return f"IVF{nlist},Flat"


def gpu_count() -> int:
    try:
        return faiss.get_num_gpus()
    except AttributeError:  # faiss-cpu
        return 0


@dataclass
class IndexMeta:
    modality: str
    model_fingerprint: str
    dim: int
    factory: str
    metric: str = "ip"
    count: int = 0
    watermark: int = 0  # seq of the last SQL change applied
    file: str = ""  # current index file inside the index folder
    collection_id: str = ""  # the database's collection uid it was built from ("" before ids existed)
    mark: str = ""  # what identifies change ``watermark`` in that database (collection.change_mark)
    layout: str = ""  # how it was built when not in one process ("ray: 4 id-range shards merged")
    base: str = ""  # on-disk layout: the immutable base index file (its lists in <stem>.ivfdata beside it)


class VectorIndex:
    """A FAISS index over (id, unit vector) pairs."""

    def __init__(self, dim: int, factory: str = "Flat"):
        self.dim = dim
        self.factory = factory
        # one owning object: the id map wraps the factory's index (no dangling SWIG proxies)
        self.index = faiss.index_factory(dim, f"IDMap2,{factory}", faiss.METRIC_INNER_PRODUCT)
        self.nprobe = 16
        self._gpu_index = None  # a GPU copy of the inner index for unfiltered search, rebuilt after changes
        self._gpu_ids: np.ndarray | None = None

    # ---- building --------------------------------------------------------------------

    @property
    def is_trained(self) -> bool:
        return self.index.is_trained

    def train(self, xb: np.ndarray) -> None:
        """Train on ``xb``, or on a seeded sample of TRAIN_PER_LIST vectors per inverted list
        (k-means cost grows with the sample; beyond ~64 per list the centroids barely move)."""
        xb = self._check(xb)
        if self.index.is_trained:
            return
        cap = TRAIN_PER_LIST * self.nlist
        if self.nlist and len(xb) > cap:
            xb = xb[np.sort(np.random.default_rng(0).choice(len(xb), size=cap, replace=False))]
        self.index.train(xb)

    def add(self, ids: np.ndarray, xb: np.ndarray) -> None:
        """Add vectors under their ids; ids already present are replaced (idempotent catch-up)."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        xb = self._check(xb)
        if ids.shape[0] != xb.shape[0]:
            raise ValueError(f"{ids.shape[0]} ids for {xb.shape[0]} vectors")
        if ids.size == 0:
            return
        if not self.index.is_trained:
            raise RuntimeError(f"index {self.factory} must be trained before adding (train on stored embeddings)")
        self.remove(ids)
        self.index.add_with_ids(xb, ids)
        self._gpu_index = None

    def remove(self, ids: np.ndarray) -> int:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if ids.size == 0 or self.index.ntotal == 0:
            return 0
        self._gpu_index = None
        return int(self.index.remove_ids(faiss.IDSelectorBatch(ids)))

    def _gpu(self):
        """The inner index cloned to GPU 0 (when faiss sees a GPU), with the position -> id map."""
        if gpu_count() == 0 or self.ntotal == 0:
            return None
        if self._gpu_index is None:
            try:
                self._gpu_index = faiss.index_cpu_to_gpu(_gpu_resources(), 0, self.index.index)
            except RuntimeError as e:  # an index type without a GPU implementation
                log.info("searching %s on the CPU: %s", self.factory, e)
                return None
            if self.nlist:
                faiss.GpuParameterSpace().set_index_parameter(self._gpu_index, "nprobe", self.nprobe)
            self._gpu_ids = self.ids()
        return self._gpu_index

    # ---- reading ---------------------------------------------------------------------

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def nlist(self) -> int:
        """Inverted lists of an IVF index (what ``nprobe`` ranges over); 0 for other indexes."""
        base = faiss.downcast_index(self.index.index)
        return int(base.nlist) if isinstance(base, faiss.IndexIVF) else 0

    def ids(self) -> np.ndarray:
        return faiss.vector_to_array(self.index.id_map).astype(np.int64)

    def search(
        self, xq: np.ndarray, k: int, allowed: np.ndarray | None = None, nprobe: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product: (D (nq, k) float32, I (nq, k) int64; -1 where fewer exist).

        ``allowed``: restrict to these ids (an ``IDSelectorBatch`` inside the search).
        ``nprobe``: lists to probe for this call (IVF; default ``self.nprobe``). Passed per call,
        never set on the shared index, so concurrent searches do not see each other's setting.
        """
        xq = self._check(xq)
        nprobe = self.nprobe if nprobe is None else min(int(nprobe), self.nlist or int(nprobe))
        gpu = self._gpu() if allowed is None and nprobe == self.nprobe else None  # filtered search stays on the CPU (selectors)
        if gpu is not None:
            D, P = gpu.search(xq, k)  # positions in the inner index
            return D, np.where(P >= 0, self._gpu_ids[np.maximum(P, 0)], -1)
        params = None
        sel = faiss.IDSelectorBatch(np.ascontiguousarray(allowed, dtype=np.int64)) if allowed is not None else None
        if self.nlist:
            params = faiss.SearchParametersIVF(sel=sel, nprobe=nprobe)
        elif sel is not None:
            params = faiss.SearchParameters(sel=sel)
        if params is None:
            D, I = self.index.search(xq, k)
        else:
            D, I = self.index.search(xq, k, params=params)
        return D, I

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        return np.stack([self.index.reconstruct(int(i)) for i in ids]) if len(ids) else np.zeros((0, self.dim), np.float32)

    # ---- persistence -----------------------------------------------------------------

    def save(self, folder: str | Path, meta: IndexMeta) -> IndexMeta:
        """Write the index under a new file name, then atomically point meta.json at it."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        return _publish(folder, meta, f"{meta.modality}-{meta.watermark:012d}.faiss",
                        lambda tmp: faiss.write_index(self.index, str(tmp)), count=self.ntotal, dim=self.dim, factory=self.factory)

    @classmethod
    def load(cls, folder: str | Path, meta: IndexMeta) -> VectorIndex | OnDiskIndex:
        """The index ``meta`` names; UnreadableIndexError when its file is missing, truncated or
        not an index (the caller rebuilds it from SQL)."""
        if meta.base:
            return OnDiskIndex.load(folder, meta)
        path = Path(folder) / meta.file
        try:
            index = faiss.read_index(str(path))  # keep this owning proxy alive: it frees the index
        except RuntimeError as e:
            raise UnreadableIndexError(f"{path}: {str(e).strip().splitlines()[-1] if str(e).strip() else 'unreadable'}") from e
        self = cls.__new__(cls)
        self.dim, self.factory, self.nprobe = index.d, meta.factory, 16
        self.index = index
        self._gpu_index, self._gpu_ids = None, None
        if not isinstance(index, faiss.IndexIDMap2) or index.d != meta.dim or index.ntotal != meta.count:
            raise UnreadableIndexError(f"{path} is not the id-mapped index of {meta.count} vectors of dim {meta.dim} that meta.json describes")
        return self

    def _check(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"vectors must be (n, {self.dim}); got {x.shape}")
        return x


def _publish(folder: Path, meta: IndexMeta, name: str, write: Callable[[Path], None], **stamp) -> IndexMeta:
    """A new index file ``name`` written through ``write(tmp)`` (fsync'ed, then renamed into
    place), then meta.json atomically pointed at it (``stamp``: the fields that describe it);
    the modality's files it replaces are removed. Returns the new stamp."""
    tmp = folder / f"{name}.{os.getpid()}.{threading.get_ident()}.tmp"  # unique: writers never share a temp file
    write(tmp)
    _fsync(tmp)
    os.replace(tmp, folder / name)
    meta = IndexMeta(**{**asdict(meta), "file": name, **stamp})
    write_meta(folder, meta)
    _remove_replaced(folder, meta)
    return meta


def _files_of(meta: IndexMeta) -> set[str]:
    """The files of the index ``meta`` stamps."""
    return {meta.file} | ({meta.base, Path(meta.base).with_suffix(".ivfdata").name} if meta.base else set())


def _remove_replaced(folder: Path, meta: IndexMeta) -> None:
    """After meta.json points at ``meta``: the modality's files it no longer names (an older
    index, delta or on-disk base; a process that mapped one keeps its open copy)."""
    keep = _files_of(meta)
    for old in folder.glob(f"{meta.modality}-*"):
        if old.suffix in (".faiss", ".ivfdata", ".npz") and old.name not in keep:
            old.unlink(missing_ok=True)


@contextlib.contextmanager
def _quiet_stdout():
    """FAISS's C++ prints on stdout when it maps or resizes an ``.ivfdata`` file ("resizing …",
    "IO_FLAG_ONDISK_SAME_DIR: updating …"); that would corrupt ``--json`` output. File
    descriptor 1 points at /dev/null meanwhile."""
    sys.stdout.flush()
    saved, null = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(null)


def read_ondisk(path: str | Path):
    """An IVF index whose inverted lists are in ``<stem>.ivfdata`` beside ``path``, mapped
    read-only (wherever the folder is mounted now)."""
    with _quiet_stdout():
        return faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)


def merge_ondisk(trained: bytes, parts: list[str], stem: Path) -> None:
    """``faiss.contrib.ondisk.merge_ondisk``: the IVF ``parts`` (each the ``trained`` empty
    index plus a shard's vectors, under their own ids) merged into ``<stem>.ivfdata`` and the
    index ``<stem>.faiss`` that reads it. Lists are copied part by part through memory maps:
    the parts and the result need not fit in RAM."""
    from faiss.contrib.ondisk import merge_ondisk as _merge

    index = faiss.deserialize_index(trained)
    with _quiet_stdout():
        _merge(index, parts, str(stem.with_suffix(".ivfdata")))
    faiss.write_index(index, str(stem.with_suffix(".faiss")))
    del index
    for suffix in (".ivfdata", ".faiss"):
        _fsync(stem.with_suffix(suffix))


def _merge_topk(D1, I1, D2, I2, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of two (D, I) result sets by inner product (-1 ids last)."""
    D = np.concatenate([np.where(I1 >= 0, D1, -np.inf), np.where(I2 >= 0, D2, -np.inf)], axis=1)
    I = np.concatenate([I1, I2], axis=1)
    order = np.argsort(-D, axis=1, kind="stable")[:, :k]
    D, I = np.take_along_axis(D, order, axis=1), np.take_along_axis(I, order, axis=1)
    return np.where(I >= 0, D, -np.inf).astype(np.float32), I


class OnDiskIndex:
    """An IVF index with its inverted lists on disk (``base``, mapped read-only, never
    modified: a crash or a reader on another machine always sees it whole) plus the changes
    since it was built: ``delta``, an exact index of the vectors added or replaced since, and
    ``masked``, the base ids deleted or replaced since. A search asks the base with the masked
    ids excluded inside the search (an ``IDSelector``, so k results still come back) and the
    delta, and merges the two top-k lists. ``reindex`` folds the delta back in.

    The same surface as ``VectorIndex`` (add, remove, search, ids, reconstruct, save, load)."""

    def __init__(self, base, base_file: str, factory: str, dim: int):
        self.base = base  # faiss.IndexIVF over an OnDiskInvertedLists
        self.base_file = base_file
        self.dim, self.factory, self.nprobe = dim, factory, 16
        self.base_ids = np.sort(self._list_ids())
        self.masked = np.zeros(0, np.int64)
        self.delta = VectorIndex(dim, "Flat")
        self._not_masked = None  # (masked array, its "not in" selector, the batch it wraps): rebuilt when the mask changes
        self._warned = False  # the delta outgrew DELTA_WARN of the base (said once per process)

    def _list_ids(self) -> np.ndarray:
        il = self.base.invlists
        parts = [faiss.rev_swig_ptr(il.get_ids(k), il.list_size(k)).copy() for k in range(self.base.nlist) if il.list_size(k)]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    # ---- the VectorIndex surface -------------------------------------------------------

    is_trained = True

    @property
    def ntotal(self) -> int:
        return len(self.base_ids) - len(self.masked) + self.delta.ntotal

    @property
    def nlist(self) -> int:
        return int(self.base.nlist)

    def ids(self) -> np.ndarray:
        return np.concatenate([np.setdiff1d(self.base_ids, self.masked, assume_unique=True), self.delta.ids()])

    def add(self, ids: np.ndarray, xb: np.ndarray) -> None:
        """To the delta; a base id added again is masked in the base (replaced)."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        self.remove(ids)
        self.delta.add(ids, xb)

    def _in_base(self, ids: np.ndarray) -> np.ndarray:
        """The given ids that the base holds (binary search: a catch-up costs O(changes log n))."""
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        if not len(self.base_ids) or not len(ids):
            return ids[:0]
        pos = np.minimum(np.searchsorted(self.base_ids, ids), len(self.base_ids) - 1)
        return ids[self.base_ids[pos] == ids]

    def remove(self, ids: np.ndarray) -> int:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        in_base = self._in_base(ids)
        fresh = np.setdiff1d(in_base, self.masked, assume_unique=True)
        if len(fresh):
            self.masked = np.union1d(self.masked, fresh)  # a new array: a search holding the old one keeps its selector
        return len(fresh) + self.delta.remove(ids)

    def search(
        self, xq: np.ndarray, k: int, allowed: np.ndarray | None = None, nprobe: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        xq = np.ascontiguousarray(xq, dtype=np.float32)
        nprobe = min(int(self.nprobe if nprobe is None else nprobe), self.nlist)
        keep = []  # every selector object stays referenced until the search returns
        sel = None
        masked, cached = self.masked, self._not_masked  # read once: a catch-up in another thread swaps them
        if len(masked):
            if cached is None or cached[0] is not masked:
                batch = faiss.IDSelectorBatch(masked)
                cached = self._not_masked = (masked, faiss.IDSelectorNot(batch), batch)
            keep.append(cached)
            sel = cached[1]
        if allowed is not None:
            only = faiss.IDSelectorBatch(np.ascontiguousarray(allowed, dtype=np.int64))
            keep.append(only)
            sel = only if sel is None else faiss.IDSelectorAnd(only, sel)
            keep.append(sel)
        D1, I1 = self.base.search(xq, k, params=faiss.SearchParametersIVF(sel=sel, nprobe=nprobe))
        if self.delta.ntotal == 0:
            return D1, I1
        D2, I2 = self.delta.search(xq, k, allowed)
        return _merge_topk(D1, I1, D2, I2, k)

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """Vectors by id: from the delta, else decoded from the base's lists (a scan of the
        list ids: for spot checks, not for serving)."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.zeros((len(ids), self.dim), np.float32)
        in_delta = np.isin(ids, self.delta.ids())
        if in_delta.any():
            out[in_delta] = self.delta.reconstruct(ids[in_delta])
        masked = set(self.masked.tolist())
        want = {int(i): n for n, i in enumerate(ids) if not in_delta[n] and int(i) not in masked}  # masked: deleted, not here
        missing = [int(i) for n, i in enumerate(ids) if not in_delta[n] and int(i) in masked]
        il = self.base.invlists
        for lst in range(self.base.nlist):
            if not want:
                break
            size = il.list_size(lst)
            if size == 0:
                continue
            lids = faiss.rev_swig_ptr(il.get_ids(lst), size)
            for off in np.flatnonzero(np.isin(lids, list(want))):
                row = want.pop(int(lids[off]))
                self.base.reconstruct_from_offset(lst, int(off), faiss.swig_ptr(out[row]))
        if want or missing:
            raise KeyError(f"ids not in the index: {sorted([*want, *missing])[:5]}")
        return out

    # ---- persistence -----------------------------------------------------------------

    def save(self, folder: str | Path, meta: IndexMeta) -> IndexMeta:
        """The base is never rewritten; the delta (ids, vectors) and the masked ids are written
        to a new ``.delta.npz``, then meta.json is atomically pointed at both."""
        ids = self.delta.ids()

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, ids=ids, vectors=self.delta.reconstruct(ids), masked=self.masked)

        meta = _publish(Path(folder), meta, f"{meta.modality}-{meta.watermark:012d}.delta.npz", write,
                        base=self.base_file, count=self.ntotal, dim=self.dim, factory=self.factory)
        base = len(self.base_ids)
        if not self._warned and self.delta.ntotal > max(DELTA_WARN * base, DELTA_WARN_MIN):
            self._warned = True
            log.warning("the on-disk %s index holds %d vectors changed since its build (%.0f%% of its %d): searches scan "
                        "them exactly; `vtfusion reindex --engine ray` folds them into a new base", meta.modality,
                        self.delta.ntotal, 100 * self.delta.ntotal / max(1, base), base)
        return meta

    @classmethod
    def load(cls, folder: str | Path, meta: IndexMeta) -> OnDiskIndex:
        folder = Path(folder)
        path = folder / meta.base
        try:
            base = read_ondisk(path)
            with np.load(folder / meta.file) as z:
                ids, vectors, masked = z["ids"].astype(np.int64), z["vectors"].astype(np.float32), z["masked"].astype(np.int64)
        except (RuntimeError, OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise UnreadableIndexError(f"{path} (+ {meta.file}): {str(e).strip().splitlines()[-1] if str(e).strip() else 'unreadable'}") from e
        if not isinstance(base, faiss.IndexIVF) or base.d != meta.dim:
            raise UnreadableIndexError(f"{path} is not an IVF index of dim {meta.dim}")
        lists = faiss.downcast_InvertedLists(base.invlists)
        data = path.with_suffix(".ivfdata")
        if not isinstance(lists, faiss.OnDiskInvertedLists) or data.stat().st_size < lists.totsize:
            # a mapped file shorter than its lists would kill the process (SIGBUS) at the first search that reads past its end
            raise UnreadableIndexError(f"{data} is shorter than the {lists.totsize} bytes its lists need (truncated)")
        self = cls(base, meta.base, meta.factory, meta.dim)
        self.masked = self._in_base(masked)
        self.delta.add(ids, vectors)
        if self.ntotal != meta.count:
            raise UnreadableIndexError(f"{path} (+ {meta.file}) holds {self.ntotal} vectors, meta.json says {meta.count}")
        return self


_GPU_RESOURCES = None


def _gpu_resources():
    global _GPU_RESOURCES
    if _GPU_RESOURCES is None:
        _GPU_RESOURCES = faiss.StandardGpuResources()
    return _GPU_RESOURCES


def read_meta(folder: str | Path) -> dict[str, IndexMeta]:
    """The stamps in ``meta.json``; {} (with a warning) when it is missing or corrupt: the
    indexes are then rebuilt from SQL, which holds everything they are made of."""
    path = Path(folder) / META_NAME
    if not path.exists():
        return {}
    try:
        raw = json.loads(path.read_text())
        metas = {m: IndexMeta(**v) for m, v in raw.items() if m in ("image", "text")}
        for meta in metas.values():  # files are named inside the index folder, never a path out of it
            for name in (meta.file, meta.base):
                if name and (not isinstance(name, str) or Path(name).name != name or name in (".", "..")):
                    raise ValueError(f"{name!r} is not a file name in the index folder")
        return metas
    except (ValueError, TypeError, AttributeError, UnicodeDecodeError) as e:
        log.warning("%s is corrupt (%s): its indexes are rebuilt from the database", path, e)
        return {}


def clean_index_folder(folder: str | Path) -> list[str]:
    """Delete temporary files of interrupted saves and index files meta.json no longer names
    (call with the index lock held: no save is in flight). Returns the names removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    current = set().union(*(_files_of(m) for m in read_meta(folder).values()))
    gone = []
    for p in folder.iterdir():
        if p.is_dir() and p.name.startswith("build-"):  # the parts of a sharded build that stopped (it holds the lock while it runs)
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p.name)
        elif p.name.endswith(".tmp") or (p.suffix in (".faiss", ".ivfdata", ".npz") and p.name not in current):
            p.unlink(missing_ok=True)
            gone.append(p.name)
    if gone:
        log.info("%s: removed %d leftover files (%s)", folder, len(gone), ", ".join(sorted(gone)[:5]))
    return gone


def write_meta(folder: str | Path, meta: IndexMeta) -> None:
    folder = Path(folder)
    metas = read_meta(folder)
    metas[meta.modality] = meta
    write_text_atomic(folder / META_NAME, json.dumps({m: asdict(v) for m, v in sorted(metas.items())}, indent=2) + "\n")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
