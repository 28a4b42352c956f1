"""initial schema: items, embeddings, changes, metadata columns, ingest runs and errors

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ingest_runs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("source", sa.String(1024), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("added", sa.Integer, nullable=False),
        sa.Column("duplicates", sa.Integer, nullable=False),
        sa.Column("failed", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
    )
    op.create_table(
        "items",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("source", sa.String(1024), nullable=False),
        sa.Column("external_id", sa.String(512), nullable=False),
        sa.Column("image_path", sa.String(2048), nullable=False),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("content_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("meta", sa.JSON, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("run_id", sa.Integer, sa.ForeignKey("ingest_runs.id"), nullable=True),
        sa.Column("token_shard", sa.Integer, nullable=True),
        sa.Column("token_offset", sa.Integer, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_items_external_id", "items", ["external_id"])
    op.create_index("ix_items_status", "items", ["status"])
    op.create_index("ix_items_source_external", "items", ["source", "external_id"])
    op.create_table(
        "embeddings",
        sa.Column("item_id", sa.Integer, sa.ForeignKey("items.id"), primary_key=True),
        sa.Column("modality", sa.String(8), primary_key=True),
        sa.Column("vector", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "changes",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("item_id", sa.Integer, sa.ForeignKey("items.id"), nullable=False),
        sa.Column("op", sa.String(8), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_changes_item_id", "changes", ["item_id"])
    op.create_table(
        "meta_columns",
        sa.Column("name", sa.String(256), primary_key=True),
        sa.Column("kind", sa.String(8), nullable=False),
    )
    op.create_table(
        "ingest_errors",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.Integer, sa.ForeignKey("ingest_runs.id"), nullable=True),
        sa.Column("file", sa.String(2048), nullable=False),
        sa.Column("line", sa.Integer, nullable=False),
        sa.Column("reason", sa.String(1024), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("file", "line", "reason", name="uq_ingest_error"),
    )


def downgrade() -> None:
    for table in ("ingest_errors", "meta_columns", "changes", "embeddings", "items", "ingest_runs"):
        op.drop_table(table)
