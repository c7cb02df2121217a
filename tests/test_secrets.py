"""Session ids, keys and values never appear in exception messages, log records or reprs."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from sessions_sql import (
    MemoryBackend,
    SessionCollector,
    SessionManager,
    SQLAlchemyBackend,
    migrate,
)

SECRET_ID = "sid-7Hq2ZpSECRET"
SECRET_KEY = "key-Xv93SECRET"
SECRET_VALUE = b"value-Lm41SECRET"
SECRETS = (SECRET_ID, SECRET_KEY, SECRET_VALUE.decode())


def chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


class Recorder:
    """Collects every text a user could see: messages and reprs of errors, and reprs."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.errors = 0

    async def attempt(self, awaitable: Any) -> None:
        try:
            await awaitable
        except Exception as error:
            self.errors += 1
            for link in chain(error):
                self.texts += [str(link), repr(link), type(link).__name__]

    def see(self, *objects: object) -> None:
        self.texts += [repr(o) for o in objects]


class ProtocolOnly:
    """Only the six methods, one of which fails: the collector's one-by-one path."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def get_sessions(self) -> list[str]:
        return list(await self.inner.get_sessions())

    async def get_session_age(self, session_id: str) -> int | None:
        raise ConnectionError("simulated")

    async def remove_session(self, session_id: str) -> None:
        await self.inner.remove_session(session_id)

    async def read_value(self, session_id: str, key: str) -> bytes | None:
        return await self.inner.read_value(session_id, key)  # type: ignore[no-any-return]

    async def write_value(self, session_id: str, key: str, value: bytes) -> None:
        await self.inner.write_value(session_id, key, value)

    async def remove_value(self, session_id: str, key: str) -> None:
        await self.inner.remove_value(session_id, key)


async def exercise(recorder: Recorder, backend: Any) -> None:
    """Every operation, good and bad, with the secrets as id, key and value."""
    manager = SessionManager(backend)
    session = manager.get_session(SECRET_ID)
    r = recorder
    await r.attempt(backend.write_value(SECRET_ID, SECRET_KEY, SECRET_VALUE))
    await r.attempt(backend.read_value(SECRET_ID, SECRET_KEY))
    await r.attempt(backend.get_session_age(SECRET_ID))
    await r.attempt(backend.get_sessions())
    await r.attempt(backend.write_values(SECRET_ID, {SECRET_KEY: SECRET_VALUE}))
    await r.attempt(backend.read_values(SECRET_ID))
    await r.attempt(backend.remove_values(SECRET_ID, [SECRET_KEY]))
    await r.attempt(session.set(SECRET_KEY, SECRET_VALUE.decode()))
    await r.attempt(session.expire(SECRET_KEY, 10))
    await r.attempt(session.get(SECRET_KEY))
    # Bytes not in the session format under the secret key.
    await r.attempt(backend.write_value(SECRET_ID, SECRET_KEY + "raw", SECRET_VALUE))
    await r.attempt(session.get(SECRET_KEY + "raw"))
    await r.attempt(session.set(SECRET_KEY + "raw", 1))
    # Refused input around the secrets.
    await r.attempt(backend.write_value(SECRET_ID, SECRET_KEY, SECRET_VALUE.decode()))
    await r.attempt(backend.write_value(SECRET_ID * 20, SECRET_KEY, SECRET_VALUE))
    await r.attempt(backend.write_value(SECRET_ID + "\x00", SECRET_KEY, SECRET_VALUE))
    await r.attempt(backend.write_values(SECRET_ID, {SECRET_KEY: None}))
    await r.attempt(session.set(SECRET_KEY, object()))
    # Collectors, both paths, one of them failing on every session.
    for target in (backend, ProtocolOnly(backend)):
        collector = SessionCollector(target, timedelta(1), timedelta(0))
        await r.attempt(collector.collect())
        r.see(collector)
    await r.attempt(backend.write_value(SECRET_ID, SECRET_KEY, SECRET_VALUE))
    await r.attempt(session.remove(SECRET_KEY))
    await r.attempt(session.clear())
    r.see(backend, manager, session, manager.new_session())


@pytest.fixture(
    params=["memory", "sqlite", "postgresql", "unmigrated", "unmigrated-host-engine", "unreachable"]
)
def target(request: pytest.FixtureRequest) -> tuple[str, str | None]:
    """(kind, database URL): working databases, a failing one, and none (memory)."""
    kind: str = request.param
    if kind == "sqlite":
        return kind, request.getfixturevalue("sqlite_url")
    if kind == "postgresql":
        return kind, request.getfixturevalue("postgres_url")
    if kind.startswith("unmigrated"):
        return kind, request.getfixturevalue("sqlite_url")
    if kind == "unreachable":
        return kind, "postgresql+asyncpg://postgres@127.0.0.1:1/none"
    return kind, None


async def test_secrets_never_leak(
    target: tuple[str, str | None], caplog: pytest.LogCaptureFixture
) -> None:
    kind, url = target
    caplog.set_level(logging.DEBUG)  # every logger, every level
    recorder = Recorder()
    if url is None:
        await exercise(recorder, MemoryBackend())
    elif kind == "unmigrated-host-engine":
        # An engine as a host creates it: SQLAlchemy would print parameters in its errors.
        engine = create_async_engine(url)
        await exercise(recorder, SQLAlchemyBackend(engine))
        await engine.dispose()
    else:
        if kind == "sqlite":
            await migrate(url)
        async with SQLAlchemyBackend.from_url(url) as backend:
            await exercise(recorder, backend)
    if kind != "memory" and kind not in ("sqlite", "postgresql"):
        assert recorder.errors >= 10  # the failures really happened
    # The aiosqlite driver logs every statement with its parameters at DEBUG on its own
    # "aiosqlite" logger, outside this package's control (documented in the README); every
    # other record, SQLAlchemy's included, is searched.
    records = [r for r in caplog.records if not r.name.startswith("aiosqlite")]
    texts = recorder.texts + [logging.Formatter().format(record) for record in records]
    assert texts
    for text in texts:
        for secret in SECRETS:
            assert secret not in text
