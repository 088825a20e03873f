"""Generated requests for every operation in the OpenAPI schema, each answer checked against it.

Schemathesis generates valid and invalid requests for every operation; each is sent with a valid
key, and where the path names a job, also against jobs that exist (a running one with events,
metrics and checkpoints, a succeeded one with a student to download), so the 200 answers are
checked, not only the 404s. Every response must:

- not be a 5xx (the database and the broker are up, so a 500 or a 503 is a bug);
- have a status code and a content type the schema documents for that operation;
- have a body that conforms to the declared schema of that status;
- refuse a request the schema says is invalid;
- if it is an error, have the one error shape (`error`, `detail`, `field`).

With AMID_FUZZ_REPORT set to a file, every request appends one JSON line to it (`operation`,
`status`, `failed`: the checks it failed); scripts/reliability.py counts them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis import checks
from schemathesis.core.failures import FailureGroup
from schemathesis.core.parameters import ParameterLocation

from api.main import create_app
from store import jobs
from store.artifacts import final_key, get_artifact_store
from store.db import session_scope

pytestmark = [pytest.mark.integration, pytest.mark.slow]

app = create_app()
schema = schemathesis.openapi.from_asgi("/openapi.json", app)

# Not `positive_data_acceptance`: a request the schema allows may still be refused by what the
# server allows (a path outside its roots, a job that does not exist), and rightly so.
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.response_headers_conformance,
    checks.negative_data_rejection,
]
EXAMPLES_PER_OPERATION = 25
REPORT_VARIABLE = "AMID_FUZZ_REPORT"
BODY = {"teacher": "gpt2", "student": "distilgpt2", "dataset": "data/train.jsonl"}


@pytest.fixture
def auth(make_key: Callable[..., dict[str, str]]) -> dict[str, str]:
    return make_key()


@pytest.fixture
def known_jobs(auth: dict[str, str], tmp_path: Path) -> list[str]:
    """A running job with history and a succeeded one with a student, both the caller's."""
    with TestClient(app) as client:
        running, done = (client.post("/v1/jobs", json=BODY, headers=auth) for _ in range(2))
    assert running.status_code == done.status_code == 201, (running.text, done.text)
    running_id, done_id = running.json()["id"], done.json()["id"]
    student = tmp_path / "student"
    student.mkdir()
    (student / "config.json").write_text('{"n_layer": 1}')
    uploaded = get_artifact_store().upload_dir(student, final_key(done_id))
    with session_scope() as session:
        for job_id in (running_id, done_id):
            assert jobs.claim_job(session, job_id, "fuzz") is not None
        jobs.update_progress(
            session,
            running_id,
            "fuzz",
            step=3,
            total_steps=10,
            eta_seconds=7.0,
            latest_metrics={"train/loss": 2.5},
        )
        jobs.add_metrics(
            session, running_id, [(3, "train/loss", 2.5), (3, "train/nan", float("nan"))]
        )
        jobs.add_checkpoint(
            session,
            running_id,
            step=3,
            uri="file:///checkpoints/3",
            sha256="0" * 64,
            metrics={"eval/rouge_l": 0.2},
            is_best=True,
        )
        assert jobs.finish_job(session, done_id, "fuzz", "succeeded", final_uri=uploaded.uri)
    return [running_id, done_id]


def _record(case: schemathesis.Case, status: int, failed: list[str]) -> None:
    path = os.environ.get(REPORT_VARIABLE)
    if not path:
        return
    line = {"operation": f"{case.method.upper()} {case.path}", "status": status, "failed": failed}
    with Path(path).open("a", encoding="utf-8") as report:
        report.write(json.dumps(line) + "\n")


def _error_shape_problem(response: schemathesis.Response) -> list[str]:
    if response.status_code < 400:
        return []
    try:
        body = response.json()
    except ValueError:
        return ["Error body is not JSON"]
    if isinstance(body, dict) and {"error", "detail", "field"} <= set(body):
        return []
    return ["Error body without the error shape"]


def _call_and_check(case: schemathesis.Case, auth: dict[str, str]) -> None:
    response = case.call(headers=auth)
    try:
        case.validate_response(response, checks=CHECKS, headers=auth)
    except FailureGroup as group:
        _record(case, response.status_code, sorted({failure.title for failure in group.exceptions}))
        raise
    problems = _error_shape_problem(response)
    _record(case, response.status_code, problems)
    assert not problems, (case.method, case.path, response.status_code, response.text[:500])


@schema.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_every_answer_conforms_to_the_schema(
    case: schemathesis.Case, auth: dict[str, str], known_jobs: list[str]
) -> None:
    _call_and_check(case, auth)
    # A generated job id names no job; the same request against real jobs reaches the 200s.
    negative_path = case.meta is not None and case.meta.is_negative_at(ParameterLocation.PATH)
    if "job_id" in (case.path_parameters or {}) and not negative_path:
        for job_id in known_jobs:
            case.path_parameters["job_id"] = job_id
            _call_and_check(case, auth)
