"""The production shape end to end: API (uvicorn) and a Celery worker as real processes, on the
local Postgres and Redis, file artifacts, the tiny demo models. One API and one worker serve every
test in this module (their start-up is the slow part)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from store.artifacts import ArtifactStore
from store.config import ServiceConfig
from store.queue import RUN_JOB_TASK, build_celery_app
from tests.integration.conftest import database_of_its_own
from tests.integration.e2e._service import (
    Client,
    base_env,
    free_port,
    job_body,
    make_key,
    start,
    stop,
    wait_for,
    wait_ready,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

JOB_TIMEOUT = 120.0


@dataclass
class Service:
    client: Client
    env: dict[str, str]
    artifacts: ArtifactStore
    logs: Path


@pytest.fixture(scope="module")
def service(
    postgres_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    with database_of_its_own(postgres_url) as database_url:
        yield from _service(database_url, redis_url, tmp_path_factory.mktemp("e2e-pg"))


def _service(database_url: str, redis_url: str, root: Path) -> Iterator[Service]:
    artifacts_uri = (root / "artifacts").as_uri()
    env = base_env(
        root / "home",
        AMID_DATABASE_URL=database_url,
        AMID_BROKER_URL=redis_url,
        # A queue of our own: other test sessions on the same Redis never see these messages.
        AMID_QUEUE=f"amid-e2e-{uuid.uuid4().hex[:8]}",
        AMID_ARTIFACTS_URI=artifacts_uri,
    )
    port = free_port()
    api = start(
        ["uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(port)],
        env,
        root / "api.log",
    )
    worker = start(["cli.main", "worker", "--loglevel=INFO"], env, root / "worker.log")
    client = Client(f"http://127.0.0.1:{port}", make_key(database_url))
    try:
        wait_ready(f"http://127.0.0.1:{port}", [api, worker])
        yield Service(client, env, ArtifactStore(artifacts_uri), root)
    finally:
        client.close()
        stop(worker)
        stop(api)


def test_submit_run_and_fetch_the_student(service: Service) -> None:
    from transformers import AutoModelForCausalLM

    client = service.client
    key = uuid.uuid4().hex
    created = client.submit(job_body(), idempotency_key=key)
    assert created.status_code == 201
    job_id = created.json()["id"]

    job = client.wait_status(job_id, {"succeeded", "failed", "cancelled"}, JOB_TIMEOUT)
    assert job["status"] == "succeeded", job
    assert job["progress"]["step"] == 4

    student_uri = job["student_uri"]
    local = service.logs / "student"
    service.artifacts.download_dir(student_uri, local)
    model = AutoModelForCausalLM.from_pretrained(local)
    assert model.config.n_layer == 2

    metrics = client.items(job_id, "metrics")
    assert {m["name"] for m in metrics} >= {"train/loss", "eval/rouge_l"}
    events = [e["type"] for e in client.items(job_id, "events")]
    assert events.count("started") == 1
    assert "run_started" in events
    checkpoints = client.items(job_id, "checkpoints")
    assert [c["step"] for c in checkpoints] and all(
        service.artifacts.exists(c["uri"]) for c in checkpoints
    )
    assert service.artifacts.exists(student_uri.rsplit("/", 1)[0] + "/metrics.jsonl")

    def job_ids() -> list[str]:
        return [j["id"] for j in client.http.get("/v1/jobs", params={"limit": 100}).json()["items"]]

    before = job_ids()
    again = client.submit(job_body(), idempotency_key=key)
    assert again.status_code == 200
    assert again.json()["id"] == job_id
    assert job_ids() == before


def test_duplicate_delivery_runs_the_job_once(service: Service) -> None:
    client = service.client
    job_id = client.submit(job_body(max_steps=2, checkpoint_interval=0)).json()["id"]
    # The API sent one message; two more copies of it must not run the job again.
    app = build_celery_app(
        ServiceConfig(
            home=Path(service.env["AMID_HOME"]),
            broker_url=service.env["AMID_BROKER_URL"],
            queue=service.env["AMID_QUEUE"],
        )
    )
    for _ in range(2):
        app.send_task(RUN_JOB_TASK, args=[job_id], queue=service.env["AMID_QUEUE"])

    job = client.wait_status(job_id, {"succeeded", "failed", "cancelled"}, JOB_TIMEOUT)
    assert job["status"] == "succeeded", job
    # The worker takes the extra copies one by one after the run; give them time to be consumed.
    probe = client.submit(job_body(max_steps=1, checkpoint_interval=0)).json()["id"]
    client.wait_status(probe, {"succeeded"}, JOB_TIMEOUT)
    assert client.job(job_id)["attempt"] == 1
    events = [e["type"] for e in client.items(job_id, "events")]
    assert events.count("started") == 1
    assert events.count("run_started") == 1


def test_cancel_a_running_job_keeps_checkpoints_and_frees_the_worker(service: Service) -> None:
    client = service.client
    job_id = client.submit(job_body(max_steps=5000, checkpoint_interval=2)).json()["id"]

    def checkpointed() -> bool:
        return bool(client.items(job_id, "checkpoints"))

    wait_for(checkpointed, JOB_TIMEOUT, "a first checkpoint", interval=0.5)
    response = client.http.post(f"/v1/jobs/{job_id}/cancel")
    assert response.status_code == 200, response.text

    job = client.wait_status(job_id, {"cancelled", "succeeded", "failed"}, 20)
    assert job["status"] == "cancelled", job
    assert job["progress"]["step"] < 5000
    checkpoints = client.items(job_id, "checkpoints")
    assert checkpoints and all(service.artifacts.exists(c["uri"]) for c in checkpoints)

    following = client.submit(job_body(max_steps=1, checkpoint_interval=0)).json()["id"]
    assert (
        client.wait_status(following, {"succeeded", "failed"}, JOB_TIMEOUT)["status"] == "succeeded"
    )
