"""python-telegram-bot persistence on sessions_sql.

``SQLPersistence`` stores ``user_data``, ``chat_data``, ``bot_data``, ``callback_data`` and the
states of persistent ``ConversationHandler``\\ s as JSON (never pickle: what the database holds
can never run code in the bot) in the sessions_sql tables. Each kind is one session whose
values are its objects (one per user, per chat, per conversation key), so an update writes
only the objects that changed, one statement each. Install with
``pip install 'sessions-sql[telegram]'``.
"""

from __future__ import annotations

import json
from typing import Any

from telegram.ext import BasePersistence, PersistenceInput

from sessions_sql import BatchValues, SessionBackend, SessionError, check_extension

__all__ = ["SQLPersistence"]

_Data = dict[Any, Any]
# As telegram.ext names them (in a private module).
ConversationKey = tuple[int | str, ...]
ConversationDict = dict[ConversationKey, object]
CDCData = tuple[list[tuple[str, float, dict[str, Any]]], dict[str, str]]


def _encode(value: object) -> bytes:
    try:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise TypeError(f"SQLPersistence stores JSON only: {error}") from None
    return text.encode("utf-8")


def _decode(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        raise SessionError("a stored telegram persistence value is not JSON") from None


class SQLPersistence(BasePersistence[_Data, _Data, _Data]):
    """A ``telegram.ext.BasePersistence`` in the sessions_sql tables of the bot's database.

    ``backend`` is a :class:`~sessions_sql.SQLAlchemyBackend` (or any backend implementing
    ``BatchValues``). Data must be JSON-serialisable (dict keys come back as strings, tuples
    as lists); anything else raises ``TypeError`` when the application saves it. Sessions are
    named ``telegram:<bot id>:...`` unless ``namespace`` replaces ``telegram:<bot id>``.
    ``store_data`` and ``update_interval`` are ``BasePersistence``'s.
    """

    def __init__(
        self,
        backend: SessionBackend,
        store_data: PersistenceInput | None = None,
        update_interval: float = 60,
        *,
        namespace: str | None = None,
    ) -> None:
        if not isinstance(backend, SessionBackend) or not check_extension(backend, BatchValues):
            raise TypeError(
                "backend must be a SessionBackend implementing sessions_sql.BatchValues, "
                f"not {type(backend).__name__}"
            )
        if namespace is not None and (not isinstance(namespace, str) or not namespace):
            raise ValueError("namespace must be a non-empty str or None")
        super().__init__(store_data=store_data, update_interval=update_interval)
        self.backend = backend
        self._namespace = namespace
        # What the database holds, as this persistence last read or wrote it: (session, key)
        # -> bytes. An update whose encoding is the same writes nothing.
        self._stored: dict[tuple[str, str], bytes] = {}

    def __repr__(self) -> str:
        return f"SQLPersistence(backend={self.backend!r}, store_data={self.store_data})"

    def _session(self, kind: str) -> str:
        namespace = self._namespace or f"telegram:{self.bot.id}"
        return f"{namespace}:{kind}" if kind else namespace

    async def _load(self, session: str) -> dict[str, Any]:
        stored = await self.backend.read_values(session)  # type: ignore[attr-defined]
        for key, value in stored.items():
            self._stored[session, key] = value
        return {key: _decode(value) for key, value in stored.items()}

    async def _save(self, session: str, key: str, value: object) -> None:
        """Write ``value`` if it differs from what is stored; an empty or ``None`` value
        removes the key (the application reads a missing entry as empty)."""
        data = None if value is None or value == {} else _encode(value)
        if self._stored.get((session, key)) == data:
            return
        if data is None:
            await self.backend.remove_value(session, key)
            self._stored.pop((session, key), None)
        else:
            await self.backend.write_value(session, key, data)
            self._stored[session, key] = data

    async def get_user_data(self) -> dict[int, _Data]:
        """Every user's ``user_data``, in one query."""
        return {int(k): v for k, v in (await self._load(self._session("user_data"))).items()}

    async def get_chat_data(self) -> dict[int, _Data]:
        """Every chat's ``chat_data``, in one query."""
        return {int(k): v for k, v in (await self._load(self._session("chat_data"))).items()}

    async def get_bot_data(self) -> _Data:
        """The ``bot_data`` (``{}`` if none was stored)."""
        stored = await self._load(self._session(""))
        return dict(stored.get("bot_data", {}))

    async def get_callback_data(self) -> CDCData | None:
        """The callback data cache's contents, or ``None`` if none was stored."""
        stored = (await self._load(self._session(""))).get("callback_data")
        if stored is None:
            return None
        buttons, queries = stored
        return [(uuid, when, data) for uuid, when, data in buttons], queries

    async def get_conversations(self, name: str) -> ConversationDict:
        """The states of the conversation handler ``name``, by conversation key."""
        stored = await self._load(self._session(f"conversations:{name}"))
        return {tuple(json.loads(key)): state for key, state in stored.items()}

    async def update_conversation(
        self, name: str, key: ConversationKey, new_state: object | None
    ) -> None:
        """Store one conversation's state (``None``: it ended, and is removed)."""
        session = self._session(f"conversations:{name}")
        await self._save(session, _encode(list(key)).decode(), new_state)

    async def update_user_data(self, user_id: int, data: _Data) -> None:
        """Store one user's data if it changed (one statement)."""
        await self._save(self._session("user_data"), str(user_id), data)

    async def update_chat_data(self, chat_id: int, data: _Data) -> None:
        """Store one chat's data if it changed (one statement)."""
        await self._save(self._session("chat_data"), str(chat_id), data)

    async def update_bot_data(self, data: _Data) -> None:
        """Store the bot data if it changed (one statement)."""
        await self._save(self._session(""), "bot_data", data)

    async def update_callback_data(self, data: CDCData) -> None:
        """Store the callback data cache's contents if they changed (one statement)."""
        await self._save(self._session(""), "callback_data", None if data is None else list(data))

    async def drop_user_data(self, user_id: int) -> None:
        """Remove one user's data."""
        await self._save(self._session("user_data"), str(user_id), None)

    async def drop_chat_data(self, chat_id: int) -> None:
        """Remove one chat's data."""
        await self._save(self._session("chat_data"), str(chat_id), None)

    async def refresh_user_data(self, user_id: int, user_data: _Data) -> None:
        """Nothing to do: the data is loaded once, when the application starts."""

    async def refresh_chat_data(self, chat_id: int, chat_data: _Data) -> None:
        """Nothing to do: the data is loaded once, when the application starts."""

    async def refresh_bot_data(self, bot_data: _Data) -> None:
        """Nothing to do: the data is loaded once, when the application starts."""

    async def flush(self) -> None:
        """Nothing to do: every update is written when the application hands it over."""
