"""Session, SessionManager and SessionCollector on every backend, with a controllable clock."""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import text

from sessions_sql import (
    BackendError,
    BulkRemoval,
    MemoryBackend,
    SessionBackend,
    SessionCollector,
    SessionError,
    SessionManager,
    SQLAlchemyBackend,
    decode_value,
    encode_value,
)

from .conftest import guard
from .pgproxy import counting_round_trips


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class ProtocolOnly:
    """Exposes only the six protocol methods of a backend (no batch removal)."""

    def __init__(self, inner: SessionBackend, failing: set[str] | None = None) -> None:
        self.inner = inner
        self.failing = failing or set()

    async def get_sessions(self) -> list[str]:
        return await self.inner.get_sessions()

    async def get_session_age(self, session_id: str) -> int | None:
        if session_id in self.failing:
            raise ConnectionError("simulated failure")
        return await self.inner.get_session_age(session_id)

    async def remove_session(self, session_id: str) -> None:
        await self.inner.remove_session(session_id)

    async def read_value(self, session_id: str, key: str) -> bytes | None:
        return await self.inner.read_value(session_id, key)

    async def write_value(self, session_id: str, key: str, value: bytes) -> None:
        await self.inner.write_value(session_id, key, value)

    async def remove_value(self, session_id: str, key: str) -> None:
        await self.inner.remove_value(session_id, key)


MISSING = object()


async def test_values_round_trip(any_backend: SessionBackend) -> None:
    session = SessionManager(any_backend).get_session("user-1")
    values: dict[str, Any] = {
        "dict": {"name": "Zoë", "tags": ["a", "b"], "n": None},
        "list": [1, 2.5, True, "x"],
        "text": "привет 🎉",
        "int": -(2**62),
        "none": None,
        "false": False,
    }
    for key, value in values.items():
        await session.set(key, value)
    for key, value in values.items():
        assert await session.get(key, MISSING) == value
    assert await session.get("missing") is None
    assert await session.get("missing", MISSING) is MISSING


async def test_stored_format_matches_the_original(any_backend: SessionBackend) -> None:
    clock = FakeClock(1_700_000_000.7)
    session = SessionManager(any_backend, clock=clock).get_session("s")
    await session.set("k", {"a": "ü", "b": [1, 2]})
    assert await any_backend.read_value("s", "k") == (
        '{"expires_at":null,"value":{"a":"ü","b":[1,2]}}'.encode()
    )
    await session.expire("k", 60)
    assert await any_backend.read_value("s", "k") == (
        b'{"expires_at":1700000060,"value":{"a":"\xc3\xbc","b":[1,2]}}'
    )


async def test_the_value_format_is_public(any_backend: SessionBackend) -> None:
    session = SessionManager(any_backend, clock=FakeClock(1000)).get_session("s")
    await session.set("k", ["ü", 1])
    await session.expire("k", 60)
    stored = await any_backend.read_value("s", "k")
    assert stored == encode_value(["ü", 1], 1060)
    assert decode_value(stored) == (1060, ["ü", 1])
    await any_backend.write_value("s", "mine", encode_value({"a": None}))
    assert await session.get("mine") == {"a": None}
    with pytest.raises(TypeError, match="JSON"):
        encode_value(b"bytes")
    with pytest.raises(SessionError, match="session format"):
        decode_value(b'{"expires_at":-1,"value":1}')


async def test_reads_the_original_format_leniently(any_backend: SessionBackend) -> None:
    session = SessionManager(any_backend, clock=FakeClock(1000)).get_session("s")
    await any_backend.write_value("s", "no-expiry", b'{"value":5,"extra":{"x":1}}')
    await any_backend.write_value("s", "later", b'{"extra":1,"value":"v","expires_at":2000}')
    assert await session.get("no-expiry") == 5
    assert await session.get("later") == "v"


async def test_expiry_is_strict_and_keeps_the_bytes(any_backend: SessionBackend) -> None:
    clock = FakeClock(1000)
    session = SessionManager(any_backend, clock=clock).get_session("s")
    await session.set("k", "v")
    await session.expire("k", 10)
    clock.now = 1010.9  # expires_at (1010) < now (1010) is false: still readable
    assert await session.get("k") == "v"
    clock.now = 1011
    assert await session.get("k", MISSING) is MISSING
    assert await any_backend.read_value("s", "k") is not None


async def test_set_keeps_an_unexpired_expiry_only(any_backend: SessionBackend) -> None:
    clock = FakeClock(1000)
    session = SessionManager(any_backend, clock=clock).get_session("s")
    await session.set("k", 1)
    await session.expire("k", 10)
    clock.now = 1005
    await session.set("k", 2)  # keeps expires_at 1010
    assert await session.get("k") == 2
    clock.now = 1011
    assert await session.get("k") is None
    await session.set("k", 3)  # over an expired value: no expiry
    clock.now = 10**9
    assert await session.get("k") == 3


async def test_expire(any_backend: SessionBackend) -> None:
    clock = FakeClock(1000)
    session = SessionManager(any_backend, clock=clock).get_session("s")
    await session.expire("missing", 10)
    assert await any_backend.get_sessions() == []  # creates nothing
    await session.set("k", "v")
    await session.expire("k", 0)
    clock.now = 1001
    assert await session.get("k") is None
    await session.expire("k", 5)  # revives an expired value
    assert await session.get("k") == "v"
    clock.now = 1007
    assert await session.get("k") is None
    with pytest.raises(ValueError, match="seconds"):
        await session.expire("k", -1)
    with pytest.raises(TypeError, match="seconds"):
        await session.expire("k", 1.5)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "stored",
    [b"not json", b"[1,2]", b'{"expires_at":null}', b'{"expires_at":"soon","value":1}', b"\xff"],
)
async def test_bytes_not_in_the_format_raise_session_error(
    any_backend: SessionBackend, stored: bytes
) -> None:
    session = SessionManager(any_backend).get_session("s")
    await any_backend.write_value("s", "secret-key-name", stored)
    for call in (session.get("secret-key-name"), session.set("secret-key-name", 1)):
        with pytest.raises(SessionError, match="session format") as raised:
            await call
        assert "secret-key-name" not in str(raised.value)
        assert raised.value.__cause__ is None
    with pytest.raises(SessionError, match="session format"):
        await session.expire("secret-key-name", 5)
    assert await any_backend.read_value("s", "secret-key-name") == stored


async def test_unstorable_values_are_refused_before_any_write(any_backend: SessionBackend) -> None:
    session = SessionManager(any_backend).get_session("s")
    for value in (object(), {1, 2}, float("nan"), b"bytes"):
        with pytest.raises(TypeError, match="JSON"):
            await session.set("k", value)
    with pytest.raises(ValueError, match="key"):
        await session.set("", 1)
    assert await any_backend.get_sessions() == []


async def test_remove_and_clear(any_backend: SessionBackend) -> None:
    manager = SessionManager(any_backend)
    session = manager.get_session("s")
    await session.set("a", 1)
    await session.set("b", 2)
    await session.remove("a")
    assert await session.get("a") is None
    assert await session.get("b") == 2
    assert await any_backend.get_sessions() == ["s"]
    await session.clear()
    assert await any_backend.get_sessions() == []
    assert await manager.get_session("s").get("b") is None


async def test_backend_failures_become_session_errors(sqlite_url: str) -> None:
    async with SQLAlchemyBackend.from_url(sqlite_url) as backend:  # not migrated
        session = SessionManager(backend).get_session("s")
        for call in (session.get("k"), session.set("k", 1), session.remove("k"), session.clear()):
            with pytest.raises(SessionError) as raised:
                await call
            assert isinstance(raised.value.__cause__, BackendError)


def test_manager_ids() -> None:
    manager = SessionManager(MemoryBackend())
    ids = {manager.new_session().id for _ in range(20_000)}
    assert len(ids) == 20_000
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{43}", sid) for sid in ids)
    session = manager.new_session()
    assert session.id not in repr(session)
    assert manager.get_session("chosen").id == "chosen"
    with pytest.raises(TypeError):
        manager.get_session(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        manager.get_session("")
    with pytest.raises(TypeError):
        SessionManager(object())  # type: ignore[arg-type]


async def test_get_session_writes_nothing(any_backend: SessionBackend) -> None:
    session = SessionManager(any_backend).new_session()
    assert await session.get("k") is None
    await session.remove("k")
    assert await any_backend.get_sessions() == []


# The collector.


def test_collector_refuses_bad_periods() -> None:
    backend = MemoryBackend()
    for period in (timedelta(0), timedelta(seconds=-1)):
        with pytest.raises(ValueError, match="period"):
            SessionCollector(backend, period=period, lifetime=timedelta(days=1))
    with pytest.raises(ValueError, match="lifetime"):
        SessionCollector(backend, period=timedelta(1), lifetime=timedelta(seconds=-1))
    with pytest.raises(TypeError, match="period"):
        SessionCollector(backend, period=300, lifetime=timedelta(1))  # type: ignore[arg-type]


@pytest.mark.parametrize("path", ["batched", "one by one"])
async def test_collector_removes_exactly_the_old_sessions(
    any_backend: SessionBackend, path: str
) -> None:
    backend: SessionBackend = any_backend if path == "batched" else ProtocolOnly(any_backend)
    for _ in range(10):  # both in one whole second (two writes may straddle a tick)
        for sid in ("a", "b"):
            await any_backend.write_value(sid, "k", b"v")
        created = await any_backend.get_session_age("a")
        assert created is not None
        if created == await any_backend.get_session_age("b"):
            break
        for sid in ("a", "b"):
            await any_backend.remove_session(sid)
    else:
        pytest.fail("ten pairs of writes each straddled a second")
    clock = FakeClock(0)
    lifetime = 3600
    collector = SessionCollector(
        backend, period=timedelta(minutes=5), lifetime=timedelta(seconds=lifetime), clock=clock
    )
    clock.now = created + lifetime - 0.5  # age lifetime - 1 in whole seconds
    assert await collector.collect() == 0
    assert sorted(await any_backend.get_sessions()) == ["a", "b"]
    clock.now = created + lifetime + 0.5  # age exactly lifetime
    assert await collector.collect() == 2
    assert await any_backend.get_sessions() == []
    assert await any_backend.read_value("a", "k") is None


class OwnBulkRemoval(ProtocolOnly):
    """A user's backend offering the bulk removal in its minimal shape: (cutoff) -> int."""

    def __init__(self, inner: MemoryBackend) -> None:
        super().__init__(inner)
        self.cutoffs: list[Any] = []

    async def remove_sessions_created_before(self, cutoff: Any) -> int:
        self.cutoffs.append(cutoff)
        return await self.inner.remove_sessions_created_before(cutoff)  # type: ignore[attr-defined, no-any-return]


async def test_collector_uses_a_minimal_bulk_removal() -> None:
    clock = FakeClock(1000)
    memory = MemoryBackend(clock=clock)
    await memory.write_value("old", "k", b"v")
    clock.now = 2000
    await memory.write_value("new", "k", b"v")
    backend = OwnBulkRemoval(memory)
    assert isinstance(backend, BulkRemoval)
    collector = SessionCollector(backend, timedelta(1), timedelta(seconds=500), clock=clock)
    assert await collector.collect() == 1
    assert backend.cutoffs == [1501]  # called with the cutoff only: no batch_size keyword
    assert await memory.get_sessions() == ["new"]


class WrongArguments(ProtocolOnly):
    async def remove_sessions_created_before(self, cutoff: Any, now: Any) -> int:
        raise AssertionError("never called")


class NotACoroutine(ProtocolOnly):
    def remove_sessions_created_before(self, cutoff: Any) -> int:
        raise AssertionError("never called")


class NotCallable(ProtocolOnly):
    remove_sessions_created_before = 5


@pytest.mark.parametrize(
    ("shape", "reason"),
    [(WrongArguments, "must accept \\(cutoff\\)"), (NotACoroutine, "must be a coroutine function")],
)
def test_collector_refuses_a_bulk_removal_of_another_shape(shape: type, reason: str) -> None:
    memory = MemoryBackend()
    with pytest.raises(TypeError, match=f"BulkRemoval: remove_sessions_created_before {reason}"):
        SessionCollector(shape(memory), timedelta(1), timedelta(seconds=1))


async def test_a_non_callable_attribute_is_not_a_bulk_removal() -> None:
    clock = FakeClock(0)
    memory = MemoryBackend(clock=clock)
    await memory.write_value("old", "k", b"v")
    clock.now = 100
    collector = SessionCollector(
        NotCallable(memory), timedelta(1), timedelta(seconds=1), clock=clock
    )
    assert await collector.collect() == 1  # through the six protocol methods


async def test_collector_refuses_a_bulk_removal_returning_no_count() -> None:
    class NoCount(ProtocolOnly):
        async def remove_sessions_created_before(self, cutoff: Any) -> None:
            return None

    collector = SessionCollector(NoCount(MemoryBackend()), timedelta(1), timedelta(seconds=1))
    with pytest.raises(TypeError, match="BulkRemoval"):
        await collector.collect()


async def test_collector_removes_old_and_expired_sessions_in_one_pass(
    any_backend: Any,
) -> None:
    await any_backend.write_value("old", "k", b"v")
    created = await any_backend.get_session_age("old")
    now = created + 100
    await any_backend.write_value("expired", "k", b"v", expires_at=now - 1)
    await any_backend.write_value("expiring", "k", b"v", expires_at=now)  # not before now
    await any_backend.write_value("idle-but-young", "k", b"v", expires_at=now + 50)
    clock = FakeClock(now + 0.5)
    # Everything was created within the last 100 seconds: a lifetime of 1000 removes none.
    both = SessionCollector(any_backend, timedelta(1), timedelta(seconds=1000), clock=clock)
    assert await both.collect() == 1
    assert "expired" not in await any_backend.get_sessions()
    expiry_only = SessionCollector(any_backend, timedelta(1), clock=clock)  # no lifetime
    clock.now = now + 1
    assert await expiry_only.collect() == 1
    assert sorted(await any_backend.get_sessions()) == ["idle-but-young", "old"]
    clock.now = created + 1000
    assert await both.collect() == 2  # old by lifetime, idle-but-young by expiry
    assert await any_backend.get_sessions() == []


def test_an_expiry_only_collector_needs_session_expiry() -> None:
    with pytest.raises(ValueError, match="nothing to collect"):
        SessionCollector(ProtocolOnly(MemoryBackend()), timedelta(1))
    assert "lifetime=None" in repr(SessionCollector(MemoryBackend(), timedelta(1)))


async def test_collector_passes_no_batch_size_to_a_minimal_expiry_removal() -> None:
    calls: list[Any] = []

    class OwnExpiry(ProtocolOnly):
        async def set_session_expiry(self, session_id: str, expires_at: Any) -> None: ...
        async def get_session_expiry(self, session_id: str) -> int | None: ...
        async def read_session(self, session_id: str) -> Any: ...
        async def update_session(self, session_id: str, values: Any = None, **kw: Any) -> None: ...

        async def remove_expired_sessions(self, now: Any = None) -> int:
            calls.append(now)
            return 3

    collector = SessionCollector(OwnExpiry(MemoryBackend()), timedelta(1), clock=FakeClock(77.5))
    assert await collector.collect() == 3
    assert calls == [77]


@pytest.mark.parametrize("protocol_only", [False, True])
async def test_creation_in_the_future_counts_as_age_zero(protocol_only: bool) -> None:
    clock = FakeClock(5000)
    memory = MemoryBackend(clock=clock)
    backend: SessionBackend = ProtocolOnly(memory) if protocol_only else memory
    await memory.write_value("s", "k", b"v")
    clock.now = 4000  # the session was created "in the future"
    keep = SessionCollector(backend, timedelta(1), lifetime=timedelta(seconds=1), clock=clock)
    assert await keep.collect() == 0
    remove_all = SessionCollector(backend, timedelta(1), lifetime=timedelta(0), clock=clock)
    assert await remove_all.collect() == 1


async def test_collector_skips_a_failing_session_and_logs_no_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    memory = MemoryBackend(clock=FakeClock(0))
    failing_id = "failing-secret-id"
    for sid in ("x", failing_id, "y"):
        await memory.write_value(sid, "k", b"v")
    backend = ProtocolOnly(memory, failing={failing_id})
    collector = SessionCollector(backend, timedelta(1), timedelta(seconds=10), clock=FakeClock(99))
    with caplog.at_level(logging.DEBUG, logger="sessions_sql"):
        assert await collector.collect() == 2
    assert await memory.get_sessions() == [failing_id]
    assert any("skipped a session" in r.getMessage() for r in caplog.records)
    assert all(failing_id not in r.getMessage() for r in caplog.records)


async def test_run_collects_until_stopped() -> None:
    clock = FakeClock(0)
    memory = MemoryBackend(clock=clock)
    await memory.write_value("old", "k", b"v")
    clock.now = 100
    collector = SessionCollector(memory, timedelta(hours=1), timedelta(seconds=10), clock=clock)
    task = asyncio.create_task(collector.run())
    while await memory.get_sessions():  # the first pass runs at once
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    assert not task.done()  # waiting for the next period
    collector.stop()
    await guard(task, "the stopped collector")
    # A stopped collector's run() returns at once.
    await guard(collector.run(), "a stopped collector's run()")


async def test_run_survives_a_failed_pass(
    sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with SQLAlchemyBackend.from_url(sqlite_url) as backend:  # not migrated: passes fail
        collector = SessionCollector(backend, timedelta(seconds=0.01), timedelta(seconds=1))
        task = asyncio.create_task(collector.run())
        while len([r for r in caplog.records if "collection failed" in r.getMessage()]) < 2:
            await asyncio.sleep(0.01)
        collector.stop()
        await guard(task, "the stopped collector")


async def test_collector_statements_grow_with_batches_not_sessions(postgres_url: str) -> None:
    """A pass over 100,000 expired sessions costs one round trip per batch (on the wire)."""
    async with (
        counting_round_trips(postgres_url) as (proxy, proxied),
        SQLAlchemyBackend.from_url(proxied, pool_size=1, max_overflow=0) as backend,
    ):
        async with backend.engine.begin() as conn:
            await conn.execute(text("TRUNCATE sessions, session_values"))
            await conn.execute(
                text(
                    "INSERT INTO sessions (id, created_at) SELECT 'old-' || i, "
                    "now() - interval '30 days' FROM generate_series(1, 100000) AS i"
                )
            )
            await conn.execute(
                text(
                    "INSERT INTO session_values (session_id, key, value) "
                    "SELECT 'old-' || i, 'k', '\\x00'::bytea FROM generate_series(1, 100000) AS i"
                )
            )
        await backend.write_value("live", "k", b"v")
        collector = SessionCollector(
            backend, timedelta(minutes=5), timedelta(days=7), batch_size=5000
        )
        before = proxy.round_trips
        assert await collector.collect() == 100_000
        # 20 full batches, one that finds nothing left, and asyncpg preparing the DELETE.
        batches = math.ceil(100_000 / 5000) + 1
        assert batches <= proxy.round_trips - before <= batches + 1
        assert await backend.get_sessions() == ["live"]


def test_clock_default_is_wall_time() -> None:
    session = SessionManager(MemoryBackend()).get_session("s")
    assert abs(session._clock() - time.time()) < 60
