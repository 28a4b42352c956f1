"""The rerank token cache: each image's ``image_tokens`` (N, D) in append-only, memory-mapped shards.

A record is a 16-byte header and the (N, D) tokens as fp16, or as int8 with one fp32 scale per
token (symmetric, per-token quantisation: half the bytes of fp16). The header holds a magic
number, the CRC32 of the rest of the record and a tag: 8 bytes of sha256(the item's content hash,
the model's fingerprint). A reader checks all three, so a record that is torn, overwritten,
shifted, another item's or another model's is never used as this item's tokens: it counts as a miss (the image is re-encoded) and
``verify`` reports it. A shard holds ``shard_records`` records; an item's location is (shard,
offset) in SQL.

Writing: under a cross-process lock, a shard's torn tail (a writer killed or out of disk
mid-record, in this process or another) is cut off first, the records are then written at the
offset their location names (``pwrite``, never a blind append), fsync'ed, and the shard is cut
back if the write fails. Bytes are durable *before* the SQL commit that references them: a
crash in between leaves unreferenced records (harmless, reported by verify, reclaimed by
``compact``), never a reference to bytes that are not on disk.

Format 1 (collections created before the header existed) has no header: records are located
the same way but cannot be checked; ``vtfusion compact`` rewrites such a cache as format 2.

``dtype="none"`` disables the cache: nothing is written, items carry no location, and the
reranker re-encodes candidate images from their files at query time.

Bytes per image: 16 + N x D x 2 (fp16) or 16 + N x D + 4 N (int8). Default model (65 x 128):
16.6 kB / 8.6 kB. BLIP ViT-B/16 at 384 px (577 x 768): 886 kB / 445 kB.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import zlib
from pathlib import Path

import numpy as np

from .locks import file_lock

log = logging.getLogger(__name__)
DTYPES = ("fp16", "int8", "none")
AUTO_FP16_MAX_BYTES = 64 * 1024  # "auto": fp16 while a record stays under this, int8 above
FORMAT = 2  # what new caches are written as (1: no header, unchecked)
MAGIC = b"VTR2"
HEADER = 16  # magic (4) + crc32 of tag and payload (4, little-endian) + tag (8)


class CorruptRecordError(ValueError):
    """Records that failed their check (missing, torn, shifted or another item's)."""

    def __init__(self, bad: list[int]):
        super().__init__(f"{len(bad)} token-cache records failed their check (positions {bad[:5]}); run `vtfusion repair`")
        self.bad = bad


def auto_dtype(num_tokens: int, width: int) -> str:
    return "fp16" if num_tokens * width * 2 <= AUTO_FP16_MAX_BYTES else "int8"


def tag_of(content_hash: str | None, salt: str = "") -> bytes:
    """The 8-byte tag a record carries: whose tokens (the item's content hash) under which model
    (``salt``: the model fingerprint)."""
    if not content_hash:
        return b"\0" * 8
    return hashlib.sha256(f"{content_hash}:{salt}".encode()).digest()[:8]


class TokenCache:
    def __init__(
        self, folder: str | Path, num_tokens: int, width: int, dtype: str = "fp16", shard_records: int = 4096,
        fmt: int = FORMAT, salt: str = "", repair: bool = True,
    ):
        """``salt``: the fingerprint of the model whose tokens this cache holds (part of each tag).
        ``repair``: cut torn tails on open (writers); a read-only process leaves the files alone
        (a torn record then fails its check and counts as a miss)."""
        if dtype not in DTYPES:
            raise ValueError(f"token cache dtype must be one of {DTYPES}; got {dtype!r}")
        if fmt not in (1, 2):
            raise ValueError(f"token cache format must be 1 or 2; got {fmt!r}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.N, self.D, self.dtype, self.shard_records, self.fmt, self.salt = num_tokens, width, dtype, shard_records, fmt, salt
        self.header = HEADER if fmt == 2 else 0
        payload = {"fp16": num_tokens * width * 2, "int8": num_tokens * width + 4 * num_tokens, "none": 0}[dtype]
        self.record_bytes = payload + self.header if payload else 0
        self._maps: dict[int, tuple[int, np.memmap]] = {}
        # shard -> (shard_records,) bool: records whose CRC this process has checked. Records are
        # never rewritten in place, so a later read checks magic and tag only (a few bytes)
        self._crc_ok: dict[int, np.ndarray] = {}
        self._append_lock = threading.Lock()
        # own_shards: this writer appends only to shards it created itself (a Ray ingest actor:
        # writers on other machines never write into one shard, whatever the file lock does on a
        # shared filesystem); False: every writer appends to the last shard
        self.own_shards: bool = False
        self._owned: int | None = None
        if self.enabled and repair:
            self._repair_tail()

    @property
    def enabled(self) -> bool:
        return self.dtype != "none"

    # ---- layout ----------------------------------------------------------------------

    def _path(self, shard: int) -> Path:
        return self.folder / f"shard-{shard:05d}.bin"

    def shards(self) -> list[int]:
        return sorted(int(p.stem.split("-")[1]) for p in self.folder.glob("shard-*.bin") if p.stem.split("-")[1].isdigit())

    def records_in(self, shard: int) -> int:
        p = self._path(shard)
        return p.stat().st_size // self.record_bytes if p.exists() and self.enabled else 0

    def _repair_tail(self) -> None:
        """Cut torn records, holding the writers' lock (a record being appended right now by
        another process is not torn, only unfinished)."""
        with file_lock(self.folder / ".lock"):
            for shard in self.shards():
                self._cut_torn(shard)

    def _cut_torn(self, shard: int) -> int:
        """Cut a partial record off the end of ``shard`` (call with the writers' lock held);
        returns the whole records it keeps."""
        p = self._path(shard)
        if not p.exists():
            return 0
        size = p.stat().st_size
        keep = size - size % self.record_bytes
        if keep != size:
            log.warning("token cache %s: cutting a torn record (%d -> %d bytes)", p, size, keep)
            os.truncate(p, keep)
            self._forget(shard, keep // self.record_bytes)
        return keep // self.record_bytes

    def _forget(self, shard: int, from_record: int) -> None:
        """Records from ``from_record`` on may have other bytes now: unmap, uncheck."""
        self._maps.pop(shard, None)
        if shard in self._crc_ok:
            self._crc_ok[shard][from_record:] = False

    # ---- writing ---------------------------------------------------------------------

    def encode(self, tokens: np.ndarray, hashes: list[str] | None = None) -> np.ndarray:
        """(B, N, D) float -> (B, record_bytes) uint8 records; ``hashes``: each item's content
        hash, whose head becomes the record's tag (format 2)."""
        if tokens.ndim != 3 or tokens.shape[1:] != (self.N, self.D):
            raise ValueError(f"tokens must be (B, {self.N}, {self.D}); got {tokens.shape}")
        B = tokens.shape[0]
        if hashes is not None and len(hashes) != B:
            raise ValueError(f"{len(hashes)} content hashes for {B} records")
        if self.dtype == "fp16":
            payload = np.ascontiguousarray(tokens.astype(np.float16)).view(np.uint8).reshape(B, -1)
        else:
            t = tokens.astype(np.float32)
            scale = np.abs(t).max(axis=2) / 127.0  # (B, N)
            scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
            q = np.clip(np.rint(t / scale[:, :, None]), -127, 127).astype(np.int8)  # (B, N, D)
            payload = np.concatenate([q.reshape(B, -1).view(np.uint8), scale.view(np.uint8).reshape(B, -1)], axis=1)
        if not self.header:
            return payload
        recs = np.empty((B, self.record_bytes), dtype=np.uint8)
        recs[:, HEADER:] = payload
        for b in range(B):
            tag = tag_of(hashes[b] if hashes is not None else None, self.salt)
            crc = zlib.crc32(payload[b], zlib.crc32(tag))
            recs[b, :HEADER] = np.frombuffer(MAGIC + crc.to_bytes(4, "little") + tag, dtype=np.uint8)
        return recs

    def append(self, tokens: np.ndarray, hashes: list[str] | None = None) -> list[tuple[int, int]]:
        """Write (B, N, D) tokens durably; returns the (shard, offset) of each record
        ((None, None) for each when the cache is disabled)."""
        if not self.enabled:
            return [(None, None)] * len(tokens)
        return self.append_records(self.encode(tokens, hashes))

    def append_records(self, recs: np.ndarray) -> list[tuple[int, int]]:
        """Write records ``encode`` made (ingest encodes them in its worker processes) durably."""
        if recs.ndim != 2 or recs.dtype != np.uint8 or recs.shape[1] != self.record_bytes:
            raise ValueError(f"records must be (B, {self.record_bytes}) uint8; got {recs.shape} {recs.dtype}")
        with self._append_lock, file_lock(self.folder / ".lock"):  # writers in this process and in others
            return self._append(recs)

    def _claim_shard(self) -> int:
        """A new shard of this writer's own: the next number after every shard on disk, created
        exclusively (O_EXCL), so two writers never claim one shard."""
        n = max(self.shards(), default=-1) + 1
        while True:
            try:
                os.close(os.open(self._path(n), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
                return n
            except FileExistsError:
                n += 1

    def _append(self, recs: np.ndarray) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        if self.own_shards:
            if self._owned is None:
                self._owned = self._claim_shard()
            shard = self._owned
        else:
            shards = self.shards()
            shard = shards[-1] if shards else 0
        i = 0
        while i < len(recs):
            have = self._cut_torn(shard)  # a torn tail left by anyone: the offsets below must be where the bytes go
            if have >= self.shard_records:
                if self.own_shards:
                    shard = self._owned = self._claim_shard()
                else:
                    shard += 1
                continue
            take = min(self.shard_records - have, len(recs) - i)
            self._write_at(shard, have, recs[i : i + take])
            out += [(shard, have + j) for j in range(take)]
            i += take
        return out

    def _write_at(self, shard: int, offset: int, recs: np.ndarray) -> None:
        """Write whole records at record ``offset`` of ``shard`` and fsync; on any failure the
        shard is cut back to ``offset`` records, so no partial record stays behind."""
        path, start = self._path(shard), offset * self.record_bytes
        data = memoryview(np.ascontiguousarray(recs)).cast("B")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            try:
                done = 0
                while done < len(data):
                    done += os.pwrite(fd, data[done:], start + done)
                os.fsync(fd)
            except BaseException:
                try:
                    os.ftruncate(fd, start)
                except OSError:  # the next append (or open) cuts the torn tail instead
                    pass
                raise
        finally:
            os.close(fd)
            self._forget(shard, offset)  # the map must grow

    # ---- reading ---------------------------------------------------------------------

    def _map(self, shard: int, need: int = -1) -> np.memmap | None:
        """The shard's records, mapped. The map is reused while it covers record ``need``
        (records are only ever appended), so a read of known records costs no ``stat``."""
        cached = self._maps.get(shard)
        if cached is not None and 0 <= need < cached[0]:
            return cached[1]
        n = self.records_in(shard)
        if n == 0:
            self._maps.pop(shard, None)
            return None
        if cached is None or cached[0] != n:
            mm = np.memmap(self._path(shard), dtype=np.uint8, mode="r", shape=(n, self.record_bytes))
            self._maps[shard] = cached = (n, mm)
        return cached[1]

    def read_records(self, locations: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
        """[(shard, offset)] -> ((K, record_bytes) uint8 records, (K,) bool: present on disk)."""
        recs = np.zeros((len(locations), self.record_bytes), dtype=np.uint8)
        present = np.zeros(len(locations), dtype=bool)
        if not locations:
            return recs, present
        loc = np.asarray(locations, dtype=np.int64).reshape(-1, 2)  # (K, 2)
        for shard in np.unique(loc[:, 0]):
            rows = np.flatnonzero(loc[:, 0] == shard)
            mm = self._map(int(shard), int(loc[rows, 1].max()))
            if mm is None:
                continue
            rows = rows[(loc[rows, 1] >= 0) & (loc[rows, 1] < len(mm))]  # a truncated shard: those are missing
            recs[rows] = mm[loc[rows, 1]]  # fancy index: copies only these records
            present[rows] = True
        return recs, present

    def check(self, recs: np.ndarray, hashes: list[str | None] | None = None, crc: np.ndarray | None = None) -> np.ndarray:
        """(K,) bool: each record's magic holds, (where a hash is given) its tag is that item's,
        and (where ``crc`` is True, default everywhere) its CRC32 matches its bytes. Format 1
        records have nothing to check: all True."""
        ok = np.ones(len(recs), dtype=bool)
        if not self.header or not len(recs):
            return ok
        ok &= (recs[:, :4] == np.frombuffer(MAGIC, dtype=np.uint8)).all(axis=1)
        if hashes is not None:
            given = np.array([h is not None for h in hashes], dtype=bool)
            want = np.frombuffer(b"".join(tag_of(h, self.salt) for h in hashes), dtype=np.uint8).reshape(-1, 8)  # (K, 8)
            ok &= ~given | (recs[:, 8:16] == want).all(axis=1)
        stored = recs[:, 4:8].copy().view("<u4")[:, 0]  # (K,)
        for k in np.flatnonzero(ok & (True if crc is None else crc)):
            ok[k] = int(stored[k]) == zlib.crc32(recs[k, HEADER:], zlib.crc32(recs[k, 8:16]))
        return ok

    def read_checked(
        self, locations: list[tuple[int, int]], hashes: list[str | None] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """[(shard, offset)] -> ((K, N, D) float32 tokens, (K,) bool ok). Where ok is False
        (record missing or failing its check) the tokens are zeros: the caller re-encodes. A
        record's CRC is computed the first time this process reads it; later reads check its
        magic and tag."""
        recs, ok = self.read_records(locations)
        if not self.header or not len(locations):
            ok &= self.check(recs, hashes)
        else:
            loc = np.asarray(locations, dtype=np.int64).reshape(-1, 2)  # (K, 2)
            seen = np.zeros(len(loc), dtype=bool)
            for shard in np.unique(loc[:, 0]):
                rows = np.flatnonzero(loc[:, 0] == shard)
                bits = self._crc_ok.setdefault(int(shard), np.zeros(self.shard_records, dtype=bool))
                inside = rows[(loc[rows, 1] >= 0) & (loc[rows, 1] < len(bits))]
                seen[inside] = bits[loc[inside, 1]]
                ok[rows] &= self.check(recs[rows], None if hashes is None else [hashes[k] for k in rows], crc=~seen[rows])
                bits[loc[inside, 1]] |= ok[inside]
        out = self._decode(recs)
        out[~ok] = 0
        return out, ok

    def read(self, locations: list[tuple[int, int]], hashes: list[str | None] | None = None) -> np.ndarray:
        """[(shard, offset)] -> (K, N, D) float32 tokens; CorruptRecordError if any fails its check."""
        out, ok = self.read_checked(locations, hashes)
        if not ok.all():
            raise CorruptRecordError(np.flatnonzero(~ok).tolist())
        return out

    def _decode(self, recs: np.ndarray) -> np.ndarray:
        """(K, record_bytes) uint8 -> (K, N, D) float32."""
        K = recs.shape[0]
        body = recs[:, self.header :]  # (K, payload) rows: a strided view, never copied
        out = np.empty((K, self.N, self.D), dtype=np.float32)
        flat = out.reshape(K, self.N * self.D)
        if self.dtype == "fp16":
            flat[...] = body.view(np.float16)
            return out
        nq = self.N * self.D
        scale = np.ascontiguousarray(body[:, nq:]).view(np.float32)  # (K, N)
        flat[...] = body[:, :nq].view(np.int8)
        out *= scale[:, :, None]
        return out

    def total_records(self) -> int:
        return sum(self.records_in(s) for s in self.shards())

    def total_bytes(self) -> int:
        return sum(self._path(s).stat().st_size for s in self.shards())
