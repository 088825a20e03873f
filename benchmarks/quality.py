"""A paper-like study at small scale: every preset, and the recommended AMiD recipe, against KD.

On a kit (the demo kit by default; any directory laid out like it: `assets/teacher`,
`assets/student`, `data/*.jsonl`), the way the AMiD paper runs it:

1. The untrained student is fine-tuned on the references with the SFT stage (`kind: sft`);
   its best checkpoint by eval loss is the start of every method.
2. Every preset and the recommended recipe distil that same start with the same data order, at
   the SFT learning rate / 5 (the paper's ratio), for `--seeds` training seeds.
3. The same from the untrained student, for KD, `amid` and the recommended recipe, at the SFT
   learning rate: does AMiD learn from a student far from its teacher? (The recommended recipe
   refuses such a student at its pre-flight; the table says so.)

Every run is measured the same way on the held-out prompts at every `--eval-every` steps:
ROUGE-L of sampled answers (T = 1, no top-k/top-p, the paper's metric) averaged over 4 sampling
seeds, ROUGE-L of greedy answers, exact match, and the teacher–student KL(p‖q) per response
token. The table gives mean ± sd over training seeds at the last step; ratios are to KD in the
same run. The plot draws sampled ROUGE-L against steps, one line per method.

    python -m benchmarks.quality                         # the default study (see --help)
    python -m benchmarks.quality --write BENCHMARKS.md   # also write the table and the plot

It replaces the KL-only ranking of `benchmarks.presets`, which favoured KD by construction.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.report import load_average, machine_description, write_section
from core.callbacks import Callback, EvalReport
from core.demo import DEMO_DIR
from core.presets import PRESETS
from core.settings import DistillSettings
from core.train import StudentTooFar, distill

# The recipe this study recommends (README, "Presets"); `amid` stays the paper's setting.
RECOMMENDED = "amid-auto"
METRICS = ("eval/rouge_l", "eval/rouge_l_greedy", "eval/exact_match", "eval/teacher_kl")
UNTRAINED_METHODS = ("kd", "amid", RECOMMENDED)
SAMPLING_SEEDS = 4


@dataclass(frozen=True)
class Kit:
    teacher: Path
    student: Path
    data: Path

    @classmethod
    def at(cls, root: Path) -> Kit:
        files = sorted((root / "data").glob("*.jsonl"))
        if not files:
            raise SystemExit(f"{root}: no data/*.jsonl")
        return cls(root / "assets" / "teacher", root / "assets" / "student", files[0])


@dataclass
class Curve:
    """One run's evaluations: step → metrics."""

    points: dict[int, dict[str, float]] = field(default_factory=dict)


class _Evals(Callback):
    def __init__(self, curve: Curve) -> None:
        self.curve = curve

    def on_eval(self, report: EvalReport) -> None:
        self.curve.points[report.step] = dict(report.metrics)


@dataclass(frozen=True)
class Study:
    kit: Kit
    sft_steps: int
    steps: int
    untrained_steps: int
    seeds: int
    eval_every: int
    eval_size: int
    learning_rate: float
    work: Path

    def settings(self, student: Path | str, **overrides: Any) -> DistillSettings:
        values: dict[str, Any] = {
            "teacher": str(self.kit.teacher),
            "student": str(student),
            "dataset": {"source": str(self.kit.data), "eval_size": self.eval_size},
            "batch_size": 16,
            "warmup_steps": 10,
            "max_prompt_length": 96,
            "max_length": 128,
            "eval_interval": self.eval_every,
            "eval_max_samples": self.eval_size,
            "generation": {"max_new_tokens": 24, "do_sample": True, "num_samples_kept": 0},
            "evaluation": {"sample_seeds": SAMPLING_SEEDS, "greedy": True},
        }
        values.update(overrides)
        return DistillSettings.model_validate(values)

    def run(self, name: str, settings: DistillSettings, start: dict[str, float]) -> Curve:
        """One run's evaluations; step 0 is its start, measured once for every method."""
        curve = Curve({0: start})
        started = time.monotonic()
        distill(settings, self.work / name, [_Evals(curve)])
        last = curve.points[max(curve.points)]
        print(
            f"{name}: "
            + ", ".join(f"{k} {last[k]:.3f}" for k in METRICS if k in last)
            + f" ({time.monotonic() - started:.0f}s)",
            flush=True,
        )
        return curve

    def fine_tune(self) -> tuple[Path, Curve]:
        settings = self.settings(
            self.kit.student,
            kind="sft",  # the teacher stays: it only measures eval/teacher_kl here
            max_steps=self.sft_steps,
            learning_rate=self.learning_rate,
            select_best="eval/loss",
            eval_at_start=True,
        )
        curve = Curve()
        distill(settings, self.work / "sft", [_Evals(curve)])
        return self.work / "sft" / "final", curve

    def methods(
        self,
        start: Path,
        at_start: dict[str, float],
        methods: dict[str, dict[str, Any]],
        *,
        lr: float,
        steps: int,
        tag: str,
    ) -> tuple[dict[str, list[Curve]], dict[str, str]]:
        """Each method's curves over the training seeds, and the methods refused (why).

        `methods` maps a label to its loss settings (a preset, and any knob it overrides)."""
        curves: dict[str, list[Curve]] = defaultdict(list)
        refused: dict[str, str] = {}
        for seed in range(self.seeds):
            for name, loss in methods.items():
                if name in refused:
                    continue
                settings = self.settings(
                    start, **loss, max_steps=steps, learning_rate=lr, seed=seed
                )
                try:
                    curve = self.run(f"{tag}-{name}-seed{seed}", settings, at_start)
                except StudentTooFar as exc:
                    refused[name] = exc.message
                    print(f"{tag}-{name}: refused: {exc.message}", flush=True)
                    continue
                curves[name].append(curve)
        return curves, refused


def amid_variant(text: str) -> tuple[str, dict[str, Any]]:
    """`--amid ALPHA,LAMBDA`: the `amid` preset (D_AB^(0.2,0.7), teacher anchor) at other knobs."""
    try:
        alpha, lam = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ALPHA,LAMBDA, got {text!r}") from None
    return f"amid α={alpha:g} λ={lam:g}", {"preset": "amid", "alpha": alpha, "lambda": lam}


def _final(curves: list[Curve], metric: str) -> list[float]:
    return [c.points[max(c.points)][metric] for c in curves]


def _cell(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {sd:.3f}"


def table(curves: dict[str, list[Curve]], refused: dict[str, str]) -> list[str]:
    kd = statistics.fmean(_final(curves["kd"], "eval/rouge_l"))
    header = [
        "method",
        "ROUGE-L (sampled)",
        "/ kd",
        "ROUGE-L (greedy)",
        "exact match",
        "KL(p‖q)",
    ]
    rows = []
    for name, runs in curves.items():
        sampled = _final(runs, "eval/rouge_l")
        rows.append(
            [
                f"`{name}`",
                _cell(sampled),
                f"{statistics.fmean(sampled) / kd:.2f}" if kd else "n/a",
                _cell(_final(runs, "eval/rouge_l_greedy")),
                _cell(_final(runs, "eval/exact_match")),
                _cell(_final(runs, "eval/teacher_kl")),
            ]
        )
    rows += [
        [f"`{name}`", "refused: " + why.split(". ")[-1], "", "", "", ""]
        for name, why in refused.items()
    ]
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|",
        *["| " + " | ".join(row) + " |" for row in rows],
    ]


def plot(panels: list[tuple[str, dict[str, list[Curve]]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for axis, (title, curves) in zip(axes[0], panels, strict=True):
        for name, runs in curves.items():
            steps = sorted(runs[0].points)
            means = [statistics.fmean(r.points[s]["eval/rouge_l"] for r in runs) for s in steps]
            axis.plot(
                steps, means, marker="o", label=name, linewidth=2.5 if name == RECOMMENDED else 1.2
            )
        axis.set_title(title)
        axis.set_xlabel("distillation steps")
        axis.set_ylabel("ROUGE-L (sampled, mean over seeds)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kit", type=Path, default=DEMO_DIR, help="teacher, student and data")
    parser.add_argument("--sft-steps", type=int, default=200, help="SFT steps of the start")
    parser.add_argument("--steps", type=int, default=50, help="steps of each method from SFT")
    parser.add_argument("--untrained-steps", type=int, default=100, help="steps from untrained")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per method")
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--eval-size", type=int, default=32, help="held-out prompts")
    parser.add_argument("--learning-rate", type=float, default=3e-3, help="the SFT rate")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument(
        "--amid",
        type=amid_variant,
        action="append",
        default=[],
        metavar="ALPHA,LAMBDA",
        help="also distil the SFT student with `amid` at these α, λ (repeatable)",
    )
    parser.add_argument("--write", type=Path, help="put the tables in this markdown file")
    parser.add_argument("--plot", type=Path, default=Path("benchmarks/quality.png"))
    args = parser.parse_args()
    # One thread: on a shared 2-core machine, two threads that wait on each other are far slower.
    torch.set_num_threads(args.threads)
    started, load_before = time.monotonic(), load_average()
    with tempfile.TemporaryDirectory() as scratch:
        study = Study(
            Kit.at(args.kit),
            args.sft_steps,
            args.steps,
            args.untrained_steps,
            args.seeds,
            args.eval_every,
            args.eval_size,
            args.learning_rate,
            Path(scratch),
        )
        start, sft = study.fine_tune()
        # The SFT run's own evaluations: the untrained student (step 0) and the SFT student.
        untrained_point, sft_point = sft.points[0], sft.points[max(sft.points)]
        distil_lr = args.learning_rate / 5
        tuned_methods = {name: {"preset": name} for name in PRESETS} | dict(args.amid)
        tuned, tuned_refused = study.methods(
            start, sft_point, tuned_methods, lr=distil_lr, steps=args.steps, tag="sft"
        )
        untrained, untrained_refused = study.methods(
            args.kit / "assets" / "student",
            untrained_point,
            {name: {"preset": name} for name in UNTRAINED_METHODS},
            lr=args.learning_rate,
            steps=args.untrained_steps,
            tag="untrained",
        )
    minutes = (time.monotonic() - started) / 60
    tuned_table = table(tuned, tuned_refused)
    untrained_table = table(untrained, untrained_refused)
    print("\n".join([*tuned_table, "", *untrained_table]))
    print(f"wall time {minutes:.1f} min")
    if not args.write:
        return
    plot([("from the SFT student", tuned), ("from the untrained student", untrained)], args.plot)
    command = (
        f"python -m benchmarks.quality --sft-steps {args.sft_steps} --steps {args.steps} "
        f"--untrained-steps {args.untrained_steps} --seeds {args.seeds} --eval-every "
        f"{args.eval_every} --eval-size {args.eval_size}"
        + "".join(f" --amid {loss['alpha']:g},{loss['lambda']:g}" for _, loss in args.amid)
        + f" --write {args.write}"
    )
    write_section(
        args.write,
        "quality",
        [
            "## Quality: every preset and the recommended recipe against KD, as the paper measures",
            "",
            f"Produced by `{command}` from the repository root, on {machine_description('cpu')}, "
            f"in {minutes:.0f} minutes; load average (1/5/15 min) {load_before} before, "
            f"{load_average()} after.",
            "",
            f"Kit: `{args.kit.name}` (teacher `assets/teacher`, student `assets/student`). The "
            f"student is fine-tuned first ({args.sft_steps} SFT steps at {args.learning_rate:g}, "
            f"the checkpoint with the lowest eval loss: sampled ROUGE-L "
            f"{sft_point['eval/rouge_l']:.3f}, KL(p‖q) {sft_point['eval/teacher_kl']:.3f}); "
            f"every method then distils that same student for {args.steps} steps at "
            f"{distil_lr:g} (the SFT rate / 5), batch 16, cosine, clip 1.0, {args.seeds} training "
            f"seeds. Measured on {args.eval_size} held-out prompts: ROUGE-L F1 of sampled answers "
            f"(T = 1, top-k 0, top-p 1) averaged over {SAMPLING_SEEDS} sampling seeds, of greedy "
            "answers, exact match, and KL(p‖q) per response token; mean ± sd over training seeds "
            "at the last step; `/ kd` is the sampled ROUGE-L over KD's in the same run. "
            f"`{RECOMMENDED}` is the recommended recipe.",
            "",
            "### From the fine-tuned student",
            "",
            *tuned_table,
            "",
            f"### From the untrained student ({args.untrained_steps} steps at "
            f"{args.learning_rate:g})",
            "",
            *untrained_table,
            "",
            f"![sampled ROUGE-L against steps]({args.plot.as_posix()})",
            "",
        ],
    )
    print(f"wrote {args.write} and {args.plot}")


if __name__ == "__main__":
    main()
