"""The Streamlit app, driven by Streamlit's AppTest over a real collection (SQLite): every page,
scores, rerank on/off, filters, uploads (good, bad, unsafe), "more like this", "why", and the
safety helpers (source roots, ZIP members, size caps)."""

from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vtfusion.indexer import lifecycle
from vtfusion.indexer.collection import Collection
from vtfusion.indexer.ingest import ingest
from vtfusion.search.engine import SearchEngine

APP = str(Path(__file__).resolve().parents[1] / "ui" / "app.py")
QUERY = "a large red checkered hat"


@pytest.fixture(scope="module")
def ui_col(tmp_path_factory, model_dir, small_catalog):
    folder = tmp_path_factory.mktemp("uicol") / "c"
    c = Collection.init(folder, model_dir)
    ingest(c, small_catalog / "train.csv", workers=0, progress=False)
    c.close()
    return folder


@pytest.fixture
def app(ui_col, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("VTFUSION_COLLECTION", str(ui_col))
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    return at


def run(at):
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def score_lines(at) -> list[str]:
    return [m.value for m in at.markdown if m.value.startswith("ITC cosine")]


def shown_ids(at) -> list[str]:
    """External ids in the order the hits are shown (from each card's caption)."""
    return [m.group(1) for c in at.caption if (m := re.match(r"id (\S+)", c.value))]


def engine(ui_col) -> SearchEngine:
    return SearchEngine(Collection.open(ui_col))


# ---- search page -------------------------------------------------------------------------------


def test_text_search_shows_hits_with_all_three_scores(app, ui_col):
    app.text_input(key="q_text").input(QUERY)
    run(app)
    lines = score_lines(app)
    assert len(lines) == 12  # default k
    for line in lines:
        itc, itm, fused = (float(x) for x in re.findall(r"\*\*(-?[\d.]+)\*\*", line))
        assert -1.0 <= itc <= 1.0 and 0.0 <= itm <= 1.0
    # the order and scores are the library's
    want = engine(ui_col).search(QUERY, k=12, rerank_depth=32)
    assert shown_ids(app) == [h.external_id for h in want.hits]
    assert any(c.value.startswith("Timings: encode") for c in app.caption)
    assert not app.error


def test_rerank_toggle_changes_order_metadata(app, ui_col):
    app.text_input(key="q_text").input(QUERY)
    run(app)
    moves = [c.value for c in app.caption if c.value.startswith("retrieval rank")]
    assert moves and all(re.search(r"(▲\d+|▼\d+|=)$", m) for m in moves)
    app.toggle(key="rerank").set_value(False)
    run(app)
    moves = [c.value for c in app.caption if c.value.startswith("retrieval rank")]
    assert moves == [f"retrieval rank {i} · not reranked" for i in range(1, 13)]
    assert all("ITM prob **–**" in line for line in score_lines(app))
    assert shown_ids(app) == [h.external_id for h in engine(ui_col).search(QUERY, k=12, rerank_depth=0).hits]
    assert any("ITC order (no rerank)" in m.value for m in app.markdown)


def test_side_by_side_shows_both_orders(app, ui_col):
    app.text_input(key="q_text").input(QUERY)
    app.toggle(key="compare").set_value(True)
    run(app)
    assert [s.value for s in app.subheader] == ["Reranked", "Retrieval only (ITC)"]
    ids = shown_ids(app)
    e = engine(ui_col)
    reranked = [h.external_id for h in e.search(QUERY, k=12, rerank_depth=32).hits]
    base = [h.external_id for h in e.search(QUERY, k=12, rerank_depth=0).hits]
    # two columns of two cards per row: rows interleave; each side keeps its own order
    assert sorted(ids) == sorted(reranked + base)
    assert [i for i in ids if i in set(reranked)][:2] == reranked[:2]


def test_filters_restrict_results(app, ui_col):
    facets = {f.name: f for f in lifecycle.facets(Collection.open(ui_col))}
    assert facets["price"].kind == "number" and facets["color"].kind == "text" and facets["color"].values
    color = facets["color"].values[0]
    app.text_input(key="q_text").input(QUERY)
    app.multiselect(key="f_color").set_value([color])
    run(app)
    want = engine(ui_col).search(QUERY, k=12, where=f"color IN ('{color}')", rerank_depth=32)
    assert 0 < len(want.hits) < 12
    assert shown_ids(app) == [h.external_id for h in want.hits]
    assert all(f"color: {color}" in c.value for c in app.caption if c.value.startswith("id "))
    # a numeric range too
    lo, hi = facets["price"].low, facets["price"].high
    mid = (lo + hi) / 2
    app.multiselect(key="f_color").set_value([])
    app.slider(key="f_price").set_value((lo, mid))
    run(app)
    prices = [float(re.search(r"price: ([\d.]+)", c.value).group(1)) for c in app.caption if c.value.startswith("id ")]
    assert prices and all(p <= mid for p in prices)


def test_bad_filter_expression_is_a_message_not_a_traceback(app):
    app.text_input(key="q_text").input(QUERY)
    app.text_input(key="f_expr").input("nosuch = 1; DROP TABLE items")
    run(app)
    assert app.error and ("unknown column 'nosuch'" in app.error[0].value or "unexpected character ';'" in app.error[0].value)
    assert not score_lines(app)


def test_invalid_upload_shows_an_error(app):
    app.file_uploader(key="q_image").set_value(("photo.jpg", b"this is not a JPEG", "image/jpeg"))
    run(app)
    assert len(app.error) == 1 and "not an image" in app.error[0].value and "photo.jpg" in app.error[0].value
    assert not score_lines(app)


def test_image_upload_searches_images_and_texts(app, small_catalog):
    data = (small_catalog / "images" / "p000000.png").read_bytes()
    app.file_uploader(key="q_image").set_value(("q.png", data, "image/png"))
    run(app)
    assert len(score_lines(app)) == 12
    assert any("image→image" in n.value or "no image-text pair" in n.value for n in app.info)
    app.radio(key="target").set_value("text")
    run(app)
    lines = score_lines(app)
    assert len(lines) == 12 and all("ITM prob **0." in x or "ITM prob **1." in x for x in lines[:12])


def test_more_like_this_and_why(app):
    app.text_input(key="q_text").input(QUERY)
    run(app)
    first = shown_ids(app)[0]
    why = [b for b in app.button if b.key and b.key.startswith("why_final_")][0]
    item_id = int(why.key.rsplit("_", 1)[1])
    why.click()
    run(app)
    assert any(s.value == f"Why item #{item_id}?" for s in app.subheader)
    more = [b for b in app.button if b.key == f"more_final_{item_id}"][0]
    more.click()
    run(app)
    assert any(f"More like item #{item_id}" in i.value for i in app.info)
    assert first not in shown_ids(app)  # an item is left out of its own "more like this"
    app.button(key="clear_more").click()
    run(app)
    assert not any("More like item" in i.value for i in app.info)


# ---- collection page -----------------------------------------------------------------------------


def _catalog_zip(small_catalog: Path) -> bytes:
    buf = io.BytesIO()
    lines = (small_catalog / "test.csv").read_text().splitlines()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("cat/test.csv", "\n".join(lines[:4]) + "\nbad,images/missing.png,a title,a caption,mug,red,plain,small,1,2.0,\n")
        for line in lines[1:4]:
            img = line.split(",")[1]
            z.write(small_catalog / img, f"cat/{img}")
    return buf.getvalue()


def test_collection_page_stats_ingest_errors_verify(app, ui_col, small_catalog):
    app.radio(key="page").set_value("Collection")
    run(app)
    before = lifecycle.stats(Collection.open(ui_col))["items_active"]
    assert app.metric[0].label == "Active items" and int(app.metric[0].value) == before
    app.file_uploader(key="ingest_upload").set_value(("new.zip", _catalog_zip(small_catalog), "application/zip"))
    run(app)
    app.button(key="ingest_upload_go").click()
    run(app)
    assert any(s.value.startswith("3 added, 0 already there, 0 replaced, 1 failed") for s in app.success), [s.value for s in app.success]
    assert lifecycle.stats(Collection.open(ui_col))["items_active"] == before + 3
    table = app.dataframe[0].value
    assert any("missing.png" in r or "not found" in r for r in table["reason"])
    app.button(key="verify_go").click()
    run(app)
    assert any(s.value.startswith("Consistent") for s in app.success)


def test_unsafe_zip_upload_is_refused(app, ui_col):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("../../escape.csv", "id,image,caption\n")
    app.radio(key="page").set_value("Collection")
    run(app)
    app.file_uploader(key="ingest_upload").set_value(("evil.zip", buf.getvalue(), "application/zip"))
    run(app)
    app.button(key="ingest_upload_go").click()
    run(app)
    assert app.error and "outside the upload folder" in app.error[0].value
    assert not list(ui_col.parent.rglob("escape.csv"))


# ---- evaluation page ---------------------------------------------------------------------------


def test_evaluation_page_runs_and_opens_reports(app, ui_col, small_catalog, tmp_path):
    app.radio(key="page").set_value("Evaluation")
    run(app)
    app.radio(key="eval_mode").set_value("Run an evaluation")
    run(app)
    app.text_input(key="eval_pairs").input(str(small_catalog / "test.csv"))
    app.text_input(key="eval_depths").input("0,4,8")
    app.text_input(key="eval_out").input(str(tmp_path / "rep"))
    run(app)
    app.button(key="eval_go").click()
    run(app)
    assert (tmp_path / "rep" / "report.json").exists()
    assert [s.value for s in app.subheader] == ["text → image", "image → text"]
    t2i = app.dataframe[0].value
    assert list(t2i["stage"]) == ["itc", "rerank@4", "rerank@8"]
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert t2i["R@1"].tolist() == pytest.approx([report["t2i"][k]["R@1"] for k in ("itc", "rerank@4", "rerank@8")])
    i2t = app.dataframe[1].value  # each direction shows its own timings, not text -> image's
    for table, key in ((t2i, "latency_ms"), (i2t, "latency_ms_i2t")):
        assert table["mean ms"].tolist() == pytest.approx([report[key][k]["total"]["mean"] for k in ("itc", "rerank@4", "rerank@8")])
    assert len(app.get("arrow_line_chart")) == 2 or len(app.get("vega_lite_chart")) >= 2

    app.radio(key="eval_mode").set_value("Open a saved report")
    run(app)
    app.text_input(key="report_path").input(str(tmp_path / "rep" / "report.json"))
    run(app)
    assert [s.value for s in app.subheader] == ["text → image", "image → text"]
    app.text_input(key="report_path").input("")
    app.file_uploader(key="report_upload").set_value(("report.json", b'{"not": "a report"}', "application/json"))
    run(app)
    assert app.error and "not a vtfusion report.json" in app.error[0].value


# ---- helpers ------------------------------------------------------------------------------------


def test_media_path_only_serves_registered_roots(ui_col, small_catalog, tmp_path):
    from vtfusion.ui.app import thumbnail

    c = Collection.open(ui_col)
    roots = lifecycle.source_roots(c)
    assert small_catalog.resolve() in roots  # (and the folders of catalogs uploaded by other tests)
    assert all(r == small_catalog.resolve() or r.is_relative_to(ui_col / "uploads") for r in roots)
    ok = small_catalog / "images" / "p000000.png"
    assert lifecycle.media_path(ok, roots) == ok.resolve()
    assert thumbnail(str(ok), roots).size[0] <= 256
    outside = tmp_path / "secret.png"
    Image.new("RGB", (4, 4)).save(outside)
    link = small_catalog / "images" / "link.png"
    link.symlink_to(outside)
    try:
        for bad in (outside, small_catalog / ".." / outside.name, "/etc/passwd", small_catalog / "images" / ".." / ".." / "x", link):
            with pytest.raises(lifecycle.MediaError):
                lifecycle.media_path(bad, roots)
    finally:
        link.unlink()


def test_upload_caps_and_validation(tmp_path, monkeypatch):
    import vtfusion.ui.app as ui

    buf = io.BytesIO()
    Image.new("RGB", (8, 5), "red").save(buf, "PNG")
    assert ui.image_from_upload("ok.png", buf.getvalue()).size == (8, 5)
    with pytest.raises(ui.UploadError, match="empty"):
        ui.image_from_upload("e.png", b"")
    monkeypatch.setattr(ui, "MAX_IMAGE_UPLOAD", 10)
    with pytest.raises(ui.UploadError, match="over the 0 MB limit|over the"):
        ui.image_from_upload("big.png", buf.getvalue())
    monkeypatch.setattr(ui, "MAX_IMAGE_UPLOAD", 2**20)
    monkeypatch.setattr(ui, "MAX_IMAGE_PIXELS", 39)
    with pytest.raises(ui.UploadError, match="over the cap"):
        ui.image_from_upload("wide.png", buf.getvalue())
    with pytest.raises(ui.UploadError, match="catalog file"):
        ui.unpack_upload("x.exe", b"MZ", tmp_path / "u1")
    with pytest.raises(ui.UploadError, match="not a readable ZIP"):
        ui.unpack_upload("x.zip", b"PK-nope", tmp_path / "u2")
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("zeros.csv", b"\0" * 2_000_000)
    monkeypatch.setattr(ui, "MAX_ARCHIVE_UNPACKED", 1_000_000)
    with pytest.raises(ui.UploadError, match="unpacks to more than"):
        ui.unpack_upload("bomb.zip", bomb.getvalue(), tmp_path / "u3")
    assert not (tmp_path / "u3" / "zeros.csv").exists()
    assert ui.unpack_upload("../../a b.csv", b"id\n", tmp_path / "u4") == tmp_path / "u4" / "a_b.csv"


def test_ui_command_is_headless_and_quiet(tmp_path):
    from vtfusion.ui.cli import ui_command

    argv, env = ui_command(tmp_path, 8765, "127.0.0.1", 100)
    assert argv[1:5] == ["-P", "-m", "streamlit", "run"] and Path(argv[5]).name == "app.py"  # -P: no working folder on the path
    for flag in ("--server.headless=true", "--browser.gatherUsageStats=false", "--server.port=8765",
                 "--server.address=127.0.0.1", "--server.maxUploadSize=100", "--client.showErrorDetails=none"):
        assert flag in argv
    assert env["VTFUSION_COLLECTION"] == str(tmp_path.resolve())


@pytest.mark.parametrize("value", ["it's", 'say "hi"', "back\\slash", "a OR 1=1 --", "", "ünï", 3, -2.5])
def test_filter_literals_round_trip(value):
    from vtfusion.indexer import filters

    assert filters._Parser(filters.quote(value), {}).value() == value
    assert filters._Parser(f"color = {filters.quote(value)}", {}).toks[-1].kind == "end"


def test_filter_build():
    from vtfusion.indexer import filters

    assert filters.build() == ""
    assert filters.build({"color": ["red", "it's"], "size": []}, {"price": (1.5, 20)}, " n_objects > 1 ") == (
        "color IN ('red', 'it\\'s') AND price BETWEEN 1.5 AND 20 AND (n_objects > 1)"
    )
    with pytest.raises(filters.FilterError, match="cannot be named"):
        filters.build({"bad name; --": ["x"]})


def test_attention_map_hand_computed():
    import torch

    from vtfusion.search.explain import attention_map, blend

    # L = 5 text positions ([CLS], w1, w2, [SEP], pad), N = 1 pooled + 2x2 grid, 2 heads, 2 layers
    w = torch.zeros(1, 2, 5, 5)
    w[0, :, 0, 1] = 1.0  # [CLS] -> grid 0: ignored
    w[0, :, 1, 3] = 1.0  # w1 -> grid (1, 0)
    w[0, :, 2, 3] = w[0, :, 2, 4] = 0.5  # w2 -> grid (1, 0) and (1, 1)
    w[0, :, 3, 1] = 1.0  # [SEP]: ignored
    w[0, :, 4, 2] = 1.0  # padding: ignored
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    heat = attention_map([w, w], mask)
    # words average to grid [0, 0, 0.75, 0.25], scaled to [0, 1]
    assert heat == pytest.approx(np.array([[0.0, 0.0], [1.0, 1 / 3]]))
    img = Image.new("RGB", (40, 40), "white")
    out = blend(img, heat)
    assert out.size == (40, 40) and out.getpixel((5, 5)) != out.getpixel((5, 35))
    with pytest.raises(ValueError, match="square grid"):
        attention_map([torch.zeros(1, 1, 3, 4)], torch.ones(1, 3, dtype=torch.long))


def test_read_only_front_end_searches_follows_a_writer_and_ingests_nothing(model_dir, small_catalog, tmp_path, monkeypatch):
    """`vtfusion ui --read-only`: search works, the Collection page offers no ingest, nothing in the
    folder is written, and an ingest by another process shows up on the next run."""
    from streamlit.testing.v1 import AppTest

    from vtfusion.catalogs.sources import Columns
    from vtfusion.ui.cli import ui_command
    from test_read_only import _files

    c = Collection.init(tmp_path / "c", model_dir)
    ingest(c, small_catalog / "train.csv", Columns(), batch_size=16, workers=0, progress=False)
    assert ui_command(tmp_path / "c", 8765, "127.0.0.1", 100, read_only=True)[1]["VTFUSION_READ_ONLY"] == "1"
    assert ui_command(tmp_path / "c", 8765, "127.0.0.1", 100)[1]["VTFUSION_READ_ONLY"] == ""
    monkeypatch.setenv("VTFUSION_COLLECTION", str(tmp_path / "c"))
    monkeypatch.setenv("VTFUSION_READ_ONLY", "1")
    listing = _files(tmp_path / "c")
    at = AppTest.from_file(APP, default_timeout=120)
    run(at)
    at.text_input(key="q_text").set_value(QUERY)
    run(at)
    assert score_lines(at)
    at.radio(key="page").set_value("Collection")
    run(at)
    n = int(at.metric[0].value)
    assert any(i.value.startswith("Read-only") for i in at.info)
    assert not [b for b in at.button if b.key in ("ingest_upload_go", "ingest_path_go")]
    assert {k for k in _files(tmp_path / "c") if not k.startswith("catalog.db")} == {k for k in listing if not k.startswith("catalog.db")}
    ingest(c, small_catalog / "test.csv", Columns(), batch_size=16, workers=0, progress=False)  # a writer elsewhere
    run(at)
    assert int(at.metric[0].value) == c.indexes["image"].ntotal > n
