"""sessions_sql.telegram: SQLPersistence in a real python-telegram-bot Application, with the
Bot API answered in process by a fake BaseRequest."""

from __future__ import annotations

import itertools
import json
import time
from typing import Any

import pytest
from telegram import Update
from telegram.ext import (
    Application,
    CommandHandler,
    ContextTypes,
    ConversationHandler,
    MessageHandler,
    PersistenceInput,
    filters,
)
from telegram.request import BaseRequest, RequestData

from sessions_sql import MemoryBackend, SessionError
from sessions_sql.telegram import SQLPersistence

TOKEN = "123456:TEST"
NAME, AGE = range(2)


class FakeRequest(BaseRequest):
    """Telegram's side of the Bot API, in process: answers getMe and sendMessage."""

    def __init__(self, sent: list[tuple[int, str]]) -> None:
        self.sent = sent

    @property
    def read_timeout(self) -> float | None:
        return None

    async def initialize(self) -> None:
        pass

    async def shutdown(self) -> None:
        pass

    async def do_request(
        self, url: str, method: str, request_data: RequestData | None = None, **_: Any
    ) -> tuple[int, bytes]:
        endpoint = url.rsplit("/", 1)[1]
        params = request_data.parameters if request_data else {}
        result: Any = True
        if endpoint == "getMe":
            bot_id = int(url.split("/bot", 1)[1].split(":", 1)[0])
            result = {"id": bot_id, "is_bot": True, "first_name": "bot", "username": "test_bot"}
        elif endpoint == "sendMessage":
            chat_id, text = int(params["chat_id"]), str(params["text"])  # type: ignore[arg-type]
            self.sent.append((chat_id, text))
            result = {
                "message_id": len(self.sent),
                "date": int(time.time()),
                "chat": {"id": chat_id, "type": "private"},
                "text": text,
            }
        return 200, json.dumps({"ok": True, "result": result}).encode()


_ids = itertools.count(1)


def message(app: Application[Any, Any, Any, Any, Any, Any], user_id: int, text: str) -> Update:
    payload: dict[str, Any] = {
        "update_id": next(_ids),
        "message": {
            "message_id": next(_ids),
            "date": int(time.time()),
            "chat": {"id": user_id, "type": "private"},
            "from": {"id": user_id, "is_bot": False, "first_name": "Ada"},
            "text": text,
        },
    }
    if text.startswith("/"):
        payload["message"]["entities"] = [
            {"type": "bot_command", "offset": 0, "length": len(text.split()[0])}
        ]
    return Update.de_json(payload, app.bot)


async def start(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int:
    assert update.message is not None
    await update.message.reply_text("Your name?")
    return NAME


async def got_name(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int:
    assert update.message is not None and context.user_data is not None
    context.user_data["name"] = update.message.text
    await update.message.reply_text("Your age?")
    return AGE


async def got_age(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int:
    assert update.message is not None and context.user_data is not None
    assert context.chat_data is not None and context.bot_data is not None
    context.user_data["age"] = int(update.message.text or 0)
    context.chat_data["signed_up"] = True
    context.bot_data["signups"] = context.bot_data.get("signups", 0) + 1
    await update.message.reply_text(f"Done: {context.user_data['name']}, {update.message.text}")
    return ConversationHandler.END


async def count(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    assert context.user_data is not None
    context.user_data["count"] = context.user_data.get("count", 0) + 1


def build(
    persistence: SQLPersistence, sent: list[tuple[int, str]], token: str = TOKEN
) -> Application[Any, Any, Any, Any, Any, Any]:
    app = (
        Application.builder()
        .token(token)
        .request(FakeRequest(sent))
        .get_updates_request(FakeRequest(sent))
        .updater(None)
        .persistence(persistence)
        .build()
    )
    app.add_handler(
        ConversationHandler(
            entry_points=[CommandHandler("start", start)],
            states={
                NAME: [MessageHandler(filters.TEXT & ~filters.COMMAND, got_name)],
                AGE: [MessageHandler(filters.Regex(r"^\d+$"), got_age)],
            },
            fallbacks=[],
            name="signup",
            persistent=True,
        )
    )
    app.add_handler(MessageHandler(filters.Regex("^count$"), count), group=1)
    return app


async def test_conversation_and_data_survive_a_rebuilt_application(any_backend: Any) -> None:
    sent: list[tuple[int, str]] = []
    app = build(SQLPersistence(any_backend), sent)
    await app.initialize()
    await app.process_update(message(app, 7, "/start"))
    await app.process_update(message(app, 7, "Ada"))
    await app.shutdown()  # saves what changed
    assert sent == [(7, "Your name?"), (7, "Your age?")]

    app = build(SQLPersistence(any_backend), sent)
    await app.initialize()
    assert app.user_data[7] == {"name": "Ada"}
    await app.process_update(message(app, 7, "36"))  # the conversation goes on in AGE
    assert sent[-1] == (7, "Done: Ada, 36")
    await app.shutdown()

    app = build(SQLPersistence(any_backend), sent)
    await app.initialize()
    assert (app.user_data[7], app.chat_data[7], app.bot_data) == (
        {"name": "Ada", "age": 36},
        {"signed_up": True},
        {"signups": 1},
    )
    await app.process_update(message(app, 7, "37"))  # the conversation ended: no reply
    assert sent[-1] == (7, "Done: Ada, 36")
    await app.shutdown()
    # The ended conversation left nothing behind; another bot on the database sees nothing.
    assert await any_backend.read_values("telegram:123456:conversations:signup") == {}
    other = build(SQLPersistence(any_backend), sent, token="654321:OTHER")
    await other.initialize()
    assert (dict(other.user_data), other.bot_data) == ({}, {})
    await other.shutdown()


class Counting:
    """A backend that counts the writes reaching the real one underneath."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.writes: list[tuple[str, str]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)

    async def write_value(self, session_id: str, key: str, value: bytes) -> None:
        self.writes.append((session_id, key))
        await self.backend.write_value(session_id, key, value)

    async def remove_value(self, session_id: str, key: str) -> None:
        self.writes.append((session_id, key))
        await self.backend.remove_value(session_id, key)


async def test_an_update_writes_only_what_changed(any_backend: Any) -> None:
    backend = Counting(any_backend)
    app = build(SQLPersistence(backend), [])
    await app.initialize()
    for user in (1, 2, 3):
        await app.process_update(message(app, user, "count"))
    await app.update_persistence()
    assert sorted(backend.writes) == [("telegram:123456:user_data", str(u)) for u in (1, 2, 3)]
    backend.writes.clear()
    await app.process_update(message(app, 2, "count"))
    await app.process_update(message(app, 3, "nothing to count"))  # touched, not changed
    await app.update_persistence()
    assert backend.writes == [("telegram:123456:user_data", "2")]
    backend.writes.clear()
    app.drop_user_data(1)
    await app.shutdown()
    assert backend.writes == [("telegram:123456:user_data", "1")]
    assert set(await any_backend.read_values("telegram:123456:user_data")) == {"2", "3"}


async def test_store_data_is_honoured(any_backend: Any) -> None:
    sent: list[tuple[int, str]] = []
    only_chats = PersistenceInput(user_data=False, bot_data=False, callback_data=False)
    for _ in range(2):
        app = build(SQLPersistence(any_backend, store_data=only_chats), sent)
        await app.initialize()
        assert 7 not in app.user_data
        for text in ("/start", "Ada", "36"):
            await app.process_update(message(app, 7, text))
        await app.shutdown()
    assert await any_backend.read_values("telegram:123456:user_data") == {}
    assert await any_backend.read_values("telegram:123456") == {}
    assert await any_backend.read_values("telegram:123456:chat_data") == {
        "7": b'{"signed_up":true}'
    }


async def test_json_only_never_pickle(any_backend: Any) -> None:
    persistence = SQLPersistence(any_backend, namespace="bot")
    with pytest.raises(TypeError, match="JSON"):
        await persistence.update_user_data(1, {"when": object()})
    with pytest.raises(TypeError, match="JSON"):
        await persistence.update_bot_data({"nan": float("nan")})
    assert await any_backend.get_sessions() == []
    await any_backend.write_value("bot:user_data", "1", b"\x80\x04\x95pickle")
    with pytest.raises(SessionError):
        await persistence.get_user_data()


async def test_callback_data_and_conversations_round_trip(any_backend: Any) -> None:
    persistence = SQLPersistence(any_backend, namespace="bot")
    callback = ([("uuid-1", 1700000000.5, {"button": {"choice": [1, 2]}})], {"query": "uuid-1"})
    assert await persistence.get_callback_data() is None
    await persistence.update_callback_data(callback)
    await persistence.update_conversation("c", (7, 8), "STATE")
    await persistence.update_conversation("c", (9, "inline-id"), 2)
    await persistence.update_conversation("c", (9, "inline-id"), None)  # ended
    restored = SQLPersistence(any_backend, namespace="bot")
    assert await restored.get_callback_data() == callback
    assert await restored.get_conversations("c") == {(7, 8): "STATE"}
    assert await restored.get_bot_data() == {}


def test_refuses_a_backend_without_batch_reads() -> None:
    with pytest.raises(TypeError, match="BatchValues"):
        SQLPersistence(object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="namespace"):
        SQLPersistence(MemoryBackend(), namespace="")
