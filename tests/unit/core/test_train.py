"""The training loop: it learns, it reports, it checkpoints, it stops, and it resumes exactly."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from core.callbacks import (
    Callback,
    CheckpointReport,
    EvalReport,
    RunInfo,
    RunResult,
    StepReport,
)
from core.demo import DATA_FILE, STUDENT_DIR, TEACHER_DIR
from core.settings import DistillSettings
from core.train import TrainingRun, distill

STEP_METRICS = {
    "train/loss",
    "train/lr",
    "train/grad_norm",
    "train/tokens_per_s",
    "alpha",
    "lambda",
}


class Recorder(Callback):
    """Keeps every report; stops the run once `stop_after` steps are done."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.stop_after = stop_after
        self.info: RunInfo | None = None
        self.steps: list[StepReport] = []
        self.evals: list[EvalReport] = []
        self.checkpoints: list[CheckpointReport] = []
        self.events: list[str] = []
        self.result: RunResult | None = None

    def on_start(self, info: RunInfo) -> None:
        self.info = info

    def on_event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        self.events.append(kind)

    def on_step(self, report: StepReport) -> None:
        self.steps.append(report)

    def on_eval(self, report: EvalReport) -> None:
        self.evals.append(report)

    def on_checkpoint(self, report: CheckpointReport) -> None:
        # The directory must be complete when the hook runs: resuming from it must be possible.
        assert (report.path / "training_state.pt").is_file()
        assert (report.path / "model.safetensors").is_file()
        self.checkpoints.append(report)

    def should_stop(self) -> bool:
        return self.stop_after is not None and len(self.steps) >= self.stop_after

    def on_end(self, result: RunResult) -> None:
        self.result = result


def _metrics_lines(output: Path) -> list[dict[str, float]]:
    lines = (output / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def test_reports_checkpoints_and_metrics_file(
    tmp_path: Path, save_model: Callable[..., Path], make_settings: Callable[..., DistillSettings]
) -> None:
    settings = make_settings(
        save_model("teacher"),
        save_model("student", n_embd=16),
        max_steps=4,
        eval_interval=2,
        checkpoint_interval=2,
        alpha_schedule={"kind": "linear", "start": -5.0, "end": -1.0},
    )
    recorder = Recorder()
    result = distill(settings, tmp_path / "run", [recorder])

    assert recorder.info is not None and recorder.info.total_steps == 4
    assert [r.step for r in recorder.steps] == [1, 2, 3, 4]
    assert all(set(r.metrics) == STEP_METRICS for r in recorder.steps)
    assert [r.metrics["alpha"] for r in recorder.steps] == pytest.approx(
        [-5, -5 + 4 / 3, -5 + 8 / 3, -1]
    )
    assert recorder.steps[-1].eta_seconds == 0
    assert [r.step for r in recorder.evals] == [2, 4]
    assert all(0.0 <= r.metrics["eval/rouge_l"] <= 1.0 for r in recorder.evals)
    assert all(len(r.samples) == 4 for r in recorder.evals)
    assert [c.step for c in recorder.checkpoints] == [2, 4]
    assert recorder.checkpoints[0].is_best  # the first evaluated checkpoint is the best so far

    checkpoint = tmp_path / "run" / "checkpoints" / "step-4"
    saved = json.loads((checkpoint / "settings.json").read_text(encoding="utf-8"))
    assert saved == settings.public_dict()
    assert {"tokenizer.json", "config.json", "model.safetensors", "training_state.pt"} <= {
        p.name for p in checkpoint.iterdir()
    }
    best = json.loads((tmp_path / "run" / "checkpoints" / "best.json").read_text(encoding="utf-8"))
    assert best["step"] == result.best_step
    assert result.final_path == tmp_path / "run" / "final"
    assert (result.final_path / "model.safetensors").is_file()
    assert not list((tmp_path / "run" / "checkpoints").glob(".*tmp"))

    lines = _metrics_lines(tmp_path / "run")
    assert [line["step"] for line in lines if "train/loss" in line] == [1, 2, 3, 4]
    assert [line["step"] for line in lines if "eval/rouge_l" in line] == [2, 4]
    assert recorder.result == result and result.status == "completed"


def test_student_moves_and_teacher_stays_frozen(
    tmp_path: Path, save_model: Callable[..., Path], make_settings: Callable[..., DistillSettings]
) -> None:
    settings = make_settings(save_model("teacher"), save_model("student", n_embd=16), max_steps=3)
    run = TrainingRun(settings, tmp_path / "run", [], None)
    teacher_before = {k: v.clone() for k, v in run.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in run.student.state_dict().items()}
    run.train()
    for name, value in run.teacher.state_dict().items():
        assert torch.equal(value, teacher_before[name]), name
    assert all(p.grad is None for p in run.teacher.parameters())
    moved = [
        name
        for name, value in run.student.state_dict().items()
        if not torch.equal(value, student_before[name])
    ]
    assert "transformer.wte.weight" in moved and len(moved) > len(student_before) // 2
    run.cleanup()


def test_should_stop_ends_at_a_step_boundary_without_saving(
    tmp_path: Path, save_model: Callable[..., Path], make_settings: Callable[..., DistillSettings]
) -> None:
    settings = make_settings(save_model("teacher"), save_model("student", n_embd=16), max_steps=10)
    recorder = Recorder(stop_after=2)
    result = distill(settings, tmp_path / "run", [recorder])
    assert result.status == "stopped"
    assert result.steps_done == 2 and result.final_path is None
    assert recorder.result == result
    assert "stopped" in recorder.events
    assert not (tmp_path / "run" / "final").exists()
    assert not (tmp_path / "run" / "checkpoints").exists()
    # Step 0 holds the pre-flight's measures; the steps run are 1 and 2.
    assert [line["step"] for line in _metrics_lines(tmp_path / "run")] == [0, 1, 2]


def test_resumed_run_repeats_the_uninterrupted_one(
    tmp_path: Path, save_model: Callable[..., Path], make_settings: Callable[..., DistillSettings]
) -> None:
    # Dropout and sampled generation on, so the restored RNG states matter; accumulation and a
    # warmup + cosine schedule, so the optimizer and scheduler states matter.
    settings = make_settings(
        save_model("teacher", dropout=0.1),
        save_model("student", n_embd=16, dropout=0.1),
        max_steps=6,
        grad_accum_steps=2,
        warmup_steps=2,
        eval_interval=2,
        checkpoint_interval=3,
        generation={"max_new_tokens": 6, "do_sample": True},
    )
    whole = Recorder()
    distill(settings, tmp_path / "whole", [whole])

    interrupted = Recorder(stop_after=4)  # stops after step 4; the last checkpoint is step 3
    assert distill(settings, tmp_path / "cut", [interrupted]).status == "stopped"
    resumed = Recorder()
    result = distill(
        settings,
        tmp_path / "cut",
        [resumed],
        resume_from=tmp_path / "cut" / "checkpoints" / "step-3",
    )
    assert resumed.info is not None and resumed.info.start_step == 3
    assert "resumed" in resumed.events
    assert [r.step for r in resumed.steps] == [4, 5, 6]
    for name in ("train/loss", "train/grad_norm", "train/lr"):
        expected = [r.metrics[name] for r in whole.steps[3:]]
        assert [r.metrics[name] for r in resumed.steps] == pytest.approx(expected, abs=1e-5), name
    assert result.final_metrics["eval/rouge_l"] == pytest.approx(
        whole.evals[-1].metrics["eval/rouge_l"], abs=1e-9
    )
    final_whole = load_file(tmp_path / "whole" / "final" / "model.safetensors")
    final_resumed = load_file(tmp_path / "cut" / "final" / "model.safetensors")
    for name, value in final_whole.items():
        torch.testing.assert_close(final_resumed[name], value, atol=1e-5, rtol=0)
    # The steps after the checkpoint that the interrupted run logged are not shown twice.
    steps = [line["step"] for line in _metrics_lines(tmp_path / "cut") if "train/loss" in line]
    assert steps == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_amid_preset_on_the_demo_lowers_the_loss_and_raises_rouge_l(
    tmp_path: Path, make_settings: Callable[..., DistillSettings]
) -> None:
    settings = make_settings(
        TEACHER_DIR,
        STUDENT_DIR,
        preset="amid",
        # As in examples/demo.yaml: the untrained student needs a little cross-entropy to start.
        ce_weight=0.5,
        max_steps=150,
        batch_size=16,
        learning_rate=3e-3,
        warmup_steps=5,
        eval_at_start=True,
        dataset={"source": str(DATA_FILE), "eval_size": 32, "max_rows": 1200},
        eval_max_samples=32,
        generation={"max_new_tokens": 16, "do_sample": False},
    )
    recorder = Recorder()
    distill(settings, tmp_path / "run", [recorder])
    before, after = recorder.evals[0], recorder.evals[-1]
    assert (before.step, after.step) == (0, 150)
    assert after.metrics["eval/loss"] < 0.7 * before.metrics["eval/loss"]
    assert after.metrics["eval/rouge_l"] > before.metrics["eval/rouge_l"] + 0.1
    first, last = recorder.steps[:5], recorder.steps[-5:]
    assert sum(r.metrics["train/loss"] for r in last) < sum(r.metrics["train/loss"] for r in first)
