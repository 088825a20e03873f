"""Suite-wide fixtures: an isolated AMID_HOME, and the real services the integration tests use.

Service-backed tests skip on a developer machine without Postgres/Redis, but fail loudly when
`AMID_REQUIRE_SERVICES=1` (set by `.ci/run`), so CI never passes by skipping them.
"""

from __future__ import annotations

import os
import sys
import types
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

POSTGRES_ADMIN_URL = os.environ.get(
    "AMID_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("AMID_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _require(service: str, error: Exception) -> None:
    if os.environ.get("AMID_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{service} is required (AMID_REQUIRE_SERVICES=1) but unreachable: {error}")
    pytest.skip(f"{service} unreachable: {error}")


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test gets its own AMID_HOME and a fresh service config."""
    from store.config import get_config

    monkeypatch.setenv("AMID_HOME", str(tmp_path / "amid-home"))
    for name in ("AMID_DATABASE_URL", "AMID_BROKER_URL", "AMID_ARTIFACTS_URI"):
        monkeypatch.delenv(name, raising=False)
    get_config.cache_clear()
    yield
    get_config.cache_clear()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A throw-away Postgres database for this test session (parallel runs do not collide)."""
    import sqlalchemy as sa

    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"amid_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as exc:
        admin.dispose()
        _require("Postgres", exc)
    url = admin.url.set(database=name).render_as_string(hide_password=False)
    yield url
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The local Redis, checked reachable."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.exceptions.ConnectionError as exc:
        _require("Redis", exc)
    finally:
        client.close()
    return REDIS_URL


class RecordedWandbRun:
    """What a W&B run was given (the `wandb_runs` fixture stands in for `wandb`)."""

    def __init__(self, **init: Any) -> None:
        self.init = init
        self.logged: list[tuple[int, dict[str, float]]] = []
        self.summary: dict[str, Any] = {}
        self.finished = False

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.logged.append((step, dict(metrics)))

    def finish(self) -> None:
        self.finished = True


@pytest.fixture
def wandb_runs(monkeypatch: pytest.MonkeyPatch) -> list[RecordedWandbRun]:
    started: list[RecordedWandbRun] = []
    fake = types.ModuleType("wandb")

    def init(**kwargs: Any) -> RecordedWandbRun:
        started.append(RecordedWandbRun(**kwargs))
        return started[-1]

    fake.init = init  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "wandb", fake)
    return started
