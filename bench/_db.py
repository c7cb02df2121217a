"""The databases under test: URLs, creation, and the untimed admin work (seeding, cleanup).

Admin work runs on a connection of its own, outside the pools being measured.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import aiosqlite
import asyncpg  # type: ignore[import-untyped]
from sqlalchemy.engine import URL, make_url

from ._raw import open_asyncmy, open_sqlite

__all__ = [
    "Admin",
    "MariaDBAdmin",
    "PairAdmin",
    "PostgresAdmin",
    "Row",
    "SQLiteAdmin",
    "asyncpg_dsn",
    "ensure_database",
    "sqlalchemy_url",
]

#: One value to seed: (session id, key, value).
Row = tuple[str, str, bytes]


def _postgres_url(url: str) -> URL:
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        raise ValueError(f"not a PostgreSQL URL: {parsed.render_as_string()}")
    return parsed


def sqlalchemy_url(url: str, driver: str = "asyncpg") -> str:
    """The URL with the asyncpg (or another) driver, for ``SQLAlchemyBackend.from_url``."""
    return _postgres_url(url).set(drivername=f"postgresql+{driver}").render_as_string(False)


def asyncpg_dsn(url: str, database: str | None = None) -> str:
    """The URL as a plain ``postgresql://`` DSN for asyncpg (optionally another database)."""
    parsed = _postgres_url(url).set(drivername="postgresql")
    if database is not None:
        parsed = parsed.set(database=database)
    return parsed.render_as_string(False)


async def ensure_database(url: str) -> bool:
    """Create the URL's database if it does not exist; return whether it was created."""
    name = _postgres_url(url).database
    if not name:
        raise ValueError("the PostgreSQL URL names no database")
    conn = await asyncpg.connect(asyncpg_dsn(url, "postgres"))
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if exists:
            return False
        quoted = '"' + name.replace('"', '""') + '"'
        await conn.execute(f"CREATE DATABASE {quoted}")
        return True
    finally:
        await conn.close()


class Admin(Protocol):
    """Untimed work on one database: seeding rows, cleaning up after a round."""

    async def truncate(self) -> None: ...
    async def put(self, rows: Sequence[Row]) -> None: ...
    async def cleanup(self, prefix: str) -> None: ...
    async def maintain(self) -> None: ...
    async def close(self) -> None: ...


@dataclass
class PostgresAdmin:
    conn: asyncpg.Connection

    @classmethod
    async def connect(cls, url: str) -> PostgresAdmin:
        return cls(await asyncpg.connect(asyncpg_dsn(url)))

    async def server_version(self) -> str:
        version: str = await self.conn.fetchval("SHOW server_version")
        return version

    async def truncate(self) -> None:
        await self.conn.execute("TRUNCATE session_values, sessions")

    async def put(self, rows: Sequence[Row]) -> None:
        if not rows:
            return
        sids = [r[0] for r in rows]
        async with self.conn.transaction():
            await self.conn.execute(
                "INSERT INTO sessions (id) SELECT DISTINCT unnest($1::varchar[]) "
                "ON CONFLICT DO NOTHING",
                sids,
            )
            await self.conn.execute(
                "INSERT INTO session_values (session_id, key, value) "
                "SELECT * FROM unnest($1::varchar[], $2::varchar[], $3::bytea[]) "
                "ON CONFLICT (session_id, key) DO UPDATE SET value = excluded.value",
                sids,
                [r[1] for r in rows],
                [r[2] for r in rows],
            )

    async def cleanup(self, prefix: str) -> None:
        pattern = prefix + "-%"
        await self.conn.execute("DELETE FROM session_values WHERE key LIKE $1", pattern)
        await self.conn.execute("DELETE FROM sessions WHERE id LIKE $1", pattern)

    async def maintain(self) -> None:
        # Autovacuum may be off on the server: keep the small tables free of dead rows.
        await self.conn.execute("VACUUM ANALYZE sessions, session_values")

    async def close(self) -> None:
        await self.conn.close()


@dataclass
class PairAdmin:
    """The same untimed work on two databases (plain PostgreSQL and a Citus cluster), so that
    both hold the same data set."""

    first: PostgresAdmin
    second: PostgresAdmin
    urls: tuple[str, str]

    @classmethod
    async def connect(cls, first: str, second: str) -> PairAdmin:
        return cls(
            await PostgresAdmin.connect(first), await PostgresAdmin.connect(second), (first, second)
        )

    async def truncate(self) -> None:
        await self.first.truncate()
        await self.second.truncate()

    async def put(self, rows: Sequence[Row]) -> None:
        await self.first.put(rows)
        await self.second.put(rows)

    async def cleanup(self, prefix: str) -> None:
        await self.first.cleanup(prefix)
        await self.second.cleanup(prefix)

    async def maintain(self) -> None:
        await self.first.maintain()
        await self.second.maintain()

    async def close(self) -> None:
        await self.first.close()
        await self.second.close()


@dataclass
class SQLiteAdmin:
    conn: aiosqlite.Connection

    @classmethod
    async def connect(cls, path: str) -> SQLiteAdmin:
        return cls(await open_sqlite(path, timeout=60.0))

    async def truncate(self) -> None:
        await self.conn.execute_fetchall("DELETE FROM session_values")
        await self.conn.execute_fetchall("DELETE FROM sessions")

    async def put(self, rows: Sequence[Row]) -> None:
        if not rows:
            return
        await self.conn.execute_fetchall("BEGIN IMMEDIATE")
        await self.conn.executemany(
            "INSERT INTO sessions (id) VALUES (?) ON CONFLICT DO NOTHING",
            [(sid,) for sid in dict.fromkeys(r[0] for r in rows)],
        )
        await self.conn.executemany(
            'INSERT INTO session_values (session_id, "key", value) VALUES (?, ?, ?) '
            'ON CONFLICT (session_id, "key") DO UPDATE SET value = excluded.value',
            rows,
        )
        await self.conn.execute_fetchall("COMMIT")

    async def cleanup(self, prefix: str) -> None:
        pattern = prefix + "-%"
        await self.conn.execute_fetchall("BEGIN IMMEDIATE")
        await self.conn.execute_fetchall(
            'DELETE FROM session_values WHERE "key" LIKE ?', (pattern,)
        )
        await self.conn.execute_fetchall(
            "DELETE FROM session_values WHERE session_id LIKE ?", (pattern,)
        )
        await self.conn.execute_fetchall("DELETE FROM sessions WHERE id LIKE ?", (pattern,))
        await self.conn.execute_fetchall("COMMIT")

    async def maintain(self) -> None:
        await self.conn.execute_fetchall("PRAGMA wal_checkpoint(TRUNCATE)")

    async def load_sessions(self, count: int) -> None:
        """Replace all data with ``count`` sessions without values (for the listing)."""
        await self.truncate()
        await self.conn.execute_fetchall("BEGIN IMMEDIATE")
        await self.conn.execute_fetchall(
            "WITH RECURSIVE seq(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM seq WHERE i < ?) "
            "INSERT INTO sessions (id) SELECT lower(hex(randomblob(16))) FROM seq",
            (count - 1,),
        )
        await self.conn.execute_fetchall("COMMIT")
        await self.maintain()

    async def close(self) -> None:
        await self.conn.close()


def mysql_url(url: str) -> str:
    """The URL with the asyncmy driver, for ``SQLAlchemyBackend.from_url``."""
    parsed = make_url(url)
    if parsed.get_backend_name() not in ("mysql", "mariadb"):
        raise ValueError(f"not a MariaDB/MySQL URL: {parsed.render_as_string()}")
    return parsed.set(drivername="mysql+asyncmy").render_as_string(False)


async def ensure_mysql_database(url: str) -> None:
    """Create the URL's database if it does not exist."""
    parsed = make_url(url)
    name = parsed.database
    if not name:
        raise ValueError("the MariaDB URL names no database")
    conn = await open_asyncmy(parsed.set(database="").render_as_string(False))
    try:
        async with conn.cursor() as cursor:
            await cursor.execute(f"CREATE DATABASE IF NOT EXISTS `{name}`")
    finally:
        conn.close()


@dataclass
class MariaDBAdmin:
    conn: Any

    @classmethod
    async def connect(cls, url: str) -> MariaDBAdmin:
        return cls(await open_asyncmy(url))

    async def _run(self, sql: str, args: Any = None, many: bool = False) -> None:
        async with self.conn.cursor() as cursor:
            if many:
                await cursor.executemany(sql, args)
            else:
                await cursor.execute(sql, args)

    async def server_version(self) -> str:
        async with self.conn.cursor() as cursor:
            await cursor.execute("SELECT VERSION()")
            ((version,),) = await cursor.fetchall()
            return str(version)

    async def truncate(self) -> None:
        await self._run("DELETE FROM sessions")  # values go by the cascade

    async def put(self, rows: Sequence[Row]) -> None:
        if not rows:
            return
        await self._run("START TRANSACTION")
        await self._run(
            "INSERT INTO sessions (id) VALUES (%s) ON DUPLICATE KEY UPDATE id = id",
            [(sid,) for sid in dict.fromkeys(r[0] for r in rows)],
            many=True,
        )
        await self._run(
            "INSERT INTO session_values (session_id, `key`, value) VALUES (%s, %s, %s) "
            "ON DUPLICATE KEY UPDATE value = VALUES(value)",
            list(rows),
            many=True,
        )
        await self._run("COMMIT")

    async def cleanup(self, prefix: str) -> None:
        pattern = prefix + "-%"
        await self._run("DELETE FROM session_values WHERE `key` LIKE %s", (pattern,))
        await self._run("DELETE FROM sessions WHERE id LIKE %s", (pattern,))

    async def maintain(self) -> None:
        await self._run("ANALYZE TABLE sessions, session_values")

    async def close(self) -> None:
        self.conn.close()
