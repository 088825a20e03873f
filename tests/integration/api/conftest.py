"""The real app on the real Postgres, through FastAPI's TestClient.

Rows are committed (the API owns its transactions); each test works under fresh API keys, so
tests never see each other's jobs except through an admin key.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

import cli.jobs
from api.deps import get_enqueue
from api.main import create_app
from store.config import get_config
from store.db import get_sessionmaker, reset_engine, session_scope, upgrade
from store.keys import create_api_key
from store.queue import reset_celery_app
from tests.integration.api.bad_inputs import Layout, make_layout


@pytest.fixture(scope="session")
def migrated_url(postgres_url: str) -> str:
    upgrade(postgres_url)
    return postgres_url


# The server's directories: model and data roots, one outside, broken data files (bad_inputs).
Roots = Layout


@pytest.fixture
def roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Roots:
    layout = make_layout(tmp_path)
    monkeypatch.chdir(layout.cwd)
    for name, value in layout.env().items():
        monkeypatch.setenv(name, value)
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


# -- the `amid` client against the app in-process ----------------------------------------------

MakeKey = Callable[..., dict[str, str]]
RUN_YAML = """\
teacher: gpt2
student: distilgpt2
dataset: data/train.jsonl
preset: amid
max_steps: 4
"""


@pytest.fixture
def secret(make_key: MakeKey) -> str:
    return make_key()["Authorization"].removeprefix("Bearer ")


@pytest.fixture
def wired(app_env: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Point the client's HTTP seam at the app in-process, keeping its auth headers."""
    app = create_app()
    app.dependency_overrides[get_enqueue] = lambda: lambda job_id: None

    def make(url: str, api_key: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        return TestClient(app, base_url=url, headers=headers, raise_server_exceptions=False)

    monkeypatch.setattr(cli.jobs, "make_http_client", make)
    yield


@pytest.fixture
def run_file(tmp_path: Path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(RUN_YAML)
    return path
