"""Every bad input in the table (bad_inputs.CASES) is refused as the table says, and changes
nothing; what the table refuses by operator setting is accepted once the operator allows it; and
what lies inside the roots is accepted, stored resolved."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.deps import get_enqueue
from api.main import create_app
from store import jobs
from store.config import get_config
from store.db import reset_engine, session_scope
from tests.integration.api import bad_inputs
from tests.integration.api.bad_inputs import (
    BASE,
    Case,
    World,
    make_layout,
    make_world,
    operator_env,
    send,
)
from tests.integration.api.conftest import Roots, Sent

pytestmark = pytest.mark.integration

MakeKey = Callable[..., dict[str, str]]


Table = tuple[TestClient, World, dict[str, str]]


@pytest.fixture(scope="module")
def table(migrated_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Table]:
    """One app and one world for the whole table: each case checks that it changed nothing."""
    base = tmp_path_factory.mktemp("bad-inputs")
    layout = make_layout(base)
    env = {**layout.env(), "AMID_DATABASE_URL": migrated_url, "AMID_HOME": str(base / "home")}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        patch.chdir(layout.cwd)
        get_config.cache_clear()
        reset_engine()
        app = create_app()
        sent = Sent()
        app.dependency_overrides[get_enqueue] = lambda: sent
        with TestClient(app, raise_server_exceptions=False) as client:
            yield client, make_world(client, layout), env
        reset_engine()
    get_config.cache_clear()


@pytest.fixture
def table_world(table: Table, monkeypatch: pytest.MonkeyPatch) -> tuple[TestClient, World]:
    # Each test starts from an isolated home (the suite's autouse fixture): restore the table's.
    client, world, env = table
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(world.layout.cwd)
    get_config.cache_clear()
    return client, world


def _post(client: TestClient, headers: dict[str, str], body: dict[str, Any]) -> Any:
    return client.post("/v1/jobs", json=body, headers=headers)


def test_the_table_has_one_case_per_name() -> None:
    names = [case.name for case in bad_inputs.CASES]
    assert len(names) == len(set(names)), sorted({n for n in names if names.count(n) > 1})


@pytest.mark.parametrize("case", bad_inputs.CASES, ids=lambda case: case.name)
def test_bad_input_is_refused_as_the_table_says(
    table_world: tuple[TestClient, World], case: Case
) -> None:
    client, world = table_world
    outcome = bad_inputs.run_case(client, case, world)
    assert outcome.problems == (), (outcome.status, outcome.error, outcome.field, outcome.detail)


@pytest.mark.parametrize(
    "case",
    [case for case in bad_inputs.CASES if case.allowed_with is not None],
    ids=lambda case: case.name,
)
def test_the_operator_setting_refused_it_not_the_request(
    table_world: tuple[TestClient, World], case: Case
) -> None:
    client, world = table_world
    assert case.allowed_with is not None
    with operator_env(case.allowed_with):
        response = send(client, case, world)
    assert response.status_code == 201, response.text


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


def test_readable_datasets_of_every_kind_are_accepted(
    client: TestClient, make_key: MakeKey, roots: Roots
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"instruction": "i", "context": "", "response": "r"}] * 2
    good = roots.data / "good"
    good.mkdir()
    (good / "a.jsonl").write_text("\n" + "\n".join(json.dumps(row) for row in rows) + "\n")
    (roots.data / "array.json").write_text(json.dumps(rows, indent=2))
    (roots.data / "wrapped.json").write_text(json.dumps({"data": rows}, indent=2))
    (roots.data / "lines.json").write_text(json.dumps(rows[0]) + "\n")
    pq.write_table(pa.Table.from_pylist(rows), roots.data / "rows.parquet")
    (roots.data / "renamed.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    (roots.data / "skip.jsonl").write_text('{broken\n{"prompt": "p", "response": "r"}\n')
    headers = make_key()
    for dataset in [
        "data/good",
        "data/array.json",
        "data/wrapped.json",
        "data/lines.json",
        "data/rows.parquet",
        {"source": "data/good/a.jsonl", "format": "dolly"},
        {"source": "data/renamed.jsonl", "fields": {"prompt": "question", "response": "answer"}},
        {"source": "data/skip.jsonl", "skip_malformed": True},
    ]:
        response = _post(client, headers, {**BASE, "dataset": dataset})
        assert response.status_code == 201, (dataset, response.text)


def test_a_job_reference_to_a_visible_succeeded_job_is_accepted(
    client: TestClient, make_key: MakeKey
) -> None:
    alice = make_key()
    done = _post(client, alice, BASE).json()["id"]
    with session_scope() as session:
        jobs.claim_job(session, done, "w")
        jobs.finish_job(session, done, "w", "succeeded", final_uri="file:///students/x")
    accepted = _post(client, alice, {**BASE, "teacher": f"job:{done}"})
    assert accepted.status_code == 201 and accepted.json()["settings"]["teacher"] == f"job:{done}"
