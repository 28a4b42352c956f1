"""items.image_hash: the sha256 of an item's image bytes alone

Revision ID: 0003
Revises: 0002

Evaluation matches a pairs file's images to stored items by their bytes, whatever text and
metadata they were ingested with (``content_hash`` covers all three). Items ingested before
this revision keep NULL; evaluation then checks them by path and content hash instead.
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("items", sa.Column("image_hash", sa.String(64), nullable=True))
    op.create_index("ix_items_image_hash", "items", ["image_hash"])


def downgrade() -> None:
    op.drop_index("ix_items_image_hash", "items")
    op.drop_column("items", "image_hash")
