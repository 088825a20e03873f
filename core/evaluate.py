"""Evaluation: generate responses for held-out prompts, score them with ROUGE-L, and measure the
distillation loss on held-out data.

ROUGE-L F1 follows the paper's (and DistiLLM's) metric through `rouge_score` with stemming, but
with our own word splitter: `rouge_score`'s default tokenizer keeps only [a-z0-9] and so scores
any non-Latin-script response as empty.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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


def generation_config(settings: GenerationSettings, eos_id: int | None, pad_id: int) -> Any:
    """transformers' GenerationConfig for these settings (sampling knobs only when sampling)."""
    from transformers import GenerationConfig

    return GenerationConfig(
        max_new_tokens=settings.max_new_tokens,
        do_sample=settings.do_sample,
        temperature=settings.temperature if settings.do_sample else None,
        top_k=settings.top_k if settings.do_sample else None,
        top_p=settings.top_p if settings.do_sample else None,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
    )


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)


@torch.inference_mode()
def generate_ids(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    config: Any,
    *,
    batch_size: int,
    seed: int,
    device: torch.device,
) -> list[list[int]]:
    """The tokens generated after each prompt (padding after an EOS included), in prompt order.

    Sampling draws from a generator forked off the global RNG and seeded here, so generating
    never shifts the random stream that training (dropout) uses: a resumed run matches an
    uninterrupted one whether or not it generated at the same steps.
    """
    pad_id = int(config.pad_token_id)
    was_training = model.training
    model.eval()
    outputs: list[list[int]] = [[] for _ in prompts]
    # Similar prompt lengths together: little left-padding per batch.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for start in range(0, len(order), batch_size):
            chunk = [prompts[i] for i in order[start : start + batch_size]]
            width = max(len(p) for p in chunk)
            # Left padding: every prompt ends where generation begins.
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, prompt in enumerate(chunk):
                input_ids[row, width - len(prompt) :] = torch.tensor(list(prompt))
                attention[row, width - len(prompt) :] = 1
            generated: torch.Tensor = model.generate(  # type: ignore[operator]
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                generation_config=config,
            )
            for row, index in enumerate(order[start : start + batch_size]):
                outputs[index] = generated[row, width:].tolist()
    model.train(was_training)
    return outputs


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
    """Responses to the examples' prompts as text, in the examples' order."""
    ids = generate_ids(
        model,
        [e.input_ids[: e.prompt_length] for e in examples],
        generation_config(settings, tokenizer.eos_token_id, pad_token_id(tokenizer)),
        batch_size=batch_size,
        seed=seed,
        device=device,
    )
    return [str(tokenizer.decode(row, skip_special_tokens=True)).strip() for row in ids]


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of predictions equal to their reference, ignoring case and spacing."""
    if not predictions:
        return 0.0

    def norm(text: str) -> str:
        return " ".join(text.lower().split())

    hits = sum(norm(p) == norm(r) for p, r in zip(predictions, references, strict=True))
    return hits / len(predictions)


@dataclass(frozen=True)
class EvalOutcome:
    metrics: dict[str, float]
    samples: list[dict[str, str]]


# (mean over the batch's response tokens, token count)
LossFn = Callable[[Batch], tuple[torch.Tensor | float, int]]


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
    loss_fns: Mapping[str, LossFn] | None = None,
    sample_seeds: int = 1,
    greedy: bool = False,
    prefix: str = "eval",
) -> EvalOutcome:
    """ROUGE-L and exact match on up to `max_samples` prompts; each of `loss_fns` (by metric
    name, e.g. `loss`) as a per-token mean over the whole split. Names start with `prefix/`.

    Sampled generation is scored over `sample_seeds` seeds (the paper's mean over seeds):
    `rouge_l` is their mean, `rouge_l_sd` their standard deviation. `greedy` adds greedy
    decoding's `rouge_l_greedy` and `exact_match_greedy`.
    """
    metrics: dict[str, float] = {}
    if not examples:
        return EvalOutcome(metrics, [])
    subset = list(examples[:max_samples])
    references = [e.example.response for e in subset]
    runs = [
        generate(
            model, tokenizer, subset, settings, batch_size=batch_size, seed=seed + i, device=device
        )
        for i in range(sample_seeds if settings.do_sample else 1)
    ]
    scores = [rouge_l(predictions, references) for predictions in runs]
    metrics[f"{prefix}/rouge_l"] = statistics.fmean(scores)
    if len(scores) > 1:
        metrics[f"{prefix}/rouge_l_sd"] = statistics.stdev(scores)
    metrics[f"{prefix}/exact_match"] = statistics.fmean(exact_match(p, references) for p in runs)
    if greedy:
        greedy_run = generate(
            model,
            tokenizer,
            subset,
            settings.model_copy(update={"do_sample": False}),
            batch_size=batch_size,
            seed=seed,
            device=device,
        )
        metrics[f"{prefix}/rouge_l_greedy"] = rouge_l(greedy_run, references)
        metrics[f"{prefix}/exact_match_greedy"] = exact_match(greedy_run, references)
    pad_id = pad_token_id(tokenizer)
    for name, loss_fn in (loss_fns or {}).items():
        total, tokens = 0.0, 0
        for batch in eval_batches(examples, batch_size, pad_id):
            loss, count = loss_fn(batch)
            total += float(loss) * count
            tokens += count
        metrics[f"{prefix}/{name}"] = total / max(tokens, 1)
    samples = [
        {"prompt": e.example.prompt, "reference": ref, "generated": pred}
        for e, ref, pred in zip(
            subset[: settings.num_samples_kept], references, runs[0], strict=False
        )
    ]
    return EvalOutcome(metrics, samples)


def response_token_count(batch: Batch) -> int:
    """Tokens that carry a label once shifted for next-token prediction."""
    return int((batch.labels[:, 1:] != IGNORE_INDEX).sum())
