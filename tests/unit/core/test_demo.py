"""The shipped demo kit: complete, small, and a teacher that is actually good at its tasks."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from core.data import Example, instruction_prompt, tokenize_example
from core.demo import DATA_FILE, STUDENT_DIR, TEACHER_DIR, TOKENIZER_DIR
from core.demo.build import TEACHER_ROWS, TEACHER_SEED
from core.demo.tasks import generate_rows
from core.evaluate import generate, rouge_l
from core.models import check_tokenizers
from core.settings import DistillSettings, GenerationSettings

REPO_ROOT = Path(__file__).resolve().parents[3]


def test_kit_is_complete_and_small() -> None:
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<|pad|>"
    check_tokenizers(str(TEACHER_DIR), str(STUDENT_DIR))
    assert (TEACHER_DIR / "model.safetensors").stat().st_size <= 10 * 1024 * 1024
    teacher, student = (
        AutoConfig.from_pretrained(TEACHER_DIR),
        AutoConfig.from_pretrained(STUDENT_DIR),
    )
    assert student.n_embd < teacher.n_embd and student.n_layer < teacher.n_layer
    rows = [json.loads(line) for line in DATA_FILE.read_text(encoding="utf-8").splitlines()]
    assert len(rows) >= 1000 and set(rows[0]) == {"instruction", "context", "response"}


def test_teacher_is_good_on_prompts_it_never_saw() -> None:
    seen = {(r["instruction"], r["context"]) for r in generate_rows(TEACHER_ROWS, TEACHER_SEED)}
    rows = [json.loads(line) for line in DATA_FILE.read_text(encoding="utf-8").splitlines()]
    novel = [r for r in rows if (r["instruction"], r["context"]) not in seen][:64]
    assert len(novel) == 64
    tokenizer = AutoTokenizer.from_pretrained(TEACHER_DIR)
    model = AutoModelForCausalLM.from_pretrained(TEACHER_DIR)
    examples = [
        tokenize_example(
            Example(instruction_prompt(r["instruction"], r["context"]), r["response"]),
            tokenizer,
            96,
            128,
        )
        for r in novel
    ]
    # Sampled as the paper evaluates (top_k=0, top_p=1, T=1), not only greedy.
    predictions = generate(
        model,
        tokenizer,
        examples,
        GenerationSettings(max_new_tokens=24),
        batch_size=64,
        seed=0,
        device=torch.device("cpu"),
    )
    assert rouge_l(predictions, [r["response"] for r in novel]) >= 0.6


def test_example_settings_validate_and_point_at_the_kit() -> None:
    data = yaml.safe_load((REPO_ROOT / "examples" / "demo.yaml").read_text(encoding="utf-8"))
    settings = DistillSettings.model_validate(data)
    assert settings.preset == "amid"
    assert (REPO_ROOT / settings.teacher).resolve() == TEACHER_DIR
    assert (REPO_ROOT / settings.student).resolve() == STUDENT_DIR
    assert (REPO_ROOT / settings.dataset.source).resolve() == DATA_FILE
