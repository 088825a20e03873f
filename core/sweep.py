"""A sweep: K students trained in lockstep on the same batches, sharing one teacher forward.

Each student is a run of its own (`core.train`) with its own settings (the job's, with its
sweep entry's knobs), weights, optimizer, RNG streams, checkpoints and final student; what they
share is the teacher (loaded once) and its output on each training batch (`SharedTeacher`).
The sweep advances every student one step before any takes the next, so at every step boundary
all K stand at the same step: a stop, a checkpoint and a resume always cover all of them.

What the students report reaches the run's callbacks under their own names: metric
`student<k>/<name>`, events with `student: k`. A sweep checkpoint is one directory holding
every student's checkpoint (`student-<k>/`), so it is complete for all K or absent; a resumed
sweep restores each student from its part. At the end the students are ranked by the run's
`select_best` metric (eval/rouge_l when unset; the best checkpoint's value with select_best,
the final evaluation's without), and the best one's final directory is the run's.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from core.callbacks import (
    Callback,
    CheckpointReport,
    EvalReport,
    RunResult,
    StepReport,
    SweepStudent,
)
from core.checkpoints import checkpoint_dir, rng_state, set_rng_state
from core.guards import StopRequested
from core.settings import DistillSettings
from core.shared_teacher import SharedTeacher
from core.train import BEST_METRIC, TrainingRun

STUDENTS_DIR = "students"  # each student's own output directory: students/<k>/


def student_part(index: int) -> str:
    """The directory of student `index` inside a sweep checkpoint."""
    return f"student-{index}"


def student_metric(index: int, name: str) -> str:
    return f"student{index}/{name}"


class _StudentChannel(Callback):
    """One student's reports, named as its own, on their way to the sweep's callbacks. Its
    steps and checkpoints are held for the sweep, which reports each step and checkpoint once
    for all K; its start and end are the sweep's to report."""

    def __init__(self, index: int, callbacks: Sequence[Callback]):
        self.index = index
        self.callbacks = callbacks
        self.step: StepReport | None = None
        self.checkpoint: CheckpointReport | None = None

    def named(self, metrics: dict[str, float]) -> dict[str, float]:
        return {student_metric(self.index, name): value for name, value in metrics.items()}

    def on_event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        for callback in self.callbacks:
            callback.on_event(
                kind, f"student {self.index}: {message}", {**(data or {}), "student": self.index}
            )

    def on_step(self, report: StepReport) -> None:
        self.step = report

    def on_eval(self, report: EvalReport) -> None:
        named = EvalReport(step=report.step, metrics=self.named(report.metrics), samples=[])
        for callback in self.callbacks:
            callback.on_eval(named)

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        for callback in self.callbacks:
            callback.on_metrics(step, self.named(metrics))

    def on_checkpoint(self, report: CheckpointReport) -> None:
        self.checkpoint = report

    def should_stop(self) -> bool:
        return any(callback.should_stop() for callback in self.callbacks)


class _Sweep:
    def __init__(
        self,
        settings: DistillSettings,
        output_dir: Path,
        callbacks: Sequence[Callback],
        resume_from: Path | None,
    ):
        assert settings.sweep is not None, "a sweep has entries"
        self.settings = settings
        self.output_dir = output_dir
        self.callbacks = list(callbacks)
        self.shared = SharedTeacher()
        self.channels: list[_StudentChannel] = []
        self.members: list[TrainingRun] = []
        # Each student's RNG streams, as they would be in a run of its own.
        self.rng: list[dict[str, Any]] = []
        for index in range(len(settings.sweep)):
            channel = _StudentChannel(index, self.callbacks)
            self.channels.append(channel)
            self.members.append(
                TrainingRun(
                    settings.student_settings(index),
                    output_dir / STUDENTS_DIR / str(index),
                    [channel],
                    resume_from / student_part(index) if resume_from is not None else None,
                    shared=self.shared,
                )
            )
            self.rng.append(rng_state())
        # The students share their data and length: the first one speaks for all.
        info = self.members[0].info()
        for callback in self.callbacks:
            callback.on_start(info)

    def _each(self, act: Callable[[TrainingRun], object]) -> None:
        """`act` on every student in turn, each under its own RNG streams."""
        for index, member in enumerate(self.members):
            set_rng_state(self.rng[index])
            try:
                act(member)
            finally:
                self.rng[index] = rng_state()

    def train(self) -> RunResult:
        lead = self.members[0]
        self._each(lambda member: member.begin())
        started, first_step = time.monotonic(), lead.state.step
        while not lead.done:
            if any(callback.should_stop() for callback in self.callbacks):
                return self.stopped()
            self._each(lambda member: member.advance())
            self._report_step(started, first_step)
            self._report_checkpoint()
        results: list[RunResult] = []
        self._each(lambda member: results.append(member.complete()))
        return self._ranked(results)

    def _report_step(self, started: float, first_step: int) -> None:
        lead = self.members[0]
        metrics: dict[str, float] = {}
        for channel in self.channels:
            if channel.step is not None:
                metrics.update(channel.named(channel.step.metrics))
                channel.step = None
        elapsed = time.monotonic() - started
        remaining = lead.total_steps - lead.state.step
        report = StepReport(
            step=lead.state.step,
            total_steps=lead.total_steps,
            metrics=metrics,
            elapsed_seconds=elapsed,
            eta_seconds=elapsed / (lead.state.step - first_step) * remaining,
        )
        for callback in self.callbacks:
            callback.on_step(report)

    def _report_checkpoint(self) -> None:
        """Once every student has saved this step: their checkpoints as one directory."""
        reports = [channel.checkpoint for channel in self.channels]
        if any(report is None for report in reports):
            return
        step = self.members[0].state.step
        target = checkpoint_dir(self.output_dir, step)
        staging = target.with_name(f".{target.name}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        metrics: dict[str, float] = {}
        for channel, report in zip(self.channels, reports, strict=True):
            assert report is not None
            report.path.rename(staging / student_part(channel.index))
            metrics.update(channel.named(report.metrics))
            channel.checkpoint = None
        # Complete or absent, as a single run's checkpoint: a re-save of the step replaces it.
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
        combined = CheckpointReport(step=step, path=target, metrics=metrics, is_best=False)
        for callback in self.callbacks:
            callback.on_checkpoint(combined)

    def _ranked(self, results: list[RunResult]) -> RunResult:
        s = self.settings
        assert s.sweep is not None
        metric = s.select_best or BEST_METRIC
        scores = [
            # With select_best, the final student is the best checkpoint: rank by its value.
            member.state.best_metric if s.select_best else result.final_metrics.get(metric)
            for member, result in zip(self.members, results, strict=True)
        ]

        def order(index: int) -> tuple[bool, float]:
            score = scores[index]
            if score is None:
                return True, 0.0
            return False, score if s.best_is_lowest else -score

        students: list[SweepStudent] = []
        final_metrics: dict[str, float] = {}
        for rank, index in enumerate(sorted(range(len(results)), key=order), start=1):
            final_path = results[index].final_path
            assert final_path is not None, "a completed run has a final student"
            students.append(
                SweepStudent(
                    index=index,
                    knobs=s.sweep[index].overrides(),
                    final_path=final_path,
                    metrics=results[index].final_metrics,
                    score=scores[index],
                    rank=rank,
                )
            )
            final_metrics.update(self.channels[index].named(results[index].final_metrics))
        best = students[0]
        self._event(
            "sweep_ranked",
            f"student {best.index} ranks first by {metric}"
            + (f" ({best.score:.4f})" if best.score is not None else ""),
            {
                "metric": metric,
                "ranking": [
                    {"student": st.index, "rank": st.rank, "score": st.score, "knobs": st.knobs}
                    for st in students
                ],
            },
        )
        result = RunResult(
            status="completed",
            steps_done=self.members[0].state.step,
            final_path=best.final_path,
            final_metrics=final_metrics,
            best_step=None,
            students=tuple(students),
            rank_metric=metric,
        )
        for callback in self.callbacks:
            callback.on_end(result)
        return result

    def stopped(self) -> RunResult:
        self._each(lambda member: member.stopped())
        metrics: dict[str, float] = {}
        for channel, member in zip(self.channels, self.members, strict=True):
            metrics.update(channel.named(member.last_train))
        result = RunResult(
            status="stopped",
            steps_done=min(member.state.step for member in self.members),
            final_path=None,
            final_metrics=metrics,
            best_step=None,
        )
        for callback in self.callbacks:
            callback.on_end(result)
        return result

    def _event(self, kind: str, message: str, data: dict[str, Any]) -> None:
        for callback in self.callbacks:
            callback.on_event(kind, message, data)

    def cleanup(self) -> None:
        for member in self.members:
            member.cleanup()
        self.shared.release()


def distill_sweep(
    settings: DistillSettings,
    output_dir: Path,
    callbacks: Sequence[Callback] = (),
    resume_from: Path | None = None,
) -> RunResult:
    """Train the students of `settings.sweep` together; see the module's note."""
    sweep = _Sweep(settings, output_dir, callbacks, resume_from)
    try:
        return sweep.train()
    except StopRequested:
        return sweep.stopped()
    finally:
        sweep.cleanup()
