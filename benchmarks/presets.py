"""Each loss preset on the demo task, from the same lightly trained student, against plain KD.

The paper starts from students that already know the task a little (fine-tuned first); the
demo student is untrained. So this script first gives it `--warmup-steps` of plain KD, then
distils that same student with every preset for `--steps` steps (same seed, data order,
learning rate and batch), and measures each result the same way: ROUGE-L of greedy answers on
the held-out prompts, the teacher-student KL(p‖q) on the held-out responses (one yardstick for
every preset; each preset's own loss is not comparable across presets), and how many answers
came out empty. KD, run in the same process, is the baseline of every ratio.

    python -m benchmarks.presets                    # print the table (a few CPU minutes)
    python -m benchmarks.presets --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.report import machine_description, write_section
from core.callbacks import Callback, EvalReport
from core.demo import DATA_FILE, STUDENT_DIR, TEACHER_DIR
from core.presets import PRESETS
from core.settings import DistillSettings
from core.train import distill

EVAL_SIZE = 64
LEARNING_RATE = 3e-3  # as the demo: a tiny model learns the task in a few hundred steps
# (label, settings on top of the preset): every preset alone, and the demo's recipe.
VARIANTS: list[tuple[str, dict[str, Any]]] = [
    *[(name, {"preset": name}) for name in PRESETS],
    ("amid + ce 0.5", {"preset": "amid", "ce_weight": 0.5}),
]


@dataclass(frozen=True)
class Measure:
    rouge_l: float
    teacher_kl: float
    empty: int


class _FirstEval(Callback):
    """Keeps the first evaluation and stops the run right after its first step."""

    def __init__(self) -> None:
        self.report: EvalReport | None = None

    def on_eval(self, report: EvalReport) -> None:
        self.report = self.report or report

    def should_stop(self) -> bool:
        return self.report is not None


def run_settings(student: Path, **overrides: Any) -> DistillSettings:
    values: dict[str, Any] = {
        "teacher": str(TEACHER_DIR),
        "student": str(student),
        "dataset": {"source": str(DATA_FILE), "eval_size": EVAL_SIZE},
        "batch_size": 16,
        "learning_rate": LEARNING_RATE,
        "warmup_steps": 10,
        "max_prompt_length": 96,
        "max_length": 128,
        "seed": 0,
        "eval_interval": 0,
        "eval_max_samples": EVAL_SIZE,
        "generation": {"max_new_tokens": 24, "do_sample": False, "num_samples_kept": EVAL_SIZE},
    }
    values.update(overrides)
    return DistillSettings.model_validate(values)


def measure(student: Path, scratch: Path) -> Measure:
    """ROUGE-L, KL(p‖q) and empty answers of `student` on the held-out split.

    The engine's own evaluation does it: a `kd` run evaluates before its first step (its eval
    loss is then exactly KL(p‖q) per response token) and is stopped after that step.
    """
    probe = _FirstEval()
    settings = run_settings(student, preset="kd", max_steps=1, eval_at_start=True)
    distill(settings, scratch, [probe])
    assert probe.report is not None, "the probe run did not evaluate"
    return Measure(
        rouge_l=probe.report.metrics["eval/rouge_l"],
        teacher_kl=probe.report.metrics["eval/loss"],
        empty=sum(not s["generated"].strip() for s in probe.report.samples),
    )


def benchmark(warmup_steps: int, steps: int, work: Path) -> tuple[Measure, list[list[str]]]:
    warm = distill(
        run_settings(STUDENT_DIR, preset="kd", max_steps=warmup_steps), work / "warm"
    ).final_path
    assert warm is not None
    start = measure(warm, work / "probe-warm")
    print(f"start: {start}", flush=True)
    results: dict[str, Measure] = {}
    for label, overrides in VARIANTS:
        done = distill(run_settings(warm, max_steps=steps, **overrides), work / label)
        assert done.final_path is not None
        results[label] = measure(done.final_path, work / f"probe-{label}")
        print(f"{label}: {results[label]}", flush=True)
    kd = results["kd"]
    rows = [
        [
            label,
            f"{m.rouge_l:.3f}",
            f"{m.rouge_l / kd.rouge_l:.2f}" if kd.rouge_l else "n/a",
            f"{m.teacher_kl:.3f}",
            f"{m.teacher_kl / kd.teacher_kl:.2f}",
            f"{m.empty} / {EVAL_SIZE}",
        ]
        for label, m in results.items()
    ]
    return start, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup-steps", type=int, default=100, help="plain KD steps first")
    parser.add_argument("--steps", type=int, default=300, help="steps of each preset")
    parser.add_argument("--write", type=Path, help="put the table in this markdown file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        start, rows = benchmark(args.warmup_steps, args.steps, Path(scratch))
    header = [
        "variant",
        "ROUGE-L",
        "ROUGE-L / kd",
        "KL(p‖q)",
        "KL / kd",
        "empty answers",
    ]
    table = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|",
        *["| " + " | ".join(row) + " |" for row in rows],
    ]
    print("\n".join(table))
    if args.write:
        command = (
            f"python -m benchmarks.presets --warmup-steps {args.warmup_steps} --steps {args.steps}"
        )
        write_section(
            args.write,
            "presets",
            [
                "## The presets on the demo task, against plain KD",
                "",
                f"Produced by `{command} --write {args.write}` from the repository root, on "
                f"{machine_description('cpu')}.",
                "",
                f"The demo student after {args.warmup_steps} steps of plain KD (ROUGE-L "
                f"{start.rouge_l:.3f}, KL(p‖q) {start.teacher_kl:.3f}, {start.empty} of "
                f"{EVAL_SIZE} answers empty), then {args.steps} steps of each variant from that "
                f"same student: batch 16, learning rate {LEARNING_RATE:g} with 10 warm-up steps and "
                "cosine decay, "
                f"seed 0. Measured on the {EVAL_SIZE} held-out prompts: ROUGE-L F1 of greedy "
                "answers (24 new tokens at most) and the teacher-student KL(p‖q) per response "
                "token; ratios are to `kd` in the same run.",
                "",
                *table,
                "",
            ],
        )
        print(f"wrote {args.write}")


if __name__ == "__main__":
    main()
