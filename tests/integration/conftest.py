"""Fixtures shared by the integration tests of several folders."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa

from store.db import upgrade
from tests.conftest import _require
from tests.integration.faults._stack import PrivateRedis, ServerFailed, Stack


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


@contextmanager
def database_of_its_own(postgres_url: str) -> Iterator[str]:
    """A migrated database on the local Postgres, dropped afterwards.

    Not the session's shared one: a worker claims the pool's next job and a reaper sweeps every
    running and queued job of its database, so there they would act on jobs other tests left.
    """
    admin = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    name = f"amid_own_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = admin.url.set(database=name).render_as_string(hide_password=False)
    try:
        upgrade(url)
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def own_database(postgres_url: str) -> Iterator[str]:
    """A database of this test's own (`database_of_its_own`)."""
    with database_of_its_own(postgres_url) as url:
        yield url


@pytest.fixture
def make_stack(tmp_path: Path) -> Iterator[Callable[..., Stack]]:
    """`make_stack(database_url, broker_url, **env)`: a stack whose processes stop at teardown."""
    stacks: list[Stack] = []

    def make(database_url: str, broker_url: str, **settings: str) -> Stack:
        stack = Stack(tmp_path / f"stack-{len(stacks)}", database_url, broker_url, settings)
        stacks.append(stack)
        return stack

    yield make
    for stack in reversed(stacks):
        stack.close()
