"""Shared fixtures: tiny models with odd sizes (shape bugs fail loudly) and small generated catalogs."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach a hub
torch.set_num_threads(2)

from vtfusion.catalogs.demo import generate  # noqa: E402
from vtfusion.models import factory  # noqa: E402
from vtfusion.models.config import VisionConfig  # noqa: E402

TINY_VISION = VisionConfig(
    image_size=37, stem_width=6, stage_widths=(6, 10), stage_depths=(1, 1), width=18, num_heads=3, num_layers=1
)
TEXTS = [
    "a large red striped mug to the left of a small blue plain sneaker",
    "a small blue plain mug to the left of a large red striped sneaker",
    "a big green dotted hat",
    "a little yellow checkered bag on a plain background",
]


def tiny_bundle(texts=TEXTS, **kw) -> factory.Bundle:
    torch.manual_seed(0)
    return factory.build_scratch(
        texts, vision=TINY_VISION, vocab_size=120, hidden_size=20, num_layers=1, num_heads=2, max_length=24,
        embed_dim=14, **kw,
    )


@pytest.fixture
def bundle() -> factory.Bundle:
    b = tiny_bundle()
    b.model.eval()
    return b


@pytest.fixture(scope="session")
def small_catalog(tmp_path_factory):
    out = tmp_path_factory.mktemp("catalog")
    generate(out, n=64, seed=3, image_size=48)
    return out


# ---- collections: a saved tiny model and one database per test, SQLite and PostgreSQL --------

PG_ADMIN_URL = os.environ.get("VTFUSION_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, small_catalog):
    """A tiny model, briefly trained on the small catalog, saved as a model folder."""
    from vtfusion.catalogs.sources import read_csv
    from vtfusion.models.data import Pair, PairDataset
    from vtfusion.models.train import TrainConfig, train

    rows, _ = read_csv(small_catalog / "train.csv")
    torch.manual_seed(0)
    b = factory.build_scratch(
        [t for r in rows for t in r.texts], vision=TINY_VISION, vocab_size=200, hidden_size=32, num_layers=1,
        num_heads=2, embed_dim=24,
    )
    ds = PairDataset([Pair(r.image, r.texts, r.source) for r in rows], b.transform)
    ds.preload(progress=False)
    out = tmp_path_factory.mktemp("model")
    train(b, ds, out, TrainConfig(epochs=3, batch_size=16, checkpoint_every=0, progress=False))
    return out


def _pg_available() -> bool:
    try:
        import sqlalchemy as sa

        eng = sa.create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 3})
        with eng.connect():
            pass
        eng.dispose()
        return True
    except Exception:  # noqa: BLE001
        return False


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """'' (SQLite inside the collection) or a fresh PostgreSQL database dropped afterwards.

    PostgreSQL tests skip when the server is unreachable, unless VTFUSION_REQUIRE_POSTGRES=1
    (set by CI), which turns that skip into a failure.
    """
    if request.param == "sqlite":
        yield ""
        return
    if not _pg_available():
        if os.environ.get("VTFUSION_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL is required (VTFUSION_REQUIRE_POSTGRES=1) but {PG_ADMIN_URL} is unreachable")
        pytest.skip("PostgreSQL unreachable")
    yield from _pg_database()


def _pg_database():
    import uuid

    import sqlalchemy as sa

    name = f"vtf_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def second_db_url(db_url):
    """A second database of db_url's kind, for a second collection ('' for SQLite)."""
    if not db_url:
        yield ""
        return
    yield from _pg_database()
