"""Benchmark of sessions_sql against the raw drivers (asyncpg, aiosqlite) running the same SQL.

Run ``python -m bench --help``. Measures every operation serially and with concurrent tasks on
PostgreSQL and SQLite, side by side with the raw driver in the same run, plus garbage
collection of expired sessions on PostgreSQL and the peak memory of listing all sessions.
"""
