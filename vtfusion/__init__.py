"""vtfusion: vision-text search with a cross-attention fusion model, FAISS indexes over SQL
metadata and ITM reranking. This module is the public Python API:

    import vtfusion

    col = vtfusion.open_collection("demo-run/collection")
    res = vtfusion.query(col, "a red striped mug", k=5)          # text -> images
    res = vtfusion.query(col, image="photo.jpg", target="text")  # image -> texts
    vtfusion.ingest(col, "catalog.csv")
    report = vtfusion.evaluate(col, "pairs.csv", depths=[0, 32])

The packages underneath (``vtfusion.models``, ``vtfusion.catalogs``, ``vtfusion.indexer``,
``vtfusion.search``, ``vtfusion.workflows``, ``vtfusion.ui``) are importable too; what is named here is what stays stable. Everything heavy
(torch, transformers, faiss) is imported on first use, not by ``import vtfusion``.
"""

from __future__ import annotations

from importlib import metadata as _metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

try:
    __version__ = _metadata.version("vtfusion")
except _metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

if TYPE_CHECKING:
    from vtfusion.indexer.collection import Collection
    from vtfusion.indexer.ingest import IngestReport
    from vtfusion.models.factory import Bundle
    from vtfusion.search.engine import SearchEngine
    from vtfusion.search.report import EvalReport
    from vtfusion.search.results import SearchResult

__all__ = [
    "__version__", "open_collection", "create_collection", "ingest", "query", "evaluate", "load_model",
    "Collection", "SearchEngine",
]


def open_collection(folder: str | Path) -> Collection:
    """Open a collection folder (created by ``vtfusion init`` or :func:`create_collection`)."""
    from vtfusion.indexer.collection import Collection

    return Collection.open(folder)


def create_collection(folder: str | Path, model: str | Path, **options: Any) -> Collection:
    """Create a collection in ``folder`` for ``model`` (a model folder, ``hf:<BLIP id or
    folder>`` or ``clip:<CLIP id or folder>``). ``options``: ``db_url``, ``index_factory``,
    ``token_dtype``, … as ``vtfusion init`` takes them."""
    from vtfusion.indexer.collection import Collection

    return Collection.init(folder, model, **options)


def ingest(collection: Collection, source: str | Path, **options: Any) -> IngestReport:
    """Add a catalog (CSV / JSONL / Parquet file or folder, or a folder of images) to the
    collection; returns counts of added, duplicate and failed rows. ``options`` as
    ``vtfusion.indexer.ingest.ingest`` (``cols``, ``batch_size``, ``workers``, ``progress``, …)."""
    from vtfusion.indexer.ingest import ingest as _ingest

    return _ingest(collection, source, **options)


def query(
    collection: Collection, text: str | None = None, *, image: str | Path | None = None, item: str | int | None = None,
    **options: Any,
) -> SearchResult:
    """Search the collection with a text, with an image given as ``image=`` (a path or a PIL
    image), or with an indexed item given as ``item=`` (its catalog id as search results show
    it, ``"#<item id>"``, or an ``int`` item id: more like this). A string passed as ``text`` is
    always a text query, even one that names an existing file. (Named ``query``, not ``search``:
    ``vtfusion.search`` is the package.) ``options``: ``target`` ("image" or "text"), ``k``,
    ``where``, ``rerank_depth``, ``fusion``, ``nprobe``. One engine per collection is kept (its
    filter cache survives between calls)."""
    from vtfusion.search.engine import ItemQuery, SearchEngine

    if sum(q is not None for q in (text, image, item)) != 1:
        raise ValueError("query takes a text, image= or item=, exactly one of them")
    engine = getattr(collection, "_api_engine", None)  # lives as long as the collection object
    if engine is None:
        engine = collection._api_engine = SearchEngine(collection)
    if item is not None:
        return engine.search(ItemQuery(item), **options)
    if image is not None:
        from PIL import Image

        q = image if isinstance(image, Image.Image) else Path(image)
    else:
        q = str(text)
    return engine.search(q, **options)


def evaluate(collection: Collection, pairs: str | Path, **options: Any) -> EvalReport:
    """Reranking evaluation on a pairs file (see ``vtfusion eval``); the collection is only
    read. The ``EvalReport``'s ``t2i`` / ``i2t`` hold each stage's metrics; ``to_dict()`` is
    report.json. ``options``: ``depths``, ``fusion``, ``gallery`` ("pairs" or "collection"), ``where``,
    ``latency_queries``, ``trec_dir``, ``progress``, …"""
    from vtfusion.search.evaluate import evaluate as _evaluate

    return _evaluate(collection, pairs, **options)


def load_model(ref: str | Path, device: str = "cpu") -> Bundle:
    """A model with its tokenizer and image transform (``Bundle``; ``save_pretrained(folder)``
    writes it back): a folder written by ``vtfusion train`` or ``save_pretrained``, the Hub id
    of one, ``hf:<BLIP id or folder>`` or ``clip:<CLIP id or folder>``."""
    from vtfusion.models.factory import load

    return load(ref, device)


def __getattr__(name: str):
    if name == "Collection":
        from vtfusion.indexer.collection import Collection

        return Collection
    if name == "SearchEngine":
        from vtfusion.search.engine import SearchEngine

        return SearchEngine
    raise AttributeError(f"module 'vtfusion' has no attribute {name!r}")
