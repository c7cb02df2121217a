"""What the web tests share: a clock they move, and the routes every session layer serves."""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response


class Clock:
    """Unix seconds that tests move forward; starts at the real time, which the databases use
    for creation times."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def show(request: Request) -> Response:
    return JSONResponse(dict(request.session))


async def put(request: Request) -> Response:
    request.session.update(await request.json())
    return JSONResponse(dict(request.session))
