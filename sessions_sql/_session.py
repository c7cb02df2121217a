"""The session layer on top of any SessionBackend: typed values with per-key expiry, a
manager that hands out sessions, and a collector that removes old sessions.

Stored values use the original library's format, so both can share rows: compact JSON
``{"expires_at":<Unix seconds or null>,"value":<the value>}``, UTF-8, ``expires_at`` first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar

from ._protocol import (
    BulkRemoval,
    SessionBackend,
    SessionError,
    SessionExpiry,
    accepts_keyword,
    check_batch_size,
    check_extension,
    check_key,
    check_session_id,
    created_before_cutoff,
)

__all__ = [
    "Clock",
    "Session",
    "SessionCollector",
    "SessionManager",
    "decode_value",
    "encode_value",
]

logger = logging.getLogger("sessions_sql")

#: A clock returning Unix seconds, such as ``time.time``; tests pass their own.
Clock = Callable[[], float]

_T = TypeVar("_T")
_MISSING = object()
_FORMAT_ERROR = (
    'the stored value is not in the session format (JSON {"expires_at": ..., "value": ...})'
)


def encode_value(value: Any, expires_at: int | None = None) -> bytes:
    """``value`` in the session value format (JSON ``{"expires_at": ..., "value": ...}``,
    UTF-8), as :class:`Session` and the web and bot adapters store it; ``expires_at`` in
    Unix seconds, or ``None``. Raises TypeError if ``value`` is not JSON-serialisable."""
    try:
        text = json.dumps(
            {"expires_at": expires_at, "value": value},
            separators=(",", ":"),
            ensure_ascii=False,
            allow_nan=False,
        )
    except (TypeError, ValueError) as error:
        raise TypeError(f"value is not JSON-serialisable: {error}") from None
    return text.encode("utf-8")


def decode_value(data: bytes) -> tuple[int | None, Any]:
    """``(expires_at, value)`` of bytes in the session value format (see
    :func:`encode_value`); raises SessionError for bytes in any other format."""
    try:
        stored = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise SessionError(_FORMAT_ERROR) from None
    if not isinstance(stored, dict) or "value" not in stored:
        raise SessionError(_FORMAT_ERROR)
    expires_at = stored.get("expires_at")
    if expires_at is not None and (
        not isinstance(expires_at, int) or isinstance(expires_at, bool) or expires_at < 0
    ):
        raise SessionError(_FORMAT_ERROR)
    return expires_at, stored["value"]


async def _call(operation: str, awaitable: Awaitable[_T]) -> _T:
    """Await a backend call; its failures become SessionError with the cause chained."""
    try:
        return await awaitable
    except SessionError:
        raise
    except Exception as error:
        raise SessionError(
            f"{operation} failed: the backend raised {type(error).__name__}"
        ) from error


class Session:
    """One session's values, read and written through the backend on each call.

    Values are any JSON-serialisable data; a key may expire (``expire``). Obtain sessions from
    a :class:`SessionManager`.
    """

    __slots__ = ("_backend", "_clock", "_id")

    def __init__(self, backend: SessionBackend, session_id: str, *, clock: Clock = time.time):
        self._backend = backend
        self._id = check_session_id(session_id)
        self._clock = clock

    @property
    def id(self) -> str:
        """The session id (a secret in web applications: do not log it)."""
        return self._id

    def __repr__(self) -> str:
        return "Session(id=<hidden>)"

    def _now(self) -> int:
        return math.floor(self._clock())

    async def _read(self, key: str) -> tuple[int | None, Any] | None:
        data = await _call("reading a value", self._backend.read_value(self._id, key))
        return None if data is None else decode_value(data)

    async def get(self, key: str, default: Any = None) -> Any:
        """Return the value under ``key``, or ``default`` if it is missing or expired."""
        stored = await self._read(check_key(key))
        if stored is None:
            return default
        expires_at, value = stored
        if expires_at is not None and expires_at < self._now():
            return default
        return value

    async def set(self, key: str, value: Any) -> None:
        """Store ``value`` under ``key``, keeping the key's expiry if it has an unexpired one."""
        check_key(key)
        encode_value(value, None)  # refuse what cannot be stored before reading anything
        stored = await self._read(key)
        expires_at = None
        if stored is not None and stored[0] is not None and stored[0] >= self._now():
            expires_at = stored[0]
        await _call(
            "writing a value",
            self._backend.write_value(self._id, key, encode_value(value, expires_at)),
        )

    async def expire(self, key: str, seconds: int) -> None:
        """Make ``key`` expire ``seconds`` from now (also revives an expired key); a missing
        key is left missing."""
        check_key(key)
        if not isinstance(seconds, int) or isinstance(seconds, bool):
            raise TypeError(f"seconds must be an int, not {type(seconds).__name__}")
        if seconds < 0:
            raise ValueError(f"seconds must not be negative, got {seconds}")
        stored = await self._read(key)
        if stored is None:
            return
        data = encode_value(stored[1], self._now() + seconds)
        await _call("writing a value", self._backend.write_value(self._id, key, data))

    async def remove(self, key: str) -> None:
        """Remove ``key``; the session stays."""
        await _call("removing a value", self._backend.remove_value(self._id, check_key(key)))

    async def clear(self) -> None:
        """Remove the whole session and all its values."""
        await _call("removing the session", self._backend.remove_session(self._id))


class SessionManager:
    """Hands out :class:`Session` objects backed by ``backend`` (any SessionBackend)."""

    def __init__(self, backend: SessionBackend, *, clock: Clock = time.time) -> None:
        if not isinstance(backend, SessionBackend):
            raise TypeError(f"backend must be a SessionBackend, not {type(backend).__name__}")
        self._backend = backend
        self._clock = clock

    def __repr__(self) -> str:
        return f"SessionManager(backend={self._backend!r})"

    def get_session(self, session_id: str) -> Session:
        """Return the session with this id; nothing is written until a value is set."""
        return Session(self._backend, session_id, clock=self._clock)

    def new_session(self) -> Session:
        """Return a session with a fresh, unguessable id: 256 random bits from ``secrets``,
        URL-safe base64 (43 characters)."""
        return Session(self._backend, secrets.token_urlsafe(32), clock=self._clock)


def _count(method: str, removed: object) -> int:
    """The number a removal returned, which the extension protocols promise is an int."""
    if not isinstance(removed, int) or isinstance(removed, bool):
        raise TypeError(
            f"{method} must return the number of sessions removed, not {type(removed).__name__}"
            " (sessions_sql.BulkRemoval, sessions_sql.SessionExpiry)"
        )
    return removed


def _seconds(name: str, value: object) -> float:
    if isinstance(value, timedelta):
        return value.total_seconds()
    raise TypeError(f"{name} must be a timedelta, not {type(value).__name__}")


class SessionCollector:
    """Removes old and expired sessions, once (``collect``) or every ``period`` (``run``
    until ``stop``).

    Each pass removes the sessions created at least ``lifetime`` ago (if a lifetime is
    given) and, on a backend implementing :class:`~sessions_sql.SessionExpiry`, the sessions
    whose expiry has passed. A backend implementing :class:`~sessions_sql.BulkRemoval`
    (SQLAlchemyBackend and MemoryBackend, in bounded batches) is cleaned of old sessions
    through it; any other SessionBackend through its six methods. A backend whose extension
    methods have another shape is refused here with ``TypeError``.
    """

    def __init__(
        self,
        backend: SessionBackend,
        period: timedelta,
        lifetime: timedelta | None = None,
        *,
        clock: Clock = time.time,
        batch_size: int = 5000,
    ) -> None:
        if not isinstance(backend, SessionBackend):
            raise TypeError(f"backend must be a SessionBackend, not {type(backend).__name__}")
        self._period = _seconds("period", period)
        if self._period <= 0:
            raise ValueError("period must be positive")
        self._lifetime = None if lifetime is None else math.floor(_seconds("lifetime", lifetime))
        if self._lifetime is not None and self._lifetime < 0:
            raise ValueError("lifetime must not be negative")
        self._backend = backend
        self._clock = clock
        self._batch_size = check_batch_size(batch_size)
        # Keyword arguments of each extension's removal, or None if the backend has none.
        self._bulk = self._removal(BulkRemoval, "remove_sessions_created_before")
        self._expired = self._removal(SessionExpiry, "remove_expired_sessions")
        if self._lifetime is None and self._expired is None:
            raise ValueError(
                "nothing to collect: give a lifetime, or a backend implementing "
                "sessions_sql.SessionExpiry"
            )
        self._stopped = asyncio.Event()

    def _removal(self, protocol: type, name: str) -> dict[str, int] | None:
        if not check_extension(self._backend, protocol):
            return None
        declared = accepts_keyword(getattr(self._backend, name), "batch_size")
        return {"batch_size": self._batch_size} if declared else {}

    def __repr__(self) -> str:
        lifetime = "None" if self._lifetime is None else f"{self._lifetime}s"
        return (
            f"SessionCollector(backend={self._backend!r}, period={self._period}s, "
            f"lifetime={lifetime}, expired={self._expired is not None})"
        )

    async def collect(self) -> int:
        """Run one pass and return how many sessions it removed.

        A session is removed when ``now - created >= lifetime`` in whole seconds (a creation
        time in the future counts as age zero), or when ``expires_at < now``.
        """
        now = math.floor(self._clock())
        removed = 0
        if self._lifetime is not None:
            if self._bulk is not None:
                cutoff = created_before_cutoff(now, self._lifetime)
                backend: Any = self._backend
                removed += _count(
                    "remove_sessions_created_before",
                    await _call(
                        "removing old sessions",
                        backend.remove_sessions_created_before(cutoff, **self._bulk),
                    ),
                )
            else:
                removed += await self._collect_one_by_one(now, self._lifetime)
        if self._expired is not None:
            expiring: SessionExpiry = self._backend  # type: ignore[assignment]
            removed += _count(
                "remove_expired_sessions",
                await _call(
                    "removing expired sessions",
                    expiring.remove_expired_sessions(now, **self._expired),
                ),
            )
        logger.debug("session collector removed %d sessions", removed)
        return removed

    async def _collect_one_by_one(self, now: int, lifetime: int) -> int:
        removed = 0
        for session_id in await _call("listing sessions", self._backend.get_sessions()):
            try:
                created = await self._backend.get_session_age(session_id)
                if created is None or max(0, now - created) < lifetime:
                    continue
                await self._backend.remove_session(session_id)
            except Exception as error:
                logger.warning(
                    "session collector skipped a session: the backend raised %s",
                    type(error).__name__,
                )
                continue
            removed += 1
        return removed

    async def run(self) -> None:
        """Collect now, then every ``period``, until :meth:`stop` (which also interrupts the
        wait). A failed pass is logged and the next one runs on schedule."""
        while not self._stopped.is_set():
            try:
                await self.collect()
            except SessionError as error:
                logger.error("session collection failed: %s", error)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), timeout=self._period)

    def stop(self) -> None:
        """Make :meth:`run` return promptly (at once if it is waiting for the next period)."""
        self._stopped.set()
