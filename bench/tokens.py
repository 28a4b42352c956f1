"""Token-cache reads: what the per-record checks (magic, CRC32, the item's tag) cost.

    .venv/bin/python bench/tokens.py [--records 20000] [--tokens 65] [--width 128] [--reps 20]

Two caches hold the same random tokens: format 2 (header, every read checked) and format 1
(no header, nothing checked), fp16 and int8. Each reads the candidates of a rerank (depth 16 /
64 / 256 random records, one shard) ``--reps`` times after a warm-up; the fastest counts. The
ratio checked / unchecked is the price of never reranking with another item's tokens (a
process computes a record's CRC on its first read, then checks magic and tag: "first read" is
that first read). Default sizes are the default model's (65 tokens x 128).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from common import table

from vtfusion.indexer.tokens import TokenCache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=20000)
    ap.add_argument("--tokens", type=int, default=65)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--depths", default="16,64,256")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    hashes = [f"{i:064x}" for i in range(args.records)]
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("fp16", "int8"):
            caches, locs = {}, {}
            for fmt in (1, 2):
                c = TokenCache(Path(tmp) / f"{dtype}-{fmt}", args.tokens, args.width, dtype, shard_records=args.records, fmt=fmt)
                for i in range(0, args.records, 2048):
                    n = min(2048, args.records - i)
                    t = rng.standard_normal((n, args.tokens, args.width), dtype=np.float32)
                    locs.setdefault(fmt, []).extend(c.append(t, hashes[i : i + n]))
                caches[fmt] = c
            for depth in (int(d) for d in args.depths.split(",")):
                pick = rng.choice(args.records, size=depth, replace=False)
                best = {}
                for fmt, c in caches.items():
                    want = [locs[fmt][k] for k in pick]
                    tags = [hashes[k] for k in pick]
                    c.read_checked(want, tags)  # warm: page cache, maps
                    b = float("inf")
                    for _ in range(args.reps):
                        t0 = time.perf_counter()
                        _, ok = c.read_checked(want, tags)
                        b = min(b, time.perf_counter() - t0)
                    assert ok.all()
                    best[fmt] = b
                first = float("inf")  # a process's first read of these records: their CRCs computed
                for _ in range(args.reps):
                    c = caches[2]
                    fresh = TokenCache(c.folder, c.N, c.D, c.dtype, c.shard_records)
                    fresh._map(0)
                    t0 = time.perf_counter()
                    fresh.read_checked([locs[2][k] for k in pick], [hashes[k] for k in pick])
                    first = min(first, time.perf_counter() - t0)
                out.append({"dtype": dtype, "depth": depth, "bytes/record checked": caches[2].record_bytes,
                            "unchecked ms": 1e3 * best[1], "checked ms": 1e3 * best[2], "checked / unchecked": best[2] / best[1],
                            "first read ms": 1e3 * first, "first / unchecked": first / best[1]})
    table(out, f"token-cache reads, {args.records} records of {args.tokens} x {args.width}, fastest of {args.reps}")


if __name__ == "__main__":
    main()
