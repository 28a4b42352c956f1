"""Catalog CSV reading: rows of (id, image path relative to the file, texts, metadata).

A bad row (missing column, empty image path, no text) never stops the read: it is returned as
a :class:`RowError` naming the file, the line and the reason.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class CatalogRow:
    external_id: str
    image: Path  # resolved against the catalog file's folder
    texts: tuple[str, ...]  # the non-empty text fields, in the order asked for
    metadata: dict[str, str] = field(default_factory=dict)
    source: str = ""  # "file.csv:LINE"


@dataclass(frozen=True)
class RowError:
    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


class CatalogError(ValueError):
    """The catalog as a whole cannot be read (missing file, missing header columns)."""


def _has_bad_bytes(s: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in s)


AUTO_TEXT_COLUMNS = ("title", "caption", "text", "description")


def read_csv(
    path: str | Path,
    id_col: str = "id",
    image_col: str = "image",
    text_cols: Sequence[str] | None = None,
) -> tuple[list[CatalogRow], list[RowError]]:
    """``text_cols=None`` takes whichever of title, caption, text, description the header has."""
    path = Path(path)
    if not path.is_file():
        raise CatalogError(f"catalog file not found: {path}")
    rows: list[CatalogRow] = []
    errors: list[RowError] = []
    # surrogateescape keeps undecodable bytes as lone surrogates, so one bad row is reported
    # with its line number instead of aborting the whole file
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        if any(_has_bad_bytes(h) for h in header):
            raise CatalogError(f"{path}: the header line is not UTF-8; re-save the file as UTF-8")
        if text_cols is None:
            text_cols = [c for c in AUTO_TEXT_COLUMNS if c in header]
            if not text_cols:
                raise CatalogError(
                    f"{path}: no text column; the header {header} has none of {list(AUTO_TEXT_COLUMNS)} "
                    "(name yours with --text-col)"
                )
        missing = [c for c in (id_col, image_col, *text_cols) if c not in header]
        if missing:
            raise CatalogError(f"{path}: columns {missing} not in the header {header}; map them with the column options")
        meta_cols = [c for c in header if c not in (id_col, image_col, *text_cols)]
        while True:
            try:
                rec = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                errors.append(RowError(str(path), reader.line_num, f"malformed CSV: {e}"))
                continue
            line = reader.line_num
            if None in rec or None in rec.values():  # extra fields / missing fields
                n = len(header) + len(rec.get(None) or []) - sum(v is None for v in rec.values())
                errors.append(RowError(str(path), line, f"wrong number of fields: {n}, the header has {len(header)}"))
                continue
            bad = [c for c, v in rec.items() if v and _has_bad_bytes(v)]
            if bad:
                errors.append(RowError(str(path), line, f"not UTF-8 text in column(s) {bad}"))
                continue
            ext_id, img = rec[id_col].strip(), rec[image_col].strip()
            texts = tuple(t.strip() for c in text_cols if (t := rec.get(c) or "").strip())
            if not ext_id:
                errors.append(RowError(str(path), line, f"empty id column {id_col!r}"))
            elif not img:
                errors.append(RowError(str(path), line, f"empty image column {image_col!r}"))
            elif not texts:
                errors.append(RowError(str(path), line, f"no text in {list(text_cols)}"))
            else:
                rows.append(
                    CatalogRow(
                        external_id=ext_id,
                        image=(path.parent / img),
                        texts=texts,
                        metadata={c: rec[c] for c in meta_cols if rec.get(c) is not None},
                        source=f"{path}:{line}",
                    )
                )
    return rows, errors
