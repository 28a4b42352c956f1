"""The CLI end to end on a tiny catalog, and every command documented in the README."""

from __future__ import annotations

import json
import re
from pathlib import Path

from typer.testing import CliRunner

from vtfusion.ui.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_demo_catalog_then_train_with_validation(tmp_path):
    r = runner.invoke(app, ["demo-catalog", str(tmp_path / "cat"), "--n", "40", "--seed", "2", "--image-size", "48"])
    assert r.exit_code == 0, r.output
    assert "wrote 40 items" in r.output
    # one bad row: the run goes on and says what it skipped
    with open(tmp_path / "cat" / "train.csv", "a") as f:
        f.write("bad1,images/missing.png,Missing,a missing image,mug,red,plain,small,1,1.00,\n")
    r = runner.invoke(
        app,
        ["train", str(tmp_path / "cat" / "train.csv"), "--out", str(tmp_path / "model"),
         "--val", str(tmp_path / "cat" / "test.csv"), "--epochs", "2", "--text-tower", "scratch",
         "--image-size", "32", "--batch-size", "8", "--device", "cpu", "--checkpoint-every", "3", "--rerank-epochs", "2"],
    )
    assert r.exit_code == 0, r.output
    assert "R@1 ITC only" in r.output and "R@1 ITM rerank of top" in r.output
    assert "reranker steps on ITC's own candidates" in r.output
    assert "1 rows skipped" in r.output and "missing.png" in r.output
    v = json.loads((tmp_path / "model" / "validation.json").read_text())
    assert 0.0 <= v["itc_r1"] <= 1.0 and v["n"] > 0 and v["text_tower"] == "scratch"
    assert (tmp_path / "model" / "model.safetensors").exists()
    # --resume picks up the newest checkpoint and finishes the remaining epochs
    r = runner.invoke(
        app,
        ["train", str(tmp_path / "cat" / "train.csv"), "--out", str(tmp_path / "model"), "--epochs", "3",
         "--text-tower", "scratch", "--batch-size", "8", "--device", "cpu", "--resume", "--rerank-epochs", "1"],
    )
    assert r.exit_code == 0, r.output
    assert "3.0 epochs" in r.output


def test_train_errors_are_messages_not_tracebacks(tmp_path):
    r = runner.invoke(app, ["train", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "m"), "--epochs", "1"])
    assert r.exit_code == 1
    assert "catalog file not found" in r.output and "Traceback" not in r.output
    (tmp_path / "c.csv").write_text("id,image,name\n1,a.png,x\n")
    r = runner.invoke(app, ["train", str(tmp_path / "c.csv"), "--out", str(tmp_path / "m"), "--epochs", "1"])
    assert r.exit_code == 1 and "no text column" in r.output and "--text-col" in r.output
    r = runner.invoke(app, ["train", str(tmp_path / "c.csv"), "--out", str(tmp_path / "m"), "--epochs", "1",
                            "--text-col", "name", "--text-tower", "nonexistent-tower"])
    assert r.exit_code == 2 and "not one of scratch, minilm" in r.output  # a usage error, with the choices


def test_every_cli_command_is_documented_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    commands = [c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands]
    assert commands, "no commands registered"
    undocumented = [c for c in commands if not re.search(rf"vtfusion {re.escape(c)}\b", readme)]
    assert not undocumented, f"commands missing from README.md: {undocumented}"


def test_import_layers_contract():
    """models <- indexer <- search <- ui, and models never imports faiss/sqlalchemy/streamlit."""
    import subprocess
    import sys

    lint = Path(sys.executable).parent / "lint-imports"
    r = subprocess.run([str(lint), "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "broken" not in r.stdout.lower() or "0 broken" in r.stdout.lower()


def test_collection_commands(tmp_path, model_dir, small_catalog):
    col = str(tmp_path / "col")
    r = runner.invoke(app, ["init", col, "--model", str(model_dir)])
    assert r.exit_code == 0, r.output
    bad = tmp_path / "bad.csv"
    bad.write_text("id,image,caption,color\nx1,nowhere.png,a mug,red\n")
    r = runner.invoke(app, ["ingest", col, str(small_catalog / "test.csv"), "--workers", "0"])
    assert r.exit_code == 0 and "added" in r.output and "0 failed" in r.output, r.output
    r = runner.invoke(app, ["ingest", col, str(bad), "--workers", "0"])
    assert "1 failed" in r.output and f"vtfusion errors {col}" in r.output
    r = runner.invoke(app, ["errors", col])
    assert f"{bad}:2: image file not found" in r.output
    r = runner.invoke(app, ["stats", col, "--json"])
    st = json.loads(r.stdout)
    n = st["items_active"]
    assert n > 0 and st["indexes"]["image"]["count"] == n and st["ingest_errors"] == 1
    r = runner.invoke(app, ["delete", col, "--where", "colour = 'red'"])
    assert r.exit_code == 1 and "unknown column 'colour'" in r.output
    r = runner.invoke(app, ["delete", col, "--where", "n_objects = 1"])
    assert r.exit_code == 0 and "deleted" in r.output
    r = runner.invoke(app, ["verify", col])
    assert r.exit_code == 0 and "ok" in r.output, r.output
    r = runner.invoke(app, ["reindex", col, "--index", "Flat"])
    assert r.exit_code == 0 and "image: Flat" in r.output
    # a tampered index: verify fails and names the mismatch
    from vtfusion.indexer.collection import Collection

    c = Collection.open(col)
    c.indexes["image"].remove(c.indexes["image"].ids()[:2])
    from vtfusion.indexer.vectors import read_meta

    c.indexes["image"].save(tmp_path / "col" / "index", read_meta(tmp_path / "col" / "index")["image"])
    r = runner.invoke(app, ["verify", col])
    assert r.exit_code == 1 and "2 stored items missing" in r.output


def test_search_command(tmp_path, model_dir, small_catalog):
    col = str(tmp_path / "col")
    assert runner.invoke(app, ["init", col, "--model", str(model_dir)]).exit_code == 0
    assert runner.invoke(app, ["ingest", col, str(small_catalog / "train.csv"), "--workers", "0"]).exit_code == 0
    r = runner.invoke(app, ["search", col, "a red striped mug", "-k", "4", "--rerank-depth", "8"])
    assert r.exit_code == 0, r.output
    assert "fused" in r.output and "timings ms" in r.output and len([ln for ln in r.output.splitlines() if ln[:3].strip().isdigit()]) == 4
    r = runner.invoke(app, ["search", col, "a mug", "--json", "-k", "3", "--where", "price < 1000"])
    d = json.loads(r.stdout)
    assert len(d["hits"]) == 3 and {"itc", "itm", "fused", "retrieval_rank", "moved"} <= set(d["hits"][0])
    assert d["timings_ms"]["total"] > 0 and d["matching"] > 0
    item = d["hits"][0]["item_id"]
    r = runner.invoke(app, ["search", col, "--item", str(item), "--target", "text", "--json", "-k", "2"])
    assert r.exit_code == 0 and item not in [h["item_id"] for h in json.loads(r.stdout)["hits"]]
    r = runner.invoke(app, ["search", col, "x", "--where", "nope = 1"])
    assert r.exit_code == 1 and "unknown column 'nope'" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["search", col])
    assert r.exit_code == 2 and "exactly one query" in r.output  # a usage error


def test_demo_runs_the_whole_job(tmp_path):
    out = tmp_path / "demo"
    r = runner.invoke(app, ["demo", "--out", str(out), "--n", "60", "--epochs", "2", "--rerank-epochs", "1", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    for marker in ("R@1 ITC only", "== index the training catalog", "== evaluate reranking", "text -> image", "image -> text", "timings ms"):
        assert marker in r.output, marker
    assert (out / "eval" / "report.json").exists() and (out / "collection" / "collection.toml").exists()


def test_version():
    from typer.testing import CliRunner

    import vtfusion
    from vtfusion.ui.cli import app

    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0 and r.stdout.strip() == f"vtfusion {vtfusion.__version__}" and vtfusion.__version__ == "0.1.0"


def test_commands_that_need_no_model_never_import_torch(tmp_path, model_dir, small_catalog):
    """stats, errors, verify, delete, --help and --version start without torch and transformers
    (their start time is measured in bench/startup.py)."""
    import subprocess
    import sys

    import vtfusion

    col = tmp_path / "col"
    vtfusion.ingest(vtfusion.create_collection(col, model_dir), small_catalog / "train.csv", workers=0, progress=False)
    probe = (
        "import runpy, sys\n"
        "sys.argv = ['vtfusion', *sys.argv[1:]]\n"
        "try:\n    runpy.run_module('vtfusion.ui.cli', run_name='__main__')\n"
        "except SystemExit as e:\n    code = e.code\n"
        "print('HEAVY', [m for m in ('torch', 'transformers', 'PIL') if m in sys.modules], code)\n"
    )
    for args in (["stats", str(col)], ["errors", str(col)], ["verify", str(col)], ["delete", str(col), "--ids", "nope", "--dry-run"],
                 ["--help"], ["--version"], ["stats", str(col), "--json"]):
        out = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=120).stdout
        last = out.strip().splitlines()[-1]
        assert last.startswith("HEAVY []"), (args, out[-2000:])


def _ingested(tmp_path, model_dir, small_catalog, name="col"):
    import vtfusion

    col = tmp_path / name
    vtfusion.ingest(vtfusion.create_collection(col, model_dir), small_catalog / "train.csv", workers=0, progress=False)
    return col


def test_items_are_named_by_their_catalog_id(tmp_path, model_dir, small_catalog):
    """search prints external ids and image paths; --item takes the external id (or #ITEM_ID, or a
    bare item id that is no external id), and the API's item= too."""
    import shutil

    import vtfusion

    col = _ingested(tmp_path, model_dir, small_catalog)
    r = runner.invoke(app, ["search", str(col), "a red mug", "--json", "-k", "3"])
    hit = json.loads(r.stdout)["hits"][0]
    r = runner.invoke(app, ["search", str(col), "a red mug", "-k", "3"])
    assert hit["external_id"] in r.output and Path(hit["image_path"]).name in r.output  # the table shows both
    by = {}
    for ref in (hit["external_id"], f"#{hit['item_id']}", str(hit["item_id"])):
        r = runner.invoke(app, ["search", str(col), "--item", ref, "--target", "text", "--json", "-k", "3"])
        assert r.exit_code == 0, (ref, r.output)
        by[ref] = [h["item_id"] for h in json.loads(r.stdout)["hits"]]
    assert by[hit["external_id"]] == by[f"#{hit['item_id']}"] == by[str(hit["item_id"])]
    api = vtfusion.query(vtfusion.open_collection(col), item=hit["external_id"], target="text", k=3)
    assert [h.item_id for h in api.hits] == by[hit["external_id"]]
    r = runner.invoke(app, ["search", str(col), "--item", "no-such-item"])
    assert r.exit_code == 1 and "no active item with id 'no-such-item'" in r.output
    # a second catalog that uses the same id for another item: the id now names two items
    shutil.copytree(small_catalog / "images", tmp_path / "other" / "images")
    (tmp_path / "other" / "other.csv").write_text(f"id,image,caption\n{hit['external_id']},images/{Path(hit['image_path']).name},another item\n")
    r = runner.invoke(app, ["ingest", str(col), str(tmp_path / "other" / "other.csv"), "--workers", "0"])
    assert r.exit_code == 0 and "added 1" in r.output, r.output
    r = runner.invoke(app, ["search", str(col), "--item", hit["external_id"]])
    assert r.exit_code == 1 and "is the id of 2 active items" in r.output and f"#{hit['item_id']}" in r.output


def test_cli_conventions(tmp_path, model_dir, small_catalog):
    """Global flags after the command, enums listed and refused with exit 2, --json on every
    command that prints results, completion, and no traceback without --debug."""
    col = str(_ingested(tmp_path, model_dir, small_catalog))
    r = runner.invoke(app, ["stats", col, "--json", "-q"])  # -q after the command
    assert r.exit_code == 0 and json.loads(r.stdout)["items_active"] > 0
    r = runner.invoke(app, ["search", col, "x", "--where", "-q", "-k", "1"])  # an option's value stays its value
    assert r.exit_code == 1 and "unexpected character '-'" in r.output
    r = runner.invoke(app, ["search", col, "x", "--target", "video"])
    assert r.exit_code == 2 and "'video' is not one of 'image', 'text'" in r.output
    assert "<image|text>" in runner.invoke(app, ["search", "--help"]).output
    assert "<itm+itc|itm|itc>" in runner.invoke(app, ["eval", "--help"]).output
    r = runner.invoke(app, ["init", str(tmp_path / "c2"), "--model", str(model_dir), "--token-dtype", "fp8"])
    assert r.exit_code == 2 and "fp8" in r.output
    r = runner.invoke(app, ["train", "x.csv", "--out", "m", "--device", "gpu"])
    assert r.exit_code == 2 and "auto, cpu, cuda, cuda:N" in r.output
    assert "--install-completion" in runner.invoke(app, ["--help"]).output
    for args in (["errors", col, "--json"], ["verify", col, "--json"]):
        r = runner.invoke(app, args)
        assert r.exit_code == 0, (args, r.output)
        json.loads(r.stdout)
    assert json.loads(runner.invoke(app, ["verify", col, "--json"]).stdout)["ok"] is True
    r = runner.invoke(app, ["ingest", col, str(small_catalog / "train.csv"), "--json", "--workers", "0"])
    assert r.exit_code == 0 and json.loads(r.stdout)["duplicates"] > 0
    r = runner.invoke(app, ["eval", col, str(small_catalog / "test.csv"), "--json", "--out", str(tmp_path / "ev"),
                            "--depths", "0,8", "--latency-queries", "0"])
    assert r.exit_code == 0, r.output
    assert "rerank@8" in json.loads(r.stdout)["t2i"]
    r = runner.invoke(app, ["eval", col, str(small_catalog / "test.csv"), "--depths", "0,x"])
    assert r.exit_code == 2
    r = runner.invoke(app, ["search", col, "--image", str(small_catalog / "train.csv")])  # not an image: a message
    assert r.exit_code == 1 and "not an image" in r.output and "Traceback" not in r.output


def test_an_unexpected_error_is_one_line_unless_debug(tmp_path, monkeypatch):
    import vtfusion.indexer.lifecycle as lifecycle

    def broken(*a, **k):
        raise KeyError("boom")

    monkeypatch.setattr(lifecycle, "errors", broken)
    monkeypatch.setattr("vtfusion.ui.cli._open", lambda c: None)
    r = runner.invoke(app, ["errors", str(tmp_path)])
    assert r.exit_code == 1 and "error: 'boom' (KeyError; run again with --debug" in r.output and r.exception is None or isinstance(r.exception, SystemExit)
    assert "Traceback" not in r.output
    r = runner.invoke(app, ["errors", str(tmp_path), "--debug"])
    assert isinstance(r.exception, KeyError)  # re-raised: the traceback is shown


def test_train_defaults_match_the_documentation():
    from vtfusion.ui.cli import rerank_epochs_for

    help_text = " ".join(runner.invoke(app, ["train", "--help"]).output.split())  # help wraps at the terminal width
    assert "[default: scratch]" in help_text and ".jsonl" in help_text and ".parquet" in help_text
    assert (rerank_epochs_for(16), rerank_epochs_for(2), rerank_epochs_for(3), rerank_epochs_for(None)) == (8, 1, 2, 8)


def test_cli_choices_are_the_librarys():
    from vtfusion.indexer.tokens import DTYPES
    from vtfusion.search.evaluate import GALLERIES
    from vtfusion.search.rerank import FUSIONS
    from vtfusion.ui.cli import Fusion, Gallery, Target, TokenDtype

    assert tuple(f.value for f in Fusion) == FUSIONS and tuple(g.value for g in Gallery) == GALLERIES
    assert tuple(t.value for t in TokenDtype) == ("auto", *DTYPES) and tuple(t.value for t in Target) == ("image", "text")
