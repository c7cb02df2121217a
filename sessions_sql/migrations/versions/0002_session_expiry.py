"""Add sessions.expires_at and a partial index of the sessions that expire.

Safe on a large, live table. On PostgreSQL, adding a nullable column without a default
changes only the catalog (no table rewrite); its brief ACCESS EXCLUSIVE lock is taken with a
short ``lock_timeout`` and retried, so the migration never queues behind a long transaction
with every writer queued behind it. The index is built ``CONCURRENTLY``, outside a
transaction, without blocking writes.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

import asyncio
import time

import sqlalchemy as sa
from alembic import op
from sqlalchemy.exc import DBAPIError
from sqlalchemy.util import await_only
from sqlalchemy.util.concurrency import in_greenlet

from sessions_sql.models import TIME  # DateTime(timezone=True); DATETIME(6) on MariaDB/MySQL

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

INDEX = "ix_sessions_expires_at"
LOCK_TIMEOUT = "100ms"  # the longest any writer waits behind the ALTER TABLE
LOCK_ATTEMPTS = 100
_LOCK_NOT_AVAILABLE = "55P03"


def _add_column(schema: str | None) -> None:
    op.add_column("sessions", sa.Column("expires_at", TIME), schema=schema)


def _pause(seconds: float) -> None:
    """Sleep without blocking the event loop when run through an async engine."""
    if in_greenlet():
        await_only(asyncio.sleep(seconds))
    else:
        time.sleep(seconds)


def _add_column_waiting_briefly(schema: str | None) -> None:
    connection = op.get_bind()
    for attempt in range(1, LOCK_ATTEMPTS + 1):
        savepoint = connection.begin_nested()
        try:
            connection.exec_driver_sql(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
            _add_column(schema)
        except DBAPIError as error:
            savepoint.rollback()
            sqlstate = getattr(error.orig, "sqlstate", None) or getattr(error.orig, "pgcode", None)
            if sqlstate != _LOCK_NOT_AVAILABLE or attempt == LOCK_ATTEMPTS:
                raise
            _pause(min(0.05 * attempt, 1.0))  # let the transaction holding the table end
            continue
        savepoint.commit()
        connection.exec_driver_sql("SET LOCAL lock_timeout = DEFAULT")
        return


def upgrade() -> None:
    context = op.get_context()
    schema = context.version_table_schema
    where = sa.text("expires_at IS NOT NULL")
    if context.dialect.name != "postgresql":
        _add_column(schema)
        op.create_index(INDEX, "sessions", ["expires_at"], schema=schema, sqlite_where=where)
        return
    if context.as_sql:
        _add_column(schema)
    else:
        _add_column_waiting_briefly(schema)
    with context.autocommit_block():
        if not context.as_sql:
            # A build that was interrupted leaves an invalid index behind: build it again.
            quote = context.dialect.identifier_preparer.quote
            name = f"{quote(schema)}.{INDEX}" if schema else INDEX
            invalid = op.get_bind().scalar(
                sa.text(
                    "SELECT NOT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:name)"
                ),
                {"name": name},
            )
            if invalid:
                op.drop_index(
                    INDEX, table_name="sessions", schema=schema, postgresql_concurrently=True
                )
        op.create_index(
            INDEX,
            "sessions",
            ["expires_at"],
            schema=schema,
            postgresql_where=where,
            postgresql_concurrently=True,
        )


def downgrade() -> None:
    context = op.get_context()
    schema = context.version_table_schema
    if context.dialect.name == "postgresql":
        with context.autocommit_block():
            op.drop_index(INDEX, table_name="sessions", schema=schema, postgresql_concurrently=True)
    else:
        op.drop_index(INDEX, table_name="sessions", schema=schema)
    op.drop_column("sessions", "expires_at", schema=schema)
