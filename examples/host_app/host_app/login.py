"""Logging in: the user's row and the session's values commit or roll back as one."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine

from sessions_sql import SessionManager, SQLAlchemyBackend

from .models import User


async def sign_up_and_log_in(engine: AsyncEngine, backend: SQLAlchemyBackend, name: str) -> str:
    """Create a user and a session for them in one transaction; return the session id."""
    async with engine.begin() as conn:  # commits at the end, rolls back on error
        result = await conn.execute(User.__table__.insert().values(name=name).returning(User.id))
        user_id = result.scalar_one()
        session = SessionManager(backend.using(conn)).new_session()
        await session.set("user_id", user_id)
        return session.id
