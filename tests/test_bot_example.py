"""examples/bot: the aiogram form bot end to end (a real Dispatcher fed real Updates, the Bot
API answered in process), across a restart, and its Alembic wiring on PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiogram import Bot
from aiogram.fsm.storage.base import StorageKey
from sqlalchemy import select
from sqlalchemy.ext.asyncio import create_async_engine

from sessions_sql import SQLAlchemyBackend
from sessions_sql.aiogram import SQLStorage

BOT = Path(__file__).resolve().parent.parent / "examples" / "bot"


@pytest.fixture(scope="module")
def formbot() -> Iterator[Any]:
    sys.path.insert(0, str(BOT))
    try:
        import formbot.dialogue
        import formbot.models
        import formbot.offline

        yield formbot
    finally:
        sys.path.remove(str(BOT))


async def test_dialogue_goes_on_after_storage_and_dispatcher_are_rebuilt(
    db_url: str, formbot: Any
) -> None:
    session = formbot.offline.OfflineSession()
    engine = create_async_engine(db_url)
    async with engine.begin() as conn:  # the PostgreSQL cases share one database
        await conn.run_sync(formbot.models.Base.metadata.drop_all)
        await conn.run_sync(formbot.models.Base.metadata.create_all)
    await engine.dispose()

    async def chat(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
        """A bot built from scratch (engine, storage, dispatcher) answering ``lines``."""
        engine = create_async_engine(db_url)
        storage = SQLStorage(SQLAlchemyBackend(engine))
        dp = formbot.dialogue.build_dispatcher(storage, engine)
        bot = Bot("123456:TEST", session=session)
        before = len(session.sent)
        try:
            for user, text in lines:
                await dp.feed_update(bot, formbot.offline.message(bot, user, text))
        finally:
            await dp.emit_shutdown()
            await engine.dispose()
        return list(session.sent[before:])

    ada, bob = 1001, 1002
    replies = await chat([(ada, "/start"), (ada, "Ada"), (bob, "/start"), (ada, "thirty")])
    assert replies == [
        (ada, "What is your name?"),
        (ada, "How old are you, Ada?"),
        (bob, "What is your name?"),
        (ada, "Please send your age as a number."),
    ]
    # The bot restarts: a new engine, storage and dispatcher on the same database.
    replies = await chat([(ada, "36"), (bob, "Bob"), (ada, "yes"), (bob, "/cancel")])
    assert replies == [
        (ada, "Sign up Ada, 36? (yes/no)"),
        (bob, "How old are you, Bob?"),
        (ada, "Signed up Ada, 36."),
        (bob, "Cancelled."),
    ]
    engine = create_async_engine(db_url)
    try:
        async with engine.connect() as conn:
            signups = (await conn.execute(select(formbot.models.Signup.__table__))).all()
        assert [(row.telegram_user_id, row.name, row.age) for row in signups] == [(ada, "Ada", 36)]
        storage = SQLStorage(SQLAlchemyBackend(engine))
        for user in (ada, bob):
            key = StorageKey(bot_id=123456, chat_id=user, user_id=user)
            assert (await storage.get_state(key), await storage.get_data(key)) == (None, {})
    finally:
        await engine.dispose()


def run(url: str, *command: str) -> str:
    env = {**os.environ, "DATABASE_URL": url, "SESSIONS_SQL_URL": url}
    done = subprocess.run(command, cwd=BOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def test_the_example_runs_offline_on_its_migrated_database(fresh_postgres_url: str) -> None:
    alembic = (sys.executable, "-m", "alembic")
    run(fresh_postgres_url, *alembic, "upgrade", "head")
    run(fresh_postgres_url, *alembic, "-n", "sessions_sql", "upgrade", "head")
    assert "No new upgrade operations detected" in run(fresh_postgres_url, *alembic, "check")
    transcript = run(fresh_postgres_url, sys.executable, "-m", "formbot")
    assert "(the bot restarts)\n> 36\n< Sign up Ada, 36? (yes/no)" in transcript
    assert transcript.endswith("> yes\n< Signed up Ada, 36.\n")
