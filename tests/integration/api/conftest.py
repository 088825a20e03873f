"""The real app on the real Postgres, through FastAPI's TestClient.

Rows are committed (the API owns its transactions); each test works under fresh API keys, so
tests never see each other's jobs except through an admin key.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from api.deps import get_enqueue
from api.main import create_app
from store.config import get_config
from store.db import get_sessionmaker, reset_engine, session_scope, upgrade
from store.keys import create_api_key
from store.queue import reset_celery_app


@pytest.fixture(scope="session")
def migrated_url(postgres_url: str) -> str:
    upgrade(postgres_url)
    return postgres_url


@dataclass
class Roots:
    cwd: Path
    models: Path
    data: Path
    outside: Path


@pytest.fixture
def roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Roots:
    layout = Roots(
        cwd=tmp_path / "srv",
        models=tmp_path / "srv" / "models",
        data=tmp_path / "srv" / "data",
        outside=tmp_path / "elsewhere",
    )
    for directory in (layout.models / "teacher", layout.models / "student", layout.outside):
        directory.mkdir(parents=True)
    layout.data.mkdir()
    (layout.data / "train.jsonl").write_text('{"prompt": "p", "response": "r"}\n')
    (layout.outside / "secret.jsonl").write_text("{}\n")
    monkeypatch.chdir(layout.cwd)
    monkeypatch.setenv("AMID_MODEL_ROOTS", str(layout.models))
    monkeypatch.setenv("AMID_DATA_ROOTS", str(layout.data))
    return layout


@dataclass
class Sent:
    """A stand-in broker send that records job ids (or fails, when told to)."""

    ids: list[str] = field(default_factory=list)
    fail: bool = False
    visible_at_send: list[bool] = field(default_factory=list)

    def __call__(self, job_id: str) -> None:
        # The message must follow the commit: another connection must already see the row.
        from store.models import Job

        with get_sessionmaker()() as other:
            self.visible_at_send.append(other.get(Job, job_id) is not None)
        if self.fail:
            raise ConnectionError("broker down")
        self.ids.append(job_id)


@pytest.fixture
def sent() -> Sent:
    return Sent()


@pytest.fixture
def app_env(migrated_url: str, roots: Roots, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("AMID_DATABASE_URL", migrated_url)
    get_config.cache_clear()
    reset_engine()
    reset_celery_app()
    yield
    reset_engine()
    reset_celery_app()


@pytest.fixture
def client(app_env: None, sent: Sent) -> Iterator[TestClient]:
    app = create_app()
    app.dependency_overrides[get_enqueue] = lambda: sent
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture
def make_key(app_env: None) -> Callable[..., dict[str, str]]:
    """Create an API key; returns the headers that authenticate with it."""

    def make(admin: bool = False, name: str = "test") -> dict[str, str]:
        with session_scope() as session:
            _, secret = create_api_key(session, name, is_admin=admin)
        return {"Authorization": f"Bearer {secret}"}

    return make


@pytest.fixture
def db(app_env: None) -> Iterator[Session]:
    """A separate session for checking what the API committed."""
    with get_sessionmaker()() as session:
        yield session
