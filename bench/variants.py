"""Model variants side by side on one catalog, at one training schedule: held-out R@1/5/10 both
ways, ITC only and reranked at each depth, rerank cost per pair, parameters, training time.

Each variant is trained with ``train_catalog`` (what ``vtfusion train`` runs), indexed into its
own collection and evaluated with ``evaluate`` on the catalog's test split (what ``vtfusion
eval`` runs), so a row is reproduced by the commands printed beside it. The baseline is the
``base`` variant of the same run. Deterministic for a seed (training is seeded; only the
timings vary with the machine)::

    python bench/variants.py demo-gen/catalog --out runs/gen --variants base,neg,neg+mutual
    python bench/variants.py demo-run/catalog --out runs/demo --variants base,neg

A variant is ``+``-joined switches: ``base`` (make demo's model before issue 21: scratch BERT
tower, small CNN, text -> image fusion, 16 + 7 epochs, no text negatives), ``neg``
(--text-negatives, today's default), ``gru`` / ``lstm``
(--text-tower), ``mutual`` (--fusion mutual), ``resnet50`` (--image-tower resnet50),
``cal<S>`` (--calibration S), ``m<M>`` (an M-minute budget, 30 % of it kept for the reranker
stage, instead of the epochs; ``m<M>s<S>`` keeps S of it), ``e<J>x<R>`` (J joint and R reranker epochs).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vtfusion.catalogs.sources import Columns  # noqa: E402
from vtfusion.indexer.collection import Collection  # noqa: E402
from vtfusion.indexer.ingest import ingest  # noqa: E402
from vtfusion.models.config import FusionConfig, VisionConfig  # noqa: E402
from vtfusion.models.train import RerankConfig, TrainConfig  # noqa: E402
from vtfusion.search.evaluate import evaluate  # noqa: E402
from vtfusion.workflows.train import train_catalog  # noqa: E402

DEMO_EPOCHS, DEMO_RERANK_EPOCHS, IMAGE_SIZE = 16, 7, 64  # make demo's schedule (ui/cli.py)


def settings(variant: str) -> tuple[dict, list[str]]:
    """train_catalog keyword arguments for a variant, and the `vtfusion train` flags that match."""
    kw: dict = {"text_tower": "scratch", "vision": VisionConfig(image_size=IMAGE_SIZE), "fusion": None}
    cfg: dict = {"epochs": DEMO_EPOCHS, "rerank": RerankConfig(epochs=DEMO_RERANK_EPOCHS), "text_negatives": False}
    flags = [f"--epochs {DEMO_EPOCHS}", f"--rerank-epochs {DEMO_RERANK_EPOCHS}", "--no-text-negatives"]
    for part in variant.split("+"):
        if part == "base":
            continue
        if part == "neg":
            cfg["text_negatives"] = True
            flags[2] = "--text-negatives"
        elif m := re.fullmatch(r"negk(\d+)", part):
            cfg["text_negatives"], cfg["negatives_per_text"] = True, int(m[1])
            flags[2] = "--text-negatives"
            flags.append(f"--negatives-per-text {m[1]}")
        elif part in ("gru", "lstm"):
            kw["text_tower"] = part
            flags.append(f"--text-tower {part}")
        elif part == "mutual":
            kw["fusion"] = FusionConfig(mode="mutual")
            flags.append("--fusion mutual")
        elif part.startswith("resnet"):
            kw["vision"] = VisionConfig.resnet(part, image_size=IMAGE_SIZE)
            flags.append(f"--image-tower {part}")
        elif part == "nocal":
            cfg["calibration"] = 0.0
            flags.append("--calibration 0")
        elif m := re.fullmatch(r"cal([0-9.]+)", part):
            cfg["calibration"] = float(m[1])
            flags.append(f"--calibration {m[1]}")
        elif m := re.fullmatch(r"m([0-9.]+)(?:s([0-9.]+))?", part):  # a time budget instead of make demo's epochs
            share = m[2] or "0.3"
            cfg["epochs"], cfg["minutes"] = None, float(m[1])
            cfg["rerank"] = RerankConfig(epochs=8, share=float(share))
            flags[:2] = [f"--minutes {m[1]}", f"--rerank-share {share}"]
        elif m := re.fullmatch(r"e(\d+)x(\d+)", part):
            cfg["epochs"], cfg["rerank"] = int(m[1]), RerankConfig(epochs=int(m[2]))
            flags[:2] = [f"--epochs {m[1]}", f"--rerank-epochs {m[2]}"]
        else:
            raise SystemExit(f"unknown variant part {part!r}")
    kw["cfg"] = cfg
    return kw, flags


def run(catalog: Path, out: Path, variant: str, depths: list[int], seed: int) -> dict:
    kw, flags = settings(variant)
    cfg_kw = kw.pop("cfg")
    known = set(TrainConfig.__dataclass_fields__)
    cfg = TrainConfig(seed=seed, progress=False, **{k: v for k, v in cfg_kw.items() if k in known})
    folder = out / variant
    shutil.rmtree(folder, ignore_errors=True)
    t0 = time.perf_counter()
    report = train_catalog(catalog / "train.csv", folder / "model", cfg, **kw)
    train_s = time.perf_counter() - t0
    c = Collection.init(folder / "collection", folder / "model")
    ingest(c, catalog / "train.csv", Columns(), progress=False)
    rep = evaluate(c, catalog / "test.csv", [0, *depths], latency_queries=20, progress=False).to_dict()
    model = c.bundle.model
    params = sum(p.numel() for p in model.parameters())
    fusion_params = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("fusion", "itm_head")))
    lat = rep["latency_ms"]  # text -> image searches of the collection: stage -> {"rerank": {"mean"}, ...}
    cost = {}
    for d in depths:
        ms = lat.get(f"rerank@{d}", {}).get("rerank", {}).get("mean")
        if ms is not None:
            cost[d] = round(ms / d, 3)  # the rerank stage's time per candidate pair
    row = {
        "variant": variant, "flags": " ".join(flags), "train_s": round(train_s, 1),
        "train_steps": report.result.steps, "rerank_steps": report.result.rerank_steps,
        "joint_s": round(report.result.seconds, 1), "rerank_s": round(report.result.rerank_seconds, 1),
        "params": params, "fusion_params": fusion_params, "rerank_ms_per_pair": cost,
        "t2i": rep["t2i"], "i2t": rep["i2t"], "calibration": c.bundle.model.cfg.itm_weights,
    }
    if c.bundle.model.cfg.itm_weights:  # the same model reranked by the plain sum: what calibration alone changes
        plain = evaluate(c, catalog / "test.csv", [0, *depths], latency_queries=0, progress=False, itm_weight=1.0).to_dict()
        row["plain_sum"] = {"t2i": plain["t2i"], "i2t": plain["i2t"]}
    (folder / "row.json").write_text(json.dumps(row, indent=2) + "\n")
    return row


def table(rows: list[dict], depths: list[int]) -> str:
    head = ["variant", "direction", "ITC"] + [f"rerank@{d}" for d in depths] + ["ms/pair @32", "params (fusion)", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        for direction in ("t2i", "i2t"):
            cells = [r["variant"], "text → image" if direction == "t2i" else "image → text"]
            for key in ["itc"] + [f"rerank@{d}" for d in depths]:
                m = r[direction].get(key, {})
                cells.append(" / ".join(f"{m.get(k, float('nan')):.1f}" for k in ("R@1", "R@5", "R@10")))
            cells += [str(r["rerank_ms_per_pair"].get(32, r["rerank_ms_per_pair"].get("32", "—"))),
                      f"{r['params'] / 1e6:.2f} M ({r['fusion_params'] / 1e6:.2f} M)", str(r["train_s"])]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("catalog", type=Path, help="a folder with train.csv and test.csv (vtfusion demo-catalog)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--variants", default="base")
    ap.add_argument("--depths", default="16,32,64")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--collect", action="store_true", help="only rebuild table.md from the variants' row.json files")
    args = ap.parse_args()
    depths = [int(d) for d in args.depths.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    variants = args.variants.split(",")
    for v in variants:
        if args.collect:
            rows.append(json.loads((args.out / v / "row.json").read_text()))
            continue
        if len(variants) > 1:
            # each variant in a fresh interpreter: after one variant's ingest and evaluation the
            # next one's training steps ran ~3x slower in the same process (measured), which
            # made the train-seconds column of a multi-variant run meaningless
            cmd = [sys.executable, __file__, str(args.catalog), "--out", str(args.out), "--variants", v,
                   "--depths", args.depths, "--seed", str(args.seed)]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            row = json.loads((args.out / v / "row.json").read_text())
        else:
            row = run(args.catalog, args.out, v, depths, args.seed)
        rows.append(row)
        print(table([row], depths).splitlines()[-2:][0], flush=True)
        print(table([row], depths).splitlines()[-1], flush=True)
    md = table(rows, depths)
    (args.out / "table.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
