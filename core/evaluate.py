"""Evaluation: generate responses for held-out prompts, score them with ROUGE-L, and measure the
distillation loss on held-out data.

ROUGE-L F1 follows the paper's (and DistiLLM's) metric through `rouge_score` with stemming, but
with our own word splitter: `rouge_score`'s default tokenizer keeps only [a-z0-9] and so scores
any non-Latin-script response as empty.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from core.data import IGNORE_INDEX, Batch, TokenizedExample, eval_batches

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from core.settings import GenerationSettings

_WORD = re.compile(r"\w+", re.UNICODE)


class _WordTokenizer:
    """Lower-cased Unicode words, Porter-stemmed like rouge_score's default (words > 3 chars)."""

    def __init__(self) -> None:
        from nltk.stem import porter

        self._stemmer = porter.PorterStemmer()

    def tokenize(self, text: str) -> list[str]:
        words = _WORD.findall(text.lower())
        return [self._stemmer.stem(w) if len(w) > 3 else w for w in words]


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 of predictions against references (0 for an empty list)."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError("predictions: must be as many as references")
    if not predictions:
        return 0.0
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_WordTokenizer())
    scores = [
        scorer.score(ref, pred)["rougeL"].fmeasure
        for pred, ref in zip(predictions, references, strict=True)
    ]
    return float(sum(scores) / len(scores))


@torch.inference_mode()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[TokenizedExample],
    settings: GenerationSettings,
    *,
    batch_size: int,
    seed: int,
    device: torch.device,
) -> list[str]:
    """Responses to the examples' prompts, in the examples' order.

    Sampling draws from a generator forked off the global RNG and seeded here, so evaluating
    never shifts the random stream that training (dropout) uses: a resumed run matches an
    uninterrupted one whether or not it evaluated at the same steps.
    """
    from transformers import GenerationConfig

    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    config = GenerationConfig(
        max_new_tokens=settings.max_new_tokens,
        do_sample=settings.do_sample,
        temperature=settings.temperature if settings.do_sample else None,
        top_k=settings.top_k if settings.do_sample else None,
        top_p=settings.top_p if settings.do_sample else None,
        pad_token_id=pad_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    was_training = model.training
    model.eval()
    outputs: list[str] = [""] * len(examples)
    # Similar prompt lengths together: little left-padding per batch.
    order = sorted(range(len(examples)), key=lambda i: examples[i].prompt_length)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for start in range(0, len(order), batch_size):
            chunk = [examples[i] for i in order[start : start + batch_size]]
            prompts = [e.input_ids[: e.prompt_length] for e in chunk]
            width = max(len(p) for p in prompts)
            # Left padding: every prompt ends where generation begins.
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, prompt in enumerate(prompts):
                input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
                attention[row, width - len(prompt) :] = 1
            generated: torch.Tensor = model.generate(  # type: ignore[operator]
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                generation_config=config,
            )
            for row, index in enumerate(order[start : start + batch_size]):
                text = tokenizer.decode(generated[row, width:].tolist(), skip_special_tokens=True)
                outputs[index] = str(text).strip()
    model.train(was_training)
    return outputs


@dataclass(frozen=True)
class EvalOutcome:
    metrics: dict[str, float]
    samples: list[dict[str, str]]


LossFn = Callable[[Batch], tuple[torch.Tensor, int]]  # (mean loss over tokens, token count)


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[TokenizedExample],
    settings: GenerationSettings,
    *,
    max_samples: int,
    batch_size: int,
    seed: int,
    device: torch.device,
    loss_fn: LossFn | None = None,
) -> EvalOutcome:
    """eval/rouge_l on up to `max_samples` prompts, eval/loss over the whole eval split."""
    metrics: dict[str, float] = {}
    if not examples:
        return EvalOutcome(metrics, [])
    subset = list(examples[:max_samples])
    predictions = generate(
        model, tokenizer, subset, settings, batch_size=batch_size, seed=seed, device=device
    )
    references = [e.example.response for e in subset]
    metrics["eval/rouge_l"] = rouge_l(predictions, references)
    if loss_fn is not None:
        pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        total, tokens = 0.0, 0
        for batch in eval_batches(examples, batch_size, pad_id):
            loss, count = loss_fn(batch)
            total += float(loss) * count
            tokens += count
        metrics["eval/loss"] = total / max(tokens, 1)
    samples = [
        {"prompt": e.example.prompt, "reference": ref, "generated": pred}
        for e, ref, pred in zip(
            subset[: settings.num_samples_kept], references, predictions, strict=False
        )
    ]
    return EvalOutcome(metrics, samples)


def response_token_count(batch: Batch) -> int:
    """Tokens that carry a label once shifted for next-token prediction."""
    return int((batch.labels[:, 1:] != IGNORE_INDEX).sum())
