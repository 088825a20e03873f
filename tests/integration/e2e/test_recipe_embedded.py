"""The paper's recipe through the embedded default over REST: an SFT job, then a distillation of
its student (`job:<id>`) with an init phase, adaptive student-generated outputs, the LM term and
best-checkpoint selection, each visible in the job's events, metrics and record; then an
on-policy distillation without the adaptive schedule."""

from __future__ import annotations

from pathlib import Path

import pytest

from store.db import upgrade
from tests.integration.e2e._service import (
    DEMO,
    Client,
    base_env,
    free_port,
    job_body,
    make_key,
    start,
    stop,
    wait_ready,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_sft_job_then_the_whole_recipe_over_rest(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    text = corpus / "text.txt"
    text.write_text("\n\n".join(f"Paris is the capital of France, line {i}." for i in range(80)))
    env = base_env(home, AMID_DATA_ROOTS=f"{DEMO}:{corpus}")
    database_url = f"sqlite:///{(home / 'amid.db').resolve()}"
    upgrade(database_url)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start(["cli.main", "serve", "--port", str(port)], env, tmp_path / "serve.log")
    client = Client(url, make_key(database_url))
    try:
        wait_ready(url, [server])
        sft_body = job_body(kind="sft", max_steps=3)
        del sft_body["teacher"], sft_body["preset"], sft_body["ce_weight"]
        sft_id = client.submit(sft_body).json()["id"]
        sft = client.wait_status(sft_id, {"succeeded", "failed", "cancelled"}, 180)
        assert sft["status"] == "succeeded", sft
        assert sft["settings"]["kind"] == "sft" and sft["settings"]["teacher"] is None
        assert any(e["type"] == "phase_started" for e in client.items(sft_id, "events"))

        body = job_body(
            student=f"job:{sft_id}",
            preset="amid",
            max_steps=3,
            init={"sft_steps": 2, "learning_rate": 1e-3},
            student_outputs={"fraction": 0.5, "adaptive": True, "max_new_tokens": 4},
            lm_dataset=str(text),
            select_best="eval/teacher_kl",
            eval_interval=1,
            checkpoint_interval=1,
        )
        job_id = client.submit(body).json()["id"]
        job = client.wait_status(job_id, {"succeeded", "failed", "cancelled"}, 240)
        assert job["status"] == "succeeded", job
        events = client.items(job_id, "events")
        phases = [e["data"]["phase"] for e in events if e["type"] == "phase_started"]
        assert phases == ["init", "distill"]
        [preflight] = [e for e in events if e["type"] == "preflight"]
        assert "w = " in preflight["message"]
        assert preflight["level"] == ("warning" if preflight["data"]["too_far"] else "info")
        assert any(e["type"] == "best_selected" for e in events)
        names = {m["name"] for m in client.items(job_id, "metrics")}
        assert {
            "init/loss",
            "train/loss",
            "train/lm_loss",
            "train/student_output_share",
            "eval/teacher_kl",
            "preflight/w_median",
        } <= names
        # The job record says which step's student it kept.
        best_step = job["latest_metrics"]["best/step"]
        kls = {
            m["step"]: m["value"]
            for m in client.items(job_id, "metrics")
            if m["name"] == "eval/teacher_kl" and m["step"] > 2
        }
        assert best_step == min(kls, key=lambda step: kls[step])
        assert "preflight/w_median" in job["latest_metrics"]

        # On-policy without the adaptive schedule: every micro-batch is the student's own.
        on_policy = job_body(
            student=f"job:{sft_id}",
            preset="kd",
            max_steps=2,
            student_outputs={"fraction": 1.0, "adaptive": False, "max_new_tokens": 4},
        )
        on_policy_id = client.submit(on_policy).json()["id"]
        job = client.wait_status(on_policy_id, {"succeeded", "failed", "cancelled"}, 240)
        assert job["status"] == "succeeded", job
        generated = [
            m["value"]
            for m in client.items(on_policy_id, "metrics")
            if m["name"] == "train/student_output_batches"
        ]
        assert generated == [1.0, 1.0]  # one micro-batch a step, both sampled by the student
    finally:
        client.close()
        stop(server)
