"""Filtered retrieval: recall@10 against an exact oracle and latency at 1 %, 10 %, 30 % and
100 % selectivity, on a synthetic collection (SQLite, the automatic index), same run.

    .venv/bin/python bench/filtered.py [--n 100000] [--nq 200]

Each query runs the engine's filter stage (expression -> SQL -> allowed ids) and retrieval
stage (exact over stored vectors for allowed sets up to EXACT_FILTER_MAX, else the IVF index
with an id selector and selectivity-scaled nprobe); the oracle is numpy over the allowed
vectors. The first query of an expression runs its SQL; later ones reuse the id set until the
collection changes ("filter ms first" vs "p50"). Goal: recall@10 >= 0.95 at every selectivity.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from common import clustered, table
from synthetic import bulk_collection

from vtfusion.models import factory
from vtfusion.search.engine import EXACT_FILTER_MAX, SearchEngine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--nq", type=int, default=200)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bundle = factory.build_scratch(["a red mug", "a blue hat"], vocab_size=60)
        factory.save(bundle, tmp / "model")
        t = time.perf_counter()
        c, xb = bulk_collection(tmp / "col", tmp / "model", args.n)
        print(f"built a {args.n:,}-item collection in {time.perf_counter() - t:.1f} s; image index {c.indexes['image'].factory}")
        _, xq = clustered(0, xb.shape[1], k=max(100, args.n // 100), nq=args.nq)  # same mixture, fresh draws
        engine = SearchEngine(c)
        rows = []
        for pct in (1, 10, 30, 100):
            where = None if pct == 100 else f"bucket < {pct}"
            allowed_all = np.arange(1, args.n + 1)[(np.arange(args.n) % 100) < pct]
            rec, f_ms, r_ms = [], [], []
            for q in xq:
                t = time.perf_counter()
                allowed = engine._allowed(where)
                t1 = time.perf_counter()
                D, I = engine._retrieve("image", q[None, :], 10, allowed)
                t2 = time.perf_counter()
                f_ms.append((t1 - t) * 1e3)
                r_ms.append((t2 - t1) * 1e3)
                sims = xb[allowed_all - 1] @ q
                truth = allowed_all[np.argsort(-sims)[:10]]
                rec.append(len(set(I[I >= 0].tolist()) & set(truth.tolist())) / 10)
            path = "ANN" if where is None or len(allowed_all) > EXACT_FILTER_MAX else "exact"
            rows.append({"selectivity %": pct, "allowed": len(allowed_all), "path": path, "recall@10": float(np.mean(rec)),
                         "min recall": float(np.min(rec)), "filter ms first": f_ms[0], "filter ms p50": float(np.median(f_ms)), "retrieve ms p50": float(np.median(r_ms)),
                         "total ms p95": float(np.percentile(np.add(f_ms, r_ms), 95))})
        table(rows, f"filtered retrieval, n = {args.n:,}, {args.nq} queries, top 10")
        c.close()


if __name__ == "__main__":
    main()
