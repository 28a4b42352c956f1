"""Alembic environment: runs on the connection handed in by ``indexer.collection.migrate``."""

from alembic import context

from vtfusion.indexer.schema import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("vtfusion runs its migrations through indexer.collection.migrate(), not the alembic CLI")
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
