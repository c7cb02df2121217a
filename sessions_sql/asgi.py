"""Server-side sessions for ASGI applications (Starlette, FastAPI, any framework that reads
``scope["session"]``), stored one row per key in a sessions_sql backend.

The cookie holds only a random session id; ``request.session`` is a dict. A request loads its
session with one ``read_session`` call if it carries a cookie, and saves what it changed with
one ``update_session`` call when the response starts. Install with
``pip install 'sessions-sql[starlette]'``.
"""

from __future__ import annotations

import logging
import math
import re
import secrets
import time
from collections.abc import Callable, MutableMapping
from datetime import timedelta
from typing import Any, Literal, NamedTuple

from starlette.requests import HTTPConnection, cookie_parser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sessions_sql import (
    KEEP,
    SessionBackend,
    SessionExpiry,
    SessionsSQLError,
    check_extension,
    decode_value,
    encode_value,
)

# The value format of sessions_sql.Session, so that SessionManager reads what a request stored.
# It should be public API; until it is, it is imported from where it lives.

__all__ = ["SessionData", "SessionMiddleware", "regenerate_session"]

logger = logging.getLogger("sessions_sql.asgi")

#: What secrets.token_urlsafe(32) returns: 43 characters of URL-safe base64. A cookie of any
#: other shape is ignored without asking the database.
_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{43}")
_COOKIE_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # an RFC 6265 token
_EXPIRED = "; Max-Age=0; Expires=Thu, 01 Jan 1970 00:00:00 GMT"
_SAME_SITE = {"lax": "Lax", "strict": "Strict", "none": "None"}


class SessionData(dict[str, Any]):
    """``request.session``: a plain dict of JSON-serialisable values under str keys.

    What changed is found when the response starts, by comparing each value's JSON encoding
    with the stored one, so in-place changes (``request.session["cart"].append(x)``) are
    saved too. ``clear()`` removes the whole session and expires the cookie.
    """

    accessed = False
    rotate = False

    def mark_accessed(self) -> None:
        """Note that the response depends on the session (it then gets ``Vary: Cookie``);
        Starlette's ``request.session`` calls it."""
        self.accessed = True

    def clear(self) -> None:
        """Remove every value; at response time the stored session is removed and the cookie
        expired (values set after ``clear()`` go to a session with a new id)."""
        self.accessed = self.rotate = True
        super().clear()


def regenerate_session(connection: HTTPConnection | MutableMapping[str, Any]) -> None:
    """Give the session a new id when the response starts (call it at login and on every
    privilege change): its values move to the new id, the old session is removed and the
    response sets the new cookie.

    ``connection`` is a Starlette ``Request`` or ``WebSocket``, or an ASGI scope.
    """
    scope = connection.scope if isinstance(connection, HTTPConnection) else connection
    session = scope.get("session")
    if not isinstance(session, SessionData):
        raise TypeError("regenerate_session needs sessions_sql.asgi.SessionMiddleware installed")
    session.rotate = True


def _seconds(name: str, value: object) -> int | None:
    """A timeout given as a timedelta or seconds, in whole seconds (rounded up), or None."""
    if value is None:
        return None
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise TypeError(f"{name} must be a timedelta, seconds or None, not {type(value).__name__}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{name} must be positive")
    return math.ceil(seconds)


def _add_vary_cookie(headers: list[tuple[bytes, bytes]]) -> None:
    """Add ``Cookie`` to the response's ``Vary`` header (or add the header)."""
    for i, (name, value) in enumerate(headers):
        if name.lower() == b"vary":
            if b"cookie" not in value.lower() and value.strip() != b"*":
                headers[i] = (name, value + b", Cookie")
            return
    headers.append((b"vary", b"Cookie"))


def _failure(error: BaseException) -> str:
    """An exception for a log record: our own messages name no id; others only by type."""
    if isinstance(error, SessionsSQLError):
        return f"{type(error).__name__}: {error}"
    return type(error).__name__


class SessionMiddleware:
    """Server-side sessions in a sessions_sql backend, as ``scope["session"]``.

    ``backend`` must implement :class:`~sessions_sql.SessionExpiry` (SQLAlchemyBackend and
    MemoryBackend do). A session expires ``idle_timeout`` after its last use and
    ``absolute_timeout`` after its creation (each a timedelta or seconds; ``None``: never).
    The cookie is ``HttpOnly`` always, ``Secure`` unless ``secure=False``, with the given
    name, path, domain and ``SameSite``. ``clock`` returns Unix seconds; it must agree with
    the database's clock, which sets creation times.
    """

    def __init__(
        self,
        app: ASGIApp,
        backend: SessionBackend,
        *,
        idle_timeout: timedelta | float | None = timedelta(minutes=30),
        absolute_timeout: timedelta | float | None = timedelta(hours=8),
        cookie_name: str = "session",
        cookie_path: str = "/",
        cookie_domain: str | None = None,
        secure: bool = True,
        same_site: Literal["lax", "strict", "none"] = "lax",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(backend, SessionBackend) or not check_extension(backend, SessionExpiry):
            raise TypeError(
                "backend must be a sessions_sql backend implementing sessions_sql.SessionExpiry "
                f"(SQLAlchemyBackend, MemoryBackend), not {type(backend).__name__}"
            )
        self.app = app
        self.backend: Any = backend  # a SessionBackend with the SessionExpiry methods
        self.idle_timeout = _seconds("idle_timeout", idle_timeout)
        self.absolute_timeout = _seconds("absolute_timeout", absolute_timeout)
        # A read-only request pushes the idle expiry forward only once it would move this far.
        self.refresh_interval = None if self.idle_timeout is None else self.idle_timeout / 10
        if not isinstance(cookie_name, str) or not _COOKIE_NAME.fullmatch(cookie_name):
            raise ValueError("cookie_name must be a non-empty cookie token (letters, digits, -_.)")
        if not isinstance(cookie_path, str) or not cookie_path.startswith("/"):
            raise ValueError("cookie_path must be a str starting with /")
        if cookie_domain is not None and not isinstance(cookie_domain, str):
            raise TypeError(f"cookie_domain must be a str or None, not {type(cookie_domain)}")
        for what, text in (("cookie_path", cookie_path), ("cookie_domain", cookie_domain or "")):
            if any(c in text for c in ";,\r\n\t ") or not text.isprintable():
                raise ValueError(f"{what} must not contain ';', ',', spaces or control characters")
        if same_site not in _SAME_SITE:
            raise ValueError("same_site must be 'lax', 'strict' or 'none'")
        if same_site == "none" and not secure:
            raise ValueError("same_site='none' needs secure=True (browsers refuse it otherwise)")
        if not callable(clock):
            raise TypeError("clock must be a callable returning Unix seconds")
        self.cookie_name = cookie_name
        self.clock = clock
        attributes = f"; Path={cookie_path}"
        if cookie_domain:
            attributes += f"; Domain={cookie_domain}"
        attributes += "; HttpOnly"
        if secure:
            attributes += "; Secure"
        self._attributes = attributes + f"; SameSite={_SAME_SITE[same_site]}"
        self._cookie_key = cookie_name + "="

    def __repr__(self) -> str:
        return (
            f"SessionMiddleware(backend={self.backend!r}, idle_timeout={self.idle_timeout}, "
            f"absolute_timeout={self.absolute_timeout}, cookie_name={self.cookie_name!r})"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        cookie = self._cookie(scope)
        exchange = _Exchange(self, cookie)
        if cookie is not None:
            await exchange.load()
        scope["session"] = exchange.session
        http = scope["type"] == "http"
        start = "http.response.start" if http else "websocket.accept"

        async def send_wrapper(message: Message) -> None:
            if message["type"] == start:
                cookie = await exchange.store(message) if exchange.pending() else None
                exchange.respond(message, cookie, vary=http)
            await send(message)

        await self.app(scope, receive, send_wrapper)
        if not http and exchange.saved and exchange.pending():
            await exchange.store(None)  # what changed after the handshake

    def _cookie(self, scope: Scope) -> str | None:
        """The session cookie's value, if the request carries one."""
        for name, value in scope["headers"]:
            if name == b"cookie":
                text = value.decode("latin-1")
                if self._cookie_key in text:
                    cookie = cookie_parser(text).get(self.cookie_name)
                    if cookie is not None:
                        return cookie
        return None

    def _set_cookie(self, session_id: str, max_age: int | None) -> str:
        """The Set-Cookie value for a session id (no Max-Age: a browser-session cookie)."""
        tail = "" if max_age is None else f"; Max-Age={max_age}"
        return f"{self.cookie_name}={session_id}{tail}{self._attributes}"

    def _expired_cookie(self) -> str:
        return f"{self.cookie_name}={_EXPIRED}{self._attributes}"


class _Stored(NamedTuple):
    """A value as loaded: its own expiry (from sessions_sql.Session.expire), its bytes, and
    the object decoded from them."""

    expires_at: int | None
    data: bytes
    value: Any


#: Values that cannot change in place: the very object loaded is the value stored.
_IMMUTABLE = (str, int, float, bool, type(None))


class _Exchange:
    """One request's session: what was loaded, and the save at response time."""

    __slots__ = (
        "cookie",
        "created_at",
        "expires_at",
        "loaded",
        "middleware",
        "saved",
        "session",
        "session_id",
    )

    def __init__(self, middleware: SessionMiddleware, cookie: str | None) -> None:
        self.middleware = middleware
        self.cookie = cookie
        self.session_id: str | None = None  # the id of a live stored session, never the client's
        self.created_at = 0
        self.expires_at: int | None = None
        self.loaded: dict[str, _Stored] = {}
        self.session = SessionData()
        self.saved = False

    async def load(self) -> None:
        """Read the session the cookie names, if it exists and has not expired."""
        cookie = self.cookie
        if cookie is None or not _SESSION_ID.fullmatch(cookie):
            return
        m = self.middleware
        try:
            snapshot = await m.backend.read_session(cookie)
        except Exception as error:
            logger.error("loading the session failed: %s", _failure(error))
            raise
        if snapshot is None:
            return
        now = math.floor(m.clock())
        if snapshot.expires_at is not None and snapshot.expires_at < now:
            return
        if m.absolute_timeout is not None and snapshot.created_at + m.absolute_timeout < now:
            return
        self.session_id, self.created_at = cookie, snapshot.created_at
        self.expires_at = snapshot.expires_at
        for key, data in snapshot.values.items():
            key_expiry, value = decode_value(data)
            if key_expiry is None or key_expiry >= now:
                self.loaded[key] = _Stored(key_expiry, data, value)
        self.session.update({key: stored.value for key, stored in self.loaded.items()})

    def _changed(self) -> dict[str, bytes]:
        """The encoding of every value that is new or differs from what was loaded (a value
        changed in place included: its JSON encoding differs)."""
        changed = {}
        loaded = self.loaded
        for key, value in self.session.items():
            stored = loaded.get(key)
            if stored is None:
                changed[key] = encode_value(value)
            elif not (value is stored.value and isinstance(value, _IMMUTABLE)):
                data = encode_value(value, stored.expires_at)
                if data != stored.data:
                    changed[key] = data
        return changed

    def pending(self) -> bool:
        """Whether saving may have something to do: a session was loaded, has values, or is
        to be rotated. Not so for the common request without a session."""
        session = self.session
        return bool(session) or bool(self.loaded) or session.rotate

    async def store(self, message: Message | None) -> str | None:
        """Write what changed; return the Set-Cookie value if the cookie changes."""
        m, session = self.middleware, self.session
        changed = self._changed()
        now = math.floor(m.clock())
        try:
            if self.session_id is None or session.rotate:
                return await self._save_new(message, changed, now)
            return await self._save_existing(changed, now)
        except Exception as error:
            if not isinstance(error, (TypeError, ValueError, RuntimeError)):
                logger.error("saving the session failed: %s", _failure(error))
            raise

    def respond(self, message: Message, cookie: str | None, *, vary: bool) -> None:
        """Add Set-Cookie (and ``Vary: Cookie``) to the response's headers."""
        self.saved = True
        if cookie is not None or (vary and self.session.accessed):
            headers = list(message.get("headers", ()))
            if vary:
                _add_vary_cookie(headers)
            if cookie is not None:
                headers.append((b"set-cookie", cookie.encode("latin-1")))
            message["headers"] = headers

    async def _save_new(
        self, message: Message | None, changed: dict[str, bytes], now: int
    ) -> str | None:
        """A first value, ``regenerate_session`` or ``clear()``: the values (if any) go to a
        new id, then the old session (if any) is removed."""
        m, old, loaded = self.middleware, self.session_id, self.loaded
        values = {key: changed[key] if key in changed else loaded[key].data for key in self.session}
        cookie = None
        if values:
            if message is None:
                raise RuntimeError(
                    "a new session id cannot reach the client after the WebSocket handshake: "
                    "set the first value, regenerate_session or clear before accept()"
                )
            new_id = secrets.token_urlsafe(32)
            expires_at = min(
                (now + t for t in (m.idle_timeout, m.absolute_timeout) if t is not None),
                default=None,
            )
            await m.backend.update_session(new_id, values, expires_at=expires_at)
            self.session_id, self.created_at, self.expires_at = new_id, now, expires_at
            cookie = m._set_cookie(new_id, None if expires_at is None else expires_at - now)
        else:
            self.session_id = None
            if self.cookie is not None:
                cookie = m._expired_cookie()
        self._rebase(values)
        self.session.rotate = False
        if old is not None:
            await m.backend.remove_session(old)
        return cookie

    async def _save_existing(self, changed: dict[str, bytes], now: int) -> str | None:
        """Write the changed keys, remove the deleted ones and push the idle expiry, in one
        update_session call; return the refreshed cookie if the expiry moved."""
        m, session = self.middleware, self.session
        removed = [key for key in self.loaded if key not in session]
        expires_at: int | None = None
        if m.idle_timeout is not None:
            candidate = now + m.idle_timeout
            if m.absolute_timeout is not None:
                candidate = min(candidate, self.created_at + m.absolute_timeout)
            assert m.refresh_interval is not None
            if self.expires_at is None or candidate - self.expires_at >= m.refresh_interval:
                expires_at = candidate
        if not changed and not removed and expires_at is None:
            return None
        assert self.session_id is not None
        await m.backend.update_session(
            self.session_id,
            changed or None,
            remove=removed,
            expires_at=KEEP if expires_at is None else expires_at,
        )
        self._rebase(changed)
        if expires_at is None:
            return None
        self.expires_at = expires_at
        return m._set_cookie(self.session_id, max(0, expires_at - now))

    def _rebase(self, written: dict[str, bytes]) -> None:
        """After a save, what is stored is the baseline of the next one (a WebSocket saves
        again when its handler returns)."""
        loaded = self.loaded
        self.loaded = {
            key: _Stored(loaded[key].expires_at if key in loaded else None, written[key], value)
            if key in written
            else loaded[key]
            for key, value in self.session.items()
        }
