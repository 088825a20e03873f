"""Job store operations on Postgres, each test inside a rolled-back transaction."""

from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from store import jobs
from store.jobs import EventIn
from store.keys import authenticate, create_api_key, revoke_api_key
from store.models import Job, JobEvent, utcnow
from store.scheduling import use_up_message
from store.states import IllegalTransition

pytestmark = pytest.mark.integration

SETTINGS = {"teacher": "gpt2-xl", "student": "gpt2", "dataset": {"source": "data.jsonl"}}


def _owner(session: Session, admin: bool = False) -> str:
    key, _ = create_api_key(session, "test", is_admin=admin)
    return key.id


def _queued(session: Session, owner: str | None = None, max_attempts: int = 3) -> Job:
    job, created = jobs.create_job(session, SETTINGS, owner or _owner(session), None, max_attempts)
    assert created
    return job


def _running(session: Session, worker: str = "w1", max_attempts: int = 3) -> Job:
    job = _queued(session, max_attempts=max_attempts)
    claimed = jobs.claim_job(session, job.id, worker)
    assert claimed is not None
    return claimed


def _event_types(session: Session, job_id: str) -> list[str]:
    return [event.type for event in jobs.list_events(session, job_id)]


# -- create, get, list ---------------------------------------------------------------------------


def test_create_writes_a_queued_job_and_an_event(session: Session) -> None:
    owner = _owner(session)
    job, created = jobs.create_job(session, SETTINGS, owner, None, 3)
    assert created and job.status == "queued" and job.attempt == 0
    assert jobs.get_job(session, job.id, owner).settings == SETTINGS
    assert _event_types(session, job.id) == ["queued"]


def test_same_idempotency_key_returns_the_same_job(session: Session) -> None:
    owner = _owner(session)
    first, created_first = jobs.create_job(session, SETTINGS, owner, "key-1", 3)
    again, created_again = jobs.create_job(session, SETTINGS, owner, "key-1", 3)
    assert created_first and not created_again
    assert again.id == first.id
    # Another owner's identical key is a different job.
    other, created_other = jobs.create_job(session, SETTINGS, _owner(session), "key-1", 3)
    assert created_other and other.id != first.id


def test_idempotency_key_with_other_settings_is_refused(session: Session) -> None:
    owner = _owner(session)
    jobs.create_job(session, SETTINGS, owner, "key-1", 3)
    with pytest.raises(jobs.IdempotencyKeyReused) as info:
        jobs.create_job(session, {**SETTINGS, "student": "other"}, owner, "key-1", 3)
    assert info.value.status_code == 409 and info.value.field == "Idempotency-Key"


def test_another_owners_job_is_not_found_but_admin_sees_it(session: Session) -> None:
    job = _queued(session)
    with pytest.raises(jobs.JobNotFound) as info:
        jobs.get_job(session, job.id, owner=_owner(session))
    assert info.value.status_code == 404
    assert jobs.get_job(session, job.id, owner=None).id == job.id
    with pytest.raises(jobs.JobNotFound):
        jobs.get_job(session, "0" * 32)


def test_list_pages_newest_first_by_cursor_with_filters(session: Session) -> None:
    owner = _owner(session)
    made = [_queued(session, owner) for _ in range(7)]
    base = utcnow()
    for offset, job in enumerate(made):  # distinct, known creation times
        job.created_at = base + timedelta(seconds=offset)
    jobs.request_cancel(session, made[2].id, owner)
    session.flush()

    pages: list[list[str]] = []
    after = None
    while True:
        page = jobs.list_jobs(session, owner=owner, limit=3, after=after)
        if not page:
            break
        pages.append([job.id for job in page])
        after = jobs.encode_cursor(page[-1])
    assert [len(page) for page in pages] == [3, 3, 1]
    assert [job_id for page in pages for job_id in page] == [job.id for job in reversed(made)]

    cancelled = jobs.list_jobs(session, owner=owner, status="cancelled", limit=10)
    assert [job.id for job in cancelled] == [made[2].id]
    assert jobs.count_queued(session, owner) == 6


def test_list_breaks_ties_in_created_at_by_id(session: Session) -> None:
    owner = _owner(session)
    made = [_queued(session, owner) for _ in range(4)]
    stamp = utcnow()
    for job in made:
        job.created_at = stamp
    session.flush()
    first = jobs.list_jobs(session, owner=owner, limit=2)
    rest = jobs.list_jobs(session, owner=owner, limit=10, after=jobs.encode_cursor(first[-1]))
    seen = [job.id for job in first + rest]
    assert seen == sorted((job.id for job in made), reverse=True)


# -- cancel --------------------------------------------------------------------------------------


def test_cancel_queued_job_is_immediate(session: Session) -> None:
    job = _queued(session)
    cancelled = jobs.request_cancel(session, job.id, job.owner)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    assert _event_types(session, job.id)[-1] == "cancelled"
    # A cancelled job is never claimed.
    assert jobs.claim_job(session, job.id, "w1") is None


def test_cancel_running_job_sets_the_flag_the_heartbeat_reports(session: Session) -> None:
    job = _running(session)
    assert jobs.heartbeat(session, job.id, "w1").cancel_requested is False
    after = jobs.request_cancel(session, job.id, job.owner)
    assert after.status == "running" and after.cancel_requested
    assert jobs.heartbeat(session, job.id, "w1") == jobs.LeaseState(True, True)
    # Asking twice is harmless and writes no second event.
    jobs.request_cancel(session, job.id, job.owner)
    assert _event_types(session, job.id).count("cancel_requested") == 1
    finished = jobs.finish_job(session, job.id, "w1", "cancelled")
    assert finished is not None and finished.status == "cancelled"


@pytest.mark.parametrize("end", ["succeeded", "failed", "cancelled"])
def test_cancel_finished_job_is_409(session: Session, end: str) -> None:
    job = _running(session)
    assert jobs.finish_job(session, job.id, "w1", end, error_code="E", error_message="m")
    with pytest.raises(jobs.JobNotCancellable) as info:
        jobs.request_cancel(session, job.id, None)
    assert info.value.status_code == 409


def test_cancel_of_another_owners_job_is_not_found(session: Session) -> None:
    job = _queued(session)
    with pytest.raises(jobs.JobNotFound):
        jobs.request_cancel(session, job.id, _owner(session))
    assert jobs.get_job(session, job.id).status == "queued"


# -- claim, heartbeat, progress, finish ----------------------------------------------------------


def test_claim_takes_a_queued_job_once(session: Session) -> None:
    job = _queued(session)
    claimed = jobs.claim_job(session, job.id, "w1")
    assert claimed is not None
    assert (claimed.status, claimed.attempt, claimed.lease_owner) == ("running", 1, "w1")
    assert claimed.started_at is not None and claimed.heartbeat_at is not None
    assert jobs.claim_job(session, job.id, "w2") is None  # a second delivery claims nothing
    assert _event_types(session, job.id) == ["queued", "started"]


def test_only_the_lease_holder_heartbeats_reports_and_finishes(session: Session) -> None:
    job = _running(session, "w1")
    assert jobs.heartbeat(session, job.id, "w2").still_owned is False
    assert not jobs.update_progress(
        session, job.id, "w2", step=1, total_steps=10, eta_seconds=1.0, latest_metrics={"a": 1.0}
    )
    assert jobs.finish_job(session, job.id, "w2", "succeeded") is None
    assert jobs.get_job(session, job.id).status == "running"


def test_progress_merges_latest_metrics_and_drops_non_finite(session: Session) -> None:
    job = _running(session)
    assert jobs.update_progress(
        session,
        job.id,
        "w1",
        step=2,
        total_steps=10,
        eta_seconds=8.0,
        latest_metrics={"train/loss": 1.5},
    )
    assert jobs.update_progress(
        session,
        job.id,
        "w1",
        step=4,
        total_steps=10,
        eta_seconds=float("nan"),
        latest_metrics={"eval/rouge_l": 0.2, "train/loss": float("inf")},
    )
    session.expire_all()
    stored = jobs.get_job(session, job.id)
    assert stored.progress_step == 4 and stored.total_steps == 10 and stored.eta_seconds is None
    assert stored.latest_metrics == {"train/loss": None, "eval/rouge_l": 0.2}


def test_finish_succeeded_records_the_student_and_an_event(session: Session) -> None:
    job = _running(session)
    done = jobs.finish_job(session, job.id, "w1", "succeeded", final_uri="file:///a/final")
    assert done is not None
    assert (done.status, done.final_uri) == ("succeeded", "file:///a/final")
    assert done.finished_at is not None
    assert _event_types(session, job.id)[-1] == "succeeded"


def test_finish_refuses_a_non_final_status(session: Session) -> None:
    job = _running(session)
    with pytest.raises(IllegalTransition):
        jobs.finish_job(session, job.id, "w1", "queued")


def test_fail_job_without_a_lease_and_not_twice(session: Session) -> None:
    job = _queued(session)
    failed = jobs.fail_job(session, job.id, "TokenizerMismatch", "vocabularies differ")
    assert failed is not None and failed.status == "failed"
    assert failed.error_code == "TokenizerMismatch"
    assert jobs.fail_job(session, job.id, "Other", "again") is None
    assert jobs.get_job(session, job.id).error_code == "TokenizerMismatch"


# -- events, metrics, checkpoints ----------------------------------------------------------------


def test_events_page_by_id_cursor(session: Session) -> None:
    job = _queued(session)
    jobs.add_events(
        session,
        job.id,
        [EventIn("info", "note", f"event {n}", {"n": n, "x": float("nan")}) for n in range(5)],
    )
    everything = jobs.list_events(session, job.id)
    assert [event.type for event in everything] == ["queued"] + ["note"] * 5
    assert everything[1].data == {"n": 0, "x": None}
    tail = jobs.list_events(session, job.id, after=everything[2].id, limit=2)
    assert [event.id for event in tail] == [everything[3].id, everything[4].id]


def test_event_with_unknown_level_is_refused(session: Session) -> None:
    job = _queued(session)
    with pytest.raises(jobs.InvalidEvent) as info:
        jobs.add_events(session, job.id, [EventIn("debug", "x", "y")])  # type: ignore[arg-type]
    assert info.value.field == "level"


def test_metrics_series_by_name_and_step(session: Session) -> None:
    job = _queued(session)
    jobs.add_metrics(
        session,
        job.id,
        [(2, "train/loss", 0.5), (1, "train/loss", float("nan")), (1, "train/lr", 1e-4)],
    )
    loss = jobs.list_metrics(session, job.id, "train/loss")
    assert [(point.step, point.value) for point in loss] == [(1, None), (2, 0.5)]
    assert len(jobs.list_metrics(session, job.id)) == 3
    assert [p.step for p in jobs.list_metrics(session, job.id, after_step=1)] == [2]


def test_checkpoints_keep_one_best_and_replace_a_rewritten_step(session: Session) -> None:
    job = _running(session)
    for step, best in [(10, True), (20, False), (30, True)]:
        jobs.add_checkpoint(
            session, job.id, step=step, uri=f"u{step}", sha256="0" * 64, metrics={}, is_best=best
        )
    jobs.add_checkpoint(
        session, job.id, step=20, uri="u20b", sha256="1" * 64, metrics={"m": 1}, is_best=False
    )
    checkpoints = jobs.list_checkpoints(session, job.id)
    assert [(c.step, c.uri, c.is_best) for c in checkpoints] == [
        (10, "u10", False),
        (20, "u20b", False),
        (30, "u30", True),
    ]
    latest = jobs.latest_checkpoint(session, job.id)
    assert latest is not None and latest.step == 30


# -- the reaper and the dispatcher ---------------------------------------------------------------


def _age_heartbeat(session: Session, job: Job, seconds: float) -> None:
    session.execute(
        sa.update(Job)
        .where(Job.id == job.id)
        .values(heartbeat_at=utcnow() - timedelta(seconds=seconds))
    )


def test_requeue_stale_requeues_then_fails_after_max_attempts(session: Session) -> None:
    job = _running(session, "w1", max_attempts=2)
    fresh = _running(session, "w9")
    _age_heartbeat(session, job, 600)

    changed = jobs.requeue_stale(session, stale_after_seconds=120, max_attempts_default=5)
    assert (job.id, "queued") in changed
    assert fresh.id not in {job_id for job_id, _ in changed}  # a live heartbeat is left alone
    session.expire_all()
    requeued = jobs.get_job(session, job.id)
    assert requeued.lease_owner is None and requeued.enqueued_at is None
    assert job.id in jobs.jobs_to_redispatch(session, older_than_seconds=60)

    # The old worker comes back: it no longer owns the job.
    assert jobs.heartbeat(session, job.id, "w1").still_owned is False
    second = jobs.claim_job(session, job.id, "w2")
    assert second is not None and second.attempt == 2
    _age_heartbeat(session, job, 600)
    changed = jobs.requeue_stale(session, stale_after_seconds=120, max_attempts_default=5)
    assert (job.id, "failed") in changed
    session.expire_all()
    failed = jobs.get_job(session, job.id)
    assert failed.error_code == "WorkerLost"
    assert failed.error_message is not None and "2 attempts" in failed.error_message
    assert _event_types(session, job.id)[-1] == "failed"


def test_lost_worker_of_a_cancelling_job_ends_it_cancelled(session: Session) -> None:
    job = _running(session)
    jobs.request_cancel(session, job.id, None)
    _age_heartbeat(session, job, 600)
    assert (job.id, "cancelled") in jobs.requeue_stale(
        session, stale_after_seconds=120, max_attempts_default=3
    )


def test_redispatch_picks_unsent_jobs_and_lost_or_unclaimed_messages(session: Session) -> None:
    unsent = _queued(session)
    sent = _queued(session)
    jobs.mark_enqueued(session, sent.id)
    cancelled = _queued(session)
    jobs.request_cancel(session, cancelled.id, None)
    due = jobs.jobs_to_redispatch(session, older_than_seconds=60)
    assert unsent.id in due and sent.id not in due and cancelled.id not in due
    session.execute(
        sa.update(Job).where(Job.id == sent.id).values(enqueued_at=utcnow() - timedelta(seconds=61))
    )
    # Sent long ago but never taken: it waits in the broker behind the others; one message per
    # job, so none is added while the queue still holds messages ...
    assert sent.id not in jobs.jobs_to_redispatch(session, older_than_seconds=60)
    # ... and the queue being empty means it was lost.
    assert sent.id in jobs.jobs_to_redispatch(session, older_than_seconds=60, broker_empty=True)
    # Taken by a worker and used up without starting the job: it needs a new one.
    use_up_message(session, sent.id)
    assert sent.id in jobs.jobs_to_redispatch(session, older_than_seconds=60)


def test_events_go_with_their_job(session: Session) -> None:
    job = _queued(session)
    session.delete(jobs.get_job(session, job.id))
    session.flush()
    count = session.execute(
        sa.select(sa.func.count()).select_from(JobEvent).where(JobEvent.job_id == job.id)
    ).scalar_one()
    assert count == 0


# -- API keys ------------------------------------------------------------------------------------


def test_api_key_secret_is_not_stored_and_authenticates_until_revoked(session: Session) -> None:
    key, secret = create_api_key(session, "alice", is_admin=True)
    assert secret not in key.key_hash and len(key.key_hash) == 64
    found = authenticate(session, secret)
    assert found is not None and found.id == key.id and found.is_admin
    assert authenticate(session, secret + "x") is None
    assert authenticate(session, "") is None
    assert revoke_api_key(session, key.id)
    assert authenticate(session, secret) is None
    assert not revoke_api_key(session, key.id)
