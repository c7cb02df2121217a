"""The bot's Alembic environment, with sessions_sql's tables filtered out."""

from __future__ import annotations

import asyncio
import os

from alembic import context
from formbot.models import Base
from sqlalchemy import Connection, pool
from sqlalchemy.ext.asyncio import create_async_engine

from sessions_sql import include_name

config = context.config


def run_on(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        include_name=include_name,  # sessions_sql's tables are not ours to drop or create
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_online() -> None:
    engine = create_async_engine(os.environ["DATABASE_URL"], poolclass=pool.NullPool)
    async with engine.connect() as conn:
        await conn.run_sync(run_on)
        await conn.commit()
    await engine.dispose()


if context.is_offline_mode():
    context.configure(url=os.environ["DATABASE_URL"], target_metadata=Base.metadata)
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(run_online())
