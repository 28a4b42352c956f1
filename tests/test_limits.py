"""Issue 17: hostile or oversized input gets a message, never a traceback or a raw database error."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from indexer.collection import Collection
from indexer.ingest import ingest
from ui.cli import app


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
