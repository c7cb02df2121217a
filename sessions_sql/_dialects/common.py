"""What every database's statements share: the :class:`Dialect` record, the bind parameters,
the statements that are the same SQL everywhere, and the polled migration lock."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Boolean,
    DateTime,
    Integer,
    LargeBinary,
    String,
    bindparam,
    delete,
    select,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.sql.expression import ColumnElement, Executable
from sqlalchemy.util import await_only
from sqlalchemy.util.concurrency import in_greenlet

from ..models import sessions_table as S
from ..models import values_table as V


@dataclass(frozen=True)
class Many:
    """A statement run once per row of the list ``params[rows]`` (none if it is empty)."""

    statement: Executable
    rows: str

    @property
    def is_dml(self) -> bool:
        """Whether the statement writes (as ``Executable.is_dml``)."""
        return bool(getattr(self.statement, "is_dml", False))


Script = tuple[Executable | Many, ...]
Params = dict[str, Any]

# Times: timestamptz on PostgreSQL; on SQLite the text CURRENT_TIMESTAMP writes (UTC,
# "YYYY-MM-DD HH:MM:SS"), which compares in time order; naive UTC on MariaDB/MySQL.
BOUND_TIME = DateTime(timezone=True).with_variant(String(), "sqlite")

SID = bindparam("sid", type_=String)
KEY = bindparam("key", type_=String)
VALUE = bindparam("value", type_=LargeBinary)
LIMIT = bindparam("limit", type_=Integer)
AFTER = bindparam("after", type_=String)
NOW = bindparam("now", type_=BOUND_TIME)
CUTOFF = bindparam("cutoff", type_=BOUND_TIME)
# The expiry a write sets (NULL clears it), and whether it sets one at all.
EXPIRES_AT = bindparam("expires_at", type_=BOUND_TIME)
SET_EXPIRY = bindparam("set_expiry", type_=Boolean)


# Statements that are the same SQL on every database (the defaults of :class:`Dialect`).
GET_SESSIONS = select(S.c.id)
PAGE_SESSIONS = select(S.c.id).where(S.c.id > AFTER).order_by(S.c.id).limit(LIMIT)
GET_SESSION_AGE = select(S.c.created_at).where(S.c.id == SID)
GET_SESSION_EXPIRY = select(S.c.expires_at).where(S.c.id == SID)
# One statement, one snapshot: the session's times and all its values (none: no rows).
READ_SESSION = (
    select(S.c.created_at, S.c.expires_at, V.c.key, V.c.value)
    .select_from(S.outerjoin(V, V.c.session_id == S.c.id))
    .where(S.c.id == SID)
)
READ_VALUE = select(V.c.value).where(V.c.session_id == SID, V.c.key == KEY)
READ_VALUES = select(V.c.key, V.c.value).where(V.c.session_id == SID)
REMOVE_VALUE = delete(V).where(V.c.session_id == SID, V.c.key == KEY)
DELETE_SESSION = delete(S).where(S.c.id == SID)
SET_SESSION_EXPIRY = update(S).where(S.c.id == SID).values(expires_at=EXPIRES_AT)
CREATED_BEFORE = S.c.created_at < CUTOFF
EXPIRED = S.c.expires_at < NOW


@dataclass(frozen=True)
class Dialect:
    """The statements of one database. Scripts of several statements need :attr:`begin`."""

    name: str
    #: SQL opening a write transaction for a script of several statements.
    begin: str
    #: The database allows one writer at a time (SQLite): this process's writes then queue
    #: on a lock instead of polling the busy handler, whose sleeps stall concurrent writers.
    single_writer: bool
    remove_session: Script
    #: Params: sid, key, value, expires_at, set_expiry.
    write_value: Script
    #: Params from :attr:`update_params`.
    update_session: Script
    #: Params from :attr:`remove_values_params`.
    remove_values: Script
    #: Params: cutoff, limit.
    remove_created_before: Script
    #: Params: now, limit.
    remove_expired: Script
    #: Parameters of ``update_session``: id, values to write, keys to remove, and the expiry
    #: (``set_expiry`` false: keep it; else ``expires_at``, bound, ``None`` clearing it).
    update_params: Callable[[str, Mapping[str, bytes], list[str], bool, Any], Params]
    #: Builds the parameters of ``remove_values`` from an id and a list of keys.
    remove_values_params: Callable[[str, list[str]], Params]
    #: Converts a whole-second aware datetime to the bind value of a time column.
    time_param: Callable[[datetime], Any]
    #: Held while migrations run on a connection: concurrent migrators (several workers of
    #: one application starting at once) wait for each other.
    migration_lock: Callable[[Connection], contextlib.AbstractContextManager[None]]
    #: ``connect`` event of engines the backend creates itself (``from_url``), if any.
    on_connect: Callable[[Any, Any], None] | None
    get_sessions: Script = (GET_SESSIONS,)
    page_sessions: Script = (PAGE_SESSIONS,)
    get_session_age: Script = (GET_SESSION_AGE,)
    get_session_expiry: Script = (GET_SESSION_EXPIRY,)
    read_session: Script = (READ_SESSION,)
    read_value: Script = (READ_VALUE,)
    read_values: Script = (READ_VALUES,)
    remove_value: Script = (REMOVE_VALUE,)
    #: Params: sid, expires_at.
    set_session_expiry: Script = (SET_SESSION_EXPIRY,)
    #: ``created_at < :cutoff``, for queries by creation time (bind with :attr:`time_param`).
    created_before: ColumnElement[bool] = CREATED_BEFORE
    #: ``expires_at < :now``, for queries of expired sessions (bind with :attr:`time_param`).
    expired: ColumnElement[bool] = EXPIRED
    #: Finds, on a connection, the variant of this dialect that the database needs, if any
    #: (PostgreSQL: Citus, when the tables are distributed); given the schema of the tables.
    variant: Callable[[Connection, str | None], Dialect | None] | None = None

    def scripts(self) -> list[Script]:
        """Every script of this database."""
        return [value for value in vars(self).values() if isinstance(value, tuple)]

    def scripts_of(self, variant: Dialect) -> dict[Script, Script]:
        """Each script of this dialect mapped to the same operation's script in ``variant``."""
        return dict(zip(self.scripts(), variant.scripts(), strict=True))


def key_rows(sid: str, keys: list[str]) -> list[Params]:
    """The rows of a :class:`Many` statement bound per key of session ``sid``."""
    return [{"sid": sid, "key": key} for key in keys]


def value_rows(sid: str, mapping: Mapping[str, bytes]) -> list[Params]:
    """The rows of a :class:`Many` statement bound per value of session ``sid``."""
    return [{"sid": sid, "key": key, "value": value} for key, value in mapping.items()]


def batch(condition: ColumnElement[bool], order: Any) -> Any:
    """The ids of one bounded batch of sessions matching ``condition``, oldest first."""
    return select(S.c.id).where(condition).order_by(order).limit(LIMIT)


_MIGRATION_LOCK_POLL = 0.05  # seconds between attempts to take a migration lock


def _pause(seconds: float) -> None:
    """Sleep without blocking the event loop when run through an async engine."""
    if in_greenlet():
        await_only(asyncio.sleep(seconds))
    else:
        time.sleep(seconds)


@contextlib.contextmanager
def polled_lock(connection: Connection, take: str, release: str) -> Iterator[None]:
    """Hold a lock of the connection's session across the migrations: ``take`` (a query
    answering whether it got the lock, without waiting) is polled, committing between
    attempts, then ``release`` runs at the end."""
    while not connection.exec_driver_sql(take).scalar():
        connection.commit()
        _pause(_MIGRATION_LOCK_POLL)
    connection.commit()
    try:
        yield
    finally:
        if connection.in_transaction():  # a failed migration's transaction
            connection.rollback()
        connection.exec_driver_sql(release)
        connection.commit()
