"""Fixtures of the engine tests: the shipped demo tokenizer and data, tiny GPT-2s built from
configs (the full-size value beside each shrunk one), and a settings factory.

Nothing here reaches a model hub: models are built from configs and saved to temporary
directories, the tokenizer is the one the repository ships.
"""

from __future__ import annotations

import os

# Before anything imports the hub client: a test that tried to download must fail, not wait.
os.environ["HF_HUB_OFFLINE"] = "1"

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerBase

from core.demo import DATA_FILE, TOKENIZER_DIR
from core.settings import DistillSettings


@pytest.fixture(scope="session")
def demo_tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def tiny_gpt2(
    vocab_size: int, *, n_embd: int = 32, n_layer: int = 2, dropout: float = 0.0, seed: int = 0
) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size,  # GPT-2: 50257 (here: the demo tokenizer's, or padded past it)
        n_positions=128,  # GPT-2: 1024
        n_embd=n_embd,  # GPT-2 small: 768
        n_layer=n_layer,  # GPT-2 small: 12
        n_head=2,  # GPT-2 small: 12
        resid_pdrop=dropout,  # GPT-2: 0.1
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


@pytest.fixture
def save_model(tmp_path: Path, demo_tokenizer: PreTrainedTokenizerBase) -> Callable[..., Path]:
    """Save a tiny GPT-2 with the demo tokenizer under tmp_path/<name>; return the directory."""

    def save(name: str, *, vocab_size: int | None = None, **kwargs: Any) -> Path:
        model = tiny_gpt2(vocab_size or len(demo_tokenizer), **kwargs)
        target = tmp_path / name
        model.save_pretrained(target)
        demo_tokenizer.save_pretrained(target)
        return target

    return save


@pytest.fixture
def make_settings() -> Callable[..., DistillSettings]:
    """Small, fast run settings on the demo data; keyword arguments override."""

    def make(teacher: Path, student: Path, **overrides: Any) -> DistillSettings:
        values: dict[str, Any] = {
            "teacher": str(teacher),
            "student": str(student),
            "dataset": {"source": str(DATA_FILE), "eval_size": 16, "max_rows": 400},
            "preset": "amid",
            "max_steps": 4,
            "batch_size": 8,
            "learning_rate": 3e-3,
            "max_prompt_length": 96,
            "max_length": 128,
            "eval_max_samples": 16,
            "generation": {"max_new_tokens": 12, "do_sample": False},
        }
        values.update(overrides)
        return DistillSettings.model_validate(values)

    return make
