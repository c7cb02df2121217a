"""Model-based testing: random sequences of every protocol and batch operation on
SQLAlchemyBackend (SQLite and PostgreSQL), each result checked against MemoryBackend.

Runs SESSIONS_SQL_MODEL_EXAMPLES sequences per database (default 200).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from sqlalchemy import text

from sessions_sql import MemoryBackend, SQLAlchemyBackend

T = TypeVar("T")

EXAMPLES = int(os.environ.get("SESSIONS_SQL_MODEL_EXAMPLES", "200"))

ids = st.sampled_from(["s1", "s2", "ünïcödé", "🎉 party", "a'b; --", "x" * 255])
keys = st.sampled_from(["k", "key two", "ключ", "%(k)s", "", "k" * 255]).filter(bool)
values = st.binary(max_size=64) | st.sampled_from([b"", b"\x00", bytes(range(256))])


class BackendMachine(RuleBasedStateMachine):
    """Drives the real backend and the model with the same calls."""

    loop: asyncio.AbstractEventLoop
    real: SQLAlchemyBackend

    def __init__(self) -> None:
        super().__init__()
        self.model = MemoryBackend()
        self.created: dict[str, int] = {}  # creation times seen on the real backend
        self.run(self._empty())

    async def _empty(self) -> None:
        async with self.real.engine.begin() as conn:
            await conn.execute(text("DELETE FROM session_values"))
            await conn.execute(text("DELETE FROM sessions"))

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coroutine)

    def both(self, method: str, *args: Any) -> Any:
        real = self.run(getattr(self.real, method)(*args))
        model = self.run(getattr(self.model, method)(*args))
        assert real == model, method
        return real

    @rule(sid=ids, key=keys, value=values)
    def write_value(self, sid: str, key: str, value: bytes) -> None:
        self.both("write_value", sid, key, value)

    @rule(sid=ids, mapping=st.dictionaries(keys, values, max_size=4))
    def write_values(self, sid: str, mapping: dict[str, bytes]) -> None:
        self.both("write_values", sid, mapping)

    @rule(sid=ids, key=keys)
    def read_value(self, sid: str, key: str) -> None:
        self.both("read_value", sid, key)

    @rule(sid=ids)
    def read_values(self, sid: str) -> None:
        self.both("read_values", sid)

    @rule(sid=ids, key=keys)
    def remove_value(self, sid: str, key: str) -> None:
        self.both("remove_value", sid, key)

    @rule(sid=ids, some=st.lists(keys, max_size=4))
    def remove_values(self, sid: str, some: list[str]) -> None:
        self.both("remove_values", sid, some)

    @rule(sid=ids)
    def remove_session(self, sid: str) -> None:
        self.both("remove_session", sid)
        self.created.pop(sid, None)

    @rule(batch_size=st.integers(min_value=1, max_value=4))
    def iter_sessions(self, batch_size: int) -> None:
        async def collect(backend: Any) -> list[str]:
            return [sid async for sid in backend.iter_sessions(batch_size=batch_size)]

        assert self.run(collect(self.real)) == self.run(collect(self.model))

    @rule(cutoff=st.sampled_from([0, 4_000_000_000]))
    def remove_sessions_created_before(self, cutoff: int) -> None:
        # Creation times come from different clocks: only cutoffs before or after all of
        # them are comparable.
        self.both("remove_sessions_created_before", cutoff)
        if cutoff:
            self.created.clear()

    @invariant()
    def sessions_and_creation_times(self) -> None:
        real = self.run(self.real.get_sessions())
        assert sorted(real) == sorted(self.run(self.model.get_sessions()))
        for sid in real:
            created = self.run(self.real.get_session_age(sid))
            assert created is not None
            assert self.created.setdefault(sid, created) == created  # set once, never changed


def test_backend_matches_the_model(db_url: str) -> None:
    loop = asyncio.new_event_loop()
    backend = SQLAlchemyBackend.from_url(db_url)
    BackendMachine.loop, BackendMachine.real = loop, backend
    try:
        test = BackendMachine.TestCase
        test.settings = settings(
            max_examples=EXAMPLES,
            stateful_step_count=20,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        )
        test().runTest()
    finally:
        loop.run_until_complete(backend.close())
        loop.close()
