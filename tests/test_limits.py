"""Issue 17: hostile or oversized input gets a message, never a traceback or a raw database error."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from vtfusion.indexer.collection import Collection
from vtfusion.indexer.ingest import ingest
from vtfusion.ui.cli import app


@pytest.fixture
def col(tmp_path, model_dir, small_catalog, db_url):
    c = Collection.init(tmp_path / "c", model_dir, db_url=db_url)
    ingest(c, small_catalog / "test.csv", workers=0, progress=False)
    return tmp_path / "c"


@pytest.mark.parametrize(
    "where, message",
    [
        ("NOT " * 2000 + "price > 1", "nested deeper than 32 levels"),
        ("(" * 400 + "price > 1" + ")" * 400, "nested deeper than 32 levels"),
        (" OR ".join(f"price = {i}" for i in range(1200)), "more than 256 comparisons"),
        ("price > 99999999999999999999999", "out of range (64-bit)"),
        ("id = -9223372036854775809", "out of range (64-bit)"),
        ("price < 1e999", "out of range"),
        ("color IN (" + ", ".join(f"'c{i}'" for i in range(1500)) + ")", "more than 1000 values"),
    ],
)
def test_oversized_filters_are_refused_with_a_message(col, where, message):
    for argv in (["search", str(col), "a red mug", "--where", where], ["delete", str(col), "--where", where, "--dry-run"]):
        r = CliRunner().invoke(app, argv)
        assert r.exit_code == 1 and message in r.output, (argv[0], r.output[-300:])
        assert "Traceback" not in r.output and r.exception is None or isinstance(r.exception, SystemExit)


def test_the_largest_allowed_filters_run(col):
    ok = [
        " OR ".join(f"price = {i}" for i in range(256)),
        "(" * 16 + "price > 1" + ")" * 16,
        "id < 9223372036854775807 AND price IN (" + ", ".join(str(i) for i in range(1000)) + ")",
    ]
    for where in ok:
        r = CliRunner().invoke(app, ["search", str(col), "a red mug", "--where", where, "--rerank-depth", "0"])
        assert r.exit_code == 0, r.output[-500:]


@pytest.mark.parametrize("item", ["99999999999999999999999", "-5", "0"])
def test_item_ids_out_of_range_are_a_message(col, item):
    r = CliRunner().invoke(app, ["search", str(col), "--item", item])
    assert r.exit_code in (1, 2) and "Traceback" not in r.output
    assert "no active item" in r.output or "Invalid value" in r.output


# ---- index types checked at the door --------------------------------------------------------------


@pytest.mark.parametrize(
    "factory, message",
    [("HNSW32", "cannot remove vectors"), ("Foo123", "FAISS cannot build index 'Foo123'"), ("IVF4,Flat,Refine(Flat)", "cannot remove vectors"),
     ("IDMap2,Flat", "ids are mapped by vtfusion"), ("IVF16,PQ5", "FAISS cannot build")],
)
def test_unusable_index_factories_are_refused_at_init_and_reindex(tmp_path, model_dir, small_catalog, factory, message):
    r = CliRunner().invoke(app, ["init", str(tmp_path / "c"), "--model", str(model_dir), "--index", factory])
    assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output, r.output
    c = Collection.init(tmp_path / "ok", model_dir)
    ingest(c, small_catalog / "test.csv", workers=0, progress=False)
    r = CliRunner().invoke(app, ["reindex", str(tmp_path / "ok"), "--index", factory])
    assert r.exit_code == 1 and message in r.output
    from vtfusion.indexer.lifecycle import verify

    c = Collection.open(tmp_path / "ok")
    assert c.config.index_factory == "auto" and verify(c).ok


def test_a_collection_stuck_with_hnsw_says_how_to_get_out(tmp_path, model_dir, small_catalog):
    """Made before factories were checked: its toml names HNSW32. Every command says to
    reindex with a supported factory, and that works."""
    c = Collection.init(tmp_path / "c", model_dir)
    ingest(c, small_catalog / "test.csv", workers=0, progress=False)
    toml = tmp_path / "c" / "collection.toml"
    toml.write_text(toml.read_text().replace('index_factory = "auto"', 'index_factory = "HNSW32"'))
    for argv in (["search", str(tmp_path / "c"), "a red mug"], ["stats", str(tmp_path / "c")], ["reindex", str(tmp_path / "c")]):
        r = CliRunner().invoke(app, argv)
        assert r.exit_code == 1 and "cannot remove vectors" in r.output and "Traceback" not in r.output, (argv, r.output)
    assert "--index auto" in CliRunner().invoke(app, ["search", str(tmp_path / "c"), "a red mug"]).output
    assert CliRunner().invoke(app, ["reindex", str(tmp_path / "c"), "--index", "auto"]).exit_code == 0
    assert CliRunner().invoke(app, ["delete", str(tmp_path / "c"), "--where", "price > 40", "--yes"]).exit_code == 0


def test_pq_on_too_few_vectors_falls_back_to_exact_and_nprobe_is_a_setting(tmp_path, model_dir, small_catalog):
    import numpy as np

    from vtfusion.search.engine import SearchEngine, SearchError

    c = Collection.init(tmp_path / "pq", model_dir, index_factory="IVF4,PQ4")  # 256 codewords: more than the items
    ingest(c, small_catalog / "train.csv", workers=0, progress=False)
    assert c.indexes["image"].factory == "Flat"
    c = Collection.init(tmp_path / "ivf", model_dir, index_factory="IVF1,Flat", nprobe=1)
    ingest(c, small_catalog / "train.csv", workers=0, progress=False)
    assert c.indexes["image"].factory == "IVF1,Flat" and c.indexes["image"].nprobe == 1
    assert Collection.open(tmp_path / "ivf").indexes["text"].nprobe == 1  # the collection's default, kept
    e = SearchEngine(c)
    a = e.search("a red mug", k=5, rerank_depth=0, nprobe=1)
    b = e.search("a red mug", k=5, rerank_depth=0, nprobe=50)  # more lists than exist: all of them
    assert [h.item_id for h in a.hits] == [h.item_id for h in b.hits]
    with pytest.raises(SearchError, match="nprobe must be at least 1"):
        e.search("a red mug", nprobe=0)
    r = CliRunner().invoke(app, ["search", str(tmp_path / "ivf"), "a red mug", "--nprobe", "3", "--json"])
    assert r.exit_code == 0, r.output
    assert np.isfinite([h["itc"] for h in __import__("json").loads(r.output)["hits"]]).all()


# ---- files are opened safely ------------------------------------------------------------------------

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 48 48\nnewpath 0 0 moveto 48 0 lineto 48 48 lineto closepath fill\nshowpage\n"


def _install_ghostscript() -> bool:
    """Debian's ghostscript (what PIL hands EPS to), as the browser tests install Chromium."""
    import os
    import shutil
    import subprocess

    if shutil.which("gs"):
        return True
    if shutil.which("apt-get") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "ghostscript"]
        if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
            subprocess.run(cmd, env=env, capture_output=True)
    return shutil.which("gs") is not None


def test_eps_named_jpg_is_a_row_error_even_with_ghostscript(tmp_path, model_dir, small_catalog):
    import os
    import shutil

    from PIL import Image

    if not _install_ghostscript():
        if os.environ.get("CI"):
            pytest.fail("ghostscript could not be installed")
        pytest.skip("ghostscript not installable here")
    cat = tmp_path / "cat"
    shutil.copytree(small_catalog, cat)
    (cat / "images" / "evil.jpg").write_bytes(EPS)
    assert Image.open(cat / "images" / "evil.jpg").format == "EPS"  # PIL alone would take it to Ghostscript
    imgs = sorted(p.name for p in (cat / "images").iterdir() if p.suffix == ".png")[:2]
    (cat / "mixed.csv").write_text(f"id,image,caption\na,images/{imgs[0]},a mug\nb,images/{imgs[1]},a hat\nevil,images/evil.jpg,a black square\n")
    c = Collection.init(tmp_path / "c", model_dir)
    r = ingest(c, cat / "mixed.csv", workers=0, progress=False)
    assert (r.added, r.failed) == (2, 1)
    from vtfusion.indexer.lifecycle import errors

    assert "not an image in an allowed format (JPEG, PNG, WebP, GIF, BMP, TIFF)" in errors(c)[0].reason
    res = CliRunner().invoke(app, ["search", str(tmp_path / "c"), "--image", str(cat / "images" / "evil.jpg")])
    assert res.exit_code == 1 and "not an image in an allowed format" in res.output and "Traceback" not in res.output


def test_folder_catalogs_do_not_follow_symlinks_out_of_the_folder(tmp_path, model_dir, small_catalog):
    import shutil

    from vtfusion.catalogs.sources import read_folder

    folder = tmp_path / "shop"
    (folder / "sub").mkdir(parents=True)
    imgs = sorted((small_catalog / "images").iterdir())
    shutil.copy(imgs[0], folder / "a.png")
    (folder / "a.txt").symlink_to("/etc/hostname")  # a caption from outside
    (folder / "b.png").symlink_to(imgs[1])  # an image from outside
    shutil.copy(imgs[2], folder / "sub" / "c.png")
    (folder / "c-link.png").symlink_to(folder / "sub" / "c.png")  # inside: fine
    (folder / "sub" / "c.txt").write_text("a small caption")
    rows, errs = read_folder(folder)
    assert sorted(r.external_id for r in rows) == ["c-link.png", "sub/c.png"]
    assert sorted((e.file.rsplit("/", 1)[1], "leaves the catalog folder" in e.reason) for e in errs) == [("a.txt", True), ("b.png", True)]
    hostname = open("/etc/hostname").read().strip()
    assert all(hostname not in t for r in rows for t in r.texts)


def test_control_characters_are_escaped_in_terminal_output(tmp_path, model_dir, small_catalog):
    import shutil

    cat = tmp_path / "cat"
    shutil.copytree(small_catalog, cat)
    img = sorted((cat / "images").iterdir())[0].name
    (cat / "esc.csv").write_text(f'id,image,caption\nx\x07y,images/{img},"a red mug \x1b[2J\x1b[31mOWNED\x1b[0m\r done"\n')
    c = Collection.init(tmp_path / "c", model_dir)
    ingest(c, cat / "esc.csv", workers=0, progress=False)
    for argv in (["search", str(tmp_path / "c"), "a red mug"], ["delete", str(tmp_path / "c"), "--where", "price > -1", "--dry-run"],
                 ["delete", str(tmp_path / "c"), "--ids", "x\x07y", "--dry-run"]):
        r = CliRunner().invoke(app, argv)
        assert "\x1b" not in r.output and "\x07" not in r.output and "\r" not in r.output, argv
    assert "\\x1b[31mOWNED" in CliRunner().invoke(app, ["search", str(tmp_path / "c"), "a red mug"]).output
