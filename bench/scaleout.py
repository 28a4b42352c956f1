"""Scale-out: `ingest --engine ray` (1 and 2 actors) against the local ingest, and the sharded
index build against the one-process build, in one run.

    .venv/bin/python bench/scaleout.py [--n 600] [--vectors 1000000] [--shards 4] [--factory IVF1024,Flat]

Ingest: the demo catalog (``--n`` items, make demo's image size) into fresh SQLite collections
with an untrained default-size model: the local ingest (its default workers), then Ray with 1
and 2 CPU actors on a local cluster started by this script (2 CPUs). Printed: items/s, and the
ratio to the local run; the Ray runs' per-item overhead is (1/rate_ray - 1/rate_local).

Index build: ``--vectors`` clustered 128-d unit vectors (bench/common.py: model-like, not
uniform) built with ``--factory`` in one process (train + add) and as ``--shards`` Ray tasks
adding id ranges to one trained index, merged in memory (``indexer.distributed.merge_into``:
``reindex --engine ray --in-memory``) and merged on disk (``vectors.merge_ondisk`` into an
``.ivfdata`` file, searched memory-mapped through ``vectors.OnDiskIndex``: what ``reindex
--engine ray`` does for IVF factories), without SQL. Printed: build seconds, search ms per query
(1,000 held-out queries in one batch, nprobe 16; the on-disk lists are in the page cache after
the build, so this is the warm case) and recall@10 against exact search.
Not a test: these machines are noisy, compare ratios.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from common import clustered, demo_catalog  # also puts the repository on sys.path

from vtfusion.catalogs.sources import Columns
from vtfusion.indexer.collection import Collection
from vtfusion.indexer.distributed import connect, ingest_ray, merge_into
from vtfusion.indexer.ingest import ingest
from vtfusion.indexer.vectors import OnDiskIndex, merge_ondisk, read_ondisk


def _add_part(trained, ids, xb, out: str) -> str:
    import faiss

    index = faiss.deserialize_index(trained)
    index.add_with_ids(xb, ids)
    faiss.write_index(index, out)
    return out


def bench_ingest(ray, tmp: Path, n: int) -> None:
    _, catalog, model = demo_catalog(tmp, n)
    rows = []
    c = Collection.init(tmp / "local", model)
    r = ingest(c, catalog, Columns(), progress=False)
    local = r.items_per_s
    rows.append(("local (default workers)", r.added, r.seconds, local))  # + start-up, steady rate below
    rows[0] += (0.0, local)
    for actors in (1, 2):
        c = Collection.init(tmp / f"ray{actors}", model)
        commits: list[tuple[float, int]] = []  # (wall clock when an actor committed a batch, its rows), as the actor saw it
        t0 = time.time()
        r = ingest_ray(c, catalog, Columns(), actors=actors, progress=False,
                       on_batch=lambda out, commits=commits: commits.append((float(out["committed_at"]), int(out["rows"]))))
        commits.sort()
        # start-up (workers, model loads, the read) is before the first commit; the steady rate is what follows it
        steady = sum(n for _, n in commits[1:]) / max(1e-9, commits[-1][0] - commits[0][0]) if len(commits) > 1 else float("nan")
        rows.append((f"ray, {actors} actor{'s' if actors > 1 else ''}", r.added, r.seconds, r.items_per_s, commits[0][0] - t0, steady))
    print(f"\n## ingest: {n} demo items (train split), untrained default-size model, SQLite, 2 CPUs\n")
    print("| engine | added | seconds | items/s | vs local | start-up s (first batch) | items/s after it | vs local | overhead ms/item after start-up |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, added, secs, rate, start, steady in rows:
        over = (1 / steady - 1 / local) * 1000 if steady else float("nan")
        print(f"| {name} | {added} | {secs:.1f} | {rate:.1f} | {rate / local:.2f} | {start:.1f} | {steady:.1f} | {steady / local:.2f} | {over:+.1f} |")


def bench_index(ray, tmp: Path, n: int, shards: int, factory: str) -> None:
    import faiss

    xb, xq = clustered(n, 128, k=max(100, n // 1000), seed=0, nq=1000)
    ids = np.arange(n, dtype=np.int64)
    t = time.perf_counter()
    one = faiss.index_factory(128, f"IDMap2,{factory}", faiss.METRIC_INNER_PRODUCT)
    nlist = faiss.downcast_index(one.index).nlist if "IVF" in factory else 1
    sample = xb[np.random.default_rng(0).choice(n, size=min(n, 64 * nlist), replace=False)]
    one.train(sample)
    one.add_with_ids(xb, ids)
    t_one = time.perf_counter() - t

    t = time.perf_counter()
    base = faiss.index_factory(128, f"IDMap2,{factory}", faiss.METRIC_INNER_PRODUCT)
    base.train(sample)
    trained = faiss.serialize_index(base)
    add = ray.remote(num_cpus=1)(_add_part)
    bounds = np.linspace(0, n, shards + 1).astype(int)
    refs = [add.remote(trained, ids[a:b], xb[a:b], str(tmp / f"part{k}.faiss")) for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
    merged = faiss.deserialize_index(trained)
    for path in ray.get(refs):
        merge_into(merged, faiss.read_index(path))
    t_sharded = time.perf_counter() - t

    rows = [("one process", one, t_one), (f"{shards} Ray shards, merged in memory", merged, t_sharded)]
    if "IVF" in factory:
        t = time.perf_counter()
        base = faiss.index_factory(128, factory, faiss.METRIC_INNER_PRODUCT)  # bare IVF: the lists keep the ids
        base.train(sample)
        bare = faiss.serialize_index(base)
        refs = [add.remote(bare, ids[a:b], xb[a:b], str(tmp / f"bare{k}.faiss")) for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
        merge_ondisk(bare, ray.get(refs), tmp / "base")
        ondisk = OnDiskIndex(read_ondisk(tmp / "base.faiss"), "base.faiss", factory, 128)
        rows.append((f"{shards} Ray shards, merged on disk ({(tmp / 'base.ivfdata').stat().st_size / 2**20:.0f} MiB mapped)",
                     ondisk, time.perf_counter() - t))

    flat = faiss.IndexFlatIP(128)
    flat.add(xb)
    exact = flat.search(xq, 10)[1]
    print(f"\n## index build: {n:,} clustered 128-d vectors, {factory}, nprobe 16, 2 CPUs\n")
    print("| build | seconds | vs one process | search ms/query | recall@10 |")
    print("|---|---|---|---|---|")
    for name, index, secs in rows:
        t = time.perf_counter()
        if isinstance(index, OnDiskIndex):
            _, I = index.search(xq, 10, nprobe=16)
        else:
            if "IVF" in factory:
                faiss.extract_index_ivf(index).nprobe = 16
            _, I = index.search(xq, 10)
        ms = (time.perf_counter() - t) * 1000 / len(xq)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(I, exact)])
        print(f"| {name} | {secs:.1f} | {secs / t_one:.2f} | {ms:.3f} | {recall:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--vectors", type=int, default=1_000_000)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--factory", default="IVF1024,Flat")
    ap.add_argument("--skip-ingest", action="store_true")
    args = ap.parse_args()
    ray = connect("local", num_cpus=2)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if not args.skip_ingest:
            bench_ingest(ray, tmp, args.n)
        bench_index(ray, tmp, args.vectors, args.shards, args.factory)


if __name__ == "__main__":
    main()
