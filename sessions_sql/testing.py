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

Requires pytest and pytest-asyncio. The tests allow the backend's clock to differ from the
test process's clock by up to :attr:`BackendContract.clock_tolerance` seconds.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, ClassVar

import pytest

from ._protocol import SessionBackend

__all__ = ["BAD_INPUTS", "BackendContract"]

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
