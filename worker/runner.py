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

from core.callbacks import Callback, RunResult
from core.card import StudentCard
from core.datafiles import within_roots
from core.errors import AmidError
from core.settings import DistillSettings
from store import files, jobs
from store.artifacts import (
    ArtifactCorrupt,
    ArtifactNotFound,
    ArtifactStore,
    final_key,
    get_artifact_store,
    sweep_student_key,
)
from store.config import ServiceConfig, get_config
from store.states import JobStatus
from worker.db_retry import with_session
from worker.reporter import DbReporter, Heartbeat
from worker.tensorboard import TensorBoardWriter
from worker.wandb_reporter import WandbReporter
from worker.watchdog import Watchdog

logger = logging.getLogger(__name__)

JOB_PREFIX = "job:"


class SourceJobNotReady(AmidError):
    """A `job:<id>` teacher or student whose job has no final student."""

    status_code = 422


def _resolve_source(
    source: str | None, field: str, artifacts: ArtifactStore, cache: Path
) -> str | None:
    """A `job:<id>` becomes a local copy of that job's final student, a `file:<id>` a local copy
    of that upload; anything else (None: an SFT job's teacher) is as given."""
    if source is not None and (upload_ref := files.FILE_REF.fullmatch(source)):
        return str(_local_upload(upload_ref.group(1), artifacts, cache))
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


def _wandb(
    project: str, job_id: str, stored: dict[str, Any], work_dir: Path, reporter: Callback
) -> list[Callback]:
    """The W&B reporter, or none, with an event saying why, when W&B cannot be used."""
    try:
        return [WandbReporter(project, job_id, stored, work_dir / "wandb")]
    except ImportError:
        reporter.on_event(
            "wandb_unavailable",
            "AMID_WANDB_PROJECT is set but the worker has no `wandb` package "
            "(pip install wandb): this job reports to W&B nothing",
            {"project": project},
        )
        return []


def _resume_point(
    job_id: str, artifacts: ArtifactStore, local: Path, reporter: DbReporter
) -> Path | None:
    """The newest checkpoint that can still be read, downloaded to `local`; None: start over.

    A checkpoint whose artifact is gone or damaged is dropped from the job's list (it shows
    only what exists), with an event, and the one before it is tried.
    """
    dropped = 0
    while (
        checkpoint := with_session(lambda s: jobs.latest_checkpoint(s, job_id), what="checkpoint")
    ) is not None:
        step, uri = checkpoint.step, checkpoint.uri
        try:
            return artifacts.download_dir(uri, local)
        except (ArtifactNotFound, ArtifactCorrupt) as exc:
            shutil.rmtree(local, ignore_errors=True)
            _forget_checkpoint(job_id, step)
            dropped += 1
            reporter.on_event(
                "checkpoint_unreadable",
                f"checkpoint at step {step} cannot be read ({exc.message}); dropped",
                {"step": step, "uri": uri},
            )
    if dropped:
        reporter.on_event("started_over", "no readable checkpoint left; training from the start")
    return None


def _forget_checkpoint(job_id: str, step: int) -> None:
    with_session(lambda s: jobs.forget_checkpoint(s, job_id, step), what="forget checkpoint")


# Under the worker's cache: its own copies of uploaded files (`file:<id>`).
UPLOADS = "files"


def _cache(config: ServiceConfig) -> Path:
    return (config.home / "cache").resolve()


def _local_upload(file_id: str, artifacts: ArtifactStore, cache: Path) -> Path:
    # Plain values out of the session: its ORM objects expire when it commits.
    purpose, filename, uri, sha256 = with_session(
        lambda s: _upload_fields(s, file_id), what="read uploaded file"
    )
    local = cache / UPLOADS / file_id
    if purpose == "model":
        return local if local.exists() else artifacts.download_dir(uri, local)
    target = local / filename
    return target if target.exists() else artifacts.download_file(uri, target, sha256)


def _upload_fields(session: Session, file_id: str) -> tuple[str, str, str, str]:
    upload = files.get_file(session, file_id)
    return upload.purpose, upload.filename, upload.uri, upload.sha256


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
    watchdog = Watchdog(
        reporter,
        cancel_grace_seconds=config.cancel_grace_seconds,
        stall_after_seconds=config.stall_after_seconds,
    )
    watchdog.start()
    try:
        # Datasets are read under the rules the API applied at submission (core.datafiles); the
        # worker's own copies of uploaded files are one more root.
        with within_roots([*config.data_roots, _cache(config) / UPLOADS]):
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
        watchdog.stop()
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
    cache = _cache(config)
    student = _resolve_source(settings.student, "student", artifacts, cache)
    assert student is not None
    settings = settings.model_copy(
        update={
            "teacher": _resolve_source(settings.teacher, "teacher", artifacts, cache),
            "student": student,
            "dataset": settings.dataset.model_copy(
                update={
                    "source": _resolve_source(
                        settings.dataset.source, "dataset.source", artifacts, cache
                    )
                }
            ),
        }
    )
    # Cheap before expensive: two tokenizers, not two models, decide a mismatched pair; the
    # dataset's first rows decide whether it can be read at all (a hub dataset, or a bad row
    # the submission's one-row check could not see), all before the models take the GPU.
    if settings.teacher is not None:  # an SFT job has none
        check_tokenizers(settings.teacher, settings.student, settings.trust_remote_code)
    data_format = check_dataset(settings.dataset)
    card = StudentCard(job_id=job_id, settings=stored, data_format=data_format)
    reporter.card = card

    resume_from = None
    if attempt > 1:
        resume_from = _resume_point(job_id, artifacts, work_dir / "resume", reporter)

    tensorboard = TensorBoardWriter(work_dir / "tensorboard")
    callbacks: list[Callback] = [reporter, tensorboard]
    if config.wandb_project:
        callbacks += _wandb(config.wandb_project, job_id, stored, work_dir, reporter)
    result = distill(settings, work_dir / "run", callbacks=callbacks, resume_from=resume_from)
    reporter.upload_metrics()
    tensorboard.upload(artifacts, job_id)

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
    summary = None
    if result.students:
        summary = _upload_sweep(job_id, result, card, artifacts)
        final_uri = summary[0]["uri"]  # the best student is the job's final student
    else:
        card.write(result.final_path, step=result.steps_done, metrics=result.final_metrics)
        final_uri = artifacts.upload_dir(result.final_path, final_key(job_id)).uri
    with_session(
        lambda s: jobs.finish_job(
            s,
            job_id,
            worker_id,
            JobStatus.SUCCEEDED,
            final_uri=final_uri,
            sweep_summary=summary,
        ),
        what="record success",
    )
    return JobStatus.SUCCEEDED.value


def _upload_sweep(
    job_id: str, result: RunResult, card: StudentCard, artifacts: ArtifactStore
) -> list[dict[str, Any]]:
    """Upload every student of a sweep; return the job's sweep summary, best first."""
    summary = []
    for student in result.students:
        card.write(student.final_path, step=result.steps_done, metrics=student.metrics)
        uploaded = artifacts.upload_dir(
            student.final_path, sweep_student_key(job_id, student.index)
        )
        summary.append(
            {
                "student": student.index,
                "rank": student.rank,
                "metric": result.rank_metric,
                "score": student.score,
                "knobs": student.knobs,
                "uri": uploaded.uri,
            }
        )
    return summary
