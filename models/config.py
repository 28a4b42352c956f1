"""Configuration dataclasses: one per part, composed into :class:`ModelConfig`.

Saved as ``config.json`` beside ``model.safetensors``; a saved folder is rebuilt from this file
alone (the text tower's full transformers config is stored inline, so a model built from a
pretrained tower loads without that tower's original files).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .files import write_text_atomic

CONFIG_NAME = "config.json"
FORMAT_VERSION = 3  # 2: fusion.itm_pool (format 1 configs read as "cls"); 3: fusion.mode; older vtfusion refuses newer formats clearly


# torchvision's ResNets: block and blocks per stage (stage widths 64/128/256/512, 7x7 stem, max-pool)
RESNETS = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
}


@dataclass(frozen=True)
class VisionConfig:
    kind: str = "resnet"  # "resnet" (the native tower below) or "clip" (a CLIP ViT; see ModelConfig.clip)
    image_size: int = 64  # square input side in pixels (after preprocessing)
    patch_size: int = 0  # ViT patch side (kind "clip"); the grid is image_size // patch_size
    resize: str = "letterbox"  # preprocessing: "letterbox" (pad to square), "squash" (BLIP), "crop" (CLIP)
    resample: str = "bilinear"  # PIL resampling filter for that resize: "bilinear" or "bicubic"
    block: str = "basic"  # torchvision ResNet block: "basic" (ResNet-18/34) or "bottleneck" (50+)
    stem_width: int = 32  # channels of the stem convolution
    stage_widths: tuple[int, ...] = (32, 64, 128)  # channels per ResNet stage (before expansion)
    stage_depths: tuple[int, ...] = (1, 1, 1)  # blocks per stage
    stem_pool: bool = False  # the 3x3/2 max-pool after the stem (True in torchvision ResNets)
    stem_kernel: int = 3  # side of the stem convolution (stride 2): 3 here, 7 in torchvision's ResNets
    preset: str = ""  # the torchvision architecture the CNN follows ("resnet50", ...; "" for the small default)
    weights_from: str = ""  # the file the CNN's weights were loaded from (provenance; the CNN then trains as pretrained)
    width: int = 128  # D_v: width of the image tokens handed to fusion and the token cache
    num_layers: int = 1  # self-attention layers over the image tokens
    num_heads: int = 4  # heads in those layers
    mlp_ratio: float = 4.0  # FFN hidden size / width
    dropout: float = 0.0  # dropout inside the self-attention layers
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # per-channel normalisation
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @classmethod
    def resnet(cls, name: str, **overrides) -> VisionConfig:
        """The CNN of torchvision's ``resnet18/34/50/101`` (7x7 stem, max-pool, four stages; no
        classifier), then this tower's grid tokens and self-attention as usual."""
        if name not in RESNETS:
            raise ValueError(f"unknown image tower {name!r}; expected one of {', '.join(RESNETS)}")
        block, depths = RESNETS[name]
        return cls(**{"block": block, "stage_depths": depths, "stage_widths": (64, 128, 256, 512), "stem_width": 64,
                      "stem_kernel": 7, "stem_pool": True, "preset": name, **overrides})

    @property
    def grid(self) -> int:
        """Side of the token grid: total stride is 2 (stem) x 2 (pool) x 2 per stage after the first
        for the ResNet; the patch size for a ViT."""
        if self.patch_size:
            return self.image_size // self.patch_size
        stride = 2 * (2 if self.stem_pool else 1) * 2 ** (len(self.stage_widths) - 1)
        return -(-self.image_size // stride)  # ceil: convs with padding round up

    @property
    def num_tokens(self) -> int:
        """N: one pooled token followed by the grid tokens."""
        return 1 + self.grid * self.grid


@dataclass(frozen=True)
class TextConfig:
    source: str = "scratch"  # "scratch" (built from `bert`), "pretrained" (weights came from a folder), "clip"
    pretrained_from: str = ""  # where pretrained weights were read from (provenance only)
    bert: dict[str, Any] = field(default_factory=dict)  # transformers BertConfig.to_dict()
    pooling: str = "mean"  # "mean" over real tokens or "cls"
    max_length: int = 32  # L: tokenizer truncation length
    # the design's recurrent text tower instead of BERT (models/text.py RecurrentTextTower):
    # {"kind": "gru" | "lstm", "vocab_size", "hidden_size", "rnn_layers", "attn_layers", "num_heads", "pad_token_id"}
    recurrent: dict[str, Any] = field(default_factory=dict)


FUSION_MODES = ("text", "mutual")


@dataclass(frozen=True)
class FusionConfig:
    num_layers: int = 2  # fusion layers: text self-attention + cross-attention + FFN
    num_heads: int = 4  # heads (the width is the text tower's hidden size)
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    # what the ITM head reads: "mean" over the real text tokens (each word's evidence counts
    # directly; the README's model section has the comparison) or the [CLS] position as
    # ALBEF/BLIP do ("cls"; models saved before this field existed)
    itm_pool: str = "mean"
    # "text": text tokens attend to the image (ALBEF/BLIP); "mutual": the design's two-way layer,
    # where the text update is the sum of text self-attention and text -> image attention and
    # the image tokens attend to the text too (layers.MutualFusionBlock)
    mode: str = "text"

    def __post_init__(self):
        if self.itm_pool not in ("mean", "cls"):
            raise ValueError(f"fusion.itm_pool must be 'mean' or 'cls'; got {self.itm_pool!r}")
        if self.mode not in FUSION_MODES:
            raise ValueError(f"fusion.mode must be one of {', '.join(FUSION_MODES)}; got {self.mode!r}")


@dataclass(frozen=True)
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    embed_dim: int = 128  # E: width of the shared unit-norm ITC space
    init_temperature: float = 0.07  # ITC softmax temperature at initialisation (learned)
    clip: dict[str, Any] = field(default_factory=dict)  # transformers CLIPConfig.to_dict() when the towers are CLIP's
    # reranking's ITM weight per rerank depth ({"16": w, "32": w, "64": w}), chosen at the end of
    # training on held-out pairs so that reranking keeps ITC's R@5 and R@10 (models/calibrate.py);
    # {}: never calibrated, the plain sum (weight 1)
    itm_weights: dict[str, float] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        for depth, w in self.itm_weights.items():  # a NaN or negative weight would sort results silently wrong
            if not (str(depth).isdigit() and int(depth) > 0 and isinstance(w, (int, float)) and 0 <= w < float("inf")):
                raise ValueError(f"itm_weights must map rerank depths (positive integers) to finite weights >= 0; got {depth!r}: {w!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        version = d.get("format_version", FORMAT_VERSION)
        if version > FORMAT_VERSION:
            raise ValueError(
                f"model config format {version} is newer than this vtfusion understands "
                f"({FORMAT_VERSION}); upgrade vtfusion"
            )
        vision = dict(d.get("vision", {}))
        for key in ("stage_widths", "stage_depths", "mean", "std"):
            if key in vision:
                vision[key] = tuple(vision[key])
        return cls(
            vision=VisionConfig(**vision),
            text=TextConfig(**d.get("text", {})),
            fusion=FusionConfig(**{"itm_pool": "cls", **d.get("fusion", {})}),  # older configs: [CLS]
            embed_dim=d.get("embed_dim", 128),
            init_temperature=d.get("init_temperature", 0.07),
            clip=d.get("clip", {}),
            itm_weights={str(k): float(v) for k, v in d.get("itm_weights", {}).items()},
            format_version=FORMAT_VERSION,  # read into the current format (saved again as such)
        )

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / CONFIG_NAME
        return write_text_atomic(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> ModelConfig:
        return cls.from_dict(json.loads((Path(folder) / CONFIG_NAME).read_text()))
