"""collection identity, content hash unique among active items only, reembed staging

Revision ID: 0002
Revises: 0001

- ``collection``: the one collection this database holds (uid, folder, model config);
- ``items.content_hash`` is unique among *active* items only (a partial unique index), so an
  item can go back to an earlier version's content and a deleted item can be ingested again;
- ``reembed_staging``: vectors and token locations under a new model, until the swap.
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "collection",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("uid", sa.String(36), nullable=False),
        sa.Column("folder", sa.String(2048), nullable=False),
        sa.Column("config", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "reembed_staging",
        sa.Column("item_id", sa.Integer, sa.ForeignKey("items.id"), primary_key=True),
        sa.Column("fingerprint", sa.String(64), primary_key=True),
        sa.Column("image_vector", sa.LargeBinary, nullable=False),
        sa.Column("text_vector", sa.LargeBinary, nullable=True),
        sa.Column("token_shard", sa.Integer, nullable=True),
        sa.Column("token_offset", sa.Integer, nullable=True),
    )
    if op.get_bind().dialect.name == "sqlite":
        # the inline UNIQUE of 0001 has no name: rebuild the table without it (foreign keys are
        # off during migrations, see collection.migrate)
        meta = sa.MetaData()
        items = sa.Table(
            "items", meta,
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("source", sa.String(1024), nullable=False),
            sa.Column("external_id", sa.String(512), nullable=False),
            sa.Column("image_path", sa.String(2048), nullable=False),
            sa.Column("text", sa.Text, nullable=False),
            sa.Column("content_hash", sa.String(64), nullable=False),
            sa.Column("meta", sa.JSON, nullable=False),
            sa.Column("status", sa.String(16), nullable=False),
            sa.Column("run_id", sa.Integer, sa.ForeignKey("ingest_runs.id"), nullable=True),
            sa.Column("token_shard", sa.Integer, nullable=True),
            sa.Column("token_offset", sa.Integer, nullable=True),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        )
        with op.batch_alter_table("items", copy_from=items, recreate="always"):
            pass
        op.create_index("ix_items_external_id", "items", ["external_id"])
        op.create_index("ix_items_status", "items", ["status"])
        op.create_index("ix_items_source_external", "items", ["source", "external_id"])
    else:
        op.drop_constraint("items_content_hash_key", "items", type_="unique")
    op.create_index("ix_items_content_hash", "items", ["content_hash"])
    op.create_index(
        "uq_items_active_hash", "items", ["content_hash"], unique=True,
        sqlite_where=sa.text("status = 'active'"), postgresql_where=sa.text("status = 'active'"),
    )


def downgrade() -> None:
    op.drop_index("uq_items_active_hash", "items")
    op.drop_index("ix_items_content_hash", "items")
    op.drop_table("reembed_staging")
    op.drop_table("collection")
