"""Load shedding in front of the routes: requests past AMID_API_CONCURRENCY wait at most
AMID_API_QUEUE_SECONDS, then get a 503 with Retry-After; `/healthz` answers whatever the load."""

from __future__ import annotations

import time

import anyio
import httpx
import pytest
from starlette.types import Receive, Scope, Send

from api.overload import ConcurrencyLimit
from store.config import get_config

HOLD_SECONDS = 0.5


async def slow_app(scope: Scope, receive: Receive, send: Send) -> None:
    """A route that holds its slot for HOLD_SECONDS, as a request waiting on the database does."""
    await anyio.sleep(HOLD_SECONDS)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


async def _burst(paths: list[str]) -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=ConcurrencyLimit(slow_app))
    responses: list[httpx.Response] = [None] * len(paths)  # type: ignore[list-item]
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:

        async def send(index: int, path: str) -> None:
            responses[index] = await client.get(path)

        async with anyio.create_task_group() as group:
            for index, path in enumerate(paths):
                group.start_soon(send, index, path)
    return responses


@pytest.fixture
def one_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMID_API_CONCURRENCY", "1")
    monkeypatch.setenv("AMID_API_QUEUE_SECONDS", "0.1")
    monkeypatch.setenv("AMID_API_MAX_WAITING", "1")
    get_config.cache_clear()


@pytest.mark.usefixtures("one_slot")
def test_requests_past_the_limit_get_503_with_retry_after_fast() -> None:
    before = time.monotonic()
    responses = anyio.run(_burst, ["/v1/jobs"] * 4)
    took = time.monotonic() - before
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200, 503, 503, 503]
    for response in responses:
        if response.status_code == 503:
            assert response.headers["Retry-After"] == "1"
            body = response.json()
            assert body["error"] == "Overloaded" and "retry" in body["detail"]
    # Refused while the first request still held its slot, not after it.
    assert took < HOLD_SECONDS * 2


@pytest.mark.usefixtures("one_slot")
def test_healthz_is_never_held_back() -> None:
    responses = anyio.run(_burst, ["/v1/jobs", "/v1/jobs", "/healthz", "/healthz"])
    assert [r.status_code for r in responses[2:]] == [200, 200]
