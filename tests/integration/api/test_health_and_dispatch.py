"""Probes, a database or broker that is down, and the enqueue through the real brokers."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis
from fastapi.testclient import TestClient

from api.main import create_app
from store import jobs
from store.config import get_config
from store.db import get_sessionmaker, reset_engine
from store.queue import RUN_JOB_TASK, reset_celery_app

pytestmark = pytest.mark.integration

MakeKey = Callable[..., dict[str, str]]
BODY = {"teacher": "gpt2", "student": "distilgpt2", "dataset": "data/train.jsonl"}
CLOSED_PORT_DB = "postgresql+psycopg://postgres@127.0.0.1:1/nothing"
CLOSED_PORT_BROKER = "redis://127.0.0.1:1/0"


@pytest.fixture
def real_client(app_env: None) -> Iterator[TestClient]:
    """The app exactly as served: no dependency overridden."""
    with TestClient(create_app(), raise_server_exceptions=False) as client:
        yield client


def _reconfigure(monkeypatch: pytest.MonkeyPatch, **env: str) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    get_config.cache_clear()
    reset_engine()
    reset_celery_app()


def test_healthz_needs_nothing(real_client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    _reconfigure(monkeypatch, AMID_DATABASE_URL=CLOSED_PORT_DB)
    response = real_client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_readyz_ok_when_database_and_broker_answer(real_client: TestClient) -> None:
    response = real_client.get("/readyz")
    assert response.status_code == 200
    assert response.json()["checks"] == {"database": "ok", "broker": "ok"}


def test_readyz_names_the_database_when_it_is_down(
    real_client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    _reconfigure(monkeypatch, AMID_DATABASE_URL=CLOSED_PORT_DB)
    response = real_client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["checks"]["database"] != "ok" and body["checks"]["broker"] == "ok"
    assert "database" in body["detail"] and "broker" not in body["detail"]


def test_readyz_names_the_broker_when_it_is_down(
    real_client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    _reconfigure(monkeypatch, AMID_BROKER_URL=CLOSED_PORT_BROKER)
    response = real_client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["checks"] == {"database": "ok", "broker": "unreachable"}
    assert "broker" in body["detail"] and "database" not in body["detail"]


def test_database_down_is_503_not_500(
    real_client: TestClient, make_key: MakeKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    headers = make_key()
    _reconfigure(monkeypatch, AMID_DATABASE_URL=CLOSED_PORT_DB)
    for method, path in [
        ("get", "/v1/jobs"),
        ("post", "/v1/jobs"),
        ("get", "/v1/jobs/" + "0" * 32),
    ]:
        response = real_client.request(method, path, headers=headers, json=BODY)
        assert response.status_code == 503, (method, path, response.text)
        assert response.json()["error"] == "DatabaseUnavailable"


def test_broker_down_at_submit_still_creates_the_job(
    real_client: TestClient, make_key: MakeKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    _reconfigure(monkeypatch, AMID_BROKER_URL=CLOSED_PORT_BROKER)
    headers = make_key()
    response = real_client.post("/v1/jobs", json=BODY, headers=headers)
    assert response.status_code == 201
    with get_sessionmaker()() as session:
        assert response.json()["id"] in jobs.jobs_to_redispatch(session, older_than_seconds=60)


def test_submit_sends_the_job_id_through_redis(
    real_client: TestClient,
    make_key: MakeKey,
    monkeypatch: pytest.MonkeyPatch,
    redis_url: str,
) -> None:
    queue = f"amid-test-{uuid.uuid4().hex[:8]}"
    _reconfigure(monkeypatch, AMID_BROKER_URL=redis_url, AMID_QUEUE=queue)
    broker = redis.Redis.from_url(redis_url)
    try:
        response = real_client.post("/v1/jobs", json=BODY, headers=make_key())
        assert response.status_code == 201
        raw = broker.lpop(queue)
        assert raw is not None and broker.llen(queue) == 0
        message = json.loads(raw)
        assert message["headers"]["task"] == RUN_JOB_TASK
        assert response.json()["id"] in message["headers"]["argsrepr"]
    finally:
        broker.delete(queue)
        broker.close()


def test_submit_lands_in_the_embedded_filesystem_queue(
    real_client: TestClient, make_key: MakeKey
) -> None:
    response = real_client.post("/v1/jobs", json=BODY, headers=make_key())
    assert response.status_code == 201
    folder = get_config().broker_directory / "queue"
    messages = [path.read_text() for path in folder.iterdir()]
    assert len(messages) == 1 and response.json()["id"] in messages[0]
