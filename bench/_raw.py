"""Raw-driver baselines: the operations of sessions_sql written directly on the driver.

Each class runs the SQL of :mod:`bench._sql` (the backend's own statements) in the way the
backend runs it, with nothing else around it:

* :class:`RawPostgres`: an asyncpg pool; every operation is a single statement in autocommit
  (no explicit transaction), through asyncpg's per-connection prepared-statement cache. The
  pool's reset-on-release query is disabled (``reset=``), because SQLAlchemy sends nothing on
  check-in either; asyncpg's default would add a round trip to every operation.
* :class:`RawSQLite`: a pool of aiosqlite connections (one per task slot) in autocommit
  (``isolation_level=None``) and WAL mode; single statements run alone, multi-statement writes
  between ``BEGIN IMMEDIATE`` and ``COMMIT``. Each statement is one hop to the connection's
  thread (``execute_fetchall``, or ``executemany`` for the batch writes).

Both return what the backend returns (``int`` timestamps, ``dict`` of values), so that the
conversion work is the same on both sides.
"""

from __future__ import annotations

import asyncio
import calendar
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any, Protocol

import aiosqlite
import asyncpg  # type: ignore[import-untyped]

from ._sql import PG, SQLITE

__all__ = ["RawPostgres", "RawSQLite", "Store"]


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


async def _no_reset(connection: asyncpg.Connection) -> None:
    """Pool reset hook that sends nothing (asyncpg still rolls back an open transaction)."""


class RawPostgres:
    """The operations on a bare asyncpg pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @classmethod
    async def connect(cls, dsn: str, size: int) -> RawPostgres:
        pool = await asyncpg.create_pool(dsn, min_size=size, max_size=size, reset=_no_reset)
        return cls(pool)

    async def close(self) -> None:
        await self._pool.close()

    async def expire(self) -> None:
        """Replace every pooled connection on its next use (after a server restart)."""
        await self._pool.expire_connections()

    async def get_session_age(self, session_id: str) -> int | None:
        created_at: datetime | None = await self._pool.fetchval(PG.get_session_age, session_id)
        return None if created_at is None else calendar.timegm(created_at.utctimetuple())

    async def remove_session(self, session_id: str) -> None:
        await self._pool.execute(PG.remove_session, session_id)

    async def read_value(self, session_id: str, key: str) -> bytes | None:
        value: bytes | None = await self._pool.fetchval(PG.read_value, session_id, key)
        return value

    async def write_value(self, session_id: str, key: str, value: bytes) -> None:
        await self._pool.execute(PG.write_value, session_id, key, value)

    async def remove_value(self, session_id: str, key: str) -> None:
        await self._pool.execute(PG.remove_value, session_id, key)

    async def read_values(self, session_id: str) -> dict[str, bytes]:
        rows = await self._pool.fetch(PG.read_values, session_id)
        return {row[0]: row[1] for row in rows}

    async def write_values(self, session_id: str, values: Mapping[str, bytes]) -> None:
        await self._pool.execute(PG.write_values, session_id, list(values), list(values.values()))

    async def remove_values(self, session_id: str, keys: Iterable[str]) -> None:
        await self._pool.execute(PG.remove_values, session_id, list(keys))


async def open_sqlite(path: str, timeout: float) -> aiosqlite.Connection:
    """An autocommit aiosqlite connection in WAL mode (as ``SQLAlchemyBackend.from_url``)."""
    conn = await aiosqlite.connect(path, isolation_level=None, timeout=timeout)
    await conn.execute_fetchall("PRAGMA journal_mode=WAL")
    return conn


def _sqlite_timestamp(text: str) -> int:
    # SQLite's CURRENT_TIMESTAMP text is UTC.
    return calendar.timegm(datetime.fromisoformat(text).replace(tzinfo=timezone.utc).utctimetuple())


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
            (SQLITE.new_session, (session_id,)),
            (SQLITE.upsert_value, (session_id, key, value)),
        )

    async def write_values(self, session_id: str, values: Mapping[str, bytes]) -> None:
        rows = [(session_id, key, value) for key, value in values.items()]
        await self._transaction((SQLITE.new_session, (session_id,)), (SQLITE.upsert_value, rows))

    async def remove_values(self, session_id: str, keys: Iterable[str]) -> None:
        rows = [(session_id, key) for key in dict.fromkeys(keys)]
        await self._transaction((SQLITE.remove_value, rows))
