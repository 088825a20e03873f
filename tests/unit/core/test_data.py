"""Reading, formatting, tokenizing and batching instruction data."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import PreTrainedTokenizerBase

from core.data import (
    IGNORE_INDEX,
    DataPosition,
    DatasetUnreadable,
    Example,
    MalformedRow,
    TrainStream,
    check_dataset,
    collate,
    epoch_batches,
    load_data,
    tokenize_example,
)
from core.demo import DATA_FILE
from core.settings import DatasetSettings

ROWS: dict[str, list[dict[str, Any]]] = {
    "dolly": [
        {"instruction": "What color is a lemon?", "context": "", "response": "A lemon is yellow."},
        {
            "instruction": "Reverse the order of these words.",
            "context": "cat dog",
            "response": "dog cat",
        },
        {"instruction": "What is the opposite of hot?", "context": "", "response": "Cold."},
    ],
    "alpaca": [
        {"instruction": "What color is a lemon?", "input": "", "output": "A lemon is yellow."},
        {
            "instruction": "Reverse the order of these words.",
            "input": "cat dog",
            "output": "dog cat",
        },
        {"instruction": "What is the opposite of hot?", "input": "", "output": "Cold."},
    ],
    "prompt_response": [
        {"prompt": "Q: What color is a lemon?\nA:", "response": " A lemon is yellow."},
        {"prompt": "Q: Reverse: cat dog\nA:", "response": " dog cat"},
        {"prompt": "Q: Opposite of hot?\nA:", "response": " Cold."},
    ],
    "messages": [
        {
            "messages": [
                {"role": "user", "content": "What color is a lemon?"},
                {"role": "assistant", "content": "A lemon is yellow."},
            ]
        },
        {
            "messages": [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "Reverse: cat dog"},
                {"role": "assistant", "content": "dog cat"},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "Opposite of hot?"},
                {"role": "assistant", "content": "Cold."},
            ]
        },
    ],
}
RESPONSE_KEY = {"dolly": "response", "alpaca": "output", "prompt_response": "response"}


def _response(fmt: str, row: dict[str, Any]) -> str:
    if fmt == "messages":
        return str(row["messages"][-1]["content"])
    return str(row[RESPONSE_KEY[fmt]])


def write_rows(path: Path, rows: list[Any]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture
def chat_tokenizer(demo_tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    tokenizer = demo_tokenizer.__class__.from_pretrained(demo_tokenizer.name_or_path)
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m.role }}> {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant> {% endif %}"
    )
    return tokenizer


def _labelled_text(tokenizer: PreTrainedTokenizerBase, labels: list[int]) -> str:
    return tokenizer.decode([t for t in labels if t != IGNORE_INDEX])


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
@pytest.mark.parametrize("fmt", ["dolly", "alpaca", "prompt_response", "messages"])
def test_each_format_and_file_type_labels_only_the_response(
    tmp_path: Path, demo_tokenizer: PreTrainedTokenizerBase, fmt: str, suffix: str
) -> None:
    rows = ROWS[fmt]
    source = write_rows(tmp_path / f"data{suffix}", rows)
    data = load_data(
        DatasetSettings(source=str(source), format="auto", eval_size=0),
        demo_tokenizer,
        max_prompt_length=96,
        max_length=128,
        seed=0,
    )
    assert data.format == fmt
    assert len(data.train) == len(rows)
    batch = collate(data.train, pad_id=int(demo_tokenizer.pad_token_id))
    for row, example, labels in zip(rows, data.train, batch.labels.tolist(), strict=True):
        # Every labelled token is response (+ EOS); every prompt token is unlabelled.
        assert (
            _labelled_text(demo_tokenizer, labels) == _response(fmt, row) + demo_tokenizer.eos_token
        )
        assert all(t == IGNORE_INDEX for t in labels[: example.prompt_length])
        assert example.example.response == _response(fmt, row)


def test_messages_use_the_chat_template_when_the_tokenizer_has_one(
    tmp_path: Path, chat_tokenizer: PreTrainedTokenizerBase, demo_tokenizer: PreTrainedTokenizerBase
) -> None:
    source = write_rows(tmp_path / "chat.jsonl", ROWS["messages"])
    settings = DatasetSettings(source=str(source), eval_size=0)
    templated = load_data(settings, chat_tokenizer, max_prompt_length=96, max_length=128, seed=0)
    plain = load_data(settings, demo_tokenizer, max_prompt_length=96, max_length=128, seed=0)
    assert templated.train[1].example.prompt == (
        "<system> Answer briefly.\n<user> Reverse: cat dog\n<assistant> "
    )
    # Without a template the conversation goes into the default instruction template.
    assert "### Instruction:\nsystem: Answer briefly.\nuser: Reverse: cat dog" in (
        plain.train[1].example.prompt
    )


def test_fields_rename_columns(tmp_path: Path, demo_tokenizer: PreTrainedTokenizerBase) -> None:
    rows = [{"question": "Opposite of hot?", "answer": "Cold."}] * 3
    source = write_rows(tmp_path / "renamed.jsonl", rows)
    settings = DatasetSettings(
        source=str(source), fields={"prompt": "question", "response": "answer"}, eval_size=0
    )
    data = load_data(settings, demo_tokenizer, max_prompt_length=96, max_length=128, seed=0)
    assert data.format == "prompt_response"
    assert data.train[0].example == Example("Opposite of hot?", "Cold.")


def test_unrecognised_keys_name_the_format_setting(
    tmp_path: Path, demo_tokenizer: PreTrainedTokenizerBase
) -> None:
    source = write_rows(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DatasetUnreadable) as caught:
        load_data(
            DatasetSettings(source=str(source)),
            demo_tokenizer,
            max_prompt_length=8,
            max_length=16,
            seed=0,
        )
    assert caught.value.field == "dataset.format"
    assert "answer" in caught.value.message


def test_prompt_is_cut_from_the_left_and_response_from_the_right(
    demo_tokenizer: PreTrainedTokenizerBase,
) -> None:
    prompt = " ".join(f"word{i}" for i in range(40))
    response = " ".join(f"reply{i}" for i in range(40))
    full_prompt = demo_tokenizer(prompt)["input_ids"]
    full_response = demo_tokenizer(response)["input_ids"]
    tokenized = tokenize_example(Example(prompt, response), demo_tokenizer, 10, 25)
    assert tokenized.prompt_length == 10
    assert tokenized.input_ids[:10] == full_prompt[-10:]  # the end of the prompt is kept
    assert tokenized.input_ids[10:] == full_response[:15]  # the start of the response is kept
    assert len(tokenized) == 25


BAD_JSONL = (
    '{"instruction": "a", "context": "", "response": "b"}\n'
    '{"instruction": "c", "context": "", "response": "d"}\n'
    "{not json\n"
    '{"instruction": "e", "context": ""}\n'
    '{"instruction": "f", "context": "", "response": "g"}\n'
)


def test_malformed_row_is_reported_with_file_and_line(
    tmp_path: Path, demo_tokenizer: PreTrainedTokenizerBase
) -> None:
    source = tmp_path / "bad.jsonl"
    source.write_text(BAD_JSONL, encoding="utf-8")
    with pytest.raises(MalformedRow) as caught:
        load_data(
            DatasetSettings(source=str(source), eval_size=0),
            demo_tokenizer,
            max_prompt_length=8,
            max_length=16,
            seed=0,
        )
    assert "bad.jsonl line 3" in caught.value.message
    assert caught.value.status_code == 422


def test_missing_field_is_reported_with_its_line(
    tmp_path: Path, demo_tokenizer: PreTrainedTokenizerBase
) -> None:
    source = tmp_path / "bad.jsonl"
    lines = BAD_JSONL.splitlines()
    source.write_text("\n".join(lines[:2] + lines[3:]) + "\n", encoding="utf-8")
    with pytest.raises(MalformedRow, match=r"bad\.jsonl line 3: missing field 'response'"):
        check_dataset(DatasetSettings(source=str(source)))


def test_malformed_rows_are_skipped_and_counted_when_asked(
    tmp_path: Path, demo_tokenizer: PreTrainedTokenizerBase
) -> None:
    source = tmp_path / "bad.jsonl"
    source.write_text(BAD_JSONL, encoding="utf-8")
    skipped: list[MalformedRow] = []
    data = load_data(
        DatasetSettings(source=str(source), eval_size=0, skip_malformed=True),
        demo_tokenizer,
        max_prompt_length=8,
        max_length=16,
        seed=0,
        on_skip=skipped.append,
    )
    assert data.skipped == 2
    assert [e.location for e in skipped] == ["bad.jsonl line 3", "bad.jsonl line 4"]
    assert [e.example.response for e in data.train] == ["b", "d", "g"]


def test_check_dataset_refuses_missing_and_unsupported_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetUnreadable, match="no such file"):
        check_dataset(DatasetSettings(source=str(tmp_path / "absent.jsonl")))
    (tmp_path / "data.csv").write_text("a,b\n", encoding="utf-8")
    with pytest.raises(DatasetUnreadable, match="unsupported file type"):
        check_dataset(DatasetSettings(source=str(tmp_path / "data.csv")))
    assert check_dataset(DatasetSettings(source=str(DATA_FILE))) == "dolly"


def test_check_dataset_reads_only_the_rows_it_checks(tmp_path: Path) -> None:
    # Bytes that are not UTF-8 far past the sampled rows (beyond any read buffer): a check that
    # read the whole file would fail on them.
    rows = tmp_path / "rows.jsonl"
    good = b'{"instruction": "Say hi.", "response": "Hi."}\n'
    rows.write_bytes(good * 2000 + b"\xff\xfe not text\n")
    assert check_dataset(DatasetSettings(source=str(rows)), sample_rows=3) == "dolly"
    with pytest.raises(DatasetUnreadable, match="cannot be read"):
        check_dataset(DatasetSettings(source=str(rows)), sample_rows=5000)


def test_split_is_deterministic_by_seed_and_disjoint(
    demo_tokenizer: PreTrainedTokenizerBase,
) -> None:
    settings = DatasetSettings(source=str(DATA_FILE), eval_size=20, max_rows=200)

    def split(seed: int) -> tuple[list[str], list[str]]:
        data = load_data(settings, demo_tokenizer, max_prompt_length=96, max_length=128, seed=seed)
        return [e.example.prompt + e.example.response for e in data.train], [
            e.example.prompt + e.example.response for e in data.eval
        ]

    train, held = split(0)
    assert len(held) == 20 and len(train) == 180
    assert split(0) == (train, held)
    assert split(1)[1] != held


def test_length_bucketing_pads_less_than_random_batches_and_is_reproducible() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(5, 120) for _ in range(512)]
    batches = epoch_batches(lengths, batch_size=8, seed=3, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(512))  # each example once
    assert batches == epoch_batches(lengths, batch_size=8, seed=3, epoch=0)
    assert batches != epoch_batches(lengths, batch_size=8, seed=3, epoch=1)

    def padding(groups: list[list[int]]) -> int:
        return sum(max(lengths[i] for i in g) * len(g) - sum(lengths[i] for i in g) for g in groups)

    order = list(range(512))
    rng.shuffle(order)
    unbucketed = [order[i : i + 8] for i in range(0, 512, 8)]
    assert padding(batches) < padding(unbucketed) / 3


def test_stream_resumes_at_its_position(demo_tokenizer: PreTrainedTokenizerBase) -> None:
    examples = [
        tokenize_example(Example(f"prompt {i}", f"answer {i}"), demo_tokenizer, 16, 32)
        for i in range(30)
    ]
    stream = TrainStream(examples, batch_size=4, pad_id=1, seed=0)
    assert stream.batches_per_epoch == 8
    seen = [stream.next().input_ids.tolist() for _ in range(10)]  # into the second epoch
    assert stream.position == DataPosition(epoch=1, index=2)
    resumed = TrainStream(examples, batch_size=4, pad_id=1, seed=0, position=DataPosition(0, 6))
    assert [resumed.next().input_ids.tolist() for _ in range(4)] == seen[6:]


def test_unreachable_hub_dataset_is_reported_on_the_source_field(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DatasetUnreadable) as caught:
        check_dataset(DatasetSettings(source="nobody-here/no-such-dataset"))
    assert caught.value.field == "dataset.source"
    assert "nobody-here/no-such-dataset" in caught.value.message
