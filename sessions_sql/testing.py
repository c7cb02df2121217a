"""A reusable pytest suite of the session protocol's semantics.

Subclass :class:`BackendContract` in a test module and provide an async fixture named
``backend`` that yields a fresh, empty backend::

    import pytest
    from sessions_sql import MemoryBackend
    from sessions_sql.testing import BackendContract

    class TestMyBackend(BackendContract):
        @pytest.fixture
        async def backend(self):
            yield MemoryBackend()

A backend that implements an optional extension proves it by adding that extension's class
to the bases, beside :class:`BackendContract`::

    class TestMyBackend(BackendContract, BulkRemovalContract, BatchValuesContract):
        ...

Requires pytest and pytest-asyncio. The tests allow the backend's clock to differ from the
test process's clock by up to :attr:`BackendContract.clock_tolerance` seconds.
"""

from __future__ import annotations

import asyncio
import os
import time
from datetime import datetime, timezone
from typing import Any, ClassVar

import pytest

from ._protocol import (
    BatchValues,
    BulkRemoval,
    SessionBackend,
    SessionExpiry,
    SessionListing,
    SessionSnapshot,
    check_extension,
)

__all__ = [
    "BAD_INPUTS",
    "BackendContract",
    "BatchValuesContract",
    "BulkRemovalContract",
    "SessionExpiryContract",
    "SessionListingContract",
]

_SID = "contract-session"

#: Refused inputs: (method name, arguments, expected exception type, the parameter its
#: message names). Ids, keys and values are passed positionally in the protocol's order.
BAD_INPUTS: list[tuple[str, tuple[Any, ...], type[Exception], str]] = [
    ("read_value", (None, "k"), TypeError, "session_id"),
    ("read_value", (42, "k"), TypeError, "session_id"),
    ("read_value", (b"sid", "k"), TypeError, "session_id"),
    ("read_value", ("", "k"), ValueError, "session_id"),
    ("read_value", ("s" * 256, "k"), ValueError, "session_id"),
    ("read_value", ("s\x00id", "k"), ValueError, "session_id"),
    ("read_value", ("s\udc80", "k"), ValueError, "session_id"),
    ("read_value", ("sid", None), TypeError, "key"),
    ("read_value", ("sid", 7), TypeError, "key"),
    ("read_value", ("sid", ""), ValueError, "key"),
    ("read_value", ("sid", "k" * 256), ValueError, "key"),
    ("read_value", ("sid", "k\x00"), ValueError, "key"),
    ("write_value", ("sid", "k", "text"), TypeError, "value"),
    ("write_value", ("sid", "k", None), TypeError, "value"),
    ("write_value", ("sid", "k", 5), TypeError, "value"),
    ("write_value", ("sid", "k", [1, 2]), TypeError, "value"),
    ("write_value", (None, "k", b"v"), TypeError, "session_id"),
    ("write_value", ("", "k", b"v"), ValueError, "session_id"),
    ("write_value", ("sid", "", b"v"), ValueError, "key"),
    ("write_value", ("sid", "k\udcff", b"v"), ValueError, "key"),
    ("remove_value", (1.5, "k"), TypeError, "session_id"),
    ("remove_value", ("sid", ""), ValueError, "key"),
    ("remove_session", (None,), TypeError, "session_id"),
    ("remove_session", ("",), ValueError, "session_id"),
    ("remove_session", ("x" * 300,), ValueError, "session_id"),
    ("get_session_age", (None,), TypeError, "session_id"),
    ("get_session_age", ("\x00",), ValueError, "session_id"),
]


@pytest.mark.asyncio
class BackendContract:
    """The semantics every :class:`~sessions_sql.SessionBackend` must have.

    Subclasses provide an async ``backend`` fixture yielding a fresh, empty backend.
    """

    #: Allowed difference, in seconds, between the backend's clock and ``time.time()``.
    clock_tolerance: ClassVar[float] = 5.0

    async def test_is_a_session_backend(self, backend: SessionBackend) -> None:
        assert isinstance(backend, SessionBackend)

    async def test_missing_session_reads_as_nothing(self, backend: SessionBackend) -> None:
        assert await backend.get_sessions() == []
        assert await backend.get_session_age(_SID) is None
        assert await backend.read_value(_SID, "key") is None

    async def test_write_then_read(self, backend: SessionBackend) -> None:
        await backend.write_value(_SID, "key", b"value")
        assert await backend.read_value(_SID, "key") == b"value"
        assert await backend.read_value(_SID, "other") is None
        assert await backend.read_value("another-session", "key") is None

    async def test_write_replaces_value(self, backend: SessionBackend) -> None:
        await backend.write_value(_SID, "key", b"first")
        await backend.write_value(_SID, "key", b"second")
        assert await backend.read_value(_SID, "key") == b"second"

    async def test_sessions_are_independent(self, backend: SessionBackend) -> None:
        await backend.write_value("a", "key", b"of a")
        await backend.write_value("b", "key", b"of b")
        await backend.remove_session("a")
        assert await backend.read_value("a", "key") is None
        assert await backend.read_value("b", "key") == b"of b"

    async def test_creation_time_is_a_unix_timestamp(self, backend: SessionBackend) -> None:
        before = time.time()
        await backend.write_value(_SID, "key", b"v")
        after = time.time()
        created = await backend.get_session_age(_SID)
        assert type(created) is int
        assert before - self.clock_tolerance - 1 <= created <= after + self.clock_tolerance

    async def test_creation_time_is_set_once_and_renewed_by_recreation(
        self, backend: SessionBackend
    ) -> None:
        await backend.write_value(_SID, "a", b"1")
        created = await backend.get_session_age(_SID)
        await asyncio.sleep(1.1)  # creation times count in whole seconds
        await backend.write_value(_SID, "a", b"2")
        await backend.write_value(_SID, "b", b"3")
        await backend.remove_value(_SID, "a")
        await backend.remove_value(_SID, "b")
        assert await backend.get_session_age(_SID) == created

        await backend.remove_session(_SID)
        assert await backend.get_session_age(_SID) is None
        await backend.write_value(_SID, "a", b"4")
        recreated = await backend.get_session_age(_SID)
        assert recreated is not None and created is not None and recreated > created

    async def test_remove_value_keeps_the_session(self, backend: SessionBackend) -> None:
        await backend.write_value(_SID, "a", b"1")
        await backend.write_value(_SID, "b", b"2")
        created = await backend.get_session_age(_SID)
        await backend.remove_value(_SID, "a")
        assert await backend.read_value(_SID, "a") is None
        assert await backend.read_value(_SID, "b") == b"2"
        await backend.remove_value(_SID, "b")
        assert await backend.get_sessions() == [_SID]
        assert await backend.get_session_age(_SID) == created

    async def test_removing_missing_things_creates_nothing(self, backend: SessionBackend) -> None:
        await backend.remove_value(_SID, "key")
        await backend.remove_session(_SID)
        await backend.write_value("other", "key", b"v")
        await backend.remove_value("other", "missing")
        assert await backend.get_sessions() == ["other"]
        assert await backend.get_session_age(_SID) is None

    async def test_remove_session_removes_its_values(self, backend: SessionBackend) -> None:
        await backend.write_value(_SID, "a", b"1")
        await backend.write_value(_SID, "b", b"2")
        await backend.remove_session(_SID)
        assert await backend.get_sessions() == []
        assert await backend.read_value(_SID, "a") is None
        await backend.write_value(_SID, "c", b"3")
        assert await backend.read_value(_SID, "a") is None
        assert await backend.read_value(_SID, "b") is None
        assert await backend.read_value(_SID, "c") == b"3"

    async def test_get_sessions_lists_every_session(self, backend: SessionBackend) -> None:
        ids = [f"session-{i}" for i in range(20)]
        for sid in ids:
            await backend.write_value(sid, "k", b"v")
        await backend.remove_value(ids[0], "k")  # empty sessions are still listed
        assert sorted(await backend.get_sessions()) == sorted(ids)

    async def test_values_round_trip_byte_exact(self, backend: SessionBackend) -> None:
        values: dict[str, Any] = {
            "empty": b"",
            "all-bytes": bytes(range(256)),
            "nul": b"\x00\x00",
            "bytearray": bytearray(b"from a bytearray"),
            "memoryview": memoryview(b"--from a memoryview--")[2:-2],
            "large": os.urandom(3 * 1024 * 1024 + 7),
        }
        for key, value in values.items():
            await backend.write_value(_SID, key, value)
        for key, value in values.items():
            stored = await backend.read_value(_SID, key)
            assert type(stored) is bytes
            assert stored == bytes(value)

    async def test_unicode_and_sql_looking_names(self, backend: SessionBackend) -> None:
        names = [
            "пользователь-42",
            "-1001234567-42",
            "emoji 🎉 key",
            "'; DROP TABLE sessions; --",
            "a" * 255,
            "%s %(x)s ? :sid $1",
        ]
        for name in names:
            await backend.write_value(name, name, name.encode())
        assert sorted(await backend.get_sessions()) == sorted(names)
        for name in names:
            assert await backend.read_value(name, name) == name.encode()

    @pytest.mark.parametrize(("method", "args", "error", "parameter"), BAD_INPUTS)
    async def test_bad_input_is_refused_and_changes_nothing(
        self,
        backend: SessionBackend,
        method: str,
        args: tuple[Any, ...],
        error: type[Exception],
        parameter: str,
    ) -> None:
        await backend.write_value("sid", "k", b"kept")
        with pytest.raises(error, match=parameter):
            await getattr(backend, method)(*args)
        assert await backend.get_sessions() == ["sid"]
        assert await backend.read_value("sid", "k") == b"kept"

    async def test_concurrent_first_writes_create_one_session(
        self, backend: SessionBackend
    ) -> None:
        keys = [f"key-{i}" for i in range(64)]
        await asyncio.gather(*(backend.write_value(_SID, k, k.encode()) for k in keys))
        assert await backend.get_sessions() == [_SID]
        for key in keys:
            assert await backend.read_value(_SID, key) == key.encode()

    async def test_concurrent_writers_of_one_key(self, backend: SessionBackend) -> None:
        written = [bytes([i]) * 1000 for i in range(32)]
        await asyncio.gather(*(backend.write_value(_SID, "key", v) for v in written))
        assert await backend.read_value(_SID, "key") in written

    async def test_writes_racing_removal(self, backend: SessionBackend) -> None:
        async def writer(n: int) -> None:
            for i in range(15):
                await backend.write_value(_SID, f"w{n}", str(i).encode())

        async def remover() -> None:
            for _ in range(15):
                await backend.remove_session(_SID)
                await asyncio.sleep(0)

        await asyncio.gather(remover(), *(writer(n) for n in range(8)))
        await backend.write_value(_SID, "final", b"1")
        assert await backend.read_value(_SID, "final") == b"1"
        assert _SID in await backend.get_sessions()


async def _next_second(backend: SessionBackend, session_id: str) -> int:
    """Wait until a session created now would get a later creation time than ``session_id``
    (creation times count in whole seconds); return that session's creation time."""
    created = await backend.get_session_age(session_id)
    assert created is not None
    await asyncio.sleep(max(0.0, created + 1 - time.time()) + 0.05)
    return created


@pytest.mark.asyncio
class BulkRemovalContract:
    """Opt-in semantics of :class:`~sessions_sql.BulkRemoval`, for a backend implementing it.

    Needs the same ``backend`` fixture as :class:`BackendContract`.
    """

    async def test_implements_bulk_removal(self, backend: Any) -> None:
        assert isinstance(backend, BulkRemoval)
        assert check_extension(backend, BulkRemoval)

    async def test_removes_exactly_the_sessions_created_before(self, backend: Any) -> None:
        await backend.write_value("old", "k", b"1")
        old = await _next_second(backend, "old")
        await backend.write_value("new", "k", b"2")
        await backend.remove_value("new", "k")  # an empty session is still a session
        new = await backend.get_session_age("new")
        assert new is not None and new > old
        assert await backend.remove_sessions_created_before(old) == 0  # strictly before
        assert sorted(await backend.get_sessions()) == ["new", "old"]
        assert await backend.remove_sessions_created_before(new) == 1
        assert await backend.get_sessions() == ["new"]
        assert await backend.read_value("old", "k") is None
        await backend.write_value("old", "k", b"3")  # a new session, without the old values
        assert await backend.read_value("old", "k") == b"3"
        cutoff = datetime.fromtimestamp(new + 1, timezone.utc)  # an aware datetime works too
        assert await backend.remove_sessions_created_before(cutoff) >= 1
        assert "new" not in await backend.get_sessions()

    async def test_nothing_to_remove(self, backend: Any) -> None:
        assert await backend.remove_sessions_created_before(time.time() + 3600) == 0
        await backend.write_value(_SID, "k", b"v")
        assert await backend.remove_sessions_created_before(0) == 0
        assert await backend.read_value(_SID, "k") == b"v"


@pytest.mark.asyncio
class BatchValuesContract:
    """Opt-in semantics of :class:`~sessions_sql.BatchValues`, for a backend implementing it.

    Needs the same ``backend`` fixture as :class:`BackendContract`.
    """

    async def test_implements_batch_values(self, backend: Any) -> None:
        assert isinstance(backend, BatchValues)
        assert check_extension(backend, BatchValues)

    async def test_write_read_and_remove_values(self, backend: Any) -> None:
        assert await backend.read_values(_SID) == {}
        await backend.write_values(_SID, {"a": b"1", "b": bytearray(b"2"), "c": b""})
        assert await backend.read_values(_SID) == {"a": b"1", "b": b"2", "c": b""}
        assert await backend.read_value(_SID, "b") == b"2"
        await backend.write_values(_SID, {"a": b"one", "d": b"4"})
        assert await backend.read_values(_SID) == {"a": b"one", "b": b"2", "c": b"", "d": b"4"}
        await backend.remove_values(_SID, ["a", "missing", "c"])
        assert await backend.read_values(_SID) == {"b": b"2", "d": b"4"}
        await backend.remove_values(_SID, iter(["b", "d"]))
        assert await backend.read_values(_SID) == {}
        assert await backend.get_sessions() == [_SID]  # removing values keeps the session

    async def test_empty_batches_create_nothing(self, backend: Any) -> None:
        await backend.write_values(_SID, {})
        await backend.remove_values(_SID, [])
        await backend.remove_values(_SID, ["k"])
        assert await backend.get_sessions() == []

    async def test_write_values_creates_the_session_once(self, backend: Any) -> None:
        await backend.write_values(_SID, {"a": b"1"})
        created = await _next_second(backend, _SID)
        await backend.write_values(_SID, {"b": b"2"})
        assert await backend.get_session_age(_SID) == created

    async def test_concurrent_batches_of_other_keys_all_survive(self, backend: Any) -> None:
        await asyncio.gather(
            *(backend.write_values(_SID, {f"k{n}": b"%d" % n, f"j{n}": b"j"}) for n in range(32))
        )
        stored = await backend.read_values(_SID)
        assert stored == {
            **{f"k{n}": b"%d" % n for n in range(32)},
            **{f"j{n}": b"j" for n in range(32)},
        }

    async def test_bad_batches_are_refused(self, backend: Any) -> None:
        await backend.write_value(_SID, "k", b"kept")
        for bad, error, name in [
            (["not", "a", "mapping"], TypeError, "values"),
            ({"k": "text"}, TypeError, "values"),
            ({"": b"v"}, ValueError, "key"),
        ]:
            with pytest.raises(error, match=name):
                await backend.write_values(_SID, bad)
        for bad_keys, error, name in [("k", TypeError, "keys"), ([""], ValueError, "key")]:
            with pytest.raises(error, match=name):
                await backend.remove_values(_SID, bad_keys)
        assert await backend.read_values(_SID) == {"k": b"kept"}


@pytest.mark.asyncio
class SessionListingContract:
    """Opt-in semantics of :class:`~sessions_sql.SessionListing`, for a backend implementing
    it. Needs the same ``backend`` fixture as :class:`BackendContract`."""

    async def test_implements_session_listing(self, backend: Any) -> None:
        assert isinstance(backend, SessionListing)
        assert check_extension(backend, SessionListing)

    async def test_iter_sessions_yields_each_session_once(self, backend: Any) -> None:
        assert [sid async for sid in backend.iter_sessions()] == []
        ids = [f"s{n:02}" for n in range(10)]
        for sid in ids:
            await backend.write_value(sid, "k", b"v")
        for batch_size in (1, 3, 10, 1000):
            listed = [sid async for sid in backend.iter_sessions(batch_size)]
            assert sorted(listed) == ids
        with pytest.raises(ValueError, match="batch_size"):
            [sid async for sid in backend.iter_sessions(0)]


#: Refused expiries: (value, exception type).
BAD_EXPIRIES: list[tuple[Any, type[Exception]]] = [
    (True, TypeError),
    (1.5, TypeError),
    ("2030-01-01", TypeError),
    (-1, ValueError),
    (10**13, ValueError),
    (datetime(2030, 1, 1), ValueError),  # naive
]


@pytest.mark.asyncio
class SessionExpiryContract:
    """Opt-in semantics of :class:`~sessions_sql.SessionExpiry`, for a backend implementing
    it. Needs the same ``backend`` fixture as :class:`BackendContract`."""

    async def test_implements_session_expiry(self, backend: Any) -> None:
        assert isinstance(backend, SessionExpiry)
        assert check_extension(backend, SessionExpiry)

    async def test_a_new_session_has_no_expiry(self, backend: Any) -> None:
        assert await backend.get_session_expiry(_SID) is None
        await backend.write_value(_SID, "k", b"v")
        assert await backend.get_session_expiry(_SID) is None

    async def test_set_get_and_clear_the_expiry(self, backend: Any) -> None:
        await backend.write_value(_SID, "k", b"v")
        await backend.set_session_expiry(_SID, 2_000_000_000)
        assert await backend.get_session_expiry(_SID) == 2_000_000_000
        moment = datetime(2031, 5, 6, 7, 8, 9, 999_999, tzinfo=timezone.utc)
        await backend.set_session_expiry(_SID, moment)  # whole seconds, rounded down
        assert await backend.get_session_expiry(_SID) == int(moment.timestamp())
        await backend.write_value(_SID, "k", b"w")  # a write without expires_at keeps it
        assert await backend.get_session_expiry(_SID) == int(moment.timestamp())
        await backend.set_session_expiry(_SID, None)
        assert await backend.get_session_expiry(_SID) is None
        assert await backend.read_value(_SID, "k") == b"w"

    async def test_writes_set_the_expiry_in_the_same_call(self, backend: Any) -> None:
        await backend.write_value(_SID, "a", b"1", expires_at=2_000_000_000)
        assert await backend.get_session_expiry(_SID) == 2_000_000_000
        await backend.write_values(_SID, {"b": b"2"}, expires_at=2_000_000_100)
        assert await backend.get_session_expiry(_SID) == 2_000_000_100
        await backend.write_values(_SID, {"c": b"3"})
        assert await backend.get_session_expiry(_SID) == 2_000_000_100
        await backend.write_value(_SID, "a", b"4", expires_at=None)
        assert await backend.get_session_expiry(_SID) is None
        assert await backend.read_values(_SID) == {"a": b"4", "b": b"2", "c": b"3"}

    async def test_setting_an_expiry_never_creates_a_session(self, backend: Any) -> None:
        await backend.set_session_expiry(_SID, 2_000_000_000)
        await backend.update_session(_SID, remove=["k"], expires_at=2_000_000_000)
        await backend.update_session(_SID, {}, expires_at=None)
        await backend.write_values(_SID, {}, expires_at=2_000_000_000)
        assert await backend.get_sessions() == []
        assert await backend.get_session_expiry(_SID) is None
        assert await backend.read_session(_SID) is None

    async def test_read_session(self, backend: Any) -> None:
        assert await backend.read_session(_SID) is None
        await backend.write_values(_SID, {"a": b"1", "b": b"", "c": bytes(range(256))})
        snapshot = await backend.read_session(_SID)
        assert isinstance(snapshot, SessionSnapshot)
        assert snapshot.created_at == await backend.get_session_age(_SID)
        assert type(snapshot.created_at) is int
        assert snapshot.expires_at is None
        assert snapshot.values == {"a": b"1", "b": b"", "c": bytes(range(256))}
        assert all(type(value) is bytes for value in snapshot.values.values())
        await backend.remove_values(_SID, ["a", "b", "c"])
        await backend.set_session_expiry(_SID, 2_000_000_000)
        empty = await backend.read_session(_SID)
        assert empty == SessionSnapshot(snapshot.created_at, 2_000_000_000, {})

    async def test_update_session_writes_removes_and_sets_the_expiry(self, backend: Any) -> None:
        await backend.update_session(_SID, {"a": b"1", "b": b"2", "c": b"3"})
        created = await backend.get_session_age(_SID)
        await backend.update_session(
            _SID, {"a": b"one", "d": b"4"}, remove=["b", "missing"], expires_at=2_000_000_000
        )
        snapshot = await backend.read_session(_SID)
        assert snapshot == SessionSnapshot(
            created, 2_000_000_000, {"a": b"one", "c": b"3", "d": b"4"}
        )
        await backend.update_session(_SID, remove=["a", "c", "d"])  # the session stays
        assert await backend.read_session(_SID) == SessionSnapshot(created, 2_000_000_000, {})
        await backend.update_session(_SID, expires_at=None)
        assert await backend.get_session_expiry(_SID) is None
        await backend.update_session(_SID)  # nothing to do
        assert await backend.get_sessions() == [_SID]

    async def test_update_session_refuses_a_key_both_written_and_removed(
        self, backend: Any
    ) -> None:
        await backend.write_value(_SID, "k", b"kept")
        with pytest.raises(ValueError, match="both written and removed"):
            await backend.update_session(_SID, {"k": b"new"}, remove=["k"])
        with pytest.raises(TypeError, match="remove"):
            await backend.update_session(_SID, remove="k")
        assert await backend.read_values(_SID) == {"k": b"kept"}

    async def test_concurrent_updates_of_other_keys_all_survive(self, backend: Any) -> None:
        await backend.write_values(_SID, {f"old{n}": b"x" for n in range(16)})
        await asyncio.gather(
            *(
                backend.update_session(
                    _SID, {f"new{n}": b"%d" % n}, remove=[f"old{n}"], expires_at=2_000_000_000 + n
                )
                for n in range(16)
            )
        )
        assert await backend.read_values(_SID) == {f"new{n}": b"%d" % n for n in range(16)}
        assert 2_000_000_000 <= await backend.get_session_expiry(_SID) < 2_000_000_016

    async def test_remove_expired_sessions(self, backend: Any) -> None:
        now = 2_000_000_000
        await backend.write_value("past", "k", b"v", expires_at=now - 1)
        await backend.write_value("long-past", "k", b"v", expires_at=1)
        await backend.write_value("now", "k", b"v", expires_at=now)  # not yet: strictly less
        await backend.write_value("future", "k", b"v", expires_at=now + 1)
        await backend.write_value("never", "k", b"v")
        # The protocol's methods do not look at the expiry: expired sessions are still there.
        assert await backend.read_value("past", "k") == b"v"
        assert len(await backend.get_sessions()) == 5
        assert await backend.remove_expired_sessions(now + 0.9) == 2
        assert sorted(await backend.get_sessions()) == ["future", "never", "now"]
        assert await backend.read_value("past", "k") is None
        later = datetime.fromtimestamp(now + 2, timezone.utc)
        assert await backend.remove_expired_sessions(later) == 2
        assert await backend.get_sessions() == ["never"]
        assert await backend.remove_expired_sessions() == 0  # default: the current time
        await backend.write_value("past", "k", b"new")  # a new session, without an expiry
        assert await backend.get_session_expiry("past") is None

    @pytest.mark.parametrize(("bad", "error"), BAD_EXPIRIES)
    async def test_bad_expiries_are_refused_and_change_nothing(
        self, backend: Any, bad: Any, error: type[Exception]
    ) -> None:
        await backend.write_value(_SID, "k", b"kept", expires_at=2_000_000_000)
        calls = [
            backend.set_session_expiry(_SID, bad),
            backend.write_value(_SID, "k", b"new", expires_at=bad),
            backend.write_values(_SID, {"k": b"new"}, expires_at=bad),
            backend.update_session(_SID, {"k": b"new"}, expires_at=bad),
            backend.update_session("other", {"k": b"new"}, expires_at=bad),
        ]
        for call in calls:
            with pytest.raises(error, match="expires_at"):
                await call
        assert await backend.read_session(_SID) == SessionSnapshot(
            await backend.get_session_age(_SID), 2_000_000_000, {"k": b"kept"}
        )
        assert await backend.get_sessions() == [_SID]

    @pytest.mark.parametrize(
        ("bad", "error"),
        [
            (True, TypeError),
            ("now", TypeError),
            (-5, ValueError),
            (datetime(2030, 1, 1), ValueError),
        ],
    )
    async def test_bad_now_is_refused(self, backend: Any, bad: Any, error: type[Exception]) -> None:
        await backend.write_value(_SID, "k", b"v", expires_at=1)
        with pytest.raises(error, match="now"):
            await backend.remove_expired_sessions(bad)
        assert await backend.get_sessions() == [_SID]
