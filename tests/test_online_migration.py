"""The expiry migration (0001 -> 0002) on a large PostgreSQL table while the application writes.

A rolling upgrade migrates while the previous release still serves traffic, so the writers
here run the statements of the release before the upgrade (they do not know ``expires_at``),
straight on asyncpg. A report-like transaction holds the table open for a few seconds while
the migration starts: an ALTER TABLE queued behind it would make every writer queue behind
the ALTER for that long, and a plain CREATE INDEX would block writes while it builds.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
from alembic import command
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from sessions_sql import SQLAlchemyBackend, migrate
from sessions_sql._migrate import alembic_config

from .conftest import guard

SESSIONS = 1_000_000
WRITERS = 8
REPORT_SECONDS = 3.0  # how long the long transaction holds the table
# Generous: the migration's lock waits are bounded at 100 ms per attempt; a writer queued
# behind an ALTER that waits for the report transaction would wait REPORT_SECONDS.
LONGEST_WRITE_BOUND = 1.5

# What the release before 0002 ran for write_value (no expires_at).
OLD_WRITE = [
    "INSERT INTO sessions (id) VALUES ($1) ON CONFLICT (id) DO NOTHING",
    "INSERT INTO session_values (session_id, key, value) VALUES ($1, $2, $3) "
    "ON CONFLICT (session_id, key) DO UPDATE SET value = excluded.value",
]


def _dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def _fill(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "INSERT INTO sessions (id, created_at) SELECT 'bulk-' || i, "
            f"now() - (i % 10000) * interval '1 minute' FROM generate_series(1, {SESSIONS}) i"
        )
        await conn.execute(
            "INSERT INTO session_values (session_id, key, value) "
            "SELECT 'bulk-' || i, 'k', '\\x00'::bytea FROM generate_series(1, 100000) i"
        )
        await conn.execute("VACUUM ANALYZE sessions")
        await conn.execute("VACUUM ANALYZE session_values")
    finally:
        await conn.close()


class Writers:
    """Tasks writing as the previous release does, timing each write."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.stop = asyncio.Event()
        self.durations: list[float] = []
        self.errors: list[BaseException] = []
        self.acknowledged: dict[str, bytes] = {}
        self.during_index_build = 0
        self.building = False

    async def run(self, n: int) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            i = 0
            while not self.stop.is_set():
                i += 1
                sid, value = f"live-{n}-{i % 50}", b"%d" % i
                building = self.building
                start = time.monotonic()
                try:
                    async with conn.transaction():
                        await conn.execute(OLD_WRITE[0], sid)
                        await conn.execute(OLD_WRITE[1], sid, "k", value)
                    read = await conn.fetchval(
                        "SELECT value FROM session_values WHERE session_id = $1 AND key = 'k'", sid
                    )
                except Exception as error:
                    self.errors.append(error)
                    continue
                self.durations.append(time.monotonic() - start)
                self.acknowledged[sid] = value
                if read != value:
                    self.errors.append(AssertionError("a write was not read back"))
                if building and self.building:
                    self.during_index_build += 1
        finally:
            await conn.close()


async def _hold_report(dsn: str, started: asyncio.Event) -> None:
    """A long read transaction on the table (ACCESS SHARE lock and an old snapshot)."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction(isolation="repeatable_read"):
            await conn.fetchval("SELECT count(*) FROM sessions")
            started.set()
            await asyncio.sleep(REPORT_SECONDS)
    finally:
        await conn.close()


async def _watch_index_build(dsn: str, writers: Writers, done: asyncio.Event) -> int:
    """Flag the time the concurrent index build is in progress; return how often it was seen."""
    conn = await asyncpg.connect(dsn)
    seen = 0
    try:
        while not done.is_set():
            phase = await conn.fetchval(
                "SELECT phase FROM pg_stat_progress_create_index p JOIN pg_class c "
                "ON c.oid = p.index_relid WHERE c.relname = 'ix_sessions_expires_at'"
            )
            writers.building = phase is not None
            seen += phase is not None
            await asyncio.sleep(0.005)
    finally:
        writers.building = False
        await conn.close()
    return seen


async def test_expiry_migration_on_a_large_live_table(fresh_postgres_url: str) -> None:
    url, dsn = fresh_postgres_url, _dsn(fresh_postgres_url)
    await migrate(url, "0001")
    await _fill(dsn)

    writers = Writers(dsn)
    tasks = [asyncio.create_task(writers.run(n)) for n in range(WRITERS)]
    report_started = asyncio.Event()
    report = asyncio.create_task(_hold_report(dsn, report_started))
    migrated = asyncio.Event()
    watcher = asyncio.create_task(_watch_index_build(dsn, writers, migrated))
    try:
        await guard(report_started.wait(), "the report transaction")
        await asyncio.sleep(0.3)  # writers running
        before = len(writers.durations)
        await guard(migrate(url), "the upgrade")
        migrated.set()
        builds_seen = await guard(watcher, "the index watcher")
        await asyncio.sleep(0.3)
    finally:
        writers.stop.set()
        migrated.set()
        await guard(asyncio.gather(*tasks, report, watcher, return_exceptions=True), "writers")

    assert writers.errors == []
    assert len(writers.durations) > before + WRITERS, "writers made no progress meanwhile"
    longest = max(writers.durations)
    assert longest < LONGEST_WRITE_BOUND, f"a write waited {longest:.2f}s on the migration"
    # Writes went through while the index was being built (CONCURRENTLY: no write lock).
    assert builds_seen > 0 and writers.during_index_build > 0

    async with SQLAlchemyBackend.from_url(url) as backend:
        for sid, value in writers.acknowledged.items():
            assert await backend.read_value(sid, "k") == value
        assert await backend.get_session_expiry("bulk-1") is None
        await backend.set_session_expiry("bulk-1", 1)
        assert await backend.remove_expired_sessions() == 1
    conn = await asyncpg.connect(dsn)
    try:
        rewritten: Any = await conn.fetchval("SELECT count(*) FROM sessions WHERE id LIKE 'bulk-%'")
        valid = await conn.fetchval(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = 'ix_sessions_expires_at'::regclass"
        )
        plan = "\n".join(
            row[0]
            for row in await conn.fetch(
                "EXPLAIN SELECT id FROM sessions WHERE expires_at < now() "
                "ORDER BY expires_at LIMIT 5000"
            )
        )
    finally:
        await conn.close()
    assert rewritten == SESSIONS - 1
    assert valid is True
    assert "ix_sessions_expires_at" in plan


async def test_downgrade_of_the_expiry_migration_keeps_the_sessions(
    fresh_postgres_url: str,
) -> None:
    url = fresh_postgres_url
    await migrate(url)
    async with SQLAlchemyBackend.from_url(url) as backend:
        await backend.write_value("s", "k", b"v", expires_at=2_000_000_000)
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            await conn.run_sync(lambda c: command.downgrade(alembic_config(c), "0001"))
    finally:
        await engine.dispose()
    conn = await asyncpg.connect(_dsn(url))
    try:
        columns = {
            row[0]
            for row in await conn.fetch(
                "SELECT column_name FROM information_schema.columns WHERE table_name = 'sessions'"
            )
        }
        assert columns == {"id", "created_at"}
        assert await conn.fetchval("SELECT to_regclass('ix_sessions_expires_at')") is None
        assert await conn.fetchval("SELECT count(*) FROM session_values") == 1
    finally:
        await conn.close()
    await migrate(url)
    async with SQLAlchemyBackend.from_url(url) as backend:
        assert await backend.read_value("s", "k") == b"v"
        assert await backend.get_session_expiry("s") is None
