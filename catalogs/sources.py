"""Catalog sources: CSV, JSONL, Parquet rows, or a folder of images (with same-name ``.txt`` captions).

Every source yields :class:`CatalogRow` (id, image path resolved against the catalog file's
folder, texts, typed metadata) and :class:`RowError` for what could not be used: a missing
column, an empty id or image path, no text, non-UTF-8 bytes, a malformed line, an image path
that escapes the catalog folder. A bad row never stops the read.
"""

from __future__ import annotations

import csv
import datetime
import decimal
import gzip
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

AUTO_TEXT_COLUMNS = ("title", "caption", "text", "description")
SOURCE_SUFFIXES = {".csv", ".jsonl", ".ndjson", ".parquet", ".pq", ".gz"}  # catalog files read_source reads (.gz: .csv.gz, .jsonl.gz)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
MAX_TEXT_CHARS = 20_000
CSV_FIELD_LIMIT = 16 * 2**20


@dataclass(frozen=True)
class CatalogRow:
    external_id: str
    image: Path  # resolved against the catalog file's folder
    texts: tuple[str, ...]  # the non-empty text fields, in the order asked for
    metadata: dict[str, Any] = field(default_factory=dict)  # numbers parsed as numbers
    source: str = ""  # "file.csv:LINE"

    @property
    def location(self) -> tuple[str, int]:
        """(file, line) from ``source``; (source, 0) where it has no line (a folder's image)."""
        file, _, line = self.source.rpartition(":")
        return (file, int(line)) if line.isdigit() else (self.source, 0)


@dataclass(frozen=True)
class RowError:
    file: str
    line: int  # 1-based line (CSV/JSONL) or row number (Parquet); 0 for a folder entry
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


class CatalogError(ValueError):
    """The catalog as a whole cannot be read (missing file, missing columns, unknown format)."""


@dataclass(frozen=True)
class Columns:
    id: str = "id"
    image: str = "image"
    text: tuple[str, ...] | None = None  # None: whichever of AUTO_TEXT_COLUMNS exist


_BAD_BYTES = re.compile("[\udc80-\udcff]")  # undecodable bytes, as the surrogateescape error handler keeps them


def _has_bad_bytes(s: str) -> bool:
    return _BAD_BYTES.search(s) is not None


# ---- metadata column types: one per column, never guessed value by value --------------------

KINDS = ("number", "text")
# a number as catalogs write one: no leading zeros ("02139" is a code, not a number), no
# NaN / inf spellings, no "1_000" or non-ASCII digits; a leading "+" or whitespace is fine
_NUMBER = re.compile(r"\s*[-+]?(0|[1-9]\d*)(\.\d+)?([eE][-+]?\d+)?\s*\Z|\s*[-+]?\.\d+([eE][-+]?\d+)?\s*\Z")


def as_number(v: Any) -> int | float | None:
    """``v`` as a finite int or float if it is one (a JSON number, or a string written as a
    number); None otherwise (text, a code with leading zeros, an integer wider than 64 bits,
    NaN, inf, a boolean)."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v if -(2**63) <= v < 2**63 else None  # wider: a code (digits a float would round)
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, str) and _NUMBER.match(v):
        s = v.strip()
        if "." not in s and "e" not in s.lower():
            n = int(s)
            return n if -(2**63) <= n < 2**63 else None
        f = float(s)
        return f if math.isfinite(f) else None
    return None


def as_text(v: Any) -> str:
    """``v`` as text: strings as written, JSON numbers and booleans as JSON writes them."""
    if isinstance(v, str):
        return v
    if isinstance(v, (bool, int, float)) or v is None:
        return json.dumps(v)
    return str(v)


def parse_schema(spec: str) -> dict[str, str]:
    """``"zip:text,price:number"`` -> {"zip": "text", "price": "number"}; CatalogError if malformed."""
    out = {}
    for part in (p.strip() for p in (spec or "").split(",")):
        if not part:
            continue
        name, _, kind = part.rpartition(":")
        if not name.strip() or kind.strip() not in KINDS:
            raise CatalogError(f"schema entry {part!r}: write COLUMN:TYPE with TYPE one of {', '.join(KINDS)}")
        out[name.strip()] = kind.strip()
    return out


def type_columns(
    rows: list[CatalogRow], errors: list[RowError], kinds: dict[str, str] | None = None
) -> tuple[list[CatalogRow], list[RowError], dict[str, str]]:
    """Give every metadata column one type and every value that type.

    ``kinds``: types already fixed (the collection's registered columns, the user's schema);
    any other column is inferred from all of its values in these rows: ``number`` when every
    value is a number as :func:`as_number` reads one, else ``text``. Values are then converted:
    a number column holds ints and finite floats, a text column strings as written (``02139``
    stays ``02139``). A row with a value that does not fit a fixed number column is a row error.
    Returns (rows, errors, the types of every column seen)."""
    fixed = dict(kinds or {})
    seen: dict[str, bool] = {}  # column -> every value so far is a number
    for r in rows:
        for k, v in r.metadata.items():
            if k not in fixed:
                seen[k] = seen.get(k, True) and as_number(v) is not None
    types = {**{k: "number" if ok else "text" for k, ok in seen.items()}, **fixed}
    out = []
    for r in rows:
        typed = typed_row(r, types)
        (errors if isinstance(typed, RowError) else out).append(typed)
    return out, errors, types


def typed_row(r: CatalogRow, types: dict[str, str]) -> CatalogRow | RowError:
    """``r`` with each metadata value converted to its column's type, or the RowError of a
    value that does not fit a number column."""
    meta = {}
    for k, v in r.metadata.items():
        if types[k] == "number":
            n = as_number(v)
            if n is None:
                return RowError(*r.location, f"column {k!r} holds numbers; {as_text(v)[:40]!r} is not one (declare it text with --schema {k}:text)")
            meta[k] = n
        else:
            meta[k] = as_text(v)
    return CatalogRow(r.external_id, r.image, r.texts, meta, r.source)


def dup_reason(external_id: str, first_line: int | str) -> str:
    return f"duplicate id {external_id!r} (first on line {first_line}); row skipped"


def _text_columns(cols: Columns, header: Sequence[str], path: Path) -> tuple[str, ...]:
    text = cols.text if cols.text is not None else tuple(c for c in AUTO_TEXT_COLUMNS if c in header)
    if not text:
        raise CatalogError(
            f"{path}: no text column; the header {list(header)} has none of {list(AUTO_TEXT_COLUMNS)} "
            "(name yours with --text-col)"
        )
    missing = [c for c in (cols.id, cols.image, *text) if c not in header]
    if missing:
        raise CatalogError(f"{path}: columns {missing} not in the header {list(header)}; map them with the column options")
    return text


class _Resolver:
    """``(root / rel).resolve()`` for the rows of one catalog file, each directory resolved once:
    ``realpath`` walks every component of every path in Python (~90 us a row, the largest part
    of reading a catalog); a file that is not itself a symlink resolves to its resolved
    directory plus its name (one ``lstat``, ~5 us)."""

    def __init__(self, root: Path):
        self.root = root
        self.prefix = os.path.join(str(root), "")
        self._dirs: dict[str, str] = {}

    def __call__(self, rel: str) -> Path:
        joined = str(Path(self.root, rel))  # as Path.resolve sees it: "a//b/" is "a/b" ("..": kept, symlinks decide)
        d, name = os.path.split(joined)
        if name in ("", ".", ".."):
            return Path(os.path.realpath(joined))
        rd = self._dirs.get(d)
        if rd is None:
            rd = self._dirs[d] = os.path.realpath(d)
        full = os.path.join(rd, name)
        return Path(os.path.realpath(full) if os.path.islink(full) else full)

    def inside(self, p: Path) -> bool:
        s = str(p)
        return s == str(self.root) or s.startswith(self.prefix)


def _meta_value(v: Any) -> Any:
    """A reader's value as metadata: str, int, float and bool as they are; dates and times as
    ISO text; decimals as numbers; nested JSON as compact JSON text; bytes dropped (None)."""
    if isinstance(v, (str, int, float, bool)):
        return v
    if isinstance(v, decimal.Decimal):
        return float(v) if v.is_finite() else str(v)
    if isinstance(v, (datetime.date, datetime.time)):
        return v.isoformat()
    if isinstance(v, datetime.timedelta):
        return v.total_seconds()
    if isinstance(v, (dict, list)):
        return json.dumps(v, ensure_ascii=False, default=str, separators=(",", ":"))
    if isinstance(v, (bytes, bytearray)):
        return None
    return str(v)


def _to_row(rec: dict[str, Any], path: Path, line: int, cols: Columns, text_cols: Sequence[str], root: _Resolver) -> CatalogRow | RowError:
    """One record as a row, or its RowError: any failure is this row's alone."""
    try:
        return _to_row_or_error(rec, path, line, cols, text_cols, root)
    except Exception as e:  # noqa: BLE001 - one bad row never stops the read
        return RowError(str(path), line, f"unreadable row ({type(e).__name__}: {str(e)[:200]})")


def _to_row_or_error(rec: dict[str, Any], path: Path, line: int, cols: Columns, text_cols: Sequence[str], root: _Resolver) -> CatalogRow | RowError:
    """``root``: resolves image paths against ``path.parent.resolve()``; one per file."""
    def err(reason: str) -> RowError:
        return RowError(str(path), line, reason)

    bad = [c for c, v in rec.items() if isinstance(v, str) and _has_bad_bytes(v)]
    if bad:
        return err(f"not UTF-8 text in column(s) {bad}")
    nul = [c for c, v in rec.items() if (isinstance(v, str) and "\x00" in v) or (isinstance(c, str) and "\x00" in c)]
    if nul:
        return err(f"NUL byte in column(s) {nul}: no database stores it in text")
    ext_id = "" if rec.get(cols.id) is None else str(rec[cols.id]).strip()
    img = "" if rec.get(cols.image) is None else str(rec[cols.image]).strip()
    texts = tuple(str(t).strip() for c in text_cols if (t := rec.get(c)) is not None and str(t).strip())
    if not ext_id:
        return err(f"empty id column {cols.id!r}")
    if not img:
        return err(f"empty image column {cols.image!r}")
    if not texts:
        return err(f"no text in {list(text_cols)}")
    if any(len(t) > MAX_TEXT_CHARS for t in texts):
        return err(f"text longer than {MAX_TEXT_CHARS} characters")
    image = root(img)
    if not root.inside(image):
        return err(f"image path {img!r} points outside the catalog folder {root.root}")
    skip = {cols.id, cols.image, *text_cols}
    meta = {}
    for k, v in rec.items():
        if k in skip or k is None or v is None or v == "":
            continue
        v = _meta_value(v)
        if isinstance(v, str) and ("\x00" in v or "\\u0000" in v):  # also inside nested JSON: PostgreSQL refuses it
            return err(f"NUL byte in column {k!r}: no database stores it in text")
        if v is not None:
            meta[str(k)] = v
    return CatalogRow(ext_id, image, texts, meta, f"{path}:{line}")


def _split(items: Iterable[CatalogRow | RowError]) -> tuple[list[CatalogRow], list[RowError]]:
    """Rows and errors apart; a second row with an id already seen in the file is an error
    (which of two contents is meant cannot be guessed), the first one stays."""
    rows, errors, first = [], [], {}
    for x in items:
        if isinstance(x, RowError):
            errors.append(x)
        elif x.external_id in first:
            errors.append(RowError(*x.location, dup_reason(x.external_id, first[x.external_id])))
        else:
            first[x.external_id] = x.location[1]
            rows.append(x)
    return rows, errors


def _open_bytes(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


class _Lines:
    """The physical lines of a binary catalog stream, decoded as text (undecodable bytes kept as
    lone surrogates, so one bad row is reported with its line instead of aborting the file),
    ending where ``open(newline="")`` ends them (``\n``, ``\r\n``, ``\r``); a byte-order mark
    at the start of the file is dropped (``utf-8-sig``). ``pos``: the stream offset after the
    lines given out (a block's reader stops at its end offset); ``count``: lines given out."""

    def __init__(self, f, pos: int = 0):
        self.f, self.pos, self.count = f, pos, 0
        self._pending: list[bytes] = []

    def __iter__(self):
        return self

    def __next__(self) -> str:
        if not self._pending:
            raw = self.f.readline()  # up to a b"\n": a "\r\n" never splits
            if not raw:
                raise StopIteration
            self._pending = raw.splitlines(keepends=True)[::-1]  # bytes split at \n, \r\n and \r only
        line = self._pending.pop()
        first = self.pos == 0
        self.pos += len(line)
        self.count += 1
        text = line.decode("utf-8", "surrogateescape")
        return text[1:] if first and text.startswith("\ufeff") else text


def _csv_header(lines: _Lines, path: Path) -> tuple[list[str], int]:
    """The header record of a CSV and the lines it took."""
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    reader = csv.reader(lines)
    try:
        header = next(reader)
    except StopIteration:
        header = []
    except csv.Error as e:
        raise CatalogError(f"{path}: the header line is not readable CSV ({e})") from None
    if any(_has_bad_bytes(h) for h in header):
        raise CatalogError(f"{path}: the header line is not UTF-8; re-save the file as UTF-8")
    return header, reader.line_num


def _csv_records(lines: _Lines, header: Sequence[str], path: Path, line0: int, cols: Columns, text_cols: Sequence[str],
                 root: _Resolver, stop: int | None = None):
    """Rows and errors of the CSV records in ``lines`` (``line0`` lines come before them), up to
    the first record that starts at or after the offset ``stop``. A blank line is skipped; a
    record is numbered by the line it starts on."""
    # fields up to 16 MB are read (an over-long text is then refused with its own reason,
    # not the csv module's "field larger than field limit" that stops at 128 kB)
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    reader = csv.reader(lines)
    while stop is None or lines.pos < stop:
        start = line0 + reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield RowError(str(path), start, f"malformed CSV: {e}")
            continue
        if not fields:
            continue
        if len(fields) != len(header):  # extra fields / missing fields
            yield RowError(str(path), start, f"wrong number of fields: {len(fields)}, the header has {len(header)}")
            continue
        yield _to_row(dict(zip(header, fields)), path, start, cols, text_cols, root)


def read_csv(path: str | Path, cols: Columns = Columns()) -> tuple[list[CatalogRow], list[RowError]]:
    path = Path(path)
    if not path.is_file():
        raise CatalogError(f"catalog file not found: {path}")

    root = _Resolver(path.parent.resolve())

    def gen():
        with _open_bytes(path) as f:
            lines = _Lines(f)
            header, n = _csv_header(lines, path)
            text_cols = _text_columns(cols, header, path)
            yield from _csv_records(lines, header, path, n, cols, text_cols, root)

    return _split(gen())


def _jsonl_records(f, path: Path, line0: int, cols: Columns, root: _Resolver, pos: int = 0, stop: int | None = None, cursor=None):
    """Rows and errors of the JSONL lines of the binary stream ``f`` (at offset ``pos``, after
    ``line0`` lines), up to the first line that starts at or after ``stop``; ``cursor`` (when
    given) gets the lines read and the end offset."""
    line_no = line0
    while stop is None or pos < stop:
        raw = f.readline()
        if not raw:
            break
        pos += len(raw)
        line_no += 1
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            yield RowError(str(path), line_no, f"not UTF-8: {e}")
            continue
        except json.JSONDecodeError as e:
            yield RowError(str(path), line_no, f"malformed JSON: {e}")
            continue
        except RecursionError:
            yield RowError(str(path), line_no, "JSON nested too deeply")
            continue
        if not isinstance(rec, dict):
            yield RowError(str(path), line_no, "a JSONL line must be an object")
            continue
        text_cols = cols.text if cols.text is not None else tuple(c for c in AUTO_TEXT_COLUMNS if c in rec)
        yield _to_row(rec, path, line_no, cols, text_cols or AUTO_TEXT_COLUMNS, root)
    if cursor is not None:
        cursor.lines, cursor.end = line_no - line0, pos


def read_jsonl(path: str | Path, cols: Columns = Columns()) -> tuple[list[CatalogRow], list[RowError]]:
    path = Path(path)
    if not path.is_file():
        raise CatalogError(f"catalog file not found: {path}")

    root = _Resolver(path.parent.resolve())

    def gen():
        with _open_bytes(path) as f:
            yield from _jsonl_records(f, path, 0, cols, root)

    return _split(gen())


def read_parquet(path: str | Path, cols: Columns = Columns()) -> tuple[list[CatalogRow], list[RowError]]:
    """A Parquet file, or a folder of Parquet files (one catalog: image paths relative to each
    file's folder, ids unique across the files), read a record batch at a time."""
    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".parquet", ".pq")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise CatalogError(f"catalog file not found: {path}")
    return _split(r for f in files for r in _parquet_rows(f, cols))


def _parquet_rows(path: Path, cols: Columns, row_groups: Sequence[int] | None = None, line0: int = 0):
    """Rows and errors of a Parquet file (of ``row_groups`` only, the rows before them counted
    in ``line0``), numbered by row from 1."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - not Parquet, truncated
        raise CatalogError(f"{path}: not a readable Parquet file ({e})") from e
    text_cols = _text_columns(cols, pf.schema_arrow.names, path)
    root = _Resolver(path.parent.resolve())
    line = line0
    groups = None if row_groups is None else list(row_groups)
    if groups == []:
        return
    for batch in pf.iter_batches(batch_size=4096, row_groups=groups):
        for rec in batch.to_pylist():
            line += 1
            yield _to_row(rec, path, line, cols, text_cols, root)


def read_folder(path: str | Path) -> tuple[list[CatalogRow], list[RowError]]:
    """Every image file under the folder; id = its relative path; text = a same-name .txt if any."""
    root = Path(path).resolve()
    if not root.is_dir():
        raise CatalogError(f"not a folder: {root}")
    rows, errors = [], []
    real = _Resolver(root)
    for rel in image_files(root):
        item = _folder_item(root, real, rel)
        (errors if isinstance(item, RowError) else rows).append(item)
    return rows, errors


def image_files(root: Path) -> list[str]:
    """The image files under the resolved folder ``root``, as sorted relative paths."""
    return [p.relative_to(root).as_posix() for p in sorted(root.rglob("*")) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]


def _folder_item(root: Path, real: _Resolver, rel: str) -> CatalogRow | RowError:
    """The row of the image file ``rel`` under ``root`` (text: a same-name .txt, if any), or
    its error."""
    p = root / rel
    if not real.inside(real(rel)):  # a symlink out of the folder: same rule as a catalog's image paths
        return RowError(str(p), 0, "image is a symlink that leaves the catalog folder; skipped")
    txt = p.with_suffix(".txt")
    texts: tuple[str, ...] = ()
    if txt.exists() and not real.inside(real(txt.relative_to(root).as_posix())):
        return RowError(str(txt), 0, "caption is a symlink that leaves the catalog folder; skipped")
    if txt.exists():
        try:
            t = txt.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError as e:
            return RowError(str(txt), 0, f"caption is not UTF-8: {e}")
        if len(t) > MAX_TEXT_CHARS:
            return RowError(str(txt), 0, f"caption longer than {MAX_TEXT_CHARS} characters")
        texts = (t,) if t else ()
    return CatalogRow(rel, p, texts, {}, f"{root}/{rel}")


def read_source(
    path: str | Path, cols: Columns = Columns(), kinds: dict[str, str] | None = None
) -> tuple[list[CatalogRow], list[RowError]]:
    """Dispatch on what ``path`` is: a folder of images, a folder of Parquet files, ``.csv``,
    ``.jsonl``/``.ndjson`` (either gzipped: ``.csv.gz``, ``.jsonl.gz``) or ``.parquet``; then
    give each metadata column one type (``type_columns``; ``kinds``: types already fixed)."""
    path = Path(path)
    rows, errors = _read(path, cols)
    rows, errors, _ = type_columns(rows, errors, kinds)
    return rows, errors


def _read(path: Path, cols: Columns) -> tuple[list[CatalogRow], list[RowError]]:
    if path.is_dir():
        if any(p.suffix.lower() in (".parquet", ".pq") for p in path.iterdir()):
            return read_parquet(path, cols)
        return read_folder(path)
    name = path.name.lower()
    suffix = Path(name[:-3]).suffix if name.endswith(".gz") else path.suffix.lower()
    if suffix == ".csv":
        return read_csv(path, cols)
    if suffix in (".jsonl", ".ndjson"):
        return read_jsonl(path, cols)
    if suffix in (".parquet", ".pq") and not name.endswith(".gz"):
        return read_parquet(path, cols)
    if not path.exists():
        raise CatalogError(f"catalog not found: {path}")
    raise CatalogError(f"{path}: unknown catalog format {suffix!r}; use a folder, .csv, .jsonl (either may be .gz) or .parquet")
