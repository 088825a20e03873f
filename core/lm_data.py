"""Pretraining text for the language-modelling term: read documents, pack them into blocks.

The official AMiD runs add next-token cross-entropy on a batch of pretraining text (OpenWebText
for GPT-2) at every step, so distillation does not erode the student's language modelling. A
source is a `.txt` file (documents separated by blank lines) or JSON lines with a `text` field.
Documents are tokenized, joined with EOS and cut into `block_size` blocks; every token of a
block is a label. Block order is a pure function of (seed, epoch), and the stream's position is
saved with a checkpoint, so a resumed run sees the blocks an uninterrupted one would.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from core.data import Batch, DataPosition, DatasetUnreadable

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

LM_SUFFIXES = (".txt", ".jsonl")
FIELD = "lm_dataset"


def read_documents(source: str | Path) -> Iterator[str]:
    """The non-empty documents of a .txt (blank-line separated) or .jsonl (`text`) file."""
    path = Path(source).expanduser()
    if path.suffix not in LM_SUFFIXES:
        raise DatasetUnreadable(
            f"{path.name}: unsupported type {path.suffix!r}; expected {' or '.join(LM_SUFFIXES)}",
            field=FIELD,
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetUnreadable(f"{path}: cannot be read ({exc})", field=FIELD) from exc
    if path.suffix == ".txt":
        yield from (block.strip() for block in text.split("\n\n") if block.strip())
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetUnreadable(
                f"{path.name} line {number}: invalid JSON ({exc.msg})", field=FIELD
            ) from exc
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise DatasetUnreadable(
                f"{path.name} line {number}: expected an object with a string `text`", field=FIELD
            )
        if row["text"].strip():
            yield row["text"]


def pack_blocks(
    source: str | Path, tokenizer: PreTrainedTokenizerBase, block_size: int
) -> list[list[int]]:
    """The documents' tokens, EOS after each, cut into full blocks of `block_size`."""
    stream: list[int] = []
    for document in read_documents(source):
        stream.extend(tokenizer(document, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            stream.append(int(tokenizer.eos_token_id))
    blocks = [
        stream[i : i + block_size] for i in range(0, len(stream) - block_size + 1, block_size)
    ]
    if not blocks:
        raise DatasetUnreadable(
            f"{Path(source).name}: fewer than {block_size} tokens of text (one block)", field=FIELD
        )
    return blocks


class LmStream:
    """Endless batches of text blocks, shuffled per epoch, resumable from a `DataPosition`."""

    def __init__(
        self,
        blocks: list[list[int]],
        batch_size: int,
        seed: int,
        position: DataPosition | None = None,
    ):
        self.blocks = blocks
        self.batch_size = batch_size
        self.seed = seed
        self.position = position or DataPosition()
        self._order = self._epoch(self.position.epoch)

    def _epoch(self, epoch: int) -> list[int]:
        order = list(range(len(self.blocks)))
        random.Random(f"lm-{self.seed}-{epoch}").shuffle(order)
        return order

    def next(self) -> Batch:
        rows = []
        for _ in range(self.batch_size):
            if self.position.index >= len(self._order):
                self.position = DataPosition(self.position.epoch + 1, 0)
                self._order = self._epoch(self.position.epoch)
            rows.append(self.blocks[self._order[self.position.index]])
            self.position = DataPosition(self.position.epoch, self.position.index + 1)
        input_ids = torch.tensor(rows, dtype=torch.long)
        return Batch(input_ids, torch.ones_like(input_ids), input_ids.clone())
