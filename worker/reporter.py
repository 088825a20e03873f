"""The DB side of a run: progress, metrics, events, checkpoints and the lease, as run callbacks.

Writes are batched (every `flush_seconds` or `flush_records` records), not one transaction per
step. A heartbeat thread refreshes the lease every `heartbeat_seconds` in its own session and
reads `cancel_requested`: `should_stop()` turns true once the job is cancelled or the lease is
lost, so the run stops at the next step boundary.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, Literal

from core.callbacks import Callback, CheckpointReport, EvalReport, RunInfo, StepReport
from core.card import StudentCard
from store import jobs
from store.artifacts import ArtifactStore, UploadedArtifact, checkpoint_key, metrics_key
from worker.db_retry import with_session

logger = logging.getLogger(__name__)


class DbReporter(Callback):
    def __init__(
        self,
        job_id: str,
        worker_id: str,
        artifacts: ArtifactStore,
        metrics_path: Path,
        *,
        flush_seconds: float = 3.0,
        flush_records: int = 200,
    ) -> None:
        self.job_id = job_id
        self.worker_id = worker_id
        self.artifacts = artifacts
        self.metrics_path = metrics_path
        self.flush_seconds = flush_seconds
        self.flush_records = flush_records
        self._lock = threading.Lock()
        self._events: list[jobs.EventIn] = []
        self._points: list[tuple[int, str, float]] = []
        self._progress: dict[str, Any] | None = None  # not yet written
        self._last_progress: dict[str, Any] | None = None  # written or not
        self._last_flush = time.monotonic()
        # When the run last showed a sign of life (the watchdog fails a run silent for too long).
        self.last_progress = time.monotonic()
        self.cancel_requested = threading.Event()
        self.lease_lost = threading.Event()
        self.checkpoints: list[UploadedArtifact] = []
        # Set once the data format is known: every checkpoint then carries a card and template.
        self.card: StudentCard | None = None

    # -- run hooks -------------------------------------------------------------------------------
    def on_start(self, info: RunInfo) -> None:
        self._event(
            "info",
            "run_started",
            f"training {info.total_steps} steps on {info.device}",
            {
                "total_steps": info.total_steps,
                "start_step": info.start_step,
                "train_examples": info.train_examples,
                "eval_examples": info.eval_examples,
                "device": info.device,
            },
        )
        with self._lock:
            self._progress = {
                "step": info.start_step,
                "total_steps": info.total_steps,
                "eta_seconds": None,
                "latest_metrics": None,
            }
        self.flush()

    def on_event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        data = data or {}
        # The run marks what a user should act on (a student too far from its teacher).
        self._event("warning" if data.get("warning") else "info", kind, message, data)

    def on_step(self, report: StepReport) -> None:
        self.last_progress = time.monotonic()
        with self._lock:
            self._points.extend((report.step, k, v) for k, v in report.metrics.items())
            self._progress = {
                "step": report.step,
                "total_steps": report.total_steps,
                "eta_seconds": report.eta_seconds,
                "latest_metrics": dict(report.metrics),
            }
        self._maybe_flush()

    def on_eval(self, report: EvalReport) -> None:
        self._event(
            "info",
            "evaluated",
            f"evaluation at step {report.step}",
            {"metrics": report.metrics, "samples": report.samples},
        )
        self.on_metrics(report.step, report.metrics)

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        with self._lock:
            self._points.extend((step, k, v) for k, v in metrics.items())
            # The step's progress may already be flushed (and cleared): start from the last one
            # known, so these metrics always reach latest_metrics (the store merges the dict).
            progress = self._progress or self._last_progress
            if progress is not None:
                merged = {**(progress.get("latest_metrics") or {}), **metrics}
                self._progress = {**progress, "latest_metrics": merged}
        self.flush()

    def on_checkpoint(self, report: CheckpointReport) -> None:
        self.last_progress = time.monotonic()
        if self.card is not None:
            self.card.write(report.path, step=report.step, metrics=report.metrics)
        # Upload first, record second: a row always points at a complete artifact.
        uploaded = self.artifacts.upload_dir(report.path, checkpoint_key(self.job_id, report.step))
        self.checkpoints.append(uploaded)
        self.flush()
        with_session(
            lambda s: jobs.add_checkpoint(
                s,
                self.job_id,
                step=report.step,
                uri=uploaded.uri,
                sha256=uploaded.sha256,
                metrics=report.metrics,
                is_best=report.is_best,
            ),
            what="record checkpoint",
        )

    def should_stop(self) -> bool:
        return self.cancel_requested.is_set() or self.lease_lost.is_set()

    # -- batching --------------------------------------------------------------------------------
    def _event(
        self,
        level: Literal["info", "warning", "error"],
        kind: str,
        message: str,
        data: dict[str, Any],
    ) -> None:
        self.last_progress = time.monotonic()
        with self._lock:
            self._events.append(jobs.EventIn(level=level, type=kind, message=message, data=data))
        self._maybe_flush()

    def _maybe_flush(self) -> None:
        due = time.monotonic() - self._last_flush >= self.flush_seconds
        if due or len(self._points) + len(self._events) >= self.flush_records:
            self.flush()

    def flush(self) -> None:
        """Write what is pending in one transaction (also appends to the local metrics.jsonl)."""
        with self._lock:
            events, self._events = self._events, []
            points, self._points = self._points, []
            progress, self._progress = self._progress, None
            self._last_progress = progress or self._last_progress
            self._last_flush = time.monotonic()
        if points:
            with self.metrics_path.open("a") as handle:
                for step, name, value in points:
                    handle.write(json.dumps({"step": step, "name": name, "value": value}) + "\n")
        if not (events or points or progress):
            return

        def write(session: Any) -> bool:
            jobs.add_events(session, self.job_id, events)
            jobs.add_metrics(session, self.job_id, points)
            if progress is None:
                return True
            return jobs.update_progress(
                session,
                self.job_id,
                self.worker_id,
                step=progress["step"],
                total_steps=progress["total_steps"],
                eta_seconds=progress["eta_seconds"],
                latest_metrics=progress["latest_metrics"],
            )

        if not with_session(write, what="report progress"):
            self.lease_lost.set()

    def upload_metrics(self) -> UploadedArtifact | None:
        self.flush()
        if not self.metrics_path.exists():
            return None
        return self.artifacts.upload_file(self.metrics_path, metrics_key(self.job_id))


class Heartbeat(threading.Thread):
    """Refreshes the lease every `interval` seconds and relays cancel / lease loss to the reporter."""

    def __init__(self, reporter: DbReporter, interval: float) -> None:
        super().__init__(name=f"heartbeat-{reporter.job_id}", daemon=True)
        self.reporter = reporter
        self.interval = interval
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.wait(self.interval):
            self.beat()

    def beat(self) -> None:
        reporter = self.reporter
        try:
            state = with_session(
                lambda s: jobs.heartbeat(s, reporter.job_id, reporter.worker_id), what="heartbeat"
            )
        except Exception:
            # The DB stayed away past every retry: keep running; the reaper decides on the lease.
            logger.exception("heartbeat of job %s failed", reporter.job_id)
            return
        if state.cancel_requested:
            reporter.cancel_requested.set()
        if not state.still_owned:
            reporter.lease_lost.set()

    def stop(self) -> None:
        self._stopped.set()
