"""The rerank token cache: each image's ``image_tokens`` (N, D) in append-only, memory-mapped shards.

A record is the (N, D) tokens as fp16, or as int8 with one fp32 scale per token (symmetric,
per-token quantisation: half the bytes of fp16). A shard holds ``shard_records`` records;
the location of an item's tokens is (shard, offset) in SQL. Bytes are written and fsync'ed
*before* the SQL commit that references them: a crash in between leaves unreferenced
records at a shard's end (harmless, reported by verify) and never a reference to bytes
that are not on disk. A torn final record (crash mid-write) is cut off when the cache opens.

``dtype="none"`` disables the cache: nothing is written, items carry no location, and the
reranker re-encodes candidate images from their files at query time (slower queries, no disk;
worth it only for huge towers on small or rarely reranked collections).

Bytes per image: N x D x 2 (fp16) or N x D + 4 N (int8). Default model (65 x 128): 16.6 kB /
8.6 kB. BLIP ViT-B/16 at 384 px (577 x 768): 886 kB / 445 kB. CLIP ViT-B/32 (50 x 768): 77 kB / 39 kB.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import numpy as np

from .locks import file_lock

log = logging.getLogger(__name__)
DTYPES = ("fp16", "int8", "none")
AUTO_FP16_MAX_BYTES = 64 * 1024  # "auto": fp16 while a record stays under this, int8 above


def auto_dtype(num_tokens: int, width: int) -> str:
    return "fp16" if num_tokens * width * 2 <= AUTO_FP16_MAX_BYTES else "int8"


class TokenCache:
    def __init__(self, folder: str | Path, num_tokens: int, width: int, dtype: str = "fp16", shard_records: int = 4096):
        if dtype not in DTYPES:
            raise ValueError(f"token cache dtype must be one of {DTYPES}; got {dtype!r}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.N, self.D, self.dtype, self.shard_records = num_tokens, width, dtype, shard_records
        self.record_bytes = {"fp16": num_tokens * width * 2, "int8": num_tokens * width + 4 * num_tokens, "none": 0}[dtype]
        self._maps: dict[int, tuple[int, np.memmap]] = {}
        self._append_lock = threading.Lock()
        if self.enabled:
            self._repair_tail()

    @property
    def enabled(self) -> bool:
        return self.dtype != "none"

    # ---- layout ----------------------------------------------------------------------

    def _path(self, shard: int) -> Path:
        return self.folder / f"shard-{shard:05d}.bin"

    def shards(self) -> list[int]:
        return sorted(int(p.stem.split("-")[1]) for p in self.folder.glob("shard-*.bin"))

    def records_in(self, shard: int) -> int:
        p = self._path(shard)
        return p.stat().st_size // self.record_bytes if p.exists() and self.enabled else 0

    def _repair_tail(self) -> None:
        """Cut torn records, holding the writers' lock (a record being appended right now by
        another process is not torn, only unfinished)."""
        with file_lock(self.folder / ".lock"):
            self._cut_torn()

    def _cut_torn(self) -> None:
        for shard in self.shards():
            p = self._path(shard)
            size = p.stat().st_size
            if size % self.record_bytes:
                keep = size - size % self.record_bytes
                log.warning("token cache %s: cutting a torn record (%d -> %d bytes)", p, size, keep)
                with open(p, "r+b") as f:
                    f.truncate(keep)

    # ---- writing ---------------------------------------------------------------------

    def encode(self, tokens: np.ndarray) -> np.ndarray:
        """(B, N, D) float -> (B, record_bytes) uint8."""
        if tokens.ndim != 3 or tokens.shape[1:] != (self.N, self.D):
            raise ValueError(f"tokens must be (B, {self.N}, {self.D}); got {tokens.shape}")
        B = tokens.shape[0]
        if self.dtype == "fp16":
            return np.ascontiguousarray(tokens.astype(np.float16)).view(np.uint8).reshape(B, -1)
        t = tokens.astype(np.float32)
        scale = np.abs(t).max(axis=2) / 127.0  # (B, N)
        scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
        q = np.clip(np.rint(t / scale[:, :, None]), -127, 127).astype(np.int8)  # (B, N, D)
        return np.concatenate([q.reshape(B, -1).view(np.uint8), scale.view(np.uint8).reshape(B, -1)], axis=1)

    def append(self, tokens: np.ndarray) -> list[tuple[int, int]]:
        """Write (B, N, D) tokens durably; returns the (shard, offset) of each record
        ((None, None) for each when the cache is disabled)."""
        if not self.enabled:
            return [(None, None)] * len(tokens)
        return self.append_records(self.encode(tokens))

    def append_records(self, recs: np.ndarray) -> list[tuple[int, int]]:
        """Write records ``encode`` made (ingest encodes them in its worker processes) durably."""
        if recs.ndim != 2 or recs.dtype != np.uint8 or recs.shape[1] != self.record_bytes:
            raise ValueError(f"records must be (B, {self.record_bytes}) uint8; got {recs.shape} {recs.dtype}")
        # writers in this process and in others: offsets come from the file size
        with self._append_lock, file_lock(self.folder / ".lock"):
            return self._append(recs)

    def _append(self, recs: np.ndarray) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        shards = self.shards()
        shard = shards[-1] if shards else 0
        i = 0
        while i < len(recs):
            have = self.records_in(shard)
            if have >= self.shard_records:
                shard += 1
                continue
            take = min(self.shard_records - have, len(recs) - i)
            with open(self._path(shard), "ab") as f:
                f.write(recs[i : i + take].tobytes())
                f.flush()
                os.fsync(f.fileno())
            out += [(shard, have + j) for j in range(take)]
            self._maps.pop(shard, None)  # the map must grow
            i += take
        return out

    # ---- reading ---------------------------------------------------------------------

    def _map(self, shard: int, need: int = -1) -> np.memmap:
        """The shard's records, mapped. The map is reused while it covers record ``need``
        (records are only ever appended), so a read of known records costs no ``stat``."""
        cached = self._maps.get(shard)
        if cached is not None and need < cached[0] and need >= 0:
            return cached[1]
        n = self.records_in(shard)
        if cached is None or cached[0] != n:
            mm = np.memmap(self._path(shard), dtype=np.uint8, mode="r", shape=(n, self.record_bytes))
            self._maps[shard] = cached = (n, mm)
        return cached[1]

    def read(self, locations: list[tuple[int, int]]) -> np.ndarray:
        """[(shard, offset)] -> (K, N, D) float32 tokens: one gather and one decode per shard."""
        out = np.empty((len(locations), self.N, self.D), dtype=np.float32)
        if not locations:
            return out
        loc = np.asarray(locations, dtype=np.int64)  # (K, 2)
        if (loc[:, 0] == loc[0, 0]).all():  # one shard (the usual case): decode straight into out
            offsets = loc[:, 1]
            return self._decode(self._map(int(loc[0, 0]), int(offsets.max()))[offsets], out)
        for shard in np.unique(loc[:, 0]):
            rows = np.flatnonzero(loc[:, 0] == shard)
            out[rows] = self._decode(self._map(int(shard), int(loc[rows, 1].max()))[loc[rows, 1]])  # fancy index: copies only these records
        return out

    def _decode(self, recs: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """(K, record_bytes) uint8 -> (K, N, D) float32 (written into ``out`` when given)."""
        K = recs.shape[0]
        out = np.empty((K, self.N, self.D), dtype=np.float32) if out is None else out
        if self.dtype == "fp16":
            out[...] = recs.view(np.float16).reshape(K, self.N, self.D)
            return out
        nq = self.N * self.D
        scale = np.ascontiguousarray(recs[:, nq:]).view(np.float32)  # (K, N)
        out[...] = recs[:, :nq].view(np.int8).reshape(K, self.N, self.D)
        out *= scale[:, :, None]
        return out

    def total_records(self) -> int:
        return sum(self.records_in(s) for s in self.shards())
