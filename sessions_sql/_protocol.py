"""The session backend protocol, its optional extensions, the package's exceptions and input
validation.

Everything in the package works with any object satisfying :class:`SessionBackend`. Beyond
its six methods, the package calls only what an extension protocol declares, and only after
:func:`check_extension` has found the backend's methods callable the way the package calls
them.
"""

from __future__ import annotations

import enum
import inspect
import math
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal, Protocol, runtime_checkable

__all__ = [
    "MAX_NAME_LENGTH",
    "BackendError",
    "BatchValues",
    "BulkRemoval",
    "SessionBackend",
    "SessionError",
    "SessionExpiry",
    "SessionListing",
    "SessionSnapshot",
    "SessionsSQLError",
    "accepts_keyword",
    "check_batch_size",
    "check_cutoff",
    "check_expires_at",
    "check_extension",
    "check_key",
    "check_now",
    "check_session_id",
    "check_value",
    "created_before_cutoff",
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


# Optional extensions: each a small protocol a backend may implement besides the six methods.


@runtime_checkable
class BulkRemoval(Protocol):
    """Removal of old sessions in one call; :class:`~sessions_sql.SessionCollector` uses it
    when a backend offers it, instead of listing and removing sessions one by one.

    The package's own backends also accept the keywords ``batch_size`` (sessions per
    transaction) and ``progress`` (called with the running total); the collector passes
    ``batch_size`` only to a method that declares it.
    """

    async def remove_sessions_created_before(self, cutoff: datetime | float) -> int:
        """Remove every session created (in whole Unix seconds) before ``cutoff``, a
        timezone-aware datetime or Unix seconds; return how many were removed."""
        ...


@runtime_checkable
class BatchValues(Protocol):
    """Reading, writing and removing several values of one session in one call."""

    async def read_values(self, session_id: str) -> dict[str, bytes]:
        """Return every value of the session (empty if it does not exist)."""
        ...

    async def write_values(self, session_id: str, values: Mapping[str, bytes]) -> None:
        """Insert or replace the values atomically, creating the session if needed; an
        empty mapping writes nothing and creates no session."""
        ...

    async def remove_values(self, session_id: str, keys: Iterable[str]) -> None:
        """Remove the keys atomically; missing keys are ignored and the session stays."""
        ...


@runtime_checkable
class SessionListing(Protocol):
    """Listing every session id in pages, in flat memory however many there are."""

    def iter_sessions(self, batch_size: int = 1000) -> AsyncIterator[str]:
        """Yield every session id, ``batch_size`` per query."""
        ...


@dataclass(frozen=True)
class SessionSnapshot:
    """A whole session as one statement read it: creation time, expiry and every value."""

    #: Creation time, whole Unix seconds (UTC).
    created_at: int
    #: When the session expires, whole Unix seconds, or ``None`` (no expiry).
    expires_at: int | None
    #: Every value of the session, by key.
    values: dict[str, bytes] = field(default_factory=dict)

    def __repr__(self) -> str:  # values may be secrets: show their keys only
        return (
            f"SessionSnapshot(created_at={self.created_at}, expires_at={self.expires_at}, "
            f"keys={sorted(self.values)!r})"
        )


class Keep(enum.Enum):
    """The type of :data:`KEEP`."""

    KEEP = "KEEP"


#: The default of ``expires_at=`` on writes: the session's expiry stays as it is.
KEEP = Keep.KEEP

#: An expiry as a caller gives it: whole Unix seconds, an aware datetime, or ``None`` (none).
Expiry = int | datetime | None


@runtime_checkable
class SessionExpiry(Protocol):
    """Sessions that expire (idle timeouts, TTLs): an expiry per session, a one-statement
    load and save, and removal of the expired ones.

    A session is expired when ``expires_at < now`` in whole Unix seconds. The six protocol
    methods never look at the expiry: the layers above enforce it, and garbage collection
    (``remove_expired_sessions``) removes what has expired.
    """

    async def set_session_expiry(self, session_id: str, expires_at: Expiry) -> None:
        """Set (``None``: clear) an existing session's expiry; never creates a session."""
        ...

    async def get_session_expiry(self, session_id: str) -> int | None:
        """The session's expiry in whole Unix seconds; ``None`` if it has none or does not
        exist."""
        ...

    async def read_session(self, session_id: str) -> SessionSnapshot | None:
        """The whole session, read at one instant, or ``None`` if it does not exist."""
        ...

    async def update_session(
        self,
        session_id: str,
        values: Mapping[str, bytes] | None = None,
        *,
        remove: Iterable[str] = (),
        expires_at: Expiry | Literal[Keep.KEEP] = KEEP,
    ) -> None:
        """Write ``values``, remove the keys ``remove`` and set the expiry, atomically.

        Writing values creates the session if needed; removing keys or setting the expiry
        alone never does. ``expires_at`` left out keeps the expiry; ``None`` clears it.
        """
        ...

    async def remove_expired_sessions(self, now: datetime | float | None = None) -> int:
        """Remove every session whose expiry is before ``now`` (default: the current time)
        and return how many."""
        ...


def _declared(protocol: type) -> dict[str, Callable[..., Any]]:
    """The methods a protocol class declares (its own and inherited ones), by name."""
    return {
        name: member
        for klass in reversed(protocol.__mro__)
        if klass not in (object, Protocol) and getattr(klass, "_is_protocol", False)
        for name, member in vars(klass).items()
        if not name.startswith("_") and inspect.isfunction(member)
    }


def _signature(method: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(method)
    except (TypeError, ValueError):  # some builtins and C callables have none
        return None


def _required_arguments(declared: Callable[..., Any]) -> list[str]:
    parameters = list(inspect.signature(declared).parameters.values())[1:]  # without self
    return [p.name for p in parameters if p.default is inspect.Parameter.empty]


def check_extension(backend: object, protocol: type) -> bool:
    """Whether ``backend`` implements the extension ``protocol``, checked by shape.

    ``False`` if it has none of the protocol's methods. ``True`` if each is there and can be
    called as the package calls it: the protocol's required arguments by position, and a
    coroutine function where the protocol declares one (``iter_sessions`` returns an async
    iterator: an async generator function). A backend that
    has some of the methods but not all, or one of another shape, raises ``TypeError``
    naming the protocol: the package never calls a method it would crash.
    """
    methods = _declared(protocol)
    present = {name for name in methods if callable(getattr(backend, name, None))}
    if not present:
        return False
    where = f"{type(backend).__name__} does not implement sessions_sql.{protocol.__name__}"
    if present != set(methods):
        missing = ", ".join(sorted(set(methods) - present))
        raise TypeError(f"{where}: it lacks {missing}")
    for name, declared in methods.items():
        method = getattr(backend, name)
        if inspect.iscoroutinefunction(declared) != inspect.iscoroutinefunction(method):
            kind = (
                "a coroutine function (async def)"
                if inspect.iscoroutinefunction(declared)
                else "a function returning an async iterator (an async generator), not async def"
            )
            raise TypeError(f"{where}: {name} must be {kind}")
        signature = _signature(method)
        arguments = _required_arguments(declared)
        if signature is not None:
            try:
                signature.bind(*arguments)
            except TypeError:
                raise TypeError(
                    f"{where}: {name} must accept ({', '.join(arguments)}) by position, "
                    f"but its signature is {name}{signature}"
                ) from None
    return True


def accepts_keyword(method: Callable[..., Any], name: str) -> bool:
    """Whether ``method`` declares a keyword argument ``name`` (or takes ``**kwargs``)."""
    signature = _signature(method)
    if signature is None:
        return False
    for parameter in signature.parameters.values():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            return True
        if parameter.name == name and parameter.kind in (
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            inspect.Parameter.KEYWORD_ONLY,
        ):
            return True
    return False


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


def check_values(values: object, max_bytes: int | None = None) -> dict[str, bytes]:
    """Return a mapping of keys to values, checked (keys as :func:`check_key`, values as
    :func:`check_value`, named by position), as a dict of bytes."""
    if not isinstance(values, Mapping):
        raise TypeError(f"values must be a mapping, not {type(values).__name__}")
    return {
        check_key(key): check_value(value, max_bytes, what=f"values[{i}]")
        for i, (key, value) in enumerate(values.items())
    }


def check_keys(keys: object, what: str = "keys") -> list[str]:
    """Return an iterable of keys (not a single ``str``) as a list without duplicates."""
    if isinstance(keys, (str, bytes)) or not isinstance(keys, Iterable):
        raise TypeError(f"{what} must be an iterable of str, not {type(keys).__name__}")
    return list(dict.fromkeys(check_key(key) for key in keys))


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


# The last whole second a datetime represents everywhere (9999-12-31T23:59:59Z).
_MAX_SECONDS = 253_402_300_799


def _whole_seconds(what: str, moment: object, *, floats: bool) -> int:
    """Whole Unix seconds (rounded down) of an aware datetime or a number, range-checked."""
    kinds = "a timezone-aware datetime or Unix seconds" + ("" if floats else " (an int)")
    if isinstance(moment, datetime):
        if moment.tzinfo is None or moment.utcoffset() is None:
            raise ValueError(f"{what} must be {kinds}: the datetime is naive")
        seconds = math.floor(moment.timestamp())
    elif isinstance(moment, bool) or not isinstance(moment, (int, float) if floats else int):
        raise TypeError(f"{what} must be {kinds}, not {type(moment).__name__}")
    elif isinstance(moment, float) and not math.isfinite(moment):
        raise ValueError(f"{what} must be a finite number of seconds")
    else:
        seconds = math.floor(moment)
    if not 0 <= seconds <= _MAX_SECONDS:
        raise ValueError(f"{what} must be between 1970 and 9999, got {seconds} Unix seconds")
    return seconds


def check_expires_at(expires_at: object) -> datetime | None:
    """Return an expiry (int Unix seconds or aware datetime) as an aware UTC datetime in
    whole seconds (rounded down), or ``None`` for ``None``; else raise."""
    if expires_at is None:
        return None
    seconds = _whole_seconds("expires_at", expires_at, floats=False)
    return datetime.fromtimestamp(seconds, timezone.utc)


def check_now(now: object) -> datetime:
    """Return "now" for expiry (``None``: the current time; else Unix seconds or an aware
    datetime) as an aware UTC datetime in whole seconds (rounded down); else raise."""
    seconds = _whole_seconds("now", time.time() if now is None else now, floats=True)
    return datetime.fromtimestamp(seconds, timezone.utc)


# Creation times are whole seconds: a cutoff past any creation time, for an age of zero.
_END_OF_TIME = datetime(9999, 1, 1, tzinfo=timezone.utc)


def created_before_cutoff(now: int, age: int) -> datetime | int:
    """The cutoff selecting the sessions at least ``age`` seconds old at ``now`` (whole Unix
    seconds): ``now - created >= age``. An age of zero selects every session, creation times
    in the future included."""
    # created <= now - age  <=>  created < now - age + 1 (whole seconds).
    return _END_OF_TIME if age == 0 else now - age + 1
