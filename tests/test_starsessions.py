"""sessions_sql.starsessions.SQLStore in starsessions' own middleware, on every backend,
side by side with starsessions' InMemoryStore: the same requests must behave the same."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starsessions import (
    InMemoryStore,
    SessionAutoloadMiddleware,
    SessionMiddleware,
    SessionStore,
    regenerate_session_id,
)

from sessions_sql import MemoryBackend
from sessions_sql.starsessions import SQLStore

from .web import Clock, put, show


async def login(request: Request) -> Response:
    regenerate_session_id(request)
    request.session["user_id"] = 42
    return JSONResponse(dict(request.session))


async def logout(request: Request) -> Response:
    request.session.clear()
    return JSONResponse({})


ROUTES = [
    Route("/", show),
    Route("/put", put, methods=["POST"]),
    Route("/login", login, methods=["POST"]),
    Route("/logout", logout, methods=["POST"]),
]


def client_for(store: SessionStore, **options: Any) -> httpx.AsyncClient:
    app = Starlette(
        routes=ROUTES,
        middleware=[
            Middleware(SessionMiddleware, store=store, **options),
            Middleware(SessionAutoloadMiddleware),
        ],
    )
    transport = httpx.ASGITransport(app=app)
    return httpx.AsyncClient(transport=transport, base_url="https://testserver")


def session_cookie(response: httpx.Response) -> str | None:
    for header in response.headers.get_list("set-cookie"):
        match = re.match(r"session=([^;]*);", header)
        if match:
            return match.group(1)
    return None


async def scenario(store: SessionStore, client: httpx.AsyncClient) -> list[Any]:
    """What a user sees, and what the store holds, through a visit: anonymous cart, login
    (regenerate_session_id), a read, logout."""
    seen: list[Any] = []
    first = session_cookie(await client.post("/put", json={"cart": ["apple"]}))
    seen.append((await client.get("/")).json())
    response = await client.post("/login")
    second = session_cookie(response)
    seen.append(response.json())
    seen.append(second is not None and second != first)
    assert first is not None and second is not None
    seen.append(await store.read(second, lifetime=3600) != b"")
    # starsessions leaves the old session in the store after regenerate_session_id.
    seen.append(await store.read(first, lifetime=3600) != b"")
    seen.append((await client.get("/")).json())
    await client.post("/logout")
    seen.append(await store.read(second, lifetime=3600))
    seen.append((await client.get("/")).json())
    return seen


@pytest.fixture
async def store(any_backend: Any) -> AsyncIterator[SQLStore]:
    yield SQLStore(any_backend)


async def test_behaves_like_starsessions_own_store(store: SQLStore) -> None:
    outcomes = []
    for each in (InMemoryStore(), store):
        async with client_for(each, lifetime=3600) as client:
            outcomes.append(await scenario(each, client))
    ours, theirs = outcomes[1], outcomes[0]
    assert ours == theirs
    assert ours[1] == {"cart": ["apple"], "user_id": 42}


async def test_lifetime_and_ttl_become_the_session_expiry(any_backend: Any) -> None:
    clock = Clock()
    store = SQLStore(any_backend, clock=clock)
    async with client_for(store, lifetime=timedelta(seconds=600)) as client:
        session_id = session_cookie(await client.post("/put", json={"k": 1}))
        assert session_id is not None
        expiry = await any_backend.get_session_expiry(session_id)
        assert int(clock.now) + 598 <= expiry <= int(clock.now) + 600  # ttl: time remaining
        assert await store.read(session_id, lifetime=600) != b""
        clock.now = expiry + 1
        assert (await client.get("/")).json() == {}  # expired: read as empty


async def test_rolling_sessions_push_the_expiry_on_every_write(any_backend: Any) -> None:
    clock = Clock()
    store = SQLStore(any_backend, clock=clock)
    async with client_for(store, lifetime=600, rolling=True) as client:
        session_id = session_cookie(await client.post("/put", json={"k": 1}))
        assert session_id is not None
        clock.now += 500
        await client.get("/")  # starsessions writes a non-empty session on every response
        assert await any_backend.get_session_expiry(session_id) == int(clock.now) + 600


async def test_session_only_cookies_are_kept_for_gc_ttl(any_backend: Any) -> None:
    clock = Clock()
    store = SQLStore(any_backend, gc_ttl=timedelta(days=2), clock=clock)
    async with client_for(store) as client:  # lifetime=0: a browser-session cookie
        session_id = session_cookie(await client.post("/put", json={"k": 1}))
        assert session_id is not None
        expiry = await any_backend.get_session_expiry(session_id)
        assert expiry == int(clock.now) + 2 * 86400


async def test_ids_a_backend_refuses_read_as_empty_and_get_a_new_id(any_backend: Any) -> None:
    store = SQLStore(any_backend)
    async with client_for(store, lifetime=600) as client:
        client.cookies.set("session", "x" * 300, domain="testserver.local")
        response = await client.post("/put", json={"k": 1})
        assert response.status_code == 200
        new_id = session_cookie(response)
        assert new_id is not None and new_id != "x" * 300
        assert await store.read(new_id, lifetime=600) != b""
    assert await store.read("", lifetime=600) == b""
    await store.remove("x" * 300)  # not an error


def test_refuses_a_backend_without_expiry() -> None:
    with pytest.raises(TypeError, match="SessionExpiry"):
        SQLStore(object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="gc_ttl"):
        SQLStore(MemoryBackend(), gc_ttl=timedelta(0))
    with pytest.raises(ValueError, match="key"):
        SQLStore(MemoryBackend(), key="")
