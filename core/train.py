"""The distillation run: `distill(settings, output_dir, callbacks, resume_from) -> RunResult`.

Reads top to bottom in four phases, setup → train → save_checkpoint → cleanup, with no
framework trainer underneath. The teacher runs forward only, under inference mode; the student
learns from `amid_loss` on response tokens (plus an optional cross-entropy to the references).
Everything that decides a step's numbers (data order, RNG streams, optimizer and scheduler
state) is either a pure function of the seed or saved in the checkpoint, so a resumed run
repeats an uninterrupted one.
"""

from __future__ import annotations

import gc
import json
import math
import random
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

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
    TrainStream,
    load_data,
)
from core.evaluate import evaluate
from core.heads import SplitModel, split_head
from core.losses import amid_loss, fused_amid_loss
from core.models import load_pair
from core.schedules import schedule_value
from core.settings import DistillSettings

BEST_METRIC = "eval/rouge_l"


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


def _lr_factor(settings: DistillSettings, total_steps: int) -> Any:
    warmup = min(settings.warmup_steps, total_steps)
    decay_steps = max(total_steps - warmup, 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if settings.lr_schedule == "constant":
            return 1.0
        progress = min((step - warmup) / decay_steps, 1.0)
        if settings.lr_schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class _Run:
    """One distillation run; `distill` drives its phases."""

    # == setup ===================================================================================

    def __init__(
        self,
        settings: DistillSettings,
        output_dir: Path,
        callbacks: Sequence[Callback],
        resume_from: Path | None,
    ):
        self.settings = settings
        self.output_dir = output_dir
        self.callbacks = list(callbacks)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        _seed_everything(settings.seed)

        # -- models: a resumed run takes the student's weights from its checkpoint -------------
        student_source = str(resume_from) if resume_from is not None else settings.student
        pair = load_pair(
            settings.teacher,
            student_source,
            device=self.device,
            precision=settings.precision,
            trust_remote_code=settings.trust_remote_code,
        )
        self.teacher, self.student, self.tokenizer = pair.teacher, pair.student, pair.tokenizer
        self.vocab_width = pair.vocab.width
        self.compute_dtype = pair.compute_dtype
        self._event(
            "models_loaded",
            f"teacher {settings.teacher} and student {settings.student} loaded on {self.device}",
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
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.stream = TrainStream(data.train, settings.batch_size, self.pad_id, settings.seed)
        self._event(
            "data_loaded",
            f"{len(data.train)} training and {len(data.eval)} eval examples ({data.format} format)",
            {"train": len(data.train), "eval": len(data.eval), "format": data.format},
        )
        self.total_steps = settings.max_steps or max(
            1,
            math.ceil(settings.epochs * self.stream.batches_per_epoch / settings.grad_accum_steps),
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
            self.optimizer, _lr_factor(settings, self.total_steps)
        )
        # fp16 overflows without loss scaling; bf16 and fp32 have the range and need none.
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=self.compute_dtype == torch.float16
        )
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
        self.last_train: dict[str, float] = {}

        for callback in self.callbacks:
            callback.on_start(
                RunInfo(
                    total_steps=self.total_steps,
                    start_step=self.state.step,
                    train_examples=len(data.train),
                    eval_examples=len(data.eval),
                    device=str(self.device),
                )
            )

    def _event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        for callback in getattr(self, "callbacks", []):
            callback.on_event(kind, message, data)

    def _knobs(self, step: int) -> tuple[float, float]:
        """α and λ at optimizer step `step` (0-based): fixed, or from their schedules."""
        s = self.settings
        alpha, lam = s.alpha, s.lam
        if s.alpha_schedule is not None:
            sched = s.alpha_schedule
            alpha = schedule_value(sched.kind, sched.start, sched.end_value, step, self.total_steps)
        if s.lambda_schedule is not None:
            sched = s.lambda_schedule
            lam = schedule_value(sched.kind, sched.start, sched.end_value, step, self.total_steps)
        return alpha, lam

    def _split_heads(self) -> tuple[SplitModel, SplitModel] | None:
        """Both models as body and head for the fused loss, or None (with an event) when either
        head cannot be reproduced exactly outside its model."""
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

    def _loss(
        self, batch: Batch, alpha: float, lam: float, fused: bool = True
    ) -> tuple[torch.Tensor, int]:
        """Mean distillation loss over the batch's response tokens, and their count."""
        input_ids = batch.input_ids.to(self.device)
        attention = batch.attention_mask.to(self.device)
        # Position t's logits predict token t + 1: drop the last position, shift the labels.
        targets = batch.labels[:, 1:].to(self.device)
        mask = targets != IGNORE_INDEX
        if fused and self.fused is not None:
            return self._fused_loss(
                self.fused, input_ids, attention, targets=targets, mask=mask, alpha=alpha, lam=lam
            )
        # The teacher never needs a graph: inference mode skips autograd bookkeeping entirely.
        with torch.inference_mode():
            teacher_logits = self.teacher(input_ids=input_ids, attention_mask=attention).logits
            teacher_logits = teacher_logits[:, :-1, : self.vocab_width]
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
        with torch.inference_mode():
            teacher_hidden = teacher.hidden_states(input_ids, attention)[:, :-1]
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
        s = self.settings
        if s.eval_at_start and self.state.step == 0:
            self._evaluate(0)
        started = time.monotonic()
        first_step = self.state.step
        while self.state.step < self.total_steps:
            if any(callback.should_stop() for callback in self.callbacks):
                self._event("stopped", f"stopped at step {self.state.step} on request")
                return self._finish("stopped", final_path=None)
            step_started = time.monotonic()
            metrics = self._train_step(self.state.step)
            self.state.step += 1
            self.state.position = self.stream.position
            now = time.monotonic()
            metrics["train/tokens_per_s"] = metrics.pop("_tokens") / max(now - step_started, 1e-9)
            self.last_train = metrics
            self.metrics_log.write(self.state.step, metrics)
            done = self.state.step - first_step
            remaining = self.total_steps - self.state.step
            report = StepReport(
                step=self.state.step,
                total_steps=self.total_steps,
                metrics=metrics,
                elapsed_seconds=now - started,
                eta_seconds=(now - started) / done * remaining,
            )
            for callback in self.callbacks:
                callback.on_step(report)

            at_end = self.state.step == self.total_steps
            if at_end or (s.eval_interval and self.state.step % s.eval_interval == 0):
                self._evaluate(self.state.step)
            if at_end or (s.checkpoint_interval and self.state.step % s.checkpoint_interval == 0):
                self._save_checkpoint(self.state.step)

        if self.last_eval is None or self.last_eval[0] != self.state.step:
            # Resumed from the last step's checkpoint: finish what that run did not.
            self._evaluate(self.state.step)
        final = self.output_dir / "final"
        save_model_dir(self.student, self.tokenizer, final)
        self._event("final_saved", f"final student written to {final}", {"path": str(final)})
        return self._finish("completed", final_path=final)

    def _train_step(self, step: int) -> dict[str, float]:
        alpha, lam = self._knobs(step)
        self.student.train()
        accum = self.settings.grad_accum_steps
        loss_sum, tokens = 0.0, 0
        for _ in range(accum):
            batch = self.stream.next()
            loss, _count = self._loss(batch, alpha, lam)
            # Each micro-batch's mean counts 1/accum: the step's gradient is their average.
            self.scaler.scale(loss / accum).backward()
            loss_sum += float(loss.detach())
            tokens += batch.num_tokens
        # Unscale before clipping so the threshold applies to the true gradient (fp16).
        self.scaler.unscale_(self.optimizer)
        max_norm = self.settings.max_grad_norm or math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.student.parameters(), max_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {
            "train/loss": loss_sum / accum,
            "train/lr": float(lr),
            "train/grad_norm": float(grad_norm),
            "alpha": alpha,
            "lambda": lam,
            "_tokens": float(tokens),
        }

    def _evaluate(self, step: int) -> None:
        alpha, lam = self._knobs(max(step - 1, 0))

        def loss_fn(batch: Batch) -> tuple[torch.Tensor, int]:
            # Evaluation keeps the logits path: the numbers it reports are the models' own.
            with torch.no_grad():
                return self._loss(batch, alpha, lam, fused=False)

        self.student.eval()
        outcome = evaluate(
            self.student,
            self.tokenizer,
            self.eval_examples,
            self.settings.generation,
            max_samples=self.settings.eval_max_samples,
            batch_size=self.settings.batch_size,
            seed=self.settings.seed,
            device=self.device,
            loss_fn=loss_fn,
        )
        self.student.train()
        self.last_eval = (step, outcome.metrics)
        if outcome.metrics:
            self.metrics_log.write(step, outcome.metrics)
        report = EvalReport(step=step, metrics=outcome.metrics, samples=outcome.samples)
        for callback in self.callbacks:
            callback.on_eval(report)

    # == save_checkpoint =========================================================================

    def _save_checkpoint(self, step: int) -> None:
        metrics = dict(self.last_train)
        is_best = False
        if self.last_eval is not None and self.last_eval[0] == step:
            metrics.update(self.last_eval[1])
            score = self.last_eval[1].get(BEST_METRIC)
            if score is not None and (
                self.state.best_metric is None or score > self.state.best_metric
            ):
                self.state.best_metric, self.state.best_step = score, step
                is_best = True
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
        if is_best:
            mark_best(self.output_dir, step, metrics)
        report = CheckpointReport(step=step, path=path, metrics=metrics, is_best=is_best)
        for callback in self.callbacks:
            callback.on_checkpoint(report)

    # == cleanup =================================================================================

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
    """Distil `settings.teacher` into `settings.student`; write checkpoints under `output_dir`."""
    run = _Run(
        settings,
        Path(output_dir),
        callbacks,
        Path(resume_from) if resume_from is not None else None,
    )
    try:
        return run.train()
    finally:
        run.cleanup()
