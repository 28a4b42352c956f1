"""The training wing: ``train()`` runs the joint stage, then the reranker stage, through one loop.

| module | holds |
|---|---|
| ``config.py`` | ``TrainConfig`` (what the run shares) with ``JointConfig`` and ``RerankConfig`` |
| ``loop.py`` | the loop: optimizer, schedule, clipping, finite-loss check, checkpoints, progress |
| ``joint.py`` | the joint stage (towers + fusion; ITC + ITM, optionally MLM) and ``train_step`` |
| ``rerank.py`` | the reranker stage (fusion layers alone on ITC's own candidates) |
| ``mining.py`` | neighbour-mined batches, ITC candidate lists, negatives drawn from them |
| ``checkpoints.py`` | checkpoint folders and the trainer state (safetensors + JSON, no pickle) |

The objectives are in ``models/losses.py``. The measurements behind the defaults are in
the README's model section.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import factory
from ..data import PairDataset
from ..factory import Bundle
from ..files import write_text_atomic
from ..negatives import WordSlots
from .checkpoints import CHECKPOINTS, latest_checkpoint, read_meta
from .config import CALIBRATION_MAX, CALIBRATION_MIN, JointConfig, RerankConfig, TrainConfig
from .joint import JointStage
from .loop import lr_factor, run_stage
from .rerank import RerankStage

__all__ = ["JointConfig", "RerankConfig", "TrainConfig", "TrainResult", "latest_checkpoint", "lr_factor", "train"]
log = logging.getLogger(__name__)
SLOTS_FILE = "word_slots.json"
CALIBRATION_FILE = "calibration.json"


@dataclass
class TrainResult:
    steps: int
    epochs_done: float
    seconds: float
    losses: list[float] = field(default_factory=list)  # total loss per joint step (this process)
    stopped_by: str = "epochs"  # "epochs" | "minutes"
    rerank_steps: int = 0  # reranker-stage steps
    rerank_seconds: float = 0.0
    rerank_losses: list[float] = field(default_factory=list)
    calibration: dict | None = None  # calibrate.choose_weights' answer and the pairs it used


def calibrate_reranking(bundle: Bundle, held_out: PairDataset) -> dict:
    """Reranking's ITM weight per depth, chosen on pairs training never saw (models/calibrate.py)."""
    from ..calibrate import candidate_scores, choose_weights

    t0 = time.perf_counter()
    texts = [held_out.text(i) for i in range(len(held_out))]
    cands = candidate_scores(bundle, held_out.pixels_all(), texts)
    out = choose_weights(cands, float(bundle.model.logit_scale_value().detach()))
    out.update(pairs=len(held_out), seconds=round(time.perf_counter() - t0, 1))
    log.info("calibration on %d held-out pairs: ITM weight per rerank depth %s", len(held_out), out["weights"])
    return out


def train(bundle: Bundle, dataset: PairDataset, out_dir: str | Path, cfg: TrainConfig, resume: bool = False) -> TrainResult:
    """Train ``bundle.model`` in place on ``dataset``: the joint stage, then (``cfg.rerank.epochs``)
    the reranker stage; writes the final model folder to ``out_dir``.

    ``resume``: continue from the newest checkpoint under ``out_dir/checkpoints``, in whichever
    stage it was written. With a time budget (``cfg.minutes``) the joint stage gets all but
    ``cfg.rerank.share`` of it and the reranker stage gets the rest plus what the joint stage left.
    With ``cfg.calibration`` that share of the images is held out of both stages and used at the
    end to choose reranking's ITM weight per depth (saved in the model's config).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = factory.resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = bundle.model.to(device)
    if device.type == "cuda":
        model.vision.to(memory_format=torch.channels_last)
    ckpt = latest_checkpoint(out_dir) if resume else None
    if resume and ckpt is None:
        log.warning("--resume: no checkpoint under %s; starting from scratch", out_dir / CHECKPOINTS)
    meta = read_meta(ckpt) if ckpt is not None else {}
    in_rerank = meta.get("stage", "joint") == "rerank"  # (checkpoints from before the stages were named: joint)
    if in_rerank:
        steps, epochs_done, _, stopped_by = meta["joint"]
        if stopped_by == "epochs" and cfg.epochs is not None and epochs_done < cfg.epochs:
            # more joint epochs than the run that wrote it: continue the joint stage from its last checkpoint
            ckpt, in_rerank = latest_checkpoint(out_dir, "joint"), False
            if ckpt is None:
                raise ValueError(f"--resume with --epochs {cfg.epochs}: {out_dir / CHECKPOINTS} holds no checkpoint of the joint stage to continue from")
    held_out = None
    if cfg.calibration:
        kept, held = dataset.split_by_image(cfg.calibration, cfg.seed, CALIBRATION_MAX)
        if len(held) < CALIBRATION_MIN or len(kept) < 2:
            log.warning("calibration: %d held-out pairs is too few (at least %d); reranking keeps the plain sum", len(held), CALIBRATION_MIN)
        else:
            dataset, held_out = dataset.subset(kept), dataset.subset(held)
    slots = None
    if cfg.text_negatives:  # which words may stand in for which, learned from the training texts
        slots = WordSlots.learn([p.texts for p in dataset.pairs])
        log.info("text negatives: %d word slots learned from the captions (%s)", len(slots.slots), SLOTS_FILE)
    total_budget = cfg.minutes * 60 if cfg.minutes is not None else None
    result = TrainResult(steps=0, epochs_done=0.0, seconds=0.0)
    if in_rerank:  # the joint stage finished before that checkpoint: its summary is in it
        result.steps, result.epochs_done, result.seconds, result.stopped_by = meta["joint"]
    else:
        budget = total_budget * (1 - cfg.rerank.share) if total_budget is not None and cfg.rerank.epochs else total_budget
        joint = run_stage(JointStage(bundle, dataset, cfg, device, slots), bundle, cfg, out_dir, device, budget=budget, resume_from=ckpt)
        result.steps, result.epochs_done, result.seconds, result.stopped_by = joint.steps, joint.epochs_done, joint.seconds, joint.stopped_by
        result.losses = joint.losses
    if cfg.rerank.epochs:
        # from the joint stage's end; a run resumed before the reranker stage wrote a checkpoint
        # redoes it (bit for bit with an epoch budget)
        t_tune = time.perf_counter()
        left = None if total_budget is None else total_budget - result.seconds
        if left is None or left > 0:
            summary = {"joint": [result.steps, result.epochs_done, result.seconds, result.stopped_by]}
            tuned = run_stage(
                RerankStage(bundle, dataset, cfg, device, slots), bundle, cfg, out_dir, device, budget=left,
                resume_from=ckpt if in_rerank else None, step_base=result.steps, meta_extra=summary,
            )
            result.rerank_steps, result.rerank_losses = tuned.steps, tuned.losses
            result.rerank_seconds = time.perf_counter() - t_tune
    if held_out is not None and bundle.has_itm:
        result.calibration = calibrate_reranking(bundle, held_out)
        bundle.model.cfg = dataclasses.replace(bundle.model.cfg, itm_weights=result.calibration["weights"])
    factory.save(bundle, out_dir)
    if result.calibration is not None:
        write_text_atomic(out_dir / CALIBRATION_FILE, json.dumps(result.calibration, indent=2) + "\n")
    if slots is not None:  # what the negatives were made from, for people (the model never reads it)
        slots.save(out_dir / SLOTS_FILE)
    return result
