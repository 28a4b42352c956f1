"""Property-based tests (hypothesis): the catalog readers and the filter-expression parser take
arbitrary input without an unhandled exception, and user text never reaches SQL except as a
bound parameter."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, select
from sqlalchemy.dialects import postgresql, sqlite

from vtfusion.indexer import filters
from vtfusion.catalogs.sources import CatalogError, Columns, read_csv, read_jsonl
from vtfusion.indexer.schema import Base, Item

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
COLUMNS = {"color": "text", "size": "text", "price": "number", "n_objects": "number"}
PAYLOADS = ["'; DROP TABLE items; --", "x' OR '1'='1", "1); DELETE FROM items; --", "\\'", '"; --', "items.status", "\x00"]


@pytest.fixture(scope="module")
def db():
    eng = create_engine("sqlite://")
    Base.metadata.create_all(eng)
    with eng.begin() as conn:
        conn.execute(Item.__table__.insert(), [
            {"id": 1, "source": "s", "external_id": "a", "image_path": "", "text": "", "content_hash": "h1",
             "meta": {"color": "red", "price": 3.5, "size": "small", "n_objects": 1}, "status": "active"},
        ])
    return eng


# ---- filters ----------------------------------------------------------------------------------

@SETTINGS
@given(st.text(max_size=80))
def test_any_text_parses_or_fails_with_filter_error(expr):
    try:
        filters.parse(expr, COLUMNS)
    except filters.FilterError:
        pass


values = st.one_of(
    st.integers(-10**6, 10**6), st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.text(max_size=20), st.sampled_from(PAYLOADS),
)
names = st.sampled_from(sorted(COLUMNS) + ["id", "external_id", "source"])


@st.composite
def comparisons(draw):
    name = draw(names)
    kind = "number" if COLUMNS.get(name) == "number" or name == "id" else "text"
    if name == "id":
        v = draw(st.integers(-1000, 1000))
    else:
        v = draw(st.one_of(st.integers(-1000, 1000), st.floats(-1e3, 1e3, allow_nan=False)) if kind == "number" else values)
    op = draw(st.sampled_from(["=", "!=", "<", "<=", ">", ">=", "IN", "BETWEEN"]))
    if op == "IN":
        more = draw(st.lists(st.one_of(st.integers(-9, 9)) if kind == "number" else values, max_size=3))
        return f"{name} IN ({', '.join(filters.quote(x) for x in [v, *more])})", [v, *more]
    if op == "BETWEEN":
        return f"{name} BETWEEN {filters.quote(v)} AND {filters.quote(v)}", [v]
    return f"{name} {op} {filters.quote(v)}", [v]


@st.composite
def expressions(draw, depth=2):
    parts = [draw(comparisons()) for _ in range(draw(st.integers(1, 3)))]
    glue = draw(st.sampled_from([" AND ", " OR "]))
    text = glue.join(p for p, _ in parts)
    if draw(st.booleans()):
        text = f"NOT ({text})"
    return text, [v for _, vs in parts for v in vs]


@SETTINGS
@given(expressions())
def test_values_only_ever_reach_sql_as_bound_parameters(db, case):
    expr_text, vals = case
    expr = filters.parse(expr_text, COLUMNS)
    stmt = select(Item.id).where(expr)
    for dialect in (sqlite.dialect(), postgresql.dialect()):
        compiled = stmt.compile(dialect=dialect)
        sql = str(compiled)
        for v in vals:
            if isinstance(v, str) and len(v) >= 3:
                assert v not in sql, (expr_text, sql)  # the text is a parameter, not part of the statement
        bound = list(compiled.params.values())
        for v in vals:
            if isinstance(v, str):
                assert v in bound or any(isinstance(b, (list, tuple)) and v in b for b in bound)
    with db.connect() as conn:  # and it runs: no SQL error for any well-formed expression
        conn.execute(stmt).all()
        assert conn.execute(select(Item.id)).scalar() == 1  # nothing was dropped or deleted


# ---- catalog readers --------------------------------------------------------------------------

@SETTINGS
@given(st.binary(max_size=600))
def test_csv_reader_never_crashes_on_arbitrary_bytes(data):
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "c.csv"
        p.write_bytes(b"id,image,caption,price\n" + data)
        rows, errors = read_csv(p)
        for r in rows:
            assert r.image.is_relative_to(Path(tmp).resolve()) and r.external_id and r.texts
        for e in errors:
            assert e.file == str(p) and e.line >= 2 and e.reason


@SETTINGS
@given(st.binary(max_size=300))
def test_csv_reader_header_is_checked_not_crashed(data):
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "c.csv"
        p.write_bytes(data)
        try:
            read_csv(p)
        except CatalogError:
            pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8,
)


@SETTINGS
@given(st.lists(st.one_of(
    st.dictionaries(st.sampled_from(["id", "image", "caption", "title", "price", "x"]), json_values, max_size=6),
    json_values, st.binary(max_size=40),
), max_size=8))
def test_jsonl_reader_never_crashes(lines):
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "c.jsonl"
        with open(p, "wb") as f:
            for x in lines:
                f.write((x if isinstance(x, bytes) else json.dumps(x).encode()).replace(b"\n", b" ") + b"\n")
        rows, errors = read_jsonl(p, Columns())
        for r in rows:
            assert r.image.is_relative_to(Path(tmp).resolve())
        assert len(rows) + len(errors) <= len(lines)


# ---- image path resolution: the per-directory cache agrees with Path.resolve ------------------


def _symlink_tree(base: Path) -> Path:
    """A catalog folder with real files, a symlinked directory, symlinked files (one pointing
    outside), a dangling link and a link loop; returns the catalog folder."""
    root = base / "cat"
    (root / "img" / "sub").mkdir(parents=True)
    (base / "elsewhere").mkdir()
    for p in (root / "img" / "a.png", root / "img" / "sub" / "b.png", base / "elsewhere" / "x.png"):
        p.write_bytes(b"png")
    (root / "linkdir").symlink_to(root / "img")
    (root / "outdir").symlink_to(base / "elsewhere")
    (root / "img" / "to_a.png").symlink_to("a.png")
    (root / "img" / "to_out.png").symlink_to(base / "elsewhere" / "x.png")
    (root / "img" / "dangling.png").symlink_to("nothing.png")
    (root / "img" / "loop1").symlink_to("loop2")
    (root / "img" / "loop2").symlink_to("loop1")
    return root


PARTS = ["img", "sub", "linkdir", "outdir", "..", ".", "a.png", "b.png", "x.png", "to_a.png", "to_out.png",
         "dangling.png", "loop1", "missing", "missing.png", ""]


@SETTINGS
@given(st.lists(st.sampled_from(PARTS), min_size=1, max_size=5), st.booleans())
@example(["img", "loop1"], False)
@example(["img", "loop1", "", ""], False)  # "img/loop1//": realpath of the raw string gave "/"
@example(["linkdir", "loop1", "a.png"], False)
@example(["outdir", "x.png"], True)
@example(["img", "to_out.png"], False)
@example(["linkdir", "..", "img", "to_a.png"], False)
def test_image_paths_resolve_as_path_resolve_does(parts, absolute):
    """The same path as ``Path.resolve`` (so the same "outside the folder" verdict); where that
    raises on a symlink loop (which stopped the whole read), the unresolved path comes back and
    the row fails later, alone, when its image cannot be opened."""
    import os

    from vtfusion.catalogs.sources import _Resolver

    with tempfile.TemporaryDirectory() as tmp:
        root = _symlink_tree(Path(tmp).resolve())
        rel = "/".join(parts)
        if absolute:
            rel = str(root / rel)
        resolver = _Resolver(root)
        for _ in range(2):  # the second time from the directory cache
            try:
                want = (root / rel).resolve()
            except RuntimeError:  # a symlink loop
                want = Path(os.path.realpath(root / rel))
            got = resolver(rel)
            assert got == want, rel
            assert resolver.inside(got) == want.is_relative_to(root), rel


# ---- typed metadata: filtering the stored collection equals Python on the typed catalog ---------

NUMBERISH = st.one_of(
    st.integers(-10**6, 10**6).map(str),
    st.floats(allow_nan=False, allow_infinity=False, width=32).map(repr),
    st.from_regex(r"0\d{1,5}", fullmatch=True),  # codes with leading zeros: "02139"
    st.sampled_from(["nan", "NaN", "NAN", "Nan", "-nan", "inf", "+inf", "-Infinity", "Infinity", "INF", "1e999", "1_000",
                     "٣", "１２", " 12 ", "+7", "-0", "0.50", ".5", "5.", "1e3", "0x10"]),
)
VALUE = st.one_of(NUMBERISH, NUMBERISH, st.just(""), st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=8))


@pytest.fixture
def typed_col(tmp_path, model_dir, small_catalog, db_url):
    from vtfusion.indexer.collection import Collection

    return Collection.init(tmp_path / "c", model_dir, db_url=db_url), sorted((small_catalog / "images").iterdir())[0]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(values=st.one_of(
    st.lists(VALUE, min_size=1, max_size=5),
    st.lists(st.one_of(st.integers(-999, 999).map(str), st.floats(-1e6, 1e6, width=32).map(repr), st.just("")), min_size=1, max_size=5),
    st.lists(st.sampled_from(["a\x00b", "02139", "x"]), min_size=1, max_size=3),
))
def test_filters_on_stored_metadata_equal_python_on_the_typed_catalog(typed_col, values):
    import csv
    import io
    import itertools

    from vtfusion.catalogs.sources import read_source
    from vtfusion.indexer.ingest import column_kinds, ingest
    from vtfusion.indexer.lifecycle import select_items

    c, image = typed_col
    n = next(_EXAMPLE)
    col = f"v{n}"
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["id", "image", "caption", col])
    for j, v in enumerate(values):
        w.writerow([f"e{n}r{j}", str(image), f"item {n} {j}", v])
    path = Path(tempfile.mkdtemp()) / "cat.csv"
    path.write_text(buf.getvalue(), encoding="utf-8")
    image_link = path.parent / image.name
    image_link.write_bytes(image.read_bytes())
    path.write_text(buf.getvalue().replace(str(image), image.name), encoding="utf-8")

    rows, errs = read_source(path, kinds=column_kinds(c))  # the typed catalog: the oracle's input
    assert all("\x00" not in str(r.metadata.get(col, "")) for r in rows)  # NUL: a row error, never stored
    rep = ingest(c, path, workers=0, progress=False, source_name=f"ex{n}")
    assert rep.added == len(rows) and rep.failed == len(errs)
    kind = filters.known_columns(c.Session())[col] if any(col in r.metadata for r in rows) else None
    typed = {r.external_id: r.metadata.get(col) for r in rows}
    written = dict(zip((f"e{n}r{j}" for j in range(len(values))), values))
    for ext, v in typed.items():  # text stays as written; numbers are finite
        if kind == "text" and v is not None:
            assert v == written[ext]
        if kind == "number" and v is not None:
            assert isinstance(v, (int, float)) and v == v and abs(v) != float("inf")
    present = sorted({v for v in typed.values() if v is not None}, key=repr)
    if kind == "number":
        exprs = [(f"{col} {op} {filters.quote(x)}", lambda v, op=op, x=x: {"=": v == x, "<": v < x, ">=": v >= x}[op])
                 for x in present for op in ("=", "<", ">=")]
        exprs += [(f"{col} BETWEEN {filters.quote(a)} AND {filters.quote(b)}", lambda v, a=a, b=b: a <= v <= b)
                  for a, b in itertools.combinations(sorted(present), 2)]
    else:
        exprs = [(f"{col} = {filters.quote(x)}", lambda v, x=x: v == x) for x in present]
        exprs += [(f"{col} != {filters.quote(x)}", lambda v, x=x: v != x) for x in present]
        if len(present) > 1:
            exprs.append((f"{col} IN ({filters.quote(present[0])}, {filters.quote(present[-1])})", lambda v: v in (present[0], present[-1])))
    with c.Session() as s:
        ext_of = dict(s.execute(select(Item.id, Item.external_id).where(Item.source == f"ex{n}")).all())
    for expr, want in exprs:
        got = {ext_of[i] for i in select_items(c, where=f"source = 'ex{n}' AND ({expr})")}
        assert got == {e for e, v in typed.items() if v is not None and want(v)}, expr


_EXAMPLE = iter(range(10**9))


