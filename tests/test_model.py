"""Model-based testing: random sequences of every protocol, batch and expiry operation on
SQLAlchemyBackend (SQLite and PostgreSQL), each result checked against MemoryBackend.

Runs SESSIONS_SQL_MODEL_EXAMPLES sequences per database (default 200).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from sqlalchemy import text

from sessions_sql import KEEP, MemoryBackend, SQLAlchemyBackend

from .conftest import CITUS, DATABASES, empty_database

T = TypeVar("T")

EXAMPLES = int(os.environ.get("SESSIONS_SQL_MODEL_EXAMPLES", "200"))

ids = st.sampled_from(["s1", "s2", "ünïcödé", "🎉 party", "a'b; --", "x" * 255])
keys = st.sampled_from(["k", "key two", "ключ", "%(k)s", "", "k" * 255]).filter(bool)
values = st.binary(max_size=64) | st.sampled_from([b"", b"\x00", bytes(range(256))])
# Expiries around a fixed "now" (so that strictly-before is exercised at its edge), none, and
# left out (KEEP).
NOW = 2_000_000_000
expiries = st.sampled_from([None, 0, NOW - 1, NOW, NOW + 1, 4_000_000_000])
expiries_or_keep = st.sampled_from([KEEP]) | expiries


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

    def both_kw(self, method: str, *args: Any, **kwargs: Any) -> Any:
        real = self.run(getattr(self.real, method)(*args, **kwargs))
        model = self.run(getattr(self.model, method)(*args, **kwargs))
        assert real == model, method
        return real

    @rule(sid=ids, key=keys, value=values, expires_at=expiries_or_keep)
    def write_value(self, sid: str, key: str, value: bytes, expires_at: Any) -> None:
        self.both_kw("write_value", sid, key, value, expires_at=expires_at)

    @rule(sid=ids, mapping=st.dictionaries(keys, values, max_size=4), expires_at=expiries_or_keep)
    def write_values(self, sid: str, mapping: dict[str, bytes], expires_at: Any) -> None:
        self.both_kw("write_values", sid, mapping, expires_at=expires_at)

    @rule(
        sid=ids,
        mapping=st.dictionaries(keys, values, max_size=3),
        remove=st.lists(keys, max_size=3),
        expires_at=expiries_or_keep,
    )
    def update_session(
        self, sid: str, mapping: dict[str, bytes], remove: list[str], expires_at: Any
    ) -> None:
        remove = [key for key in remove if key not in mapping]
        self.both_kw("update_session", sid, mapping, remove=remove, expires_at=expires_at)

    @rule(sid=ids, expires_at=expiries)
    def set_session_expiry(self, sid: str, expires_at: int | None) -> None:
        self.both("set_session_expiry", sid, expires_at)

    @rule(sid=ids)
    def get_session_expiry(self, sid: str) -> None:
        self.both("get_session_expiry", sid)

    @rule(sid=ids)
    def read_session(self, sid: str) -> None:
        real = self.run(self.real.read_session(sid))
        model = self.run(self.model.read_session(sid))
        assert (real is None) == (model is None)
        if real is not None and model is not None:
            assert (real.expires_at, real.values) == (model.expires_at, model.values)
            assert real.created_at == self.run(self.real.get_session_age(sid))

    @rule(now=st.sampled_from([NOW - 1, NOW, NOW + 0.5, NOW + 1, NOW + 2]))
    def remove_expired_sessions(self, now: float) -> None:
        self.both_kw("remove_expired_sessions", now, batch_size=2)
        for sid in list(self.created):
            if sid not in self.run(self.model.get_sessions()):
                del self.created[sid]

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


@pytest.fixture(params=[*DATABASES, *CITUS])
def db_url(request: pytest.FixtureRequest) -> str:
    """Every database, and Citus."""
    return empty_database(request, request.param)


def test_backend_matches_the_model(db_url: str, request: pytest.FixtureRequest) -> None:
    # On Citus each example's reset is a statement on every shard: a quarter of the examples
    # keeps the test's time near the others'.
    examples = EXAMPLES // 4 if "citus" in request.node.callspec.id else EXAMPLES
    loop = asyncio.new_event_loop()
    backend = SQLAlchemyBackend.from_url(db_url)
    BackendMachine.loop, BackendMachine.real = loop, backend
    try:
        test = BackendMachine.TestCase
        test.settings = settings(
            max_examples=examples,
            stateful_step_count=20,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        )
        test().runTest()
    finally:
        loop.run_until_complete(backend.close())
        loop.close()
