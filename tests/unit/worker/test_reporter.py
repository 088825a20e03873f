"""The worker's DB reporter on the embedded SQLite store: what a client polling the job sees."""

from __future__ import annotations

from pathlib import Path

from core.callbacks import EvalReport, RunInfo, StepReport
from store import jobs
from store.artifacts import get_artifact_store
from store.config import get_config
from store.db import reset_engine, session_scope, upgrade
from tests.integration.e2e._service import job_body
from worker.reporter import DbReporter


def test_last_evaluation_reaches_latest_metrics_after_the_step_was_flushed(
    tmp_path: Path,
) -> None:
    reset_engine()
    upgrade(get_config().resolved_database_url)
    with session_scope() as session:
        job, _ = jobs.create_job(session, job_body(), "tester", None, 3)
        job_id = job.id
        assert jobs.claim_job(session, job_id, "worker-1") is not None
    reporter = DbReporter(job_id, "worker-1", get_artifact_store(), tmp_path / "metrics.jsonl")
    reporter.on_start(
        RunInfo(total_steps=8, start_step=0, train_examples=10, eval_examples=2, device="cpu")
    )
    reporter.on_eval(EvalReport(4, {"eval/rouge_l": 0.25}))
    # The last step is written on its own (a timed flush) before the final evaluation arrives.
    reporter.on_step(StepReport(8, 8, {"train/loss": 1.5}, 0.0, 0.0))
    reporter.flush()
    reporter.on_eval(EvalReport(8, {"eval/rouge_l": 0.5}))
    with session_scope() as session:
        latest = jobs.get_job(session, job_id).latest_metrics
    reset_engine()
    assert latest == {"train/loss": 1.5, "eval/rouge_l": 0.5}
