"""Retrieval: QPS and recall@10 of the automatic index choice against exact search, same data,
same run.

    .venv/bin/python bench/retrieval.py [--sizes 100000,1000000] [--dim 128] [--nq 1000]

For each size: the index ``auto_factory`` picks (exact Flat under 20k, IVF above) is built
through ``VectorIndex`` as a collection builds it, then searched at several ``nprobe`` values;
the baseline is exact inner-product search (faiss IndexFlatIP) over the same vectors. Prints
batch QPS (all queries in one call), single-query QPS (one call per query, what a search does),
recall@10 vs exact, and the QPS ratio. Goal at 1M: recall@10 >= 0.95 at >= 10x exact QPS.
"""

from __future__ import annotations

import argparse

import faiss
import numpy as np

from common import Timer, clustered, recall_at, table

from vtfusion.indexer.vectors import VectorIndex, auto_factory


def single_qps(search, xq: np.ndarray, n: int = 200) -> float:
    with Timer() as t:
        for q in xq[:n]:
            search(q[None, :])
    return min(n, len(xq)) / t.s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--nq", type=int, default=1000)
    ap.add_argument("--nprobes", default="8,16,32,64")
    ap.add_argument("--per-cluster", type=int, default=100, help="database vectors per mixture cluster")
    ap.add_argument("--data", default="topics", choices=["topics", "diffuse"], help="vector distribution (bench/common.py)")
    ap.add_argument("--also", default="", help="comma-separated extra factory strings to compare, e.g. 'IVF1024,Flat;IVF2048,Flat' (';'-separated)")
    args = ap.parse_args()
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads, GPUs {faiss.get_num_gpus()}")
    for n in (int(s) for s in args.sizes.split(",")):
        xb, xq = clustered(n, args.dim, k=max(100, n // args.per_cluster), nq=args.nq, kind=args.data)
        ids = np.arange(n, dtype=np.int64)
        exact = faiss.IndexFlatIP(args.dim)
        exact.add(xb)
        with Timer() as t:
            D_true, I_true = exact.search(xq, 10)
        exact_qps = len(xq) / t.s
        exact_single = single_qps(lambda q: exact.search(q, 10), xq)
        rows = [{"index": "exact Flat", "nprobe": "-", "build s": 0.0, "recall@10": 1.0, "batch QPS": exact_qps,
                 "single QPS": exact_single, "x exact (batch)": 1.0, "x exact (single)": 1.0}]
        for factory in [auto_factory(n), *[f for f in args.also.split(";") if f]]:
            idx = VectorIndex(args.dim, factory)
            with Timer() as tb:
                idx.train(xb)
                idx.add(ids, xb)
            for nprobe in ([int(p) for p in args.nprobes.split(",")] if idx.nlist else [0]):
                idx.nprobe = nprobe or idx.nprobe
                with Timer() as t:
                    _, I = idx.search(xq, 10)
                qps = len(xq) / t.s
                sq = single_qps(lambda q: idx.search(q, 10), xq)
                label = factory + (" (auto)" if factory == auto_factory(n) else "")
                rows.append({"index": label, "nprobe": nprobe or "-", "build s": tb.s, "recall@10": recall_at(I, I_true),
                             "batch QPS": qps, "single QPS": sq, "x exact (batch)": qps / exact_qps, "x exact (single)": sq / exact_single})
            del idx
        table(rows, f"n = {n:,}, d = {args.dim}, {len(xq)} queries, {args.data} vectors (bench/common.py)")


if __name__ == "__main__":
    main()
