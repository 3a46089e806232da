"""Alembic environment: runs against the URL handed over by `aicloud.store.migrate`."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from aicloud.store.db import sync_url, watch_sqlite
from aicloud.store.tables import Base

config = context.config
url = sync_url(config.get_main_option("sqlalchemy.url") or "")

if context.is_offline_mode():
    context.configure(url=url, target_metadata=Base.metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    engine = create_engine(url)
    watch_sqlite(engine, foreign_keys=False)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=Base.metadata,
                          render_as_batch=connection.dialect.name == "sqlite")
        with context.begin_transaction():
            if connection.dialect.name == "postgresql":
                # one migrator at a time; the others then find the schema current
                connection.exec_driver_sql("SELECT pg_advisory_xact_lock(4242001)")
            context.run_migrations()
    engine.dispose()
