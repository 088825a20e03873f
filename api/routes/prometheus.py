"""GET /metrics: the pool for Prometheus, in the official client's text format.

Read from the job store at each scrape (`store.pool_stats`), so every API process answers the
same. Admin keys only: the series name the owners and their jobs. A scrape configuration sends
the key as a bearer token (`authorization: {credentials: <admin key>}`).
"""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from api.deps import CallerDep, SessionDep
from api.errors import Forbidden
from api.routes.jobs import ERRORS
from api.schemas import ErrorOut
from store.config import get_config
from store.pool_stats import PoolStats, pool_stats

router = APIRouter(tags=["operations"])

# Queue waits from seconds (an idle pool) to a day (a pool booked solid).
QUEUE_WAIT_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 24 * 3600.0)


class PoolCollector(Collector):
    def __init__(self, stats: PoolStats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self.stats
        jobs = GaugeMetricFamily("amid_jobs", "Jobs in the store, by state.", labels=["state"])
        for state, count in stats.jobs_by_state.items():
            jobs.add_metric([state], count)
        yield jobs

        depth = GaugeMetricFamily(
            "amid_queue_depth",
            "Queued jobs of each owner (API key id and name).",
            labels=["owner", "owner_name"],
        )
        for (owner, name), count in sorted(stats.queued_by_owner.items()):
            depth.add_metric([owner, name], count)
        yield depth

        waits = stats.queue_waits_seconds
        buckets = [(f"{bound:g}", sum(w <= bound for w in waits)) for bound in QUEUE_WAIT_BUCKETS]
        yield HistogramMetricFamily(
            "amid_queue_wait_seconds",
            "Seconds from submission to first start, of every job that started.",
            buckets=[*buckets, ("+Inf", len(waits))],
            sum_value=sum(waits),
        )

        speed = GaugeMetricFamily(
            "amid_job_steps_per_second",
            "Optimizer steps per second of each running job since its first start.",
            labels=["job", "owner", "worker"],
        )
        for job in stats.running:
            speed.add_metric([job.job_id, job.owner, job.worker], job.steps_per_second)
        yield speed

        workers = GaugeMetricFamily(
            "amid_workers",
            "Workers in the pool registry, by state (offline: stopped, or silent too long).",
            labels=["state"],
        )
        for state, count in stats.workers_by_state.items():
            workers.add_metric([state], count)
        yield workers
        yield GaugeMetricFamily(
            "amid_workers_up",
            "Workers whose last report is within AMID_STALE_AFTER_SECONDS.",
            value=stats.workers_up,
        )
        yield GaugeMetricFamily(
            "amid_workers_busy", "Workers up and running a job.", value=stats.workers_busy
        )


@router.get(
    "/metrics",
    summary="The pool for Prometheus (admin keys)",
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format."},
        401: ERRORS[401],
        403: {"model": ErrorOut, "description": "The key is not an admin key."},
        503: ERRORS[503],
    },
)
def metrics(caller: CallerDep, session: SessionDep) -> Response:
    if not caller.is_admin:
        raise Forbidden("the pool's metrics are for admin keys")
    stats = pool_stats(session, stale_after_seconds=get_config().stale_after_seconds)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PoolCollector(stats))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
