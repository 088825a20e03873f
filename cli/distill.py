"""`amid distill run.yaml`: run a distillation locally, with a progress bar, no service needed.

Relative paths in the settings file (teacher, student, dataset, lm_dataset, eval_datasets) are
read from the current directory, as any command-line tool reads them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tqdm import tqdm

    from core.callbacks import CheckpointReport, EvalReport, RunResult, StepReport
    from core.settings import DistillSettings


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "distill",
        help="run a distillation locally from a settings file",
        description="Distil a teacher into a student on this machine from a YAML or JSON "
        "settings file. Relative paths in the file are read from the current directory.",
    )
    parser.add_argument("settings", type=Path, help="run settings (.yaml, .yml or .json)")
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="where checkpoints, metrics.jsonl and final/ go (default: runs/<settings name>)",
    )
    parser.add_argument(
        "--resume", type=Path, default=None, help="a checkpoint directory to continue from"
    )
    parser.set_defaults(handler=run)


class SettingsFileError(Exception):
    """The settings file cannot be read or does not validate; the message says where."""


def load_settings(path: Path) -> DistillSettings:
    """Read and validate a settings file; errors name the field and the reason."""
    import yaml
    from pydantic import ValidationError

    from core.settings import DistillSettings

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SettingsFileError(f"{path}: cannot be read ({exc.strerror})") from exc
    try:
        data: Any = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise SettingsFileError(
            f"{path}: not valid {path.suffix.lstrip('.') or 'YAML'}: {exc}"
        ) from exc
    if not isinstance(data, dict):
        raise SettingsFileError(f"{path}: expected a mapping of settings at the top level")
    try:
        return DistillSettings.model_validate(data)
    except ValidationError as exc:
        lines = [
            f"  {'.'.join(str(p) for p in error['loc']) or '(settings)'}: {_reason(error)}"
            for error in exc.errors()
        ]
        raise SettingsFileError(f"{path}: invalid settings\n" + "\n".join(lines)) from exc


def _reason(error: Any) -> str:
    from core.settings import DistillSettings
    from core.suggest import unknown_field

    if error["type"] == "extra_forbidden":
        return unknown_field(str(error["loc"][-1]), DistillSettings)
    return str(error["msg"])


def _progress_callback() -> Any:
    from tqdm import tqdm

    from core.callbacks import Callback

    class Progress(Callback):
        """A tqdm bar over optimizer steps; eval and checkpoint lines printed above it."""

        def __init__(self) -> None:
            self.bar: tqdm[Any] | None = None

        def on_start(self, info: Any) -> None:
            self.bar = tqdm(
                total=info.total_steps, initial=info.start_step, unit="step", dynamic_ncols=True
            )

        def on_event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
            tqdm.write(f"[{kind}] {message}")

        def on_step(self, report: StepReport) -> None:
            if self.bar is not None:
                self.bar.update(report.step - self.bar.n)
                # An init (SFT) phase reports init/loss, the distillation train/loss.
                phase = "init" if "init/loss" in report.metrics else "train"
                self.bar.set_postfix(
                    loss=f"{report.metrics[f'{phase}/loss']:.4f}",
                    lr=f"{report.metrics[f'{phase}/lr']:.2e}",
                )

        def on_eval(self, report: EvalReport) -> None:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in report.metrics.items())
            tqdm.write(f"[eval] step {report.step}: {shown}")

        def on_checkpoint(self, report: CheckpointReport) -> None:
            best = " (best so far)" if report.is_best else ""
            tqdm.write(f"[checkpoint] step {report.step}: {report.path}{best}")

        def on_end(self, result: RunResult) -> None:
            if self.bar is not None:
                self.bar.close()

    return Progress()


def _summary(result: RunResult, output: Path, settings: DistillSettings) -> str:
    lines = [f"{result.status} after {result.steps_done} steps; output in {output}"]
    for name in ("eval/rouge_l", "eval/loss", "train/loss"):
        if name in result.final_metrics:
            lines.append(f"  {name}: {result.final_metrics[name]:.4f}")
    if result.best_step is not None:
        metric = settings.select_best or "eval/rouge_l"
        kept = "the final student" if settings.select_best else "best checkpoint"
        lines.append(f"  {kept} ({metric}): step {result.best_step}")
    if result.final_path is not None:
        lines.append(f"  student: {result.final_path}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.settings)
    except SettingsFileError as exc:
        print(f"amid distill: {exc}", file=sys.stderr)
        return 2

    from transformers.utils import logging as hf_logging

    from core.errors import AmidError
    from core.train import distill

    # The bar above is the progress; per-file load/save bars from the model library are noise.
    hf_logging.disable_progress_bar()
    output: Path = args.output or Path("runs") / args.settings.stem
    try:
        result = distill(settings, output, [_progress_callback()], resume_from=args.resume)
    except AmidError as exc:
        where = f" ({exc.field})" if exc.field else ""
        print(f"amid distill: {exc.code}{where}: {exc.message}", file=sys.stderr)
        return 2 if exc.status_code < 500 else 1
    except KeyboardInterrupt:
        print("amid distill: interrupted", file=sys.stderr)
        return 130
    print(_summary(result, output, settings))
    return 0
