"""Catalog CSV reading: good rows land, bad rows come back with file, line and reason."""

from __future__ import annotations

import pytest

from vtfusion.catalogs.sources import CatalogError, read_csv


def test_bad_rows_are_reported_not_fatal(tmp_path):
    p = tmp_path / "c.csv"
    p.write_text(
        "id,image,caption,color\n"
        "a,img/a.png,a red mug,red\n"  # line 2: good
        ",img/b.png,a blue mug,blue\n"  # 3: empty id
        "c,,a hat,green\n"  # 4: empty image
        "d,img/d.png,,pink\n"  # 5: no text
        "e,img/e.png\n"  # 6: missing fields
        'f,img/f.png,"a mug, with a comma\nand a newline",red\n'  # 7-8: quoted, fine
    )
    rows, errors = read_csv(p)
    assert [r.external_id for r in rows] == ["a", "f"]
    assert rows[0].image == tmp_path / "img/a.png" and rows[0].metadata == {"color": "red"}
    assert rows[1].texts == ("a mug, with a comma\nand a newline",)
    assert [(e.line, e.reason.split()[0]) for e in errors] == [(3, "empty"), (4, "empty"), (5, "no"), (6, "wrong")]
    assert all(e.file == str(p) for e in errors)
    assert str(errors[0]).startswith(f"{p}:3: ")


def test_missing_header_column_names_it(tmp_path):
    p = tmp_path / "c.csv"
    p.write_text("id,picture,caption\n1,a.png,x\n")
    with pytest.raises(CatalogError, match=r"\['image'\]"):
        read_csv(p)
    with pytest.raises(CatalogError, match="not found"):
        read_csv(tmp_path / "nope.csv")


def test_non_utf8_rows_are_reported(tmp_path):
    p = tmp_path / "c.csv"
    p.write_bytes(b"id,image,caption\n1,a.png,a red mug\n2,b.png,caf\xe9 mug\n")
    rows, errors = read_csv(p)
    assert [r.external_id for r in rows] == ["1"]
    assert len(errors) == 1 and "UTF-8" in errors[0].reason


def test_a_symlink_loop_fails_its_row_not_the_read(tmp_path):
    from vtfusion.indexer.ingest import DecodeStage
    from vtfusion.models.config import VisionConfig
    from vtfusion.models.preprocess import ImageTransform

    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "loop1").symlink_to("loop2")
    (tmp_path / "img" / "loop2").symlink_to("loop1")
    p = tmp_path / "c.csv"
    p.write_text("id,image,caption\na,img/loop1,a red mug\n")
    rows, errors = read_csv(p)  # Path.resolve raised RuntimeError here and stopped the read
    assert [r.external_id for r in rows] == ["a"] and not errors
    _, px, _, _, err = DecodeStage(rows, ImageTransform(VisionConfig()))[0]
    assert px is None and "symbolic links" in err
