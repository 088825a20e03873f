"""Fixtures of the fault tests: private Postgres servers to stop and start, and the reliability
record (stacks of real processes and a database of its own are shared: ../conftest.py).

Service-backed fixtures follow the suite's rule: they skip on a machine without the services and
fail when AMID_REQUIRE_SERVICES=1, so CI never passes by skipping a fault test.
"""

from __future__ import annotations

import json
import os
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest

from store.db import upgrade
from tests.conftest import _require
from tests.integration.faults._stack import PrivatePostgres, ServerFailed
from tests.integration.faults.records import REPORT_ENV, record_problem

_CALL_PASSED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call":
        item.stash[_CALL_PASSED] = report.passed
    return report


class FaultRecord(Protocol):
    def __call__(
        self,
        *,
        fault: str,
        action: str,
        held: str,
        jobs_submitted: int,
        jobs_lost: int,
        measured: dict[str, float | int],
    ) -> None: ...


@pytest.fixture
def fault_record(request: pytest.FixtureRequest) -> Iterator[FaultRecord]:
    """Call once, after the test's assertions, with what the reliability report shows.

    When AMID_FAULTS_REPORT names a file, one JSON object per line is appended to it, with
    exactly the keys fault, action, held, jobs_submitted, jobs_lost and measured; and only once
    the test has passed (the line is written at teardown). Without the variable nothing is
    written. A lost job fails the test here, before anything could be recorded.
    """
    recorded: list[dict[str, Any]] = []

    def record(
        *,
        fault: str,
        action: str,
        held: str,
        jobs_submitted: int,
        jobs_lost: int,
        measured: dict[str, float | int],
    ) -> None:
        assert not recorded, "fault_record is called once per test"
        assert jobs_lost == 0, f"{jobs_lost} of {jobs_submitted} jobs lost"
        assert jobs_submitted > 0
        entry = {
            "fault": fault,
            "action": action,
            "held": held,
            "jobs_submitted": jobs_submitted,
            "jobs_lost": jobs_lost,
            "measured": dict(measured),
        }
        problem = record_problem(entry)
        assert problem is None, problem
        recorded.append(entry)

    yield record

    if not request.node.stash.get(_CALL_PASSED, False):
        return
    assert len(recorded) == 1, "a fault test must call fault_record exactly once"
    target = os.environ.get(REPORT_ENV)
    if target:
        line = json.dumps(recorded[0])
        with Path(target).open("a", encoding="utf-8") as handle:
            handle.write(line + "\n")


@pytest.fixture
def private_postgres(tmp_path: Path) -> Iterator[PrivatePostgres]:
    """A running, migrated Postgres cluster of this test's own."""
    server: PrivatePostgres | None = None
    try:
        server = PrivatePostgres(tmp_path)
        server.init()
        server.start()
    except (ServerFailed, OSError, TimeoutError) as exc:
        if server is not None:
            server.close()
        _require("a private Postgres", exc)
    assert server is not None
    try:
        upgrade(server.url)
        yield server
    finally:
        server.close()
