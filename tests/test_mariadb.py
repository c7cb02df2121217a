"""What MariaDB/MySQL would get wrong by default, checked through the public API: exact
comparison of ids and keys, large values, UTC times with sub-second precision whatever the
connection's time zone, a collector that skips locked sessions, and drivers refused with a
reason. The comparison and size checks run on every database."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from sessions_sql import BackendError, SQLAlchemyBackend

from .conftest import MariaDBServer, empty_database, guard

# Pairs that MariaDB's default collations (and utf8mb4_bin's PAD SPACE) treat as equal.
PAIRS = [("A", "a"), ("e", "é"), ("x", "x ")]


async def test_ids_compare_exactly(backend: SQLAlchemyBackend) -> None:
    for first, second in PAIRS:
        await backend.write_value(first, "k", b"first")
        await backend.write_value(second, "k", b"second")
        assert await backend.read_value(first, "k") == b"first"
        assert await backend.read_value(second, "k") == b"second"
    assert sorted(await backend.get_sessions()) == sorted(i for pair in PAIRS for i in pair)
    for first, second in PAIRS:
        await backend.remove_session(first)
        assert await backend.read_value(first, "k") is None
        assert await backend.read_values(second) == {"k": b"second"}


async def test_keys_compare_exactly(backend: SQLAlchemyBackend) -> None:
    keys = {key: key.encode() for pair in PAIRS for key in pair}
    await backend.write_values("s", keys)
    assert await backend.read_values("s") == keys
    for first, second in PAIRS:
        await backend.remove_value("s", first)
        assert await backend.read_value("s", first) is None
        assert await backend.read_value("s", second) == second.encode()
    await backend.update_session("s", {"A": b"again"}, remove=["a"])
    assert await backend.read_values("s") == {"A": b"again", "é": b"\xc3\xa9", "x ": b"x "}


async def test_longest_ids_and_keys_fit_and_longer_are_refused(
    backend: SQLAlchemyBackend,
) -> None:
    longest = "\U0001f600" * 255  # 255 characters of four UTF-8 bytes each
    await backend.write_value(longest, longest, b"v")
    assert await backend.read_values(longest) == {longest: b"v"}
    assert await backend.get_sessions() == [longest]
    with pytest.raises(ValueError, match="session_id"):
        await backend.write_value(longest + "x", "k", b"v")
    with pytest.raises(ValueError, match="key"):
        await backend.write_value("s", longest + "x", b"v")
    assert await backend.get_sessions() == [longest]  # nothing truncated and stored


async def test_sixteen_megabyte_values_round_trip(backend: SQLAlchemyBackend) -> None:
    # 16 MB, just under MariaDB's default max_allowed_packet (16 MiB) with the statement.
    value = os.urandom(16_000_000)
    await backend.write_value("big", "k", value)
    assert await backend.read_value("big", "k") == value
    snapshot = await backend.read_session("big")
    assert snapshot is not None
    assert snapshot.values == {"k": value}


@pytest.fixture
def mariadb_url_empty(request: pytest.FixtureRequest) -> str:
    """The shared MariaDB database, emptied."""
    return empty_database(request, "mariadb")


async def _server_variable(engine: AsyncEngine, name: str) -> Any:
    async with engine.connect() as conn:
        return (await conn.execute(text(f"SELECT @@{name}"))).scalar_one()


async def test_value_over_max_allowed_packet_names_it(mariadb_url_empty: str) -> None:
    async with SQLAlchemyBackend.from_url(mariadb_url_empty) as backend:
        limit = await _server_variable(backend.engine, "max_allowed_packet")
        with pytest.raises(BackendError, match="max_allowed_packet") as raised:
            await backend.write_value("big", "k", b"\x01" * (limit + 1))
        assert "big" not in str(raised.value)
        assert await backend.get_sessions() == []  # nothing half-written
        await backend.write_value("big", "k", b"small")  # the backend still works
        assert await backend.read_value("big", "k") == b"small"


@pytest.fixture
async def far_east_engine(mariadb_url_empty: str) -> AsyncIterator[AsyncEngine]:
    """A host engine whose connections run in the time zone +05:00."""
    engine = create_async_engine(mariadb_url_empty)

    @event.listens_for(engine.sync_engine, "connect")
    def set_time_zone(dbapi_connection: Any, record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("SET time_zone = '+05:00'")
        cursor.close()

    yield engine
    await engine.dispose()


async def test_times_are_utc_whatever_the_connection_time_zone(
    far_east_engine: AsyncEngine,
) -> None:
    backend = SQLAlchemyBackend(far_east_engine)
    assert await _server_variable(far_east_engine, "session.time_zone") == "+05:00"
    before = int(time.time())
    await backend.write_value("s", "k", b"v", expires_at=before + 3600)
    after = int(time.time()) + 1
    created = await backend.get_session_age("s")
    assert created is not None
    assert before - 1 <= created <= after  # five hours off if the zone leaked in
    assert await backend.get_session_expiry("s") == before + 3600
    snapshot = await backend.read_session("s")
    assert snapshot is not None
    assert (snapshot.created_at, snapshot.expires_at) == (created, before + 3600)
    # Expiry and creation queries compare in UTC too.
    assert await backend.remove_expired_sessions(now=before + 3599) == 0
    assert await backend.remove_sessions_created_before(before - 3600) == 0
    assert await backend.get_sessions() == ["s"]
    assert await backend.remove_expired_sessions(now=before + 3601) == 1
    await backend.write_value("t", "k", b"v")
    assert await backend.remove_sessions_created_before(after + 1) == 1
    assert await backend.get_sessions() == []


async def test_creation_times_have_microseconds(mariadb_url_empty: str) -> None:
    async with SQLAlchemyBackend.from_url(mariadb_url_empty) as backend:
        for n in range(5):
            await backend.write_value(f"s{n}", "k", b"v")
        async with backend.engine.connect() as conn:
            result = await conn.execute(text("SELECT id, created_at FROM sessions"))
            created = dict(result.all())
    order = sorted(created, key=created.__getitem__)
    assert order == [f"s{n}" for n in range(5)]  # created one after the other, in order
    assert len(set(created.values())) == 5
    assert any(moment.microsecond for moment in created.values())


async def test_schema_types(mariadb_url_empty: str) -> None:
    """Foreign key and parent share charset and collation; LONGBLOB; DATETIME(6)."""
    engine = create_async_engine(mariadb_url_empty)
    try:
        async with engine.connect() as conn:
            result = await conn.execute(
                text(
                    "SELECT table_name, column_name, column_type, character_set_name,"
                    " collation_name FROM information_schema.columns"
                    " WHERE table_schema = DATABASE() AND table_name LIKE 'session%'"
                )
            )
            columns = {(row[0], row[1]): row[2:] for row in result}
    finally:
        await engine.dispose()
    exact = ("varchar(255)", "utf8mb4", "utf8mb4_nopad_bin")
    assert columns[("sessions", "id")] == exact
    assert columns[("session_values", "session_id")] == exact
    assert columns[("session_values", "key")] == exact
    assert columns[("session_values", "value")][0] == "longblob"
    assert columns[("sessions", "created_at")][0] == "datetime(6)"
    assert columns[("sessions", "expires_at")][0] == "datetime(6)"


async def test_collector_skips_a_locked_session(mariadb_url_empty: str) -> None:
    """A session a host transaction holds is skipped, never waited for, and removed on the
    next pass once released."""
    async with SQLAlchemyBackend.from_url(mariadb_url_empty) as backend:
        for n in range(3):
            await backend.write_value(f"s{n}", "k", b"v", expires_at=1)
        host = create_async_engine(mariadb_url_empty)
        try:
            async with host.begin() as conn:
                await conn.execute(text("SELECT id FROM sessions WHERE id = 's1' FOR UPDATE"))
                removed = await guard(backend.remove_expired_sessions(), "collector")
                assert removed == 2
                assert (
                    await guard(
                        backend.remove_sessions_created_before(time.time() + 10), "collector"
                    )
                    == 0
                )
            assert await backend.get_sessions() == ["s1"]
            assert await backend.remove_expired_sessions() == 1
        finally:
            await host.dispose()


def test_aiomysql_is_refused_with_the_reason(mariadb_server: MariaDBServer) -> None:
    url = mariadb_server.url.replace("mysql+asyncmy://", "mysql+aiomysql://")
    with pytest.raises(ValueError, match="asyncmy"):
        SQLAlchemyBackend.from_url(url)

    async def check() -> None:
        engine = create_async_engine(url)
        try:
            with pytest.raises(ValueError, match=r"bytes parameter.*asyncmy"):
                SQLAlchemyBackend(engine)
            # The reason holds: aiomysql cannot bind bytes (if this starts passing, aiomysql
            # was fixed and the refusal can go).
            with pytest.raises(TypeError):
                async with engine.connect() as conn:
                    await conn.execute(text("SELECT :value"), {"value": b"v"})
        finally:
            await engine.dispose()

    asyncio.run(check())


@pytest.mark.parametrize("owned", [False, True], ids=["host-engine", "from_url"])
async def test_recovers_after_server_kills_connections(mariadb_url_empty: str, owned: bool) -> None:
    """Connections the server killed while they sat in the pool (or kept by a from_url
    backend) are replaced and the calls retried."""
    if owned:
        backend = SQLAlchemyBackend.from_url(mariadb_url_empty)
    else:
        backend = SQLAlchemyBackend(create_async_engine(mariadb_url_empty))
    admin = create_async_engine(mariadb_url_empty, isolation_level="AUTOCOMMIT")
    try:
        await asyncio.gather(*(backend.write_value(f"s{i}", "k", b"v") for i in range(8)))
        async with admin.connect() as conn:
            ids = (
                await conn.execute(
                    text(
                        "SELECT id FROM information_schema.processlist"
                        " WHERE db = DATABASE() AND id <> CONNECTION_ID()"
                    )
                )
            ).scalars()
            killed = 0
            for connection_id in ids:
                await conn.execute(text(f"KILL {int(connection_id)}"))
                killed += 1
            assert killed >= 1
        assert await backend.read_value("s0", "k") == b"v"
        await backend.write_values("s0", {"k": b"w", "l": b"x"})
        assert await backend.read_values("s0") == {"k": b"w", "l": b"x"}
        assert len(await backend.get_sessions()) == 8
    finally:
        await admin.dispose()
        await backend.close()
        await backend.engine.dispose()


async def test_collector_batch_reads_its_ids_first(mariadb_url_empty: str) -> None:
    """The batch's ids come from the index of the condition, then each session is deleted
    through the primary key (never a scan of the whole table per batch)."""
    async with SQLAlchemyBackend.from_url(mariadb_url_empty) as backend:
        async with backend.engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO sessions (id, created_at, expires_at)"
                    " SELECT CONCAT('s', seq), UTC_TIMESTAMP(6) - INTERVAL seq % 2 DAY,"
                    " IF(seq % 10 = 0, UTC_TIMESTAMP(6) - INTERVAL 1 HOUR, NULL)"
                    " FROM seq_1_to_20000"
                )
            )
            await conn.execute(text("ANALYZE TABLE sessions"))
        for script, index in [
            (backend._sql.remove_created_before, "ix_sessions_created_at"),
            (backend._sql.remove_expired, "ix_sessions_expires_at"),
        ]:
            (statement,) = backend._executor.compiled(script)
            args = statement.args(
                {"cutoff": datetime(2100, 1, 1), "now": datetime(2100, 1, 1), "limit": 500}
            )
            async with backend.engine.connect() as conn:
                raw = (await conn.get_raw_connection()).driver_connection
                async with raw.cursor() as cursor:
                    await cursor.execute(f"EXPLAIN {statement.sql}", args)
                    plan = [
                        dict(zip([d[0] for d in cursor.description], row, strict=True))
                        for row in await cursor.fetchall()
                    ]
            first, second, derived = plan
            assert first["table"] == "<derived2>", plan
            assert (second["table"], second["type"], second["key"]) == (
                "sessions",
                "eq_ref",
                "PRIMARY",
            ), plan
            assert derived["key"] == index, plan
        assert await backend.remove_expired_sessions(batch_size=500) == 2000
        removed = await backend.remove_sessions_created_before(time.time() - 3600, batch_size=3000)
        assert removed == 10000  # the day-old (odd) half; the expired ones were even
