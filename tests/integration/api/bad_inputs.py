"""Every bad input the API must refuse, as data: one table for the tests and for the reliability
report (scripts/reliability.py renders it into docs/reliability.md).

A `Case` is one request (method, path, which key, a JSON body as changes to a valid one or raw
bytes, query parameters, headers), the operator settings it is made under (`env`), and what must
come back: the status, the error class, the field the error names, and the words its `detail`
must contain (by default the field itself). Values written `${name}` are filled in from a
`World`: a directory layout (model and data roots, a directory outside them, symlinks out of
the roots, broken data files) and keys and jobs made through the API.

`run_case` sends one case and judges the answer: the status, the error shape (`error`,
`detail`, `field`), the field, the detail, never a 5xx, and that nothing stored changed (the
number of jobs, events and keys, and every row of the world's jobs).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from string import Template
from typing import Any, Literal, Protocol

import sqlalchemy as sa
from fastapi.testclient import TestClient

from store import jobs
from store.config import get_config
from store.db import get_sessionmaker, session_scope
from store.keys import create_api_key, revoke_api_key
from store.models import ApiKey, Job, JobEvent


class Answer(Protocol):
    """What the test client answers (httpx's Response, whichever httpx the client uses)."""

    @property
    def status_code(self) -> int: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def text(self) -> str: ...
    def json(self) -> Any: ...


Auth = Literal["user", "other", "admin", "none", "wrong", "revoked"]

BASE: dict[str, Any] = {"teacher": "gpt2", "student": "distilgpt2", "dataset": "data/train.jsonl"}
WORLD_IDEMPOTENCY_KEY = "world-1"
MISSING_JOB = "0" * 32


def raw_body(fragment: str) -> bytes:
    """The valid base body with `fragment` (JSON text, e.g. `"alpha": NaN`) added at the end."""
    return (json.dumps(BASE)[:-1] + ", " + fragment + "}").encode()


@dataclass(frozen=True)
class Case:
    name: str
    group: str
    status: int
    field: str | None
    error: str | None = None
    method: str = "POST"
    path: str = "/v1/jobs"
    auth: Auth = "user"
    change: Mapping[str, Any] | None = None
    drop: tuple[str, ...] = ()
    raw: bytes | None = None
    params: Mapping[str, str] | None = None
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # Operator settings under which the very same request is accepted (201): the setting, not
    # the body, refused it. None where no setting would.
    allowed_with: Mapping[str, str] | None = None
    mentions: tuple[str, ...] | None = None
    # A 200 answer that must not show these jobs, and must show those.
    hidden: tuple[str, ...] = ()
    shown: tuple[str, ...] = ()

    @property
    def words(self) -> tuple[str, ...]:
        """What the detail must contain: the field, unless the case says otherwise."""
        if self.mentions is not None:
            return self.mentions
        return (self.field,) if self.field else ()

    def body(self) -> dict[str, Any] | None:
        if self.raw is not None or (self.method, self.path) != ("POST", "/v1/jobs"):
            return None
        body = {**BASE, **(self.change or {})}
        return {key: value for key, value in body.items() if key not in self.drop}

    def summary(self, limit: int = 90) -> str:
        """The request in one short line, placeholders left as they are."""
        parts = [self.method, self.path]
        if self.params:
            parts[-1] += "?" + "&".join(f"{key}={value}" for key, value in self.params.items())
        if self.raw is not None:
            text = self.raw.decode("utf-8", "backslashreplace")
            base = json.dumps(BASE)[:-1] + ", "
            shown = "{…, " + text[len(base) :] if text.startswith(base) else text
            parts.append(f"raw {shown!r}" if len(shown) <= limit else f"raw {len(self.raw)} bytes")
        elif self.change or self.drop:
            if self.change:
                parts.append(json.dumps(self.change, ensure_ascii=True))
            if self.drop:
                parts.append("without " + ", ".join(self.drop))
        if self.auth != "user":
            parts.append(f"[key: {self.auth}]")
        for name, value in self.headers.items():
            parts.append(f"[{name}: {value}]")
        for name, value in self.env.items():
            parts.append(f"[{name}={value}]")
        line = " ".join(parts)
        return line if len(line) <= limit * 2 else line[: limit * 2 - 1] + "…"


def _schema(name: str, group: str, field: str, change: Mapping[str, Any], **kw: Any) -> Case:
    return Case(name, group, 422, field, "ValidationError", change=change, **kw)


def _refused(name: str, group: str, field: str, **kw: Any) -> Case:
    return Case(name, group, 422, field, "SettingRefused", **kw)


NAN_AND_INFINITY = [
    Case(n, "loss", 422, f, "ValidationError", raw=raw_body(text), mentions=(f, "finite"))
    for n, f, text in [
        ("alpha is NaN", "alpha", '"alpha": NaN'),
        ("alpha is Infinity", "alpha", '"alpha": Infinity'),
        ("alpha is -Infinity", "alpha", '"alpha": -Infinity'),
        ("alpha overflows a double", "alpha", '"alpha": 1e400'),
        ("lambda is NaN", "lambda", '"lambda": NaN'),
        ("lambda is Infinity", "lambda", '"lambda": Infinity'),
        (
            "alpha schedule starts at NaN",
            "alpha_schedule.start",
            '"alpha_schedule": {"start": NaN}',
        ),
        ("ab_beta is Infinity", "ab_beta", '"ab_beta": Infinity'),
        ("learning rate is NaN", "learning_rate", '"learning_rate": NaN'),
    ]
]

LOSS = [
    _schema("lambda above 1", "loss", "lambda", {"lambda": 1.5}),
    _schema("lambda below 0", "loss", "lambda", {"lambda": -0.1}),
    _schema(
        "lambda 1 with anchor teacher: loss identically zero",
        "loss",
        "lambda",
        {"lambda": 1.0, "anchor": "teacher"},
        mentions=("lambda", "identically zero"),
    ),
    _schema(
        "lambda 0 with anchor student: loss identically zero",
        "loss",
        "lambda",
        {"lambda": 0.0, "anchor": "student"},
        mentions=("lambda", "identically zero"),
    ),
    _schema(
        "preset srkl with lambda 0: loss identically zero",
        "loss",
        "lambda",
        {"preset": "srkl", "lambda": 0.0},
        mentions=("lambda", "identically zero"),
    ),
    _schema(
        "lambda schedule leaves [0, 1]",
        "loss",
        "lambda_schedule",
        {"lambda_schedule": {"kind": "linear", "start": 0.1, "end": 1.5}},
    ),
    _schema("unknown divergence", "loss", "divergence", {"divergence": "hellinger"}),
    _schema("unknown anchor", "loss", "anchor", {"anchor": "both"}),
    _schema("unknown preset", "loss", "preset", {"preset": "distillm-3"}),
    _schema(
        "unknown schedule kind",
        "loss",
        "alpha_schedule.kind",
        {"alpha_schedule": {"kind": "zigzag", "start": 1.0}},
    ),
]

TWO = [{"alpha": -5.0}, {"alpha": 1.0}]
SWEEP = [
    _schema(
        "sweep entry sets a key that is not a loss knob",
        "sweep",
        "sweep.1.batch_size",
        {"sweep": [{"alpha": 0.5}, {"batch_size": 2}]},
    ),
    _schema("empty sweep", "sweep", "sweep", {"sweep": []}, mentions=("sweep", "at least 2")),
    _schema("sweep of one student", "sweep", "sweep", {"sweep": [{"alpha": 0.5}]}),
    _schema(
        "sweep of nine students",
        "sweep",
        "sweep",
        {"sweep": [{"alpha": float(a)} for a in range(9)]},
        mentions=("sweep", "at most 8"),
    ),
    _schema("sweep that is not a list", "sweep", "sweep", {"sweep": {"alpha": 0.5}}),
    _schema(
        "sweep entry with an unknown preset",
        "sweep",
        "sweep.1.preset",
        {"sweep": [{}, {"preset": "x"}]},
    ),
    _schema(
        "sweep entry with lambda 1: loss identically zero",
        "sweep",
        "sweep.0.lambda",
        {"sweep": [{"lambda": 1.0}, {}]},
        mentions=("sweep.0.lambda", "identically zero"),
    ),
    _schema(
        "sweep entry with a preset that schedules alpha",
        "sweep",
        "sweep.0.preset",
        {"sweep": [{"preset": "amid-auto"}, {}]},
    ),
    _schema(
        "sweep with student-generated outputs",
        "sweep",
        "student_outputs",
        {"sweep": TWO, "student_outputs": {"fraction": 0.5}},
        mentions=("student_outputs", "share batches"),
    ),
    _schema("sweep of an sft job", "sweep", "sweep", {"sweep": TWO, "kind": "sft"}),
    _schema(
        "sweep with an alpha schedule",
        "sweep",
        "alpha_schedule",
        {"sweep": TWO, "alpha_schedule": {"kind": "linear", "start": 1.0, "end": -1.0}},
    ),
]

SIZES = [
    _schema("max_steps 0", "sizes", "max_steps", {"max_steps": 0}),
    _schema("max_steps negative", "sizes", "max_steps", {"max_steps": -1}),
    _refused(
        "max_steps above AMID_MAX_STEPS_LIMIT",
        "sizes",
        "max_steps",
        change={"max_steps": 10_000_001},
        mentions=("max_steps", "limit"),
        allowed_with={"AMID_MAX_STEPS_LIMIT": "10000001"},
    ),
    _refused(
        "max_steps beyond 64 bits",
        "sizes",
        "max_steps",
        raw=raw_body('"max_steps": 99999999999999999999999'),
        mentions=("max_steps", "limit"),
    ),
    _schema("batch_size 0", "sizes", "batch_size", {"batch_size": 0}),
    _schema("batch_size negative", "sizes", "batch_size", {"batch_size": -8}),
    _schema("batch_size absurd", "sizes", "batch_size", {"batch_size": 1_000_000}),
    _schema("grad_accum_steps 0", "sizes", "grad_accum_steps", {"grad_accum_steps": 0}),
    _schema("epochs 0", "sizes", "epochs", {"epochs": 0}),
    _schema("epochs absurd", "sizes", "epochs", {"epochs": 1e300}),
    _schema("max_length 0", "sizes", "max_length", {"max_length": 0}),
    _refused(
        "max_length above AMID_MAX_LENGTH_LIMIT",
        "sizes",
        "max_length",
        change={"max_length": 100_000},
        mentions=("max_length", "limit"),
        allowed_with={"AMID_MAX_LENGTH_LIMIT": "100000"},
    ),
    _schema(
        "max_prompt_length not below max_length",
        "sizes",
        "max_prompt_length",
        {"max_prompt_length": 512, "max_length": 512},
    ),
    _schema(
        "max_new_tokens 0",
        "sizes",
        "generation.max_new_tokens",
        {"generation": {"max_new_tokens": 0}},
    ),
    _refused(
        "max_new_tokens above AMID_MAX_LENGTH_LIMIT",
        "sizes",
        "generation.max_new_tokens",
        change={"generation": {"max_new_tokens": 100_000}},
        mentions=("generation.max_new_tokens", "limit"),
        allowed_with={"AMID_MAX_LENGTH_LIMIT": "100000"},
    ),
    _schema("learning_rate 0", "sizes", "learning_rate", {"learning_rate": 0}),
    _schema("learning_rate negative", "sizes", "learning_rate", {"learning_rate": -1e-4}),
    _schema("top_p above 1", "sizes", "generation.top_p", {"generation": {"top_p": 2}}),
    _schema(
        "max_rows 0",
        "sizes",
        "dataset.max_rows",
        {"dataset": {"source": "data/train.jsonl", "max_rows": 0}},
    ),
    _schema(
        "eval_size negative",
        "sizes",
        "dataset.eval_size",
        {"dataset": {"source": "data/train.jsonl", "eval_size": -1}},
    ),
    _schema("seed beyond 64 bits", "sizes", "seed", {"seed": 2**64}),
]

# Finite, yet past what the arithmetic survives: each made a job "succeed" with NaN weights,
# fail late, or train at nothing, before these bounds.
NUMERIC_BOUNDS = [
    _schema(n, "numeric bounds", f, c)
    for n, f, c in [
        ("alpha 1e308", "alpha", {"alpha": 1e308}),
        (
            "alpha schedule end 1e308",
            "alpha_schedule.end",
            {"alpha_schedule": {"start": 1.0, "end": 1e308}},
        ),
        ("ce_weight 1e308", "ce_weight", {"ce_weight": 1e308}),
        ("weight_decay 1e300", "weight_decay", {"weight_decay": 1e300}),
        ("learning_rate 1e300", "learning_rate", {"learning_rate": 1e300}),
        ("ab_beta 1e300", "ab_beta", {"ab_beta": 1e300}),
        ("grad_accum_steps 1e9", "grad_accum_steps", {"grad_accum_steps": 1_000_000_000}),
        ("warmup_steps 1e18", "warmup_steps", {"warmup_steps": 10**18}),
        ("warmup_steps not below max_steps", "warmup_steps", {"warmup_steps": 10, "max_steps": 10}),
        ("temperature 1e-320", "generation.temperature", {"generation": {"temperature": 1e-320}}),
        ("max_nonfinite_steps 0", "max_nonfinite_steps", {"max_nonfinite_steps": 0}),
    ]
]

SHAPE_CHANGES: list[tuple[str, str, Mapping[str, Any]]] = [
    ("unknown top-level field", "typo_field", {"typo_field": 1}),
    (
        "unknown field in dataset",
        "dataset.colour",
        {"dataset": {"source": "data/train.jsonl", "colour": 1}},
    ),
    ("unknown field in generation", "generation.beam_width", {"generation": {"beam_width": 4}}),
    ("lambda as text", "lambda", {"lambda": "half"}),
    ("batch_size as text", "batch_size", {"batch_size": "8"}),
    ("batch_size fractional", "batch_size", {"batch_size": 1.5}),
    ("boolean as a number", "eval_at_start", {"eval_at_start": 0}),
    ("teacher as a number", "teacher", {"teacher": 7}),
    ("dataset as a list", "dataset", {"dataset": ["data/train.jsonl"]}),
    ("dataset source empty", "dataset.source", {"dataset": ""}),
    (
        "unknown dataset format",
        "dataset.format",
        {"dataset": {"source": "data/train.jsonl", "format": "csv"}},
    ),
    (
        "dataset field rename not text",
        "dataset.fields.response",
        {"dataset": {"source": "data/train.jsonl", "fields": {"response": 1}}},
    ),
]
SHAPE = [
    Case(n, "fields and types", 422, f, "ValidationError", change=c) for n, f, c in SHAPE_CHANGES
] + [
    Case(f"no {name}", "fields and types", 422, name, "ValidationError", drop=(name,))
    for name in ("teacher", "student", "dataset")
]

JSON = "application/json"
BODY = [
    Case(n, "the body", 422, "body", "ValidationError", raw=r, headers=h, mentions=("body", *m))
    for n, r, h, m in [
        ("malformed JSON", b'{"teacher": "gpt2",', {}, ("malformed",)),
        ("empty body", b"", {"content-type": JSON}, ()),
        ("body is a list", b"[1, 2]", {}, ("object",)),
        ("body is null", b"null", {}, ("object",)),
        ("body is not UTF-8", b'{"teacher": "\xff\xfe"}', {}, ("malformed",)),
        (
            "body nested too deeply",
            b'{"a": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",
            {},
            ("malformed",),
        ),
        (
            "JSON sent as text/plain",
            json.dumps(BASE).encode(),
            {"content-type": "text/plain"},
            ("application/json",),
        ),
    ]
] + [
    Case(
        "body over AMID_MAX_BODY_BYTES",
        "the body",
        413,
        "body",
        "RequestTooLarge",
        raw=json.dumps(BASE).encode() + b" " * 8192,
        env={"AMID_MAX_BODY_BYTES": "4096"},
        mentions=("body", "4096"),
        allowed_with={},
    ),
    Case(
        "malformed Idempotency-Key",
        "the body",
        422,
        "Idempotency-Key",
        "InvalidIdempotencyKey",
        headers={"Idempotency-Key": "has space"},
    ),
    Case(
        "Idempotency-Key reused with other settings",
        "the body",
        409,
        "Idempotency-Key",
        "IdempotencyKeyReused",
        change={"seed": 7},
        headers={"Idempotency-Key": WORLD_IDEMPOTENCY_KEY},
    ),
    Case(
        "queue full for this key",
        "the body",
        429,
        None,
        "QueueLimitReached",
        env={"AMID_MAX_QUEUED_PER_KEY": "1"},
        mentions=("queued", "limit 1"),
        allowed_with={},
    ),
]

PATHS = [
    _refused(n, "paths and remote code", f, change=c, mentions=(f, *m))
    for n, f, c, m in [
        ("teacher outside the model roots", "teacher", {"teacher": "${outside}"}, ("outside",)),
        ("teacher a system directory", "teacher", {"teacher": "/etc"}, ("outside",)),
        (
            "student climbs out with ..",
            "student",
            {"student": "models/../../elsewhere"},
            ("outside",),
        ),
        (
            "student symlink out of the root",
            "student",
            {"student": "./models/escape"},
            ("outside",),
        ),
        ("student symlink, absolute", "student", {"student": "${models}/escape"}, ("outside",)),
        ("teacher file:// URL outside", "teacher", {"teacher": "${outside_uri}"}, ("outside",)),
        (
            "teacher file:// URL on another host",
            "teacher",
            {"teacher": "file://otherhost/models/teacher"},
            ("file://",),
        ),
        ("teacher s3:// URL", "teacher", {"teacher": "s3://bucket/model"}, ("URL",)),
        ("teacher https:// URL", "teacher", {"teacher": "https://example.com/model"}, ("URL",)),
        (
            "teacher missing under the root",
            "teacher",
            {"teacher": "models/missing"},
            ("does not exist",),
        ),
        ("teacher neither path nor hub id", "teacher", {"teacher": "a/b/c"}, ("hub id",)),
        ("teacher a hidden name", "teacher", {"teacher": ".hidden"}, ()),
        ("teacher in a home directory", "teacher", {"teacher": "~/models"}, ()),
        ("teacher with a NUL byte", "teacher", {"teacher": "gpt2\u0000"}, ("NUL",)),
        (
            "teacher in an unknown user's home",
            "teacher",
            {"teacher": "~amid-no-such-user/m"},
            ("home",),
        ),
        ("teacher a name too long for a file", "teacher", {"teacher": "a" * 300}, ("hub id",)),
        (
            "student path too long to look up",
            "student",
            {"student": "models/" + "a" * 300},
            ("looked up",),
        ),
        (
            "dataset path too long to look up",
            "dataset.source",
            {"dataset": "data/" + "a" * 300 + ".jsonl"},
            ("looked up",),
        ),
        (
            "dataset with a NUL byte",
            "dataset.source",
            {"dataset": "data/train.jsonl\u0000"},
            ("NUL",),
        ),
        (
            "dataset climbs out with ..",
            "dataset.source",
            {"dataset": "../elsewhere/secret.jsonl"},
            ("outside",),
        ),
        (
            "dataset outside, absolute",
            "dataset.source",
            {"dataset": "${outside}/secret.jsonl"},
            ("outside",),
        ),
        (
            "dataset file:// URL outside",
            "dataset.source",
            {"dataset": "${outside_uri}/secret.jsonl"},
            ("outside",),
        ),
        (
            "dataset symlink out of the root",
            "dataset.source",
            {"dataset": "data/leak.jsonl"},
            ("outside",),
        ),
        (
            "dataset under a model root",
            "dataset.source",
            {"dataset": "models/teacher"},
            ("outside",),
        ),
    ]
] + [
    _refused(
        "dataset split with an unpaired surrogate",
        "paths and remote code",
        "dataset.split",
        raw=raw_body('"dataset": {"source": "data/train.jsonl", "split": "\\ud800"}'),
        mentions=("dataset.split", "surrogate"),
    ),
    _refused(
        "local data with no AMID_DATA_ROOTS",
        "paths and remote code",
        "dataset.source",
        env={"AMID_DATA_ROOTS": ""},
        mentions=("dataset.source", "not allowed"),
        allowed_with={},
    ),
    _refused(
        "hub model with AMID_ALLOW_HUB=false",
        "paths and remote code",
        "teacher",
        env={"AMID_ALLOW_HUB": "false"},
        mentions=("teacher", "hub ids are not allowed"),
        allowed_with={},
    ),
    _refused(
        "trust_remote_code not allowed",
        "paths and remote code",
        "trust_remote_code",
        change={"trust_remote_code": True},
        mentions=("trust_remote_code", "not allowed"),
        allowed_with={"AMID_ALLOW_TRUST_REMOTE_CODE": "true"},
    ),
]

DATA = [
    _refused(n, "dataset files", f, change={"dataset": d}, mentions=(f, *m))
    for n, f, d, m in [
        ("dataset file missing", "dataset.source", "data/missing.jsonl", ("does not exist",)),
        ("dataset dangling symlink", "dataset.source", "data/dangling.jsonl", ("does not exist",)),
        ("dataset symlink loop", "dataset.source", "data/loop.jsonl", ("loop",)),
        ("dataset file empty", "dataset.source", "data/empty.jsonl", ("empty",)),
        ("dataset first row malformed", "dataset.source", "data/broken.jsonl", ("not valid JSON",)),
        ("dataset row not an object", "dataset.source", "data/list.jsonl", ("not a JSON object",)),
        ("dataset not UTF-8", "dataset.source", "data/binary.jsonl", ("UTF-8",)),
        ("dataset .json that is not JSON", "dataset.source", "data/notes.json", ("not JSON",)),
        (
            "dataset .parquet that is not Parquet",
            "dataset.source",
            "data/fake.parquet",
            ("Parquet",),
        ),
        ("dataset of an unsupported type", "dataset.source", "data/rows.csv", (".csv",)),
        ("dataset directory without data", "dataset.source", "data/empty-dir", ("no .jsonl",)),
        ("dataset a FIFO", "dataset.source", "data/fifo.jsonl", ("regular file",)),
        (
            "dataset directory with a FIFO next to a valid file",
            "dataset.source",
            "data/fifo-dir",
            ("regular file",),
        ),
        (
            "dataset directory with a symlink out of the roots",
            "dataset.source",
            "data/leak-dir",
            ("outside",),
        ),
        ("dataset rows fit no format", "dataset.format", "data/unknown.jsonl", ("detect",)),
        (
            "dataset rows misfit the format",
            "dataset.format",
            {"source": "data/train.jsonl", "format": "dolly"},
            ("instruction",),
        ),
        (
            "dataset renames a missing column",
            "dataset.fields",
            {"source": "data/train.jsonl", "fields": {"response": "answer"}},
            ("answer",),
        ),
    ]
]

JOB_REFERENCES = [
    _refused(n, "job references", "teacher", change={"teacher": t}, mentions=("teacher", *m))
    for n, t, m in [
        ("job: that does not exist", "job:${missing_job}", ("no such job",)),
        ("job: of another key", "job:${other_done}", ("no such job",)),
        ("job: not succeeded", "job:${own_job}", ("no final student",)),
        ("job: not a job id", "job:../../etc", ("not a job reference",)),
    ]
]

NOT_FOUND = ("job", "not found")
AUTH = [
    Case(
        "no key",
        "keys and other users",
        401,
        None,
        "Unauthorized",
        "GET",
        auth="none",
        mentions=("API key",),
    ),
    Case(
        "wrong key",
        "keys and other users",
        401,
        None,
        "Unauthorized",
        "GET",
        auth="wrong",
        mentions=("API key",),
    ),
    Case(
        "revoked key",
        "keys and other users",
        401,
        None,
        "Unauthorized",
        "GET",
        auth="revoked",
        mentions=("revoked",),
    ),
    Case(
        "submit with no key",
        "keys and other users",
        401,
        None,
        "Unauthorized",
        auth="none",
        mentions=("API key",),
    ),
    Case(
        "Basic instead of Bearer",
        "keys and other users",
        401,
        None,
        "Unauthorized",
        "GET",
        auth="none",
        headers={"Authorization": "Basic dXNlcjpwYXNz"},
        mentions=("API key",),
    ),
    Case(
        "another key's job: get",
        "keys and other users",
        404,
        "id",
        "JobNotFound",
        "GET",
        "/v1/jobs/${other_job}",
        mentions=NOT_FOUND,
    ),
    Case(
        "another key's job: cancel",
        "keys and other users",
        404,
        "id",
        "JobNotFound",
        "POST",
        "/v1/jobs/${other_job}/cancel",
        mentions=NOT_FOUND,
    ),
    Case(
        "another key's job: events",
        "keys and other users",
        404,
        "id",
        "JobNotFound",
        "GET",
        "/v1/jobs/${other_job}/events",
        mentions=NOT_FOUND,
    ),
    Case(
        "another key's job: student",
        "keys and other users",
        404,
        "id",
        "JobNotFound",
        "GET",
        "/v1/jobs/${other_done}/student",
        mentions=NOT_FOUND,
    ),
    Case(
        "listing shows only this key's jobs",
        "keys and other users",
        200,
        None,
        method="GET",
        params={"limit": "100"},
        hidden=("other_job", "other_done"),
        shown=("own_job", "done_job"),
    ),
    Case(
        "unknown job id",
        "keys and other users",
        404,
        "id",
        "JobNotFound",
        "GET",
        "/v1/jobs/${missing_job}",
        mentions=NOT_FOUND,
    ),
    Case(
        "malformed job id",
        "keys and other users",
        404,
        "id",
        "JobNotFound",
        "GET",
        "/v1/jobs/not-a-job",
        mentions=NOT_FOUND,
    ),
    Case(
        "cancel an unknown job",
        "keys and other users",
        404,
        "id",
        "JobNotFound",
        "POST",
        "/v1/jobs/${missing_job}/cancel",
        mentions=NOT_FOUND,
    ),
    Case(
        "cancel a finished job",
        "keys and other users",
        409,
        None,
        "JobNotCancellable",
        "POST",
        "/v1/jobs/${done_job}/cancel",
        mentions=("succeeded", "cannot be cancelled"),
    ),
    Case(
        "student of an unfinished job",
        "keys and other users",
        409,
        None,
        "StudentNotReady",
        "GET",
        "/v1/jobs/${own_job}/student",
        mentions=("no final student",),
    ),
    Case(
        "DELETE a job",
        "keys and other users",
        405,
        None,
        "MethodNotAllowed",
        "DELETE",
        "/v1/jobs/${own_job}",
        mentions=("Method Not Allowed",),
    ),
]

LISTING = [
    Case(n, "query parameters", 422, f, e, "GET", p, params=q)
    for n, f, e, p, q in [
        ("limit 0", "limit", "ValidationError", "/v1/jobs", {"limit": "0"}),
        ("limit above 100", "limit", "ValidationError", "/v1/jobs", {"limit": "101"}),
        ("limit not a number", "limit", "ValidationError", "/v1/jobs", {"limit": "ten"}),
        ("after not a cursor", "after", "InvalidCursor", "/v1/jobs", {"after": "garbage!"}),
        ("after empty", "after", "InvalidCursor", "/v1/jobs", {"after": ""}),
        ("unknown status", "status", "ValidationError", "/v1/jobs", {"status": "sleeping"}),
        ("status in capitals", "status", "ValidationError", "/v1/jobs", {"status": "QUEUED"}),
        (
            "events after negative",
            "after",
            "ValidationError",
            "/v1/jobs/${own_job}/events",
            {"after": "-1"},
        ),
        (
            "events limit too large",
            "limit",
            "ValidationError",
            "/v1/jobs/${own_job}/events",
            {"limit": "100000"},
        ),
        (
            "metrics after_step negative",
            "after_step",
            "ValidationError",
            "/v1/jobs/${own_job}/metrics",
            {"after_step": "-5"},
        ),
        (
            "metrics name too long",
            "name",
            "ValidationError",
            "/v1/jobs/${own_job}/metrics",
            {"name": "x" * 200},
        ),
        (
            "metrics name with a NUL byte",
            "name",
            "ValidationError",
            "/v1/jobs/${own_job}/metrics",
            {"name": "\x00"},
        ),
        (
            "list cursor with a NUL byte",
            "after",
            "InvalidCursor",
            "/v1/jobs",
            {"after": "\x00"},
        ),
    ]
]

CASES: list[Case] = [
    *NAN_AND_INFINITY,
    *LOSS,
    *SWEEP,
    *SIZES,
    *NUMERIC_BOUNDS,
    *SHAPE,
    *BODY,
    *PATHS,
    *DATA,
    *JOB_REFERENCES,
    *AUTH,
    *LISTING,
]


# -- the world the cases run in ------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """The server's working directory with its model and data roots, and a directory outside."""

    cwd: Path
    models: Path
    data: Path
    outside: Path

    def env(self) -> dict[str, str]:
        return {"AMID_MODEL_ROOTS": str(self.models), "AMID_DATA_ROOTS": str(self.data)}


def make_layout(base: Path) -> Layout:
    """Model and data roots under base/srv, with good and broken files and links out of them."""
    layout = Layout(
        cwd=base / "srv",
        models=base / "srv" / "models",
        data=base / "srv" / "data",
        outside=base / "elsewhere",
    )
    for directory in (layout.models / "teacher", layout.models / "student", layout.outside):
        directory.mkdir(parents=True)
    data = layout.data
    (data / "empty-dir").mkdir(parents=True)
    (data / "train.jsonl").write_text('{"prompt": "p", "response": "r"}\n')
    (layout.outside / "secret.jsonl").write_text('{"prompt": "secret", "response": "r"}\n')
    (layout.models / "escape").symlink_to(layout.outside, target_is_directory=True)
    (data / "leak.jsonl").symlink_to(layout.outside / "secret.jsonl")
    (data / "dangling.jsonl").symlink_to(data / "nowhere.jsonl")
    (data / "loop.jsonl").symlink_to(data / "loop.jsonl")
    (data / "empty.jsonl").write_text("")
    (data / "broken.jsonl").write_text('{"prompt": "p", "response": \n')
    (data / "list.jsonl").write_text('["p", "r"]\n')
    (data / "binary.jsonl").write_bytes(b'{"prompt": "\xff\xfe"}\n')
    (data / "notes.json").write_text("prompt,response\n")
    (data / "fake.parquet").write_text('{"prompt": "p", "response": "r"}\n')
    (data / "rows.csv").write_text("prompt,response\np,r\n")
    (data / "unknown.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    os.mkfifo(data / "fifo.jsonl")
    for name in ("fifo-dir", "leak-dir"):
        (data / name).mkdir()
        (data / name / "a.jsonl").write_text('{"prompt": "p", "response": "r"}\n')
    os.mkfifo(data / "fifo-dir" / "b.jsonl")
    (data / "leak-dir" / "b.jsonl").symlink_to(layout.outside / "secret.jsonl")
    return layout


@dataclass
class World:
    layout: Layout
    auth: dict[str, dict[str, str]]
    jobs: dict[str, str]

    def values(self) -> dict[str, str]:
        return {
            "outside": str(self.layout.outside),
            "outside_uri": self.layout.outside.as_uri(),
            "models": str(self.layout.models),
            "data": str(self.layout.data),
            "missing_job": MISSING_JOB,
            **self.jobs,
        }


def _key(name: str, admin: bool = False, revoked: bool = False) -> dict[str, str]:
    with session_scope() as session:
        key, secret = create_api_key(session, name, is_admin=admin)
        if revoked:
            revoke_api_key(session, key.id)
    return {"Authorization": f"Bearer {secret}"}


def make_world(client: TestClient, layout: Layout) -> World:
    """Keys of every kind, and jobs: the user's queued and succeeded ones, another key's two.

    Needs the layout's roots in the environment and the working directory at `layout.cwd`.
    """
    auth = {
        "user": _key("user"),
        "other": _key("other"),
        "admin": _key("admin", admin=True),
        "revoked": _key("revoked", revoked=True),
        "none": {},
        "wrong": {"Authorization": "Bearer amid_not-a-key-of-this-server"},
    }

    def submit(who: str, **headers: str) -> str:
        response = client.post("/v1/jobs", json=BASE, headers={**auth[who], **headers})
        assert response.status_code == 201, response.text
        job_id: str = response.json()["id"]
        return job_id

    made = {
        "own_job": submit("user", **{"Idempotency-Key": WORLD_IDEMPOTENCY_KEY}),
        "done_job": submit("user"),
        "other_job": submit("other"),
        "other_done": submit("other"),
    }
    with session_scope() as session:
        for name in ("done_job", "other_done"):
            assert jobs.claim_job(session, made[name], "world") is not None
            finished = jobs.finish_job(
                session, made[name], "world", "succeeded", final_uri=f"file:///students/{name}"
            )
            assert finished, name
    return World(layout=layout, auth=auth, jobs=made)


# -- running a case ------------------------------------------------------------------------------


@contextmanager
def operator_env(env: Mapping[str, str]) -> Iterator[None]:
    """The operator's AMID_ settings for one request, restored afterwards."""
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    get_config.cache_clear()
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        get_config.cache_clear()


def _fill(value: Any, values: Mapping[str, str]) -> Any:
    if isinstance(value, str):
        return Template(value).safe_substitute(values)
    if isinstance(value, dict):
        return {key: _fill(item, values) for key, item in value.items()}
    if isinstance(value, list):
        return [_fill(item, values) for item in value]
    return value


def send(client: TestClient, case: Case, world: World) -> Answer:
    values = world.values()
    headers = {**world.auth[case.auth], **case.headers}
    content = None
    if case.raw is not None:
        content = _fill(case.raw.decode("utf-8", "surrogateescape"), values).encode(
            "utf-8", "surrogateescape"
        )
        headers = {"content-type": "application/json", **headers}
    return client.request(
        case.method,
        _fill(case.path, values),
        params=_fill(dict(case.params), values) if case.params else None,
        headers=headers,
        json=_fill(case.body(), values),
        content=content,
    )


def snapshot(world: World) -> dict[str, Any]:
    """What a refused request must leave as it was: row counts and the world's jobs."""
    columns = [attr.key for attr in sa.inspect(Job).column_attrs]
    with get_sessionmaker()() as session:
        counts = {
            model.__name__: session.scalar(sa.select(sa.func.count()).select_from(model))
            for model in (Job, JobEvent, ApiKey)
        }
        rows = {
            name: {column: getattr(session.get(Job, job_id), column) for column in columns}
            for name, job_id in world.jobs.items()
        }
    return {"counts": counts, "jobs": rows}


@dataclass(frozen=True)
class Outcome:
    case: Case
    status: int
    error: str | None
    field: str | None
    detail: str
    problems: tuple[str, ...]

    @property
    def matched(self) -> bool:
        return not self.problems


def judge(case: Case, response: Answer, world: World) -> Outcome:
    """The answer against the case: every way it falls short, empty when it matches."""
    problems: list[str] = []
    if response.status_code >= 500:
        problems.append(f"server error {response.status_code}")
    if response.status_code != case.status:
        problems.append(f"status {response.status_code}, expected {case.status}")
    if not response.headers.get("content-type", "").startswith("application/json"):
        problems.append(f"content type {response.headers.get('content-type')!r}, not JSON")
    try:
        body = response.json()
    except ValueError:
        body = None
        problems.append("body is not JSON")
    error = detail = got_field = None
    if case.status >= 400:
        if not (isinstance(body, dict) and {"error", "detail", "field"} <= set(body)):
            problems.append("not the error shape (error, detail, field)")
        else:
            error, detail, got_field = body["error"], body["detail"], body["field"]
            if not (isinstance(detail, str) and detail.strip()):
                problems.append("empty detail")
                detail = str(detail)
            if case.error and error != case.error:
                problems.append(f"error {error!r}, expected {case.error!r}")
            if got_field != case.field:
                problems.append(f"field {got_field!r}, expected {case.field!r}")
            for word in case.words:
                if word.lower() not in detail.lower():
                    problems.append(f"detail does not say {word!r}")
    text = response.text
    for name in case.hidden:
        if world.jobs[name] in text:
            problems.append(f"shows {name}")
    for name in case.shown:
        if world.jobs[name] not in text:
            problems.append(f"does not show {name}")
    return Outcome(
        case=case,
        status=response.status_code,
        error=error,
        field=got_field,
        detail=detail or "",
        problems=tuple(problems),
    )


def run_case(client: TestClient, case: Case, world: World) -> Outcome:
    """Send one case under its operator settings; judge the answer and what it left stored."""
    before = snapshot(world)
    with operator_env(case.env):
        response = send(client, case, world)
    outcome = judge(case, response, world)
    after = snapshot(world)
    if after != before:
        changed = [
            key
            for key in (*before["counts"], *before["jobs"])
            if before["counts"].get(key, before["jobs"].get(key))
            != after["counts"].get(key, after["jobs"].get(key))
        ]
        problems = (*outcome.problems, f"stored state changed: {', '.join(changed)}")
        outcome = replace(outcome, problems=problems)
    return outcome
