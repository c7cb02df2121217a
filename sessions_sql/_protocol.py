"""The session backend protocol, the package's exceptions and input validation.

Everything in the package works with any object satisfying :class:`SessionBackend`.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Protocol, runtime_checkable

__all__ = [
    "MAX_NAME_LENGTH",
    "BackendError",
    "SessionBackend",
    "SessionError",
    "SessionsSQLError",
    "check_batch_size",
    "check_cutoff",
    "check_key",
    "check_session_id",
    "check_value",
]

#: Longest session id or key accepted, in characters.
MAX_NAME_LENGTH = 255
#: Largest batch size accepted by the batch operations.
MAX_BATCH_SIZE = 1_000_000


class SessionsSQLError(Exception):
    """Base class of every exception raised by sessions_sql."""


class BackendError(SessionsSQLError):
    """The database failed (unreachable, connection lost, timeout, pool exhausted).

    The driver's exception is chained as ``__cause__``. The message never contains
    a session id, a key or a value.
    """


class SessionError(SessionsSQLError):
    """A session operation failed: stored bytes are not in the session format, or the
    backend failed (then the backend's exception is chained as ``__cause__``)."""


@runtime_checkable
class SessionBackend(Protocol):
    """Storage of sessions: a session is a set of named byte values plus its creation time.

    Mirrors the ``SessionBackend`` trait of the Rust library seance. All six methods are
    coroutines; missing sessions and keys are never errors.
    """

    async def get_sessions(self) -> list[str]:
        """Return the ids of all existing sessions, in any order."""
        ...

    async def get_session_age(self, session_id: str) -> int | None:
        """Return the session's creation time in whole Unix seconds (UTC), or ``None``.

        Despite the name (kept from the original trait) this is a timestamp, not an
        age: a collector removes a session when ``now - value >= lifetime``.
        """
        ...

    async def remove_session(self, session_id: str) -> None:
        """Remove the session and all its values; a missing session is not an error."""
        ...

    async def read_value(self, session_id: str, key: str) -> bytes | None:
        """Return the value stored under ``key``, or ``None`` if session or key is missing."""
        ...

    async def write_value(self, session_id: str, key: str, value: bytes) -> None:
        """Insert or replace one value, creating the session (and its creation time) if needed."""
        ...

    async def remove_value(self, session_id: str, key: str) -> None:
        """Remove one value; the session stays even if it has no values left."""
        ...


def _check_name(what: str, name: object) -> str:
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str, not {type(name).__name__}")
    if not name:
        raise ValueError(f"{what} must not be empty")
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"{what} must be at most {MAX_NAME_LENGTH} characters, got {len(name)}")
    if "\x00" in name:
        raise ValueError(f"{what} must not contain a NUL character")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} must be encodable as UTF-8 (it holds a lone surrogate)") from None
    return name


def check_session_id(session_id: object) -> str:
    """Return ``session_id`` if it is a valid id, else raise ``TypeError``/``ValueError``."""
    return _check_name("session_id", session_id)


def check_key(key: object) -> str:
    """Return ``key`` if it is a valid key, else raise ``TypeError``/``ValueError``."""
    return _check_name("key", key)


def check_value(value: object, max_bytes: int | None = None, what: str = "value") -> bytes:
    """Return ``value`` as ``bytes`` if it is bytes-like (and not over ``max_bytes``)."""
    if isinstance(value, bytes):
        data = value
    elif isinstance(value, (bytearray, memoryview)):
        data = bytes(value)
    else:
        raise TypeError(
            f"{what} must be bytes, bytearray or memoryview, not {type(value).__name__}"
        )
    if max_bytes is not None and len(data) > max_bytes:
        raise ValueError(f"{what} is {len(data)} bytes, more than max_value_bytes={max_bytes}")
    return data


def check_batch_size(batch_size: object) -> int:
    """Return ``batch_size`` if it is an int from 1 to ``MAX_BATCH_SIZE``, else raise."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool):
        raise TypeError(f"batch_size must be an int, not {type(batch_size).__name__}")
    if not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise ValueError(f"batch_size must be between 1 and {MAX_BATCH_SIZE}, got {batch_size}")
    return batch_size


def check_cutoff(cutoff: object) -> datetime:
    """Return a creation-time cutoff as an aware UTC datetime rounded up to a whole second.

    Creation times count in whole seconds (as ``get_session_age`` reports them), so "created
    before ``cutoff``" means ``floor(created) < cutoff``, which is ``created < ceil(cutoff)``.
    ``cutoff`` is a timezone-aware datetime or Unix seconds.
    """
    if isinstance(cutoff, datetime):
        if cutoff.tzinfo is None or cutoff.utcoffset() is None:
            raise ValueError("cutoff must be a timezone-aware datetime or Unix seconds")
        seconds = cutoff.timestamp()
    elif isinstance(cutoff, (int, float)) and not isinstance(cutoff, bool):
        seconds = float(cutoff)
    else:
        raise TypeError(
            f"cutoff must be a timezone-aware datetime or Unix seconds, not {type(cutoff).__name__}"
        )
    try:
        return datetime.fromtimestamp(math.ceil(seconds), timezone.utc)
    except (OverflowError, OSError, ValueError):
        raise ValueError("cutoff is out of the range of representable times") from None
