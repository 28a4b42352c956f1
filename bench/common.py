"""Shared bench helpers: model-like clustered vectors, timing, table printing.

Random uniform high-dimensional vectors are a worst case for ANN indexes (no structure to
exploit); real image/text embeddings are clustered. ``clustered`` draws unit vectors around
``k`` random centres with per-cluster spread, and queries from the same mixture (never copies
of database vectors), which is how model embeddings behave.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def clustered(
    n: int, d: int = 128, k: int = 1000, seed: int = 0, nq: int = 0, kind: str = "topics"
) -> tuple[np.ndarray, np.ndarray]:
    """(xb (n, d), xq (nq, d)) float32 unit vectors from a mixture of ``k`` clusters.

    ``topics`` (default, model-like): cluster centres sit around k/10 topic centres (cosine
    ~0.5 between clusters of a topic), members around their centre at cosine ~0.75-0.95, as
    same-category / near-duplicate embeddings are. ``diffuse`` (stress case): independent
    centres, members at cosine ~0.5-0.8 to their centre and ~0.25-0.65 to each other: close
    to structureless in 128 dimensions, where no IVF or graph index does well.
    """
    rng = np.random.default_rng(seed)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    if kind == "topics":
        topics = unit(rng.standard_normal((max(1, k // 10), d)).astype(np.float32))
        centres = unit(topics[rng.integers(0, len(topics), size=k)] + rng.standard_normal((k, d)).astype(np.float32) * 0.09)
        spread = rng.uniform(0.03, 0.08, size=k).astype(np.float32)  # per-dimension sigma
    elif kind == "diffuse":
        centres = unit(rng.standard_normal((k, d)).astype(np.float32))
        spread = rng.uniform(0.06, 0.15, size=k).astype(np.float32)
    else:
        raise ValueError(f"kind must be topics or diffuse; got {kind!r}")

    def draw(m: int, r) -> np.ndarray:
        out = np.empty((m, d), np.float32)
        for s in range(0, m, 200_000):
            c = r.integers(0, k, size=min(200_000, m - s))
            out[s : s + len(c)] = unit(centres[c] + r.standard_normal((len(c), d)).astype(np.float32) * spread[c, None])
        return out

    return draw(n, rng), draw(nq, np.random.default_rng(seed + 1))


def demo_catalog(
    tmp: Path, n: int, model: Path | None = None, test_frac: float = 0.2, jpeg_side: int = 0
) -> tuple[list, Path, Path]:
    """The demo catalog generated under ``tmp/cat`` -> (its train.csv rows, train.csv, a model
    folder: ``model``, or an untrained default-size model saved under ``tmp/model``).

    ``jpeg_side``: the images re-saved as JPEGs of that side (quality 90), as product photos
    come, instead of the demo's 128-pixel PNGs."""
    from PIL import Image

    from vtfusion.catalogs.sources import read_csv
    from vtfusion.catalogs.demo import generate
    from vtfusion.models import factory

    generate(tmp / "cat", n=n, seed=0, test_frac=test_frac)
    csv = tmp / "cat" / "train.csv"
    if jpeg_side:
        for png in (tmp / "cat" / "images").glob("*.png"):
            img = Image.open(png).convert("RGB").resize((jpeg_side, jpeg_side), Image.Resampling.BICUBIC)
            img.save(png.with_suffix(".jpg"), "JPEG", quality=90)
            png.unlink()
        for part in ("train.csv", "test.csv"):
            f = tmp / "cat" / part
            f.write_text(f.read_text().replace(".png,", ".jpg,"))
    rows, _ = read_csv(csv)
    if model is None:
        model = tmp / "model"
        factory.save(factory.build_scratch([t for r in rows for t in r.texts]), model)
    return rows, csv, model


def recall_at(I: np.ndarray, I_true: np.ndarray, k: int = 10) -> float:
    """Mean |top-k ∩ true top-k| / k."""
    return float(np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(I, I_true)]))


class Timer:
    def __enter__(self):
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.s = time.perf_counter() - self.t


def table(rows: list[dict], title: str = "") -> None:
    if title:
        print(f"\n{title}")
    if not rows:
        return
    cols = list(rows[0])
    fmt = [max(len(c), *(len(_f(r[c])) for r in rows)) for c in cols]
    print("  ".join(c.rjust(w) for c, w in zip(cols, fmt)))
    for r in rows:
        print("  ".join(_f(r[c]).rjust(w) for c, w in zip(cols, fmt)))


def _f(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)
