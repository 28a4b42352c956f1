"""Image tower: a ResNet built from torchvision's blocks, then self-attention over its grid.

The CNN's last feature map (B, C, h, w) becomes h*w grid tokens; a pooled token (the mean of
the grid) is prepended, a learned position embedding added, and ``num_layers`` pre-norm
self-attention blocks mix them. Token 0 after those blocks is the image's pooled state (the
ITC embedding is projected from it); all N tokens are what fusion cross-attends to.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

from .config import VisionConfig
from .layers import SelfAttentionBlock

BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


def _stage(block: type[BasicBlock | Bottleneck], in_ch: int, width: int, depth: int, stride: int) -> nn.Sequential:
    """One ResNet stage the way torchvision's ``ResNet._make_layer`` builds it."""
    out_ch = width * block.expansion
    downsample = None
    if stride != 1 or in_ch != out_ch:
        downsample = nn.Sequential(conv1x1(in_ch, out_ch, stride), nn.BatchNorm2d(out_ch))
    layers = [block(in_ch, width, stride, downsample)]
    layers += [block(out_ch, width) for _ in range(depth - 1)]
    return nn.Sequential(*layers)


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        if len(cfg.stage_widths) != len(cfg.stage_depths) or not cfg.stage_widths:
            raise ValueError("stage_widths and stage_depths must be non-empty and of equal length")
        if cfg.block not in BLOCKS:
            raise ValueError(f"unknown ResNet block {cfg.block!r}; expected one of {sorted(BLOCKS)}")
        block = BLOCKS[cfg.block]
        self.cfg = cfg
        stem: list[nn.Module] = [
            nn.Conv2d(3, cfg.stem_width, cfg.stem_kernel, stride=2, padding=cfg.stem_kernel // 2, bias=False),
            nn.BatchNorm2d(cfg.stem_width),
            nn.ReLU(inplace=True),
        ]
        if cfg.stem_pool:
            stem.append(nn.MaxPool2d(3, stride=2, padding=1))
        self.stem = nn.Sequential(*stem)
        stages, in_ch = [], cfg.stem_width
        for i, (width, depth) in enumerate(zip(cfg.stage_widths, cfg.stage_depths)):
            stages.append(_stage(block, in_ch, width, depth, stride=1 if i == 0 else 2))
            in_ch = width * block.expansion
        self.stages = nn.Sequential(*stages)
        self.proj = nn.Linear(in_ch, cfg.width)
        self.pos = nn.Parameter(torch.zeros(1, cfg.num_tokens, cfg.width))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList(
            SelfAttentionBlock(cfg.width, cfg.num_heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.num_layers)
        )
        self.norm = nn.LayerNorm(cfg.width)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, S, S) normalised -> image tokens (B, N, D_v)."""
        fmap = self.stages(self.stem(pixels))  # (B, C, h, w)
        grid = fmap.flatten(2).transpose(1, 2)  # (B, h*w, C)
        grid = self.proj(grid)  # (B, h*w, D_v)
        x = torch.cat([grid.mean(dim=1, keepdim=True), grid], dim=1)  # (B, N, D_v)
        if x.shape[1] != self.pos.shape[1]:
            raise ValueError(
                f"image of side {pixels.shape[-1]} gives {x.shape[1]} tokens; this model expects "
                f"{self.pos.shape[1]} (image_size={self.cfg.image_size}); resize with the model's preprocessing"
            )
        x = x + self.pos
        for block in self.blocks:
            x = block(x)
        return self.norm(x)  # (B, N, D_v)


def _torchvision_key(key: str) -> str | None:
    """A torchvision ResNet state-dict key as this tower names it (None: the classifier)."""
    head, _, rest = key.partition(".")
    if head == "fc":
        return None
    if head == "conv1":
        return f"stem.0.{rest}"
    if head == "bn1":
        return f"stem.1.{rest}"
    if head.startswith("layer") and head[5:].isdigit():
        return f"stages.{int(head[5:]) - 1}.{rest}"
    return key  # not a ResNet key: reported as unexpected


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a torch file read with ``weights_only=True`` (tensors
    and plain containers only: never arbitrary pickled objects)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image weights not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - an unpickling refusal or a corrupt file: say which file
        raise ValueError(f"{path} is not a torchvision-format state dict readable with weights_only=True ({e})") from e
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return sd


def load_torchvision_weights(tower: VisionTower, path: str | Path) -> None:
    """Load a torchvision ResNet's weights (``resnet50-*.pth`` or the same keys as safetensors)
    into the tower's CNN; the grid projection, position embedding and self-attention stay as
    they are. ValueError listing the missing, unexpected and mis-shaped keys otherwise."""
    sd = read_weights(path)
    mapped = {k2: v for k, v in sd.items() if (k2 := _torchvision_key(k)) is not None}
    own = {k: v for k, v in tower.state_dict().items() if k.startswith(("stem.", "stages."))}
    missing = sorted(own.keys() - mapped.keys())
    unexpected = sorted(mapped.keys() - own.keys())
    shapes = sorted(f"{k} {tuple(mapped[k].shape)} vs {tuple(own[k].shape)}" for k in own.keys() & mapped.keys() if mapped[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        preset = tower.cfg.preset or "the small default CNN"
        parts = [f"{name} ({len(keys)}): {', '.join(keys[:8])}{' …' if len(keys) > 8 else ''}"
                 for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)) if keys]
        raise ValueError(f"{path} does not fit the image tower ({preset}): " + "; ".join(parts))
    tower.load_state_dict(mapped, strict=False)
