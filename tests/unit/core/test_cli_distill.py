"""`amid distill` end to end, in a subprocess, as a user runs it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from core.demo import DATA_FILE


def _amid(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    executable = shutil.which("amid", path=str(Path(sys.executable).parent))
    command = [executable] if executable else [sys.executable, "-m", "cli.main"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [*command, *args],
        check=False,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_distill_runs_a_small_config_end_to_end(
    tmp_path: Path, save_model: Callable[..., Path]
) -> None:
    save_model("teacher")
    save_model("student", n_embd=16)
    shutil.copy(DATA_FILE, tmp_path / "data.jsonl")
    # Relative paths, read from the working directory.
    config = {
        "teacher": "teacher",
        "student": "student",
        "dataset": {"source": "data.jsonl", "eval_size": 8, "max_rows": 100},
        "preset": "amid",
        "max_steps": 3,
        "batch_size": 4,
        "checkpoint_interval": 2,
        "max_prompt_length": 96,
        "max_length": 128,
        "eval_max_samples": 8,
        "generation": {"max_new_tokens": 4},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    done = _amid("distill", "run.yaml", "--output", "out", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "train/loss" in x] == [1, 2, 3]
    assert any("eval/rouge_l" in x for x in lines)
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-2", "step-3"]
    assert (out / "final" / "model.safetensors").is_file()
    assert "completed after 3 steps" in done.stdout
    assert f"student: {Path('out') / 'final'}" in done.stdout


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("teacher: t\nstudent: s\ndataset: d.jsonl\nlambda: 2\n", "lambda: Input should be less"),
        (
            "teacher: t\nstudent: s\ndataset: d.jsonl\nbatch_sise: 4\n",
            "batch_sise: unknown field; did you mean 'batch_size'?",
        ),
        ("teacher: t\ndataset: d.jsonl\n", "student: Field required"),
        ("- just\n- a list\n", "expected a mapping"),
    ],
)
def test_settings_errors_name_the_field_and_exit_2(
    tmp_path: Path, content: str, expected: str
) -> None:
    (tmp_path / "run.yaml").write_text(content, encoding="utf-8")
    done = _amid("distill", "run.yaml", cwd=tmp_path)
    assert done.returncode == 2
    assert expected in done.stderr
    assert "Traceback" not in done.stderr


def test_refused_model_pair_exits_2_without_traceback(
    tmp_path: Path, save_model: Callable[..., Path]
) -> None:
    save_model("teacher")
    config = {"teacher": "teacher", "student": "missing", "dataset": str(DATA_FILE)}
    (tmp_path / "run.json").write_text(json.dumps(config), encoding="utf-8")
    done = _amid("distill", "run.json", cwd=tmp_path)
    assert done.returncode == 2
    assert "ModelUnloadable (student)" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_distill_runs_the_recipe_an_sft_run_then_every_part(
    tmp_path: Path, save_model: Callable[..., Path]
) -> None:
    save_model("teacher")
    save_model("student", n_embd=16)
    shutil.copy(DATA_FILE, tmp_path / "data.jsonl")
    (tmp_path / "corpus.txt").write_text("\n\n".join(f"Words of text {i}." for i in range(60)))
    common = {
        "dataset": {"source": "data.jsonl", "eval_size": 8, "max_rows": 100},
        "batch_size": 4,
        "max_prompt_length": 96,
        "max_length": 128,
        "eval_max_samples": 8,
        "generation": {"max_new_tokens": 4},
    }
    sft = {"kind": "sft", "student": "student", "max_steps": 2, **common}
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(sft), encoding="utf-8")
    done = _amid("distill", "sft.yaml", "--output", "sft", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    recipe = {
        "teacher": "teacher",
        "student": "sft/final",  # the SFT run's student
        "preset": "amid-auto",
        "max_steps": 3,
        "init": {"sft_steps": 1, "learning_rate": 1e-3},
        "student_outputs": {"fraction": 0.5, "adaptive": True, "max_new_tokens": 4},
        "lm_dataset": "corpus.txt",
        "select_best": "eval/loss",
        "eval_interval": 1,
        **common,
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    done = _amid("distill", "recipe.yaml", "--output", "out", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "init/loss" in x] == [1]
    assert [x["step"] for x in lines if "init/lm_loss" in x] == [1]
    assert [x["step"] for x in lines if "train/lm_loss" in x] == [2, 3, 4]
    assert any("train/student_output_share" in x for x in lines)
    assert any("preflight/w_median" in x for x in lines)
    losses = {x["step"]: x["eval/loss"] for x in lines if "eval/loss" in x and x["step"] > 1}
    best = min(losses, key=lambda step: losses[step])
    assert f"the final student (eval/loss): step {best}" in done.stdout

    # On-policy without the adaptive schedule: every micro-batch is the student's own.
    on_policy = {
        "teacher": "teacher",
        "student": "sft/final",
        "preset": "kd",
        "max_steps": 2,
        "student_outputs": {"fraction": 1.0, "adaptive": False, "max_new_tokens": 4},
        **common,
    }
    (tmp_path / "on-policy.yaml").write_text(yaml.safe_dump(on_policy), encoding="utf-8")
    done = _amid("distill", "on-policy.yaml", "--output", "on-policy", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    metrics = (tmp_path / "on-policy" / "metrics.jsonl").read_text().splitlines()
    generated = [
        x["train/student_output_batches"]
        for x in map(json.loads, metrics)
        if "train/student_output_batches" in x
    ]
    assert generated == [1.0, 1.0]  # one micro-batch a step, both sampled by the student
