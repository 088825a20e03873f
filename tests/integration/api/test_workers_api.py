"""/v1/workers on Postgres: who sees what of the pool, who may drain, and how the registry's rows
(written here through the store functions a worker's main process calls) read back."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from store import jobs, workers
from store.keys import create_api_key
from store.models import Worker
from tests.integration.api._client import run_amid
from tests.integration.e2e._service import job_body


def _identity(
    gpu: str = "NVIDIA H100 80GB HBM3", memory: int | None = 85 * 1024**3
) -> workers.WorkerIdentity:
    return workers.WorkerIdentity(
        id=f"gpu-box-{uuid.uuid4().hex[:8]}:7:gpu0",
        host="gpu-box",
        gpu_name=gpu,
        gpu_memory_bytes=memory,
        version="0.1.0",
    )


def _entry(client: TestClient, headers: dict[str, str], worker_id: str) -> dict:
    response = client.get("/v1/workers", headers=headers)
    assert response.status_code == 200, response.text
    [entry] = [w for w in response.json()["items"] if w["id"] == worker_id]
    return entry


def _busy_worker(db: Session) -> tuple[workers.WorkerIdentity, str, str]:
    """A registered worker whose job process runs a job of a fresh key: (worker, job, owner)."""
    owner, _ = create_api_key(db, "team-a")
    job, _ = jobs.create_job(db, job_body(), owner.id, None, 3)
    me = _identity()
    workers.register(db, me)
    lease = me.id.replace(":7:", ":8:")  # the job process's own pid
    assert jobs.claim_job(db, job.id, lease) is not None
    assert workers.heartbeat(db, me.id, job_leases=[lease], settled=False) is False
    db.commit()
    return me, job.id, owner.id


def test_every_key_sees_the_pool_but_only_admins_see_whose_job_runs(
    client: TestClient, make_key, db: Session
) -> None:
    me, job_id, owner = _busy_worker(db)
    idle = _identity(gpu="cpu", memory=None)
    workers.register(db, idle)
    db.commit()

    assert client.get("/v1/workers").status_code == 401
    seen = _entry(client, make_key(), me.id)
    assert seen["state"] == "busy" and seen["job"] == job_id
    assert (seen["gpu"], seen["gpu_memory_bytes"], seen["host"]) == (
        me.gpu_name,
        me.gpu_memory_bytes,
        "gpu-box",
    )
    assert seen["job_owner"] is None and seen["job_owner_name"] is None
    assert 0 <= seen["last_seen_seconds"] < 60

    as_admin = _entry(client, make_key(admin=True), me.id)
    assert (as_admin["job_owner"], as_admin["job_owner_name"]) == (owner, "team-a")
    other = _entry(client, make_key(), idle.id)
    assert (other["state"], other["job"], other["gpu"]) == ("idle", None, "cpu")


def test_a_silent_or_stopped_worker_shows_offline_and_cannot_be_drained(
    client: TestClient, make_key, db: Session
) -> None:
    admin = make_key(admin=True)
    silent, stopped = _identity(), _identity()
    for me in (silent, stopped):
        workers.register(db, me)
    row = db.get(Worker, silent.id)
    assert row is not None
    row.last_seen_at -= timedelta(seconds=31)  # past the stale threshold (30 s by default)
    workers.leave(db, stopped.id)
    db.commit()

    for me in (silent, stopped):
        assert _entry(client, admin, me.id)["state"] == "offline"
        response = client.post(f"/v1/workers/{me.id}/drain", headers=admin)
        assert response.status_code == 409, response.text
        assert response.json()["error"] == "WorkerOffline"


def test_drain_is_for_admins_and_settles_once_the_job_is_over(
    client: TestClient, make_key, db: Session
) -> None:
    me, job_id, _ = _busy_worker(db)
    response = client.post(f"/v1/workers/{me.id}/drain", headers=make_key())
    assert response.status_code == 403
    assert response.json()["error"] == "Forbidden" and "admin" in response.json()["detail"]
    assert _entry(client, make_key(), me.id)["state"] == "busy"

    admin = make_key(admin=True)
    response = client.post(f"/v1/workers/{me.id}/drain", headers=admin)
    assert response.status_code == 200, response.text
    assert (response.json()["state"], response.json()["job"]) == ("draining", job_id)
    # Asked again: nothing changes.
    assert client.post(f"/v1/workers/{me.id}/drain", headers=admin).json()["state"] == "draining"

    # The worker's next report still runs the job: it stays draining, and reads the request.
    lease = me.id.replace(":7:", ":8:")
    assert workers.heartbeat(db, me.id, job_leases=[lease], settled=False) is True
    db.commit()
    assert _entry(client, admin, me.id)["state"] == "draining"
    # The job is over and the worker runs nothing any more: drained.
    assert jobs.finish_job(db, job_id, lease, "succeeded") is not None
    assert workers.heartbeat(db, me.id, job_leases=[], settled=True) is True
    db.commit()
    drained = _entry(client, admin, me.id)
    assert (drained["state"], drained["job"]) == ("drained", None)


def test_drain_of_an_unknown_worker_is_a_404_naming_the_id(client: TestClient, make_key) -> None:
    admin = make_key(admin=True)
    response = client.post("/v1/workers/nowhere:1:gpu0/drain", headers=admin)
    assert response.status_code == 404
    assert response.json() == {
        "error": "WorkerNotFound",
        "detail": "id: worker nowhere:1:gpu0 not found",
        "field": "id",
    }
    for malformed in ("x" * 256, "gpu-box%00:7:gpu0"):
        response = client.post(f"/v1/workers/{malformed}/drain", headers=admin)
        assert response.status_code == 422, response.text
        assert response.json()["field"] == "worker_id"


def test_a_worker_whose_row_is_gone_is_told_to_register_again(db: Session) -> None:
    assert workers.heartbeat(db, "gone:1:gpu0", job_leases=[], settled=False) is None


def test_amid_pool_drain_prints_the_state_and_errors_in_one_line(
    wired: None, make_key, db: Session, capsys: pytest.CaptureFixture[str]
) -> None:
    me = _identity()
    workers.register(db, me)
    db.commit()
    admin = make_key(admin=True)["Authorization"].removeprefix("Bearer ")
    user = make_key()["Authorization"].removeprefix("Bearer ")

    code, out, err = run_amid(capsys, "pool", "drain", me.id, "--api-key", user)
    assert code == 1 and err.strip() == "error: draining a worker is for admin keys (Forbidden)"
    code, out, err = run_amid(capsys, "pool", "drain", me.id, "--api-key", admin)
    assert code == 0, err
    assert out.strip() == f"{me.id}: draining"
    code, out, err = run_amid(capsys, "pool", "drain", "nowhere:1:gpu0", "--api-key", admin)
    assert code == 1 and "worker nowhere:1:gpu0 not found (WorkerNotFound)" in err

    code, out, err = run_amid(capsys, "pool", "list", "--api-key", user)
    assert code == 0, err
    [line] = [line for line in out.splitlines() if line.startswith(me.id + " ")]
    assert line.split()[1:9] == [
        "gpu-box",
        "NVIDIA",
        "H100",
        "80GB",
        "HBM3",
        "(85",
        "GiB)",
        "draining",
    ]
    assert line.split()[9] == "-" and line.endswith("s ago")
