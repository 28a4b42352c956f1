"""A large collection without images through the model: SQL rows, stored vectors and the
change log written in bulk, indexes built by the collection itself. For benchmarks of the
SQL + FAISS layers at sizes the CPU cannot embed in a bench run (100k, 1M).

Item ``i`` gets metadata ``bucket = i % 100`` (so ``bucket < s`` selects s %) and ``price``.
Image paths and token-cache locations can point at a small set of real items (``real``), so
that reranking runs on real tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from sqlalchemy import insert

from common import clustered

from vtfusion.indexer.collection import Collection
from vtfusion.indexer.schema import Change, Embedding, Item, MetaColumn, utcnow


def bulk_collection(folder: Path, model: Path, n: int, seed: int = 0, real: list[dict] | None = None, token_dtype: str = "auto") -> tuple[Collection, np.ndarray]:
    """-> (collection, image vectors (n, E) in item-id order 1..n)."""
    c = Collection.init(folder, model, token_dtype=token_dtype)
    d = c.config.embed_dim
    xb, _ = clustered(n, d, k=max(100, n // 100), seed=seed)
    xt, _ = clustered(n, d, k=max(100, n // 100), seed=seed + 7)
    now = utcnow()
    with c.engine.begin() as conn:
        conn.execute(insert(MetaColumn.__table__), [{"name": "bucket", "kind": "number"}, {"name": "price", "kind": "number"}])
        for s in range(0, n, 20_000):
            e = min(n, s + 20_000)
            items = []
            for i in range(s, e):
                r = real[i % len(real)] if real else {}
                items.append({
                    "id": i + 1, "source": "synthetic", "external_id": f"s{i}", "image_path": r.get("image_path", ""),
                    "text": r.get("text", f"item {i}"), "content_hash": f"{i:064x}", "meta": {"bucket": i % 100, "price": float(i % 997)},
                    "status": "active", "token_shard": r.get("token_shard"), "token_offset": r.get("token_offset"), "created_at": now,
                })
            conn.execute(insert(Item.__table__), items)
            conn.execute(insert(Embedding.__table__), [
                {"item_id": i + 1, "modality": m, "vector": v[i].astype("<f4").tobytes()} for i in range(s, e) for m, v in (("image", xb), ("text", xt))
            ])
            conn.execute(insert(Change.__table__), [{"item_id": i + 1, "op": "add"} for i in range(s, e)])
    for m in ("image", "text"):
        c.build_index(m)
    return c, xb


def read_real(c: Collection) -> list[dict]:
    """Image path, text and token location of every item of a (small, really ingested) collection."""
    with c.Session() as s:
        return [
            {"image_path": r.image_path, "text": r.text, "token_shard": r.token_shard, "token_offset": r.token_offset}
            for r in s.query(Item).where(Item.status == "active").order_by(Item.id)
        ]


if __name__ == "__main__":
    print(json.dumps({"module": __doc__.splitlines()[0]}))
