"""Raw-driver baselines: the operations of sessions_sql written directly on the driver.

Each class runs the SQL of :mod:`bench._sql` (the backend's own statements) in the way the
backend runs it, with nothing else around it:

* :class:`RawPostgres`: an asyncpg pool; every operation is a single statement in autocommit
  (no explicit transaction), through asyncpg's per-connection prepared-statement cache. The
  pool's reset-on-release query is disabled (``reset=``), because SQLAlchemy sends nothing on
  check-in either; asyncpg's default would add a round trip to every operation. The same
  class runs on psycopg 3 (:meth:`RawPostgres.psycopg`): a LIFO list of psycopg connections
  in autocommit, with psycopg's default ``prepare_threshold`` (as SQLAlchemy leaves it), one
  ``execute`` per operation.
* :class:`RawSQLite`: a pool of aiosqlite connections (one per task slot) in autocommit
  (``isolation_level=None``) and WAL mode; single statements run alone, multi-statement writes
  between ``BEGIN IMMEDIATE`` and ``COMMIT``. Each statement is one hop to the connection's
  thread (``execute_fetchall``, or ``executemany`` for the batch writes).

* :class:`RawMariaDB`: a LIFO free list of asyncmy connections in autocommit, as a
  ``from_url`` backend keeps them; single statements run alone, writes of several statements
  between ``START TRANSACTION`` and ``COMMIT`` (a list of rows: ``executemany``, one row:
  ``execute``, as the backend sends them).

All return what the backend returns (``int`` timestamps, ``dict`` of values), so that the
conversion work is the same on both sides.
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import datetime, timezone
from typing import Any, Protocol

import aiosqlite
import asyncmy
import asyncpg  # type: ignore[import-untyped]
import psycopg

from sessions_sql import SessionSnapshot

from ._sql import MYSQL, PG, POSITIONS, PSYCOPG, SQLITE, PostgresSQL

__all__ = ["RawMariaDB", "RawPostgres", "RawSQLite", "Store", "open_asyncmy"]


class Store(Protocol):
    """The operations under test; both the backend and the baselines have them."""

    async def get_session_age(self, session_id: str) -> int | None: ...
    async def remove_session(self, session_id: str) -> None: ...
    async def read_value(self, session_id: str, key: str) -> bytes | None: ...
    async def write_value(self, session_id: str, key: str, value: bytes) -> None: ...
    async def remove_value(self, session_id: str, key: str) -> None: ...
    async def read_values(self, session_id: str) -> dict[str, bytes]: ...
    async def write_values(self, session_id: str, values: Mapping[str, bytes]) -> None: ...
    async def remove_values(self, session_id: str, keys: Iterable[str]) -> None: ...
    async def read_session(self, session_id: str) -> SessionSnapshot | None: ...
    async def set_session_expiry(self, session_id: str, expires_at: int | None) -> None: ...
    async def update_session(
        self,
        session_id: str,
        values: Mapping[str, bytes],
        *,
        remove: Iterable[str],
        expires_at: int | None,
    ) -> None: ...


def _moment(seconds: int | None) -> datetime | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, timezone.utc)


def _seconds(moment: datetime | None) -> int | None:
    return None if moment is None else calendar.timegm(moment.utctimetuple())


def _snapshot(rows: list[Any], created: Any, expires: Any) -> SessionSnapshot | None:
    if not rows:
        return None
    values = {row[2]: row[3] for row in rows if row[2] is not None}
    return SessionSnapshot(created(rows[0][0]), expires(rows[0][1]), values)


async def _no_reset(connection: asyncpg.Connection) -> None:
    """Pool reset hook that sends nothing (asyncpg still rolls back an open transaction)."""


class _PsycopgConnections:
    """psycopg connections in autocommit behind asyncpg's ``fetch``/``fetchval``/``execute``
    calls, handed out most recently used first (as SQLAlchemy's LIFO pool would)."""

    def __init__(self, connections: list[psycopg.AsyncConnection[Any]]) -> None:
        self._connections = connections
        self._free: asyncio.LifoQueue[psycopg.AsyncConnection[Any]] = asyncio.LifoQueue()
        for conn in connections:
            self._free.put_nowait(conn)

    @classmethod
    async def connect(cls, dsn: str, size: int) -> _PsycopgConnections:
        return cls(
            [await psycopg.AsyncConnection.connect(dsn, autocommit=True) for _ in range(size)]
        )

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        conn = await self._free.get()
        try:
            cursor = await conn.execute(sql, [args[i] for i in POSITIONS[sql]])
            return await cursor.fetchall() if cursor.description is not None else []
        finally:
            self._free.put_nowait(conn)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        rows = await self.fetch(sql, *args)
        return rows[0][0] if rows else None

    async def execute(self, sql: str, *args: Any) -> None:
        await self.fetch(sql, *args)

    async def close(self) -> None:
        for conn in self._connections:
            await conn.close()


class RawPostgres:
    """The operations on a bare asyncpg pool, on one dedicated asyncpg connection (the limit
    for a serial caller: no pool at all), or on psycopg connections."""

    def __init__(
        self, open: Callable[[], Awaitable[Any]], pool: Any, sql: PostgresSQL = PG
    ) -> None:
        self._open = open
        self._pool = pool  # fetch/fetchval/execute(sql, *args) and close()
        self._sql = sql

    @classmethod
    async def connect(cls, dsn: str, size: int) -> RawPostgres:
        async def open() -> Any:
            return await asyncpg.create_pool(dsn, min_size=size, max_size=size, reset=_no_reset)

        return cls(open, await open())

    @classmethod
    async def dedicated(cls, dsn: str) -> RawPostgres:
        async def open() -> Any:
            return await asyncpg.connect(dsn)

        return cls(open, await open())

    @classmethod
    async def psycopg(cls, dsn: str, size: int) -> RawPostgres:
        async def open() -> Any:
            return await _PsycopgConnections.connect(dsn, size)

        return cls(open, await open(), PSYCOPG)

    async def close(self) -> None:
        await self._pool.close()

    async def expire(self) -> None:
        """Replace every connection (after a server restart)."""
        with contextlib.suppress(Exception):  # they are probably gone already
            await asyncio.wait_for(self._pool.close(), 5)
        self._pool = await self._open()

    async def get_session_age(self, session_id: str) -> int | None:
        created_at: datetime | None = await self._pool.fetchval(
            self._sql.get_session_age, session_id
        )
        return None if created_at is None else calendar.timegm(created_at.utctimetuple())

    async def remove_session(self, session_id: str) -> None:
        await self._pool.execute(self._sql.remove_session, session_id)

    async def read_value(self, session_id: str, key: str) -> bytes | None:
        value: bytes | None = await self._pool.fetchval(self._sql.read_value, session_id, key)
        return value

    async def write_value(self, session_id: str, key: str, value: bytes) -> None:
        await self._pool.execute(self._sql.write_value, session_id, None, False, key, value)

    async def remove_value(self, session_id: str, key: str) -> None:
        await self._pool.execute(self._sql.remove_value, session_id, key)

    async def read_values(self, session_id: str) -> dict[str, bytes]:
        rows = await self._pool.fetch(self._sql.read_values, session_id)
        return {row[0]: row[1] for row in rows}

    async def write_values(self, session_id: str, values: Mapping[str, bytes]) -> None:
        await self._pool.execute(
            self._sql.update_session,
            session_id,
            None,
            list(values),
            False,
            [],
            list(values.values()),
        )

    async def remove_values(self, session_id: str, keys: Iterable[str]) -> None:
        await self._pool.execute(self._sql.remove_values, session_id, list(keys))

    async def read_session(self, session_id: str) -> SessionSnapshot | None:
        rows = await self._pool.fetch(self._sql.read_session, session_id)
        return _snapshot(rows, _seconds, _seconds)

    async def set_session_expiry(self, session_id: str, expires_at: int | None) -> None:
        await self._pool.execute(self._sql.set_session_expiry, _moment(expires_at), session_id)

    async def update_session(
        self,
        session_id: str,
        values: Mapping[str, bytes],
        *,
        remove: Iterable[str],
        expires_at: int | None,
    ) -> None:
        await self._pool.execute(
            self._sql.update_session,
            session_id,
            _moment(expires_at),
            list(values),
            True,
            list(remove),
            list(values.values()),
        )


async def open_sqlite(path: str, timeout: float) -> aiosqlite.Connection:
    """An autocommit aiosqlite connection in WAL mode (as ``SQLAlchemyBackend.from_url``)."""
    conn = await aiosqlite.connect(path, isolation_level=None, timeout=timeout)
    await conn.execute_fetchall("PRAGMA journal_mode=WAL")
    return conn


def _sqlite_timestamp(text: str) -> int:
    # SQLite's CURRENT_TIMESTAMP text is UTC.
    return calendar.timegm(datetime.fromisoformat(text).replace(tzinfo=timezone.utc).utctimetuple())


def _sqlite_optional(text: str | None) -> int | None:
    return None if text is None else _sqlite_timestamp(text)


def _sqlite_time(seconds: int | None) -> str | None:
    # Times are stored as CURRENT_TIMESTAMP writes them (UTC text).
    moment = _moment(seconds)
    return None if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S")


class RawSQLite:
    """The operations on a pool of aiosqlite connections managed here (a LIFO free list)."""

    def __init__(self, connections: list[aiosqlite.Connection]) -> None:
        self._connections = connections
        self._free: asyncio.LifoQueue[aiosqlite.Connection] = asyncio.LifoQueue()
        for conn in connections:
            self._free.put_nowait(conn)

    @classmethod
    async def connect(cls, path: str, size: int, timeout: float) -> RawSQLite:
        return cls([await open_sqlite(path, timeout) for _ in range(size)])

    async def close(self) -> None:
        for conn in self._connections:
            await conn.close()

    async def _fetch(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        conn = await self._free.get()
        try:
            return list(await conn.execute_fetchall(sql, params))
        finally:
            self._free.put_nowait(conn)

    async def get_session_age(self, session_id: str) -> int | None:
        rows = await self._fetch(SQLITE.get_session_age, (session_id,))
        return _sqlite_timestamp(rows[0][0]) if rows else None

    async def read_value(self, session_id: str, key: str) -> bytes | None:
        rows = await self._fetch(SQLITE.read_value, (session_id, key))
        return rows[0][0] if rows else None

    async def read_values(self, session_id: str) -> dict[str, bytes]:
        rows = await self._fetch(SQLITE.read_values, (session_id,))
        return {row[0]: row[1] for row in rows}

    async def remove_value(self, session_id: str, key: str) -> None:
        await self._fetch(SQLITE.remove_value, (session_id, key))

    async def _transaction(self, *steps: tuple[str, Any]) -> None:
        """Run ``(sql, parameters)`` steps between BEGIN IMMEDIATE and COMMIT, one trip to
        the connection's thread each; a list of parameter tuples runs with executemany."""
        conn = await self._free.get()
        try:
            await conn.execute_fetchall(SQLITE.begin)
            try:
                for sql, parameters in steps:
                    if isinstance(parameters, list):
                        await conn.executemany(sql, parameters)
                    else:
                        await conn.execute_fetchall(sql, parameters)
                await conn.execute_fetchall("COMMIT")
            except BaseException:
                await conn.execute_fetchall("ROLLBACK")
                raise
        finally:
            self._free.put_nowait(conn)

    async def remove_session(self, session_id: str) -> None:
        await self._transaction(
            (SQLITE.remove_session_values, (session_id,)),
            (SQLITE.remove_session, (session_id,)),
        )

    async def write_value(self, session_id: str, key: str, value: bytes) -> None:
        await self._transaction(
            (SQLITE.new_session, (session_id, None, True, False)),
            (SQLITE.upsert_value, (session_id, key, value)),
        )

    async def write_values(self, session_id: str, values: Mapping[str, bytes]) -> None:
        await self.update_session(session_id, values, remove=(), expires_at=None, set_expiry=False)

    async def read_session(self, session_id: str) -> SessionSnapshot | None:
        rows = await self._fetch(SQLITE.read_session, (session_id,))
        return _snapshot(rows, _sqlite_timestamp, _sqlite_optional)

    async def set_session_expiry(self, session_id: str, expires_at: int | None) -> None:
        await self._fetch(SQLITE.set_session_expiry, (_sqlite_time(expires_at), session_id))

    async def update_session(
        self,
        session_id: str,
        values: Mapping[str, bytes],
        *,
        remove: Iterable[str],
        expires_at: int | None,
        set_expiry: bool = True,
    ) -> None:
        """The backend's update_session script: the session row (created, or its expiry
        set), then the removed keys and the written values, executemany each."""
        create, expiry = bool(values), _sqlite_time(expires_at)
        removed = [(session_id, key) for key in remove]
        written = [(session_id, key, value) for key, value in values.items()]
        steps: list[tuple[str, Any]] = [
            (SQLITE.new_session, (session_id, expiry, create, set_expiry)),
            (SQLITE.touch_session, (expiry, session_id, set_expiry, create)),
        ]
        if removed:
            steps.append((SQLITE.remove_value, removed))
        if written:
            steps.append((SQLITE.upsert_value, written))
        await self._transaction(*steps)

    async def remove_values(self, session_id: str, keys: Iterable[str]) -> None:
        rows = [(session_id, key) for key in dict.fromkeys(keys)]
        await self._transaction((SQLITE.remove_value, rows))


async def open_asyncmy(url: str) -> Any:
    """An asyncmy connection in autocommit to a ``mysql+asyncmy://`` URL's database."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    return await asyncmy.connect(
        user=parsed.username or "root",
        password=parsed.password or "",
        host=parsed.host or "localhost",
        port=parsed.port or 3306,
        db=parsed.database,
        unix_socket=parsed.query.get("unix_socket"),
        autocommit=True,
    )


def _naive_utc(seconds: int | None) -> datetime | None:
    moment = _moment(seconds)
    return None if moment is None else moment.replace(tzinfo=None)


def _mysql_seconds(moment: datetime | None) -> int | None:
    # DATETIME(6) in UTC, naive.
    return None if moment is None else calendar.timegm(moment.utctimetuple())


class RawMariaDB:
    """The operations on a LIFO free list of asyncmy connections managed here."""

    def __init__(self, connections: list[Any]) -> None:
        self._connections = connections
        self._free: asyncio.LifoQueue[Any] = asyncio.LifoQueue()
        for conn in connections:
            self._free.put_nowait(conn)

    @classmethod
    async def connect(cls, url: str, size: int) -> RawMariaDB:
        return cls([await open_asyncmy(url) for _ in range(size)])

    async def close(self) -> None:
        for conn in self._connections:
            await conn.ensure_closed()

    async def _fetch(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        conn = await self._free.get()
        try:
            async with conn.cursor() as cursor:
                await cursor.execute(sql, params)
                return list(await cursor.fetchall())
        finally:
            self._free.put_nowait(conn)

    async def _transaction(self, *steps: tuple[str, Any]) -> None:
        """Run ``(sql, parameters)`` steps between START TRANSACTION and COMMIT; a list of
        parameter tuples runs with executemany (one tuple: execute)."""
        conn = await self._free.get()
        try:
            async with conn.cursor() as cursor:
                await cursor.execute(MYSQL.begin)
                try:
                    for sql, parameters in steps:
                        if isinstance(parameters, list):
                            if len(parameters) == 1:
                                await cursor.execute(sql, parameters[0])
                            elif parameters:
                                await cursor.executemany(sql, parameters)
                        else:
                            await cursor.execute(sql, parameters)
                    await cursor.execute("COMMIT")
                except BaseException:
                    await cursor.execute("ROLLBACK")
                    raise
        finally:
            self._free.put_nowait(conn)

    async def get_session_age(self, session_id: str) -> int | None:
        rows = await self._fetch(MYSQL.get_session_age, (session_id,))
        return _mysql_seconds(rows[0][0]) if rows else None

    async def remove_session(self, session_id: str) -> None:
        await self._fetch(MYSQL.remove_session, (session_id,))

    async def read_value(self, session_id: str, key: str) -> bytes | None:
        rows = await self._fetch(MYSQL.read_value, (session_id, key))
        return rows[0][0] if rows else None

    async def read_values(self, session_id: str) -> dict[str, bytes]:
        rows = await self._fetch(MYSQL.read_values, (session_id,))
        return {row[0]: row[1] for row in rows}

    async def remove_value(self, session_id: str, key: str) -> None:
        await self._fetch(MYSQL.remove_value, (session_id, key))

    async def write_value(self, session_id: str, key: str, value: bytes) -> None:
        await self._transaction(
            (MYSQL.session_row, (session_id, None, False)),
            (MYSQL.upsert_value, (session_id, key, value)),
        )

    async def write_values(self, session_id: str, values: Mapping[str, bytes]) -> None:
        await self.update_session(session_id, values, remove=(), expires_at=None, set_expiry=False)

    async def remove_values(self, session_id: str, keys: Iterable[str]) -> None:
        await self.update_session(session_id, {}, remove=keys, expires_at=None, set_expiry=False)

    async def read_session(self, session_id: str) -> SessionSnapshot | None:
        rows = await self._fetch(MYSQL.read_session, (session_id,))
        return _snapshot(rows, _mysql_seconds, _mysql_seconds)

    async def set_session_expiry(self, session_id: str, expires_at: int | None) -> None:
        await self._fetch(MYSQL.set_session_expiry, (_naive_utc(expires_at), session_id))

    async def update_session(
        self,
        session_id: str,
        values: Mapping[str, bytes],
        *,
        remove: Iterable[str],
        expires_at: int | None,
        set_expiry: bool = True,
    ) -> None:
        """The backend's update_session script: the session row created or locked (its
        expiry set), then the removed keys and the written values."""
        expiry = _naive_utc(expires_at)
        steps: list[tuple[str, Any]] = [
            (MYSQL.session_row, (session_id, expiry, set_expiry))
            if values
            else (MYSQL.lock_session, (set_expiry, expiry, session_id)),
            (MYSQL.remove_value, [(session_id, key) for key in dict.fromkeys(remove)]),
            (MYSQL.upsert_value, [(session_id, k, v) for k, v in values.items()]),
        ]
        await self._transaction(*steps)
