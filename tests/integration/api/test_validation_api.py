"""Every refused submission is a 422 that names the field at fault (schema and server checks)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from store import jobs
from store.db import session_scope
from tests.integration.api.conftest import Roots

pytestmark = pytest.mark.integration

MakeKey = Callable[..., dict[str, str]]
BODY: dict[str, Any] = {"teacher": "gpt2", "student": "distilgpt2", "dataset": "data/train.jsonl"}


def _post(client: TestClient, headers: dict[str, str], body: dict[str, Any]) -> Any:
    return client.post("/v1/jobs", json=body, headers=headers)


SCHEMA_CASES: list[tuple[dict[str, Any], str]] = [
    ({"lambda": 1.5}, "lambda"),
    ({"lambda": "half"}, "lambda"),
    ({"alpha": "x"}, "alpha"),
    ({"divergence": "no-such-divergence"}, "divergence"),
    ({"anchor": "both"}, "anchor"),
    ({"preset": "no-such-preset"}, "preset"),
    ({"dataset": {"source": ""}}, "dataset.source"),
    ({"dataset": {"source": "data/train.jsonl", "format": "csv"}}, "dataset.format"),
    ({"dataset": {"source": "data/train.jsonl", "colour": 1}}, "dataset.colour"),
    ({"generation": {"top_p": 2}}, "generation.top_p"),
    ({"batch_size": 0}, "batch_size"),
    ({"max_steps": -1}, "max_steps"),
    ({"learning_rate": 0}, "learning_rate"),
    ({"typo_field": 1}, "typo_field"),
    ({"lambda": 1.0, "anchor": "teacher"}, "lambda"),
    ({"max_prompt_length": 512, "max_length": 512}, "max_prompt_length"),
]


@pytest.mark.parametrize(("change", "field"), SCHEMA_CASES)
def test_schema_errors_name_the_field(
    client: TestClient, make_key: MakeKey, change: dict[str, Any], field: str
) -> None:
    response = _post(client, make_key(), {**BODY, **change})
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error"] == "ValidationError"
    assert body["field"] == field and field in body["detail"]


@pytest.mark.parametrize("missing", ["teacher", "student", "dataset"])
def test_missing_required_field_is_named(
    client: TestClient, make_key: MakeKey, missing: str
) -> None:
    body = {key: value for key, value in BODY.items() if key != missing}
    response = _post(client, make_key(), body)
    assert response.status_code == 422 and response.json()["field"] == missing


SERVER_CASES: list[tuple[dict[str, str], dict[str, Any], str]] = [
    ({"AMID_MAX_STEPS_LIMIT": "100"}, {"max_steps": 101}, "max_steps"),
    ({"AMID_MAX_LENGTH_LIMIT": "256"}, {"max_length": 300, "max_prompt_length": 128}, "max_length"),
    ({}, {"trust_remote_code": True}, "trust_remote_code"),
    ({"AMID_ALLOW_HUB": "false"}, {}, "teacher"),
    ({"AMID_ALLOW_HUB": "false"}, {"teacher": "models/teacher"}, "student"),
    (
        {"AMID_ALLOW_HUB": "false"},
        {"teacher": "models/teacher", "student": "models/student", "dataset": "org/data"},
        "dataset.source",
    ),
]


@pytest.mark.parametrize(("env", "change", "field"), SERVER_CASES)
def test_server_limits_name_the_field(
    client: TestClient,
    make_key: MakeKey,
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str],
    change: dict[str, Any],
    field: str,
) -> None:
    from store.config import get_config

    headers = make_key()
    body = {**BODY, **change}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    get_config.cache_clear()
    refused = _post(client, headers, body)
    assert refused.status_code == 422, refused.text
    assert refused.json()["error"] == "SettingRefused" and refused.json()["field"] == field
    # The same body passes once the operator allows it: the check, not the body, refused it.
    for name in env:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AMID_ALLOW_TRUST_REMOTE_CODE", "true")
    get_config.cache_clear()
    assert _post(client, headers, body).status_code == 201


def _path_cases(roots: Roots) -> list[tuple[dict[str, Any], str]]:
    link = roots.models / "escape"
    if not link.exists():
        link.symlink_to(roots.outside, target_is_directory=True)
    data_link = roots.data / "leak.jsonl"
    if not data_link.exists():
        data_link.symlink_to(roots.outside / "secret.jsonl")
    return [
        ({"teacher": str(roots.outside)}, "teacher"),
        ({"teacher": "/etc"}, "teacher"),
        ({"student": "models/../../elsewhere"}, "student"),
        ({"student": "./models/escape"}, "student"),
        ({"student": str(link)}, "student"),
        ({"teacher": roots.outside.as_uri()}, "teacher"),
        ({"teacher": "file://otherhost/models/teacher"}, "teacher"),
        ({"teacher": "s3://bucket/model"}, "teacher"),
        ({"teacher": "models/missing"}, "teacher"),
        ({"teacher": "a/b/c"}, "teacher"),
        ({"teacher": ".hidden"}, "teacher"),
        ({"teacher": "~/models"}, "teacher"),
        ({"dataset": "../elsewhere/secret.jsonl"}, "dataset.source"),
        ({"dataset": str(roots.outside / "secret.jsonl")}, "dataset.source"),
        ({"dataset": "data/leak.jsonl"}, "dataset.source"),
        ({"dataset": "models/teacher"}, "dataset.source"),  # a model root is not a data root
        ({"teacher": "gpt2\u0000"}, "teacher"),
    ]


def test_paths_outside_the_roots_are_refused(
    client: TestClient, make_key: MakeKey, roots: Roots
) -> None:
    headers = make_key()
    for change, field in _path_cases(roots):
        response = _post(client, headers, {**BODY, **change})
        assert response.status_code == 422, (change, response.text)
        assert response.json()["field"] == field, (change, response.json())


def test_paths_inside_the_roots_are_stored_resolved(
    client: TestClient, make_key: MakeKey, roots: Roots
) -> None:
    inner_link = roots.models / "alias"
    inner_link.symlink_to(roots.models / "student", target_is_directory=True)
    body = {
        "teacher": (roots.models / "teacher").as_uri(),
        "student": "models/alias",
        "dataset": {"source": "data/../data/train.jsonl"},
    }
    response = _post(client, make_key(), body)
    assert response.status_code == 201, response.text
    settings = response.json()["settings"]
    assert settings["teacher"] == str((roots.models / "teacher").resolve())
    assert settings["student"] == str((roots.models / "student").resolve())
    assert Path(settings["dataset"]["source"]) == (roots.data / "train.jsonl").resolve()


def test_no_roots_configured_means_no_local_paths(
    client: TestClient, make_key: MakeKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    from store.config import get_config

    monkeypatch.delenv("AMID_DATA_ROOTS")
    get_config.cache_clear()
    response = _post(client, make_key(), BODY)
    assert response.status_code == 422 and response.json()["field"] == "dataset.source"


def test_job_references_must_be_a_visible_succeeded_job(
    client: TestClient, make_key: MakeKey
) -> None:
    alice, bob = make_key(), make_key()
    done = _post(client, alice, BODY).json()["id"]
    pending = _post(client, alice, BODY).json()["id"]
    with session_scope() as session:
        jobs.claim_job(session, done, "w")
        jobs.finish_job(session, done, "w", "succeeded", final_uri="file:///students/x")

    cases = [
        (bob, f"job:{done}"),  # another owner's job: not found
        (alice, f"job:{pending}"),  # not succeeded
        (alice, "job:" + "0" * 32),  # no such job
        (alice, "job:../../etc"),  # not a job id at all
    ]
    for headers, reference in cases:
        response = _post(client, headers, {**BODY, "teacher": reference})
        assert response.status_code == 422, reference
        assert response.json()["field"] == "teacher"
    accepted = _post(client, alice, {**BODY, "teacher": f"job:{done}"})
    assert accepted.status_code == 201 and accepted.json()["settings"]["teacher"] == f"job:{done}"
