"""A starsessions store over any sessions_sql backend, for applications already on
starsessions: ``pip install 'sessions-sql[starsessions]'``.

starsessions hands a store the whole session as one serialised blob; :class:`SQLStore` keeps
it as one value of a sessions_sql session, with the session's expiry set from starsessions'
``lifetime`` and ``ttl``, so the collector (``SessionCollector``) removes what has expired.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from starsessions import SessionStore, generate_session_id

from sessions_sql import SessionBackend, SessionExpiry, check_extension

__all__ = ["SQLStore"]


class SQLStore(SessionStore):
    """A ``starsessions.SessionStore`` keeping each session in ``backend`` (one that
    implements :class:`~sessions_sql.SessionExpiry`: SQLAlchemyBackend, MemoryBackend).

    The blob is stored under ``key``. A session expires ``ttl`` seconds after each write, as
    starsessions computes it from ``lifetime`` (and ``rolling``); a session-only cookie
    (``lifetime=0``) keeps its data ``gc_ttl`` after the last write, as starsessions'
    ``RedisStore`` does. Expired sessions read as empty. ``clock`` returns Unix seconds.
    """

    def __init__(
        self,
        backend: SessionBackend,
        *,
        key: str = "starsessions",
        gc_ttl: timedelta = timedelta(days=30),
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(backend, SessionBackend) or not check_extension(backend, SessionExpiry):
            raise TypeError(
                "backend must be a sessions_sql backend implementing sessions_sql.SessionExpiry "
                f"(SQLAlchemyBackend, MemoryBackend), not {type(backend).__name__}"
            )
        if not isinstance(key, str) or not key:
            raise ValueError("key must be a non-empty str")
        if not isinstance(gc_ttl, timedelta):
            raise TypeError(f"gc_ttl must be a timedelta, not {type(gc_ttl).__name__}")
        if gc_ttl.total_seconds() < 1:
            raise ValueError("gc_ttl must be at least one second")
        self._backend: Any = backend  # a SessionBackend with the SessionExpiry methods
        self._key = key
        self._gc_ttl = math.floor(gc_ttl.total_seconds())
        self._clock = clock

    def __repr__(self) -> str:
        return f"SQLStore(backend={self._backend!r}, key={self._key!r})"

    async def read(self, session_id: str, lifetime: int) -> bytes:
        """The session's data, or ``b""`` if it does not exist, has expired, or the id is not
        one a backend accepts (the cookie is the client's)."""
        try:
            snapshot = await self._backend.read_session(session_id)
        except ValueError:  # refused before any SQL: no such session
            return b""
        if snapshot is None:
            return b""
        if snapshot.expires_at is not None and snapshot.expires_at < math.floor(self._clock()):
            return b""
        data: bytes = snapshot.values.get(self._key, b"")
        return data

    async def write(self, session_id: str, data: bytes, lifetime: int, ttl: int) -> str:
        """Store the data with its expiry (one statement on PostgreSQL); return the id, a new
        one if the client's id is not one a backend accepts."""
        seconds = self._gc_ttl if lifetime == 0 else max(1, ttl)
        expires_at = math.floor(self._clock()) + seconds
        values = {self._key: data}
        try:
            await self._backend.update_session(session_id, values, expires_at=expires_at)
        except ValueError:  # refused before any SQL: the client's id is not a valid one
            session_id = generate_session_id()
            await self._backend.update_session(session_id, values, expires_at=expires_at)
        return session_id

    async def remove(self, session_id: str) -> None:
        """Remove the session; a missing one (or an id a backend refuses) is not an error."""
        try:
            await self._backend.remove_session(session_id)
        except ValueError:
            return
