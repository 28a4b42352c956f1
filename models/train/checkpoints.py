"""Training checkpoints: ``OUT/checkpoints/step-XXXXXXX/``, a model folder plus the trainer's
state, safetensors and JSON only (no pickle).

``trainer.safetensors`` holds the optimizer's moments, the RNG states (torch's global one and
the stage's negative-drawing generator) and the weights of modules the trainer owns (the MLM
head: search never predicts words, so it is not part of the model). ``trainer.json`` holds the
optimizer's groups and the loop's position (``meta``: stage, step, epoch, the epoch's batch
plan, elapsed time, the config). ``trainer.json`` is written last and a folder is renamed into
place whole, so a checkpoint folder is complete or absent.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .. import factory
from ..factory import Bundle
from ..files import write_text_atomic

CHECKPOINTS = "checkpoints"
STATE_TENSORS, STATE_JSON = "trainer.safetensors", "trainer.json"


def save_state(folder: Path, opt: torch.optim.Optimizer, gen: torch.Generator, meta: dict, modules: dict[str, nn.Module]) -> None:
    sd = opt.state_dict()
    tensors = {f"opt.{i}.{k}": v.detach().cpu().contiguous() for i, st in sd["state"].items() for k, v in st.items()}
    for name, module in modules.items():
        tensors.update({f"{name}.{k}": v.detach().cpu().contiguous() for k, v in module.state_dict().items()})
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.negatives"] = gen.get_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, str(folder / STATE_TENSORS))
    groups = [dict(g) for g in sd["param_groups"]]
    write_text_atomic(folder / STATE_JSON, json.dumps({**meta, "param_groups": groups}, indent=1))


def read_meta(folder: Path) -> dict:
    """The loop's position saved with a checkpoint (without the optimizer's groups)."""
    meta = json.loads((folder / STATE_JSON).read_text())
    meta.pop("param_groups", None)
    return meta


def load_state(
    folder: Path, opt: torch.optim.Optimizer, gen: torch.Generator, restore: Callable[[dict[str, dict[str, torch.Tensor]]], None]
) -> dict:
    """Restore the optimizer and the RNG states; -> meta. ``restore`` is handed {module name:
    state dict} for the trainer-owned modules the checkpoint holds, first, so a checkpoint
    written with other settings is refused before anything is loaded."""
    tensors = load_file(str(folder / STATE_TENSORS))
    meta = json.loads((folder / STATE_JSON).read_text())
    state: dict[int, dict] = {}
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        head, rest = key.split(".", 1)
        if head == "opt":
            i, k = rest.split(".", 1)
            state.setdefault(int(i), {})[k] = v
        elif head != "rng":
            modules.setdefault(head, {})[rest] = v
    restore(modules)
    groups = meta.pop("param_groups")
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})
    torch.set_rng_state(tensors["rng.torch"])
    gen.set_state(tensors["rng.negatives"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return meta


def stage_of(folder: Path) -> str:
    return read_meta(folder).get("stage", "joint")  # checkpoints from before the stages were named: joint


def latest_checkpoint(out_dir: str | Path, stage: str | None = None) -> Path | None:
    """The newest complete checkpoint under ``out_dir`` (of ``stage`` only, when given)."""
    ckpts = sorted((Path(out_dir) / CHECKPOINTS).glob("step-*"))
    ckpts = [c for c in ckpts if (c / STATE_JSON).exists()]  # written last: a complete checkpoint
    if stage is not None:
        ckpts = [c for c in ckpts if stage_of(c) == stage]
    return ckpts[-1] if ckpts else None


def write_checkpoint(
    out_dir: Path, bundle: Bundle, opt, gen, meta: dict, keep: int, modules: dict[str, nn.Module], step: int
) -> Path:
    """``step`` names the folder: steps count on across stages, so folders sort in training order.
    The newest ``keep`` folders are kept, and the joint stage's newest one."""
    root = out_dir / CHECKPOINTS
    folder = root / f"step-{step:07d}"
    tmp = root / f".tmp-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    factory.save(bundle, tmp)
    save_state(tmp, opt, gen, meta, modules)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)  # a checkpoint folder is complete or absent
    # the newest `keep`, and the joint stage's newest: a later run with more epochs resumes there
    joint = latest_checkpoint(out_dir, "joint")
    for old in sorted(root.glob("step-*"))[:-keep]:
        if old != joint:
            shutil.rmtree(old, ignore_errors=True)
    return folder
