"""Where queued jobs stand, as the API shows them: one reading of the pool's turn order, shared
by the requests of the next second.

A job's place comes from the order of the whole queue (`store.scheduling.queue_order`), which
reads every waiting job; run for each read of each job, it cut the throughput of polling a
queued job ~6× with 500 jobs queued. So an API process reads the order (and the pool's pace, for
the estimated starts) at most once per `SNAPSHOT_SECONDS` and answers every read from it: a
place shown may be up to that old, as any queue display is. A job the snapshot does not hold
(submitted since, or re-queued since) gets a fresh reading, once per request.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from sqlalchemy.orm import Session

from api.schemas import QueueView
from store.config import get_config
from store.models import Job
from store.scheduling import QueuePlace, queue_places
from store.start_estimate import PoolPace, pool_pace, start_eta
from store.states import JobStatus

SNAPSHOT_SECONDS = 1.0


@dataclass(frozen=True)
class _Snapshot:
    places: dict[str, QueuePlace]
    pace: PoolPace
    read_from: float  # monotonic time the reading began: it holds every job committed before


_lock = threading.Lock()
# One per database (tests point one process at several).
_latest: dict[str, _Snapshot] = {}


def queue_views(session: Session, rows: list[Job]) -> dict[str, QueueView]:
    """The place and estimated start of each queued job among `rows` (read in this session)."""
    queued = [job.id for job in rows if job.status == JobStatus.QUEUED.value]
    if not queued:
        return {}
    # The rows were read before now, so a reading begun after now holds them, if they wait.
    rows_read_by = time.monotonic()
    snapshot = _snapshot(session, queued, rows_read_by)
    return {
        job_id: QueueView(place.position, start_eta(snapshot.pace, place.position))
        for job_id in queued
        if (place := snapshot.places.get(job_id)) is not None
    }


def _snapshot(session: Session, wanted: list[str], rows_read_by: float) -> _Snapshot:
    database = session.get_bind().engine.url.render_as_string(hide_password=True)
    # One reading at a time: requests that wait here take the reading the first one made.
    with _lock:
        latest = _latest.get(database)
        if latest is not None and (
            latest.read_from >= rows_read_by
            or (
                time.monotonic() - latest.read_from < SNAPSHOT_SECONDS
                and all(job_id in latest.places for job_id in wanted)
            )
        ):
            return latest
        read_from = time.monotonic()
        places = queue_places(session)
        pace = pool_pace(session, stale_after_seconds=get_config().stale_after_seconds)
        latest = _latest[database] = _Snapshot(places, pace, read_from)
        return latest
