"""The demo kit: a small instruction dataset, its tokenizer, a good tiny teacher, a small student.

Everything here is shipped with the package and was made offline and deterministically by
`python -m core.demo.build`, so the demo and the tests need no download and no build step.
"""

from __future__ import annotations

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent
DATA_FILE = DEMO_DIR / "data" / "demo.jsonl"  # Dolly-format rows the demo distils on
ASSETS_DIR = DEMO_DIR / "assets"
TOKENIZER_DIR = ASSETS_DIR / "tokenizer"  # a PreTrainedTokenizerFast directory
TEACHER_DIR = ASSETS_DIR / "teacher"  # trained tiny GPT-2 (weights + tokenizer)
STUDENT_DIR = ASSETS_DIR / "student"  # smaller, untrained GPT-2 (weights + tokenizer)
