"""A sweep trains K students in lockstep: one teacher forward per batch for all of them, each
student exactly the run its own settings would give, stopped and resumed as one."""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import core.models
from core.callbacks import Callback, CheckpointReport, RunInfo, RunResult, StepReport
from core.settings import DistillSettings
from core.sweep import student_metric, student_part
from core.train import distill

SWEEP = [
    {"alpha": -5.0},
    {"preset": "kd", "learning_rate": 1e-2},
    {"alpha": 1.0, "lambda": 0.5, "divergence": "kl"},
]


class TeacherCounter:
    """Counts teacher loads and forwards of the teacher's body (the fused loss runs the body
    alone; the logits path runs it inside the full model)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.loads = 0
        self.forwards = 0
        load = core.models.load_model

        def counting_load(source: str, *, role: str, **kwargs: Any) -> Any:
            model = load(source, role=role, **kwargs)
            if role == "teacher":
                self.loads += 1
                model.base_model.register_forward_hook(self._count)
            return model

        monkeypatch.setattr(core.models, "load_model", counting_load)

    def _count(self, *_: Any) -> None:
        self.forwards += 1


class Recorder(Callback):
    """Teacher forwards before each step report; every checkpoint; the end; stops on request."""

    def __init__(self, counter: TeacherCounter, stop_after: int | None = None) -> None:
        self.counter = counter
        self.stop_after = stop_after
        self.info: RunInfo | None = None
        self.forwards_at: list[int] = []
        self.steps: list[StepReport] = []
        self.checkpoints: list[CheckpointReport] = []
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.result: RunResult | None = None

    def on_start(self, info: RunInfo) -> None:
        self.info = info
        self.forwards_at.append(self.counter.forwards)

    def on_step(self, report: StepReport) -> None:
        self.steps.append(report)
        self.forwards_at.append(self.counter.forwards)

    def on_event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        self.events.append((kind, data or {}))

    def on_checkpoint(self, report: CheckpointReport) -> None:
        self.checkpoints.append(report)

    def should_stop(self) -> bool:
        return self.stop_after is not None and len(self.steps) >= self.stop_after

    def on_end(self, result: RunResult) -> None:
        self.result = result

    def forwards_per_step(self) -> list[int]:
        """Teacher forwards between the start and each step report."""
        return [after - before for before, after in pairwise(self.forwards_at)]

    def series(self, name: str) -> list[float]:
        return [report.metrics[name] for report in self.steps]


@pytest.fixture
def sweep_settings(
    save_model: Callable[..., Path], make_settings: Callable[..., DistillSettings]
) -> Callable[..., DistillSettings]:
    # Dropout on: each student must draw from RNG streams of its own, as in a run of its own.
    teacher = save_model("teacher")
    student = save_model("student", n_embd=16, dropout=0.1)

    def make(**overrides: Any) -> DistillSettings:
        values: dict[str, Any] = {"sweep": SWEEP, "preflight_batches": 0, **overrides}
        return make_settings(teacher, student, **values)

    return make


def test_teacher_runs_once_per_batch_and_each_student_is_its_own_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sweep_settings: Callable[..., DistillSettings]
) -> None:
    settings = sweep_settings(max_steps=4)
    counter = TeacherCounter(monkeypatch)
    sweep = Recorder(counter)
    result = distill(settings, tmp_path / "sweep", [sweep])

    assert result.status == "completed" and counter.loads == 1
    # Steps 1-3 (the last one also evaluates): one forward per batch, not one per student.
    assert sweep.forwards_per_step()[:3] == [1, 1, 1]
    assert [report.step for report in sweep.steps] == [1, 2, 3, 4]

    weights = []
    for index in range(len(SWEEP)):
        alone = Recorder(TeacherCounter(monkeypatch))
        distill(settings.student_settings(index), tmp_path / f"alone-{index}", [alone])
        assert alone.forwards_per_step()[:3] == [1, 1, 1]
        for name in ("train/loss", "train/grad_norm", "train/lr", "alpha", "lambda"):
            assert sweep.series(student_metric(index, name)) == pytest.approx(
                alone.series(name), abs=1e-5
            ), (index, name)
        final = load_file(
            tmp_path / "sweep" / "students" / str(index) / "final" / "model.safetensors"
        )
        expected = load_file(tmp_path / f"alone-{index}" / "final" / "model.safetensors")
        for name, value in expected.items():
            torch.testing.assert_close(final[name], value, atol=1e-5, rtol=0)
        weights.append(final)
    # Their own knobs took them to different places.
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert any(not torch.allclose(weights[a][n], weights[b][n]) for n in weights[a])


def test_students_are_ranked_by_the_eval_metric(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sweep_settings: Callable[..., DistillSettings]
) -> None:
    settings = sweep_settings(max_steps=2, select_best="eval/loss")
    recorder = Recorder(TeacherCounter(monkeypatch))
    result = distill(settings, tmp_path / "sweep", [recorder])

    assert result.rank_metric == "eval/loss"
    assert [student.rank for student in result.students] == [1, 2, 3]
    assert sorted(student.index for student in result.students) == [0, 1, 2]
    scores = [student.score for student in result.students]
    assert all(score is not None for score in scores)
    assert scores == sorted(scores)  # a loss: lowest first
    best = result.students[0]
    assert (
        result.final_path
        == best.final_path
        == tmp_path / "sweep" / "students" / str(best.index) / "final"
    )
    assert best.knobs == SWEEP[best.index]
    ranked = [data for kind, data in recorder.events if kind == "sweep_ranked"]
    assert ranked and [entry["student"] for entry in ranked[0]["ranking"]] == [
        student.index for student in result.students
    ]


def test_a_stopped_sweep_resumes_every_student_from_its_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sweep_settings: Callable[..., DistillSettings]
) -> None:
    settings = sweep_settings(max_steps=4, checkpoint_interval=2)
    counter = TeacherCounter(monkeypatch)
    whole = Recorder(counter)
    distill(settings, tmp_path / "whole", [whole])

    cut = Recorder(counter, stop_after=3)
    assert distill(settings, tmp_path / "cut", [cut]).status == "stopped"
    assert cut.result is not None and cut.result.status == "stopped"
    stopped = [data["student"] for kind, data in cut.events if kind == "stopped"]
    assert stopped == [0, 1, 2]
    # One checkpoint per step for all three students, none written after the stop.
    assert [report.step for report in cut.checkpoints] == [2]
    checkpoint = cut.checkpoints[0].path
    for index in range(len(SWEEP)):
        assert (checkpoint / student_part(index) / "training_state.pt").is_file()

    resumed = Recorder(counter)
    result = distill(settings, tmp_path / "cut", [resumed], resume_from=checkpoint)
    assert result.status == "completed"
    assert resumed.info is not None and resumed.info.start_step == 2
    assert [data["student"] for kind, data in resumed.events if kind == "resumed"] == [0, 1, 2]
    for index in range(len(SWEEP)):
        name = student_metric(index, "train/loss")
        assert resumed.series(name) == pytest.approx(whole.series(name)[2:], abs=1e-5)
        part = Path("students") / str(index) / "final" / "model.safetensors"
        final, expected = load_file(tmp_path / "cut" / part), load_file(tmp_path / "whole" / part)
        for key, value in expected.items():
            torch.testing.assert_close(final[key], value, atol=1e-5, rtol=0)
