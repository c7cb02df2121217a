"""SQLite: one writer at a time, so each write is explicit statements in one IMMEDIATE
transaction; files are switched to WAL when the backend opens them."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Boolean, bindparam, delete, select, update
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.sql.expression import ColumnElement
from sqlalchemy.util import await_only

from ..models import sessions_table as S
from ..models import values_table as V
from .common import (
    CREATED_BEFORE,
    DELETE_SESSION,
    EXPIRED,
    EXPIRES_AT,
    KEY,
    REMOVE_VALUE,
    SET_EXPIRY,
    SID,
    VALUE,
    Dialect,
    Many,
    Params,
    Script,
    batch,
    key_rows,
    value_rows,
)


def _time(moment: datetime) -> str:
    # The format of CURRENT_TIMESTAMP; the moment is already a whole second.
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


@contextlib.contextmanager
def _migration_lock(connection: Connection) -> Iterator[None]:
    # The whole upgrade in one write transaction, taken up front (SQLite's DDL is
    # transactional): a second migrator waits in the busy handler until the first commits,
    # then finds the schema up to date. (A deferred transaction would read the version table
    # first and then fail at once on the write lock; DDL outside a transaction would race
    # table creation.) A connection whose owner already began a transaction keeps that one.
    if not connection.connection.driver_connection.in_transaction:  # type: ignore[union-attr]
        connection.exec_driver_sql("BEGIN IMMEDIATE")
    yield


_SQLITE_BUSY = 5  # SQLite's primary result code for a locked database file


def _is_busy(error: Exception) -> bool:
    code = getattr(error, "sqlite_errorcode", None)  # Python >= 3.11
    if code is not None:
        return bool(code & 0xFF == _SQLITE_BUSY)
    return "database is locked" in str(error)


def _use_wal(dbapi_connection: Any, connection_record: Any) -> None:
    """Switch a SQLite file to WAL mode (readers then never wait for the writer).

    A file already in WAL is left as it is: asking needs only a shared lock, which waits in
    the busy handler. Switching needs an exclusive lock, and SQLite refuses that at once,
    without calling its busy handler, while another process holds the write lock (waiting
    could deadlock); so the switch is retried until the connection's busy timeout (the
    driver's ``timeout``, set when the file is opened) has passed.
    """
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA busy_timeout")
        (timeout_ms,) = cursor.fetchone()
        deadline = time.monotonic() + timeout_ms / 1000
        delay = 0.001
        while True:
            cursor.execute("PRAGMA journal_mode")
            (mode,) = cursor.fetchone()
            if mode.lower() in ("wal", "memory"):  # memory: an in-memory database
                return
            try:
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.fetchall()
                return
            except Exception as error:
                if not _is_busy(error) or time.monotonic() >= deadline:
                    raise
            # Connect events of an async engine run in a greenlet: wait without blocking.
            await_only(asyncio.sleep(delay))
            delay = min(2 * delay, 0.05)
    finally:
        cursor.close()


def _dialect() -> Dialect:
    # SQLite has no INSERT inside a CTE and may run with foreign keys off (a per-connection
    # setting the host controls), so creation, upsert and cascades are explicit statements
    # in one IMMEDIATE transaction, which takes the write lock up front.
    insert = sqlite.insert
    creating = bindparam("create", type_=Boolean)
    # SQLite's upsert needs a WHERE on its SELECT (else "ON" would be ambiguous).
    new_session = insert(S).from_select(
        ["id", "expires_at"], select(SID, EXPIRES_AT).where(creating)
    )
    new_session = new_session.on_conflict_do_update(
        index_elements=[S.c.id],
        set_={"expires_at": new_session.excluded.expires_at},
        where=SET_EXPIRY,
    )
    touch = update(S).where(S.c.id == SID, SET_EXPIRY, ~creating).values(expires_at=EXPIRES_AT)
    upsert = insert(V).values(session_id=SID, key=KEY, value=VALUE)
    upsert = upsert.on_conflict_do_update(
        index_elements=[V.c.session_id, V.c.key], set_={"value": upsert.excluded.value}
    )

    def remove_batch(condition: ColumnElement[bool], order: Any) -> Script:
        doomed = batch(condition, order).scalar_subquery()
        return (delete(V).where(V.c.session_id.in_(doomed)), delete(S).where(S.c.id.in_(doomed)))

    def update_params(
        sid: str,
        mapping: Mapping[str, bytes],
        remove_keys: list[str],
        set_expiry: bool,
        expires_at: Any,
    ) -> Params:
        return {
            "sid": sid,
            "create": bool(mapping),
            "set_expiry": set_expiry,
            "expires_at": expires_at,
            "removed": key_rows(sid, remove_keys),
            "written": value_rows(sid, mapping),
        }

    return Dialect(
        name="sqlite",
        begin="BEGIN IMMEDIATE",
        single_writer=True,
        remove_session=(delete(V).where(V.c.session_id == SID), DELETE_SESSION),
        write_value=(new_session, upsert),  # params with create=True
        update_session=(new_session, touch, Many(REMOVE_VALUE, "removed"), Many(upsert, "written")),
        remove_values=(Many(REMOVE_VALUE, "removed"),),
        remove_created_before=remove_batch(CREATED_BEFORE, S.c.created_at),
        remove_expired=remove_batch(EXPIRED, S.c.expires_at),
        update_params=update_params,
        remove_values_params=lambda sid, keys: {"removed": key_rows(sid, keys)},
        time_param=_time,
        migration_lock=_migration_lock,
        on_connect=_use_wal,
    )


SQLITE = _dialect()
