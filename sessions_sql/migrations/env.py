"""Alembic environment of sessions_sql's own migrations.

Run from code (``sessions_sql.migrate``, which passes a connection), or from the command line
(``alembic -n <section> upgrade head``, where the section sets
``script_location = sessions_sql:migrations``). The database URL comes from the section's
``sqlalchemy.url``, else ``SESSIONS_SQL_URL``, else ``sqlite+aiosqlite:///sessions.db``. The
PostgreSQL schema comes from ``-x schema=NAME``, else the section's ``schema`` option. On a
Citus coordinator, ``-x citus=true`` (or the section's ``citus = true``) distributes the tables
after an upgrade (see ``_dialects.citus.distribute_on_citus``).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from alembic import context
from sqlalchemy import Connection, create_engine, pool
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.schema import CreateSchema

from sessions_sql._dialects import distribute_on_citus, migration_lock, require_citus
from sessions_sql._migrate import VERSION_TABLE
from sessions_sql.models import Base

DEFAULT_URL = "sqlite+aiosqlite:///sessions.db"

config = context.config


def _schema() -> str | None:
    schema = config.attributes.get("schema")
    if schema is None:
        schema = context.get_x_argument(as_dictionary=True).get("schema")
    if schema is None:
        schema = config.get_main_option("schema")
    return schema or None


def _citus() -> bool:
    if config.attributes.get("citus"):
        return True
    flag = context.get_x_argument(as_dictionary=True).get("citus")
    if flag is None:
        flag = config.get_main_option("citus")
    return (flag or "").lower() in ("1", "true", "yes", "on")


def _url() -> str:
    return (
        config.get_main_option("sqlalchemy.url")
        or os.environ.get("SESSIONS_SQL_URL")
        or DEFAULT_URL
    )


def _configure(**kw: Any) -> None:
    context.configure(
        target_metadata=Base.metadata,
        version_table=VERSION_TABLE,
        version_table_schema=_schema(),
        # A revision may commit part way (a PostgreSQL index built CONCURRENTLY): each one
        # runs in its own transaction, with the version row moved in it.
        transaction_per_migration=True,
        **kw,
    )


def run_offline() -> None:
    _configure(url=_url(), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_on(connection: Connection) -> None:
    """Upgrade on ``connection`` (outside a transaction) under the database's migration
    lock, and commit; with citus asked for, only on a database that has it."""
    citus = _citus()
    if citus:
        require_citus(connection)  # before any change
    with migration_lock(connection):
        schema = _schema()
        if schema is not None and connection.dialect.name == "postgresql":
            connection.execute(CreateSchema(schema, if_not_exists=True))
            connection.commit()
        _configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
        if connection.in_transaction():
            connection.commit()
        if citus:
            distribute_on_citus(connection, schema)


async def _run_async(url: str) -> None:
    engine = create_async_engine(url, poolclass=pool.NullPool)
    try:
        async with engine.connect() as conn:
            await conn.run_sync(run_on)
    finally:
        await engine.dispose()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        run_on(connection)
        return
    url = _url()
    if make_url(url).get_dialect().is_async:
        asyncio.run(_run_async(url))
        return
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            run_on(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
