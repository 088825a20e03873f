"""The task body and the runner on the real Postgres, with a stand-in `distill` (what these tests
are about is the claim, the reporting and the outcome, not training)."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from core.callbacks import Callback, CheckpointReport, RunInfo, RunResult, StepReport
from store import jobs
from store.artifacts import get_artifact_store
from store.config import get_config
from store.db import reset_engine, session_scope
from store.models import Job
from tests.conftest import RecordedWandbRun
from tests.integration.e2e._service import DEMO, job_body

pytestmark = pytest.mark.integration


@pytest.fixture
def db(own_database: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    # A database of its own: the task claims the pool's next job, so the pool holds only this
    # test's jobs.
    monkeypatch.setenv("AMID_DATABASE_URL", own_database)
    # The worker reads datasets only under the data roots, as the API allowed them.
    monkeypatch.setenv("AMID_DATA_ROOTS", f"{DEMO}:{tmp_path}")
    monkeypatch.setenv("AMID_HEARTBEAT_SECONDS", "0.2")
    monkeypatch.setenv("AMID_STALE_AFTER_SECONDS", "30")
    get_config.cache_clear()
    reset_engine()
    yield own_database
    reset_engine()


def _new_job(**overrides: Any) -> str:
    with session_scope() as session:
        job, _ = jobs.create_job(session, job_body(**overrides), "tester", None, 3)
        return job.id


def _job(job_id: str) -> tuple[str, str | None, str | None, int]:
    with session_scope() as session:
        job = jobs.get_job(session, job_id)
        return job.status, job.error_code, job.error_message, job.progress_step or 0


def _fake_distill(
    steps: int, step_seconds: float = 0.0, fail_at: int | None = None
) -> Callable[..., RunResult]:
    def distill(
        settings: Any, output_dir: Path, callbacks: Sequence[Callback] = (), resume_from: Any = None
    ) -> RunResult:
        for cb in callbacks:
            cb.on_start(RunInfo(steps, 0, 10, 2, "cpu"))
        for step in range(1, steps + 1):
            if fail_at == step:
                raise RuntimeError(f"boom at step {step}")
            time.sleep(step_seconds)
            for cb in callbacks:
                cb.on_step(StepReport(step, steps, {"train/loss": 1.0 / step}, 0.1, 0.0))
            ckpt = output_dir / f"step-{step}"
            ckpt.mkdir(parents=True)
            (ckpt / "weights.bin").write_bytes(b"w" * step)
            for cb in callbacks:
                cb.on_checkpoint(CheckpointReport(step, ckpt, {}, False))
            if any(cb.should_stop() for cb in callbacks):
                result = RunResult("stopped", step, None, {}, None)
                break
        else:
            final = output_dir / "final"
            final.mkdir()
            (final / "config.json").write_text("{}")
            result = RunResult("completed", steps, final, {"eval/rouge_l": 0.5}, steps)
        for cb in callbacks:
            cb.on_end(result)
        return result

    return distill


def _run_task(job_id: str) -> str:
    from worker.tasks import run_job

    result: str = run_job(job_id)
    return result


def test_job_succeeds_with_checkpoints_metrics_and_final(
    db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("core.train.distill", _fake_distill(3))
    job_id = _new_job()
    assert _run_task(job_id) == "succeeded"
    assert _run_task(job_id) == "not_claimed"  # a second delivery does nothing

    status, code, _, step = _job(job_id)
    assert (status, code, step) == ("succeeded", None, 3)
    with session_scope() as session:
        checkpoints = jobs.list_checkpoints(session, job_id)
        assert [c.step for c in checkpoints] == [1, 2, 3]
        store = get_artifact_store()
        assert all(store.exists(c.uri) for c in checkpoints)
        assert jobs.get_job(session, job_id).final_uri.endswith(f"jobs/{job_id}/final")


def test_tokenizer_mismatch_fails_fast(
    db: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    called = []
    monkeypatch.setattr("core.train.distill", lambda *a, **k: called.append(1))
    # A student whose tokenizer has one token more than the teacher's: refused before loading.
    student = tmp_path / "student"
    shutil.copytree(DEMO / "assets" / "student", student)
    tokenizer = AutoTokenizer.from_pretrained(student)
    tokenizer.add_tokens(["<|tool|>"])
    tokenizer.save_pretrained(student)
    job_id = _new_job(student=str(student))
    assert _run_task(job_id) == "failed"
    status, code, message, _ = _job(job_id)
    assert (status, code) == ("failed", "TokenizerMismatch")
    assert message and "student 1025" in message
    assert not called


def test_unreadable_dataset_fails_fast(
    db: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    called = []
    monkeypatch.setattr("core.train.distill", lambda *a, **k: called.append(1))
    # Good first rows, a bad third: past the API's one-row check, caught before the models load.
    rows = tmp_path / "rows.jsonl"
    good = '{"instruction": "Say hi.", "response": "Hi."}'
    rows.write_text(f'{good}\n{good}\n{{"instruction": "Say hi."}}\n')
    job_id = _new_job(dataset={"source": str(rows), "format": "dolly"})
    assert _run_task(job_id) == "failed"
    status, code, message, _ = _job(job_id)
    assert (status, code) == ("failed", "MalformedRow")
    assert message and "line 3" in message and "response" in message
    assert not called


def test_unexpected_error_fails_the_job_with_internal_error(
    db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("core.train.distill", _fake_distill(3, fail_at=2))
    job_id = _new_job()
    assert _run_task(job_id) == "failed"
    status, code, message, _ = _job(job_id)
    assert (status, code) == ("failed", "InternalError")
    assert message and "boom at step 2" in message


def test_cancel_stops_at_a_step_boundary_and_keeps_checkpoints(
    db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("core.train.distill", _fake_distill(1000, step_seconds=0.02))
    job_id = _new_job()
    outcome: list[str] = []
    thread = threading.Thread(target=lambda: outcome.append(_run_task(job_id)))
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while _job(job_id)[3] < 5 and time.monotonic() < deadline:
            time.sleep(0.1)
        with session_scope() as session:
            jobs.request_cancel(session, job_id, "tester")
    finally:
        thread.join(timeout=30)
    assert outcome == ["cancelled"]
    status, _, _, step = _job(job_id)
    assert status == "cancelled"
    assert 5 <= step < 1000
    with session_scope() as session:
        assert len(jobs.list_checkpoints(session, job_id)) >= 5


def _requeued_with_checkpoints(steps_present: list[int], steps_missing: list[int]) -> str:
    """A job on its second attempt, with checkpoint rows of which some artifacts are gone."""
    job_id = _new_job()
    store = get_artifact_store()
    with session_scope() as session:
        assert jobs.claim_job(session, job_id, "lost-worker") is not None
    for step in sorted(steps_present + steps_missing):
        local = get_config().home / "ckpt" / str(step)
        local.mkdir(parents=True)
        (local / "weights.bin").write_bytes(b"w" * step)
        uploaded = store.upload_dir(local, f"jobs/{job_id}/checkpoints/step-{step}")
        with session_scope() as session:
            jobs.add_checkpoint(
                session,
                job_id,
                step=step,
                uri=uploaded.uri,
                sha256=uploaded.sha256,
                metrics={},
                is_best=False,
            )
        if step in steps_missing:
            shutil.rmtree(Path(uploaded.uri.removeprefix("file://")))
    with session_scope() as session:
        session.execute(
            sa.update(Job).where(Job.id == job_id).values(status="queued", lease_owner=None)
        )
    return job_id


def _resumed_from(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    seen: list[Any] = []
    fake = _fake_distill(1)

    def distill(
        settings: Any, output_dir: Path, callbacks: Any = (), resume_from: Any = None
    ) -> RunResult:
        # What it resumes from, read now: the work directory goes with the run.
        seen.append(resume_from and (Path(resume_from) / "weights.bin").read_bytes())
        return fake(settings, output_dir, callbacks, resume_from)

    monkeypatch.setattr("core.train.distill", distill)
    return seen


def _event_types(job_id: str) -> list[str]:
    with session_scope() as session:
        return [event.type for event in jobs.list_events(session, job_id, limit=1000)]


def test_resume_falls_back_past_a_missing_newest_checkpoint(
    db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _resumed_from(monkeypatch)
    job_id = _requeued_with_checkpoints(steps_present=[2], steps_missing=[4])
    assert _run_task(job_id) == "succeeded"
    assert seen == [b"w" * 2]  # the checkpoint of step 2, the newest that can be read
    assert "checkpoint_unreadable" in _event_types(job_id)
    with session_scope() as session:
        listed = [c.step for c in jobs.list_checkpoints(session, job_id)]
    assert 4 not in listed and 2 in listed


def test_resume_starts_over_when_no_checkpoint_is_readable(
    db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _resumed_from(monkeypatch)
    job_id = _requeued_with_checkpoints(steps_present=[], steps_missing=[2, 4])
    assert _run_task(job_id) == "succeeded"
    assert seen == [None]
    types = _event_types(job_id)
    assert types.count("checkpoint_unreadable") == 2 and "started_over" in types


def test_a_worker_configured_for_wandb_reports_the_job_there(
    db: str, monkeypatch: pytest.MonkeyPatch, wandb_runs: list[RecordedWandbRun]
) -> None:
    monkeypatch.setenv("AMID_WANDB_PROJECT", "team-distill")
    get_config.cache_clear()
    monkeypatch.setattr("core.train.distill", _fake_distill(2))
    job_id = _new_job()
    assert _run_task(job_id) == "succeeded"
    [run] = wandb_runs
    assert run.init["project"] == "team-distill" and run.init["id"] == job_id
    assert [step for step, _ in run.logged] == [1, 2]
    assert run.finished
