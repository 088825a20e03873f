"""Fixtures shared by the integration tests of several folders."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import _require
from tests.integration.faults._stack import PrivateRedis, ServerFailed


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A running redis-server of this test's own (a kill -9 leaves unacknowledged messages in
    Redis; they stay in this throw-away server, not in the shared one)."""
    try:
        server = PrivateRedis(tmp_path / "redis")
        server.start()
    except ServerFailed as exc:
        _require("a private redis-server", exc)
    try:
        yield server
    finally:
        server.close()
