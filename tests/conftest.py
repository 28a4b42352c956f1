"""Shared fixtures: tiny models with odd sizes (shape bugs fail loudly) and small generated catalogs."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach a hub
torch.set_num_threads(2)

from indexer.demo import generate  # noqa: E402
from models import checkpoint  # noqa: E402
from models.config import VisionConfig  # noqa: E402

TINY_VISION = VisionConfig(
    image_size=37, stem_width=6, stage_widths=(6, 10), stage_depths=(1, 1), width=18, num_heads=3, num_layers=1
)
TEXTS = [
    "a large red striped mug to the left of a small blue plain sneaker",
    "a small blue plain mug to the left of a large red striped sneaker",
    "a big green dotted hat",
    "a little yellow checkered bag on a plain background",
]


def tiny_bundle(texts=TEXTS, **kw) -> checkpoint.Bundle:
    torch.manual_seed(0)
    return checkpoint.build_scratch(
        texts, vision=TINY_VISION, vocab_size=120, hidden_size=20, num_layers=1, num_heads=2, max_length=24,
        embed_dim=14, **kw,
    )


@pytest.fixture
def bundle() -> checkpoint.Bundle:
    b = tiny_bundle()
    b.model.eval()
    return b


@pytest.fixture(scope="session")
def small_catalog(tmp_path_factory):
    out = tmp_path_factory.mktemp("catalog")
    generate(out, n=64, seed=3, image_size=48)
    return out
