"""Faults: the database failing under a loaded backend. PostgreSQL unless stated.

The server kills the backend's connections, restarts, stops and starts, holds locks past a
timeout; a writer process is killed with SIGKILL. Every call is awaited under ``guard``,
which turns a hang into a failure (it asserts nothing about time otherwise). Events are
ordered with ``time.monotonic_ns()``; loops run for a few calls, not for a time.

Tests that stop or restart the server drive it with ``pg_ctlcluster``. When they cannot (no
``pg_ctlcluster``, no local cluster on the test URL's port, or the command fails) they skip
with the reason, except under CI (``CI`` set), where they fail. They always leave it running.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from sessions_sql import BackendError, SQLAlchemyBackend, migrate

from .conftest import HANG_GUARD, guard, now, with_driver

if TYPE_CHECKING:
    from .conftest import PostgresServer


LOAD_TASKS = 16


def count_connects(engine: AsyncEngine) -> Callable[[], int]:
    """Count the DBAPI connections the engine opens."""
    opened = [0]

    def on_connect(*args: Any) -> None:
        opened[0] += 1

    event.listen(engine.sync_engine, "connect", on_connect)
    return lambda: opened[0]


@pytest.fixture
def pg_db(postgres_server: PostgresServer) -> str:
    """A new, migrated PostgreSQL database of this test alone."""
    url = postgres_server.new_database()
    asyncio.run(migrate(url))
    return url


@pytest.fixture(params=["asyncpg", "psycopg"])
def backend_url(request: pytest.FixtureRequest, pg_db: str) -> str:
    """``pg_db`` through each PostgreSQL driver, for the backend under test."""
    return with_driver(pg_db, request.param)


@pytest.fixture
async def admin(pg_db: str) -> AsyncIterator[AsyncEngine]:
    """An engine beside the backend's, for killing, locking and checking."""
    engine = create_async_engine(pg_db, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    yield engine
    await engine.dispose()


async def all_values(engine: AsyncEngine) -> dict[tuple[str, str], bytes]:
    async with engine.connect() as conn:
        query = "SELECT v.session_id, v.key, v.value FROM session_values v"  # key: reserved
        result = await conn.execute(text(query))
        return {(sid, key): bytes(value) for sid, key, value in result}


async def session_ids(engine: AsyncEngine) -> list[str]:
    async with engine.connect() as conn:
        return sorted((await conn.execute(text("SELECT id FROM sessions"))).scalars())


async def terminate_backend_connections(conn: AsyncConnection) -> list[int]:
    """Terminate every other connection to this database; return once they have exited."""
    result = await conn.execute(
        text(
            "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    )
    pids = [pid for pid, killed in result if killed]
    gone = text("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(:pids)")
    while (await conn.execute(gone, {"pids": pids})).scalar_one():
        await asyncio.sleep(0.005)
    return pids


# A load of LOAD_TASKS tasks, each calling the backend in a loop.

FAILED = object()


@dataclass
class Call:
    start: int
    end: int
    what: str
    error: BackendError | None


@dataclass
class Load:
    """Each task owns a session and cycles through the protocol's operations, writing every
    key once. Failures must be BackendError (anything else fails the test at once); reads
    that succeed must agree with every acknowledged write. Once ``recovered`` is set (the
    fault is over), each task makes ``calls_after`` more calls and stops."""

    backend: SQLAlchemyBackend
    calls: list[Call] = field(default_factory=list)
    acked: dict[tuple[str, str], bytes] = field(default_factory=dict)
    recovered: int | None = None
    calls_after: int = 8
    go: asyncio.Event = field(default_factory=asyncio.Event)  # cleared: calls wait
    in_flight: int = 0

    def __post_init__(self) -> None:
        self.go.set()

    async def call(self, what: str, awaitable: Awaitable[Any]) -> Any:
        await self.go.wait()
        self.in_flight += 1
        start = now()
        try:
            result = await guard(awaitable, what)
        except BackendError as error:
            assert error.__cause__ is not None, "a BackendError without the driver's error"
            self.calls.append(Call(start, now(), what, error))
            await asyncio.sleep(0.02)  # as an application would, before trying again
            return FAILED
        finally:
            self.in_flight -= 1
        self.calls.append(Call(start, now(), what, None))
        return result

    def pause(self) -> bool:
        """Stop making calls; true once none is in flight."""
        self.go.clear()
        return not self.in_flight

    def warmed_up(self) -> bool:
        return sum(call.error is None for call in self.calls) >= 4 * LOAD_TASKS

    def calls_since(self, start: int) -> list[Call]:
        return [call for call in self.calls if call.start > start]

    async def task(self, n: int) -> None:
        backend, sid = self.backend, f"load{n}"
        after = 0
        i = 0
        while after < self.calls_after:
            key, value = f"k{i}", b"%d:%d" % (n, i)
            recovered = self.recovered
            if i % 2:
                written = await self.call("write_value", backend.write_value(sid, key, value))
                pairs = {key: value}
            else:
                pairs = {key: value, f"{key}-b": value}
                written = await self.call("write_values", backend.write_values(sid, pairs))
            if written is not FAILED:
                self.acked |= {(sid, k): v for k, v in pairs.items()}
            mine = {k: v for (s, k), v in self.acked.items() if s == sid}
            op = i % 6
            if op == 0 and mine:
                old = min(mine)
                read = await self.call("read_value", backend.read_value(sid, old))
                assert read is FAILED or read == mine[old]
            elif op == 1:
                values = await self.call("read_values", backend.read_values(sid))
                assert values is FAILED or values.items() >= mine.items()
            elif op == 2 and mine:
                age = await self.call("get_session_age", backend.get_session_age(sid))
                assert age is FAILED or isinstance(age, int)
            elif op == 3:
                ids = await self.call("get_sessions", backend.get_sessions())
                assert ids is FAILED or not mine or sid in ids
            elif op == 4:
                await self.call("remove_value", backend.remove_value(sid, "never-written"))
            else:
                ids = await self.call("iter_sessions", _collect(backend.iter_sessions(3)))
                assert ids is FAILED or not mine or sid in ids
            if recovered is not None:
                after += 1
            i += 1

    async def run(self) -> None:
        await asyncio.gather(*(self.task(n) for n in range(LOAD_TASKS)))

    async def until(self, running: asyncio.Task[None], condition: Callable[[], bool]) -> None:
        """Wait for ``condition``, or for the load to end (with the error that ended it)."""
        while not condition() and not running.done():
            await asyncio.sleep(0.005)
        if running.done():
            await running  # raises what ended the load
            pytest.fail("the load ended early", pytrace=False)

    async def finish(self, running: asyncio.Task[None]) -> None:
        """Let the load end once recovered; if the test stops earlier, stop the load."""
        if self.recovered is not None:
            await guard(running, "the load")
            return
        running.cancel()
        with contextlib.suppress(BaseException):
            await running

    def check(self) -> list[Call]:
        """Calls begun after recovery all succeeded; returns the failed calls."""
        assert self.recovered is not None
        late = [c for c in self.calls if c.start > self.recovered]
        assert len(late) >= LOAD_TASKS * self.calls_after
        late_failures = [f"{c.what}: {c.error!r} <- {c.error.__cause__!r}" for c in late if c.error]
        assert not late_failures, "calls failed after the database was back:\n" + "\n".join(
            late_failures[:10]
        )
        return [c for c in self.calls if c.error is not None]


def report(failures: list[Call], when: str) -> None:
    """Print (shown with -s) how calls failed: the driver errors behind the BackendErrors."""
    causes: Counter[str] = Counter()
    for call in failures:
        cause = call.error.__cause__ if call.error else None
        causes[f"{type(cause).__name__}({type(getattr(cause, 'orig', None)).__name__})"] += 1
    print(f"{len(failures)} calls failed {when}: {dict(causes)}")


async def _collect(iterator: AsyncIterator[str]) -> list[str]:
    return [item async for item in iterator]


# 5. The server kills every connection in the middle of a load.

KILL_ROUNDS = 4


async def test_connections_killed_mid_load(backend_url: str, admin: AsyncEngine) -> None:
    """While 16 tasks call the backend in a loop, an admin connection terminates every
    connection of the database, four times; then once more with the load paused, so that
    every pooled connection is idle when it dies. Calls either succeed or raise BackendError
    (never a driver or SQLAlchemy exception, never a hang); every failed call overlapped a
    kill; calls begun after the last kill all succeed, with nothing done by the application;
    no acknowledged write is lost."""
    async with SQLAlchemyBackend.from_url(backend_url) as backend:
        connects = count_connects(backend.engine)
        load = Load(backend)
        running = asyncio.create_task(load.run())
        kills: list[tuple[int, int, list[int]]] = []  # begun, over, connections killed

        async def kill(conn: AsyncConnection) -> None:
            begun = now()
            killed = await terminate_backend_connections(conn)
            kills.append((begun, now(), killed))

        try:
            await guard(load.until(running, load.warmed_up), "warming up")
            async with admin.connect() as conn:
                for _ in range(KILL_ROUNDS):
                    await kill(conn)
                    await asyncio.sleep(0.15)
                await guard(load.until(running, load.pause), "pausing the load")
                await kill(conn)
            load.recovered = now()
            load.go.set()
        finally:
            await load.finish(running)
        assert all(killed for _, _, killed in kills), "a kill found no connection to kill"
        assert connects() > len(kills[0][2]), "the killed connections were never replaced"
        failures = load.check()
        report(failures, "during the kills")
        for call in failures:
            assert any(call.start < over and call.end > begun for begun, over, _ in kills), (
                f"{call.what} failed between two kills: {call.error!r} <- {call.error.__cause__!r}"
            )
        stored = await all_values(admin)
        assert stored.items() >= load.acked.items(), "acknowledged writes were lost"


# 6. Pooled connections gone stale while idle: the server restarted between two calls.


@dataclass
class Cluster:
    """The local PostgreSQL cluster serving the test URL, driven by pg_ctlcluster."""

    version: str
    name: str
    url: str

    def command(self, action: str) -> list[str]:
        return ["pg_ctlcluster", "--skip-systemctl-redirect", self.version, self.name, action]

    async def ctl(self, action: str) -> None:
        process = await asyncio.create_subprocess_exec(
            *self.command(action), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        output, _ = await guard(process.communicate(), f"pg_ctlcluster {action}")
        if process.returncode != 0:
            cannot_control(f"pg_ctlcluster {action} failed: {output.decode().strip()}")

    async def wait_ready(self) -> None:
        engine = create_async_engine(self.url, poolclass=NullPool)
        try:
            while True:
                try:
                    async with engine.connect() as conn:
                        await conn.execute(text("SELECT 1"))
                    return
                except (SQLAlchemyError, OSError):
                    await asyncio.sleep(0.05)
        finally:
            await engine.dispose()

    def status(self) -> str:
        listing = subprocess.run(
            ["pg_lsclusters", "--no-header", self.version, self.name],
            capture_output=True,
            text=True,
            check=False,
        )
        fields = listing.stdout.split()
        return fields[3] if len(fields) > 3 else "unknown"


def cannot_control(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(
            f"CI is set but the PostgreSQL server cannot be controlled: {reason}", pytrace=False
        )
    print(f"cannot control the PostgreSQL server: {reason}")
    pytest.skip(f"cannot control the PostgreSQL server: {reason}")


@pytest.fixture
def cluster(postgres_server: PostgresServer, pg_db: str) -> Iterator[Cluster]:
    url = make_url(pg_db)
    if url.host not in (None, "", "localhost", "127.0.0.1", "::1"):
        cannot_control(f"the server {url.host} is not on this machine")
    if shutil.which("pg_ctlcluster") is None or shutil.which("pg_lsclusters") is None:
        cannot_control("pg_ctlcluster or pg_lsclusters is not installed")
    listing = subprocess.run(
        ["pg_lsclusters", "--no-header"], capture_output=True, text=True, check=False
    )
    port = str(url.port or 5432)
    found = [line.split() for line in listing.stdout.splitlines() if line.split()[2:3] == [port]]
    if len(found) != 1 or found[0][3] != "online":
        cannot_control(f"no single online cluster on port {port} in {listing.stdout!r}")
    cluster = Cluster(found[0][0], found[0][1], pg_db)
    try:
        yield cluster
    finally:
        if cluster.status() != "online":
            subprocess.run(cluster.command("start"), check=False, timeout=HANG_GUARD)
        asyncio.run(asyncio.wait_for(cluster.wait_ready(), HANG_GUARD))


async def server_started(engine: AsyncEngine) -> Any:
    async with engine.connect() as conn:
        return (await conn.execute(text("SELECT pg_postmaster_start_time()"))).scalar_one()


STALE_CALLS: dict[str, Callable[[SQLAlchemyBackend, str], Awaitable[Any]]] = {
    "get_sessions": lambda b, s: b.get_sessions(),
    "get_session_age": lambda b, s: b.get_session_age(s),
    "remove_session": lambda b, s: b.remove_session(s),
    "read_value": lambda b, s: b.read_value(s, "a"),
    "write_value": lambda b, s: b.write_value(s, "c", b"3"),
    "remove_value": lambda b, s: b.remove_value(s, "a"),
    "read_values": lambda b, s: b.read_values(s),
    "write_values": lambda b, s: b.write_values(s, {"c": b"3", "d": b"4"}),
    "remove_values": lambda b, s: b.remove_values(s, ["a", "b"]),
    "iter_sessions": lambda b, s: _collect(b.iter_sessions(2)),
    "remove_sessions_created_before": lambda b, s: b.remove_sessions_created_before(
        time.time() + 3600
    ),
}


async def test_stale_pooled_connections_after_a_restart(
    backend_url: str, admin: AsyncEngine, cluster: Cluster
) -> None:
    """One backend per operation (pool_pre_ping off), each with an idle pooled connection,
    and one with five. The server restarts. Five concurrent first calls of the latter all
    succeed, opening at most one connection per stale one; then the first call of every
    operation, each on its own backend, succeeds with the right result; each of those
    backends opened exactly one new connection per stale one, proof that the stale
    connections were there and were replaced."""
    backends = {
        name: SQLAlchemyBackend.from_url(backend_url, pool_pre_ping=False) for name in STALE_CALLS
    }
    burst = SQLAlchemyBackend.from_url(backend_url, pool_pre_ping=False, pool_size=5)
    try:
        for name, backend in backends.items():
            await backend.write_values(f"s-{name}", {"a": b"1", "b": b"2"})
        ages = {name: await b.get_session_age(f"s-{name}") for name, b in backends.items()}
        async with contextlib.AsyncExitStack() as stack:  # five idle connections in its pool
            for _ in range(5):
                conn = await stack.enter_async_context(burst.engine.connect())
                await conn.execute(text("SELECT 1"))
        connects = {name: count_connects(b.engine) for name, b in backends.items()}
        burst_connects = count_connects(burst.engine)
        started = await server_started(admin)

        await cluster.ctl("restart")
        await guard(cluster.wait_ready(), "the server coming back")
        assert await server_started(admin) != started

        reads = [burst.read_value("s-read_value", "a") for _ in range(5)]
        assert await guard(asyncio.gather(*reads), "five first calls") == [b"1"] * 5
        # At most one new connection per stale one. Fewer when a call finds a connection
        # another call has just replaced: the backend's first call also looks the database
        # up (Citus or not) and so may open the first new connection before the reads.
        assert 1 <= burst_connects() <= 5

        for name, call in STALE_CALLS.items():
            sid = f"s-{name}"
            ids = await session_ids(admin)
            result = await guard(call(backends[name], sid), name)
            stored = await all_values(admin)
            values = {k: v for (s, k), v in stored.items() if s == sid}
            expected = {
                "get_sessions": ids,
                "iter_sessions": ids,
                "get_session_age": ages[name],
                "read_value": b"1",
                "read_values": {"a": b"1", "b": b"2"},
                "remove_sessions_created_before": len(ids),
            }.get(name)
            if name == "get_sessions":
                result = sorted(result)
            assert result == expected, name
            assert values == {
                "remove_session": {},
                "write_value": {"a": b"1", "b": b"2", "c": b"3"},
                "remove_value": {"b": b"2"},
                "write_values": {"a": b"1", "b": b"2", "c": b"3", "d": b"4"},
                "remove_values": {},
                "remove_sessions_created_before": {},
            }.get(name, {"a": b"1", "b": b"2"}), name
            assert connects[name]() == 1, f"{name}: the stale connection was not replaced once"
    finally:
        for backend in [*backends.values(), burst]:
            await backend.close()


# 7. PostgreSQL stopped and started again during a load.


async def test_server_stopped_and_started_during_a_load(
    backend_url: str, admin: AsyncEngine, cluster: Cluster
) -> None:
    """While 16 tasks call the backend in a loop, the server is stopped (fast shutdown) and
    started again. Calls succeed or raise BackendError, never hang; calls begun once the
    server accepts connections again all succeed with nothing done by the application; every
    write acknowledged before, during or after the outage is in the database."""
    async with SQLAlchemyBackend.from_url(backend_url) as backend:
        load = Load(backend)
        running = asyncio.create_task(load.run())
        try:
            await guard(load.until(running, load.warmed_up), "warming up")
            await cluster.ctl("stop")
            stopped = now()
            try:
                await guard(
                    load.until(running, lambda: any(c.error for c in load.calls_since(stopped))),
                    "the load meeting the outage",
                )
            finally:
                await cluster.ctl("start")
            await guard(cluster.wait_ready(), "the server coming back")
            load.recovered = now()
        finally:
            await load.finish(running)
        failures = load.check()
        assert failures, "no call saw the outage"
        report(failures, "during the outage")
        stored = await all_values(admin)
        lost = {k: v for k, v in load.acked.items() if stored.get(k) != v}
        assert not lost, f"{len(lost)} acknowledged writes lost, e.g. {sorted(lost)[:3]}"


# 8. A statement timeout, or a lock held by another transaction.

# Engine connect_args of a server and a client timeout, by driver (psycopg has no client one).
TIMEOUTS = {
    ("asyncpg", "statement_timeout"): {"server_settings": {"statement_timeout": "500"}},
    ("asyncpg", "command_timeout"): {"command_timeout": 1},
    ("psycopg", "statement_timeout"): {"options": "-c statement_timeout=500"},
}


@pytest.mark.parametrize(("driver", "timeout"), sorted(TIMEOUTS))
@pytest.mark.parametrize("lock", ["table", "row"])
async def test_lock_held_past_the_timeout(
    pg_db: str, admin: AsyncEngine, lock: str, driver: str, timeout: str
) -> None:
    """Another transaction holds ACCESS EXCLUSIVE on session_values, or the row of session
    "locked". Blocked calls of a backend with a server (statement_timeout) or client
    (asyncpg command_timeout) timeout raise BackendError, without hanging; calls the lock
    does not block go through meanwhile; once the lock is released the backend works."""
    locker = create_async_engine(pg_db, poolclass=NullPool)  # not in autocommit
    url, connect_args = with_driver(pg_db, driver), TIMEOUTS[driver, timeout]
    async with SQLAlchemyBackend.from_url(url, connect_args=connect_args) as backend:
        await backend.write_value("locked", "a", b"1")
        await backend.write_value("free", "a", b"1")
        async with locker.connect() as conn:
            transaction = await conn.begin()
            if lock == "table":
                await conn.execute(text("LOCK TABLE session_values IN ACCESS EXCLUSIVE MODE"))
                blocked: dict[str, Callable[[], Awaitable[Any]]] = {
                    "write_value": lambda: backend.write_value("locked", "b", b"2"),
                    "read_value": lambda: backend.read_value("locked", "a"),
                    "remove_session": lambda: backend.remove_session("locked"),
                    "write_value of another session": lambda: backend.write_value("free", "b", b""),
                }
            else:
                await conn.execute(text("SELECT 1 FROM sessions WHERE id = 'locked' FOR UPDATE"))
                blocked = {
                    "write_value": lambda: backend.write_value("locked", "b", b"2"),
                    "write_values": lambda: backend.write_values("locked", {"b": b"2"}),
                    "remove_session": lambda: backend.remove_session("locked"),
                }
                assert await guard(backend.read_value("locked", "a"), "read") == b"1"
                await guard(backend.write_value("free", "b", b"2"), "an unlocked write")
            for what, call in blocked.items():
                with pytest.raises(BackendError) as raised:
                    await guard(call(), what)
                assert what.split()[0] in str(raised.value)
                assert raised.value.__cause__ is not None
                print(f"{what}: {raised.value} <- {raised.value.__cause__!r}")
            await transaction.rollback()

        await guard(backend.write_value("locked", "b", b"2"), "a write after the release")
        assert await backend.read_values("locked") == {"a": b"1", "b": b"2"}
        await backend.remove_session("locked")
        assert await backend.get_sessions() == ["free"]
    await locker.dispose()


# 9. Durability: the writing process killed with SIGKILL (SQLite and PostgreSQL).

WRITER = r"""
import asyncio, sys
from sessions_sql import SQLAlchemyBackend

async def main(url):
    async with SQLAlchemyBackend.from_url(url) as backend:
        i = 0
        while True:
            sid = f"d{i // 10}"
            if i % 3 == 2:
                await backend.write_values(sid, {f"k{i}": b"v%d" % i, f"k{i}-twin": b"t%d" % i})
            else:
                await backend.write_value(sid, f"k{i}", b"v%d" % i)
            print(i, flush=True)
            i += 1

asyncio.run(main(sys.argv[1]))
"""
KILL_AFTER = 40


def written_by(i: int) -> dict[tuple[str, str], bytes]:
    """The rows the writer's i-th call writes."""
    rows = {(f"d{i // 10}", f"k{i}"): b"v%d" % i}
    if i % 3 == 2:
        rows[(f"d{i // 10}", f"k{i}-twin")] = b"t%d" % i
    return rows


async def test_acknowledged_writes_survive_a_killed_writer(db_url: str, tmp_path: Path) -> None:
    """A child process writes values one by one with from_url (WAL mode on SQLite) and
    prints a line after each acknowledged write; the parent kills it with SIGKILL after
    KILL_AFTER lines, mid-stream. Every acknowledged write is in the database, nothing
    else but possibly the one call in flight, no value without its session, and the
    database works afterwards (and on SQLite passes its integrity check)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        WRITER,
        db_url,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
    )
    assert process.stdout is not None and process.stderr is not None
    acked: list[int] = []
    killed = False
    try:
        while len(acked) < KILL_AFTER:
            line = await guard(process.stdout.readline(), "the writer's next line")
            if not line:
                error = await process.stderr.read()
                pytest.fail(f"the writer died: {error.decode()}", pytrace=False)
            acked.append(int(line))
        # os.kill, not process.send_signal: that one polls first, and reaping the child
        # there would leave asyncio's child watcher an unknown pid (exit status 255).
        os.kill(process.pid, signal.SIGKILL)
        killed = True
        # Lines printed before the kill are acknowledgements too.
        acked += [int(line) for line in (await guard(process.stdout.read(), "EOF")).split()]
    finally:
        if not killed:
            process.kill()
        await guard(process.wait(), "the writer's end")
    assert process.returncode == -signal.SIGKILL
    assert acked == list(range(len(acked)))

    async with SQLAlchemyBackend.from_url(db_url) as backend:
        stored = await all_values(backend.engine)
        expected: dict[tuple[str, str], bytes] = {}
        for i in acked:
            expected |= written_by(i)
        missing = {k for k, v in expected.items() if stored.get(k) != v}
        assert not missing, f"acknowledged writes lost: {sorted(missing)[:5]}"
        in_flight = written_by(len(acked))
        extra = {k: v for k, v in stored.items() if k not in expected}
        assert extra in ({}, in_flight), "rows nobody acknowledged, or a partial write"
        sessions = set(await backend.get_sessions())
        assert sessions == {sid for sid, _ in stored}, "a session without values or vice versa"
        await backend.write_value("after", "k", b"v")
        assert await backend.read_value("after", "k") == b"v"
    if db_url.startswith("sqlite"):
        database = sqlite3.connect(make_url(db_url).database or "")
        try:
            assert database.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        finally:
            database.close()
