"""aiogram 3 FSM storage and event isolation on sessions_sql.

``SQLStorage`` keeps each FSM key (chat, user, bot, destiny...) as one sessions_sql session:
the state under the key ``state``, every data key ``k`` as its own value ``data:k``, so that
``update_data`` writes only the keys it changes, in one atomic statement, and concurrent
updates of one key never lose each other's keys. Values are the session layer's JSON
(``{"expires_at":...,"value":...}``). Install with ``pip install 'sessions-sql[aiogram]'``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from aiogram.exceptions import DataNotDictLikeError
from aiogram.fsm.state import State
from aiogram.fsm.storage.base import (
    BaseEventIsolation,
    BaseStorage,
    DefaultKeyBuilder,
    KeyBuilder,
    StateType,
    StorageKey,
)
from sqlalchemy import TextClause, text

from sessions_sql import (
    KEEP,
    BackendError,
    BatchValues,
    SessionExpiry,
    SQLAlchemyBackend,
    check_extension,
    decode_value,
    encode_value,
)

__all__ = ["SQLEventIsolation", "SQLStorage"]

#: The value holding the state.
STATE = "state"
#: The value holding the data's expiry (written only with a ``data_ttl``).
DATA = "data"
#: Each data key ``k`` is the value ``data:k``.
DATA_PREFIX = "data:"

_MAX_KEY = 255  # the package's longest key


def _ttl(name: str, ttl: object) -> int | None:
    """A TTL as whole seconds (an int or a timedelta, at least one second), or None."""
    if ttl is None:
        return None
    if isinstance(ttl, timedelta):
        seconds = int(ttl.total_seconds())
    elif isinstance(ttl, int) and not isinstance(ttl, bool):
        seconds = ttl
    else:
        raise TypeError(f"{name} must be an int (seconds), a timedelta or None, not {type(ttl)}")
    if seconds < 1:
        raise ValueError(f"{name} must be at least one second")
    return seconds


def _decode(data: bytes, now: int) -> tuple[bool, Any]:
    """``(live, value)`` of a stored value: ``live`` is False once its expiry has passed."""
    expires_at, value = decode_value(data)
    return expires_at is None or expires_at >= now, value


def _json_name(key: object) -> str:
    """A data key as JSON names it (``1`` -> ``"1"``, ``True`` -> ``"true"``), as the data
    reads back."""
    if isinstance(key, str):
        return key
    if key is None or isinstance(key, (int, float)):
        return json.dumps(key)
    raise TypeError(f"FSM data keys must be str, not {type(key).__name__}")


def _data_key(key: object) -> str:
    """The value name of a data key."""
    name = DATA_PREFIX + _json_name(key)
    if len(name) > _MAX_KEY or "\x00" in name:
        raise ValueError(
            f"FSM data keys must have at most {_MAX_KEY - len(DATA_PREFIX)} characters and no NUL"
        )
    return name


def _encode_data(data: Mapping[Any, Any]) -> dict[str, bytes]:
    return {_data_key(key): encode_value(value) for key, value in data.items()}


def _state_name(state: StateType) -> str | None:
    name = state.state if isinstance(state, State) else state
    if name is not None and not isinstance(name, str):
        raise TypeError(f"state must be a str, a State or None, not {type(name).__name__}")
    return name


class SQLStorage(BaseStorage):
    """aiogram FSM storage in the sessions_sql tables of the bot's SQL database.

    ``backend`` is a :class:`~sessions_sql.SQLAlchemyBackend` (or any backend implementing
    ``SessionExpiry`` and ``BatchValues``, such as ``MemoryBackend``). The default key builder
    includes the bot id, the business connection id and the destiny, so several bots and
    scenes share one database. ``state_ttl`` / ``data_ttl`` (seconds or a ``timedelta``) make
    the state / the data read as missing that long after they were last written, as
    aiogram's ``RedisStorage`` does. ``clock`` (Unix seconds) is for tests.
    """

    def __init__(
        self,
        backend: Any,
        key_builder: KeyBuilder | None = None,
        state_ttl: int | timedelta | None = None,
        data_ttl: int | timedelta | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        for protocol in (SessionExpiry, BatchValues):
            if not check_extension(backend, protocol):
                raise TypeError(
                    f"backend must implement sessions_sql.{protocol.__name__}, "
                    f"which {type(backend).__name__} does not"
                )
        if key_builder is not None and not isinstance(key_builder, KeyBuilder):
            raise TypeError(f"key_builder must be a KeyBuilder, not {type(key_builder).__name__}")
        self.backend = backend
        self.key_builder = key_builder or DefaultKeyBuilder(
            with_bot_id=True, with_business_connection_id=True, with_destiny=True
        )
        self.state_ttl = _ttl("state_ttl", state_ttl)
        self.data_ttl = _ttl("data_ttl", data_ttl)
        self._clock = clock
        self._owns_backend = False

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        connection_kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> SQLStorage:
        """A storage owning a new :meth:`SQLAlchemyBackend.from_url` backend (which gets
        ``connection_kwargs``: ``schema=``, ``pool_size=``...); :meth:`close` closes it. The
        tables must exist (:func:`sessions_sql.migrate`). ``options`` as for the constructor."""
        backend = SQLAlchemyBackend.from_url(url, **(connection_kwargs or {}))
        try:
            storage = cls(backend, **options)
        except BaseException:
            backend.engine.sync_engine.dispose()
            raise
        storage._owns_backend = True
        return storage

    def __repr__(self) -> str:
        return (
            f"SQLStorage(backend={self.backend!r}, state_ttl={self.state_ttl}, "
            f"data_ttl={self.data_ttl})"
        )

    def create_isolation(self, *, timeout: float = 60.0) -> SQLEventIsolation:
        """Event isolation for ``Dispatcher(events_isolation=...)``: across processes on
        PostgreSQL, within the process otherwise. See :class:`SQLEventIsolation`."""
        return SQLEventIsolation(self.backend, key_builder=self.key_builder, timeout=timeout)

    async def close(self) -> None:
        """Close the backend if this storage created it (:meth:`from_url`)."""
        if self._owns_backend:
            await self.backend.close()

    def _now(self) -> int:
        return math.floor(self._clock())

    def _session_expiry(self, now: int) -> int | None:
        """The session's expiry after a write at ``now``: at or after every part's expiry.

        With both TTLs a part written at ``now`` expires by ``now + max(ttl)``, and one
        written earlier sooner, so the collector removes the session only once both have
        expired. With a part that never expires, neither does the session.
        """
        if self.state_ttl is None or self.data_ttl is None:
            return None
        return now + max(self.state_ttl, self.data_ttl)

    async def set_state(self, key: StorageKey, state: StateType = None) -> None:
        """Set the state (``None`` removes it, leaving the data as it is)."""
        name = _state_name(state)
        sid = self.key_builder.build(key)
        now = self._now()
        expiry = self._session_expiry(now)
        if name is None:
            await self.backend.update_session(sid, remove=[STATE], expires_at=expiry)
            return
        ttl = self.state_ttl
        value = encode_value(name, None if ttl is None else now + ttl)
        await self.backend.update_session(sid, {STATE: value}, expires_at=expiry)

    async def get_state(self, key: StorageKey) -> str | None:
        """The state, or ``None`` if there is none (or it expired)."""
        stored = await self.backend.read_value(self.key_builder.build(key), STATE)
        if stored is None:
            return None
        live, name = _decode(stored, self._now())
        return name if live else None

    async def get_data(self, key: StorageKey) -> dict[str, Any]:
        """The data, ``{}`` if there is none (or it expired); a new dict on every call."""
        stored = await self.backend.read_values(self.key_builder.build(key))
        return _Data.of(stored, None, self._now()).data

    async def set_data(self, key: StorageKey, data: Mapping[str, Any]) -> None:
        """Replace the data (``{}`` removes it, leaving the state as it is).

        Raises ``aiogram.exceptions.DataNotDictLikeError`` unless ``data`` is a ``dict``.
        """
        if not isinstance(data, dict):
            msg = f"Data must be a dict or dict-like object, got {type(data).__name__}"
            raise DataNotDictLikeError(msg)
        now = self._now()
        values = _encode_data(data)
        if values and self.data_ttl is not None:
            values[DATA] = encode_value(None, now + self.data_ttl)
        sid = self.key_builder.build(key)
        stored = await self._read(sid, now)
        await self._write(sid, values, stored.names, stored, now)

    async def update_data(self, key: StorageKey, data: Mapping[str, Any]) -> dict[str, Any]:
        """Merge ``data`` into the stored data (like ``dict.update``) and return the result.

        Atomic: only the keys in ``data`` are written, in one statement, so concurrent
        updates of other keys (other tasks, other processes) are all kept. The result is the
        data this call read, updated with ``data``.
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"data must be a mapping, not {type(data).__name__}")
        now = self._now()
        values = _encode_data(data)
        sid = self.key_builder.build(key)
        if self.data_ttl is None:
            # Nothing to decide from what is stored: the read and the write run at once.
            stored, _ = await asyncio.gather(self._read(sid, now), self._put(sid, values))
            if stored.marker is not None or stored.expires_at is not None:
                # Left by a storage with TTLs: drop its data expiry (and its expired data).
                stale = [name for name in stored.expired if name not in values]
                await self._write(sid, {}, stale, stored, now)
        else:
            stored = await self._read(sid, now)
            if values or stored.data:
                # The data's expiry starts again, as when RedisStorage rewrites the data.
                values[DATA] = encode_value(None, now + self.data_ttl)
            # Expired data goes, as the whole data would; live keys stay as they are.
            await self._write(sid, values, stored.expired, stored, now)
        current = stored.data
        current.update({_json_name(k): v for k, v in data.items()})
        return current

    async def _put(self, sid: str, values: dict[str, bytes]) -> None:
        if len(values) == 1:  # the lighter statement of the two
            ((name, value),) = values.items()
            await self.backend.write_value(sid, name, value)
        elif values:
            await self.backend.update_session(sid, values)

    async def _read(self, sid: str, now: int) -> _Data:
        """The stored data and the session's expiry, before a write (one statement)."""
        snapshot = await self.backend.read_session(sid)
        if snapshot is None:
            return _Data([], {}, None, None)
        return _Data.of(snapshot.values, snapshot.expires_at, now)

    async def _write(
        self, sid: str, values: dict[str, bytes], old: list[str], stored: _Data, now: int
    ) -> None:
        """Write ``values`` and remove the names ``old`` that they do not replace, and the
        expiry marker unless ``values`` renews it, in one statement."""
        remove = [name for name in old if name not in values]
        if stored.marker is not None and DATA not in values:
            remove.append(DATA)
        expiry: object = self._session_expiry(now)
        if expiry is None and stored.expires_at is None:
            expiry = KEEP  # nothing to clear: the session row is not written
        if values or remove or expiry is not KEEP:
            await self.backend.update_session(sid, values, remove=remove, expires_at=expiry)


@dataclass
class _Data:
    """The data part of a session as read."""

    #: The names of its values (``data:...``).
    names: list[str]
    #: The data, empty if it expired.
    data: dict[str, Any]
    #: ``None`` without an expiry marker, else whether the data is live.
    marker: bool | None
    #: The session's expiry.
    expires_at: int | None

    @property
    def expired(self) -> list[str]:
        """The names of the data's values if it expired, else none."""
        return self.names if self.marker is False else []

    @classmethod
    def of(cls, stored: Mapping[str, bytes], expires_at: int | None, now: int) -> _Data:
        names = [name for name in stored if name.startswith(DATA_PREFIX)]
        marker = None if DATA not in stored else _decode(stored[DATA], now)[0]
        if marker is False:
            return cls(names, {}, marker, expires_at)
        data = {name[len(DATA_PREFIX) :]: _decode(stored[name], now)[1] for name in names}
        return cls(names, data, marker, expires_at)


def _lock_id(name: str) -> int:
    """A signed 64-bit advisory lock id for a lock name."""
    digest = hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class _KeyLocks:
    """One ``asyncio.Lock`` per name, dropped once nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, name: str, deadline: float) -> AsyncIterator[None]:
        lock, users = self._locks.get(name, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._locks[name] = (lock, users + 1)
        try:
            await _acquire(lock, deadline)
            try:
                yield
            finally:
                lock.release()
        finally:
            lock, users = self._locks[name]
            if users == 1:
                del self._locks[name]
            else:
                self._locks[name] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)


async def _acquire(lock: asyncio.Lock, deadline: float) -> None:
    """Acquire ``lock`` by ``deadline`` (loop time) or raise ``TimeoutError``; a cancelled or
    timed-out wait never leaves the lock held."""
    waiter = asyncio.ensure_future(lock.acquire())
    try:
        done, _ = await asyncio.wait({waiter}, timeout=max(0.0, deadline - _loop_time()))
    except BaseException:
        _abandon(waiter, lock)
        raise
    if not done:
        _abandon(waiter, lock)
        raise TimeoutError("timed out waiting for the FSM event lock")


def _abandon(waiter: asyncio.Future[Any], lock: asyncio.Lock) -> None:
    if waiter.done() and not waiter.cancelled():
        lock.release()
    else:
        waiter.cancel()
        waiter.add_done_callback(lambda w: lock.release() if not w.cancelled() else None)


def _loop_time() -> float:
    return asyncio.get_running_loop().time()


class _AdvisoryLocks:
    """PostgreSQL session-level advisory locks taken with ``pg_try_advisory_lock`` on one
    connection kept out of the engine's pool: no call ever blocks it, so holders and
    waiters of different keys never wait for each other. Waiters poll."""

    _TRY = text("SELECT pg_try_advisory_lock(:id)")
    _UNLOCK = text("SELECT pg_advisory_unlock(:id)")
    _FIRST_POLL = 0.002
    _LAST_POLL = 0.02

    def __init__(self, backend: SQLAlchemyBackend) -> None:
        self._engine = backend.engine
        self._conn: Any = None  # a SQLAlchemy AsyncConnection in autocommit, any driver
        self._busy = asyncio.Lock()
        self._releasing: set[asyncio.Task[None]] = set()  # of locks a cancelled waiter got

    async def _call(self, sql: TextClause, lock_id: int) -> bool:
        async with self._busy:
            try:
                if self._conn is None:
                    conn = await self._engine.connect()
                    self._conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
                return bool(await self._conn.scalar(sql, {"id": lock_id}))
            except Exception as error:
                await self._drop(error)
                raise BackendError(
                    f"the FSM event lock failed: the database raised {type(error).__name__}"
                ) from error

    async def _drop(self, error: BaseException | None = None) -> None:
        # Closed for good, never returned to the pool: that releases any lock still held.
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.invalidate(error if isinstance(error, Exception) else None)
                await conn.close()

    async def acquire(self, lock_id: int, deadline: float) -> None:
        delay = self._FIRST_POLL
        while not await _shielded(self._call(self._TRY, lock_id), self._release_later(lock_id)):
            if _loop_time() + delay > deadline:
                raise TimeoutError("timed out waiting for the FSM event lock")
            await asyncio.sleep(delay)
            delay = min(2 * delay, self._LAST_POLL)

    def _release_later(self, lock_id: int) -> Callable[[bool], None]:
        def release(acquired: bool) -> None:
            if acquired:
                task = asyncio.ensure_future(self.release(lock_id))
                self._releasing.add(task)
                task.add_done_callback(self._releasing.discard)

        return release

    async def release(self, lock_id: int) -> None:
        # A failed unlock dropped the connection, which released every lock it held.
        with contextlib.suppress(BackendError):
            await asyncio.shield(self._call(self._UNLOCK, lock_id))

    async def close(self) -> None:
        async with self._busy:
            await self._drop()


async def _shielded(call: Any, on_abandoned: Callable[[bool], None]) -> bool:
    """Await ``call`` shielded from cancellation; if the caller is cancelled meanwhile, the
    call still completes and ``on_abandoned`` gets its result."""
    task = asyncio.ensure_future(call)
    try:
        return bool(await asyncio.shield(task))
    except asyncio.CancelledError:
        task.add_done_callback(
            lambda t: None if t.cancelled() or t.exception() else on_abandoned(bool(t.result()))
        )
        raise


class SQLEventIsolation(BaseEventIsolation):
    """Runs the handlers of one FSM key one at a time (``Dispatcher(events_isolation=...)``).

    On PostgreSQL across every process of the bot: a PostgreSQL advisory lock per key, held
    on one connection of the backend's engine kept for the isolation (released if the
    process dies). On SQLite and in memory within this process. Waiting longer than
    ``timeout`` seconds raises ``TimeoutError``; the lock is released when the handler ends,
    raises or is cancelled.
    """

    def __init__(self, backend: Any, *, key_builder: KeyBuilder, timeout: float = 60.0) -> None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ValueError("timeout must be a positive number of seconds")
        self.key_builder = key_builder
        self.timeout = float(timeout)
        self._local = _KeyLocks()
        postgres = (
            isinstance(backend, SQLAlchemyBackend) and backend.engine.dialect.name == "postgresql"
        )
        self._advisory = _AdvisoryLocks(backend) if postgres else None

    @contextlib.asynccontextmanager
    async def lock(self, key: StorageKey) -> AsyncGenerator[None, None]:
        """Hold the key's lock for the ``async with`` block."""
        name = self.key_builder.build(key, "lock")
        deadline = _loop_time() + self.timeout
        async with self._local.hold(name, deadline):
            if self._advisory is None:
                yield
                return
            lock_id = _lock_id(name)
            await self._advisory.acquire(lock_id, deadline)
            try:
                yield
            finally:
                await self._advisory.release(lock_id)

    async def close(self) -> None:
        """Give the lock connection back to the pool."""
        if self._advisory is not None:
            await self._advisory.close()
