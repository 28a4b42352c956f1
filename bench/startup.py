"""Start time of each ``vtfusion`` command that needs no model (issue 20: under 1 s).

Each command runs as a fresh process ``--repeats`` times (alternated, median reported) on a
small collection built first. The baseline, measured in the same run: a process that only
imports torch and transformers, what every command paid before they were imported lazily.

    .venv/bin/python bench/startup.py [--collection DIR] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PY = sys.executable


def _time(argv: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - t


def _collection(tmp: Path) -> Path:
    """A small collection: the demo catalog (40 items) under a tiny freshly built model."""
    import torch

    import vtfusion
    from vtfusion.catalogs.demo import generate
    from vtfusion.models import factory
    from vtfusion.models.config import VisionConfig

    generate(tmp / "cat", n=40, seed=0, image_size=48)
    torch.manual_seed(0)
    b = factory.build_scratch(["a red mug", "a blue hat"], vision=VisionConfig(image_size=32, stem_width=8, stage_widths=(8, 16), stage_depths=(1, 1), width=32, num_heads=2),
                              vocab_size=120, hidden_size=32, num_layers=1, num_heads=2, embed_dim=16)
    factory.save(b, tmp / "model")
    col = vtfusion.create_collection(tmp / "col", tmp / "model")
    vtfusion.ingest(col, tmp / "cat" / "train.csv", workers=0, progress=False)
    return tmp / "col"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--collection", type=Path, help="an existing collection (default: build a small one)")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        col = a.collection or _collection(Path(tmp))
        cli = [PY, "-m", "vtfusion.ui.cli"]
        runs = {
            "baseline: import torch, transformers": [PY, "-c", "import torch, transformers"],
            "--version": [*cli, "--version"],
            "--help": [*cli, "--help"],
            "stats": [*cli, "stats", str(col)],
            "errors": [*cli, "errors", str(col)],
            "verify": [*cli, "verify", str(col)],
            "delete --dry-run": [*cli, "delete", str(col), "--ids", "nothing", "--dry-run"],
        }
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(a.repeats):
            for name, argv in runs.items():
                times[name].append(_time(argv))
        base = statistics.median(times["baseline: import torch, transformers"])
        print(f"{'command':<40}{'median s':>10}{'x baseline':>12}")
        for name, ts in times.items():
            m = statistics.median(ts)
            print(f"{name:<40}{m:10.2f}{m / base:12.2f}")


if __name__ == "__main__":
    main()
