"""A torch ``Dataset`` of (image, text) pairs and the collator that tokenises a batch.

Images are decoded once (``preload``) and kept as uint8 (3, S, S) when they fit in memory;
otherwise each worker decodes on access. A pair may carry several texts (e.g. a product's
title and its caption): each epoch draws one of them, deterministically for a seed.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .preprocess import ImageError, ImageTransform, TextTokenizer
from .progress import progress as progress_bar

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pair:
    image: Path  # image file
    texts: tuple[str, ...]  # one or more texts describing it
    source: str = ""  # where the pair came from ("train.csv:12"), for error messages


@dataclass(frozen=True)
class PairError:
    source: str
    reason: str


class PairDataset(Dataset):
    def __init__(self, pairs: Sequence[Pair], transform: ImageTransform, seed: int = 0):
        if not pairs:
            raise ValueError("no (image, text) pairs to train on")
        self.pairs = list(pairs)
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self._pixels: torch.Tensor | None = None  # (n, 3, S, S) uint8 once preloaded

    def __len__(self) -> int:
        return len(self.pairs)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def text(self, i: int) -> str:
        texts = self.pairs[i].texts
        if len(texts) == 1:
            return texts[0]
        return texts[random.Random(self.seed * 1_000_003 + self.epoch * 7919 + i).randrange(len(texts))]

    def preload(self, progress: bool = True) -> list[PairError]:
        """Decode every image now; pairs whose image fails are dropped and returned as errors."""
        keep, pixels, errors = [], [], []
        for p in progress_bar(self.pairs, desc="decode", unit="img", enabled=progress):
            try:
                pixels.append(self.transform(self.transform.load(p.image)))
                keep.append(p)
            except ImageError as e:
                errors.append(PairError(p.source, str(e)))
        for e in errors:
            log.warning("skipped %s: %s", e.source, e.reason)
        if not keep:
            raise ValueError(f"none of the {len(self.pairs)} images could be decoded; first error: {errors[0].reason}")
        self.pairs = keep
        self._pixels = torch.stack(pixels)
        return errors

    def subset(self, indices: Sequence[int]) -> PairDataset:
        """These pairs (and their decoded pixels, when preloaded) as a dataset of their own."""
        out = PairDataset([self.pairs[i] for i in indices], self.transform, self.seed)
        if self._pixels is not None:
            out._pixels = self._pixels[torch.as_tensor(list(indices), dtype=torch.long)]
        return out

    def split_by_image(self, share: float, seed: int, at_most: int) -> tuple[list[int], list[int]]:
        """(kept, held out) pair indices: ``share`` of the distinct images (at most ``at_most``),
        drawn with ``seed``, held out with every pair that shows them."""
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(self.pairs):
            groups.setdefault(str(p.image), []).append(i)
        keys = sorted(groups)
        random.Random(f"{seed}-held-out").shuffle(keys)
        n = min(at_most, round(share * len(keys)))
        held = sorted(i for k in keys[:n] for i in groups[k])
        kept = sorted(i for k in keys[n:] for i in groups[k])
        return kept, held

    def pixels_all(self) -> torch.Tensor:
        """Every image as uint8 (n, 3, S, S); preloads when needed."""
        if self._pixels is None:
            self.preload(progress=False)
        return self._pixels

    def pixels(self, i: int) -> torch.Tensor:
        if self._pixels is not None:
            return self._pixels[i]
        return self.transform(self.transform.load(self.pairs[i].image))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        return self.pixels(i), self.text(i)


class PairCollator:
    """[(uint8 (3,S,S), text)] -> {"pixels": (B,3,S,S) uint8, "ids": (B,L), "mask": (B,L), "texts": [B strings]}."""

    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer = tokenizer

    def __call__(self, batch: list[tuple[torch.Tensor, str]]) -> dict[str, torch.Tensor]:
        pixels = torch.stack([b[0] for b in batch])
        texts = [b[1] for b in batch]
        ids, mask = self.tokenizer(texts)
        return {"pixels": pixels, "ids": ids, "mask": mask, "texts": texts}
