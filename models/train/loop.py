"""The training loop both stages run through.

A ``Stage`` says what to train and how one step computes its loss; the loop owns the rest:
AdamW, linear warmup then cosine decay (on steps, or on elapsed time under a time budget),
gradient clipping, the finite-loss check, checkpoints and resume, and the progress bar. On
CPU with an epoch budget a run is bit-reproducible for a seed, resumed or not.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_model
from torch import nn

from .. import factory
from ..factory import Bundle
from ..progress import progress as progress_bar
from .checkpoints import load_state, write_checkpoint
from .config import TrainConfig

log = logging.getLogger(__name__)


class Stage(Protocol):
    """One stage of training, as the loop sees it."""

    name: str  # progress bar and errors ("train", "tune reranker")
    kind: str  # saved in checkpoints: which stage a resumed run continues ("joint", "rerank")
    epochs: int | None  # None: until the time budget runs out
    steps_per_epoch: int
    warmup_steps: int
    generator: torch.Generator  # the stage's own draws (negatives, masks); checkpointed
    checkpoint_at_end: bool  # write a checkpoint when the stage ends

    def start(self) -> None:
        """Set modes and build what every epoch reuses (before the optimizer exists)."""

    def param_groups(self) -> list[dict]:
        """AdamW groups, each with ``lr`` (its peak) and ``weight_decay``."""

    def clip_params(self) -> list[nn.Parameter]:
        """The parameters whose global gradient norm is clipped, in a fixed order."""

    def modules(self) -> dict[str, nn.Module]:
        """Modules the trainer owns beside the model (saved in checkpoints, not the model folder)."""

    def restore(self, modules: dict[str, dict[str, torch.Tensor]], folder: Path) -> None:
        """Load those modules' weights from a checkpoint (raise if the settings differ)."""

    def begin_epoch(self, epoch: int) -> None:
        """Per-epoch preparation (texts drawn anew, candidate lists)."""

    def plan(self, epoch: int) -> list[list[int]]:
        """The epoch's batches as pair indices (checkpointed: a resumed epoch keeps its plan)."""

    def batches(self, plan: list[list[int]]) -> Iterable[Any]:
        """The planned batches, ready for ``step``."""

    def step(self, batch: Any, step: int) -> tuple[dict[str, torch.Tensor], int]:
        """Forward one batch: ({"loss": tensor to minimise, other parts for the bar}, pairs in it)."""


@dataclass
class StageRun:
    steps: int
    epochs_done: float
    seconds: float
    stopped_by: str  # "epochs" | "minutes"
    losses: list[float] = field(default_factory=list)  # this process's steps


def lr_factor(progress: float, step: int, warmup_steps: int, min_ratio: float) -> float:
    """Linear warmup over ``warmup_steps``, then cosine from 1 to ``min_ratio`` as progress goes 0 -> 1."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(max(progress, 0.0), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def no_decay(name: str, p: nn.Parameter) -> bool:
    """Biases, norms, the temperature and position embeddings get no weight decay."""
    return p.dim() < 2 or name.endswith("logit_scale") or name.startswith("vision.pos")


def run_stage(
    stage: Stage,
    bundle: Bundle,
    cfg: TrainConfig,
    out_dir: Path,
    device: torch.device,
    budget: float | None = None,
    resume_from: Path | None = None,
    step_base: int = 0,
    meta_extra: dict | None = None,
) -> StageRun:
    """Run ``stage`` to its epoch count or its time ``budget`` (seconds), whichever ends first.

    ``resume_from``: a checkpoint this stage wrote; the run continues from its step, bit for bit
    with an epoch budget. ``step_base``: steps earlier stages took (checkpoint folders count on).
    """
    t0 = time.perf_counter()
    if resume_from is not None:
        load_model(bundle.model, str(resume_from / factory.WEIGHTS_NAME), device=str(device))
    stage.start()
    groups = stage.param_groups()
    for g in groups:
        g["base_lr"] = g["lr"]
    opt = torch.optim.AdamW(groups, lr=groups[0]["lr"], betas=(0.9, 0.98), eps=1e-6)
    clip = stage.clip_params()
    step, epoch, batch_in_epoch, elapsed_before = 0, 0, 0, 0.0
    plan: list[list[int]] | None = None
    if resume_from is not None:
        state = load_state(resume_from, opt, stage.generator, lambda modules: stage.restore(modules, resume_from))
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        elapsed_before, plan = state.get("elapsed", 0.0), state.get("epoch_batches")
        log.info("%s: resumed from %s (step %d, epoch %d)", stage.name, resume_from, step, epoch)
    total = stage.epochs * stage.steps_per_epoch if stage.epochs is not None else None
    run = StageRun(steps=step, epochs_done=0.0, seconds=0.0, stopped_by="epochs")
    pairs_seen, t_rate = 0, time.perf_counter()
    bar = progress_bar(total=total, initial=step, desc=stage.name, unit="step", enabled=cfg.progress)

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - t0

    def checkpoint() -> None:
        meta = {
            "stage": stage.kind, "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "elapsed": elapsed(),
            "epoch_batches": plan, "train_config": dataclasses.asdict(cfg), **(meta_extra or {}),
        }
        write_checkpoint(out_dir, bundle, opt, stage.generator, meta, cfg.keep_checkpoints, stage.modules(), step_base + step)

    while run.stopped_by == "epochs":
        if stage.epochs is not None and epoch >= stage.epochs:
            break
        if budget is not None and elapsed() >= budget:
            run.stopped_by = "minutes"
            break
        stage.begin_epoch(epoch)
        if plan is None:
            plan = stage.plan(epoch)
        for batch in stage.batches(plan[batch_in_epoch:]):
            if budget is not None and elapsed() >= budget:
                run.stopped_by = "minutes"
                break
            progress = step / total if total else 0.0
            if budget is not None:
                progress = max(progress, elapsed() / budget)
            factor = lr_factor(progress, step, stage.warmup_steps, cfg.min_lr_ratio)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * factor
            out, pairs = stage.step(batch, step)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(clip, cfg.grad_clip)
            opt.step()
            step += 1
            batch_in_epoch += 1
            loss = float(out["loss"].detach())
            if not math.isfinite(loss):
                raise FloatingPointError(f"{stage.name}: the loss became {loss} at step {step}; lower --lr or check the data")
            run.losses.append(loss)
            pairs_seen += pairs
            bar.update(1)
            bar.set_postfix(
                **{k: f"{float(v.detach()):.3f}" for k, v in out.items()},
                pairs_s=f"{pairs_seen / max(time.perf_counter() - t_rate, 1e-9):.0f}", refresh=False,
            )
            if cfg.checkpoint_every and (step_base + step) % cfg.checkpoint_every == 0:
                checkpoint()
        else:
            epoch += 1
            batch_in_epoch = 0
            plan = None
    bar.close()
    bundle.model.eval()
    if stage.checkpoint_at_end:
        checkpoint()
    run.steps = step
    run.epochs_done = epoch + batch_in_epoch / max(stage.steps_per_epoch, 1)
    run.seconds = elapsed()
    log.info("%s: %d steps (%.2f epochs) in %.0f s, stopped by %s", stage.name, step, run.epochs_done, run.seconds, run.stopped_by)
    return run
