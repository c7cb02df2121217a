"""sessions_sql.asgi.SessionMiddleware under a real Starlette application, on every backend.

Requests go through httpx's ASGI transport (the network edge, in-process) with httpx's cookie
jar, over https so that the default ``Secure`` cookie travels.
"""

from __future__ import annotations

import asyncio
import logging
import re
import subprocess
import sys
from collections.abc import AsyncIterator, MutableMapping
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.pool import NullPool
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.websockets import WebSocket

from sessions_sql import MemoryBackend, SessionManager, SQLAlchemyBackend
from sessions_sql.asgi import SessionData, SessionMiddleware, regenerate_session

from .conftest import guard
from .pgproxy import counting_round_trips
from .web import Clock, put, show

IDLE = 1800
ABSOLUTE = 8 * 3600
SESSION_ID = re.compile(r"[A-Za-z0-9_-]{43}")


async def delete(request: Request) -> Response:
    for key in await request.json():
        del request.session[key]
    return JSONResponse(dict(request.session))


async def add_to_cart(request: Request) -> Response:
    request.session.setdefault("cart", [])
    request.session["cart"].append(request.path_params["item"])  # changed in place
    return JSONResponse(dict(request.session))


async def login(request: Request) -> Response:
    regenerate_session(request)
    request.session["user_id"] = 42
    return JSONResponse(dict(request.session))


async def logout(request: Request) -> Response:
    request.session.clear()
    return JSONResponse(dict(request.session))


async def plain(request: Request) -> Response:
    return PlainTextResponse("no session used")


async def varying(request: Request) -> Response:
    return PlainTextResponse(str(request.session.get("k")), headers={"Vary": "Accept-Encoding"})


async def unserialisable(request: Request) -> Response:
    request.session["when"] = {1, 2}
    return PlainTextResponse("unreachable if saving fails")


ROUTES = [
    Route("/", show),
    Route("/put", put, methods=["POST"]),
    Route("/delete", delete, methods=["POST"]),
    Route("/cart/{item}", add_to_cart, methods=["POST"]),
    Route("/login", login, methods=["POST"]),
    Route("/logout", logout, methods=["POST"]),
    Route("/plain", plain),
    Route("/varying", varying),
    Route("/unserialisable", unserialisable, methods=["POST"]),
]


def make_app(backend: Any, clock: Clock, routes: list[Any] = ROUTES, **options: Any) -> Starlette:
    options.setdefault("idle_timeout", IDLE)
    options.setdefault("absolute_timeout", ABSOLUTE)
    middleware = [Middleware(SessionMiddleware, backend=backend, clock=clock, **options)]
    return Starlette(routes=routes, middleware=middleware)


def client_for(app: Starlette) -> httpx.AsyncClient:
    # Errors become 500 responses, as a server would send them.
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="https://testserver")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def client(any_backend: Any, clock: Clock) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(make_app(any_backend, clock)) as client:
        yield client


def set_cookies(response: httpx.Response) -> list[str]:
    return response.headers.get_list("set-cookie")


def cookie_id(response: httpx.Response) -> str:
    (header,) = set_cookies(response)
    match = re.match(r"session=([^;]*);", header)
    assert match is not None, header
    return match.group(1)


async def stored(backend: Any, session_id: str) -> dict[str, Any]:
    """What the session layer reads from the store: the values as sessions_sql.Session sees
    them."""
    snapshot = await backend.read_session(session_id)
    if snapshot is None:
        return {}
    session = SessionManager(backend).get_session(session_id)
    return {key: await session.get(key) for key in snapshot.values}


async def test_cookie_holds_only_a_random_id_and_values_use_the_session_format(
    client: httpx.AsyncClient, any_backend: Any
) -> None:
    response = await client.post("/put", json={"user": {"id": 42, "name": "Ada"}, "n": 1})
    session_id = cookie_id(response)
    assert SESSION_ID.fullmatch(session_id)
    assert "Ada" not in set_cookies(response)[0]
    assert await stored(any_backend, session_id) == {"user": {"id": 42, "name": "Ada"}, "n": 1}
    assert (await client.get("/")).json() == {"user": {"id": 42, "name": "Ada"}, "n": 1}
    # A second session gets another id: nothing is derived from the request.
    async with client_for(client._transport.app) as other:  # type: ignore[attr-defined]
        assert cookie_id(await other.post("/put", json={"n": 1})) != session_id


async def test_a_request_that_changes_nothing_creates_nothing(
    client: httpx.AsyncClient, any_backend: Any
) -> None:
    for path in ("/", "/plain"):
        response = await client.get(path)
        assert response.status_code == 200
        assert set_cookies(response) == []
    assert (await client.post("/put", json={})).status_code == 200
    assert set_cookies(await client.post("/delete", json=[])) == []
    assert await any_backend.get_sessions() == []


async def test_unknown_and_malformed_ids_are_never_adopted(
    client: httpx.AsyncClient, any_backend: Any
) -> None:
    chosen = "A" * 43  # the shape of a real id, but no such session
    for cookie in (chosen, "short", "x" * 300, "A" * 42 + "!"):
        client.cookies.set("session", cookie, domain="testserver.local")
        assert (await client.get("/")).json() == {}
        response = await client.post("/put", json={"k": 1})
        new_id = cookie_id(response)
        assert new_id != cookie and SESSION_ID.fullmatch(new_id)
        client.cookies.clear()
    assert await any_backend.read_session(chosen) is None
    assert len(await any_backend.get_sessions()) == 4


async def test_idle_expiry_ignores_the_session(
    client: httpx.AsyncClient, any_backend: Any, clock: Clock
) -> None:
    old_id = cookie_id(await client.post("/put", json={"k": 1}))
    assert await any_backend.get_session_expiry(old_id) == int(clock.now) + IDLE
    clock.advance(IDLE)  # the last second of the session: still there (and pushed forward)
    assert (await client.get("/")).json() == {"k": 1}
    clock.advance(IDLE + 1)
    assert (await client.get("/")).json() == {}
    new_id = cookie_id(await client.post("/put", json={"j": 2}))
    assert new_id != old_id
    assert await stored(any_backend, new_id) == {"j": 2}
    assert await stored(any_backend, old_id) == {"k": 1}  # untouched, left to the collector


async def test_absolute_timeout_counts_from_creation(
    client: httpx.AsyncClient, any_backend: Any, clock: Clock
) -> None:
    session_id = cookie_id(await client.post("/put", json={"k": 1}))
    # However the expiry was pushed (here: far beyond, as an older configuration might have),
    # the creation time bounds the session.
    await any_backend.set_session_expiry(session_id, int(clock.now) + 10 * ABSOLUTE)
    clock.advance(ABSOLUTE - 5)
    assert (await client.get("/")).json() == {"k": 1}
    clock.advance(10)
    assert (await client.get("/")).json() == {}


async def test_idle_expiry_is_pushed_at_most_once_per_tenth_of_the_timeout(
    client: httpx.AsyncClient, any_backend: Any, clock: Clock
) -> None:
    session_id = cookie_id(await client.post("/put", json={"k": 1}))
    created = int(clock.now)
    for _ in range(3):  # read-only requests within a tenth of the idle timeout: no write
        clock.advance(IDLE / 10 / 4)
        response = await client.get("/")
        assert set_cookies(response) == []
        assert await any_backend.get_session_expiry(session_id) == created + IDLE
    clock.advance(IDLE / 10 / 4)  # now a full tenth later: pushed, and the cookie with it
    response = await client.get("/")
    assert await any_backend.get_session_expiry(session_id) == int(clock.now) + IDLE
    (header,) = set_cookies(response)
    assert header.startswith(f"session={session_id};") and f"Max-Age={IDLE};" in header
    # A writing request within the interval writes its key but keeps expiry and cookie.
    clock.advance(1)
    pushed = int(clock.now) - 1 + IDLE
    response = await client.post("/put", json={"k": 2})
    assert set_cookies(response) == []
    assert await any_backend.get_session_expiry(session_id) == pushed
    assert await stored(any_backend, session_id) == {"k": 2}


async def test_the_idle_push_stops_at_the_absolute_deadline(any_backend: Any, clock: Clock) -> None:
    app = make_app(any_backend, clock, idle_timeout=1000, absolute_timeout=2500)
    async with client_for(app) as client:
        session_id = cookie_id(await client.post("/put", json={"k": 1}))
        created = await any_backend.get_session_age(session_id)
        clock.advance(900)
        await client.get("/")
        assert await any_backend.get_session_expiry(session_id) == int(clock.now) + 1000
        clock.advance(900)
        response = await client.get("/")
        assert await any_backend.get_session_expiry(session_id) == created + 2500
        assert f"Max-Age={created + 2500 - int(clock.now)};" in set_cookies(response)[0]


async def test_only_changed_and_removed_keys_are_written(any_backend: Any, clock: Clock) -> None:
    async def change_a_while_another_writer_changes_b(request: Request) -> Response:
        assert request.session["b"] == "old"
        # Another writer changes b after this request loaded it.
        session_id = request.cookies["session"]
        await SessionManager(any_backend).get_session(session_id).set("b", "theirs")
        request.session["a"] = "mine"
        del request.session["c"]
        return PlainTextResponse("ok")

    routes = [*ROUTES, Route("/change-a", change_a_while_another_writer_changes_b)]
    async with client_for(make_app(any_backend, clock, routes=routes)) as client:
        session_id = cookie_id(await client.post("/put", json={"a": 1, "b": "old", "c": 3}))
        assert (await client.get("/change-a")).status_code == 200
        assert await stored(any_backend, session_id) == {"a": "mine", "b": "theirs"}


async def test_in_place_changes_are_saved(client: httpx.AsyncClient, any_backend: Any) -> None:
    await client.post("/cart/apple")
    response = await client.post("/cart/pear")
    assert response.json() == {"cart": ["apple", "pear"]}
    assert set_cookies(response) == []  # the same session: the cookie is not sent again
    session_id = client.cookies["session"]
    assert await stored(any_backend, session_id) == {"cart": ["apple", "pear"]}


async def test_concurrent_requests_changing_different_keys_both_keep_their_change(
    any_backend: Any, clock: Clock
) -> None:
    arrived: list[str] = []
    both_loaded = asyncio.Event()

    async def set_after_the_other_loaded(request: Request) -> Response:
        key = request.path_params["key"]
        arrived.append(key)  # this request's session is loaded by now
        if len(arrived) == 2:
            both_loaded.set()
        await guard(both_loaded.wait(), "the other request")
        request.session[key] = f"set by {key}"
        return JSONResponse(dict(request.session))

    routes = [*ROUTES, Route("/slow/{key}", set_after_the_other_loaded, methods=["POST"])]
    async with client_for(make_app(any_backend, clock, routes=routes)) as client:
        session_id = cookie_id(await client.post("/put", json={"base": 0}))
        one, two = await asyncio.gather(client.post("/slow/one"), client.post("/slow/two"))
        # Each request saw only its own change ...
        assert one.json() == {"base": 0, "one": "set by one"}
        assert two.json() == {"base": 0, "two": "set by two"}
        # ... and the store kept both.
        expected = {"base": 0, "one": "set by one", "two": "set by two"}
        assert await stored(any_backend, session_id) == expected
        assert (await client.get("/")).json() == expected


async def test_regenerate_session_moves_the_values_and_removes_the_old_session(
    client: httpx.AsyncClient, any_backend: Any
) -> None:
    old_id = cookie_id(await client.post("/put", json={"cart": ["apple"]}))
    response = await client.post("/login")
    new_id = cookie_id(response)
    assert new_id != old_id
    assert await any_backend.read_session(old_id) is None
    assert await stored(any_backend, new_id) == {"cart": ["apple"], "user_id": 42}
    assert (await client.get("/")).json() == {"cart": ["apple"], "user_id": 42}
    # The old id, presented again (a fixated or stolen one), is nobody's session.
    async with client_for(client._transport.app) as attacker:  # type: ignore[attr-defined]
        attacker.cookies.set("session", old_id, domain="testserver.local")
        assert (await attacker.get("/")).json() == {}


async def test_regenerate_without_a_session_creates_one(client: httpx.AsyncClient) -> None:
    response = await client.post("/login")
    assert SESSION_ID.fullmatch(cookie_id(response))
    assert (await client.get("/")).json() == {"user_id": 42}


async def test_clear_removes_the_session_and_expires_the_cookie(
    client: httpx.AsyncClient, any_backend: Any
) -> None:
    session_id = cookie_id(await client.post("/login"))
    response = await client.post("/logout")
    (header,) = set_cookies(response)
    assert header.startswith("session=;") and "Max-Age=0" in header
    assert await any_backend.get_sessions() == []
    assert "session" not in client.cookies
    assert (await client.get("/")).json() == {}
    # Clearing with no session at all sends nothing.
    assert set_cookies(await client.post("/logout")) == []
    assert await any_backend.read_session(session_id) is None


async def test_emptying_a_session_key_by_key_keeps_it(
    client: httpx.AsyncClient, any_backend: Any
) -> None:
    session_id = cookie_id(await client.post("/put", json={"a": 1, "b": 2}))
    response = await client.post("/delete", json=["a", "b"])
    assert set_cookies(response) == []
    snapshot = await any_backend.read_session(session_id)
    assert snapshot is not None and snapshot.values == {}


async def test_cookie_attributes(any_backend: Any, clock: Clock) -> None:
    async with client_for(make_app(any_backend, clock)) as client:
        (header,) = set_cookies(await client.post("/put", json={"k": 1}))
        attributes = header.split("; ")[1:]
        assert sorted(attributes) == sorted(
            [f"Max-Age={IDLE}", "Path=/", "HttpOnly", "Secure", "SameSite=Lax"]
        )
    options = {
        "cookie_name": "sid",
        "cookie_path": "/app",
        "cookie_domain": "example.org",
        "secure": False,
        "same_site": "strict",
        "idle_timeout": None,
    }
    app = make_app(any_backend, clock, routes=[Mount("/app", routes=ROUTES)], **options)
    async with client_for(app) as client:
        (header,) = set_cookies(await client.post("/app/put", json={"k": 1}))
        assert header.startswith("sid=")
        assert sorted(header.split("; ")[1:]) == sorted(
            [f"Max-Age={ABSOLUTE}", "Path=/app", "Domain=example.org", "HttpOnly",
             "SameSite=Strict"]
        )  # fmt: skip
    app = make_app(any_backend, clock, idle_timeout=None, absolute_timeout=None)
    async with client_for(app) as client:
        (header,) = set_cookies(await client.post("/put", json={"k": 1}))
        assert "Max-Age" not in header  # no timeout: a browser-session cookie
        assert await any_backend.get_session_expiry(cookie_id(await client.post("/login"))) is None


async def test_vary_cookie_on_responses_that_read_the_session(
    client: httpx.AsyncClient,
) -> None:
    assert (await client.get("/")).headers.get("vary") == "Cookie"
    assert "vary" not in (await client.get("/plain")).headers
    assert (await client.get("/varying")).headers.get_list("vary") == ["Accept-Encoding, Cookie"]
    await client.post("/put", json={"k": 1})
    assert (await client.get("/")).headers.get("vary") == "Cookie"
    assert "vary" not in (await client.get("/plain")).headers


async def test_keys_expired_through_the_session_layer_are_hidden_and_kept_expiring(
    client: httpx.AsyncClient, any_backend: Any, clock: Clock
) -> None:
    session_id = cookie_id(await client.post("/put", json={"gone": 1, "soon": 2}))
    manager = SessionManager(any_backend, clock=clock)
    await manager.get_session(session_id).expire("gone", 0)
    await manager.get_session(session_id).expire("soon", 100)
    clock.advance(1)
    assert (await client.get("/")).json() == {"soon": 2}
    await client.post("/put", json={"soon": 3})
    assert await manager.get_session(session_id).get("soon") == 3
    clock.advance(100)
    assert await manager.get_session(session_id).get("soon") is None  # its expiry was kept


async def test_a_value_that_is_not_json_fails_the_request_and_writes_nothing(
    client: httpx.AsyncClient, any_backend: Any
) -> None:
    session_id = cookie_id(await client.post("/put", json={"k": 1}))
    response = await client.post("/unserialisable")
    assert response.status_code == 500
    assert set_cookies(response) == []
    assert await stored(any_backend, session_id) == {"k": 1}


async def test_websocket_sessions(any_backend: Any, clock: Clock) -> None:
    seen: list[dict[str, Any]] = []

    async def socket(websocket: WebSocket) -> None:
        seen.append(dict(websocket.session))
        step = websocket.query_params.get("step")
        if step == "login":
            regenerate_session(websocket)
            websocket.session["user_id"] = 7
        await websocket.accept()
        if step == "after":
            websocket.session["after"] = True
        if step == "new-after":
            websocket.session["x"] = 1  # no session yet and the handshake is over
        await websocket.close()

    app = make_app(any_backend, clock, routes=[WebSocketRoute("/ws", socket)])

    async def connect(query: str, cookie: str | None) -> list[dict[str, Any]]:
        headers = [] if cookie is None else [(b"cookie", f"session={cookie}".encode())]
        scope = {
            "type": "websocket", "path": "/ws", "raw_path": b"/ws", "root_path": "",
            "query_string": query.encode(), "headers": headers, "scheme": "wss",
            "server": ("testserver", 443), "client": ("127.0.0.1", 5000), "subprotocols": [],
            "asgi": {"version": "3.0"},
        }  # fmt: skip
        incoming = [{"type": "websocket.connect"}]
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return incoming.pop(0) if incoming else {"type": "websocket.disconnect"}

        async def send(message: MutableMapping[str, Any]) -> None:
            sent.append(dict(message))

        await app(scope, receive, send)
        return sent

    sent = await connect("step=login", None)
    accept = sent[0]
    assert accept["type"] == "websocket.accept"
    (header,) = [v.decode() for k, v in accept["headers"] if k == b"set-cookie"]
    session_id = header.split(";")[0].removeprefix("session=")
    assert await stored(any_backend, session_id) == {"user_id": 7}
    await connect("step=after", session_id)
    assert seen[-1] == {"user_id": 7}
    assert await stored(any_backend, session_id) == {"user_id": 7, "after": True}
    with pytest.raises(RuntimeError, match="after the WebSocket handshake"):
        await connect("step=new-after", None)
    assert len(await any_backend.get_sessions()) == 1


def test_bad_configuration_is_refused() -> None:
    backend = MemoryBackend()
    plain = Starlette()

    class SixMethodsOnly:
        async def get_sessions(self) -> list[str]:
            return []

        async def get_session_age(self, session_id: str) -> int | None:
            return None

        async def remove_session(self, session_id: str) -> None: ...

        async def read_value(self, session_id: str, key: str) -> bytes | None:
            return None

        async def write_value(self, session_id: str, key: str, value: bytes) -> None: ...

        async def remove_value(self, session_id: str, key: str) -> None: ...

    with pytest.raises(TypeError, match="SessionExpiry"):
        SessionMiddleware(plain, backend=SixMethodsOnly())
    with pytest.raises(TypeError, match="SessionExpiry"):
        SessionMiddleware(plain, backend=object())  # type: ignore[arg-type]
    bad: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({"idle_timeout": 0}, ValueError, "idle_timeout"),
        ({"idle_timeout": "30m"}, TypeError, "idle_timeout"),
        ({"absolute_timeout": -1}, ValueError, "absolute_timeout"),
        ({"absolute_timeout": True}, TypeError, "absolute_timeout"),
        ({"cookie_name": "a b"}, ValueError, "cookie_name"),
        ({"cookie_name": ""}, ValueError, "cookie_name"),
        ({"cookie_path": "app"}, ValueError, "cookie_path"),
        ({"cookie_path": "/a;b"}, ValueError, "cookie_path"),
        ({"cookie_domain": "a.org; x=y"}, ValueError, "cookie_domain"),
        ({"same_site": "never"}, ValueError, "same_site"),
        ({"same_site": "none", "secure": False}, ValueError, "secure"),
        ({"clock": 5}, TypeError, "clock"),
    ]
    for options, error, word in bad:
        with pytest.raises(error, match=word):
            SessionMiddleware(plain, backend=backend, **options)


async def test_regenerate_session_needs_the_middleware() -> None:
    with pytest.raises(TypeError, match="SessionMiddleware"):
        regenerate_session({"type": "http", "session": {}})
    session = SessionData()
    regenerate_session({"type": "http", "session": session})
    assert session.rotate


# PostgreSQL: round trips on the wire, and what a failing database does to a request.


async def test_round_trips_per_request_kind(postgres_url: str) -> None:
    clock = Clock()
    async with (
        counting_round_trips(postgres_url) as (proxy, proxied),
        SQLAlchemyBackend.from_url(proxied, pool_size=1, max_overflow=0) as backend,
    ):
        client = client_for(make_app(backend, clock))

        async def trips(method: str, path: str, **kw: Any) -> int:
            before = proxy.round_trips
            response = await client.request(method, path, **kw)
            assert response.status_code == 200, response.text
            return proxy.round_trips - before

        async with client:
            await trips("POST", "/put", json={"warm": 1})  # connect and prepare statements
            await trips("GET", "/")
            await trips("POST", "/put", json={"warm": 2})
            await trips("POST", "/login")
            await trips("POST", "/logout")
            clock.advance(IDLE / 10)
            assert await trips("GET", "/") == 0  # no cookie (logged out): no database at all
            assert await trips("POST", "/put", json={"k": 1}) == 1  # a new session: one write
            assert await trips("GET", "/") == 1  # read-only: one read
            assert await trips("POST", "/put", json={"k": 2, "j": 3}) == 2  # read, one write
            assert await trips("POST", "/delete", json=["j"]) == 2
            clock.advance(IDLE / 10)
            assert await trips("GET", "/") == 2  # read-only, idle expiry due: read, push
            assert await trips("GET", "/") == 1
            assert await trips("POST", "/login") == 3  # read, write the new id, remove the old
            assert await trips("POST", "/logout") == 2  # read, remove
            client.cookies.set("session", "A" * 43, domain="testserver.local")
            assert await trips("GET", "/") == 1  # an unknown id costs its read, nothing more


@pytest.fixture
async def pg_backend(postgres_url: str) -> AsyncIterator[SQLAlchemyBackend]:
    async with SQLAlchemyBackend.from_url(postgres_url) as backend:
        yield backend
        async with backend.engine.begin() as conn:
            await conn.execute(text("TRUNCATE sessions, session_values"))


async def failing(backend: SQLAlchemyBackend, table: str, operations: str) -> None:
    """Make the database refuse these operations on the table, as a full disk would."""
    async with backend.engine.begin() as conn:
        await conn.execute(
            text(
                "CREATE OR REPLACE FUNCTION sessions_sql_test_fail() RETURNS trigger AS "
                "$$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$ LANGUAGE plpgsql"
            )
        )
        await conn.execute(
            text(
                f"CREATE TRIGGER sessions_sql_test_fail BEFORE {operations} ON {table} "
                "FOR EACH ROW EXECUTE FUNCTION sessions_sql_test_fail()"
            )
        )


async def working(backend: SQLAlchemyBackend, table: str) -> None:
    async with backend.engine.begin() as conn:
        await conn.execute(text(f"DROP TRIGGER sessions_sql_test_fail ON {table}"))


async def test_a_failed_load_is_a_500_never_an_empty_session(
    pg_backend: SQLAlchemyBackend, postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    async with client_for(make_app(pg_backend, clock)) as client:
        session_id = cookie_id(await client.post("/put", json={"k": 1}))
    async with counting_round_trips(postgres_url) as (proxy, proxied):
        down = SQLAlchemyBackend.from_url(proxied, poolclass=NullPool)
        await proxy.close()  # the database is unreachable from here on
        async with client_for(make_app(down, clock)) as client:
            client.cookies.set("session", session_id, domain="testserver.local")
            with caplog.at_level(logging.ERROR, logger="sessions_sql.asgi"):
                response = await client.post("/put", json={"k": "overwritten?"})
        await down.close()
    assert response.status_code == 500
    assert set_cookies(response) == []
    assert await stored(pg_backend, session_id) == {"k": 1}
    (record,) = [r for r in caplog.records if r.name == "sessions_sql.asgi"]
    assert record.getMessage().startswith("loading the session failed: BackendError")
    assert session_id not in record.getMessage()


async def test_a_failed_save_is_a_500_and_keeps_the_stored_session(
    pg_backend: SQLAlchemyBackend, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    async with client_for(make_app(pg_backend, clock)) as client:
        session_id = cookie_id(await client.post("/put", json={"k": 1}))
        await failing(pg_backend, "session_values", "INSERT OR UPDATE")
        try:
            with caplog.at_level(logging.ERROR, logger="sessions_sql.asgi"):
                response = await client.post("/put", json={"k": 2})
        finally:
            await working(pg_backend, "session_values")
        assert response.status_code == 500
        assert set_cookies(response) == []
        assert await stored(pg_backend, session_id) == {"k": 1}
        (record,) = [r for r in caplog.records if r.name == "sessions_sql.asgi"]
        assert record.getMessage().startswith("saving the session failed: BackendError")
        assert session_id not in record.getMessage()
        assert (await client.post("/put", json={"k": 3})).status_code == 200


async def test_regenerate_when_removing_the_old_session_fails(
    pg_backend: SQLAlchemyBackend,
) -> None:
    """The new session is written first: if removing the old one fails, the request fails,
    the client keeps its old cookie and the old session is as it was (without the login)."""
    clock = Clock()
    async with client_for(make_app(pg_backend, clock)) as client:
        old_id = cookie_id(await client.post("/put", json={"cart": ["apple"]}))
        await failing(pg_backend, "sessions", "DELETE")
        try:
            response = await client.post("/login")
        finally:
            await working(pg_backend, "sessions")
        assert response.status_code == 500
        assert set_cookies(response) == []
        assert client.cookies["session"] == old_id
        assert (await client.get("/")).json() == {"cart": ["apple"]}
        # The new session holds the login but its id never left the server; it expires.
        others = [sid for sid in await pg_backend.get_sessions() if sid != old_id]
        assert [await stored(pg_backend, sid) for sid in others] == [
            {"cart": ["apple"], "user_id": 42}
        ]
        assert await pg_backend.get_session_expiry(others[0]) == int(clock.now) + IDLE


def test_importing_sessions_sql_imports_no_framework() -> None:
    code = (
        "import sys, sessions_sql, sessions_sql.testing\n"
        "loaded = {'starlette', 'starsessions', 'fastapi', 'httpx'} & set(sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
