"""A bad-input corpus, generated here (nothing downloaded): broken and unusual images, hostile
paths, awkward CSVs. Each case gets its documented outcome (ingested correctly, or recorded as
an error with a clear reason), none stops the batch, and the table case -> outcome is printed
(`pytest -s tests/test_bad_inputs.py` shows it)."""

from __future__ import annotations

import csv
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from vtfusion.catalogs.sources import CatalogError, read_csv
from vtfusion.indexer.collection import Collection
from vtfusion.indexer.ingest import ingest
from vtfusion.indexer.lifecycle import errors, verify
from vtfusion.indexer.schema import Item
from vtfusion.models.preprocess import load_image


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _huge_png(w: int, h: int) -> bytes:
    """A valid PNG header claiming w x h pixels with a few bytes of data (a decompression bomb's shape)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _exif_rotated() -> bytes:
    img = Image.new("RGB", (40, 20), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    return _jpeg(img, exif=exif.tobytes())


def _animated_gif() -> bytes:
    frames = [Image.new("P", (16, 16), i) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


def _sixteen_bit_png() -> bytes:
    arr = (np.arange(24 * 24, dtype=np.uint16).reshape(24, 24) * 97).astype(np.uint16)
    img = Image.fromarray(arr)  # mode I;16
    assert img.mode.startswith("I;16")
    return _png(img)


def _palette_png() -> bytes:
    img = Image.new("P", (20, 20), 3)
    img.putpalette([i % 256 for i in range(768)])
    img.info["transparency"] = 0
    return _png(img)


good = Image.new("RGB", (32, 24), (20, 120, 200))
IMAGE_CASES = {
    # name: (file bytes, expected: "ok" or a substring of the recorded reason)
    "truncated JPEG (cut in the header)": (_jpeg(good)[:200], "not an image"),
    "truncated JPEG (cut in the scan data)": (_jpeg(Image.effect_noise((64, 64), 60).convert("RGB"), quality=95)[:-600], "corrupt or truncated"),
    "truncated PNG": (_png(Image.effect_noise((64, 64), 50).convert("RGB"))[:300], "corrupt or truncated"),
    "zero-byte file": (b"", "not an image"),
    "text file named .jpg": (b"hello, I am not a JPEG\n", "not an image"),
    "decompression bomb (PNG claiming 100000x100000)": (_huge_png(100_000, 100_000), "decompression bomb"),
    "20000x20000 image": (_huge_png(20_000, 20_000), "decompression bomb"),
    "1x1 image": (_png(Image.new("RGB", (1, 1), "white")), "ok"),
    "CMYK JPEG": (_jpeg(Image.new("CMYK", (30, 30), (0, 255, 255, 0))), "ok"),
    "16-bit PNG": (_sixteen_bit_png(), "ok"),
    "palette PNG with transparency": (_palette_png(), "ok"),
    "EXIF-rotated JPEG": (_exif_rotated(), "ok"),
    "animated GIF": (_animated_gif(), "ok"),
}
SUFFIX = {"text file named .jpg": ".jpg", "truncated JPEG (cut in the header)": ".jpg", "truncated JPEG (cut in the scan data)": ".jpg", "CMYK JPEG": ".jpg", "EXIF-rotated JPEG": ".jpg",
          "animated GIF": ".gif"}


@pytest.fixture
def corpus(tmp_path):
    """A CSV catalog with one row per case (plus row-level cases), and the expected outcomes."""
    root = tmp_path / "cat"
    (root / "img").mkdir(parents=True)
    rows, expect = [], {}
    for k, (name, (data, outcome)) in enumerate(IMAGE_CASES.items()):
        fname = f"img/case{k}{SUFFIX.get(name, '.png')}"
        (root / fname).write_bytes(data)
        rows.append({"id": f"c{k}", "image": fname, "caption": f"case {name}", "note": name})
        expect[f"c{k}"] = (name, outcome)
    ok_img = "img/ok.png"
    (root / ok_img).write_bytes(_png(good))
    (tmp_path / "outside.png").write_bytes(_png(good))
    row_cases = [
        ("absolute image path", {"image": str(tmp_path / "outside.png")}, "points outside the catalog folder"),
        ("../ path escaping the folder", {"image": "../outside.png"}, "points outside the catalog folder"),
        ("missing image file", {"image": "img/nope.png"}, "not found"),
        ("empty text", {"caption": ""}, "no text"),
        ("1 MB text", {"caption": "x" * 1_000_000}, "text longer than"),
        ("quotes and newlines inside fields", {"caption": 'a "quoted"\nmulti-line, comma caption'}, "ok"),
        ("duplicate id (second row)", {"id": "c7"}, "duplicate id"),
    ]
    for j, (name, over, outcome) in enumerate(row_cases):
        rid = over.get("id", f"r{j}")
        row = {"id": f"r{j}", "image": ok_img, "caption": f"row case {j}", "note": name, **over}
        rows.append(row)
        expect.setdefault(rid if rid != "c7" else "dup", (name, outcome))
    csv_path = root / "catalog.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["id", "image", "caption", "note"])
        w.writeheader()
        w.writerows(rows)
    # a row that is not UTF-8, appended as raw bytes
    with open(csv_path, "ab") as f:
        f.write(b"nonutf8," + ok_img.encode() + b",caf\xe9 au lait,latin-1 row\r\n")
    expect["nonutf8"] = ("non-UTF-8 CSV row", "not UTF-8")
    return csv_path, expect


def test_bad_input_corpus_outcomes(tmp_path, corpus, model_dir):
    csv_path, expect = corpus
    c = Collection.init(tmp_path / "col", model_dir)
    rep = ingest(c, csv_path, workers=0, progress=False)
    with c.Session() as s:
        stored = {i.external_id: i for i in s.scalars(select(Item))}
    errs = errors(c, limit=1000)
    lines = csv_path.read_bytes().split(b"\n")

    def reason_for(ext_id: str) -> str | None:
        for e in errs:
            raw = lines[e.line - 1] if 0 < e.line <= len(lines) else b""
            if raw.startswith(ext_id.encode() + b","):
                return e.reason
        return None

    table, failures = [], []
    for ext_id, (name, outcome) in expect.items():
        if ext_id == "dup":
            got = next((e.reason for e in errs if "duplicate id" in e.reason), None)
            ok = got is not None and "c7" in got and "c7" in stored  # the first row with that id stays
        elif outcome == "ok":
            got = "ingested" if ext_id in stored else f"NOT ingested: {reason_for(ext_id)}"
            ok = ext_id in stored
        else:
            got = reason_for(ext_id)
            ok = ext_id not in stored and got is not None and outcome in got
        table.append((name, got or "(nothing recorded)"))
        if not ok:
            failures.append((name, outcome, got))
    width = max(len(n) for n, _ in table)
    print("\n" + "\n".join(f"{n:<{width}}  {o[:110]}" for n, o in table))
    assert not failures, failures
    assert rep.added == len(stored) and rep.failed == len(errs)
    assert verify(c).ok
    # the unusual-but-valid images became sensible RGB inputs
    text_row = stored["r5"]
    assert "\n" in text_row.text and '"quoted"' in text_row.text
    rotated = load_image(Path(stored[[k for k, (n, _) in expect.items() if n == "EXIF-rotated JPEG"][0]].image_path))
    assert rotated.size == (20, 40)  # the EXIF orientation was applied
    deep = np.asarray(load_image(Path(stored[[k for k, (n, _) in expect.items() if n == "16-bit PNG"][0]].image_path)))
    assert len(np.unique(deep)) > 100  # the 16-bit gradient survives as 8-bit levels, not clipped to white


def test_missing_columns_refuse_the_file_with_the_column_named(tmp_path):
    p = tmp_path / "c.csv"
    p.write_text("id,picture,caption\n1,a.png,hello\n")
    with pytest.raises(CatalogError, match=r"columns \['image'\] not in the header"):
        read_csv(p)


def test_the_batch_goes_on_after_every_bad_row(tmp_path, corpus, model_dir):
    """Bad rows interleaved with good ones in small batches: every good row lands."""
    csv_path, expect = corpus
    c = Collection.init(tmp_path / "col2", model_dir)
    rep = ingest(c, csv_path, workers=0, progress=False, batch_size=2)
    n_ok = sum(1 for _, o in expect.values() if o == "ok")
    assert rep.added == n_ok and rep.failed == len(expect) - n_ok
