"""SQLAlchemyBackend behaviour beyond the protocol's contract: what is in the tables, batch
helpers, errors and recovery, and round trips. Runs on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import calendar
import os
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from sessions_sql import BackendError, SQLAlchemyBackend, migrate
from sessions_sql.testing import BAD_INPUTS

from .conftest import empty_database, guard, with_driver
from .pgproxy import counting_round_trips

SECRET_ID = "secret-session-id-4f1d"
SECRET_VALUE = b"secret-value-9c2e"


async def scalar(engine: AsyncEngine, sql: str, **params: Any) -> Any:
    async with engine.connect() as conn:
        return (await conn.execute(text(sql), params)).scalar()


async def set_created_at(engine: AsyncEngine, session_id: str, when: datetime) -> None:
    """Backdate a session (SQLite stores the same text format as CURRENT_TIMESTAMP)."""
    value: Any = when
    if engine.dialect.name == "sqlite":
        value = when.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    async with engine.begin() as conn:
        await conn.execute(
            text("UPDATE sessions SET created_at = :when WHERE id = :id"),
            {"when": value, "id": session_id},
        )


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=timezone.utc)  # type: ignore[misc]


class CheckoutCounter:
    """Counts connections checked out of an engine's pool: no checkout, no SQL."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.count = 0
        event.listen(engine.sync_engine, "checkout", self._count)

    def _count(self, *args: Any) -> None:
        self.count += 1


class Kw(dict[str, Any]):
    """Keyword arguments, as the last of a call's arguments in the tables below."""


def call(backend: Any, method: str, args: tuple[Any, ...]) -> Any:
    if args and isinstance(args[-1], Kw):
        return getattr(backend, method)(*args[:-1], **args[-1])
    return getattr(backend, method)(*args)


BATCH_BAD_INPUTS: list[tuple[str, tuple[Any, ...], type[Exception], str]] = [
    ("read_values", (None,), TypeError, "session_id"),
    ("read_values", ("\udcff",), ValueError, "session_id"),
    ("write_values", ("sid", {"k": "text"}), TypeError, "values"),
    ("write_values", ("sid", {"": b"v"}), ValueError, "key"),
    ("write_values", ("sid", [("k", b"v")]), TypeError, "values"),
    ("write_values", ("sid", {"ok": b"v", "bad": None}), TypeError, "values"),
    ("write_values", ("sid", None), TypeError, "values"),
    ("remove_values", ("sid", "k"), TypeError, "keys"),
    ("remove_values", ("sid", None), TypeError, "keys"),
    ("remove_values", ("sid", ["k", 3]), TypeError, "key"),
    ("remove_values", ("", ["k"]), ValueError, "session_id"),
    ("remove_sessions_created_before", (datetime(2020, 1, 1),), ValueError, "cutoff"),
    ("remove_sessions_created_before", ("2020-01-01",), TypeError, "cutoff"),
    ("remove_sessions_created_before", (None,), TypeError, "cutoff"),
    ("remove_sessions_created_before", (1e300,), ValueError, "cutoff"),
    ("remove_sessions_created_before", (-1e300,), ValueError, "cutoff"),
    ("read_session", (None,), TypeError, "session_id"),
    ("get_session_expiry", ("",), ValueError, "session_id"),
    ("set_session_expiry", ("sid", True), TypeError, "expires_at"),
    ("set_session_expiry", ("sid", 1.5), TypeError, "expires_at"),
    ("set_session_expiry", ("sid", -1), ValueError, "expires_at"),
    ("set_session_expiry", ("sid", datetime(2030, 1, 1)), ValueError, "expires_at"),
    ("set_session_expiry", ("x" * 256, None), ValueError, "session_id"),
    ("update_session", ("sid", {"k": b"v"}, Kw(remove=["k"])), ValueError, "written and removed"),
    ("update_session", ("sid", {"k": "text"}), TypeError, "values"),
    ("update_session", ("sid", None, Kw(remove="k")), TypeError, "remove"),
    ("update_session", ("sid", {"k": b"v"}, Kw(expires_at=10**13)), ValueError, "expires_at"),
    ("write_value", ("sid", "k", b"v", Kw(expires_at=False)), TypeError, "expires_at"),
    ("remove_expired_sessions", ("soon",), TypeError, "now"),
    ("remove_expired_sessions", (float("nan"),), ValueError, "now"),
    ("remove_expired_sessions", (datetime(2030, 1, 1),), ValueError, "now"),
]


@pytest.mark.parametrize(("method", "args", "error", "parameter"), BAD_INPUTS + BATCH_BAD_INPUTS)
async def test_bad_input_runs_no_sql(
    backend: SQLAlchemyBackend,
    engine: AsyncEngine,
    method: str,
    args: tuple[Any, ...],
    error: type[Exception],
    parameter: str,
) -> None:
    await backend.write_value("sid", "k", b"kept")
    counter = CheckoutCounter(engine)
    with pytest.raises(error, match=parameter):
        await call(backend, method, args)
    assert counter.count == 0
    await backend.read_value("sid", "k")
    assert counter.count == 1  # the counter sees the backend's calls
    assert await backend.read_values("sid") == {"k": b"kept"}


async def test_twenty_megabytes_round_trip(backend: SQLAlchemyBackend) -> None:
    value = os.urandom(20 * 1024 * 1024)
    if backend.engine.dialect.name == "mysql":
        async with backend.engine.connect() as conn:
            packet = (await conn.execute(text("SELECT @@max_allowed_packet"))).scalar_one()
        if packet < 2 * len(value):  # escaped, a value may take twice its size
            with pytest.raises(BackendError, match="max_allowed_packet"):
                await backend.write_value("big", "k", value)
            assert await backend.get_sessions() == []
            return
    await backend.write_value("big", "k", value)
    assert await backend.read_value("big", "k") == value


async def test_iterators_refuse_bad_batch_sizes(backend: SQLAlchemyBackend) -> None:
    for bad, error in [(0, ValueError), (-5, ValueError), (10**9, ValueError), ("9", TypeError)]:
        with pytest.raises(error, match="batch_size"):
            [s async for s in backend.iter_sessions(batch_size=bad)]  # type: ignore[arg-type]
        with pytest.raises(error, match="batch_size"):
            await backend.remove_sessions_created_before(0, batch_size=bad)  # type: ignore[arg-type]


async def test_creation_time_is_never_rewritten(
    backend: SQLAlchemyBackend, engine: AsyncEngine
) -> None:
    await backend.write_value("s", "a", b"1")
    await set_created_at(engine, "s", utc(2001, 2, 3, 4, 5, 6))
    await backend.write_value("s", "a", b"2")
    await backend.write_values("s", {"b": b"3", "c": b"4"})
    await backend.remove_value("s", "a")
    expected = calendar.timegm((2001, 2, 3, 4, 5, 6))
    assert await backend.get_session_age("s") == expected


async def test_remove_session_cascades_on_host_engine(
    backend: SQLAlchemyBackend, engine: AsyncEngine
) -> None:
    # The engine has default settings: on SQLite, foreign keys are off per connection.
    await backend.write_values("gone", {"a": b"1", "b": b"2"})
    await backend.write_value("kept", "a", b"1")
    await backend.remove_session("gone")
    assert await scalar(engine, "SELECT count(*) FROM session_values") == 1
    assert await scalar(engine, "SELECT count(*) FROM sessions") == 1


async def test_cascade_with_sqlite_foreign_keys_on(sqlite_url: str) -> None:
    await migrate(sqlite_url)
    engine = create_async_engine(sqlite_url)

    @event.listens_for(engine.sync_engine, "connect")
    def foreign_keys_on(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.execute("PRAGMA foreign_keys=ON")

    try:
        backend = SQLAlchemyBackend(engine)
        await backend.write_values("s", {"a": b"1", "b": b"2"})
        await backend.remove_session("s")
        assert await scalar(engine, "SELECT count(*) FROM session_values") == 0
    finally:
        await engine.dispose()


async def test_batch_helpers(backend: SQLAlchemyBackend, engine: AsyncEngine) -> None:
    assert await backend.read_values("s") == {}
    await backend.write_values("s", {})
    assert await backend.get_sessions() == []  # an empty mapping creates nothing
    await backend.write_values("s", {"a": b"1", "b": bytearray(b"2"), "ü": b""})
    assert await backend.read_values("s") == {"a": b"1", "b": b"2", "ü": b""}
    await backend.write_values("s", {"a": b"one", "c": b"3"})
    assert await backend.read_values("s") == {"a": b"one", "b": b"2", "ü": b"", "c": b"3"}
    await backend.remove_values("s", ["a", "missing", "a"])
    await backend.remove_values("s", iter(["ü"]))
    assert await backend.read_values("s") == {"b": b"2", "c": b"3"}
    await backend.remove_values("missing-session", ["a"])
    assert await backend.get_sessions() == ["s"]

    # A refused value anywhere in the mapping writes nothing at all.
    with pytest.raises(TypeError):
        await backend.write_values("s", {"b": b"new", "d": 4})  # type: ignore[dict-item]
    assert await backend.read_values("s") == {"b": b"2", "c": b"3"}


async def test_iter_sessions_pages_through_all(backend: SQLAlchemyBackend) -> None:
    ids = [f"s{i:03}" for i in range(25)] + ["Ω", "a'b"]
    for sid in ids:
        await backend.write_value(sid, "k", b"v")
    assert [s async for s in backend.iter_sessions(batch_size=4)] == sorted(
        await backend.get_sessions()
    )
    assert sorted([s async for s in backend.iter_sessions(batch_size=27)]) == sorted(ids)
    assert sorted([s async for s in backend.iter_sessions()]) == sorted(ids)


async def test_remove_sessions_created_before(
    backend: SQLAlchemyBackend, engine: AsyncEngine
) -> None:
    boundary = utc(2020, 6, 1, 12, 0, 0)
    for i in range(5):
        await backend.write_values(f"old{i}", {"a": b"1", "b": b"2"})
        await set_created_at(engine, f"old{i}", utc(2020, 1, 1, 0, 0, i))
    await backend.write_value("edge", "a", b"1")
    await set_created_at(engine, "edge", boundary)
    await backend.write_value("young", "a", b"1")

    # Strictly before: a session created exactly at the cutoff stays.
    progress: list[int] = []
    removed = await backend.remove_sessions_created_before(
        boundary, batch_size=2, progress=progress.append
    )
    assert removed == 5
    assert progress == [2, 4, 5]
    assert sorted(await backend.get_sessions()) == ["edge", "young"]
    assert await scalar(engine, "SELECT count(*) FROM session_values") == 2

    # Creation times count in whole seconds: half a second later, "edge" is before it.
    assert await backend.remove_sessions_created_before(boundary.timestamp() + 0.5) == 1
    assert await backend.get_sessions() == ["young"]
    assert await backend.remove_sessions_created_before(0) == 0


async def test_no_value_without_its_session_after_races(
    backend: SQLAlchemyBackend, engine: AsyncEngine
) -> None:
    stop = asyncio.Event()

    async def writer(n: int) -> None:
        i = 0
        while not stop.is_set():
            await backend.write_values("x", {f"w{n}": str(i).encode(), "shared": b"s"})
            await backend.write_value("x", f"v{n}", b"v")
            i += 1

    async def remover() -> None:
        for _ in range(40):
            await backend.remove_session("x")
            await asyncio.sleep(0.001)
        stop.set()

    await asyncio.gather(remover(), *(writer(n) for n in range(6)))
    orphans = await scalar(
        engine,
        "SELECT count(*) FROM session_values v "
        "WHERE NOT EXISTS (SELECT 1 FROM sessions s WHERE s.id = v.session_id)",
    )
    assert orphans == 0


async def test_max_value_bytes(engine: AsyncEngine) -> None:
    backend = SQLAlchemyBackend(engine, max_value_bytes=10)
    await backend.write_value("s", "k", b"x" * 10)
    with pytest.raises(ValueError, match="max_value_bytes"):
        await backend.write_value("s", "k", b"x" * 11)
    with pytest.raises(ValueError, match="max_value_bytes"):
        await backend.write_values("s", {"a": b"", "k": b"x" * 11})
    assert await backend.read_values("s") == {"k": b"x" * 10}


def test_constructor_refuses_bad_arguments(engine: AsyncEngine) -> None:
    with pytest.raises(TypeError):
        SQLAlchemyBackend("sqlite+aiosqlite://")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        SQLAlchemyBackend(engine, max_value_bytes=-1)
    with pytest.raises(ValueError):
        SQLAlchemyBackend(engine, schema="")


async def test_database_errors_become_backend_errors_without_secrets(
    sqlite_url: str,
) -> None:
    # Tables missing: the statement fails in the database.
    async with SQLAlchemyBackend.from_url(sqlite_url) as backend:
        with pytest.raises(BackendError) as raised:
            await backend.write_value(SECRET_ID, "k", SECRET_VALUE)
    assert raised.value.__cause__ is not None
    assert "write_value" in str(raised.value)
    for text_ in (str(raised.value), repr(raised.value), str(raised.value.__cause__)):
        assert SECRET_ID not in text_
        assert SECRET_VALUE.decode() not in text_
    assert SECRET_ID not in repr(backend)


async def test_unreachable_server_is_a_backend_error() -> None:
    url = "postgresql+asyncpg://postgres@127.0.0.1:1/none"
    async with SQLAlchemyBackend.from_url(url) as backend:
        for call in (backend.read_value(SECRET_ID, "k"), backend.get_sessions()):
            with pytest.raises(BackendError) as raised:
                await call
            assert raised.value.__cause__ is not None
            assert SECRET_ID not in str(raised.value)


async def test_pool_exhaustion_is_a_clear_backend_error(db_url: str) -> None:
    async with SQLAlchemyBackend.from_url(
        db_url, pool_size=1, max_overflow=0, pool_timeout=0.2
    ) as backend:
        async with backend.engine.connect():  # holds the only connection
            with pytest.raises(BackendError, match="pool exhausted"):
                await backend.read_value("s", "k")
        await backend.write_value("s", "k", b"v")  # full service once it is free
        assert await backend.read_value("s", "k") == b"v"


async def test_sqlite_backend_keeps_pool_size_connections(sqlite_url: str) -> None:
    """A from_url backend on SQLite keeps its connections between calls, at most pool_size:
    more calls wait for one to be given back, and a waiter cancelled right after its turn
    came passes the turn on instead of leaving the others waiting."""
    await migrate(sqlite_url)
    async with SQLAlchemyBackend.from_url(sqlite_url, pool_size=1, max_overflow=0) as backend:
        pool = backend.engine.sync_engine.pool
        await backend.write_value("s", "k", b"v")
        assert pool.checkedout() == 1  # type: ignore[attr-defined]  # kept, not returned
        kept = backend._executor._kept
        assert kept is not None
        held = await kept.take()  # the only connection
        first = asyncio.create_task(backend.read_value("s", "k"))
        second = asyncio.create_task(backend.read_value("s", "k"))
        for _ in range(3):
            await asyncio.sleep(0)
        assert not first.done() and not second.done()
        kept.give_back(held)  # first's turn comes...
        first.cancel()  # ...and it is cancelled before it runs
        assert await guard(second, "the second waiter") == b"v"
        assert first.cancelled()
        assert pool.checkedout() == 1  # type: ignore[attr-defined]
    assert pool.checkedout() == 0  # type: ignore[attr-defined]  # close() returned it


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def kept_url(request: pytest.FixtureRequest) -> str:
    """A database whose from_url backends keep their connections (asyncpg, aiosqlite,
    asyncmy)."""
    return empty_database(request, request.param)


async def test_kept_connections_serve_waiting_calls_in_turn(kept_url: str) -> None:
    """A task calling in a loop on a backend with one kept connection never keeps it from a
    call waiting in line: the connection it gives back goes to the waiting call, not to its
    own next call (which would starve the waiting one for as long as the loop runs).
    (SQLAlchemy's own queue pool, used on other engines, is not fair to a waiter this way.)"""
    async with SQLAlchemyBackend.from_url(kept_url, pool_size=1, max_overflow=0) as backend:
        await backend.write_value("s", "k", b"v")
        stop = asyncio.Event()
        calls = 0

        async def busy() -> None:
            nonlocal calls
            while not stop.is_set():
                await backend.read_value("s", "k")
                calls += 1

        looping = asyncio.create_task(busy())
        try:
            while calls < 10:
                await asyncio.sleep(0)
            await guard(backend.write_value("s", "k", b"w"), "a call waiting in line")
            assert await guard(backend.read_value("s", "k"), "another one") == b"w"
        finally:
            stop.set()
            await looping


# PostgreSQL only.


@pytest.fixture
async def pg_backend(postgres_url: str) -> AsyncIterator[SQLAlchemyBackend]:
    async with SQLAlchemyBackend.from_url(postgres_url) as backend:
        async with backend.engine.begin() as conn:
            await conn.execute(text("TRUNCATE sessions, session_values"))
        yield backend


async def test_recovers_after_server_kills_connections(
    pg_backend: SQLAlchemyBackend, postgres_url: str
) -> None:
    await asyncio.gather(*(pg_backend.write_value(f"s{i}", "k", b"v") for i in range(8)))
    admin = create_async_engine(postgres_url, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            killed = await conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            )
            assert len(killed.all()) >= 1
    finally:
        await admin.dispose()
    # Every pooled connection is dead; calls are retried once on a fresh connection.
    assert await pg_backend.read_value("s0", "k") == b"v"
    await pg_backend.write_value("s0", "k", b"w")
    assert await pg_backend.read_value("s0", "k") == b"w"
    assert len(await pg_backend.get_sessions()) == 8


async def test_expiry_batch_scans_no_whole_table(pg_backend: SQLAlchemyBackend) -> None:
    """The expiry DELETE finds a batch through the created_at index and deletes it through
    the primary key: a scan of the whole table per batch would make a pass quadratic."""
    async with pg_backend.engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO sessions (id, created_at) SELECT 's' || i, "
                "now() - (i % 2) * interval '30 days' FROM generate_series(1, 50000) AS i"
            )
        )
        await conn.execute(text("ANALYZE sessions"))
    (statement,) = pg_backend._executor.compiled(pg_backend._sql.remove_created_before)
    cutoff = datetime.now(timezone.utc) - timedelta(days=1)
    async with pg_backend.engine.connect() as conn:
        raw = await conn.get_raw_connection()
        rows = await raw.driver_connection.fetch(f"EXPLAIN {statement.sql}", cutoff, 5000)
    plan = "\n".join(row[0] for row in rows)
    assert "Seq Scan" not in plan, plan
    assert "pk_sessions" in plan, plan
    assert await pg_backend.remove_sessions_created_before(cutoff) == 25000


async def test_expired_batch_goes_through_the_expiry_index(pg_backend: SQLAlchemyBackend) -> None:
    """remove_expired_sessions finds a batch through the partial expiry index, among many
    sessions without an expiry, and deletes it through the primary key."""
    async with pg_backend.engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO sessions (id, expires_at) SELECT 's' || i, CASE WHEN i % 10 = 0 "
                "THEN now() - interval '1 hour' END FROM generate_series(1, 50000) AS i"
            )
        )
        await conn.execute(text("ANALYZE sessions"))
    (statement,) = pg_backend._executor.compiled(pg_backend._sql.remove_expired)
    now = datetime.now(timezone.utc).replace(microsecond=0)
    async with pg_backend.engine.connect() as conn:
        raw = await conn.get_raw_connection()
        rows = await raw.driver_connection.fetch(f"EXPLAIN {statement.sql}", now, 5000)
    plan = "\n".join(row[0] for row in rows)
    assert "Seq Scan" not in plan, plan
    assert "ix_sessions_expires_at" in plan, plan
    assert "pk_sessions" in plan, plan
    progress: list[int] = []
    removed = await pg_backend.remove_expired_sessions(
        now, batch_size=2000, progress=progress.append
    )
    assert removed == 5000
    assert progress == [2000, 4000, 5000]
    assert await scalar(pg_backend.engine, "SELECT count(*) FROM sessions") == 45000


async def test_schema_option(fresh_postgres_url: str) -> None:
    url = fresh_postgres_url
    await migrate(url, schema="auth")
    async with SQLAlchemyBackend.from_url(url, schema="auth") as backend:
        await backend.write_value("s", "k", b"v")
        assert await backend.read_value("s", "k") == b"v"
        count = await scalar(backend.engine, "SELECT count(*) FROM auth.session_values")
        assert count == 1
        tables = await scalar(
            backend.engine,
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
        )
        assert tables == 0
        # The default-schema backend does not see them.
        with pytest.raises(BackendError):
            await SQLAlchemyBackend(backend.engine).read_value("s", "k")


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_one_round_trip_per_read_and_write(postgres_url: str, driver: str) -> None:
    """Every single-session operation costs one round trip once warm (counted on the wire),
    saving a web request's changes (values written, keys removed, a new expiry) included."""
    async with (
        counting_round_trips(with_driver(postgres_url, driver)) as (proxy, proxied),
        SQLAlchemyBackend.from_url(proxied, pool_size=1, max_overflow=0) as backend,
    ):
        calls = {
            "write_value": lambda: backend.write_value("rt", "k", b"v" * 200),
            "read_value": lambda: backend.read_value("rt", "k"),
            "read_values": lambda: backend.read_values("rt"),
            "write_values": lambda: backend.write_values("rt", {"a": b"1", "b": b"2"}),
            "remove_value": lambda: backend.remove_value("rt", "a"),
            "remove_values": lambda: backend.remove_values("rt", ["a", "b"]),
            "get_session_age": lambda: backend.get_session_age("rt"),
            "write_value with expiry": lambda: backend.write_value("rt", "k", b"v", expires_at=1),
            "read_session": lambda: backend.read_session("rt"),
            "update_session": lambda: backend.update_session(
                "rt", {"a": b"1", "b": b"2"}, remove=["k", "c"], expires_at=2_000_000_000
            ),
            "update_session, expiry only": lambda: backend.update_session("rt", expires_at=None),
            "update_session, removal only": lambda: backend.update_session("rt", remove=["a"]),
            "set_session_expiry": lambda: backend.set_session_expiry("rt", 2_000_000_000),
            "get_session_expiry": lambda: backend.get_session_expiry("rt"),
            "remove_session": lambda: backend.remove_session("rt"),
        }
        for call in calls.values():  # warm up: connect, prepare statements
            await call()
        for name, call in calls.items():
            before = proxy.round_trips
            await call()
            assert proxy.round_trips - before == 1, name


async def test_using_runs_inside_the_host_transaction(
    backend: SQLAlchemyBackend, engine: AsyncEngine
) -> None:
    async with engine.connect() as conn:
        bound = backend.using(conn)
        await bound.write_value("s", "a", b"1")
        await bound.write_values("s", {"b": b"2", "c": b"3"})
        await bound.remove_values("s", ["c"])
        assert await bound.read_values("s") == {"a": b"1", "b": b"2"}
        await conn.rollback()
    assert await backend.get_sessions() == []

    async with engine.connect() as conn:
        bound = backend.using(conn)
        await bound.write_values("s", {"a": b"1", "b": b"2"})
        await bound.remove_session("kept-out")
        await conn.commit()
    assert await backend.read_values("s") == {"a": b"1", "b": b"2"}

    async with engine.connect() as conn:
        await backend.using(conn).remove_session("s")
        await conn.rollback()
    assert await backend.read_values("s") == {"a": b"1", "b": b"2"}
    assert "host transaction" in repr(backend.using(engine.connect()))
    with pytest.raises(TypeError):
        backend.using(engine)  # type: ignore[arg-type]
