"""Log in, count page visits, log out: sessions in the application's PostgreSQL database.

Run it from ``examples/fastapi_app`` with ``uvicorn --factory fastapi_app.main:create_app``
once both Alembic histories are upgraded (README.md there); the database is ``DATABASE_URL``.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from pydantic import BaseModel, Field
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import create_async_engine

from sessions_sql import SessionCollector, SQLAlchemyBackend
from sessions_sql.asgi import SessionMiddleware, regenerate_session

from .models import User


class Login(BaseModel):
    name: str = Field(min_length=1, max_length=100)


def create_app(
    database_url: str | None = None,
    *,
    secure: bool = True,
    idle_timeout: timedelta = timedelta(minutes=30),
    clock: Callable[[], float] = time.time,
) -> FastAPI:
    """The application on ``database_url`` (default ``DATABASE_URL``). ``secure=False`` lets
    the cookie travel over plain HTTP (local tests only); ``clock`` is for tests."""
    engine = create_async_engine(database_url or os.environ["DATABASE_URL"], pool_use_lifo=True)
    backend = SQLAlchemyBackend(engine)
    # Removes expired sessions every five minutes (the middleware never serves them anyway).
    collector = SessionCollector(backend, period=timedelta(minutes=5), clock=clock)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        collecting = asyncio.create_task(collector.run())
        try:
            yield
        finally:
            collector.stop()
            await collecting
            await engine.dispose()

    app = FastAPI(lifespan=lifespan)
    app.add_middleware(
        SessionMiddleware,
        backend=backend,
        idle_timeout=idle_timeout,
        absolute_timeout=timedelta(hours=8),
        secure=secure,
        clock=clock,
    )

    def user_id(request: Request) -> int:
        if "user_id" not in request.session:
            raise HTTPException(status_code=401, detail="log in first")
        return int(request.session["user_id"])

    @app.post("/login")
    async def login(body: Login, request: Request) -> dict[str, Any]:
        upsert = (
            insert(User)
            .values(name=body.name)
            .on_conflict_do_update(index_elements=[User.name], set_={"name": body.name})
            .returning(User.id)
        )
        async with engine.begin() as conn:
            uid = (await conn.execute(upsert)).scalar_one()
        regenerate_session(request)  # a new id for the logged-in session: no fixation
        request.session["user_id"] = uid
        return {"user_id": uid, "name": body.name}

    @app.get("/me")
    async def me(request: Request) -> dict[str, Any]:
        uid = user_id(request)
        session = request.session
        visits = {k.removeprefix("visits:"): v for k, v in session.items() if k != "user_id"}
        return {"user_id": uid, "visits": visits}

    @app.post("/pages/{page}")
    async def visit(page: str, request: Request) -> dict[str, Any]:
        user_id(request)
        key = f"visits:{page}"  # one key per page: concurrent visits of two pages both count
        request.session[key] = request.session.get(key, 0) + 1
        return {"page": page, "visits": request.session[key]}

    @app.post("/logout")
    async def logout(request: Request) -> dict[str, Any]:
        request.session.clear()  # removes the session and expires the cookie
        return {"logged_out": True}

    return app
