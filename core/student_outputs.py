"""Student-generated outputs (DistiLLM's SGO), with its adaptive schedule and replay buffer.

With probability `share`, a micro-batch's responses are replaced: the student samples a
response to each of the batch's prompts (T = 1, no top-k/top-p filter, as the paper), the new
sequences go into a replay buffer, and the micro-batch trained on is drawn from that buffer.
The teacher then scores the student's own sequences in the ordinary loss, and the labels cover
the generated response tokens only (prompts and padding carry none).

`adaptive` is DistiLLM's schedule as the official AMiD runs use it (`adaptive-amid`): the share
starts at `fraction` (0 there) and rises by `increment` whenever the eval loss rises by at least
`loss_eps` between two evaluations. Every decision is drawn from a RNG seeded by (seed, step,
micro-batch), and the buffer and share are saved in the checkpoint, so a resumed run repeats an
uninterrupted one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from core.data import IGNORE_INDEX, Batch, Example, TokenizedExample, collate
from core.evaluate import generate_ids, generation_config
from core.settings import GenerationSettings

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from core.recipe_settings import StudentOutputSettings


def batch_prompts(batch: Batch) -> list[list[int]]:
    """Each row's prompt: the tokens before its first labelled token."""
    prompts = []
    for ids, labels, attention in zip(
        batch.input_ids, batch.labels, batch.attention_mask, strict=True
    ):
        labelled = (labels != IGNORE_INDEX).nonzero()
        # A row whose response was cut away entirely: its whole text is the prompt.
        start = int(labelled[0]) if len(labelled) else int(attention.sum())
        prompts.append(ids[:start].tolist())
    return prompts


def cut_at_eos(tokens: list[int], eos_id: int | None) -> list[int]:
    """The generated tokens up to and including the first EOS (the padding after it dropped)."""
    if eos_id is not None and eos_id in tokens:
        return tokens[: tokens.index(eos_id) + 1]
    return tokens


@dataclass
class ReplayBuffer:
    """The last `capacity` generated sequences; draws are uniform, by a caller's RNG."""

    capacity: int
    items: list[tuple[list[int], int]] = field(default_factory=list)  # (ids, prompt length)

    def add(self, sequences: list[tuple[list[int], int]]) -> None:
        self.items.extend(sequences)
        del self.items[: max(len(self.items) - self.capacity, 0)]

    def draw(self, count: int, rng: random.Random) -> list[tuple[list[int], int]]:
        return [self.items[rng.randrange(len(self.items))] for _ in range(count)]


class StudentOutputs:
    """Decides, per micro-batch, whether the student's own samples replace its responses."""

    def __init__(
        self,
        settings: StudentOutputSettings,
        *,
        seed: int,
        pad_id: int,
        eos_id: int | None,
        max_length: int,
        device: torch.device,
    ):
        self.settings = settings
        self.seed = seed
        self.pad_id = pad_id
        self.eos_id = eos_id
        self.max_length = max_length
        self.device = device
        self.share = settings.fraction
        self.buffer = ReplayBuffer(settings.buffer_size)
        self.last_eval_loss: float | None = None

    def generate(
        self, student: PreTrainedModel, batch: Batch, seed: int
    ) -> list[tuple[list[int], int]]:
        """The batch's prompts, each followed by a response the student samples."""
        prompts = batch_prompts(batch)
        room = self.max_length - max(len(p) for p in prompts)
        # The paper's sampling: T = 1, no top-k or top-p filter.
        sampling = GenerationSettings(
            max_new_tokens=max(min(room, self.settings.max_new_tokens or room), 1),
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
        )
        config = generation_config(sampling, self.eos_id, self.pad_id)
        generated = generate_ids(
            student, prompts, config, batch_size=len(prompts), seed=seed, device=self.device
        )
        return [
            (prompt + cut_at_eos(tokens, self.eos_id), len(prompt))
            for prompt, tokens in zip(prompts, generated, strict=True)
        ]

    def batch(self, student: PreTrainedModel, batch: Batch, step: int, micro: int) -> Batch | None:
        """The micro-batch to train on in place of `batch`, or None to keep `batch`."""
        rng = random.Random(f"student-outputs-{self.seed}-{step}-{micro}")
        if rng.random() >= self.share:
            return None
        self.buffer.add(self.generate(student, batch, seed=rng.randrange(2**31)))
        drawn = self.buffer.draw(len(batch.input_ids), rng)
        # Generated sequences have no reference text; collate reads only ids and prompt length.
        return collate(
            [TokenizedExample(ids, length, Example("", "")) for ids, length in drawn], self.pad_id
        )

    def on_eval_loss(self, loss: float) -> bool:
        """DistiLLM's adaptive rule; True when the share rose."""
        rose = (
            self.settings.adaptive
            and self.last_eval_loss is not None
            and loss - self.last_eval_loss >= self.settings.loss_eps
        )
        if rose:
            self.share = min(1.0, self.share + self.settings.increment)
        self.last_eval_loss = loss
        return bool(rose)

    def state_dict(self) -> dict[str, Any]:
        return {
            "share": self.share,
            "last_eval_loss": self.last_eval_loss,
            "buffer": [[ids, length] for ids, length in self.buffer.items],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.share = float(state["share"])
        self.last_eval_loss = state["last_eval_loss"]
        self.buffer.items = [(list(ids), int(length)) for ids, length in state["buffer"]]
