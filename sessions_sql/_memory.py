"""MemoryBackend: the session protocol and its extensions in a dict, for application unit
tests."""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from datetime import datetime
from typing import Literal

from ._protocol import (
    KEEP,
    Expiry,
    Keep,
    SessionSnapshot,
    check_batch_size,
    check_cutoff,
    check_expires_at,
    check_key,
    check_keys,
    check_now,
    check_session_id,
    check_value,
    check_values,
)

__all__ = ["MemoryBackend"]


class MemoryBackend:
    """An in-process :class:`~sessions_sql.SessionBackend` with the same semantics, extensions
    and input checks as :class:`~sessions_sql.SQLAlchemyBackend`. Nothing is persisted.

    Each method completes without yielding to the event loop, so concurrent tasks always see
    whole operations. ``clock`` returns Unix seconds (default ``time.time``); tests may pass
    their own to control creation times and the default "now" of expiry.
    """

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._created: dict[str, float] = {}
        self._expires: dict[str, int | None] = {}
        self._values: dict[str, dict[str, bytes]] = {}

    def __repr__(self) -> str:
        return f"MemoryBackend(sessions={len(self._created)})"

    async def get_sessions(self) -> list[str]:
        """Return the ids of all sessions, in any order."""
        return list(self._created)

    async def get_session_age(self, session_id: str) -> int | None:
        """Return the session's creation time in whole Unix seconds, or ``None``."""
        created = self._created.get(check_session_id(session_id))
        return None if created is None else math.floor(created)

    async def remove_session(self, session_id: str) -> None:
        """Remove the session and its values; a missing session is not an error."""
        self._remove(check_session_id(session_id))

    async def read_value(self, session_id: str, key: str) -> bytes | None:
        """Return the value under ``key``, or ``None``."""
        sid, key = check_session_id(session_id), check_key(key)
        return self._values.get(sid, {}).get(key)

    async def write_value(
        self,
        session_id: str,
        key: str,
        value: bytes,
        *,
        expires_at: Expiry | Literal[Keep.KEEP] = KEEP,
    ) -> None:
        """Insert or replace one value, creating the session if needed (``expires_at``:
        set or, with ``None``, clear the expiry too)."""
        sid, key, data = check_session_id(session_id), check_key(key), check_value(value)
        self._update(sid, {key: data}, [], _expiry(expires_at))

    async def remove_value(self, session_id: str, key: str) -> None:
        """Remove one value; the session stays."""
        sid, key = check_session_id(session_id), check_key(key)
        self._values.get(sid, {}).pop(key, None)

    async def read_values(self, session_id: str) -> dict[str, bytes]:
        """Return all values of a session (empty if it is missing)."""
        return dict(self._values.get(check_session_id(session_id), {}))

    async def write_values(
        self,
        session_id: str,
        values: Mapping[str, bytes],
        *,
        expires_at: Expiry | Literal[Keep.KEEP] = KEEP,
    ) -> None:
        """Insert or replace several values at once; an empty mapping creates no session."""
        sid = check_session_id(session_id)
        self._update(sid, check_values(values), [], _expiry(expires_at))

    async def remove_values(self, session_id: str, keys: Iterable[str]) -> None:
        """Remove several values at once; missing keys are ignored."""
        sid = check_session_id(session_id)
        self._update(sid, {}, check_keys(keys), KEEP)

    async def update_session(
        self,
        session_id: str,
        values: Mapping[str, bytes] | None = None,
        *,
        remove: Iterable[str] = (),
        expires_at: Expiry | Literal[Keep.KEEP] = KEEP,
    ) -> None:
        """Write ``values``, remove the keys ``remove`` and set the expiry, atomically."""
        sid = check_session_id(session_id)
        checked = check_values({} if values is None else values)
        removed = check_keys(remove, what="remove")
        if not checked.keys().isdisjoint(removed):
            raise ValueError("a key cannot be both written and removed in one update_session")
        self._update(sid, checked, removed, _expiry(expires_at))

    async def set_session_expiry(self, session_id: str, expires_at: Expiry) -> None:
        """Set or clear an existing session's expiry; never creates a session."""
        sid = check_session_id(session_id)
        self._update(sid, {}, [], _expiry(expires_at))

    async def get_session_expiry(self, session_id: str) -> int | None:
        """Return the session's expiry in whole Unix seconds, or ``None``."""
        return self._expires.get(check_session_id(session_id))

    async def read_session(self, session_id: str) -> SessionSnapshot | None:
        """Return the whole session, or ``None`` if it does not exist."""
        sid = check_session_id(session_id)
        if sid not in self._created:
            return None
        created = math.floor(self._created[sid])
        return SessionSnapshot(created, self._expires[sid], dict(self._values[sid]))

    async def iter_sessions(self, batch_size: int = 1000) -> AsyncIterator[str]:
        """Yield every session id in sorted order (``batch_size`` is accepted for parity)."""
        check_batch_size(batch_size)
        for session_id in sorted(self._created):
            yield session_id

    async def remove_sessions_created_before(
        self,
        cutoff: datetime | float,
        *,
        batch_size: int = 5000,
        progress: Callable[[int], object] | None = None,
    ) -> int:
        """Remove every session created (in whole seconds) before ``cutoff``; return how many."""
        limit = check_cutoff(cutoff).timestamp()
        check_batch_size(batch_size)
        doomed = [sid for sid, created in self._created.items() if math.floor(created) < limit]
        return self._remove_all(doomed, progress)

    async def remove_expired_sessions(
        self,
        now: datetime | float | None = None,
        *,
        batch_size: int = 5000,
        progress: Callable[[int], object] | None = None,
    ) -> int:
        """Remove every session whose expiry is before ``now`` (default: the backend's clock,
        in whole seconds); return how many."""
        moment = check_now(self._clock() if now is None else now).timestamp()
        check_batch_size(batch_size)
        doomed = [sid for sid, at in self._expires.items() if at is not None and at < moment]
        return self._remove_all(doomed, progress)

    def _update(
        self,
        sid: str,
        values: dict[str, bytes],
        remove: list[str],
        expiry: datetime | Literal[Keep.KEEP] | None,
    ) -> None:
        if values and sid not in self._created:
            self._created[sid] = self._clock()
            self._expires[sid] = None
            self._values[sid] = {}
        if sid not in self._created:
            return  # removing keys or setting the expiry never creates a session
        stored = self._values[sid]
        stored.update(values)
        for key in remove:
            stored.pop(key, None)
        if expiry is not KEEP:
            self._expires[sid] = None if expiry is None else math.floor(expiry.timestamp())

    def _remove(self, sid: str) -> None:
        self._created.pop(sid, None)
        self._expires.pop(sid, None)
        self._values.pop(sid, None)

    def _remove_all(self, doomed: list[str], progress: Callable[[int], object] | None) -> int:
        for sid in doomed:
            self._remove(sid)
        if progress is not None:
            progress(len(doomed))
        return len(doomed)


def _expiry(expires_at: object) -> datetime | Literal[Keep.KEEP] | None:
    return KEEP if expires_at is KEEP else check_expires_at(expires_at)
