"""ROUGE-L scoring and batched generation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from core.data import Example, tokenize_example
from core.evaluate import generate, rouge_l
from core.settings import GenerationSettings


def test_rouge_l_matches_identical_and_disjoint_texts() -> None:
    assert rouge_l(["The capital of France is Paris."], ["The capital of France is Paris."]) == 1.0
    assert rouge_l(["cold"], ["hot"]) == 0.0
    assert rouge_l([], []) == 0.0


def test_rouge_l_stems_and_ignores_case_and_punctuation() -> None:
    assert rouge_l(["Cats are running!"], ["cat are run"]) == 1.0


def test_rouge_l_scores_non_latin_scripts() -> None:
    # rouge_score's own tokenizer keeps only [a-z0-9]: both texts would be empty and score 0.
    assert rouge_l(["Столица Франции Париж"], ["Столица Франции Париж"]) == 1.0
    assert 0.0 < rouge_l(["Столица Франции Париж"], ["Столица Германии Берлин"]) < 1.0


def test_rouge_l_refuses_unpaired_lists() -> None:
    with pytest.raises(ValueError, match="predictions"):
        rouge_l(["a"], [])


def test_batched_greedy_generation_equals_one_by_one(
    save_model: Callable[..., Path], demo_tokenizer: PreTrainedTokenizerBase
) -> None:
    # Prompts of different lengths share a left-padded batch: padding must not change outputs.
    model = AutoModelForCausalLM.from_pretrained(save_model("model", seed=3))
    prompts = ["What is the capital of France?", "Add two and three.", "Hi"]
    examples = [tokenize_example(Example(p, "x"), demo_tokenizer, 32, 64) for p in prompts]
    settings = GenerationSettings(max_new_tokens=8, do_sample=False)
    cpu = torch.device("cpu")
    together = generate(model, demo_tokenizer, examples, settings, batch_size=3, seed=0, device=cpu)
    alone = [
        generate(model, demo_tokenizer, [e], settings, batch_size=1, seed=0, device=cpu)[0]
        for e in examples
    ]
    assert together == alone
    assert all(text for text in together)


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(
    save_model: Callable[..., Path], demo_tokenizer: PreTrainedTokenizerBase
) -> None:
    model = AutoModelForCausalLM.from_pretrained(save_model("model", seed=3))
    examples = [tokenize_example(Example("Hello", "x"), demo_tokenizer, 32, 64)] * 4
    settings = GenerationSettings(max_new_tokens=8, do_sample=True)
    cpu = torch.device("cpu")
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = generate(model, demo_tokenizer, examples, settings, batch_size=4, seed=7, device=cpu)
    assert torch.equal(torch.rand(1), expected_next)
    assert (
        generate(model, demo_tokenizer, examples, settings, batch_size=4, seed=7, device=cpu)
        == first
    )
    assert len(set(first)) > 1  # really sampled: the same prompt gives different responses
