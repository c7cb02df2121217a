"""Telegram's side of the bot, in process: a ``BaseSession`` answering the Bot API calls
without a network, and updates as Telegram sends them."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import AsyncGenerator
from typing import Any

from aiogram import Bot
from aiogram.client.session.base import BaseSession
from aiogram.methods import TelegramMethod
from aiogram.methods.base import TelegramType
from aiogram.types import Update


class OfflineSession(BaseSession):
    """Answers every Bot API call as Telegram would, and records the messages sent."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[int, str]] = []  # (chat id, text)
        self._message_ids = itertools.count(1000)

    async def make_request(
        self, bot: Bot, method: TelegramMethod[TelegramType], timeout: int | None = None
    ) -> TelegramType:
        name = method.__api_method__
        if name == "getMe":
            result: Any = {"id": bot.id, "is_bot": True, "first_name": "formbot"}
        elif name == "sendMessage":
            chat_id = int(method.chat_id)  # type: ignore[attr-defined]
            self.sent.append((chat_id, method.text))  # type: ignore[attr-defined]
            result = {
                "message_id": next(self._message_ids),
                "date": int(time.time()),
                "chat": {"id": chat_id, "type": "private"},
                "text": method.text,  # type: ignore[attr-defined]
            }
        else:
            result = True
        # Through aiogram's own response parsing, as an HTTP answer would go.
        content = json.dumps({"ok": True, "result": result})
        return self.check_response(bot, method, 200, content).result  # type: ignore[return-value]

    async def stream_content(self, *args: Any, **kwargs: Any) -> AsyncGenerator[bytes, None]:
        raise NotImplementedError("the offline session downloads no files")
        yield b""  # pragma: no cover

    async def close(self) -> None:
        pass


_update_ids = itertools.count(1)


def message(bot: Bot, user_id: int, text: str) -> Update:
    """A private text message from ``user_id``, as the Bot API delivers it."""
    payload = {
        "update_id": next(_update_ids),
        "message": {
            "message_id": next(_update_ids),
            "date": int(time.time()),
            "chat": {"id": user_id, "type": "private", "first_name": "Ada"},
            "from": {"id": user_id, "is_bot": False, "first_name": "Ada"},
            "text": text,
        },
    }
    if text.startswith("/"):
        command = text.split()[0]
        payload["message"]["entities"] = [  # type: ignore[index]
            {"type": "bot_command", "offset": 0, "length": len(command)}
        ]
    return Update.model_validate(payload, context={"bot": bot})
