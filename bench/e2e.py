"""End-to-end query latency on a large collection: p50 / p95 of encode + filter + retrieve +
rerank@64 + metadata, against ITC-only search of the same collection, same run.

    .venv/bin/python bench/e2e.py [--n 100000] [--queries 100] [--model MODEL_DIR]

The collection has ``n`` items: a demo catalog really ingested (images, token cache), then
``n`` synthetic items written in bulk whose vectors are clustered and whose images and token
records are those real ones (bench/synthetic.py), so reranking reads real tokens and loads
real metadata while retrieval runs over ``n`` vectors in the automatic index.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from common import demo_catalog, table
from synthetic import bulk_collection, read_real

from vtfusion.indexer.collection import Collection
from vtfusion.indexer.ingest import ingest
from vtfusion.search.engine import SearchEngine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--model", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows, catalog, args.model = demo_catalog(tmp, 300, args.model, test_frac=0.0)
        real = Collection.init(tmp / "real", args.model, token_dtype="fp16")
        ingest(real, catalog, progress=False)
        t = time.perf_counter()
        c, _ = bulk_collection(tmp / "big", args.model, args.n, real=read_real(real), token_dtype="fp16")
        for shard in (tmp / "real" / "tokens").glob("shard-*.bin"):
            shutil.copy(shard, tmp / "big" / "tokens" / shard.name)
        print(f"{args.n:,} items ({c.indexes['image'].factory}) built in {time.perf_counter() - t:.1f} s; device {c.bundle.device}")
        engine = SearchEngine(c)
        texts = [r.texts[-1] for r in rows][: args.queries]
        engine.search(texts[0], k=10, rerank_depth=64)  # warm
        out = []
        for depth in (0, 64):
            per = {}
            for q in texts:
                t = time.perf_counter()
                res = engine.search(q, k=10, rerank_depth=depth)
                per.setdefault("total", []).append((time.perf_counter() - t) * 1e3)
                for s, v in res.timings_ms.items():
                    per.setdefault(s, []).append(v)
            row = {"search": "ITC only" if depth == 0 else f"rerank@{depth}"}
            for s in ("encode", "filter", "retrieve", "rerank", "metadata", "total"):
                row[f"{s} p50"] = float(np.median(per[s]))
            row["total p95"] = float(np.percentile(per["total"], 95))
            out.append(row)
        table(out, f"end-to-end query latency (ms), {len(texts)} text queries, k = 10")
        print(f"rerank@64 / ITC-only total p50: {out[1]['total p50'] / out[0]['total p50']:.1f}x")
        c.close()


if __name__ == "__main__":
    main()
