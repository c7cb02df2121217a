"""The SQL each database runs for each operation: the one place where PostgreSQL and SQLite differ.

Every statement is built once, at import, as a Core construct (so SQLAlchemy caches its
compiled form and ``schema_translate_map`` applies). An operation is a *script*: a tuple of
statements. A one-statement script runs on its own, in autocommit (one round trip); a longer
one runs inside an explicit write transaction opened with :attr:`Dialect.begin`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, TypeVar

from sqlalchemy import (
    DateTime,
    Integer,
    LargeBinary,
    String,
    any_,
    bindparam,
    delete,
    false,
    func,
    literal_column,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.sql.expression import ColumnElement, Executable, Selectable
from sqlalchemy.util import await_only

from .models import sessions_table as S
from .models import values_table as V

__all__ = ["Dialect", "Params", "Script", "dialect_for", "lock_migrations"]

_T = TypeVar("_T")

Script = tuple[Executable, ...]
Params = dict[str, Any] | list[dict[str, Any]]

_sid = bindparam("sid", type_=String)
_key = bindparam("key", type_=String)
_value = bindparam("value", type_=LargeBinary)
_limit = bindparam("limit", type_=Integer)
_after = bindparam("after", type_=String)


@dataclass(frozen=True)
class Dialect:
    """The statements of one database. Scripts of several statements need :attr:`begin`."""

    name: str
    #: SQL opening a write transaction for a script of several statements.
    begin: str
    #: The database allows one writer at a time (SQLite): this process's writes then queue
    #: on a lock instead of polling the busy handler, whose sleeps stall concurrent writers.
    single_writer: bool
    get_sessions: Script
    page_sessions: Script
    get_session_age: Script
    remove_session: Script
    read_value: Script
    read_values: Script
    write_value: Script
    write_values: Script
    remove_value: Script
    remove_values: Script
    remove_created_before: Script
    #: Builds the parameters of ``write_values`` from an id and a mapping of keys to bytes.
    write_values_params: Callable[[str, Mapping[str, bytes]], Params]
    #: Builds the parameters of ``remove_values`` from an id and a list of keys.
    remove_values_params: Callable[[str, list[str]], Params]
    #: ``created_at < :cutoff``, for queries by creation time (bind with :attr:`cutoff_param`).
    created_before: ColumnElement[bool]
    #: Converts a whole-second UTC cutoff to the bind value compared with ``created_at``.
    cutoff_param: Callable[[datetime], Any]
    #: Run first in a migration's transaction: makes concurrent migrators (several workers
    #: of one application starting at once) wait for each other.
    lock_migrations: Callable[[Connection], object]
    #: ``connect`` event of engines the backend creates itself (``from_url``), if any.
    on_connect: Callable[[Any, Any], None] | None

    def scripts(self) -> list[Script]:
        """Every script of this database."""
        return [value for value in vars(self).values() if isinstance(value, tuple)]


# Statements that are the same SQL on both databases.
_get_sessions = select(S.c.id)
_page_sessions = select(S.c.id).where(S.c.id > _after).order_by(S.c.id).limit(_limit)
_get_session_age = select(S.c.created_at).where(S.c.id == _sid)
_read_value = select(V.c.value).where(V.c.session_id == _sid, V.c.key == _key)
_read_values = select(V.c.key, V.c.value).where(V.c.session_id == _sid)
_remove_value = delete(V).where(V.c.session_id == _sid, V.c.key == _key)
_delete_session = delete(S).where(S.c.id == _sid)


# Serialises concurrent migrators on PostgreSQL (an arbitrary constant: "sessions_sql" in hex).
_MIGRATION_LOCK_KEY = 0x73657373696F6E73


def _postgresql_lock_migrations(connection: Connection) -> object:
    return connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK_KEY})")


def _postgresql() -> Dialect:
    insert = postgresql.insert
    # Create the session, or lock it if it exists: the no-op DO UPDATE (WHERE false) locks the
    # row without writing it. Taking the session's lock before any value row's lock gives
    # writers and remove_session (session row, then cascade to values) one lock order, so
    # they queue instead of deadlocking; a removal that commits first is waited for and the
    # write then creates a new session.
    new_session = (
        insert(S)
        .values(id=_sid)
        .on_conflict_do_update(
            index_elements=[S.c.id], set_={"created_at": S.c.created_at}, where=false()
        )
        .returning(S.c.id)
        .cte("new_session")
    )
    # Referencing the CTE in an InitPlan makes it run before the value upsert (an unreferenced
    # data-modifying CTE would run after the main statement).
    created_or_locked = select(func.count()).select_from(new_session).scalar_subquery()
    session_ready = created_or_locked >= literal_column("0")

    def upsert_values(rows: Selectable) -> Executable:
        statement = insert(V).from_select(["session_id", "key", "value"], rows)
        return statement.on_conflict_do_update(
            index_elements=[V.c.session_id, V.c.key], set_={"value": statement.excluded.value}
        ).add_cte(new_session)

    write_value = upsert_values(select(_sid, _key, _value).where(session_ready))
    pairs = (
        func.unnest(
            bindparam("keys", type_=postgresql.ARRAY(String)),
            bindparam("values", type_=postgresql.ARRAY(LargeBinary)),
        )
        .table_valued("key", "value")
        .render_derived(name="pairs")
    )
    write_values = upsert_values(select(_sid, pairs.c.key, pairs.c.value).where(session_ready))

    remove_values = delete(V).where(
        V.c.session_id == _sid,
        V.c.key == any_(bindparam("keys", type_=postgresql.ARRAY(String))),
    )

    created_before = S.c.created_at < bindparam("cutoff", type_=DateTime(timezone=True))
    # One bounded batch; rows locked by writers are skipped, never waited for.
    doomed = (
        select(S.c.id)
        .where(created_before)
        .order_by(S.c.created_at)
        .limit(_limit)
        .with_for_update(skip_locked=True)
    )
    # "= ANY(ARRAY(subquery))", not "IN (subquery)": the planner turns IN into a join that
    # scans the whole table per batch, while the array is computed once (an InitPlan) and
    # probed through the primary key.
    remove_created_before = delete(S).where(S.c.id == any_(func.array(doomed.scalar_subquery())))

    return Dialect(
        name="postgresql",
        begin="BEGIN",
        single_writer=False,
        get_sessions=(_get_sessions,),
        page_sessions=(_page_sessions,),
        get_session_age=(_get_session_age,),
        remove_session=(_delete_session,),  # values go by ON DELETE CASCADE
        read_value=(_read_value,),
        read_values=(_read_values,),
        write_value=(write_value,),
        write_values=(write_values,),
        remove_value=(_remove_value,),
        remove_values=(remove_values,),
        remove_created_before=(remove_created_before,),
        write_values_params=lambda sid, mapping: {
            "sid": sid,
            "keys": list(mapping),
            "values": list(mapping.values()),
        },
        remove_values_params=lambda sid, keys: {"sid": sid, "keys": keys},
        created_before=created_before,
        cutoff_param=lambda cutoff: cutoff,
        lock_migrations=_postgresql_lock_migrations,
        on_connect=None,
    )


def _sqlite_cutoff(cutoff: datetime) -> str:
    # SQLite stores CURRENT_TIMESTAMP as text ("YYYY-MM-DD HH:MM:SS", UTC); text in the same
    # format compares in time order. The cutoff is already a whole second.
    return cutoff.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _sqlite_lock_migrations(connection: Connection) -> object:
    # The whole migration in one write transaction, taken up front: a second migrator waits
    # in the busy handler until the first commits, then finds the schema up to date. (A
    # deferred transaction would read the version table first and then fail at once on the
    # write lock; DDL outside a transaction would race table creation.) A connection whose
    # owner already began a transaction on it keeps that one.
    if connection.connection.driver_connection.in_transaction:  # type: ignore[union-attr]
        return None
    return connection.exec_driver_sql("BEGIN IMMEDIATE")


_SQLITE_BUSY = 5  # SQLite's primary result code for a locked database file


def _is_busy(error: Exception) -> bool:
    code = getattr(error, "sqlite_errorcode", None)  # Python >= 3.11
    if code is not None:
        return bool(code & 0xFF == _SQLITE_BUSY)
    return "database is locked" in str(error)


def _sqlite_use_wal(dbapi_connection: Any, connection_record: Any) -> None:
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


def _sqlite() -> Dialect:
    # SQLite has no INSERT inside a CTE and may run with foreign keys off (a per-connection
    # setting the host controls), so creation, upsert and cascades are explicit statements
    # in one IMMEDIATE transaction, which takes the write lock up front.
    insert = sqlite.insert
    new_session = insert(S).values(id=_sid).on_conflict_do_nothing()
    upsert = insert(V).values(session_id=_sid, key=_key, value=_value)
    upsert = upsert.on_conflict_do_update(
        index_elements=[V.c.session_id, V.c.key], set_={"value": upsert.excluded.value}
    )
    remove_values = delete(V).where(V.c.session_id == _sid, V.c.key == _key)

    created_before = S.c.created_at < bindparam("cutoff", type_=String)
    doomed = (
        select(S.c.id)
        .where(created_before)
        .order_by(S.c.created_at)
        .limit(_limit)
        .scalar_subquery()
    )
    return Dialect(
        name="sqlite",
        begin="BEGIN IMMEDIATE",
        single_writer=True,
        get_sessions=(_get_sessions,),
        page_sessions=(_page_sessions,),
        get_session_age=(_get_session_age,),
        remove_session=(delete(V).where(V.c.session_id == _sid), _delete_session),
        read_value=(_read_value,),
        read_values=(_read_values,),
        write_value=(new_session, upsert),
        write_values=(new_session, upsert),  # executemany over the rows
        remove_value=(_remove_value,),
        remove_values=(remove_values,),  # executemany over the keys
        remove_created_before=(
            delete(V).where(V.c.session_id.in_(doomed)),
            delete(S).where(S.c.id.in_(doomed)),
        ),
        write_values_params=lambda sid, mapping: [
            {"sid": sid, "key": k, "value": v} for k, v in mapping.items()
        ],
        remove_values_params=lambda sid, keys: [{"sid": sid, "key": k} for k in keys],
        created_before=created_before,
        cutoff_param=_sqlite_cutoff,
        lock_migrations=_sqlite_lock_migrations,
        on_connect=_sqlite_use_wal,
    )


_DIALECTS = {"postgresql": _postgresql(), "sqlite": _sqlite()}


def supported(table: Mapping[str, _T], name: str, what: str) -> _T:
    """Return ``table[name]``, or raise ``ValueError`` naming the unsupported ``what``."""
    try:
        return table[name]
    except KeyError:
        names = ", ".join(sorted(table))
        raise ValueError(f"unsupported {what} {name!r}; supported: {names}") from None


def lock_migrations(connection: Connection) -> None:
    """Take the migration lock of ``connection``'s database (:attr:`Dialect.lock_migrations`);
    on a database this package has no statements for, none."""
    dialect = _DIALECTS.get(connection.dialect.name)
    if dialect is not None:
        dialect.lock_migrations(connection)


def dialect_for(name: str) -> Dialect:
    """Return the statements for a SQLAlchemy dialect name, or raise ``ValueError``."""
    return supported(_DIALECTS, name, "database")
