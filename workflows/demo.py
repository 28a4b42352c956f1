"""The demo pipeline behind ``vtfusion demo`` / ``make demo``: generate the synthetic catalog,
train a model on its training split, index that split into a collection, evaluate reranking
on the held-out split (the collection is only read), then search both ways.

``run_demo`` yields one ``DemoStep`` per stage as it finishes, so a front end prints each
result with the printer of the command that produces it alone (``vtfusion train``,
``ingest``, ``eval``, ``search``) while the next stage runs.
"""

from __future__ import annotations

import csv
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vtfusion.catalogs.demo import generate
from vtfusion.catalogs.sources import Columns
from vtfusion.indexer.collection import Collection
from vtfusion.indexer.ingest import ingest
from vtfusion.models.config import VisionConfig
from vtfusion.models.train import RerankConfig, TrainConfig
from vtfusion.models.train.mining import steps_per_epoch
from vtfusion.search.engine import SearchEngine
from vtfusion.search.evaluate import evaluate
from vtfusion.search.report import write_report
from vtfusion.workflows.train import train_catalog

EVAL_DEPTHS = (0, 16, 32)  # the demo shows the gain; `vtfusion eval` goes deeper (its default adds 64 and 128)
SEARCH_DEPTH = 32  # the demo's searches rerank ITC's top 32
MODEL_IMAGE_SIZE = 64  # the model's input side (the catalog's images are rendered at 128)


@dataclass
class DemoStep:
    kind: str  # "catalog" | "plan" | "train" | "collection" | "ingest" | "eval" | "search"
    title: str  # a heading for the step ("" for none)
    result: Any  # what the step's own function returned (see run_demo)


def run_demo(
    out: str | Path,
    n: int = 4000,
    epochs: int = 16,
    rerank_epochs: int = 8,
    minutes: float | None = None,
    text_tower: str = "scratch",
    device: str = "auto",
    seed: int = 0,
    progress: bool = True,
    image_size: int = MODEL_IMAGE_SIZE,
) -> Iterator[DemoStep]:
    """Run the pipeline under ``out`` (catalog/, model/, collection/, eval/).

    Steps and their results: catalog (``generate``'s counts, or None when ``out/catalog`` is
    already there and is reused), plan (what the run will do: pairs, steps per stage), train (``CatalogTrainReport``), collection (the new
    ``Collection``), ingest (``IngestReport``), eval (``(EvalReport, written files)``), then
    search, three times (``(query, SearchResult)``): two held-out captions text → image and the
    first held-out image image → text.
    """
    out = Path(out)
    catalog = out / "catalog"
    counts = None
    if not (catalog / "train.csv").exists():
        counts = generate(catalog, n=n, seed=seed, image_size=128, test_frac=0.2)
    yield DemoStep("catalog", "", counts)
    with open(catalog / "train.csv", encoding="utf-8", newline="") as f:
        n_train = sum(1 for _ in csv.DictReader(f))
    with open(catalog / "test.csv", encoding="utf-8", newline="") as f:
        n_test = sum(1 for _ in csv.DictReader(f))
    per_epoch = steps_per_epoch(n_train, TrainConfig.batch_size)
    yield DemoStep("plan", "", {"train_pairs": n_train, "test_pairs": n_test, "joint_steps": epochs * per_epoch,
                                "rerank_steps": rerank_epochs * per_epoch, "minutes": minutes})

    cfg = TrainConfig(epochs=epochs, minutes=minutes, device=device, seed=seed, progress=progress,
                      rerank=RerankConfig(epochs=rerank_epochs))
    report = train_catalog(catalog / "train.csv", out / "model", cfg, val_csv=catalog / "test.csv", text_tower=text_tower,
                           vision=VisionConfig(image_size=image_size))
    yield DemoStep("train", "", report)

    col = out / "collection"
    shutil.rmtree(col, ignore_errors=True)  # a fresh index for the freshly trained model
    c = Collection.init(col, out / "model")
    yield DemoStep("collection", "index the training catalog", c)
    yield DemoStep("ingest", "", ingest(c, catalog / "train.csv", Columns(), progress=progress))

    rep = evaluate(c, catalog / "test.csv", EVAL_DEPTHS, latency_queries=20, progress=progress, trec_dir=out / "eval" / "trec")
    files = write_report(rep, out / "eval")
    yield DemoStep("eval", "evaluate reranking on the held-out split (its images are encoded for the run; the collection is not changed)",
                   (rep, files))

    with open(catalog / "test.csv", encoding="utf-8", newline="") as f:
        held_out = [row for _, row in zip(range(2), csv.DictReader(f))]
    engine = SearchEngine(c)
    for row in held_out:
        yield DemoStep("search", f"text -> image: {row['caption']!r} (held-out item {row['id']})",
                       (row["caption"], engine.search(row["caption"], "image", 5, rerank_depth=SEARCH_DEPTH)))
    image = catalog / held_out[0]["image"]
    yield DemoStep("search", f"image -> text: {held_out[0]['image']} (its caption: {held_out[0]['caption']!r})",
                   (image, engine.search(image, "text", 5, rerank_depth=SEARCH_DEPTH)))
