"""One distillation training step of this project against TRL's GKDTrainer: tokens/s, peak extra
memory and where the time goes.

Both sides distil the same GPT-2-shaped teacher (6 layers × 384) into the same student
(2 × 256), built from configs with tied embeddings at the vocabulary asked for, on the same
random batch (8 sequences × 256 tokens, the second half of each the response), with plain KD:
KL(p‖q) on the response tokens (TRL: β = 0, no generation; here: λ = 0, divergence kl), then
AdamW. Same precision on both sides: fp32 on CPU; on CUDA the teacher in bf16 and the student
under bf16 autocast.

- TRL: the step of `GKDTrainer.compute_loss` (both models' full logits, the causal shift, the
  static `GKDTrainer.generalized_jsd_loss`), without HF Trainer's loop around it, which only
  adds time to TRL's side.
- This project: the trainer's step (`core.heads.split_head` and `fused_amid_loss`): both models
  run without their heads, the heads are applied inside the loss at response positions only.

Each side runs in fresh processes. Peak extra memory is measured in one, from just before the
first step (models and data built) to the end of the last: on CPU the growth of peak RSS with
glibc's mmap threshold pinned low (RSS follows live bytes), on CUDA
`torch.cuda.max_memory_allocated`. Time is measured in others, with the allocator as a user
runs it: the median over `--steps` steps after one warm-up step, in each of `--rounds` rounds
(TRL, then this project); speed ratios are taken within a round, and their median reported.

TRL is not a dependency of this project; install it into the environment for the benchmark:

    pip install trl
    python -m benchmarks.trainer                       # vocabularies 50,257 and 151,936
    python -m benchmarks.trainer --vocab 50257 --steps 3
    python -m benchmarks.trainer --rounds 3 --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.report import machine_description, run_measurement, write_section
from core.heads import SplitModel, split_head
from core.losses import fused_amid_loss

BATCH, LENGTH = 8, 256
PHASES = ("teacher forward", "student forward", "loss", "backward", "optimizer")


def _models(vocab: int, device: torch.device, teacher_dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import GPT2Config, GPT2LMHeadModel

    def build(layers: int, width: int, seed: int) -> Any:
        torch.manual_seed(seed)
        config = GPT2Config(
            vocab_size=vocab,
            n_positions=LENGTH,  # GPT-2: 1024
            n_embd=width,  # GPT-2 small: 768
            n_layer=layers,  # GPT-2 small: 12
            n_head=4,  # GPT-2 small: 12
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        model = GPT2LMHeadModel(config)
        # transformers types `.to` through a decorator that mypy reads as taking the model.
        model.to(device)  # type: ignore[arg-type]
        return model

    teacher = build(6, 384, 0).to(teacher_dtype).eval().requires_grad_(False)
    student = build(2, 256, 1).train()
    return teacher, student


def _batch(vocab: int, device: torch.device) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (BATCH, LENGTH), generator=gen)
    labels = ids.clone()
    labels[:, : LENGTH // 2] = -100  # the prompt half carries no label
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "labels": labels.to(device),
    }


class _Clock:
    """Wall time of each phase, synchronised on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self.last = time.perf_counter()

    def lap(self, phase: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.seconds[phase] += now - self.last
        self.last = now


def _autocast(device: torch.device) -> Any:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def trl_step(teacher: Any, student: Any, batch: dict[str, torch.Tensor], clock: _Clock) -> float:
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    with torch.no_grad():
        teacher_logits = teacher(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
    clock.lap("teacher forward")
    with _autocast(clock.device):
        student_logits = student(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
    clock.lap("student forward")
    loss = GKDTrainer.generalized_jsd_loss(
        student_logits=student_logits[:, :-1, :],
        teacher_logits=teacher_logits[:, :-1, :],
        labels=batch["labels"][:, 1:],
        beta=0.0,
    )
    clock.lap("loss")
    loss.backward()
    clock.lap("backward")
    return float(loss.detach())


def project_step(
    teacher: SplitModel, student: SplitModel, batch: dict[str, torch.Tensor], clock: _Clock
) -> float:
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    with torch.inference_mode():
        teacher_hidden = teacher.hidden_states(batch["input_ids"], batch["attention_mask"])
    clock.lap("teacher forward")
    with _autocast(clock.device):
        student_hidden = student.hidden_states(batch["input_ids"], batch["attention_mask"])
    clock.lap("student forward")
    loss = fused_amid_loss(
        student_hidden[:, :-1],
        student.weight,
        teacher_hidden[:, :-1],
        teacher.weight,
        mask,
        alpha=0.0,
        lam=0.0,
        divergence="kl",
    )
    clock.lap("loss")
    loss.backward()
    clock.lap("backward")
    return float(loss.detach())


def _current_rss_bytes() -> int:
    with Path("/proc/self/statm").open() as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_side(side: str, vocab: int, steps: int, device_name: str) -> dict[str, Any]:
    """One side in this process: tokens/s, peak extra memory and the mean time of each phase."""
    device = torch.device(device_name)
    teacher_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    teacher, student = _models(vocab, device, teacher_dtype)
    batch = _batch(vocab, device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    step: Callable[..., float]
    if side == "trl":
        step, models = trl_step, (teacher, student)
    else:
        split_teacher, split_student = split_head(teacher, vocab), split_head(student, vocab)
        if not isinstance(split_teacher, SplitModel) or not isinstance(split_student, SplitModel):
            raise SystemExit(f"the heads cannot be fused: {split_teacher} / {split_student}")
        step, models = project_step, (split_teacher, split_student)

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _current_rss_bytes()
    times: list[float] = []
    phases: dict[str, float] = dict.fromkeys(PHASES, 0.0)
    loss = 0.0
    for index in range(steps + 1):
        clock = _Clock(device)
        started = clock.last
        loss = step(*models, batch, clock)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock.lap("optimizer")
        if index > 0:  # the first step warms kernels up and allocates AdamW's state
            times.append(clock.last - started)
            for phase, seconds in clock.seconds.items():
                phases[phase] += seconds / steps
    if device.type == "cuda":
        extra = torch.cuda.max_memory_allocated() - before
    else:
        extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    seconds = statistics.median(times)
    return {
        "tokens_per_s": BATCH * LENGTH / seconds,
        "seconds": seconds,
        "extra_bytes": extra,
        "phases": phases,
        "loss": loss,
    }


def _in_subprocess(
    side: str, vocab: int, steps: int, device: str, *, for_memory: bool
) -> dict[str, Any]:
    """One side in a fresh process (see `run_measurement` for what `for_memory` changes)."""
    payload = {"side": side, "vocab": vocab, "steps": steps, "device": device}
    result: dict[str, Any] = run_measurement(
        "benchmarks.trainer", "--side", payload, for_memory=for_memory
    )
    return result


# The targets set for the trainer, per vocabulary: (least tokens/s vs TRL or None, most peak
# extra memory vs TRL).
TARGETS = {50_257: (2.0, 0.3), 151_936: (None, 0.2)}


def verdict(vocab: int, speed: float, memory: float) -> str | None:
    """One line against the targets for this vocabulary (None where it has none)."""
    if vocab not in TARGETS:
        return None
    least_speed, most_memory = TARGETS[vocab]
    parts = []
    if least_speed is not None:
        met = "met" if speed >= least_speed else "missed"
        parts.append(f"{speed:.2f}× TRL's tokens/s (target ≥ {least_speed}×: {met})")
    met = "met" if memory <= most_memory else "missed"
    parts.append(f"{memory:.2f}× its peak extra memory (target ≤ {most_memory}×: {met})")
    return f"- vocabulary {vocab:,}: " + "; ".join(parts) + "."


def _phase_text(phases: dict[str, float]) -> str:
    total = sum(phases.values())
    return ", ".join(f"{name} {seconds / total:.0%}" for name, seconds in phases.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, action="append", help="repeatable")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process")
    parser.add_argument("--rounds", type=int, default=1, help="timing processes per side")
    parser.add_argument("--write", type=Path, help="write the results into this markdown file")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if importlib.util.find_spec("trl") is None:
        raise SystemExit(
            "benchmarks.trainer compares against TRL's GKDTrainer, which is not installed; "
            "it is not a dependency of this project: `pip install trl` into this environment "
            "first"
        )
    if args.side:
        side = json.loads(args.side)
        print(json.dumps(run_side(side["side"], side["vocab"], side["steps"], side["device"])))
        return

    vocabs = args.vocab or [50_257, 151_936]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    command = " ".join(["python -m benchmarks.trainer", *sys.argv[1:]])
    load_before = os.getloadavg()[0]
    rows = [
        "| device | vocabulary | trainer | tokens/s | peak extra memory | step phases | "
        "tokens/s vs TRL | memory vs TRL | loss |",
        "|---|---:|---|---:|---:|---|---:|---:|---:|",
    ]
    machines, verdicts = [], []
    for device in devices:
        machines.append(f"{device.upper()}: {machine_description(device)}")
        for vocab in vocabs:
            memory = {
                side: _in_subprocess(side, vocab, 1, device, for_memory=True)["extra_bytes"]
                for side in ("trl", "amid")
            }
            # Rounds alternate the sides, and a speed ratio is taken within a round.
            timings: dict[str, list[dict[str, Any]]] = {"trl": [], "amid": []}
            for _ in range(args.rounds):
                for side, results in timings.items():
                    results.append(
                        _in_subprocess(side, vocab, args.steps, device, for_memory=False)
                    )
            speed = {
                side: statistics.median(
                    r["tokens_per_s"] / t["tokens_per_s"]
                    for r, t in zip(results, timings["trl"], strict=True)
                )
                for side, results in timings.items()
            }
            for name, side in (("TRL GKDTrainer", "trl"), ("amid (fused)", "amid")):
                results = timings[side]
                rows.append(
                    f"| {device} | {vocab:,} | {name} | "
                    f"{statistics.median(r['tokens_per_s'] for r in results):,.0f} | "
                    f"{memory[side] / 2**20:,.0f} MiB | {_phase_text(results[0]['phases'])} | "
                    f"{speed[side]:.2f}× | {memory[side] / memory['trl']:.2f}× | "
                    f"{results[0]['loss']:.4f} |"
                )
                print(rows[-1], flush=True)
            amid_memory = memory["amid"] / memory["trl"]
            line = verdict(vocab, speed["amid"], amid_memory) if device == "cpu" else None
            if line:
                verdicts.append(line)
                print(line, flush=True)
    loads = (load_before, os.getloadavg()[0])
    print(f"1-minute load average {loads[0]:.1f} at the start, {loads[1]:.1f} at the end")
    if args.write:
        write_markdown(
            args.write,
            command,
            machines,
            rows,
            verdicts,
            steps_and_rounds=(args.steps, args.rounds),
            loads=loads,
        )
        print(f"wrote {args.write}")


def write_markdown(
    path: Path,
    command: str,
    machines: list[str],
    rows: list[str],
    verdicts: list[str],
    *,
    steps_and_rounds: tuple[int, int],
    loads: tuple[float, float],
) -> None:
    steps, rounds = steps_and_rounds
    lines = [
        "## A training step against TRL's GKDTrainer",
        "",
        f"Produced by `{command}` from the repository root (with `pip install trl`).",
        "",
        f"Teacher GPT-2-shaped 6 × 384, student 2 × 256 (tied embeddings), batch {BATCH} × "
        f"{LENGTH} tokens with the second half of each sequence the response, plain KD "
        "(TRL β = 0; here λ = 0, kl), AdamW; fp32 on CPU, bf16 on CUDA. TRL's side is the "
        "step of `GKDTrainer.compute_loss` with its `generalized_jsd_loss`, without HF "
        "Trainer's loop; ours is the trainer's fused step. Each side runs in fresh processes: "
        "peak extra memory is the growth from just before the first step in one process "
        "(peak RSS with `MALLOC_MMAP_THRESHOLD_=65536` on CPU, `max_memory_allocated` on "
        f"CUDA); tokens/s is the median of {steps} steps after a warm-up step in another, with "
        f"the default allocator. {rounds} round(s), TRL then amid in each; ratios are taken "
        "within a round and their median is shown (the phase split is the first round's). "
        f"1-minute load average {loads[0]:.1f} at the start and {loads[1]:.1f} at the end.",
        "",
        *[f"- {machine}" for machine in machines],
        "",
        *rows,
        "",
    ]
    if verdicts:
        lines += ["Against the targets (CPU):", "", *verdicts, ""]
    write_section(path, "trainer", lines)


if __name__ == "__main__":
    main()
