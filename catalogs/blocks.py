"""A catalog read in blocks, on many machines, with the single reader's results.

``read_source`` reads a catalog in one process. For a cluster (``ingest --engine ray``) the
catalog is cut into blocks that separate tasks read; what the single reader decides over the
whole file — line numbers, which of two rows with one id is a duplicate, each metadata column's
type — is decided here from small per-block summaries, so the rows and errors come out exactly
as ``read_source`` gives them (``tests/test_blocks.py`` holds the two side by side).

1. ``plan`` (driver, cheap: a header, a few seeks, Parquet footers, a folder listing): blocks of
   about ``block_bytes`` that start at a line start (CSV, JSONL), runs of row groups (Parquet),
   runs of image files (folder); a gzipped file is one block (a stream cannot be cut).
2. ``scan`` (a task per block): the block parsed; returned are its line count and end offset,
   its parse errors, a 16-byte digest of each row's id, and per metadata column how many values
   are not numbers (with where, for the first ``WHERE_CAP``).
3. ``reconcile`` (driver): a CSV block that did not start at a record start (a quoted field with
   a line break across the cut: the block before it ended past the cut) is merged with the one
   before and scanned again; then line offsets, duplicate ids (the first in file order stays)
   and column types are fixed.
4. ``finish`` (a task per block, streaming into the ingest): the block parsed again, rows typed,
   duplicates and misfits turned into their errors.

Digests are BLAKE2b-128 of the id: two distinct ids collide with probability ~n²/2¹²⁹
(1.5e-23 at 100 M rows). The driver holds 24 bytes per row (digest and position) while it
reconciles: 2.4 GB at 100 M rows, against the rows themselves in the single reader.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .sources import (
    CatalogError,
    CatalogRow,
    Columns,
    RowError,
    _csv_header,
    _csv_records,
    _folder_item,
    _jsonl_records,
    _Lines,
    _open_bytes,
    _parquet_rows,
    _read,
    _Resolver,
    _text_columns,
    as_number,
    dup_reason,
    image_files,
    typed_row,
)

BLOCK_BYTES = 32 * 2**20  # a CSV / JSONL block: at most ~32 MB, ~100k catalog rows
MIN_BLOCK_BYTES = 64 * 2**10  # and, unless asked, at least 64 kB (~500 rows): a read task costs ~10 ms to schedule
FOLDER_BLOCK = 2048  # image files per folder block, at most (at least 64)
WHERE_CAP = 64  # non-number positions a scan keeps per column (more: resolved by a rescan)


@dataclass(frozen=True)
class Block:
    kind: str  # "csv" | "jsonl" | "parquet" | "folder"
    path: str  # the catalog file (folder: the resolved root)
    start: int = 0  # csv/jsonl: byte offset of its first line; parquet: first row group
    end: int = -1  # exclusive byte offset / row group; -1: to the end of the file
    line0: int = 0  # lines (parquet: rows) of the file before the block
    header: tuple[str, ...] | None = None  # csv: the header; None: read it here (the block starts the file)
    header_lines: int = 0  # csv: the lines the header takes (the first block's line offset)
    names: tuple[str, ...] = ()  # folder: image paths relative to the root
    stamp: tuple[int, int] = (0, 0)  # the file's (size, mtime_ns) when planned: every later read checks it


@dataclass
class Scan:
    lines: int = 0  # physical lines (parquet: rows) the block consumed
    end: int = -1  # csv/jsonl: the byte offset where its last record ended
    rows: int = 0  # rows that parsed (errors not counted)
    digests: bytes = b""  # 16 bytes per row, in order
    at: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # each row's line, relative to the block
    nonnum: dict[str, list] = field(default_factory=dict)  # column -> [count, first WHERE_CAP relative lines]
    errors: list[RowError] = field(default_factory=list)  # relative lines


@dataclass
class Plan:
    blocks: list[Block]
    types: dict[str, str]  # every metadata column's type
    drops: list[dict[int, int]]  # per block: absolute line of a duplicate -> line of its first occurrence
    errors: list[RowError]  # parse errors, absolute lines
    rows: int  # rows finish() will yield as rows or as duplicate/misfit errors


# ---- 1. plan ---------------------------------------------------------------------------------


def plan(path: str | Path, cols: Columns = Columns(), block_bytes: int | None = None, min_blocks: int = 1) -> list[Block]:
    """The blocks of the catalog at ``path`` (the formats ``read_source`` reads). ``block_bytes``
    None: about ``min_blocks`` blocks (each between MIN_BLOCK_BYTES and BLOCK_BYTES), so that a
    small catalog still spreads over the cluster's CPUs."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".parquet", ".pq"))
        if files:
            size = _auto(sum(f.stat().st_size for f in files), block_bytes, min_blocks)
            return [b for f in files for b in _parquet_blocks(f, cols, size)]
        return _folder_blocks(path, min_blocks)
    name = path.name.lower()
    gz = name.endswith(".gz")
    suffix = Path(name[:-3]).suffix if gz else path.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".ndjson", ".parquet", ".pq") or (gz and suffix in (".parquet", ".pq")):
        _read(path, cols)  # the single reader's error for a missing file or an unknown format
        raise CatalogError(f"{path}: unknown catalog format {suffix!r}")
    if not path.is_file():
        raise CatalogError(f"catalog file not found: {path}")
    block_bytes = _auto(path.stat().st_size, block_bytes, min_blocks)
    if suffix in (".parquet", ".pq"):
        return _parquet_blocks(path, cols, block_bytes)
    kind = "csv" if suffix == ".csv" else "jsonl"
    stamp = _stamp(path)
    if gz:
        return [Block(kind, str(path), stamp=stamp)]
    start, header, n = 0, None, 0
    if kind == "csv":
        with open(path, "rb") as f:
            lines = _Lines(f)
            header, n = _csv_header(lines, path)
            start = lines.pos
        _text_columns(cols, header, path)  # a missing column fails the whole read, as in read_csv
        header = tuple(header)
    cuts = [start] + _line_starts(path, start, block_bytes) + [path.stat().st_size]
    spans = [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a] or [(start, start)]
    return [Block(kind, str(path), a, b, header=header, header_lines=n, stamp=stamp) for a, b in spans]


def _stamp(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def _check_stamp(block: Block) -> None:
    """CatalogError when the block's file is not the one planned: a catalog rewritten or appended
    to between the scan and the read would give line numbers, duplicates and types decided for
    other contents — refused, never mixed."""
    if block.kind != "folder" and _stamp(Path(block.path)) != block.stamp:
        raise CatalogError(f"{block.path} changed while it was being read (its size or modification time); run the ingest "
                           "again once it is written")


def _auto(size: int, block_bytes: int | None, min_blocks: int) -> int:
    return block_bytes if block_bytes is not None else max(MIN_BLOCK_BYTES, min(BLOCK_BYTES, size // max(1, min_blocks)))


def _line_starts(path: Path, start: int, step: int) -> list[int]:
    """Offsets after a ``\\n`` about every ``step`` bytes past ``start`` (not the file's end)."""
    size, out = path.stat().st_size, []
    with open(path, "rb") as f:
        at = start + step
        while at < size:
            f.seek(at - 1)
            f.readline()  # to the end of the line holding byte at-1: the next line starts at a line start
            pos = f.tell()
            if pos >= size:
                break
            if not out or pos > out[-1]:
                out.append(pos)
            at = max(pos, at) + step
    return out


def _parquet_blocks(path: Path, cols: Columns, block_bytes: int) -> list[Block]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - not Parquet, truncated
        raise CatalogError(f"{path}: not a readable Parquet file ({e})") from e
    _text_columns(cols, pf.schema_arrow.names, path)
    meta, stamp = pf.metadata, _stamp(path)
    out, first, size, line0 = [], 0, 0, 0
    for g in range(meta.num_row_groups):
        size += meta.row_group(g).total_byte_size
        if size >= block_bytes or g == meta.num_row_groups - 1:
            out.append(Block("parquet", str(path), first, g + 1, line0=line0, stamp=stamp))
            rows = sum(meta.row_group(k).num_rows for k in range(first, g + 1))
            line0, first, size = line0 + rows, g + 1, 0
    return out or [Block("parquet", str(path), 0, 0, stamp=stamp)]


def _folder_blocks(path: Path, min_blocks: int = 1) -> list[Block]:
    root = path.resolve()
    if not root.is_dir():
        raise CatalogError(f"not a folder: {root}")
    names = image_files(root)
    step = max(64, min(FOLDER_BLOCK, -(-len(names) // max(1, min_blocks))))
    return [Block("folder", str(root), names=tuple(names[k:k + step])) for k in range(0, len(names), step)]


# ---- reading one block -----------------------------------------------------------------------


class _Cursor:
    lines = 0
    end = -1


def _records(block: Block, cols: Columns, cursor: _Cursor) -> Iterator[CatalogRow | RowError]:
    """The block's rows and errors, lines numbered from ``block.line0``; ``cursor`` ends up with
    the lines consumed and the end offset. The file's stamp is checked before and after."""
    _check_stamp(block)
    yield from _read_block(block, cols, cursor)
    _check_stamp(block)


def _read_block(block: Block, cols: Columns, cursor: _Cursor) -> Iterator[CatalogRow | RowError]:
    path = Path(block.path)
    if block.kind == "folder":
        root = Path(block.path)
        real = _Resolver(root)
        for rel in block.names:
            cursor.lines += 1
            yield _folder_item(root, real, rel)
        return
    if block.kind == "parquet":
        for k, item in enumerate(_parquet_rows(path, cols, range(block.start, block.end), block.line0), 1):
            cursor.lines = k
            yield item
        return
    with _open_bytes(path) as f:
        if block.start:
            f.seek(block.start)
        stop = None if block.end < 0 else block.end
        if block.kind == "jsonl":
            yield from _jsonl_records(f, path, block.line0, cols, _Resolver(path.parent.resolve()), block.start, stop, cursor)
            return
        lines = _Lines(f, block.start)
        header, line0 = block.header, block.line0
        if header is None:  # the block starts the file
            header, line0 = _csv_header(lines, path)
        text_cols = _text_columns(cols, header, path)
        yield from _csv_records(lines, header, path, line0, cols, text_cols, _Resolver(path.parent.resolve()), stop)
        cursor.lines = lines.count - (line0 if block.header is None else 0)
        cursor.end = lines.pos


# ---- 2. scan ---------------------------------------------------------------------------------


def scan(block: Block, cols: Columns = Columns()) -> Scan:
    """The summary ``reconcile`` needs (lines relative to the block: its offset is not known yet)."""
    cursor, out = _Cursor(), Scan()
    digests, at = [], []
    rel = replace(block, line0=0) if block.kind in ("csv", "jsonl") else block
    shift = block.line0 if block.kind == "parquet" else 0
    for item in _records(rel, cols, cursor):
        if isinstance(item, RowError):
            out.errors.append(RowError(item.file, item.line - shift, item.reason))
            continue
        out.rows += 1
        line = item.location[1] - shift
        if block.kind != "folder":  # a folder's ids are its unique relative paths
            digests.append(hashlib.blake2b(item.external_id.encode("utf-8", "surrogateescape"), digest_size=16).digest())
            at.append(line)
        for k, v in item.metadata.items():
            if as_number(v) is None:
                seen = out.nonnum.setdefault(k, [0, []])
                seen[0] += 1
                if len(seen[1]) < WHERE_CAP:
                    seen[1].append(line)
            else:
                out.nonnum.setdefault(k, [0, []])
    out.digests, out.at = b"".join(digests), np.array(at, dtype=np.int64)
    out.lines, out.end = cursor.lines, cursor.end
    return out


def numbers_apart_from(block: Block, cols: Columns, skip: set[int]) -> dict[str, bool]:
    """Per column: every value is a number, rows at the absolute lines ``skip`` left out (the
    rare case ``reconcile`` cannot settle from a scan's first WHERE_CAP positions)."""
    out: dict[str, bool] = {}
    for item in _records(block, cols, _Cursor()):
        if isinstance(item, CatalogRow) and item.location[1] not in skip:
            for k, v in item.metadata.items():
                out[k] = out.get(k, True) and as_number(v) is not None
    return out


# ---- 3. reconcile ----------------------------------------------------------------------------


def settle(blocks: list[Block], scans: list[Scan], rescan: Callable[[list[Block]], list[Scan]]) -> tuple[list[Block], list[Scan]]:
    """Merge every CSV block that did not start at a record start into the block before it
    (whose last record ran past the cut), scanning the merged blocks again, until each block
    starts where the one before ended."""
    while True:
        bad = [k for k in range(1, len(blocks)) if blocks[k].kind == "csv" and blocks[k].path == blocks[k - 1].path
               and scans[k - 1].end != blocks[k].start]
        if not bad:
            return blocks, scans
        merged_b, merged_s, todo = [], [], []
        for k, (b, s) in enumerate(zip(blocks, scans)):
            if k in bad:
                merged_b[-1] = replace(merged_b[-1], end=b.end)
                merged_s[-1] = None
                if todo and todo[-1] == len(merged_b) - 1:
                    continue
                todo.append(len(merged_b) - 1)
            else:
                merged_b.append(b)
                merged_s.append(s)
        for k, s in zip(todo, rescan([merged_b[k] for k in todo])):
            merged_s[k] = s
        blocks, scans = merged_b, merged_s


def reconcile(
    blocks: list[Block], scans: list[Scan], kinds: dict[str, str] | None = None,
    recheck: Callable[[Block, set[int]], dict[str, bool]] | None = None, cols: Columns = Columns(),
) -> Plan:
    """Line offsets, duplicates and column types from settled scans (see ``settle``).
    ``recheck(block, skip)``: ``numbers_apart_from`` run where the block is (default: here)."""
    recheck = recheck or (lambda b, skip: numbers_apart_from(b, cols, skip))
    fixed, offset, prev = [], 0, None
    for b, s in zip(blocks, scans):
        if b.kind in ("csv", "jsonl"):
            if b.path != prev:
                offset = b.header_lines
            fixed.append(replace(b, line0=offset))
            offset += s.lines
        else:
            fixed.append(b)
        prev = b.path
    shifts = [b.line0 if b.kind != "folder" else 0 for b in fixed]
    errors = [RowError(e.file, e.line + sh, e.reason) for b, s, sh in zip(fixed, scans, shifts) for e in s.errors]

    # duplicates: the first occurrence in file order (block order, then line) stays
    drops: list[dict[int, int]] = [{} for _ in fixed]
    owner = np.concatenate([np.full(len(s.at), k, np.int64) for k, s in enumerate(scans)]) if scans else np.zeros(0, np.int64)
    lines = np.concatenate([s.at + sh for s, sh in zip(scans, shifts)]) if scans else np.zeros(0, np.int64)
    digests = np.frombuffer(b"".join(s.digests for s in scans), dtype=np.dtype([("a", "<u8"), ("b", "<u8")]))
    dup_count = np.zeros(len(fixed), np.int64)
    if len(digests):
        order = np.argsort(digests, kind="stable", order=("a", "b"))
        d = digests[order]
        same = np.concatenate([[False], (d["a"][1:] == d["a"][:-1]) & (d["b"][1:] == d["b"][:-1])])
        if same.any():
            first = np.maximum.accumulate(np.where(~same, np.arange(len(d)), 0))
            for pos in np.flatnonzero(same):
                k = int(owner[order[pos]])
                drops[k][int(lines[order[pos]])] = int(lines[order[first[pos]]])
                dup_count[k] += 1

    # types: a column is a number column when every value of every row that stays is a number
    types = dict(kinds or {})
    columns: dict[str, bool] = {}
    for k, s in enumerate(scans):
        for col, (count, where) in s.nonnum.items():
            if col in types:
                continue
            ok = columns.get(col, True)
            if ok and count:
                if len(where) == count:
                    ok = all(w + shifts[k] in drops[k] for w in where)
                elif dup_count[k] < count:
                    ok = False
                else:  # more non-numbers than the scan kept and as many duplicates: ask the block
                    ok = recheck(fixed[k], set(drops[k])).get(col, True)
            columns[col] = ok
    types.update({c: "number" if ok else "text" for c, ok in columns.items() if c not in types})
    return Plan(fixed, types, drops, errors, sum(s.rows for s in scans))


# ---- 4. finish -------------------------------------------------------------------------------


def finish(block: Block, cols: Columns, types: dict[str, str], drops: dict[int, int]) -> Iterator[CatalogRow | RowError]:
    """The block's rows, typed as ``types`` says, in order; a duplicate or a misfit comes as its
    RowError, in its place. Parse errors are not repeated (``Plan.errors`` has them). A file
    changed since the plan raises CatalogError at the end: take the rows only once the
    generator is exhausted (``list(finish(…))``), as the Ray ingest does."""
    for item in _records(block, cols, _Cursor()):
        if isinstance(item, RowError):
            continue
        file, line = item.location
        if line in drops:
            yield RowError(file, line, dup_reason(item.external_id, drops[line]))
        else:
            yield typed_row(item, types)


def read_blocks(path: str | Path, cols: Columns = Columns(), kinds: dict[str, str] | None = None,
                block_bytes: int | None = None) -> tuple[list[CatalogRow], list[RowError]]:
    """The whole block pipeline in this process: what ``read_source`` returns, errors ordered
    as plan errors first, then the duplicates and misfits (for tests and small tools)."""
    blocks = plan(path, cols, block_bytes)
    blocks, scans = settle(blocks, [scan(b, cols) for b in blocks], lambda bs: [scan(b, cols) for b in bs])
    p = reconcile(blocks, scans, kinds, cols=cols)
    rows, errors = [], list(p.errors)
    for b, d in zip(p.blocks, p.drops):
        for item in finish(b, cols, p.types, d):
            (errors if isinstance(item, RowError) else rows).append(item)
    return rows, errors


__all__ = ["BLOCK_BYTES", "MIN_BLOCK_BYTES", "Block", "Plan", "Scan", "finish", "numbers_apart_from", "plan", "read_blocks", "reconcile", "scan", "settle"]
