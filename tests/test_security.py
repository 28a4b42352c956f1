"""Security: no secrets in logs or messages (database URLs with passwords are masked), pickled
checkpoints refused, filter expressions never run SQL, files served only under source roots.
(Upload caps and path traversal in the UI: tests/test_ui.py; filters as properties:
tests/test_properties.py; pickled BLIP/CLIP weights: tests/test_backends.py.)"""

from __future__ import annotations

import logging
import uuid

import pytest
import sqlalchemy as sa
import torch
from typer.testing import CliRunner

from conftest import PG_ADMIN_URL, _pg_available
from vtfusion.indexer.collection import Collection, CollectionError, mask_url
from vtfusion.models import factory
from vtfusion.ui.cli import app

SECRET = "s3cret-Pa55word"


def test_mask_url_hides_passwords():
    assert SECRET not in mask_url(f"postgresql+psycopg://user:{SECRET}@db.example:5432/x")
    assert "***" in mask_url(f"postgresql://user:{SECRET}@h/x")
    assert mask_url("not a url ::::") == "<unparseable url>"


def test_unreachable_database_error_masks_the_password(tmp_path, model_dir, caplog):
    caplog.set_level(logging.DEBUG)
    url = f"postgresql+psycopg://postgres:{SECRET}@127.0.0.1:1/nowhere?connect_timeout=2"
    r = CliRunner().invoke(app, ["-v", "init", str(tmp_path / "c"), "--model", str(model_dir), "--db", url])
    assert r.exit_code == 1 and "cannot reach the database" in r.output
    assert not (tmp_path / "c").exists()  # nothing left behind by a refused init
    assert SECRET not in r.output and SECRET not in caplog.text
    assert "***" in r.output


@pytest.mark.skipif(not _pg_available(), reason="PostgreSQL unreachable")
def test_a_real_password_never_reaches_logs_or_output(tmp_path, model_dir, small_catalog, caplog):
    caplog.set_level(logging.DEBUG)
    name = f"vtf_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgres@", f"postgres:{SECRET}@")
        url = f"{base}/{name}"  # trust auth: the password is accepted and ignored, as a real one would be used
        runner, out = CliRunner(), []
        for args in (["init", str(tmp_path / "c"), "--model", str(model_dir), "--db", url],
                     ["ingest", str(tmp_path / "c"), str(small_catalog / "test.csv"), "--workers", "0"],
                     ["stats", str(tmp_path / "c")], ["stats", str(tmp_path / "c"), "--json"],
                     ["search", str(tmp_path / "c"), "a red hat", "--json"], ["verify", str(tmp_path / "c")],
                     ["errors", str(tmp_path / "c")]):
            r = runner.invoke(app, ["-v", *args])
            assert r.exit_code == 0, r.output
            out.append(r.output)
        text = "\n".join(out) + caplog.text
        assert SECRET not in text
        assert "postgres:***@" in text  # the database is named, masked
        from vtfusion.indexer import lifecycle

        assert SECRET not in str(lifecycle.stats(Collection.open(tmp_path / "c")))
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_pickled_checkpoint_is_refused_and_never_unpickled(tmp_path, bundle, monkeypatch):
    import pickle

    folder = tmp_path / "m"
    factory.save(bundle, folder)
    (folder / "model.safetensors").unlink()
    torch.save(bundle.model.state_dict(), folder / "pytorch_model.bin")  # a pickle where the weights should be
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("unpickled"))
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("unpickled"))
    with pytest.raises(factory.ModelLoadError, match="missing model.safetensors"):
        factory.load(folder)
    with pytest.raises(CollectionError, match="missing model.safetensors"):
        Collection.init(tmp_path / "c", folder)
