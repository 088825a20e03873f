"""The distillation run: `distill(settings, output_dir, callbacks, resume_from) -> RunResult`.

Reads top to bottom in four parts, setup → train → save_checkpoint → cleanup, with no
framework trainer underneath. The teacher runs forward only, under inference mode; the student
learns from `amid_loss` on response tokens (plus an optional cross-entropy to the references).
Around the loss, the paper's recipe: an SFT phase first (`core.phases`), the student's own
samples as responses (`core.student_outputs`), a language-modelling term on pretraining text
(`core.lm_data`), a pre-flight measure and adaptive α (`core.assistant_weight`), and the best
evaluated student as the final one.
Everything that decides a step's numbers (data order, RNG streams, optimizer and scheduler
state) is either a pure function of the seed or saved in the checkpoint, so a resumed run
repeats an uninterrupted one.
"""

from __future__ import annotations

import gc
import json
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from core.assistant_weight import AdaptiveAlpha, measure_batch, preflight
from core.callbacks import (
    Callback,
    CheckpointReport,
    EvalReport,
    RunInfo,
    RunResult,
    StepReport,
)
from core.checkpoints import (
    TrainingState,
    load_training_state,
    mark_best,
    save_checkpoint,
    save_model_dir,
)
from core.data import (
    IGNORE_INDEX,
    Batch,
    DataPosition,
    DatasetUnreadable,
    MalformedRow,
    TokenizedExample,
    TrainStream,
    load_data,
    load_examples,
    tokenize_example,
)
from core.errors import AmidError
from core.evaluate import LossFn, evaluate
from core.guards import NonFiniteWatch, StopRequested, check_finite_weights, check_positions
from core.heads import SplitModel, split_head
from core.lm_data import LmStream, pack_blocks
from core.losses import amid_loss, fused_amid_loss
from core.models import load_pair
from core.phases import Phase, lr_factor, phase_at, plan_phases
from core.schedules import ADAPTIVE, schedule_value
from core.settings import DistillSettings
from core.shared_teacher import SharedTeacher
from core.student_outputs import StudentOutputs


class StudentTooFar(AmidError):
    """The pre-flight found the student too far from the teacher for the run's α."""

    status_code = 422


BEST_METRIC = "eval/rouge_l"
BEST_DIR = "best"  # the best-evaluated student so far, when the run selects by a metric
# Steps between two measures of w for the adaptive α (one extra forward pass of both models).
ADAPTIVE_ALPHA_EVERY = 5


class MetricsLog:
    """`metrics.jsonl`: one JSON object per line, `step` plus named metrics."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        if resume_step is not None and path.exists():
            # Lines written after the checkpoint we resume from belong to a run that is being
            # repeated; keeping them would show those steps twice.
            kept = [
                line
                for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line)["step"] <= resume_step
            ]
            path.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
        elif path.exists():
            path.unlink()

    def write(self, step: int, metrics: dict[str, float]) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, **metrics}) + "\n")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class TrainingRun:
    """One distillation run; `distill` drives its phases."""

    # == setup ===================================================================================

    def __init__(
        self,
        settings: DistillSettings,
        output_dir: Path,
        callbacks: Sequence[Callback],
        resume_from: Path | None,
        shared: SharedTeacher | None = None,
    ):
        self.settings = settings
        self.shared = shared
        self.output_dir = output_dir
        self.callbacks = list(callbacks)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        _seed_everything(settings.seed)

        # -- models: a resumed run takes the student's weights from its checkpoint -------------
        student_source = str(resume_from) if resume_from is not None else settings.student
        pair = load_pair(
            settings.teacher,  # an SFT run loads one only to measure eval/teacher_kl
            student_source,
            device=self.device,
            precision=settings.precision,
            trust_remote_code=settings.trust_remote_code,
            loaded_teacher=shared.model if shared is not None else None,
        )
        if shared is not None:
            shared.model = pair.teacher
        self.teacher, self.student, self.tokenizer = pair.teacher, pair.student, pair.tokenizer
        self.vocab_width = pair.vocab.width
        self.compute_dtype = pair.compute_dtype
        check_positions(settings, *(m for m in (self.teacher, self.student) if m is not None))
        self._event(
            "models_loaded",
            f"teacher {self.teacher and settings.teacher} and student {settings.student} loaded "
            f"on {self.device}",
            {"device": str(self.device), "dtype": str(self.compute_dtype).removeprefix("torch.")},
        )
        self.fused = self._split_heads()
        if pair.vocab.truncates_teacher:
            self._event(
                "vocab_truncated",
                f"teacher logits cut from {pair.vocab.teacher_width} to {pair.vocab.width} "
                f"columns (padding past the {pair.vocab.tokenizer_size}-token vocabulary)",
                {"teacher_width": pair.vocab.teacher_width, "width": pair.vocab.width},
            )

        # -- data -----------------------------------------------------------------------------
        skipped: list[MalformedRow] = []
        data = load_data(
            settings.dataset,
            self.tokenizer,
            max_prompt_length=settings.max_prompt_length,
            max_length=settings.max_length,
            seed=settings.seed,
            on_skip=skipped.append,
        )
        if data.skipped:
            self._event(
                "rows_skipped",
                f"{data.skipped} malformed rows skipped; first: {skipped[0].message}",
                {"count": data.skipped, "first": [e.message for e in skipped[:10]]},
            )
        if not data.train:
            raise DatasetUnreadable(
                "no training rows left after holding out dataset.eval_size rows",
                field="dataset.eval_size",
            )
        self.eval_examples = data.eval
        self.train_examples = data.train
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.stream = TrainStream(data.train, settings.batch_size, self.pad_id, settings.seed)
        self._event(
            "data_loaded",
            f"{len(data.train)} training and {len(data.eval)} eval examples ({data.format} format)",
            {"train": len(data.train), "eval": len(data.eval), "format": data.format},
        )
        self.eval_sets = {
            name: self._eval_set(dataset) for name, dataset in settings.eval_datasets.items()
        }
        self.lm_stream = (
            LmStream(
                pack_blocks(settings.lm_dataset, self.tokenizer, settings.max_length),
                settings.batch_size,
                settings.seed,
            )
            if settings.lm_dataset is not None
            else None
        )
        main_steps = settings.max_steps or max(
            1,
            math.ceil(settings.epochs * self.stream.batches_per_epoch / settings.grad_accum_steps),
        )
        self.phases = plan_phases(settings, main_steps)
        self.total_steps = self.phases[-1].end_step
        self.student_outputs = (
            StudentOutputs(
                settings.student_outputs,
                seed=settings.seed,
                pad_id=self.pad_id,
                eos_id=self.tokenizer.eos_token_id,
                max_length=settings.max_length,
                device=self.device,
            )
            if settings.student_outputs is not None
            else None
        )
        schedule = settings.alpha_schedule
        self.adaptive_alpha = (
            AdaptiveAlpha(schedule.start, schedule.end_value, schedule.w_ready)
            if schedule is not None and schedule.kind == ADAPTIVE
            else None
        )

        # -- optimizer, schedule, precision ----------------------------------------------------
        # No weight decay on biases and norm gains (1-D tensors): decaying them only hurts.
        decay = [p for p in self.student.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.student.parameters() if p.requires_grad and p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": settings.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=settings.learning_rate,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_factor(self.phases, settings)
        )
        # fp16 overflows without loss scaling; bf16 and fp32 have the range and need none.
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=self.compute_dtype == torch.float16
        )
        self.nonfinite = NonFiniteWatch(settings.max_nonfinite_steps)
        self.state = TrainingState(
            step=0, position=DataPosition(), best_metric=None, best_step=None
        )
        if resume_from is not None:
            self.state = load_training_state(
                resume_from, optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler
            )
            self.stream = TrainStream(
                data.train, settings.batch_size, self.pad_id, settings.seed, self.state.position
            )
            self._restore_extra(self.state.extra)
            saved_best = resume_from / BEST_DIR
            if saved_best.is_dir():
                shutil.copytree(saved_best, self.output_dir / BEST_DIR, dirs_exist_ok=True)
            self._event(
                "resumed",
                f"resumed from {resume_from} at step {self.state.step}",
                {"step": self.state.step},
            )
        self.metrics_log = MetricsLog(
            self.output_dir / "metrics.jsonl",
            self.state.step if resume_from is not None else None,
        )
        self.last_eval: tuple[int, dict[str, float]] | None = None
        self.last_eval_best = False
        self.last_train: dict[str, float] = {}

        for callback in self.callbacks:
            callback.on_start(self.info())

    def info(self) -> RunInfo:
        """What the run's start reports: its length, where it starts, its data, its device."""
        return RunInfo(
            total_steps=self.total_steps,
            start_step=self.state.step,
            train_examples=len(self.train_examples),
            eval_examples=len(self.eval_examples),
            device=str(self.device),
        )

    def _eval_set(self, dataset: Any) -> list[TokenizedExample]:
        """Every row of an extra evaluation set, tokenized like the training data."""
        examples, _, _ = load_examples(dataset, self.tokenizer)
        s = self.settings
        return [
            tokenize_example(e, self.tokenizer, s.max_prompt_length, s.max_length) for e in examples
        ]

    def _preflight(self) -> None:
        """Measure w and KL(p‖q) on the first batches; say so when the student is too far, and
        refuse to go on when the settings ask (`preflight_action: refuse`)."""
        assert self.teacher is not None
        s = self.settings
        alpha, lam = s.alpha, s.lam
        if s.alpha_schedule is not None:
            alpha = s.alpha_schedule.end_value  # what the run moves toward
        # Its own stream over the same order: the training stream does not move.
        probe = TrainStream(self.train_examples, s.batch_size, self.pad_id, s.seed)
        result = preflight(
            (
                measure_batch(
                    self.teacher,
                    self.student,
                    probe.next(),
                    vocab_width=self.vocab_width,
                    alpha=alpha,
                    lam=lam,
                    device=self.device,
                )
                for _ in range(min(s.preflight_batches, probe.batches_per_epoch))
            ),
            alpha,
            lam,
        )
        data = {
            "w_median": result.w_median,
            "teacher_kl": result.teacher_kl,
            "too_far": result.too_far,
        }
        if result.too_far:
            data["warning"] = True
        self._event("preflight", result.advice(), data)
        self._metrics(
            0,
            {
                "preflight/w_median": result.w_median,
                "preflight/teacher_kl": result.teacher_kl,
                "preflight/too_far": float(result.too_far),
            },
        )
        if result.hopeless and s.preflight_action == "refuse":
            raise StudentTooFar(result.advice(), field="student")

    def _restore_extra(self, extra: dict[str, Any]) -> None:
        if self.lm_stream is not None and "lm_position" in extra:
            self.lm_stream = LmStream(
                self.lm_stream.blocks,
                self.settings.batch_size,
                self.settings.seed,
                DataPosition(*extra["lm_position"]),
            )
        if self.student_outputs is not None and "student_outputs" in extra:
            self.student_outputs.load_state_dict(extra["student_outputs"])
        if self.adaptive_alpha is not None and "alpha_progress" in extra:
            self.adaptive_alpha.progress = float(extra["alpha_progress"])

    def _extra_state(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.lm_stream is not None:
            extra["lm_position"] = [self.lm_stream.position.epoch, self.lm_stream.position.index]
        if self.student_outputs is not None:
            extra["student_outputs"] = self.student_outputs.state_dict()
        if self.adaptive_alpha is not None:
            extra["alpha_progress"] = self.adaptive_alpha.progress
        return extra

    def _event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        for callback in getattr(self, "callbacks", []):
            callback.on_event(kind, message, data)

    def _metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.metrics_log.write(step, metrics)
        for callback in self.callbacks:
            callback.on_metrics(step, metrics)

    def _knobs(self, step: int) -> tuple[float, float]:
        """α and λ at optimizer step `step` (0-based): fixed, adaptive, or from their schedules
        (over the distillation phase's steps)."""
        s = self.settings
        phase = self.phases[-1]
        local = max(step - phase.first_step, 0)
        alpha, lam = s.alpha, s.lam
        if self.adaptive_alpha is not None:
            alpha = self.adaptive_alpha.alpha
        elif s.alpha_schedule is not None:
            sched = s.alpha_schedule
            alpha = schedule_value(sched.kind, sched.start, sched.end_value, local, phase.steps)
        if s.lambda_schedule is not None:
            sched = s.lambda_schedule
            lam = schedule_value(sched.kind, sched.start, sched.end_value, local, phase.steps)
        return alpha, lam

    def _split_heads(self) -> tuple[SplitModel, SplitModel] | None:
        """Both models as body and head for the fused loss, or None (with an event) when either
        head cannot be reproduced exactly outside its model."""
        if self.teacher is None:  # an SFT run: its cross-entropy needs no teacher head
            return None
        teacher = split_head(self.teacher, self.vocab_width)
        student = split_head(self.student, self.vocab_width)
        if isinstance(teacher, SplitModel) and isinstance(student, SplitModel):
            return teacher, student
        role, reason = ("teacher", teacher) if isinstance(teacher, str) else ("student", student)
        self._event(
            "fused_loss_off",
            f"the loss uses full logits: the {role}'s head cannot be fused ({reason})",
            {"role": role, "reason": str(reason)},
        )
        return None

    def _autocast(self) -> Any:
        # The student's weights stay fp32; autocast runs its matmuls in bf16/fp16 where asked.
        if self.compute_dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def _cross_entropy(self, batch: Batch) -> tuple[torch.Tensor, int]:
        """Mean next-token cross-entropy over the batch's labelled tokens, and their count."""
        targets = batch.labels[:, 1:].to(self.device)
        mask = targets != IGNORE_INDEX
        with self._autocast():
            logits = self.student(
                input_ids=batch.input_ids.to(self.device),
                attention_mask=batch.attention_mask.to(self.device),
            ).logits
        # Only the labelled rows are upcast to fp32, never the whole [B, T, V] block.
        logits = logits[:, :-1, : self.vocab_width][mask].float()
        return F.cross_entropy(logits, targets[mask]), int(mask.sum())

    def _loss(
        self, batch: Batch, alpha: float, lam: float, training: bool = True
    ) -> tuple[torch.Tensor, int]:
        """Mean distillation loss over the batch's response tokens, and their count.

        A training batch takes the fused path where the models allow it and, in a sweep, shares
        the teacher's output among the students; an evaluation batch (`training` false) keeps
        the logits path and runs the teacher for each student."""
        assert self.teacher is not None, "a distillation has a teacher"
        input_ids = batch.input_ids.to(self.device)
        attention = batch.attention_mask.to(self.device)
        # Position t's logits predict token t + 1: drop the last position, shift the labels.
        targets = batch.labels[:, 1:].to(self.device)
        mask = targets != IGNORE_INDEX
        if training and self.fused is not None:
            return self._fused_loss(
                self.fused, input_ids, attention, targets=targets, mask=mask, alpha=alpha, lam=lam
            )
        teacher = self.teacher

        def teacher_logits_of_batch() -> torch.Tensor:
            # The teacher never needs a graph: inference mode skips autograd bookkeeping entirely.
            with torch.inference_mode():
                logits = teacher(input_ids=input_ids, attention_mask=attention).logits
                return logits[:, :-1, : self.vocab_width]

        teacher_logits = self._teacher_output(
            input_ids, attention, teacher_logits_of_batch, shared=training
        )
        with self._autocast():
            student_logits = self.student(input_ids=input_ids, attention_mask=attention).logits
        # Columns past the shared vocabulary (padding of a wider teacher) are cut, not compared.
        student_logits = student_logits[:, :-1, : self.vocab_width]
        loss = amid_loss(
            student_logits,
            teacher_logits,
            mask,
            alpha=alpha,
            lam=lam,
            chunk_size=self.settings.loss_chunk_size,
            **self.settings.loss_knobs(),
        )
        if self.settings.ce_weight > 0:
            # Only the response rows are upcast to fp32, never the whole [B, T, V] block.
            ce = F.cross_entropy(student_logits[mask].float(), targets[mask])
            loss = loss + self.settings.ce_weight * ce
        return loss, int(mask.sum())

    def _teacher_output(
        self,
        input_ids: torch.Tensor,
        attention: torch.Tensor,
        compute: Callable[[], torch.Tensor],
        *,
        shared: bool,
    ) -> torch.Tensor:
        """The teacher's output on a training batch: computed once for all of a sweep's students.
        Evaluation (`shared` false) runs each student over the eval set on its own."""
        if self.shared is None or not shared:
            return compute()
        return self.shared.output(input_ids, attention, compute)

    def _fused_loss(
        self,
        models: tuple[SplitModel, SplitModel],
        input_ids: torch.Tensor,
        attention: torch.Tensor,
        *,
        targets: torch.Tensor,
        mask: torch.Tensor,
        alpha: float,
        lam: float,
    ) -> tuple[torch.Tensor, int]:
        """The same loss from hidden states: the heads run inside `fused_amid_loss`, at the
        response positions only, so neither model's [B, T, V] logits ever exist."""
        teacher, student = models

        def teacher_hidden_of_batch() -> torch.Tensor:
            with torch.inference_mode():
                return teacher.hidden_states(input_ids, attention)[:, :-1]

        teacher_hidden = self._teacher_output(
            input_ids, attention, teacher_hidden_of_batch, shared=True
        )
        with self._autocast():
            student_hidden = student.hidden_states(input_ids, attention)[:, :-1]
        loss = fused_amid_loss(
            student_hidden,
            student.weight,
            teacher_hidden,
            teacher.weight,
            mask,
            alpha=alpha,
            lam=lam,
            student_bias=student.bias,
            teacher_bias=teacher.bias,
            targets=targets.clamp(min=0),  # ignored positions are never read
            ce_weight=self.settings.ce_weight,
            chunk_size=self.settings.loss_chunk_size,
            **self.settings.loss_knobs(),
        )
        return loss, int(mask.sum())

    # == train ===================================================================================

    def train(self) -> RunResult:
        self.begin()
        while not self.done:
            if self._stop_requested():
                return self.stopped()
            self.advance()
        return self.complete()

    def begin(self) -> None:
        """Before the first step of this attempt: the baseline evaluation, the clock."""
        if self.settings.eval_at_start and self.state.step == 0:
            self._evaluate(0)
        self.started = time.monotonic()
        self.first_step = self.state.step

    @property
    def done(self) -> bool:
        return self.state.step >= self.total_steps

    def advance(self) -> None:
        """One optimizer step, then the evaluation and checkpoint that fall on it."""
        s = self.settings
        phase = phase_at(self.phases, self.state.step)
        if self.state.step == phase.first_step:
            self._start_phase(phase)
        step_started = time.monotonic()
        metrics = self._train_step(self.state.step, phase)
        self.state.step += 1
        self.state.position = self.stream.position
        now = time.monotonic()
        metrics[f"{phase.metric_prefix}/tokens_per_s"] = metrics.pop("_tokens") / max(
            now - step_started, 1e-9
        )
        self.last_train = metrics
        self.metrics_log.write(self.state.step, metrics)
        done = self.state.step - self.first_step
        remaining = self.total_steps - self.state.step
        report = StepReport(
            step=self.state.step,
            total_steps=self.total_steps,
            metrics=metrics,
            elapsed_seconds=now - self.started,
            eta_seconds=(now - self.started) / done * remaining,
        )
        for callback in self.callbacks:
            callback.on_step(report)

        # The end of every phase is evaluated and saved: the SFT student is a result too.
        at_end = self.state.step == phase.end_step
        if at_end or (s.eval_interval and self.state.step % s.eval_interval == 0):
            self._evaluate(self.state.step)
        if at_end or (s.checkpoint_interval and self.state.step % s.checkpoint_interval == 0):
            self._save_checkpoint(self.state.step)

    def complete(self) -> RunResult:
        """After the last step: the final evaluation and the final student."""
        s = self.settings
        if self.last_eval is None or self.last_eval[0] != self.state.step:
            # Resumed from the last step's checkpoint: finish what that run did not.
            self._evaluate(self.state.step)
        final = self.output_dir / "final"
        check_finite_weights(self.student)
        best = self.output_dir / BEST_DIR
        if s.select_best is not None and best.is_dir():
            shutil.rmtree(final, ignore_errors=True)
            shutil.copytree(best, final)
            self._event(
                "best_selected",
                f"final student: the checkpoint of step {self.state.best_step} "
                f"({s.select_best} {self.state.best_metric:.4f})",
                {"step": self.state.best_step, "metric": s.select_best},
            )
            assert self.state.best_step is not None and self.state.best_metric is not None
            self._metrics(
                self.state.step,
                {
                    "best/step": float(self.state.best_step),
                    f"best/{s.select_best}": self.state.best_metric,
                },
            )
        else:
            save_model_dir(self.student, self.tokenizer, final)
        self._event("final_saved", f"final student written to {final}", {"path": str(final)})
        return self._finish("completed", final_path=final)

    def _start_phase(self, phase: Phase) -> None:
        if phase.first_step > 0:
            # A phase starts with fresh optimizer moments, as a separate run would.
            self.optimizer.state.clear()
        self._event(
            "phase_started",
            f"{phase.name} phase: {phase.steps} steps at learning rate {phase.learning_rate:g}",
            {"phase": phase.name, "first_step": phase.first_step, "steps": phase.steps},
        )
        if phase.objective == "distill" and self.settings.preflight_batches:
            # Measured on the student this phase starts from (after its SFT, if any).
            self._preflight()

    def _train_step(self, step: int, phase: Phase) -> dict[str, float]:
        alpha, lam = self._knobs(step)
        self.student.train()
        accum = self.settings.grad_accum_steps
        loss_sum, lm_sum, tokens, generated = 0.0, 0.0, 0, 0
        for micro in range(accum):
            # Checked between micro-batches too: a stop never waits for a whole step.
            if self._stop_requested():
                raise StopRequested
            batch = self.stream.next()
            if phase.objective == "cross_entropy":
                loss, _count = self._cross_entropy(batch)
            else:
                if (
                    self.adaptive_alpha is not None
                    and micro == 0
                    and step % ADAPTIVE_ALPHA_EVERY == 0
                ):
                    self._measure_for_alpha(batch)
                    alpha, lam = self._knobs(step)
                if self.student_outputs is not None:
                    own = self.student_outputs.batch(self.student, batch, step, micro)
                    if own is not None:
                        batch, generated = own, generated + 1
                loss, _count = self._loss(batch, alpha, lam)
            loss_sum += float(loss.detach())
            if self.lm_stream is not None and self.settings.lm_weight > 0:
                lm_loss, _ = self._cross_entropy(self.lm_stream.next())
                lm_sum += float(lm_loss.detach())
                loss = loss + self.settings.lm_weight * lm_loss
            # Each micro-batch's mean counts 1/accum: the step's gradient is their average.
            self.scaler.scale(loss / accum).backward()
            tokens += batch.num_tokens
        # Unscale before clipping so the threshold applies to the true gradient (fp16).
        self.scaler.unscale_(self.optimizer)
        max_norm = self.settings.max_grad_norm or math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.student.parameters(), max_norm)
        if not self.nonfinite.step_is_finite(step, loss_sum / accum, float(grad_norm)):
            # Skipped (its update would make every weight NaN; a run of them fails the run):
            # with no gradients, the optimizer step below leaves every weight as it is.
            self.optimizer.zero_grad(set_to_none=True)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        prefix = phase.metric_prefix
        metrics = {
            f"{prefix}/loss": loss_sum / accum,
            f"{prefix}/lr": float(lr),
            f"{prefix}/grad_norm": float(grad_norm),
            "_tokens": float(tokens),
        }
        if phase.objective == "distill":
            metrics.update({"alpha": alpha, "lambda": lam})
        if self.lm_stream is not None:
            metrics[f"{prefix}/lm_loss"] = lm_sum / accum
        if self.student_outputs is not None and phase.objective == "distill":
            metrics["train/student_output_share"] = self.student_outputs.share
            metrics["train/student_output_batches"] = float(generated)
        return metrics

    def _measure_for_alpha(self, batch: Batch) -> None:
        assert self.teacher is not None and self.adaptive_alpha is not None
        self.adaptive_alpha.update(
            measure_batch(
                self.teacher,
                self.student,
                batch,
                vocab_width=self.vocab_width,
                alpha=self.adaptive_alpha.target,
                lam=self.settings.lam,
                device=self.device,
            )
        )

    def _evaluate(self, step: int) -> None:
        s = self.settings
        phase = phase_at(self.phases, max(step - 1, 0))
        alpha, lam = self._knobs(max(step - 1, 0))

        def loss_fn(batch: Batch) -> tuple[torch.Tensor, int]:
            if self._stop_requested():
                raise StopRequested
            # Evaluation keeps the logits path: the numbers it reports are the models' own.
            with torch.no_grad():
                if phase.objective == "cross_entropy":
                    return self._cross_entropy(batch)
                return self._loss(batch, alpha, lam, training=False)

        loss_fns: dict[str, LossFn] = {"loss": loss_fn}
        teacher = self.teacher
        if s.evaluation.teacher_kl and teacher is not None:

            def teacher_kl(batch: Batch) -> tuple[float, int]:
                measure = measure_batch(
                    teacher,
                    self.student,
                    batch,
                    vocab_width=self.vocab_width,
                    alpha=alpha,
                    lam=lam,
                    device=self.device,
                )
                return measure.kl_sum / max(measure.tokens, 1), measure.tokens

            loss_fns["teacher_kl"] = teacher_kl

        self.student.eval()
        metrics: dict[str, float] = {}
        samples: list[dict[str, str]] = []
        sets = [
            ("eval", self.eval_examples),
            *((f"eval/{n}", e) for n, e in self.eval_sets.items()),
        ]
        for prefix, examples in sets:
            outcome = evaluate(
                self.student,
                self.tokenizer,
                examples,
                s.generation,
                max_samples=s.eval_max_samples,
                batch_size=s.batch_size,
                seed=s.seed,
                device=self.device,
                loss_fns=loss_fns,
                sample_seeds=s.evaluation.sample_seeds,
                greedy=s.evaluation.greedy,
                prefix=prefix,
            )
            metrics.update(outcome.metrics)
            samples = samples or outcome.samples
        self.student.train()
        self.last_eval = (step, metrics)
        self.last_eval_best = self._track_best(step, phase, metrics)
        if metrics:
            self.metrics_log.write(step, metrics)
        report = EvalReport(step=step, metrics=metrics, samples=samples)
        for callback in self.callbacks:
            callback.on_eval(report)
        outputs = self.student_outputs
        if (
            outputs is not None
            and phase.objective == "distill"
            and "eval/loss" in metrics
            and outputs.on_eval_loss(metrics["eval/loss"])
        ):
            self._event(
                "student_output_share",
                f"eval loss rose: the student now samples {outputs.share:.0%} of the responses",
                {"share": outputs.share, "step": step},
            )

    def _track_best(self, step: int, phase: Phase, metrics: dict[str, float]) -> bool:
        """Whether this evaluation is the best so far; with select_best, keep its student."""
        s = self.settings
        name = s.select_best or BEST_METRIC
        score = metrics.get(name)
        # Selection is among the students of the last phase (the distillation, not its SFT).
        if score is None or phase is not self.phases[-1]:
            return False
        best = self.state.best_metric
        if best is not None and (score >= best if s.best_is_lowest else score <= best):
            return False
        self.state.best_metric, self.state.best_step = score, step
        if s.select_best is not None:
            save_model_dir(self.student, self.tokenizer, self.output_dir / BEST_DIR)
        return True

    # == save_checkpoint =========================================================================

    def _save_checkpoint(self, step: int) -> None:
        metrics = dict(self.last_train)
        is_best = False
        if self.last_eval is not None and self.last_eval[0] == step:
            metrics.update(self.last_eval[1])
            is_best = self.last_eval_best
        self.state.extra = self._extra_state()
        path = save_checkpoint(
            self.output_dir,
            model=self.student,
            tokenizer=self.tokenizer,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            scaler=self.scaler,
            state=self.state,
            settings_json=self.settings.public_dict(),
        )
        best = self.output_dir / BEST_DIR
        if self.settings.select_best is not None and best.is_dir():
            # The best student so far travels with the checkpoint: a resumed run still has it.
            shutil.copytree(best, path / BEST_DIR, dirs_exist_ok=True)
        if is_best:
            mark_best(self.output_dir, step, metrics)
        report = CheckpointReport(step=step, path=path, metrics=metrics, is_best=is_best)
        for callback in self.callbacks:
            callback.on_checkpoint(report)

    # == cleanup =================================================================================

    def _stop_requested(self) -> bool:
        return any(callback.should_stop() for callback in self.callbacks)

    def stopped(self) -> RunResult:
        self._event("stopped", f"stopped at step {self.state.step} on request")
        return self._finish("stopped", final_path=None)

    def _finish(self, status: str, final_path: Path | None) -> RunResult:
        final_metrics = dict(self.last_train)
        if self.last_eval is not None:
            final_metrics.update(self.last_eval[1])
        result = RunResult(
            status=status,
            steps_done=self.state.step,
            final_path=final_path,
            final_metrics=final_metrics,
            best_step=self.state.best_step,
        )
        for callback in self.callbacks:
            callback.on_end(result)
        return result

    def cleanup(self) -> None:
        # Drop the models before the process takes its next job: a worker may run several.
        for name in ("teacher", "student", "optimizer"):
            if hasattr(self, name):
                delattr(self, name)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def distill(
    settings: DistillSettings,
    output_dir: str | Path,
    callbacks: Sequence[Callback] = (),
    resume_from: str | Path | None = None,
) -> RunResult:
    """Distil `settings.teacher` into `settings.student`; write checkpoints under `output_dir`.

    A sweep (`settings.sweep`) trains its students together (`core.sweep`)."""
    if settings.sweep is not None:
        # Imported here: core.sweep builds on this module's run.
        from core.sweep import distill_sweep

        return distill_sweep(
            settings,
            Path(output_dir),
            callbacks,
            Path(resume_from) if resume_from is not None else None,
        )
    run = TrainingRun(
        settings,
        Path(output_dir),
        callbacks,
        Path(resume_from) if resume_from is not None else None,
    )
    try:
        return run.train()
    except StopRequested:
        return run.stopped()
    finally:
        run.cleanup()
