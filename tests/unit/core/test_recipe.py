"""The paper's recipe around the loss, each part on tiny real models: SFT runs and init phases,
student-generated outputs with the replay buffer, the LM term, best-checkpoint selection, the
pre-flight measure, adaptive α and the paper-like evaluation."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from core.assistant_weight import AdaptiveAlpha, BatchMeasure, student_weight
from core.callbacks import Callback, EvalReport
from core.data import IGNORE_INDEX
from core.demo import STUDENT_DIR, TEACHER_DIR
from core.recipe_settings import StudentOutputSettings
from core.settings import DistillSettings
from core.student_outputs import ReplayBuffer, StudentOutputs, batch_prompts
from core.train import StudentTooFar, TrainingRun, distill


class Events(Callback):
    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []
        self.evals: list[EvalReport] = []
        self.measures: list[tuple[int, dict[str, float]]] = []

    def on_event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        self.events.append((kind, message, data or {}))

    def on_eval(self, report: EvalReport) -> None:
        self.evals.append(report)

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.measures.append((step, metrics))

    def kinds(self) -> list[str]:
        return [kind for kind, _, _ in self.events]


def _metrics(out: Path) -> list[dict[str, Any]]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture
def pair(save_model: Callable[..., Path]) -> tuple[Path, Path]:
    return save_model("teacher", n_embd=32), save_model("student", n_embd=16, seed=1)


def test_sft_run_needs_no_teacher_and_learns_the_references(
    tmp_path: Path, pair: tuple[Path, Path], make_settings: Callable[..., DistillSettings]
) -> None:
    _, student = pair
    settings = make_settings(
        pair[0], student, kind="sft", max_steps=6, eval_at_start=True
    ).model_copy(update={"teacher": None})
    recorder = Events()
    result = distill(settings, tmp_path / "out", [recorder])
    assert result.status == "completed"
    phases = [data["phase"] for kind, _, data in recorder.events if kind == "phase_started"]
    assert phases == ["sft"]
    losses = [line["eval/loss"] for line in _metrics(tmp_path / "out") if "eval/loss" in line]
    assert losses[-1] < losses[0]  # cross-entropy on the references went down
    assert "preflight" not in recorder.kinds()  # no teacher, nothing to measure against


def test_sft_settings_refuse_a_distillation_without_teacher() -> None:
    with pytest.raises(ValueError, match="teacher: required"):
        DistillSettings.model_validate({"student": "s", "dataset": "d.jsonl"})


def test_init_phase_fine_tunes_then_distils_with_metrics_for_both(
    tmp_path: Path, pair: tuple[Path, Path], make_settings: Callable[..., DistillSettings]
) -> None:
    settings = make_settings(*pair, init={"sft_steps": 3, "learning_rate": 1e-3}, max_steps=2)
    recorder = Events()
    result = distill(settings, tmp_path / "out", [recorder])
    assert result.steps_done == 5
    phases = [data["phase"] for kind, _, data in recorder.events if kind == "phase_started"]
    assert phases == ["init", "distill"]
    lines = _metrics(tmp_path / "out")
    assert [x["step"] for x in lines if "init/loss" in x] == [1, 2, 3]
    assert [x["step"] for x in lines if "train/loss" in x] == [4, 5]
    init_lr = [x["init/lr"] for x in lines if "init/lr" in x]
    assert max(init_lr) == pytest.approx(1e-3)
    # The end of the SFT phase is evaluated: its student is a result of its own.
    assert [r.step for r in recorder.evals] == [3, 5]


def test_a_student_sample_is_scored_by_the_teacher_on_its_generated_tokens_only(
    tmp_path: Path, pair: tuple[Path, Path], make_settings: Callable[..., DistillSettings]
) -> None:
    settings = make_settings(*pair, student_outputs={"fraction": 1.0, "max_new_tokens": 6})
    run = TrainingRun(settings, tmp_path / "run", [], None)
    try:
        assert run.student_outputs is not None and run.teacher is not None
        dataset_batch = run.stream.next()
        prompts = batch_prompts(dataset_batch)
        own = run.student_outputs.batch(run.student, dataset_batch, step=0, micro=0)
        assert own is not None
        seen: list[torch.Tensor] = []
        # The teacher's body runs on every path (the fused loss applies its head itself).
        handle = run.teacher.base_model.register_forward_pre_hook(
            lambda _m, args, kwargs: seen.append(kwargs["input_ids"].clone()), with_kwargs=True
        )
        run._loss(own, settings.alpha, settings.lam)
        handle.remove()
        # The teacher scored exactly the student's sequences.
        assert len(seen) == 1 and torch.equal(seen[0].cpu(), own.input_ids)
        for row in range(len(own.input_ids)):
            length = int(own.attention_mask[row].sum())
            labelled = (own.labels[row] != IGNORE_INDEX).nonzero().flatten().tolist()
            prompt_length = labelled[0] if labelled else length
            # Each drawn row starts with one of the batch's prompts; only what follows is labelled.
            assert own.input_ids[row, :prompt_length].tolist() in prompts
            assert labelled == list(range(prompt_length, length))
            assert own.labels[row, prompt_length:length].tolist() == (
                own.input_ids[row, prompt_length:length].tolist()
            )
            assert 0 < length - prompt_length <= 6
        # Those sequences are the student's own: not the references of the dataset batch.
        assert not torch.equal(
            own.input_ids[:, : dataset_batch.input_ids.shape[1]], dataset_batch.input_ids
        )
    finally:
        run.cleanup()


def test_replay_buffer_keeps_the_last_sequences_and_the_share_adapts() -> None:
    buffer = ReplayBuffer(capacity=3)
    buffer.add([([i], 0) for i in range(5)])
    assert buffer.items == [([2], 0), ([3], 0), ([4], 0)]
    assert all(item in buffer.items for item in buffer.draw(10, random.Random(0)))

    outputs = StudentOutputs(
        StudentOutputSettings(fraction=0.0, adaptive=True, increment=0.1, loss_eps=0.1),
        seed=0,
        pad_id=1,
        eos_id=0,
        max_length=32,
        device=torch.device("cpu"),
    )
    assert not outputs.on_eval_loss(2.0)  # the first evaluation only sets the baseline
    assert not outputs.on_eval_loss(2.05)  # a rise under loss_eps
    assert outputs.on_eval_loss(2.2)
    assert outputs.share == pytest.approx(0.1)
    assert not outputs.on_eval_loss(1.0)


def test_adaptive_student_outputs_run_and_resume_with_the_buffer(
    tmp_path: Path, pair: tuple[Path, Path], make_settings: Callable[..., DistillSettings]
) -> None:
    settings = make_settings(
        *pair,
        max_steps=4,
        checkpoint_interval=2,
        eval_interval=1,
        student_outputs={"fraction": 0.5, "adaptive": True, "loss_eps": 0.0, "max_new_tokens": 4},
    )
    result = distill(settings, tmp_path / "full", [])
    assert result.status == "completed"
    full = _metrics(tmp_path / "full")
    shares = [x["train/student_output_share"] for x in full if "train/student_output_share" in x]
    assert len(shares) == 4 and shares[-1] >= shares[0]
    assert sum(x["train/student_output_batches"] for x in full if "train/loss" in x) > 0
    resumed = distill(
        settings, tmp_path / "resumed", [], resume_from=tmp_path / "full" / "checkpoints" / "step-2"
    )
    assert resumed.steps_done == 4
    again = {x["step"]: x for x in _metrics(tmp_path / "resumed") if "train/loss" in x}
    for line in full:
        if "train/loss" in line and line["step"] > 2:
            assert again[line["step"]]["train/loss"] == pytest.approx(line["train/loss"], rel=1e-5)


def test_lm_term_adds_cross_entropy_on_text_every_step(
    tmp_path: Path, pair: tuple[Path, Path], make_settings: Callable[..., DistillSettings]
) -> None:
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"The {i}th capital is a city of words." for i in range(200)))
    with_lm = distill(
        make_settings(*pair, lm_dataset=str(text), lm_weight=1.0, max_steps=3),
        tmp_path / "lm",
        [],
    )
    without = distill(make_settings(*pair, max_steps=3), tmp_path / "plain", [])
    assert with_lm.status == without.status == "completed"
    lm_losses = [x["train/lm_loss"] for x in _metrics(tmp_path / "lm") if "train/lm_loss" in x]
    assert len(lm_losses) == 3 and all(v > 0 for v in lm_losses)
    final_lm = load_file(tmp_path / "lm" / "final" / "model.safetensors")
    final_plain = load_file(tmp_path / "plain" / "final" / "model.safetensors")
    assert any(not torch.equal(final_lm[k], final_plain[k]) for k in final_lm)


def test_select_best_makes_the_best_evaluated_checkpoint_the_final_student(
    tmp_path: Path, pair: tuple[Path, Path], make_settings: Callable[..., DistillSettings]
) -> None:
    settings = make_settings(
        *pair,
        max_steps=4,
        eval_interval=1,
        checkpoint_interval=1,
        select_best="eval/teacher_kl",
        learning_rate=3e-2,
    )
    recorder = Events()
    result = distill(settings, tmp_path / "out", [recorder])
    kls = {r.step: r.metrics["eval/teacher_kl"] for r in recorder.evals}
    best_step = min(kls, key=lambda step: kls[step])
    assert result.best_step == best_step
    final = load_file(tmp_path / "out" / "final" / "model.safetensors")
    chosen = load_file(tmp_path / "out" / "checkpoints" / f"step-{best_step}" / "model.safetensors")
    assert all(torch.equal(final[k], chosen[k]) for k in final)
    assert ("best/step" in recorder.measures[-1][1]) and recorder.measures[-1][1][
        "best/step"
    ] == best_step
    assert "best_selected" in recorder.kinds()


def test_preflight_warns_when_the_student_is_too_far_for_alpha(
    tmp_path: Path, make_settings: Callable[..., DistillSettings]
) -> None:
    # The demo's trained teacher and untrained student: q ≪ p at the teacher's tokens.
    pair = (TEACHER_DIR, STUDENT_DIR)
    far = Events()
    distill(make_settings(*pair, preset="amid", max_steps=1), tmp_path / "far", [far])
    [(_, message, data)] = [e for e in far.events if e[0] == "preflight"]
    assert data["too_far"] and data["warning"]
    assert "fine-tune first" in message and "raise α" in message
    assert far.measures[0][1]["preflight/too_far"] == 1.0

    near = Events()
    distill(make_settings(*pair, preset="kd", max_steps=1), tmp_path / "near", [near])
    [(_, message, data)] = [e for e in near.events if e[0] == "preflight"]
    assert not data["too_far"] and data["w_median"] == 1.0  # λ = 0: r = q, all weight on q


def test_amid_auto_refuses_a_student_too_far_from_its_teacher(
    tmp_path: Path, make_settings: Callable[..., DistillSettings]
) -> None:
    settings = make_settings(TEACHER_DIR, STUDENT_DIR, preset="amid-auto", max_steps=1)
    assert settings.preflight_action == "refuse"
    with pytest.raises(StudentTooFar, match="fine-tune first") as refused:
        distill(settings, tmp_path / "out", [])
    assert refused.value.field == "student"
    # Asked to, it only warns; explicit fields override the preset's.
    warned = make_settings(
        TEACHER_DIR, STUDENT_DIR, preset="amid-auto", max_steps=1, preflight_action="warn"
    )
    assert distill(warned, tmp_path / "warned", []).status == "completed"


def test_student_weight_matches_its_formula() -> None:
    log_p = torch.log(torch.tensor([0.6, 0.3]))
    log_q = torch.log(torch.tensor([0.01, 0.3]))
    alpha, lam = -5.0, 0.1
    c = (1 - alpha) / 2
    p, q = log_p.exp(), log_q.exp()
    expected = (1 - lam) * q**c / (lam * p**c + (1 - lam) * q**c)
    assert torch.allclose(student_weight(log_p, log_q, alpha, lam), expected)
    assert torch.allclose(student_weight(log_p, log_q, 1.0, lam), torch.full((2,), 1 - lam))


def test_adaptive_alpha_moves_to_the_target_as_w_rises_and_never_back() -> None:
    control = AdaptiveAlpha(start=0.5, target=-5.0, w_ready=0.5)
    assert control.alpha == 0.5
    control.update(BatchMeasure([0.25, 0.25, 0.3], 0.0, 3))
    assert control.alpha == pytest.approx(0.5 - 5.5 * 0.5)
    control.update(BatchMeasure([0.0], 0.0, 1))
    assert control.alpha == pytest.approx(0.5 - 5.5 * 0.5)
    control.update(BatchMeasure([0.9], 0.0, 1))
    assert control.alpha == -5.0


def test_amid_auto_preset_starts_at_half_and_moves_alpha_in_a_run(
    tmp_path: Path, save_model: Callable[..., Path], make_settings: Callable[..., DistillSettings]
) -> None:
    teacher = save_model("same")  # student = teacher: w is as large as it gets at once
    settings = make_settings(teacher, teacher, preset="amid-auto", max_steps=6)
    assert settings.alpha_schedule is not None and settings.alpha_schedule.kind == "adaptive"
    distill(settings, tmp_path / "out", [])
    alphas = [x["alpha"] for x in _metrics(tmp_path / "out") if "alpha" in x]
    assert alphas[-1] < 0.5 and alphas == sorted(alphas, reverse=True)


def test_evaluation_samples_over_seeds_decodes_greedily_and_scores_each_eval_set(
    tmp_path: Path, pair: tuple[Path, Path], make_settings: Callable[..., DistillSettings]
) -> None:
    from core.demo import DATA_FILE

    extra = tmp_path / "extra.jsonl"
    extra.write_text("".join(DATA_FILE.read_text().splitlines(keepends=True)[:6]))
    settings = make_settings(
        *pair,
        max_steps=1,
        generation={"max_new_tokens": 6, "do_sample": True},
        evaluation={"sample_seeds": 3, "greedy": True},
        eval_datasets={"extra": str(extra)},
    )
    recorder = Events()
    distill(settings, tmp_path / "out", [recorder])
    metrics = recorder.evals[-1].metrics
    for name in (
        "eval/rouge_l",
        "eval/rouge_l_sd",
        "eval/exact_match",
        "eval/rouge_l_greedy",
        "eval/exact_match_greedy",
        "eval/teacher_kl",
        "eval/extra/rouge_l",
        "eval/extra/loss",
    ):
        assert name in metrics, name
