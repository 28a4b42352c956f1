"""Reranking evaluation: what cross-attention reranking buys, at which depth, at what cost.

Pairs come from a CSV of (image, caption) rows, a Karpathy JSON (COCO / Flickr30k) or a
BLIP/ALBEF annotation JSON (``read_pairs``). The evaluated set is exactly the file's usable rows
(a row whose image is missing or cannot be decoded, or whose caption is empty, is listed in the
report with its line and reason); images are grouped by their bytes (sha256), so the same
picture under two names is one image, and a caption repeated in the file is a query of its own.

Evaluation never writes to the collection. Two galleries:

- ``gallery="pairs"`` (BLIP's ``itm_eval`` protocol): each caption ranks the pairs' distinct
  images (text -> image), each image ranks every caption, all of its captions relevant
  (image -> text). An image some active item already has (same bytes, whatever its text,
  metadata or source) uses that item's stored vector and token record; the others are encoded
  into scratch space owned by the run (a temporary folder, removed at the end). Captions are
  encoded as queries are.
- ``gallery="collection"``: the whole collection (active items, optionally ``where``) is the
  gallery, the question a catalog owner asks. A caption's relevant items are the active items
  with its image's bytes (text -> image over the items' image vectors); an image query finds
  those same items among every item's text vector (image -> text). Rows whose image no item
  has are listed, not evaluated. The gallery is streamed in blocks from the database: memory is
  (queries x depth), never (queries x gallery).

Ranks are exact: a relevant item's rank is its position in the full ranking, ITC order over the
whole gallery (ties: the earlier gallery position, i.e. the lower key) with the top ``d``
reordered by the fused score (ties: ITC order). A relevant item past every candidate list is
counted, not dropped (``rank_queries``), so the ITC-only row does not depend on the depths
asked for. Each depth is compared with ITC only and with the previous depth on per-query
reciprocal ranks: Fisher's randomization test and the paired t-test, Holm-corrected over the
sweep, with win / tie / loss counts (``search/stats.py``). Each stage's ranking can be written as
a TREC run with its qrels (``trec_dir``), so ir-measures, ranx, pytrec_eval or trec_eval can
recompute every number. Per-stage latency comes from ``SearchEngine.search`` on the collection.
"""

from __future__ import annotations

import csv
import io
import logging
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vtfusion.indexer.collection import Collection
from vtfusion.models.preprocess import ImageError, image_hash, read_image_bytes
from vtfusion.models.progress import progress as progress_bar

from . import stats
from .engine import SearchEngine
from vtfusion.catalogs.pairs import EvalPair, PairSet, load_pairs, read_pairs
from .ranking import BLOCK, Rankings, array_blocks, rank_queries
from .report import LATENCY_KEYS, EvalReport, depth_key
from .rerank import FUSIONS, ITMScorer, Query

log = logging.getLogger(__name__)
KS = (1, 5, 10)
GALLERIES = ("pairs", "collection")
RUN_DEPTH = 100  # ranked items per query in the TREC run files


def recall_at(ranks: Sequence[float], ks: Sequence[int] = KS) -> dict[str, float]:
    r = np.asarray(ranks, dtype=float)
    return {f"R@{k}": float(100.0 * np.mean(r <= k)) for k in ks}


def compare_depths(rankings: Rankings, n_perm: int = stats.N_PERM) -> list[dict]:
    """Each depth against ITC only, and each against the previous depth, on per-query
    reciprocal ranks: Fisher randomization and paired t p-values, each Holm-corrected over the
    whole sweep, with win / tie / loss counts (wins: the first named is better)."""
    ds = rankings.depths
    pairs = [(d, 0) for d in ds if d] + [(ds[i], ds[i - 1]) for i in range(2, len(ds)) if ds[i - 1]]
    out = []
    for a, b in pairs:
        x, y = rankings.rr(a), rankings.rr(b)
        w, t, lo = stats.win_tie_loss(x, y)
        out.append({
            "a": depth_key(a), "b": depth_key(b), "wins": w, "ties": t, "losses": lo,
            "mean_rr_difference": float(np.mean(x - y)),
            "p_randomization": stats.randomization_p(x, y, n_perm), "p_t": stats.paired_t_p(x, y),
        })
    for test in ("p_randomization", "p_t"):
        for row, adj in zip(out, stats.holm([row[test] for row in out])):
            row[f"{test}_holm"] = adj
    return out


# ---- the evaluation ----

class _Images:
    """The evaluation's images: vector (G, E) and tokens per image group. An image some active
    item has (same bytes) uses that item's stored vector and token record; the others (when
    ``encode``) are decoded from the bytes that were hashed and encoded into scratch space
    owned by the run (float16 token rows in a temporary file, removed with the run)."""

    def __init__(self, c: Collection, groups: list[tuple[str, Path]], scratch: Path, encode: bool, progress: bool):
        self.c = c
        b = c.bundle
        matches = c.store.items_with_images(dict(groups), modality="image")
        self.item: list[int | None] = [matches[h][0] if h in matches else None for h, _ in groups]
        self.failed: dict[int, str] = {}
        self.emb = np.zeros((len(groups), c.config.embed_dim), np.float32)
        stored = [(g, i) for g, i in enumerate(self.item) if i is not None]
        vec = c.store.vectors_by_id("image", [i for _, i in stored])
        for g, i in stored:
            self.emb[g] = vec[i]
        todo = [g for g, i in enumerate(self.item) if i is None]
        self.scratch_row: dict[int, int] = {}
        self.scratch = None
        if not encode:
            self.failed = {g: "no active item in the collection has this image" for g in todo}
            return
        shape = (max(1, len(todo)), c.config.num_tokens, c.config.token_width)
        self.scratch = np.lib.format.open_memmap(scratch / "image_tokens.npy", mode="w+", dtype=np.float16, shape=shape)
        for start in progress_bar(range(0, len(todo), 16), desc="eval encode images", unit="batch", enabled=progress and bool(todo)):
            batch, imgs = [], []
            for g in todo[start : start + 16]:
                h, path = groups[g]
                try:
                    data = read_image_bytes(path)
                    if image_hash(data) != h:
                        raise ImageError(f"{path} changed while the evaluation read it")
                    imgs.append(b.transform.load(io.BytesIO(data), name=str(path)))
                    batch.append(g)
                except (ImageError, OSError, ValueError) as e:
                    self.failed[g] = str(e) or type(e).__name__
            if not batch:
                continue
            with torch.inference_mode():
                emb, tok = b.embed_images(imgs)  # (B, E), (B, N, D_v)
                self.emb[batch] = emb.float().cpu().numpy()
            for g, t in zip(batch, tok.float().cpu().numpy()):
                self.scratch_row[g] = len(self.scratch_row)
                self.scratch[self.scratch_row[g]] = t

    def tokens(self, groups: Sequence[int]) -> torch.Tensor:
        """Image tokens of these groups, in order: (K, N, D_v) float32."""
        out = torch.zeros(len(groups), self.c.config.num_tokens, self.c.config.token_width)
        stored = [(n, self.item[g]) for n, g in enumerate(groups) if self.item[g] is not None]
        if stored:
            out[[n for n, _ in stored]] = self.c.item_tokens([i for _, i in stored])[0]
        for n, g in enumerate(groups):
            if self.item[g] is None:
                out[n] = torch.from_numpy(self.scratch[self.scratch_row[g]].astype(np.float32))
        return out


def _encode_texts(b, texts: list[str], progress: bool, batch: int = 64) -> np.ndarray:
    out = []
    for start in progress_bar(range(0, len(texts), batch), desc="eval encode captions", unit="batch", enabled=progress):
        ids, mask = b.tokenizer(texts[start : start + batch])
        with torch.inference_mode():
            out.append(b.model.encode_text(ids.to(b.device), mask.to(b.device)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, b.model.embed_dim), np.float32)


@dataclass
class _Direction:
    """One direction's queries and gallery, ready for ``rank_queries``."""

    name: str
    query_ids: list[str]  # TREC query ids
    q_emb: np.ndarray
    blocks: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]
    n_blocks: int
    relevant: list[tuple[np.ndarray, np.ndarray]]
    itm_fn: Callable[[int, np.ndarray], np.ndarray]
    doc_id: Callable[[int], str]  # gallery key -> TREC doc id
    gallery_size: int


def evaluate(
    c: Collection,
    pairs_path: str | Path,
    depths: Sequence[int] = (0, 16, 32, 64, 128),
    fusion: str = "itm+itc",
    latency_queries: int = 50,
    chunk: int = 256,
    progress: bool = True,
    gallery: str = "pairs",
    where: str | None = None,
    trec_dir: str | Path | None = None,
    run_depth: int = RUN_DEPTH,
    n_perm: int = stats.N_PERM,
    itm_weight: float | None = None,
    **read_kw,
) -> EvalReport:
    """Evaluate reranking on a pairs file (see the module docstring); the collection is only
    read. ``trec_dir``: write each stage's ranking (top ``run_depth`` per query) as TREC run
    files with their qrels there. ``itm_weight``: the ITM logit's weight in ``itm+itc`` at every
    depth (default: the model's calibrated weight per depth, ``Bundle.itm_weight``; 1 is the
    plain sum). ValueError when nothing can be evaluated."""
    if gallery not in GALLERIES:
        raise ValueError(f"--gallery must be one of {', '.join(GALLERIES)}; got {gallery!r}")
    if fusion not in FUSIONS:
        raise ValueError(f"--fusion must be one of {', '.join(FUSIONS)}; got {fusion!r}")
    if where and gallery != "collection":
        raise ValueError("--where restricts the collection gallery: use it with --gallery collection")
    if itm_weight is not None and not 0 <= itm_weight < float("inf"):
        raise ValueError(f"--itm-weight must be a finite number >= 0; got {itm_weight}")
    if any(int(d) < 0 for d in depths) or run_depth < 0:
        raise ValueError("depths and the run depth must be >= 0")
    pairs_path = Path(pairs_path).resolve()
    pairs = read_pairs(pairs_path, **read_kw)
    if not pairs:
        raise ValueError(f"{pairs_path}: no (image, caption) rows")
    ps = load_pairs(pairs)
    depths = sorted(set(int(d) for d in depths) | {0})
    notes = []
    b = c.bundle
    if not b.has_itm and depths != [0]:
        notes.append(f"the model {c.config.model} has no trained ITM head: ITC only (depths {depths[1:]} skipped)")
        log.warning(notes[-1])
        depths = [0]
    itc_scale = float(b.model.logit_scale_value().detach())
    weight_of = b.itm_weight if itm_weight is None else (lambda depth: float(itm_weight))
    scorer = ITMScorer(c, chunk=64)
    c.store.where(where)  # a filter that does not parse fails here, before any work
    mark = c.store.last_change()
    with tempfile.TemporaryDirectory(prefix="vtfusion-eval-") as scratch:
        images = _Images(c, ps.groups, Path(scratch), encode=gallery == "pairs", progress=progress)
        if gallery == "pairs":
            ps.skip(images.failed)
        if not ps.rows:
            raise ValueError(f"{pairs_path}: none of its {len(pairs)} rows can be evaluated; first reasons: "
                             + "; ".join(f"line {x['line']}: {x['reason']}" for x in ps.skipped[:3]))
        captions = [pairs[j].caption for j in ps.rows]
        txt_emb = _encode_texts(b, captions, progress)
        row_pos = {j: n for n, j in enumerate(ps.rows)}

        def text_query(j: int) -> Query:
            ids, mask = b.tokenizer([pairs[j].caption])
            return Query(ids=ids, mask=mask)

        if gallery == "pairs":
            dirs = _pairs_directions(c, ps, images, txt_emb, row_pos, scorer, text_query)
        else:
            dirs, unmatched = _collection_directions(c, ps, images, txt_emb, row_pos, scorer, text_query, where)
            ps.skipped += unmatched
        report: dict = {
            "pairs": str(pairs_path), "gallery": gallery, "where": where or None,
            "rows": len(pairs), "images": len(ps.group_rows()), "texts": len(ps.rows),
            "reused_images": sum(1 for g in ps.group_rows() if images.item[g] is not None),
            "depths": depths, "fusion": fusion, "itc_scale": itc_scale, "notes": notes,
            "itm_weights": {depth_key(d): weight_of(d) for d in depths if d},
            "skipped": sorted(ps.skipped, key=lambda x: x["row"]),
            "evaluated": {}, "gallery_size": {}, "comparisons": {},
        }
        keep = max(run_depth, max(depths), 10) if trec_dir else 0
        trec: dict = {"run_depth": keep, "files": [], "first_relevant_beyond_run": {}} if trec_dir else {}
        for d in dirs:
            report["evaluated"][d.name] = len(d.query_ids)
            report["gallery_size"][d.name] = d.gallery_size
            if not d.query_ids and d.name == "i2t" and gallery == "collection":
                notes.append("image -> text not evaluated: no item with a pair's image has a text in the gallery")
                report["i2t"], report["comparisons"]["i2t"] = {}, []
                continue
            if not d.query_ids:
                raise ValueError(f"{pairs_path}: no {d.name} query can be evaluated ({len(ps.skipped)} rows skipped; first: "
                                 + "; ".join(f"line {x['line']}: {x['reason']}" for x in ps.skipped[:3]) + ")")
            itm_fn = d.itm_fn if fusion != "itc" else (lambda q, cand: np.zeros(len(cand), np.float32))  # ITC alone: no ITM to run
            with torch.inference_mode():
                r = rank_queries(d.q_emb, d.blocks(), d.relevant, depths, fusion, itm_fn, itc_scale, chunk, keep,
                                 progress, d.name, d.n_blocks, itm_weight=weight_of)
            report[d.name] = {}
            for depth in depths:
                report[d.name][depth_key(depth)] = {**recall_at(r.first[depth]), "MRR": float(np.mean(r.rr(depth))),
                                                    "nDCG@10": float(np.mean(r.ndcg[depth]))}
            comps = compare_depths(r, n_perm)
            report["comparisons"][d.name] = comps
            for row in comps:
                if row["b"] == "itc":
                    report[d.name][row["a"]].update(p_value_vs_itc=row["p_randomization_holm"], wins=row["wins"],
                                                    ties=row["ties"], losses=row["losses"])
            if trec_dir:
                files, beyond = write_trec(Path(trec_dir), d, r)
                trec["files"] += [str(f) for f in files]
                trec["first_relevant_beyond_run"][d.name] = beyond
        if trec_dir:
            trec["files"].append(str(_write_ids(Path(trec_dir), pairs, ps, c)))
            report["trec"] = trec
    now = c.store.last_change()
    if now != mark:  # the reads above are not one snapshot: say so rather than report a mix as exact
        notes.append(f"the collection changed while it was evaluated (changes {mark + 1}..{now}): "
                     "the ranks may mix its states; evaluate again when no ingest or delete is running")
        log.warning(notes[-1])
    if report["evaluated"]["t2i"] != len(ps.rows):  # every usable row is a text -> image query, exactly once
        raise RuntimeError(f"evaluated {report['evaluated']['t2i']} text queries of {len(ps.rows)} usable rows")
    lat_where = where if gallery == "collection" else None
    report[LATENCY_KEYS["t2i"]] = latency(c, captions, "image", depths, fusion, latency_queries, lat_where, notes)
    report[LATENCY_KEYS["i2t"]] = latency(c, [ps.groups[g][1] for g in ps.group_rows()], "text", depths, fusion,
                                          latency_queries, lat_where, notes)
    return EvalReport(**report)


def _pairs_directions(c, ps: PairSet, images: _Images, txt_emb, row_pos, scorer: ITMScorer, text_query) -> list[_Direction]:
    groups = sorted(ps.group_rows())  # the image groups left, ascending: the image gallery's keys
    g_rows = ps.group_rows()
    img_emb = images.emb[groups]
    g_pos = {g: n for n, g in enumerate(groups)}
    rows = ps.rows

    def t2i_itm(qi: int, cand: np.ndarray) -> np.ndarray:
        return scorer.score_tokens(text_query(rows[qi]), images.tokens([int(g) for g in cand]))

    def i2t_itm(qi: int, cand: np.ndarray) -> np.ndarray:
        return scorer.score_texts(images.tokens([groups[qi]]), [ps.pairs[int(j)].caption for j in cand])

    def img_blocks():
        for keys, emb in array_blocks(img_emb):
            yield np.asarray(groups, np.int64)[keys], emb

    def txt_blocks():
        for keys, emb in array_blocks(txt_emb):
            yield np.asarray(rows, np.int64)[keys], emb

    t2i = _Direction(
        "t2i", [f"r{j}" for j in rows], txt_emb, img_blocks, -(-len(groups) // BLOCK),
        [(np.array([ps.row_group[j]], np.int64), img_emb[[g_pos[ps.row_group[j]]]]) for j in rows],
        t2i_itm, lambda g: f"img{g}", len(groups),
    )
    i2t = _Direction(
        "i2t", [f"img{g}" for g in groups], img_emb, txt_blocks, -(-len(rows) // BLOCK),
        [(np.array(g_rows[g], np.int64), txt_emb[[row_pos[j] for j in g_rows[g]]]) for g in groups],
        i2t_itm, lambda j: f"r{j}", len(rows),
    )
    return [t2i, i2t]


def _collection_directions(c, ps: PairSet, images: _Images, txt_emb, row_pos, scorer: ITMScorer, text_query, where):
    """The whole collection (active items matching ``where``) as the gallery; relevant items:
    those with the image's bytes."""
    hashes = {h: p for h, p in ps.groups}
    in_img = c.store.items_with_images(hashes, where, modality="image")
    in_txt = c.store.items_with_images(hashes, where, modality="text")
    why_not = ("no active item in the collection has this image (ingest the pairs first: vtfusion ingest COLLECTION PAIRS)"
               if not where else f"no active item with this image matches --where {where!r}")
    unmatched = {g: why_not for g, (h, _) in enumerate(ps.groups) if h not in in_img}
    before = len(ps.skipped)
    ps.skip(unmatched)
    skipped, ps.skipped = ps.skipped[before:], ps.skipped[:before]
    rows = ps.rows
    g_rows = ps.group_rows()
    img_vec = c.store.vectors_by_id("image", sorted({i for h in in_img.values() for i in h}))
    txt_vec = c.store.vectors_by_id("text", sorted({i for h in in_txt.values() for i in h}))
    hash_of = [h for h, _ in ps.groups]
    i2t_groups = [g for g in sorted(g_rows) if hash_of[g] in in_txt]

    def t2i_itm(qi: int, cand: np.ndarray) -> np.ndarray:
        return scorer.score(text_query(rows[qi]), [int(i) for i in cand])

    def i2t_itm(qi: int, cand: np.ndarray) -> np.ndarray:
        return scorer.score(Query(image_tokens=images.tokens([i2t_groups[qi]])), [int(i) for i in cand])

    def rel(ids: list[int], vec: dict[int, np.ndarray]):
        return np.array(ids, np.int64), np.stack([vec[i] for i in ids])

    def blocks(modality):
        return lambda: c.store.iter_vectors(modality, where, batch=BLOCK)

    n_img, n_txt = c.store.count_vectors("image", where), c.store.count_vectors("text", where)
    t2i = _Direction(
        "t2i", [f"r{j}" for j in rows], txt_emb[[row_pos[j] for j in rows]], blocks("image"), -(-n_img // BLOCK),
        [rel(in_img[hash_of[ps.row_group[j]]], img_vec) for j in rows], t2i_itm, lambda i: f"item{i}", n_img,
    )
    i2t = _Direction(
        "i2t", [f"img{g}" for g in i2t_groups], images.emb[i2t_groups] if i2t_groups else np.zeros((0, txt_emb.shape[1]), np.float32),
        blocks("text"), -(-n_txt // BLOCK), [rel(in_txt[hash_of[g]], txt_vec) for g in i2t_groups], i2t_itm, lambda i: f"item{i}", n_txt,
    )
    return [t2i, i2t], skipped


def latency(c: Collection, queries: list, target: str, depths: Sequence[int], fusion: str, n: int,
            where: str | None = None, notes: list[str] | None = None) -> dict:
    """Per-stage mean and p95 over ``n`` searches of the collection at each depth ({} when n
    is 0 or the collection is empty): text queries against ``target="image"``, or image files
    (decoded and encoded as an upload is) against ``target="text"``."""
    if n <= 0 or not queries:
        return {}
    if not c.store.count_vectors(target):
        if notes is not None and "latency not measured: the collection has no items" not in notes:
            notes.append("latency not measured: the collection has no items")
        return {}
    engine = SearchEngine(c)
    rng = np.random.default_rng(0)
    sample = [queries[i] for i in rng.choice(len(queries), size=min(n, len(queries)), replace=False)]
    out = {}
    engine.search(sample[0], target=target, k=10, rerank_depth=max(depths), fusion=fusion, where=where)  # warm-up
    for d in depths:
        per_stage: dict[str, list[float]] = {}
        for q in sample:
            t = time.perf_counter()
            res = engine.search(q, target=target, k=10, rerank_depth=d, fusion=fusion, where=where)
            for s, v in res.timings_ms.items():
                per_stage.setdefault(s, []).append(v)
            per_stage.setdefault("total", []).append((time.perf_counter() - t) * 1000)
        out[depth_key(d)] = {
            s: {"mean": float(np.mean(v)), "p95": float(np.percentile(v, 95))} for s, v in per_stage.items()
        }
    return out


# ---- TREC run files -----------------------------------------------------------------------------


def write_trec(folder: Path, d: _Direction, r: Rankings) -> tuple[list[Path], dict[str, int]]:
    """``<dir>.qrels`` (every relevant item of every query, relevance 1) and one
    ``<dir>.<stage>.run`` per depth: each query's top ``keep`` in the stage's order, scored
    ``keep - position + 1`` (distinct, so no tool's tie rule can reorder them). Returns the
    files and, per stage, how many queries' first relevant item lies past the run (their RR
    from the run is 0 where the report's is exact)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = [folder / f"{d.name}.qrels"]
    with open(files[0], "w") as f:
        for q, (keys, _) in enumerate(d.relevant):
            f.writelines(f"{d.query_ids[q]} 0 {d.doc_id(int(k))} 1\n" for k in keys)
    beyond = {}
    for depth in r.depths:
        stage = depth_key(depth)
        path = folder / f"{d.name}.{stage.replace('@', '')}.run"
        keep = r.runs[depth].shape[1]
        with open(path, "w") as f:
            for q, ranking in enumerate(r.runs[depth]):
                f.writelines(
                    f"{d.query_ids[q]} Q0 {d.doc_id(int(k))} {pos + 1} {keep - pos} {stage}\n"
                    for pos, k in enumerate(ranking) if k >= 0
                )
        beyond[stage] = int((r.first[depth] > keep).sum())
        files.append(path)
    return files, beyond


def _item_ids(folder: Path) -> set[int]:
    """The collection items the run files and qrels in ``folder`` name."""
    out = set()
    for f in [*folder.glob("*.run"), *folder.glob("*.qrels")]:
        with open(f) as fh:
            out.update(int(w[4:]) for line in fh for w in line.split()[1:3] if w.startswith("item"))
    return out


def _write_ids(folder: Path, pairs: list[EvalPair], ps: PairSet, c: Collection) -> Path:
    """What the run files' ids name: ``r<j>`` the j-th row read (its line and caption),
    ``img<g>`` an image (a file holding its bytes), ``item<id>`` a collection item (its
    external id and image path)."""
    items = sorted(_item_ids(folder))
    path = folder / "ids.tsv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["id", "line", "caption", "image", "external_id"])
        for j in ps.rows:
            w.writerow([f"r{j}", pairs[j].line, pairs[j].caption, str(pairs[j].image), ""])
        for g in sorted(ps.group_rows()):
            w.writerow([f"img{g}", "", "", str(ps.groups[g][1]), ""])
        for it in sorted(c.store.items(items).values(), key=lambda x: x.id):
            w.writerow([f"item{it.id}", "", "", it.image_path, it.external_id])
    return path
