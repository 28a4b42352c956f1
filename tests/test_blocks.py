"""A catalog read in blocks (catalogs/blocks.py, what `ingest --engine ray` reads with) against
the single reader (read_source) as the oracle: the same rows in the same order, the same errors
(file, line, reason), at any cut — including cuts inside quoted CSV fields that hold line
breaks, blank lines, CR and CRLF endings, a byte-order mark, duplicate ids in other blocks, and
columns whose type a duplicate row alone would change."""

from __future__ import annotations

import csv
import gzip
import io
import json
import random

import numpy as np
import pytest

from vtfusion.catalogs import blocks
from vtfusion.catalogs.sources import Columns, read_source


def _same(path, cols=Columns(), kinds=None, sizes=(1, 7, 23, 61, 150, 400, blocks.BLOCK_BYTES)):
    want_rows, want_errors = read_source(path, cols, kinds)
    for size in sizes:
        rows, errors = blocks.read_blocks(path, cols, kinds, block_bytes=size)
        assert rows == want_rows, size
        assert sorted(map(str, errors)) == sorted(map(str, want_errors)), size
    return want_rows, want_errors


def _tricky_rows(rng: random.Random, n: int) -> list[list[str]]:
    rows = []
    for i in range(n):
        ident = f"id{rng.randrange(max(i, 1))}" if rng.random() < 0.15 else f"id{i}"  # some ids repeat an earlier one
        caption = rng.choice(["a red mug", 'a "quoted" hat', "two\nlines", "three\r\nline\nbreaks", "comma, inside", "ünï ✓", ""])
        price = rng.choice(["3", "4.5", "-2", "1e3"]) if rng.random() < 0.97 else rng.choice(["n/a", "02139"])
        zip_code = rng.choice(["02139", "10001", "94103"])
        rows.append([ident, f"img/{i % 5}.png", caption, price, zip_code])
    return rows


def _write_csv(path, rows, newline="\n", bom=False, blank_every=0):
    buf = io.StringIO(newline="")
    w = csv.writer(buf, lineterminator=newline)
    w.writerow(["id", "image", "caption", "price", "zip"])
    for k, r in enumerate(rows):
        w.writerow(r)
        if blank_every and k % blank_every == 0:
            buf.write(newline)
    data = buf.getvalue().encode()
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + data)


@pytest.mark.parametrize("seed,newline,bom", [(0, "\n", False), (1, "\r\n", True), (2, "\r", False), (3, "\n", True)])
def test_csv_blocks_equal_the_single_reader(tmp_path, seed, newline, bom):
    rng = random.Random(seed)
    rows = _tricky_rows(rng, 80)
    _write_csv(tmp_path / "c.csv", rows, newline=newline, bom=bom, blank_every=9)
    with open(tmp_path / "c.csv", "ab") as f:  # a row with too many fields, one with bytes that are not UTF-8
        f.write(b'x1,img/1.png,extra,1,02139,surplus' + newline.encode() + b"x2,img/2.png,caf\xe9,2,10001" + newline.encode())
    got, errors = _same(tmp_path / "c.csv")
    assert len(got) > 40 and any("duplicate id" in e.reason for e in errors)
    assert any("wrong number of fields" in e.reason for e in errors) and any("not UTF-8" in e.reason for e in errors)
    assert any("\n" in r.texts[0] for r in got)  # quoted line breaks survived the cuts
    assert all(isinstance(r.metadata["zip"], str) for r in got)  # codes stay text


def test_a_column_that_only_a_duplicate_makes_text_stays_a_number(tmp_path):
    """The single reader types columns after dropping duplicates: a duplicate's 'n/a' in a price
    column must not make the column text — whether the scan kept its position or (past the
    cap) the block is asked again."""
    lines = ["id,image,caption,price"] + [f"p{i},img/{i}.png,cap {i},{i}" for i in range(200)]
    lines += [f"p{i},img/{i}.png,dup {i},n/a" for i in range(blocks.WHERE_CAP + 10)]  # more than the scan keeps
    (tmp_path / "c.csv").write_text("\n".join(lines) + "\n")
    rows, errors = _same(tmp_path / "c.csv", sizes=(blocks.BLOCK_BYTES, 500))
    assert all(isinstance(r.metadata["price"], int) for r in rows)
    assert sum("duplicate id" in e.reason for e in errors) == blocks.WHERE_CAP + 10


def test_fixed_kinds_misfits_and_jsonl(tmp_path):
    rng = random.Random(5)
    recs = []
    for i in range(120):
        rec = {"id": f"j{rng.randrange(90)}", "image": f"img/{i}.png", "title": rng.choice(["a hat", "a mug\nwith a break"]),
               "price": rng.choice([1, 2.5, "7", "cheap"]) if i % 13 == 0 else rng.choice([1, 2.5, "7"]), "tags": ["x", i]}
        recs.append(json.dumps(rec))
    recs[10] = "{not json"
    recs[20] = "[1, 2]"
    recs[30] = ""
    (tmp_path / "c.jsonl").write_text("\n".join(recs) + "\n")
    _same(tmp_path / "c.jsonl")
    rows, errors = _same(tmp_path / "c.jsonl", kinds={"price": "number"})
    assert any("holds numbers" in e.reason for e in errors)


def test_gzip_parquet_and_folders(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = _tricky_rows(random.Random(7), 60)
    _write_csv(tmp_path / "c.csv", rows)
    (tmp_path / "g.csv.gz").write_bytes(gzip.compress((tmp_path / "c.csv").read_bytes()))
    _same(tmp_path / "g.csv.gz")
    assert len(blocks.plan(tmp_path / "g.csv.gz")) == 1  # a stream cannot be cut

    (tmp_path / "pq").mkdir()
    for k in range(2):
        part = rows[k * 30:(k + 1) * 30]
        table = pa.table({"id": [r[0] for r in part], "image": [r[1] for r in part], "caption": [r[2] for r in part],
                          "price": [r[3] for r in part], "rank": np.arange(30) + k})
        pq.write_table(table, tmp_path / "pq" / f"part{k}.parquet", row_group_size=7)
    got, errors = _same(tmp_path / "pq", sizes=(1, 10_000, blocks.BLOCK_BYTES))
    assert any("duplicate id" in e.reason for e in errors)  # ids are unique across the files
    assert len(blocks.plan(tmp_path / "pq", block_bytes=1)) == 10  # 2 files x 5 row groups

    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for k in range(5):
        (tmp_path / "imgs" / ("sub" if k % 2 else "") / f"{k}.png").write_bytes(b"x")
        (tmp_path / "imgs" / ("sub" if k % 2 else "") / f"{k}.txt").write_text(f"caption {k}" if k != 3 else "")
    (tmp_path / "imgs" / "bad.png").write_bytes(b"x")
    (tmp_path / "imgs" / "bad.txt").write_bytes(b"\xff\xfe")
    _same(tmp_path / "imgs")


def test_settle_merges_a_block_that_starts_inside_a_quoted_field(tmp_path):
    """A cut inside a quoted field: the block after it is merged into the one before, so no row
    is read twice or lost — checked on the plan itself, not only on the rows."""
    long = "word " * 40
    text = "id,image,caption\n" + "".join(f'r{i},img/{i}.png,"{long}\n{long}\n{long}"\n' for i in range(6))
    (tmp_path / "c.csv").write_text(text)
    planned = blocks.plan(tmp_path / "c.csv", block_bytes=50)
    settled, scans = blocks.settle(planned, [blocks.scan(b) for b in planned], lambda bs: [blocks.scan(b) for b in bs])
    assert len(settled) < len(planned)
    assert sum(s.rows for s in scans) == 6
    assert all(b.start == s.end for b, s in zip(settled[1:], scans))
    _same(tmp_path / "c.csv", sizes=(50, 120, 333))


def test_an_unclosed_quote_empty_files_and_a_header_alone(tmp_path):
    """An unclosed quote swallows the rest of the file in the single reader: every later cut is
    inside it, so the blocks merge into one and agree; empty and header-only files agree too."""
    lines = ["id,image,caption"] + [f"r{i},img/{i}.png,cap {i}" for i in range(40)]
    lines[6] = 'r5,img/5.png,"an unclosed quote'
    (tmp_path / "c.csv").write_text("\n".join(lines) + "\n")
    rows, _ = _same(tmp_path / "c.csv", sizes=(10, 64, 300))
    assert len(rows) == 6 and "r39" in rows[-1].texts[0]  # r0..r4, then r5 whose caption runs to the end
    (tmp_path / "h.csv").write_text("id,image,caption\n")
    assert _same(tmp_path / "h.csv") == ([], [])
    (tmp_path / "e.jsonl").write_text("")
    assert _same(tmp_path / "e.jsonl") == ([], [])
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(Exception) as single:
        read_source(tmp_path / "e.csv")
    with pytest.raises(type(single.value), match="no text column"):
        blocks.read_blocks(tmp_path / "e.csv")


def test_a_catalog_changed_between_the_passes_is_refused_not_mixed(tmp_path):
    """Line offsets, duplicates and types are decided from the scan: a file appended to or
    rewritten before a block is read again must fail that read (CatalogError) before it yields
    rows decided for other contents."""
    import os

    from vtfusion.catalogs.sources import CatalogError

    path = tmp_path / "c.csv"
    path.write_text("id,image,caption,price\n" + "".join(f"r{i},img/{i}.png,cap {i},{i}\n" for i in range(300)))
    planned = blocks.plan(path, block_bytes=500)
    blocks_, scans = blocks.settle(planned, [blocks.scan(b) for b in planned], lambda bs: [blocks.scan(b) for b in bs])
    p = blocks.reconcile(blocks_, scans)
    assert len(list(blocks.finish(p.blocks[1], Columns(), p.types, p.drops[1]))) > 0  # unchanged: reads
    with open(path, "a") as f:
        f.write("r0,img/x.png,a new row with an old id,n/a\n")  # would make r0 a duplicate and price text
    for b, d in zip(p.blocks, p.drops):
        with pytest.raises(CatalogError, match="changed while it was being read"):
            list(blocks.finish(b, Columns(), p.types, d))
    with pytest.raises(CatalogError, match="changed while it was being read"):
        blocks.scan(planned[0])
    fresh = blocks.plan(path, block_bytes=500)  # planned after the append
    st = os.stat(path)
    path.write_bytes(path.read_bytes().replace(b"cap 7,", b"cap 8,"))  # the same size, other bytes, a later mtime
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert os.stat(path).st_size == st.st_size
    with pytest.raises(CatalogError, match="changed while it was being read"):
        blocks.scan(fresh[0])
