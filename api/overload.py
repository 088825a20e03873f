"""Load shedding: at most AMID_API_CONCURRENCY requests are served at once; the rest wait briefly
or are answered 503 with `Retry-After`.

A request that is served holds one thread and at most one database connection, and both pools
are sized to the same number, so a burst of clients queues here, in the event loop, where waiting
costs nothing, instead of inside the database pool (a 30 s stall, then a 500). A request that
cannot get a slot within AMID_API_QUEUE_SECONDS, or that finds AMID_API_MAX_WAITING others
already waiting, is refused at once. `/healthz` is never held back: it answers whatever the load.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.to_thread
from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import error_body
from api.middleware import send_error
from store.config import get_config

# Paths served outside the limit: liveness must answer even when every slot is taken.
UNLIMITED_PATHS = frozenset({"/healthz"})
RETRY_AFTER_SECONDS = 1
# Threads beyond the request slots: sync dependencies' clean-up and the probes run on them too.
SPARE_THREADS = 8


@asynccontextmanager
async def sized_thread_pool(_: FastAPI) -> AsyncIterator[None]:
    """Lifespan: the thread pool that runs sync routes holds every admitted request."""
    limiter = anyio.to_thread.current_default_thread_limiter()
    limiter.total_tokens = get_config().api_concurrency + SPARE_THREADS
    yield


class ConcurrencyLimit:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._slots: anyio.Semaphore | None = None
        self._waiting = 0

    def _semaphore(self) -> anyio.Semaphore:
        if self._slots is None:
            self._slots = anyio.Semaphore(get_config().api_concurrency)
        return self._slots

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNLIMITED_PATHS:
            await self.app(scope, receive, send)
            return
        config = get_config()
        slots = self._semaphore()
        if slots.value == 0 and self._waiting >= config.api_max_waiting:
            await _send_overloaded(send, "too many requests are waiting")
            return
        self._waiting += 1
        admitted = False
        try:
            with anyio.move_on_after(config.api_queue_seconds):
                await slots.acquire()
                admitted = True
            if not admitted:
                await _send_overloaded(
                    send, f"no request slot freed within {config.api_queue_seconds:g}s"
                )
                return
        finally:
            self._waiting -= 1
        try:
            await self.app(scope, receive, send)
        finally:
            slots.release()


async def _send_overloaded(send: Send, reason: str) -> None:
    body = error_body("Overloaded", f"the API is overloaded ({reason}); retry shortly", None)
    await send_error(send, 503, body, [(b"retry-after", str(RETRY_AFTER_SECONDS).encode())])
