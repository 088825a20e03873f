"""Instruction data: read rows, turn them into prompt/response pairs, tokenize, batch.

Sources are local JSONL/JSON/Parquet files (or a directory of them) and `datasets` hub ids.
Formats live in a closed registry (`FORMATS`), picked by name or detected from a row's keys.
Only response tokens carry labels; prompts are cut from the left (the end of a prompt is what
the response answers), responses from the right. Batches are bucketed by length so padding
stays small, in an order that is a pure function of (seed, epoch): a run resumed from a
checkpoint sees exactly the batches an uninterrupted run would have.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.datafiles import FILE_SUFFIXES, allowed_roots, dataset_files, open_data_file
from core.errors import AmidError
from core.settings import DatasetSettings

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100

# The instruction template of Alpaca/Dolly fine-tuning (and of DistiLLM's data), used when a
# tokenizer has no chat template of its own.
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


class DatasetUnreadable(AmidError):
    """The dataset cannot be opened or recognised (missing file, unknown format, no rows)."""

    status_code = 422


class MalformedRow(AmidError):
    """One row cannot be used; the message names the file (or split) and line (or row)."""

    status_code = 422

    def __init__(self, location: str, reason: str):
        super().__init__(f"{location}: {reason}", field="dataset")
        self.location = location
        self.reason = reason


@dataclass(frozen=True)
class Example:
    """One prompt/response pair, the prompt already rendered with its template."""

    prompt: str
    response: str
    # True when a chat template rendered the prompt: it already holds its special tokens.
    chat_templated: bool = False


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    prompt_length: int  # tokens before the response; labels start here
    example: Example

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class LoadedData:
    train: list[TokenizedExample]
    eval: list[TokenizedExample]
    skipped: int  # malformed rows skipped (only with skip_malformed)
    format: str


# -- reading rows --------------------------------------------------------------------------------

Row = tuple[str, Any]  # (location for error messages, the raw row)


def _files(source: Path) -> list[Path]:
    if source.is_dir():
        # Every file of the directory is a regular file inside the allowed roots (core.datafiles).
        return dataset_files(source, allowed_roots())
    if source.suffix not in FILE_SUFFIXES:
        raise DatasetUnreadable(
            f"{source}: unsupported file type {source.suffix!r}; expected one of "
            f"{', '.join(FILE_SUFFIXES)}",
            field="dataset",
        )
    return dataset_files(source, allowed_roots())


def _jsonl_rows(path: Path, lines: Iterable[str]) -> Iterator[Row]:
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        location = f"{path.name} line {number}"
        try:
            yield location, json.loads(line)
        except json.JSONDecodeError as exc:
            yield location, MalformedRow(location, f"invalid JSON ({exc.msg})")


def _json_rows(path: Path, text: str) -> Iterator[Row]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        # Many ".json" datasets are JSON lines; read them as such, with line numbers.
        yield from _jsonl_rows(path, text.splitlines())
        return
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DatasetUnreadable(
            f"{path.name}: expected a JSON array of rows (or JSON lines)", field="dataset"
        )
    # Line numbers of array elements are not cheap to recover; the element index names the row.
    for index, row in enumerate(data, start=1):
        yield f"{path.name} row {index}", row


def _parquet_rows(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        with open_data_file(path) as handle:
            table = pq.read_table(handle)
    except (OSError, ValueError) as exc:
        raise DatasetUnreadable(f"{path.name}: not a readable Parquet file ({exc})") from exc
    for index, row in enumerate(table.to_pylist(), start=1):
        yield f"{path.name} row {index}", row


def _local_rows(source: Path) -> Iterator[Row]:
    for path in _files(source):
        if path.suffix == ".parquet":
            yield from _parquet_rows(path)
            continue
        try:
            with open_data_file(path, "r", encoding="utf-8") as handle:
                # JSON lines are read as they are consumed, so a check of the first rows reads
                # only those; a JSON document has to be read whole.
                if path.suffix == ".jsonl":
                    yield from _jsonl_rows(path, handle)
                else:
                    yield from _json_rows(path, handle.read())
        except (OSError, UnicodeDecodeError) as exc:
            raise DatasetUnreadable(f"{path}: cannot be read ({exc})", field="dataset") from exc


def _hub_rows(source: str, split: str, streaming: bool) -> Iterator[Row]:
    import datasets

    try:
        dataset = datasets.load_dataset(source, split=split, streaming=streaming)
    except Exception as exc:  # datasets raises many unrelated types for "cannot get it"
        raise DatasetUnreadable(
            f"dataset {source!r} (split {split!r}) cannot be loaded: {exc}", field="dataset.source"
        ) from exc
    for index, row in enumerate(dataset, start=1):
        yield f"{source}[{split}] row {index}", row


def read_rows(settings: DatasetSettings, *, streaming: bool = False) -> Iterator[Row]:
    """Raw rows with their locations; an unparsable line comes as a `MalformedRow` value.

    `streaming` reads a hub dataset row by row instead of downloading it whole first.
    """
    path = Path(settings.source).expanduser()
    if path.exists():
        return _local_rows(path)
    if path.suffix in FILE_SUFFIXES or settings.source.startswith((".", "/", "~")):
        raise DatasetUnreadable(
            f"{settings.source}: no such file or directory", field="dataset.source"
        )
    return _hub_rows(settings.source, settings.split, streaming)


# -- formats -------------------------------------------------------------------------------------


def _text(row: dict[str, Any], key: str, *, required: bool) -> str:
    value = row.get(key)
    if value is None:
        if required:
            raise ValueError(f"missing field {key!r}")
        return ""
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise ValueError(f"field {key!r} is empty")
    return value


def instruction_prompt(instruction: str, extra: str) -> str:
    if extra.strip():
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=extra)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def _dolly(row: dict[str, Any], _: PreTrainedTokenizerBase | None) -> Example:
    return Example(
        instruction_prompt(
            _text(row, "instruction", required=True), _text(row, "context", required=False)
        ),
        _text(row, "response", required=True),
    )


def _alpaca(row: dict[str, Any], _: PreTrainedTokenizerBase | None) -> Example:
    return Example(
        instruction_prompt(
            _text(row, "instruction", required=True), _text(row, "input", required=False)
        ),
        _text(row, "output", required=True),
    )


def _prompt_response(row: dict[str, Any], _: PreTrainedTokenizerBase | None) -> Example:
    return Example(_text(row, "prompt", required=True), _text(row, "response", required=True))


def _messages(row: dict[str, Any], tokenizer: PreTrainedTokenizerBase | None) -> Example:
    messages = row.get("messages")
    if not isinstance(messages, list) or len(messages) < 2:
        raise ValueError("field 'messages' must be a list of at least two turns")
    for turn in messages:
        if not (
            isinstance(turn, dict)
            and isinstance(turn.get("role"), str)
            and isinstance(turn.get("content"), str)
        ):
            raise ValueError("every turn in 'messages' needs string 'role' and 'content'")
    *history, last = messages
    if last["role"] != "assistant" or not last["content"].strip():
        raise ValueError("the last turn of 'messages' must be a non-empty assistant turn")
    if tokenizer is not None and tokenizer.chat_template:
        prompt = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        return Example(str(prompt), last["content"], chat_templated=True)
    # No chat template: the conversation so far becomes the instruction of the default template.
    if len(history) == 1:
        instruction = history[0]["content"]
    else:
        instruction = "\n".join(f"{turn['role']}: {turn['content']}" for turn in history)
    return Example(instruction_prompt(instruction, ""), last["content"])


# A format turns a row into an Example; without a tokenizer (a readability check) chat rows
# are rendered with the default template.
FormatFn = Callable[[dict[str, Any], "PreTrainedTokenizerBase | None"], Example]

# The closed registry of row formats: (function, keys that identify it for `auto`).
FORMATS: dict[str, tuple[FormatFn, frozenset[str]]] = {
    "messages": (_messages, frozenset({"messages"})),
    "alpaca": (_alpaca, frozenset({"instruction", "output"})),
    "dolly": (_dolly, frozenset({"instruction", "response"})),
    "prompt_response": (_prompt_response, frozenset({"prompt", "response"})),
}


def detect_format(row: dict[str, Any]) -> str:
    """The first format (in registry order) whose identifying keys the row has."""
    for name, (_, keys) in FORMATS.items():
        if keys <= row.keys():
            return name
    raise DatasetUnreadable(
        f"cannot detect the row format from the keys {sorted(row)}; set dataset.format "
        f"({', '.join(FORMATS)}) or map columns with dataset.fields",
        field="dataset.format",
    )


class MissingColumn(ValueError):
    """A column that `dataset.fields` renames is not in the row."""


def _renamed(row: dict[str, Any], fields: dict[str, str]) -> dict[str, Any]:
    if not fields:
        return row
    row = dict(row)
    for target, column in fields.items():
        if column not in row:
            raise MissingColumn(f"column {column!r} (dataset.fields[{target!r}]) is missing")
        row[target] = row.pop(column)
    return row


def parse_row(
    row: dict[str, Any],
    settings: DatasetSettings,
    name: str,
    tokenizer: PreTrainedTokenizerBase | None,
) -> tuple[Example, str]:
    """One raw row as an example, and the format it was read as (`auto` is detected from the
    row's keys). Raises `MissingColumn` or `ValueError` for a row that does not fit, and
    `DatasetUnreadable` when no format fits."""
    row = _renamed(row, settings.fields)
    if name == "auto":
        name = detect_format(row)
    try:
        return FORMATS[name][0](row, tokenizer), name
    except ValueError as exc:
        raise ValueError(f"{exc} (format {name})") from exc


# -- tokenizing ----------------------------------------------------------------------------------


def tokenize_example(
    example: Example, tokenizer: PreTrainedTokenizerBase, max_prompt_length: int, max_length: int
) -> TokenizedExample:
    """Prompt ids (left-truncated) + response ids + EOS (right-truncated to `max_length`)."""
    # A chat template writes its own special tokens (BOS included); a plain prompt gets the
    # tokenizer's usual ones.
    encoded = tokenizer(example.prompt, add_special_tokens=not example.chat_templated)
    prompt_ids = list(encoded["input_ids"])
    response_ids = list(tokenizer(example.response, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        response_ids.append(int(tokenizer.eos_token_id))
    prompt_ids = prompt_ids[-max_prompt_length:]
    ids = (prompt_ids + response_ids)[:max_length]
    return TokenizedExample(ids, len(prompt_ids), example)


def _split(items: list[Any], eval_size: int, seed: int) -> tuple[list[Any], list[Any]]:
    # A seeded permutation of row indices, independent of the data order seen later in training.
    order = list(range(len(items)))
    random.Random(f"split-{seed}").shuffle(order)
    eval_size = min(eval_size, max(len(items) - 1, 0))
    held = set(order[:eval_size])
    return (
        [x for i, x in enumerate(items) if i not in held],
        [x for i, x in enumerate(items) if i in held],
    )


def load_examples(
    settings: DatasetSettings,
    tokenizer: PreTrainedTokenizerBase,
    on_skip: Callable[[MalformedRow], None] | None = None,
) -> tuple[list[Example], int, str]:
    """The dataset's examples in file order, the number of rows skipped, and the format used."""
    examples: list[Example] = []
    skipped = 0
    name: str = settings.format
    for location, raw in read_rows(settings):
        try:
            if isinstance(raw, MalformedRow):
                raise raw
            if not isinstance(raw, dict):
                raise MalformedRow(location, f"expected an object, got {type(raw).__name__}")
            try:
                example, name = parse_row(raw, settings, name, tokenizer)
                examples.append(example)
            except ValueError as exc:
                raise MalformedRow(location, str(exc)) from exc
        except MalformedRow as error:
            if not settings.skip_malformed:
                raise
            skipped += 1
            if on_skip is not None:
                on_skip(error)
        if settings.max_rows is not None and len(examples) >= settings.max_rows:
            break
    if not examples:
        raise DatasetUnreadable(
            f"{settings.source}: no usable rows ({skipped} malformed rows skipped)",
            field="dataset.source",
        )
    return examples, skipped, name


def load_data(
    settings: DatasetSettings,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_prompt_length: int,
    max_length: int,
    seed: int,
    on_skip: Callable[[MalformedRow], None] | None = None,
) -> LoadedData:
    """Read, format, tokenize and split the dataset (deterministically by `seed`)."""
    examples, skipped, name = load_examples(settings, tokenizer, on_skip)
    if settings.eval_size >= len(examples):
        # Holding out every row (or all but a handful the split would quietly shrink to) would
        # leave the run training on next to nothing and still "succeed".
        raise DatasetUnreadable(
            f"eval_size {settings.eval_size} leaves nothing to train on: the dataset has "
            f"{len(examples)} usable rows",
            field="dataset.eval_size",
        )
    tokenized = [tokenize_example(e, tokenizer, max_prompt_length, max_length) for e in examples]
    train, held_out = _split(tokenized, settings.eval_size, seed)
    return LoadedData(train, held_out, skipped, name)


def check_dataset(settings: DatasetSettings, sample_rows: int = 32) -> str:
    """Cheap readability check: open the source and parse its first rows. Returns the format.

    Needs no tokenizer: chat rows are checked for shape, not rendered with a chat template. Raises `DatasetUnreadable` or
    `MalformedRow` (unless skip_malformed).
    """
    name: str = settings.format
    seen = 0
    for location, raw in read_rows(settings, streaming=True):
        if isinstance(raw, MalformedRow) or not isinstance(raw, dict):
            if settings.skip_malformed:
                continue
            raise raw if isinstance(raw, MalformedRow) else MalformedRow(location, "not an object")
        try:
            _, name = parse_row(raw, settings, name, None)
        except ValueError as exc:
            if settings.skip_malformed:
                continue
            raise MalformedRow(location, str(exc)) from exc
        seen += 1
        if seen >= sample_rows:
            break
    if seen == 0:
        raise DatasetUnreadable(f"{settings.source}: no usable rows", field="dataset.source")
    return name


# -- batching ------------------------------------------------------------------------------------


def epoch_batches(
    lengths: Sequence[int], batch_size: int, seed: int, epoch: int, pool_batches: int = 16
) -> list[list[int]]:
    """The batches (lists of example indices) of one epoch, bucketed by length.

    Shuffle, then sort by length inside pools of `pool_batches` batches and shuffle the batches
    of each pool: neighbours in a batch have similar lengths (little padding) while the order
    stays random. A pure function of its arguments, so a resumed run can rebuild it.
    """
    rng = random.Random(f"batches-{seed}-{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    pool_size = batch_size * pool_batches
    batches: list[list[int]] = []
    for start in range(0, len(order), pool_size):
        pool = sorted(order[start : start + pool_size], key=lambda i: lengths[i])
        pool_batches_list = [pool[i : i + batch_size] for i in range(0, len(pool), batch_size)]
        rng.shuffle(pool_batches_list)
        batches.extend(pool_batches_list)
    return batches


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # [B, T], right-padded
    attention_mask: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T], IGNORE_INDEX outside responses

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate(examples: Sequence[TokenizedExample], pad_id: int) -> Batch:
    """Right-padded tensors; labels only on response tokens."""
    import torch

    width = max(len(e) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        ids = torch.tensor(example.input_ids, dtype=torch.long)
        input_ids[row, : len(ids)] = ids
        attention[row, : len(ids)] = 1
        labels[row, example.prompt_length : len(ids)] = ids[example.prompt_length :]
    return Batch(input_ids, attention, labels)


@dataclass
class DataPosition:
    """Where the training stream stands: the next micro-batch is batch `index` of `epoch`."""

    epoch: int = 0
    index: int = 0


class TrainStream:
    """Endless micro-batches over the training split, resumable from a `DataPosition`."""

    def __init__(
        self,
        examples: Sequence[TokenizedExample],
        batch_size: int,
        pad_id: int,
        seed: int,
        position: DataPosition | None = None,
    ):
        self.examples = examples
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.seed = seed
        self.position = position or DataPosition()
        self._lengths = [len(e) for e in examples]
        self._batches = self._epoch(self.position.epoch)

    def _epoch(self, epoch: int) -> list[list[int]]:
        return epoch_batches(self._lengths, self.batch_size, self.seed, epoch)

    @property
    def batches_per_epoch(self) -> int:
        return len(self._batches)

    def next(self) -> Batch:
        if self.position.index >= len(self._batches):
            self.position = DataPosition(self.position.epoch + 1, 0)
            self._batches = self._epoch(self.position.epoch)
        indices = self._batches[self.position.index]
        self.position = DataPosition(self.position.epoch, self.position.index + 1)
        return collate([self.examples[i] for i in indices], self.pad_id)


def eval_batches(
    examples: Sequence[TokenizedExample], batch_size: int, pad_id: int
) -> Iterator[Batch]:
    """The eval split in length order (least padding), the same batches every time."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    for start in range(0, len(order), batch_size):
        yield collate([examples[i] for i in order[start : start + batch_size]], pad_id)
