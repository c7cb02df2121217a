"""examples/fastapi_app under a real uvicorn server on a local port, driven by httpx over TCP
with its cookie jar, on PostgreSQL migrated by both Alembic histories. PostgreSQL only."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from sqlalchemy.ext.asyncio import create_async_engine

from sessions_sql import SessionManager, SQLAlchemyBackend

from .conftest import guard
from .web import Clock

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "fastapi_app"
IDLE = 1800


@pytest.fixture(scope="module")
def example() -> Iterator[Any]:
    sys.path.insert(0, str(EXAMPLE))
    try:
        from fastapi_app import main

        yield main
    finally:
        sys.path.remove(str(EXAMPLE))


def alembic(url: str, *args: str) -> None:
    env = {**os.environ, "DATABASE_URL": url, "SESSIONS_SQL_URL": url}
    result = subprocess.run(
        [sys.executable, "-m", "alembic", *args],
        cwd=EXAMPLE,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def database(postgres_server: Any) -> str:
    """A database upgraded by the application's history and by sessions_sql's, as the
    example's README does it."""
    url = postgres_server.new_database()
    alembic(url, "upgrade", "head")
    alembic(url, "-n", "sessions_sql", "upgrade", "head")
    return url


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def server(example: Any, database: str, clock: Clock) -> AsyncIterator[str]:
    """The application under uvicorn on a free local port; yields its base URL."""
    app = example.create_app(database, secure=False, clock=clock)  # plain HTTP on 127.0.0.1
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    uvicorn_server = uvicorn.Server(config)
    serving = asyncio.create_task(uvicorn_server.serve(sockets=[sock]))

    async def started() -> None:
        while not uvicorn_server.started:
            if serving.done():
                serving.result()
            await asyncio.sleep(0.01)

    await guard(started(), "uvicorn start-up")
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        uvicorn_server.should_exit = True
        await guard(serving, "uvicorn shutdown")
        sock.close()


@pytest.fixture
async def backend(database: str) -> AsyncIterator[SQLAlchemyBackend]:
    engine = create_async_engine(database)
    yield SQLAlchemyBackend(engine)
    await engine.dispose()


async def test_login_visits_and_logout(server: str, backend: SQLAlchemyBackend) -> None:
    async with httpx.AsyncClient(base_url=server) as client:
        assert (await client.get("/me")).status_code == 401
        assert "session" not in client.cookies  # nothing stored for an anonymous request
        response = await client.post("/login", json={"name": "ada"})
        assert response.status_code == 200
        user_id = response.json()["user_id"]
        session_id = client.cookies["session"]
        for expected in (1, 2, 3):
            response = await client.post("/pages/home")
            assert response.json() == {"page": "home", "visits": expected}
            assert "set-cookie" not in response.headers  # the same session: no new cookie
        assert (await client.get("/me")).json() == {"user_id": user_id, "visits": {"home": 3}}
        # What the application stored, as the session layer reads it.
        assert await SessionManager(backend).get_session(session_id).get("visits:home") == 3
        assert (await client.post("/logout")).status_code == 200
        assert "session" not in client.cookies
        assert await backend.read_session(session_id) is None
        assert (await client.get("/me")).status_code == 401


async def test_login_rotates_the_id(server: str, backend: SQLAlchemyBackend) -> None:
    async with httpx.AsyncClient(base_url=server) as client:
        await client.post("/login", json={"name": "grace"})
        first = client.cookies["session"]
        await client.post("/pages/a")
        await client.post("/login", json={"name": "barbara"})  # another user on this browser
        second = client.cookies["session"]
        assert second != first
        assert await backend.read_session(first) is None
        assert (await client.get("/me")).json()["visits"] == {"a": 1}
    async with httpx.AsyncClient(base_url=server, cookies={"session": first}) as replay:
        assert (await replay.get("/me")).status_code == 401


async def test_concurrent_requests_of_one_user_keep_every_change(
    server: str, backend: SQLAlchemyBackend
) -> None:
    pages = [f"p{i}" for i in range(20)]
    async with httpx.AsyncClient(base_url=server) as client:
        await client.post("/login", json={"name": "linus"})
        responses = await asyncio.gather(*(client.post(f"/pages/{page}") for page in pages))
        assert all(r.json()["visits"] == 1 for r in responses)
        assert (await client.get("/me")).json()["visits"] == dict.fromkeys(pages, 1)


async def test_idle_expiry(server: str, clock: Clock, backend: SQLAlchemyBackend) -> None:
    async with httpx.AsyncClient(base_url=server) as client:
        await client.post("/login", json={"name": "edsger"})
        session_id = client.cookies["session"]
        clock.now += IDLE - 60
        assert (await client.get("/me")).status_code == 200  # pushes the idle expiry
        clock.now += IDLE - 60
        assert (await client.get("/me")).status_code == 200
        clock.now += IDLE + 1
        assert (await client.get("/me")).status_code == 401
        # Logging in again gets a new id; the expired session is never adopted.
        await client.post("/login", json={"name": "edsger"})
        assert client.cookies["session"] != session_id


def test_the_application_autogenerate_sees_no_changes(database: str) -> None:
    # include_name in migrations/env.py keeps sessions_sql's tables out of the app's history.
    alembic(database, "check")
