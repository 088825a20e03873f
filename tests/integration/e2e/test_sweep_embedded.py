"""A sweep through the embedded default over REST: three students on the demo models, listed,
ranked and downloaded one by one; and a running sweep cancelled."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from store.db import upgrade
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

SWEEP = [{"alpha": -5.0}, {"preset": "kd"}, {"alpha": 1.0, "lambda": 0.5, "learning_rate": 1e-2}]
FINISHED = {"succeeded", "failed", "cancelled"}


def test_a_sweep_trains_ranks_and_serves_each_student(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    home = tmp_path / "home"
    home.mkdir()
    database_url = f"sqlite:///{(home / 'amid.db').resolve()}"
    upgrade(database_url)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start(["cli.main", "serve", "--port", str(port)], base_env(home), tmp_path / "log")
    client = Client(url, make_key(database_url))
    try:
        wait_ready(url, [server])
        body = job_body(sweep=SWEEP, max_steps=2, select_best="eval/loss")
        job_id = client.submit(body).json()["id"]
        before = client.items(job_id, "students")
        assert [(s["student"], s["rank"], s["download_url"]) for s in before[:1]] == [
            (0, None, None)
        ]
        assert [s["knobs"] for s in before] == SWEEP
        job = client.wait_status(job_id, FINISHED, 240)
        assert job["status"] == "succeeded", job

        students = client.items(job_id, "students")
        assert [s["rank"] for s in students] == [1, 2, 3]
        assert sorted(s["student"] for s in students) == [0, 1, 2]
        assert {s["metric"] for s in students} == {"eval/loss"}
        scores = [s["score"] for s in students]
        assert scores == sorted(scores)  # a loss ranks lowest first
        assert job["sweep_summary"] == students
        ranked = [e for e in client.items(job_id, "events") if e["type"] == "sweep_ranked"]
        assert [r["student"] for r in ranked[0]["data"]["ranking"]] == [
            s["student"] for s in students
        ]
        # Every student has its own series, its own checkpoints and its own final student.
        names = {point["name"] for point in client.items(job_id, "metrics")}
        assert {f"student{k}/train/loss" for k in range(3)} <= names
        assert {f"student{k}/eval/loss" for k in range(3)} <= names
        for checkpoint in client.items(job_id, "checkpoints"):
            assert {f"student{k}/train/loss" for k in range(3)} <= set(checkpoint["metrics"])
        digests = set()
        for student in students:
            response = client.http.get(student["download_url"])
            assert response.status_code == 200, response.text
            target = tmp_path / f"student-{student['student']}"
            with tarfile.open(fileobj=io.BytesIO(response.content), mode="r:gz") as archive:
                archive.extractall(target, filter="data")
            (model_dir,) = target.iterdir()
            AutoModelForCausalLM.from_pretrained(model_dir)
            digests.add((model_dir / "model.safetensors").read_bytes())
        assert len(digests) == 3, "the students' weights should differ"
        # The job's own student is the best one.
        best = client.http.get(f"/v1/jobs/{job_id}/student")
        assert best.status_code == 200
        assert job["student_uri"].endswith(f"/students/{students[0]['student']}")
        missing = client.http.get(f"/v1/jobs/{job_id}/students/3")
        assert missing.status_code == 404 and missing.json()["field"] == "student"

        single = client.submit(job_body(max_steps=1)).json()["id"]
        assert client.http.get(f"/v1/jobs/{single}/students").status_code == 404

        # A running sweep stops at a step boundary when cancelled, all three students with it.
        long_id = client.submit(job_body(sweep=SWEEP, max_steps=500)).json()["id"]
        wait_for(lambda: client.job(long_id)["progress"]["step"] >= 1, 240, "a sweep step")
        assert client.http.post(f"/v1/jobs/{long_id}/cancel").status_code == 200
        cancelled = client.wait_status(long_id, FINISHED, 120)
        assert cancelled["status"] == "cancelled", cancelled
        assert cancelled["progress"]["step"] < 500
        stopped = [e for e in client.items(long_id, "events") if e["type"] == "stopped"]
        assert sorted(e["data"]["student"] for e in stopped) == [0, 1, 2]
        assert client.http.get(f"/v1/jobs/{long_id}/students/0").status_code == 409
    finally:
        client.close()
        stop(server)
