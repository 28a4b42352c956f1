"""The vtfusion web front end (Streamlit): search, collection, evaluation.

Start it with ``vtfusion ui COLLECTION``; the collection folder comes from the environment
(``VTFUSION_COLLECTION``), never from the page's query string. Thin by design: one cached
engine loader, ``*_ui()`` functions that draw widgets and return values, and ``render_*``
functions that take result objects. Search, ingest and evaluation are the library's.
"""

from __future__ import annotations

import io
import logging
import os
import re
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import streamlit as st
from PIL import Image

from vtfusion.indexer import filters, lifecycle
from vtfusion.catalogs.sources import SOURCE_SUFFIXES
from vtfusion.indexer.collection import Collection
from vtfusion.indexer.ingest import ingest
from vtfusion.models.preprocess import ImageError, load_image
from vtfusion.search.engine import ItemQuery, SearchEngine
from vtfusion.search.report import LATENCY_KEYS, key_depth
from vtfusion.search.explain import explain
from vtfusion.search.results import SearchResult

log = logging.getLogger("vtfusion.ui")

COLLECTION_ENV = "VTFUSION_COLLECTION"
READ_ONLY_ENV = "VTFUSION_READ_ONLY"  # "1": open the collection read-only (a search front end beside writers elsewhere)
MAX_IMAGE_UPLOAD = 20 * 2**20  # bytes, query images
MAX_IMAGE_PIXELS = 40_000_000  # query images (decompression bombs)
MAX_ARCHIVE_UNPACKED = 2 * 2**30  # bytes, all members of an uploaded ZIP together
MAX_ARCHIVE_MEMBERS = 200_000
THUMB = 256  # thumbnail side, pixels
COLUMNS = 4  # result grid width
DEPTHS = [16, 32, 64, 128, 256]
PAGES = ["Search", "Collection", "Evaluation"]


class UploadError(ValueError):
    """An upload that is refused: too big, not what it claims to be, or unsafe to unpack."""


# ---- the one cached loader ------------------------------------------------------------------


@st.cache_resource(show_spinner="Loading the collection and its model…")
def load_engine(folder: str, read_only: bool = False) -> SearchEngine:
    return SearchEngine(Collection.open(folder, read_only=read_only))


def read_only() -> bool:
    return os.environ.get(READ_ONLY_ENV, "").strip().lower() in ("1", "true", "yes")


def collection_folder() -> str:
    folder = os.environ.get(COLLECTION_ENV, "")
    if not folder:
        raise RuntimeError(f"no collection: start the app with `vtfusion ui COLLECTION` (or set {COLLECTION_ENV})")
    return folder


# ---- pure helpers (tested without Streamlit) -------------------------------------------------


def image_from_upload(name: str, data: bytes) -> Image.Image:
    """An uploaded query image, decoded and checked; UploadError says why not."""
    if len(data) > MAX_IMAGE_UPLOAD:
        raise UploadError(f"{name}: {len(data) / 2**20:.1f} MB is over the {MAX_IMAGE_UPLOAD // 2**20} MB limit for query images")
    if not data:
        raise UploadError(f"{name}: the file is empty")
    try:
        return load_image(io.BytesIO(data), max_pixels=MAX_IMAGE_PIXELS, name=name)
    except ImageError as e:
        raise UploadError(str(e)) from e


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).name).strip("._") or "upload"


def unpack_upload(name: str, data: bytes, dest: Path) -> Path:
    """Write an uploaded catalog under ``dest`` and return what to ingest: the catalog file
    (CSV / JSONL / Parquet), or for a ZIP the catalog file inside it (or its folder of images).

    ZIP members with absolute paths or ``..`` are refused, as are archives that unpack to more
    than MAX_ARCHIVE_UNPACKED bytes or MAX_ARCHIVE_MEMBERS files (zip bombs).
    """
    dest.mkdir(parents=True, exist_ok=True)
    fname = safe_name(name)
    suffix = Path(fname).suffix.lower()
    if suffix in SOURCE_SUFFIXES:
        out = dest / fname
        out.write_bytes(data)
        return out
    if suffix != ".zip":
        raise UploadError(f"{name}: upload a catalog file ({', '.join(sorted(SOURCE_SUFFIXES))}) or a .zip of one with its images")
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as e:
        raise UploadError(f"{name}: not a readable ZIP archive") from e
    with zf:
        members = zf.infolist()
        if len(members) > MAX_ARCHIVE_MEMBERS:
            raise UploadError(f"{name}: {len(members)} files is over the limit of {MAX_ARCHIVE_MEMBERS}")
        if sum(m.file_size for m in members) > MAX_ARCHIVE_UNPACKED:
            raise UploadError(f"{name}: unpacks to more than {MAX_ARCHIVE_UNPACKED // 2**30} GB")
        root = dest.resolve()
        for m in members:
            target = (dest / m.filename).resolve()
            if m.filename.startswith(("/", "\\")) or not target.is_relative_to(root):
                raise UploadError(f"{name}: member {m.filename!r} would be written outside the upload folder")
        zf.extractall(dest)
    catalogs = sorted(
        (p for p in dest.rglob("*") if p.is_file() and p.suffix.lower() in SOURCE_SUFFIXES and "__MACOSX" not in p.parts),
        key=lambda p: (len(p.parts), str(p)),
    )
    return catalogs[0] if catalogs else dest


def thumbnail(path: str, roots: list[Path], side: int = THUMB) -> Image.Image:
    """The item image at ``path``, if it lies under a registered source root (MediaError if not)."""
    img = load_image(lifecycle.media_path(path, roots))
    img.thumbnail((side, side))
    return img


def moved_label(moved: int, reranked: bool) -> str:
    if not reranked:
        return "not reranked"
    return f"▲{moved}" if moved > 0 else f"▼{-moved}" if moved < 0 else "="


def scores_line(hit) -> str:
    itm = "–" if hit.itm is None else f"{hit.itm:.3f}"
    return f"ITC cosine **{hit.itc:.3f}** · ITM prob **{itm}** · fused **{hit.fused:.3f}**"


def report_tables(report: dict) -> dict[str, list[dict]]:
    """report.json -> one table (list of rows) per direction."""
    out = {}
    for direction in ("t2i", "i2t"):
        rows = []
        for key, m in report.get(direction, {}).items():
            lat = report.get(LATENCY_KEYS[direction], {}).get(key, {}).get("total", {})
            rows.append({
                "stage": key, **{k: m.get(k) for k in ("R@1", "R@5", "R@10", "MRR", "nDCG@10")},
                "win/tie/loss": f"{m['wins']}/{m['ties']}/{m['losses']}" if "wins" in m else None,
                "p vs ITC (Holm)": m.get("p_value_vs_itc"), "mean ms": lat.get("mean"), "p95 ms": lat.get("p95"),
            })
        out[direction] = rows
    return out


# ---- search page ------------------------------------------------------------------------------


@dataclass
class SearchRequest:
    query: object  # str | PIL image | ItemQuery
    label: str  # what the query is, in words
    target: str
    k: int
    rerank_depth: int
    fusion: str
    where: str = ""
    compare: bool = False  # show the retrieval-only order beside the reranked one


def filters_ui(engine: SearchEngine) -> str:
    """Widgets generated from the collection's metadata columns -> a filter expression."""
    any_of, ranges = {}, {}
    with st.sidebar.expander("Filters", expanded=False):
        for f in lifecycle.facets(engine.c):
            if f.kind == "number" and f.high > f.low:
                lo, hi = st.slider(f.name, f.low, f.high, (f.low, f.high), key=f"f_{f.name}")
                if (lo, hi) != (f.low, f.high):
                    ranges[f.name] = (lo, hi)
            elif f.kind == "text" and f.values:
                picked = st.multiselect(f.name, f.values, key=f"f_{f.name}")
                if picked:
                    any_of[f.name] = picked
        extra = st.text_input("Expression", key="f_expr", placeholder="price < 20 AND color IN ('red', 'blue')",
                              help="The filter grammar of `vtfusion search --where`; ANDed with the widgets above.")
    return filters.build(any_of, ranges, extra)


def query_ui(engine: SearchEngine) -> SearchRequest | None:
    st.sidebar.header("Search settings")
    target = st.sidebar.radio("Find", ["image", "text"], horizontal=True, key="target",
                              format_func=lambda t: {"image": "images", "text": "texts"}[t])
    k = st.sidebar.slider("Results (k)", 1, 48, 12, key="k")
    rerank = st.sidebar.toggle("Rerank with cross-attention (ITM)", value=True, key="rerank")
    depth = st.sidebar.select_slider("Rerank depth", DEPTHS, value=32, key="depth", disabled=not rerank)
    fusion = st.sidebar.selectbox("Fusion", ["itm+itc", "itm", "itc"], key="fusion", disabled=not rerank,
                                  help="itm+itc: ITM logit + scaled ITC similarity (default); itm: ITM alone")
    compare = st.sidebar.toggle("Show retrieval order side by side", value=False, key="compare")
    where = filters_ui(engine)

    text = st.text_input("Search", key="q_text", placeholder="a red striped mug")
    upload = st.file_uploader("…or search with an image", type=["jpg", "jpeg", "png", "webp", "gif", "bmp"], key="q_image",
                              max_upload_size=MAX_IMAGE_UPLOAD // 2**20)
    common = dict(target=target, k=k, rerank_depth=depth if rerank else 0, fusion=fusion, where=where, compare=compare)

    more = st.session_state.get("more_like")
    if more is not None:
        c1, c2 = st.columns([4, 1])
        c1.info(f"More like item #{more}")
        if c2.button("Clear", key="clear_more"):
            st.session_state.pop("more_like", None)
            st.rerun()
        return SearchRequest(ItemQuery(int(more)), f"item #{more}", **common)
    if upload is not None:
        img = image_from_upload(upload.name, upload.getvalue())  # UploadError is shown by main()
        st.image(img, caption=f"query image: {upload.name}", width=160)
        return SearchRequest(img, f"image {upload.name}", **common)
    if text.strip():
        return SearchRequest(text.strip(), f"“{text.strip()}”", **common)
    return None


def _more_like(item_id: int) -> None:
    st.session_state["more_like"] = item_id
    st.session_state.pop("explain", None)


def _explain(item_id: int) -> None:
    st.session_state["explain"] = item_id


def render_hit(engine: SearchEngine, hit, result: SearchResult, roots: list[Path], key: str, explainable: bool) -> None:
    if result.target == "image":
        try:
            st.image(thumbnail(hit.image_path, roots), width="stretch")
        except (lifecycle.MediaError, ImageError) as e:
            st.warning(f"image not shown: {e}")
    title = str(hit.meta.get("title") or hit.text.split(" | ")[0])
    st.markdown(f"**{hit.rank}. {title[:90]}**")
    if result.target == "text":
        st.markdown(f"> {hit.text[:400]}")
    meta = [f"{k}: {v}" for k, v in hit.meta.items() if k != "title"][:8]
    st.caption(" · ".join([f"id {hit.external_id}", *meta]))
    st.markdown(scores_line(hit))
    st.caption(f"retrieval rank {hit.retrieval_rank} · {moved_label(hit.moved, hit.itm is not None)}")
    b1, b2 = st.columns(2)
    b1.button("Similar", help="More like this: search with this item's image", key=f"more_{key}_{hit.item_id}", on_click=_more_like, args=(hit.item_id,))
    if explainable:
        b2.button("Why?", key=f"why_{key}_{hit.item_id}", on_click=_explain, args=(hit.item_id,))


def render_grid(engine: SearchEngine, result: SearchResult, roots: list[Path], key: str, explainable: bool, width: int = COLUMNS) -> None:
    if not result.hits:
        st.warning("No results.")
        return
    for start in range(0, len(result.hits), width):
        cols = st.columns(width)
        for col, hit in zip(cols, result.hits[start : start + width]):
            with col.container(border=True):
                render_hit(engine, hit, result, roots, key, explainable)


def render_summary(req: SearchRequest, result: SearchResult) -> None:
    how = f"reranked top {result.rerank_depth} by {result.fusion}" if result.rerank_depth else "ITC order (no rerank)"
    bits = [f"{len(result.hits)} {result.target}s for {req.label}", how]
    if result.matching is not None:
        bits.append(f"{result.matching} items match the filter")
    if result.cache_misses:
        bits.append(f"{result.cache_misses} token-cache misses re-encoded")
    st.markdown(" · ".join(bits))
    for note in result.notes:
        st.info(note)


def render_timings(result: SearchResult) -> None:
    total = sum(result.timings_ms.values())
    parts = [f"{stage} {ms:.1f} ms" for stage, ms in result.timings_ms.items()]
    st.caption("Timings: " + " · ".join(parts) + f" · total {total:.1f} ms")


def render_explanation(engine: SearchEngine, text: str, item_id: int) -> None:
    with st.spinner("Computing cross-attention…"):
        ex = explain(engine.c, text, item_id)
    st.subheader(f"Why item #{item_id}?")
    c1, c2 = st.columns(2)
    c1.image(ex.image, caption="as the model sees it", width="stretch")
    c2.image(ex.overlay, caption=f"cross-attention from “{text}” · ITM prob {ex.itm:.3f}", width="stretch")
    st.caption("Mean attention of the query's words onto the image grid, over all fusion layers and heads.")


def search_page(engine: SearchEngine) -> None:
    st.title("vtfusion search")
    req = query_ui(engine)
    if req is None:
        st.info("Type a query, upload an image, or pick “More like this” on a result.")
        return
    result = engine.search(req.query, target=req.target, k=req.k, where=req.where or None,
                           rerank_depth=req.rerank_depth, fusion=req.fusion)
    roots = lifecycle.source_roots(engine.c)
    explainable = isinstance(req.query, str) and req.target == "image" and engine.c.bundle.has_itm
    render_summary(req, result)
    if req.compare:
        base = engine.search(req.query, target=req.target, k=req.k, where=req.where or None, rerank_depth=0)
        left, right = st.columns(2)
        with left:
            st.subheader("Reranked")
            render_grid(engine, result, roots, "final", explainable, width=2)
        with right:
            st.subheader("Retrieval only (ITC)")
            render_grid(engine, base, roots, "base", explainable, width=2)
    else:
        render_grid(engine, result, roots, "final", explainable)
    render_timings(result)
    chosen = st.session_state.get("explain")
    if explainable and chosen is not None and chosen in {h.item_id for h in result.hits}:
        render_explanation(engine, req.query, chosen)


# ---- collection page --------------------------------------------------------------------------


def render_stats(stats: dict) -> None:
    c = st.columns(4)
    c[0].metric("Active items", stats["items_active"])
    c[1].metric("Image vectors", stats["embeddings"].get("image", 0))
    c[2].metric("Text vectors", stats["embeddings"].get("text", 0))
    c[3].metric("Ingest errors", stats["ingest_errors"])
    idx = ", ".join(f"{m}: {v['factory']} ({v['count']})" for m, v in stats["indexes"].items()) or "none yet"
    tc = stats["token_cache"]
    st.markdown(
        f"- **Indexes**: {idx}\n- **Model**: `{stats['model']}` (fingerprint `{stats['model_fingerprint'][:12]}`)\n"
        f"- **Database**: `{stats['db']}`\n- **Token cache**: {tc['records']} records, {tc['dtype']}, "
        f"{tc['bytes_per_image'] / 1024:.1f} kB per image\n- **Deleted / replaced**: {stats['items_deleted']} / {stats['items_replaced']}"
    )


def ingest_ui(engine: SearchEngine) -> None:
    st.subheader("Ingest")
    tab_up, tab_path = st.tabs(["Upload", "Server path"])
    source = None
    with tab_up:
        up = st.file_uploader("A catalog (CSV, JSONL, Parquet) or a ZIP with a catalog and its images",
                              type=["csv", "jsonl", "parquet", "gz", "zip"], key="ingest_upload")
        if up is not None and st.button("Ingest upload", key="ingest_upload_go"):
            dest = engine.c.folder / "uploads" / f"{time.strftime('%Y%m%d-%H%M%S')}-{safe_name(up.name)}"
            source = unpack_upload(up.name, up.getvalue(), dest)
    with tab_path:
        path = st.text_input("Catalog file or image folder on the server", key="ingest_path")
        if st.button("Ingest path", key="ingest_path_go") and path.strip():
            p = Path(path.strip()).expanduser()
            if not p.exists():
                st.error(f"{p} does not exist on the server")
            else:
                source = p
    if source is None:
        return
    bar = st.progress(0.0, text=f"ingesting {source.name}…")

    def progress(done: int, total: int) -> None:
        bar.progress(done / max(total, 1), text=f"ingesting {source.name}: {done}/{total}")

    rep = ingest(engine.c, source, workers=0, progress=False, on_progress=progress)  # no fork in the server
    bar.progress(1.0, text="done")
    st.success(f"{rep.added} added, {rep.duplicates} already there, {rep.replaced} replaced, {rep.failed} failed "
               f"in {rep.seconds:.1f} s")


def collection_page(engine: SearchEngine) -> None:
    st.title("Collection")
    st.caption(str(engine.c.folder))
    render_stats(lifecycle.stats(engine.c))
    if engine.c.read_only:
        st.info("Read-only: this front end searches the collection and follows what writers elsewhere ingest or "
                "delete; it ingests nothing (start it without --read-only to ingest here).")
    else:
        ingest_ui(engine)
    st.subheader("Ingest errors")
    errs = lifecycle.errors(engine.c, limit=500)
    if errs:
        st.dataframe([{"run": e.run_id, "file": e.file, "line": e.line, "reason": e.reason} for e in errs], width="stretch")
    else:
        st.caption("None recorded.")
    st.subheader("Verify")
    if st.button("Verify SQL ↔ FAISS ↔ token cache", key="verify_go"):
        with st.spinner("Verifying…"):
            rep = lifecycle.verify(engine.c)
        if rep.ok:
            st.success("Consistent: every active item is indexed once in both indexes and has its tokens.")
        for p in rep.problems:
            st.error(p)
        for n in rep.notes:
            st.caption(n)


# ---- evaluation page --------------------------------------------------------------------------


def render_report(report: dict) -> None:
    st.caption(f"{report.get('images', '?')} images, {report.get('texts', '?')} captions · gallery {report.get('gallery', 'pairs')} · "
               f"fusion {report.get('fusion', '?')}")
    if report.get("skipped"):
        st.warning(f"{len(report['skipped'])} rows of the pairs file were not evaluated; first: "
                   + "; ".join(f"line {x['line']}: {x['reason']}" for x in report["skipped"][:3]))
    tables = report_tables(report)
    recall, latency = {}, {}
    for direction, title in (("t2i", "text → image"), ("i2t", "image → text")):
        rows = tables[direction]
        if not rows:
            continue
        st.subheader(title)
        st.dataframe(rows, width="stretch", hide_index=True)
        for r in rows:
            recall.setdefault(key_depth(r["stage"]), {})[f"{direction} R@1"] = r["R@1"]
    for direction, lat_key in LATENCY_KEYS.items():
        for key, stages in report.get(lat_key, {}).items():
            latency.setdefault(key_depth(key), {})[f"{direction} mean ms"] = stages.get("total", {}).get("mean")
            latency[key_depth(key)][f"{direction} p95 ms"] = stages.get("total", {}).get("p95")
    c1, c2 = st.columns(2)
    with c1:
        st.markdown("**Recall@1 vs rerank depth** (0 = ITC only)")
        st.line_chart(_frame(recall))
    with c2:
        st.markdown("**Query latency vs rerank depth**")
        st.line_chart(_frame(latency))


def _frame(by_depth: dict[int, dict]):
    import pandas as pd

    return pd.DataFrame.from_dict(by_depth, orient="index").sort_index().rename_axis("depth")


def evaluation_page(engine: SearchEngine) -> None:
    import json

    from vtfusion.search.evaluate import evaluate
    from vtfusion.search.report import write_report

    st.title("Evaluation")
    mode = st.radio("Source", ["Open a saved report", "Run an evaluation"], horizontal=True, key="eval_mode", label_visibility="collapsed")
    report = None
    if mode == "Open a saved report":
        up = st.file_uploader("report.json", type=["json"], key="report_upload")
        path = st.text_input("…or its path on the server", key="report_path")
        if up is not None:
            report = json.loads(up.getvalue())
        elif path.strip():
            report = json.loads(Path(path.strip()).expanduser().read_text())
    else:
        pairs = st.text_input("Pairs file on the server (CSV of image,caption, Karpathy or BLIP annotation JSON)", key="eval_pairs")
        depths = st.text_input("Rerank depths", "0,16,32,64,128", key="eval_depths")
        gallery = st.radio("Gallery", ["pairs", "collection"], horizontal=True, key="eval_gallery",
                           help="pairs: rank the pairs' own images and captions; collection: rank every item of this collection")
        out = st.text_input("Write the report to (optional folder)", key="eval_out")
        if st.button("Run evaluation", key="eval_go") and pairs.strip():
            ds = [int(d) for d in depths.replace(" ", "").split(",") if d]
            with st.spinner("Encoding the pairs, ranking both directions, timing searches…"):
                report = evaluate(engine.c, Path(pairs.strip()).expanduser(), depths=ds, progress=False, gallery=gallery,
                                  trec_dir=Path(out.strip()).expanduser() / "trec" if out.strip() else None).to_dict()
            st.session_state["eval_report"] = report
            if out.strip():
                written = write_report(report, Path(out.strip()).expanduser())
                st.success("Wrote " + ", ".join(str(p) for p in written))
        report = report or st.session_state.get("eval_report")
    if report is not None:
        if not isinstance(report, dict) or "t2i" not in report:
            raise ValueError("not a vtfusion report.json (no 't2i' section)")
        render_report(report)


# ---- main -------------------------------------------------------------------------------------


def main() -> None:
    st.set_page_config(page_title="vtfusion", layout="wide")
    try:
        engine = load_engine(collection_folder(), read_only())
        engine.c.refresh()  # another process may have ingested or deleted since the last run
        page = st.sidebar.radio("Page", PAGES, key="page")
        {"Search": search_page, "Collection": collection_page, "Evaluation": evaluation_page}[page](engine)
    except Exception as e:  # noqa: BLE001 - the page shows a message, never a traceback
        log.exception("ui error")
        st.error(f"{type(e).__name__}: {e}" if not isinstance(e, (ValueError, RuntimeError)) else str(e))


if __name__ == "__main__":
    main()
