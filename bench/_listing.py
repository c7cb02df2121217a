"""Peak memory of listing every session with ``iter_sessions``, in a process of its own.

Run by the benchmark as ``python -m bench._listing URL BATCH_SIZE``; prints one JSON object.

The peak is the kernel's high-water mark of this process's resident set (``VmHWM`` in
``/proc/self/status``). ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` is reported too but is not
used: Linux carries it over ``execve`` from the parent's address space (the benchmark process,
which spawned this one), so it can show the parent's peak instead of this process's.

The process imports the backend and opens its connection first, so ``rss_before_kb`` is the
baseline of an idle process and ``rss_peak_kb - rss_before_kb`` is what the listing added.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

from sessions_sql import SQLAlchemyBackend

__all__ = ["main"]


def _status_kb(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (Linux), or ``None``."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def _maxrss_kb() -> int:
    # ru_maxrss is in kilobytes on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _peak_kb() -> int:
    peak = _status_kb("VmHWM")
    return _maxrss_kb() if peak is None else peak


async def _listing(url: str, batch_size: int) -> dict[str, Any]:
    backend = SQLAlchemyBackend.from_url(url)
    try:
        await backend.get_session_age("warm-up")  # connect, prepare, import lazily loaded code
        before = _peak_kb()
        count = 0
        start = time.perf_counter()
        async for _sid in backend.iter_sessions(batch_size=batch_size):
            count += 1
        seconds = time.perf_counter() - start
        peak = _peak_kb()
    finally:
        await backend.close()
    return {
        "sessions": count,
        "batch_size": batch_size,
        "seconds": seconds,
        "sessions_per_s": count / seconds if seconds > 0 else 0.0,
        "rss_before_kb": before,
        "rss_peak_kb": peak,
        "rss_peak_source": "ru_maxrss" if _status_kb("VmHWM") is None else "VmHWM",
        "ru_maxrss_kb": _maxrss_kb(),
    }


def main(argv: list[str]) -> int:
    url, batch_size = argv[0], int(argv[1])
    print(json.dumps(asyncio.run(_listing(url, batch_size))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
