"""Quick start: migrate a SQLite file, then write, read and list sessions.

    python examples/quickstart.py [DATABASE_URL]

The database defaults to sessions.db in the current directory.
"""

from __future__ import annotations

import asyncio
import sys
from datetime import datetime, timezone

from sessions_sql import SQLAlchemyBackend, migrate


async def main(url: str) -> None:
    await migrate(url)  # creates the tables (idempotent)
    async with SQLAlchemyBackend.from_url(url) as backend:
        await backend.write_value("alice", "cart", b'["apple","pear"]')
        await backend.write_value("alice", "theme", b"dark")
        await backend.write_value("bob", "cart", b"[]")
        print("alice's cart:", await backend.read_value("alice", "cart"))
        for session_id in sorted(await backend.get_sessions()):
            created = await backend.get_session_age(session_id)
            assert created is not None
            when = datetime.fromtimestamp(created, timezone.utc).isoformat()
            values = await backend.read_values(session_id)
            print(f"session {session_id}: created {when}, values {values}")
        await backend.remove_session("bob")
        print("after removing bob:", sorted(await backend.get_sessions()))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "sqlite+aiosqlite:///sessions.db"))
