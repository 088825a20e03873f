"""A saved student carries its model card and the prompt template it was trained with, where
`transformers` finds it: the tokenizer's chat template renders exactly the training prompts."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from core.card import StudentCard
from core.data import instruction_prompt

DEMO_STUDENT = Path(__file__).resolve().parents[3] / "core" / "demo" / "assets" / "student"
SETTINGS = {
    "teacher": "file:0123",
    "student": "models/student",
    "dataset": {"source": "data/dolly.jsonl", "format": "auto"},
    "preset": "amid",
    "alpha": -5.0,
    "lambda": 0.1,
    "max_steps": 800,
}
USER = [{"role": "user", "content": "Name the capital of France."}]


@pytest.fixture
def student(tmp_path: Path) -> Path:
    return Path(shutil.copytree(DEMO_STUDENT, tmp_path / "student"))


def _rendered(model_dir: Path) -> str:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return str(tokenizer.apply_chat_template(USER, tokenize=False, add_generation_prompt=True))


@pytest.mark.parametrize(
    ("data_format", "expected"),
    [
        ("dolly", instruction_prompt(USER[0]["content"], "")),
        ("alpaca", instruction_prompt(USER[0]["content"], "")),
        ("prompt_response", USER[0]["content"]),
    ],
)
def test_the_chat_template_renders_the_training_prompt(
    student: Path, data_format: str, expected: str
) -> None:
    StudentCard(job_id="j1", settings=SETTINGS, data_format=data_format).write(
        student, step=800, metrics={"eval/rouge_l": 0.6031}
    )
    assert _rendered(student) == expected


def test_a_chat_dataset_keeps_the_tokenizer_s_own_template(student: Path) -> None:
    own = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    tokenizer = AutoTokenizer.from_pretrained(student)
    tokenizer.chat_template = own
    tokenizer.save_pretrained(student)
    StudentCard(job_id=None, settings=SETTINGS, data_format="messages").write(
        student, step=3, metrics={}
    )
    assert _rendered(student) == f"<user>{USER[0]['content']}<assistant>"


def test_the_card_names_what_made_the_student(student: Path) -> None:
    StudentCard(job_id="4f1c", settings=SETTINGS, data_format="dolly").write(
        student, step=800, metrics={"eval/rouge_l": 0.6031, "eval/loss": 1.6555}
    )
    card = (student / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")
    for text in (
        "amid job `4f1c` at step 800",
        "teacher: `file:0123`",
        "dataset: `data/dolly.jsonl` (format dolly)",
        "preset amid, alpha -5.0, lambda 0.1",
        "| `eval/rouge_l` | 0.6031 |",
        "### Instruction:\n{{ ns.text }}",
        "AutoModelForCausalLM.from_pretrained",
    ):
        assert text in card, text
