"""Runs one claimed job: settings from the row, models resolved, core's `distill`, outcome recorded.

Every way a run can end becomes a finished row: succeeded (final student uploaded), cancelled
(stopped at a step boundary; its uploaded checkpoints stay), or failed with the AmidError's class
name as the error code ("InternalError" for anything unexpected) and a message.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from core.errors import AmidError
from core.settings import DistillSettings
from store import jobs
from store.artifacts import ArtifactStore, final_key, get_artifact_store
from store.config import get_config
from store.states import JobStatus
from worker.db_retry import with_session
from worker.reporter import DbReporter, Heartbeat

logger = logging.getLogger(__name__)

JOB_PREFIX = "job:"


class SourceJobNotReady(AmidError):
    """A `job:<id>` teacher or student whose job has no final student."""

    status_code = 422


def _resolve_source(
    source: str | None, field: str, artifacts: ArtifactStore, cache: Path
) -> str | None:
    """A `job:<id>` becomes a local copy of that job's final student; anything else is as given."""
    if source is None or not source.startswith(JOB_PREFIX):
        return source
    source_id = source.removeprefix(JOB_PREFIX)
    final_uri = with_session(lambda s: jobs.get_job(s, source_id).final_uri, what="read source job")
    if not final_uri:
        raise SourceJobNotReady(f"job {source_id} has no final student yet", field=field)
    local = cache / "jobs" / source_id / "final"
    if not local.exists():
        artifacts.download_dir(final_uri, local)
    return str(local)


def _attempt_and_settings(session: Session, job_id: str) -> tuple[int, dict[str, Any]]:
    job = jobs.get_job(session, job_id)
    return job.attempt, dict(job.settings)


def run_job(job_id: str, worker_id: str) -> str:
    """Run a job this worker has claimed; returns the status it ended with."""
    config = get_config()
    work_dir = (config.home / "work" / job_id).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    reporter = DbReporter(job_id, worker_id, get_artifact_store(), work_dir / "metrics.jsonl")
    # The lease is kept fresh from the claim on, not only once training starts: importing torch,
    # downloading a `job:` source or a checkpoint to resume from can take longer than the stale
    # threshold, and the reaper would re-queue a job whose worker is alive and busy.
    heartbeat = Heartbeat(reporter, config.heartbeat_seconds)
    heartbeat.start()
    try:
        return _run(job_id, worker_id, work_dir, reporter)
    except Exception as exc:
        code = exc.code if isinstance(exc, AmidError) else "InternalError"
        message = exc.message if isinstance(exc, AmidError) else f"{type(exc).__name__}: {exc}"
        logger.exception("job %s failed", job_id)
        with_session(
            lambda s: jobs.finish_job(
                s, job_id, worker_id, JobStatus.FAILED, error_code=code, error_message=message
            ),
            what="record failure",
        )
        return JobStatus.FAILED.value
    finally:
        heartbeat.stop()
        shutil.rmtree(work_dir, ignore_errors=True)


def _run(job_id: str, worker_id: str, work_dir: Path, reporter: DbReporter) -> str:
    # Heavy imports here: the worker's parent process never loads torch or touches CUDA.
    from core.data import check_dataset
    from core.models import check_tokenizers
    from core.train import distill

    config = get_config()
    artifacts = get_artifact_store()
    # Plain values out of the session: its ORM objects expire when it commits.
    attempt, stored = with_session(lambda s: _attempt_and_settings(s, job_id), what="read job")
    settings = DistillSettings.model_validate(stored)
    cache = (config.home / "cache").resolve()
    student = _resolve_source(settings.student, "student", artifacts, cache)
    assert student is not None
    settings = settings.model_copy(
        update={
            "teacher": _resolve_source(settings.teacher, "teacher", artifacts, cache),
            "student": student,
        }
    )
    # Cheap before expensive: two tokenizers, not two models, decide a mismatched pair; the
    # dataset's first rows decide whether it can be read at all (a hub dataset, or a bad row
    # the submission's one-row check could not see), all before the models take the GPU.
    if settings.teacher is not None:  # an SFT job has none
        check_tokenizers(settings.teacher, settings.student, settings.trust_remote_code)
    check_dataset(settings.dataset)

    resume_from: Path | None = None
    if attempt > 1:
        checkpoint_uri = with_session(
            lambda s: getattr(jobs.latest_checkpoint(s, job_id), "uri", None), what="checkpoint"
        )
        if checkpoint_uri is not None:
            resume_from = artifacts.download_dir(checkpoint_uri, work_dir / "resume")

    result = distill(settings, work_dir / "run", callbacks=[reporter], resume_from=resume_from)
    reporter.upload_metrics()

    if reporter.lease_lost.is_set():
        # Someone else owns the job now (the reaper re-queued it): record nothing over them.
        logger.warning("job %s: lease lost; leaving the row to its new owner", job_id)
        return "lease_lost"
    if result.status != "completed" or result.final_path is None:
        with_session(
            lambda s: jobs.finish_job(s, job_id, worker_id, JobStatus.CANCELLED),
            what="record cancel",
        )
        return JobStatus.CANCELLED.value
    final = artifacts.upload_dir(result.final_path, final_key(job_id))
    with_session(
        lambda s: jobs.finish_job(s, job_id, worker_id, JobStatus.SUCCEEDED, final_uri=final.uri),
        what="record success",
    )
    return JobStatus.SUCCEEDED.value
