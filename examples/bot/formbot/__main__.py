"""``python -m formbot``: a scripted chat with the form bot, offline, on ``DATABASE_URL``.

The dispatcher and its storage are built anew halfway through, as after a restart of the
bot: the dialogue goes on where it was.
"""

from __future__ import annotations

import asyncio
import os

from aiogram import Bot
from sqlalchemy.ext.asyncio import create_async_engine

from sessions_sql import SQLAlchemyBackend
from sessions_sql.aiogram import SQLStorage

from .dialogue import build_dispatcher
from .offline import OfflineSession, message

USER = 4242


async def chat(engine_url: str, lines: list[str], session: OfflineSession) -> None:
    """Feed ``lines`` as messages of one user to a freshly built bot."""
    engine = create_async_engine(engine_url)
    storage = SQLStorage(SQLAlchemyBackend(engine))  # shares the application's engine
    dp = build_dispatcher(storage, engine)
    bot = Bot("123456:offline", session=session)
    try:
        for text in lines:
            print(f"> {text}")
            before = len(session.sent)
            await dp.feed_update(bot, message(bot, USER, text))
            for _, reply in session.sent[before:]:
                print(f"< {reply}")
    finally:
        await dp.emit_shutdown()  # closes the storage (not the engine) and the isolation
        await engine.dispose()


async def main() -> None:
    url = os.environ["DATABASE_URL"]
    session = OfflineSession()
    await chat(url, ["/start", "Ada", "thirty"], session)
    print("(the bot restarts)")
    await chat(url, ["36", "yes"], session)


if __name__ == "__main__":
    asyncio.run(main())
