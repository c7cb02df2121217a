"""MemoryBackend: the session protocol in a dict, for application unit tests."""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from datetime import datetime

from ._protocol import check_batch_size, check_cutoff, check_key, check_session_id, check_value

__all__ = ["MemoryBackend"]


class MemoryBackend:
    """An in-process :class:`~sessions_sql.SessionBackend` with the same semantics and input
    checks as :class:`~sessions_sql.SQLAlchemyBackend`. Nothing is persisted.

    Each method completes without yielding to the event loop, so concurrent tasks always see
    whole operations. ``clock`` returns Unix seconds (default ``time.time``); tests may pass
    their own to control creation times.
    """

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._created: dict[str, float] = {}
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
        sid = check_session_id(session_id)
        self._created.pop(sid, None)
        self._values.pop(sid, None)

    async def read_value(self, session_id: str, key: str) -> bytes | None:
        """Return the value under ``key``, or ``None``."""
        sid, key = check_session_id(session_id), check_key(key)
        return self._values.get(sid, {}).get(key)

    async def write_value(self, session_id: str, key: str, value: bytes) -> None:
        """Insert or replace one value, creating the session if needed."""
        sid, key, data = check_session_id(session_id), check_key(key), check_value(value)
        self._session(sid)[key] = data

    async def remove_value(self, session_id: str, key: str) -> None:
        """Remove one value; the session stays."""
        sid, key = check_session_id(session_id), check_key(key)
        self._values.get(sid, {}).pop(key, None)

    async def read_values(self, session_id: str) -> dict[str, bytes]:
        """Return all values of a session (empty if it is missing)."""
        return dict(self._values.get(check_session_id(session_id), {}))

    async def write_values(self, session_id: str, values: Mapping[str, bytes]) -> None:
        """Insert or replace several values at once; an empty mapping creates no session."""
        sid = check_session_id(session_id)
        if not isinstance(values, Mapping):
            raise TypeError(f"values must be a mapping, not {type(values).__name__}")
        checked = {
            check_key(key): check_value(value, what=f"values[{i}]")
            for i, (key, value) in enumerate(values.items())
        }
        if checked:
            self._session(sid).update(checked)

    async def remove_values(self, session_id: str, keys: Iterable[str]) -> None:
        """Remove several values at once; missing keys are ignored."""
        sid = check_session_id(session_id)
        if isinstance(keys, (str, bytes)) or not isinstance(keys, Iterable):
            raise TypeError(f"keys must be an iterable of str, not {type(keys).__name__}")
        checked = [check_key(key) for key in keys]
        stored = self._values.get(sid, {})
        for key in checked:
            stored.pop(key, None)

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
        for sid in doomed:
            del self._created[sid]
            self._values.pop(sid, None)
        if progress is not None:
            progress(len(doomed))
        return len(doomed)

    def _session(self, sid: str) -> dict[str, bytes]:
        if sid not in self._created:
            self._created[sid] = self._clock()
            self._values[sid] = {}
        return self._values[sid]
