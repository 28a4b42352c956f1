"""Reranking evaluation: what cross-attention reranking buys, at which depth, at what cost.

Pairs come from a CSV of (image, caption) rows or a Karpathy-style JSON (COCO/Flickr); they are
ingested into the collection first (content dedup makes that a no-op the second time), one item
per pair. Rankings are computed over the evaluation set only:

- text -> image: each caption ranks the distinct images; its own image is the answer;
- image -> text: each image ranks every caption; it is found at the best rank of any of its
  captions (the BLIP/ALBEF ``itm_eval`` convention).

Similarities are computed in query chunks (never a full N x M matrix); each query's ITC top
``max depth`` is scored once by ITM, and each depth d reorders its own prefix of d candidates
(the rest keep ITC order). Every metric comes from exact ranks in the full ranking (see
``rank_direction``: ties go to the lower gallery position), never from a truncated candidate
list, so the ITC-only row does not depend on the depths asked for; image -> text R@K, MRR and
nDCG@10 all rank captions, with all of an image's captions relevant. The metrics are checked
against ``ir_measures`` and a from-the-definitions oracle in the tests. Each depth is compared
with ITC only by a paired Wilcoxon signed-rank test on per-query reciprocal ranks. Per-stage
latency comes from running a sample of queries through ``SearchEngine.search`` at each depth.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sqlalchemy import select

from indexer.catalog import CatalogRow
from indexer.collection import Collection
from indexer.ingest import ingest_rows
from indexer.schema import Item
from models.progress import progress as progress_bar

from .engine import SearchEngine
from .rerank import ITMScorer, Query, fuse

log = logging.getLogger(__name__)
KS = (1, 5, 10)


# ---- input ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalPair:
    image: Path
    caption: str
    line: int


JSON_FORMATS = (
    "Karpathy JSON ({\"images\": [{\"filename\", \"filepath\", \"split\", \"sentences\": [{\"raw\"}]}]}, "
    "as dataset_coco.json / dataset_flickr30k.json) or BLIP/ALBEF annotation JSON ([{\"image\": path, "
    "\"caption\": text or [texts]}])"
)


def read_pairs(path: str | Path, image_col: str = "image", text_col: str = "caption", split: str = "test") -> list[EvalPair]:
    """CSV rows (image path relative to the CSV, caption), Karpathy JSON (``images[].sentences``,
    ``split`` chosen) or BLIP/ALBEF annotation JSON (``[{"image", "caption"}]``, a caption a
    string or a list); ValueError naming the expected formats for any other JSON."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pairs file not found: {path}")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not JSON ({e}); expected {JSON_FORMATS}") from None
        images = data.get("images") if isinstance(data, dict) else data
        if not isinstance(images, list) or not all(isinstance(im, dict) for im in images):
            raise ValueError(f"{path}: expected {JSON_FORMATS}")
        if images and all("image" in im and "caption" in im for im in images):  # BLIP / ALBEF / LAVIS annotations
            out = []
            for n, im in enumerate(images, 1):
                caps = im["caption"] if isinstance(im["caption"], list) else [im["caption"]]
                out += [EvalPair(path.parent / str(im["image"]), str(c).strip(), n) for c in caps if str(c).strip()]
            return out
        if not all("filename" in im for im in images):
            raise ValueError(f"{path}: entries without 'filename' (or 'image' and 'caption'); expected {JSON_FORMATS}")
        if any("split" in im for im in images):
            images = [im for im in images if im.get("split") == split]
        out = []
        for n, im in enumerate(images, 1):
            img = path.parent / im.get("filepath", "") / im["filename"]
            out += [EvalPair(img, s["raw"].strip(), n) for s in im.get("sentences", []) if s.get("raw", "").strip()]
        return out
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in (image_col, text_col) if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: columns {missing} not in the header {reader.fieldnames}")
        return [
            EvalPair(path.parent / r[image_col], r[text_col].strip(), reader.line_num)
            for r in reader
            if r.get(image_col) and (r.get(text_col) or "").strip()
        ]


# ---- metrics (pure; tested against hand-computed cases and a naive full-matrix oracle) --------


def rerank_ranks(
    cand_groups: np.ndarray, itc: np.ndarray, itm: np.ndarray, target: int, depth: int, fusion: str, itc_scale: float = 1.0
) -> tuple[int, np.ndarray]:
    """1-based rank of the first candidate of group ``target`` after reordering the first
    ``depth`` candidates by the fused score (0 = ITC order); ``inf`` if absent. Also returns
    the final order of candidate positions."""
    order = np.arange(len(cand_groups))
    if depth:
        head = np.argsort(-fuse(itc[:depth], itm[:depth], fusion, itc_scale), kind="stable")
        order = np.concatenate([head, np.arange(depth, len(cand_groups))])
    hits = np.nonzero(cand_groups[order] == target)[0]
    return (int(hits[0]) + 1 if len(hits) else np.inf), order


def rank_direction(
    q_emb: np.ndarray,
    db_emb: np.ndarray,
    db_groups: np.ndarray,
    q_targets: np.ndarray,
    depths: Sequence[int],
    fusion: str,
    itm_fn,
    chunk: int = 256,
    progress: bool = False,
    name: str = "",
    itc_scale: float = 1.0,
) -> tuple[dict[int, list[float]], dict[int, list[float]], dict[int, dict[str, float]]]:
    """Every query's exact ranks at every depth, streaming (chunk, M) similarity blocks.

    The relevant gallery items of query q are those whose group is ``q_targets[q]`` (one image
    for text -> image; all of an image's captions for image -> text). A relevant item's rank is
    its position in the full ranking: ITC order over the whole gallery (ties: the lower gallery
    position first), with the top ``d`` reordered by the fused score (ties: ITC order). An item
    past the top d keeps its ITC rank, however deep; the ITC-only ranking does not depend on
    ``depths``. ``itm_fn(query index, candidate db positions) -> ITM logits`` is called once per
    query for the top ``max(depths)``. Returns, per depth: the rank of the first relevant item
    (R@K, MRR), nDCG@10 (binary relevance, every relevant item), and per-query reciprocal ranks.
    """
    max_d = max(depths)
    first: dict[int, list[float]] = {d: [] for d in depths}
    ndcg: dict[int, list[float]] = {d: [] for d in depths}
    rr: dict[int, dict[str, float]] = {d: {} for d in depths}
    discount = 1.0 / np.log2(np.arange(2, 12))  # ranks 1..10
    for start in progress_bar(range(0, len(q_emb), chunk), desc=f"eval {name}", unit="chunk", enabled=progress):
        sims = q_emb[start : start + chunk] @ db_emb.T  # (c, M): one chunk at a time
        top = np.argsort(-sims, axis=1, kind="stable")[:, :max_d]  # (c, max_d): what ITM rescoring needs
        for r, cand in enumerate(top):
            qi = start + r
            row = sims[r]
            rel = np.flatnonzero(db_groups == q_targets[qi])  # relevant gallery positions
            if not len(rel):
                raise ValueError(f"query {qi} has no relevant item in the gallery")
            itc_rank = {int(j): int((row > row[j]).sum() + (row[:j] == row[j]).sum()) + 1 for j in rel}  # exact, ties by position
            itc = row[cand]
            itm = np.full(len(cand), np.nan, np.float32)
            if max_d:
                itm[: min(max_d, len(cand))] = itm_fn(qi, cand[:max_d])
            idcg = discount[: min(10, len(rel))].sum()
            for d in depths:
                ranks = dict(itc_rank)
                dd = min(d, len(cand))
                if dd:
                    _, order = rerank_ranks(db_groups[cand[:dd]], itc[:dd], itm[:dd], q_targets[qi], dd, fusion, itc_scale)
                    for pos, k in enumerate(order):
                        if int(cand[k]) in ranks:
                            ranks[int(cand[k])] = pos + 1
                best = min(ranks.values())
                first[d].append(best)
                rr[d][str(qi)] = 1.0 / best
                ndcg[d].append(float(sum(discount[x - 1] for x in ranks.values() if x <= 10) / idcg))
    return first, ndcg, rr


LATENCY_KEYS = {"t2i": "latency_ms", "i2t": "latency_ms_i2t"}  # report.json keys of each direction's timings


def depth_key(depth: int) -> str:
    """A report's key for a rerank depth: ``itc`` (0, ITC only) or ``rerank@<depth>``."""
    return "itc" if depth == 0 else f"rerank@{depth}"


def key_depth(key: str) -> int:
    """The inverse of :func:`depth_key`."""
    return 0 if key == "itc" else int(key.split("@", 1)[1])


def recall_at(ranks: Sequence[float], ks: Sequence[int] = KS) -> dict[str, float]:
    r = np.asarray(ranks, dtype=float)
    return {f"R@{k}": float(100.0 * np.mean(r <= k)) for k in ks}


def paired_p(a: dict[str, float], b: dict[str, float]) -> float:
    """Wilcoxon signed-rank p-value on paired per-query values (1.0 when they never differ)."""
    from scipy.stats import wilcoxon

    keys = sorted(a)
    x, y = np.array([a[k] for k in keys]), np.array([b.get(k, 0.0) for k in keys])
    if np.allclose(x, y):
        return 1.0
    return float(wilcoxon(x, y, zero_method="zsplit").pvalue)


# ---- the evaluation ----------------------------------------------------------------------------


def _ingest_pairs(c: Collection, pairs: list[EvalPair], pairs_path: Path, progress: bool, workers: int | None) -> list[tuple[int, str, str]]:
    rows = [
        CatalogRow(f"pair{j}", p.image.resolve(), (p.caption,), {}, f"{pairs_path}:{p.line}") for j, p in enumerate(pairs)
    ]
    rep = ingest_rows(c, rows, [], str(pairs_path), workers=workers, progress=progress)
    if rep.stopped_by:  # never evaluate the part of the pairs ingested before a SIGINT / SIGTERM
        raise KeyboardInterrupt(f"stopped by {rep.stopped_by} while ingesting the pairs; nothing was evaluated")
    log.info("eval pairs: %d added, %d already there, %d failed", rep.added, rep.duplicates, rep.failed)
    with c.Session() as s:
        return [
            (r.id, r.image_path, r.text)
            for r in s.execute(
                select(Item.id, Item.image_path, Item.text).where(Item.source == str(pairs_path), Item.status == "active").order_by(Item.id)
            )
        ]


def _stored(c: Collection, ids: list[int], modality: str) -> np.ndarray:
    """Stored vectors of ``ids``, in that order: (len(ids), E)."""
    with c.Session() as s:
        found, xb = c.stored_vectors(s, modality, ids=ids)
    row = {int(i): k for k, i in enumerate(found)}
    return xb[[row[i] for i in ids]]


def evaluate(
    c: Collection,
    pairs_path: str | Path,
    depths: Sequence[int] = (0, 16, 32, 64, 128),
    fusion: str = "itm+itc",
    latency_queries: int = 50,
    chunk: int = 256,
    progress: bool = True,
    workers: int | None = None,
    **read_kw,
) -> dict:
    """``workers``: the ingest of new pairs (``ingest_rows``; 0 in a process that must not fork,
    such as a web server)."""
    pairs_path = Path(pairs_path).resolve()
    pairs = read_pairs(pairs_path, **read_kw)
    if not pairs:
        raise ValueError(f"{pairs_path}: no (image, caption) pairs")
    items = _ingest_pairs(c, pairs, pairs_path, progress, workers)
    if not items:
        raise ValueError(f"{pairs_path}: none of its {len(pairs)} pairs could be evaluated (their images failed to ingest: "
                         "see `vtfusion errors`)")
    image_paths = sorted({p for _, p, _ in items})
    group_of_path = {p: g for g, p in enumerate(image_paths)}
    text_ids = [i for i, _, _ in items]  # every caption is a text item
    text_group = np.array([group_of_path[p] for _, p, _ in items])
    first_item: dict[str, int] = {}
    for i, p, _ in items:
        first_item.setdefault(p, i)
    image_ids = [first_item[path] for path in image_paths]  # one item per image
    depths = sorted(set(int(d) for d in depths) | {0})
    notes = []
    if not c.bundle.has_itm and depths != [0]:
        notes.append(f"the model {c.config.model} has no trained ITM head: ITC only (depths {depths[1:]} skipped)")
        log.warning(notes[-1])
        depths = [0]
    scorer = ITMScorer(c, chunk=64)
    b = c.bundle

    img_emb = _stored(c, image_ids, "image")  # (M, E)
    txt_emb = _stored(c, text_ids, "text")  # (T, E)
    report: dict = {
        "pairs": str(pairs_path), "images": len(image_ids), "texts": len(text_ids), "depths": depths, "fusion": fusion,
        "itc_scale": float(b.model.logit_scale_value().detach()),
        "notes": notes,
    }

    def run_direction(name, q_emb, db_emb, db_groups, q_targets, q_query, db_ids):
        def itm_fn(qi, cand):
            return scorer.score(q_query(qi), [db_ids[j] for j in cand])

        ranks, ndcg, rr = rank_direction(
            q_emb, db_emb, db_groups, q_targets, depths, fusion, itm_fn, chunk, progress, name,
            float(b.model.logit_scale_value().detach()),
        )
        out = {}
        for d in depths:
            key = depth_key(d)
            out[key] = {**recall_at(ranks[d]), "MRR": float(np.mean(list(rr[d].values()))), "nDCG@10": float(np.mean(ndcg[d]))}
            if d:
                out[key]["p_value_vs_itc"] = paired_p(rr[0], rr[d])
        return out

    with torch.no_grad():
        img_groups = np.arange(len(image_ids))
        t2i_targets = text_group

        def t2i_query(qi):
            ids, mask = b.tokenizer([items[qi][2]])
            return Query(ids=ids, mask=mask)

        report["t2i"] = run_direction("t2i", txt_emb, img_emb, img_groups, t2i_targets, t2i_query, image_ids)

        img_tokens_cache = {}

        def i2t_query(qi):
            if qi not in img_tokens_cache:
                img_tokens_cache.clear()
                img_tokens_cache[qi] = c.item_tokens([image_ids[qi]])[0]  # (1, N, D_v)
            return Query(image_tokens=img_tokens_cache[qi])

        report["i2t"] = run_direction("i2t", img_emb, txt_emb, text_group, np.arange(len(image_ids)), i2t_query, text_ids)

    report[LATENCY_KEYS["t2i"]] = latency(c, [t for _, _, t in items], "image", image_ids, depths, fusion, latency_queries)
    report[LATENCY_KEYS["i2t"]] = latency(c, [Path(p) for p in image_paths], "text", text_ids, depths, fusion, latency_queries)
    return report


def latency(c: Collection, queries: list, target: str, within: list[int], depths: Sequence[int], fusion: str, n: int) -> dict:
    """Per-stage mean and p95 over ``n`` searches at each depth ({} when n is 0): text queries
    against ``target="image"``, or image files (decoded and encoded as an upload is) against
    ``target="text"``, restricted to the evaluation's items."""
    if n <= 0 or not queries:
        return {}
    engine = SearchEngine(c)
    rng = np.random.default_rng(0)
    sample = [queries[i] for i in rng.choice(len(queries), size=min(n, len(queries)), replace=False)]
    allowed = np.array(within, dtype=np.int64)
    out = {}
    engine.search(sample[0], target=target, k=10, rerank_depth=max(depths), fusion=fusion, within=allowed)  # warm-up
    for d in depths:
        per_stage: dict[str, list[float]] = {}
        for q in sample:
            t = time.perf_counter()
            res = engine.search(q, target=target, k=10, rerank_depth=d, fusion=fusion, within=allowed)
            for s, v in res.timings_ms.items():
                per_stage.setdefault(s, []).append(v)
            per_stage.setdefault("total", []).append((time.perf_counter() - t) * 1000)
        out[depth_key(d)] = {
            s: {"mean": float(np.mean(v)), "p95": float(np.percentile(v, 95))} for s, v in per_stage.items()
        }
    return out


# ---- output --------------------------------------------------------------------------------------


def write_report(report: dict, out: str | Path) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown(report))
    return [out / "report.json", out / "report.md", *plots(report, out)]


def markdown(report: dict) -> str:
    lines = [f"# Reranking evaluation\n", f"{report['images']} images, {report['texts']} captions; fusion `{report['fusion']}`.\n"]
    for direction, title in (("t2i", "text → image"), ("i2t", "image → text")):
        lines += [f"\n## {title}\n", "| | R@1 | R@5 | R@10 | MRR | nDCG@10 | p vs ITC | mean ms | p95 ms |", "|---|---|---|---|---|---|---|---|---|"]
        for key, m in report[direction].items():
            lat = report.get(LATENCY_KEYS[direction], {}).get(key, {}).get("total", {})
            p = m.get("p_value_vs_itc")
            lines.append(
                f"| {key} | {m['R@1']:.1f} | {m['R@5']:.1f} | {m['R@10']:.1f} | {m['MRR']:.3f} | {m['nDCG@10']:.3f} | "
                f"{'' if p is None else f'{p:.2g}'} | {lat.get('mean', float('nan')):.1f} | {lat.get('p95', float('nan')):.1f} |"
            )
    lines.append("\nLatency: `SearchEngine.search` calls (encode, filter, retrieve, rerank, metadata): caption texts "
                 "against the images, and image files (decoded and encoded, as an upload) against the captions.\n")
    return "\n".join(lines)


def plots(report: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths = report["depths"]
    keys = [depth_key(d) for d in depths]

    def save(fig, ax, ylabel: str, name: str) -> Path:
        ax.set_xlabel("rerank depth (0 = ITC only)")
        ax.set_ylabel(ylabel)
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        return out / name

    fig, ax = plt.subplots(figsize=(6, 4))
    for direction, style in (("t2i", "o-"), ("i2t", "s--")):
        for k in ("R@1", "R@5"):
            ax.plot(depths, [report[direction][key][k] for key in keys], style, label=f"{direction} {k}")
    p1 = save(fig, ax, "recall (%)", "recall_vs_depth.png")
    lat, lat_i2t = report[LATENCY_KEYS["t2i"]], report.get(LATENCY_KEYS["i2t"], {})
    if not lat:  # latency not measured (--latency-queries 0)
        return [p1]
    fig, ax = plt.subplots(figsize=(6, 4))
    for stage in ("total", "rerank", "retrieve", "encode"):
        ax.plot(depths, [lat[key][stage]["mean"] for key in keys], "o-", label=f"t2i {stage} (mean)")
    ax.plot(depths, [lat[key]["total"]["p95"] for key in keys], "k:", label="t2i total (p95)")
    if lat_i2t:
        ax.plot(depths, [lat_i2t[key]["total"]["mean"] for key in keys], "s--", label="i2t total (mean)")
    return [p1, save(fig, ax, "ms per query", "latency_vs_depth.png")]
