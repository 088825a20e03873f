"""Write docs/reliability.md: how every bad input is answered, what a schema-driven fuzz of the
API found, and which faults the service survives. Anyone can re-run it:

    .venv/bin/python scripts/reliability.py                # all three parts (several minutes)
    .venv/bin/python scripts/reliability.py --skip-faults  # only the parts that need no fault run

1. Bad inputs: every case of tests/integration/api/bad_inputs.py is sent to a real app
   (`create_app()`, through FastAPI's TestClient) on a throwaway Postgres database, made the way
   the test suite makes one (AMID_TEST_POSTGRES_URL, default the local server) and dropped
   afterwards; if Postgres cannot be reached, on SQLite in a temporary AMID_HOME. The report
   says which. Operator variables (AMID_*) of the calling shell are set aside, so the cases meet
   the defaults; nothing is sent to a broker.
2. Fuzz: tests/integration/api/test_fuzz.py, run by pytest with AMID_FUZZ_REPORT, which gets
   one line per request; the report counts requests, server errors and schema violations.
3. Faults: `pytest -m faults -p no:cacheprovider` with AMID_FAULTS_REPORT and
   AMID_REQUIRE_SERVICES=1. Each passing fault test appends one JSON object per line (`fault`,
   `action`, `held`, `jobs_submitted`, `jobs_lost`, `measured`); a test that failed is read from
   pytest's JUnit XML and shown as failed.

The exit status is 1 if a bad-input case did not come back as the table says, the fuzz found a
server error or a schema violation, a fault test failed or wrote a malformed record, or a job
was lost; else 0. `--output` writes elsewhere than docs/reliability.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

COMMAND = ".venv/bin/python scripts/reliability.py"

# -- the environment -----------------------------------------------------------------------------


def _operator_variables() -> set[str]:
    from store.config import ServiceConfig

    return {f"AMID_{name.upper()}" for name in ServiceConfig.model_fields}


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without the operator's AMID_ settings, plus `extra`."""
    operator = _operator_variables()
    env = {name: value for name, value in os.environ.items() if name not in operator}
    return {**env, **extra}


@contextmanager
def _environment(env: dict[str, str], cwd: Path) -> Iterator[None]:
    saved_env, saved_cwd = dict(os.environ), Path.cwd()
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    try:
        yield
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)


@contextmanager
def _database() -> Iterator[tuple[str | None, str]]:
    """(URL, description): a throwaway Postgres database, or (None, ...) for SQLite."""
    import sqlalchemy as sa

    from tests.conftest import POSTGRES_ADMIN_URL

    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"amid_reliability_{uuid.uuid4().hex[:12]}"
    unreachable = None
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as exc:
        admin.dispose()
        unreachable = type(getattr(exc, "orig", None) or exc).__name__
    if unreachable is not None:
        yield None, f"SQLite in a temporary AMID_HOME (Postgres was unreachable: {unreachable})"
        return
    try:
        url = admin.url.set(database=name).render_as_string(hide_password=False)
        yield url, "PostgreSQL (a throwaway database, dropped afterwards)"
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


# -- 1. bad inputs -------------------------------------------------------------------------------


@dataclass
class BadInputs:
    database: str
    outcomes: list[Any]
    seconds: float
    replacements: dict[str, str]

    @property
    def mismatched(self) -> list[Any]:
        return [outcome for outcome in self.outcomes if not outcome.matched]


def run_bad_inputs() -> BadInputs:
    from fastapi.testclient import TestClient

    from api.deps import get_enqueue
    from api.main import create_app
    from store.config import get_config
    from store.db import reset_engine, upgrade
    from tests.integration.api import bad_inputs

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="amid-reliability-") as tmp, _database() as (url, db):
        base = Path(tmp)
        layout = bad_inputs.make_layout(base)
        env = _clean_env(**layout.env(), AMID_HOME=str(base / "home"))
        if url is not None:
            env["AMID_DATABASE_URL"] = url
        with _environment(env, layout.cwd):
            get_config.cache_clear()
            reset_engine()
            upgrade(get_config().resolved_database_url)
            sent: list[str] = []
            app = create_app()
            app.dependency_overrides[get_enqueue] = lambda: sent.append
            try:
                with TestClient(app, raise_server_exceptions=False) as client:
                    world = bad_inputs.make_world(client, layout)
                    outcomes = [
                        bad_inputs.run_case(client, case, world) for case in bad_inputs.CASES
                    ]
            finally:
                reset_engine()
                get_config.cache_clear()
        # Stable text in the report: no temporary paths, no random job ids.
        replacements = {str(base.resolve()): "<tmp>", str(base): "<tmp>"}
        replacements.update({job_id: "${" + name + "}" for name, job_id in world.jobs.items()})
    return BadInputs(db, outcomes, time.monotonic() - started, replacements)


# -- 2. fuzz -------------------------------------------------------------------------------------


@dataclass
class Fuzz:
    exit_code: int
    tests: dict[str, int]
    requests: list[dict[str, Any]]
    seconds: float

    @property
    def server_errors(self) -> int:
        return sum(1 for line in self.requests if line["status"] >= 500)

    @property
    def violations(self) -> Counter[tuple[str, str]]:
        """(operation, check failed) of the answers that were not server errors."""
        return Counter(
            (line["operation"], failure)
            for line in self.requests
            if line["status"] < 500
            for failure in line["failed"]
        )

    @property
    def failed(self) -> bool:
        return self.exit_code not in (0, 5) or bool(self.server_errors or self.violations)


def _junit_counts(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Test counts by outcome, and (test id, first line of the message) of each failure."""
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failures: list[tuple[str, str]] = []
    if not path.exists():
        return counts, failures
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        problem = case.find("failure")
        if problem is None:
            problem = case.find("error")
        if problem is not None:
            counts["failed"] += 1
            message = (problem.get("message") or problem.text or "").strip().splitlines()
            failures.append((name, message[0] if message else ""))
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts, failures


def _run_pytest(
    selection: list[str], junit: Path, **env: str
) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run part of the suite in a child process with a JUnit report; returns it and its seconds."""
    started = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            *selection,
            "-p",
            "no:cacheprovider",
            "-q",
            f"--junitxml={junit}",
        ],
        cwd=ROOT,
        env=_clean_env(**env),
        check=False,
        capture_output=True,
        text=True,
    )
    return result, time.monotonic() - started


def run_fuzz(work: Path) -> Fuzz:
    report, junit = work / "fuzz.jsonl", work / "fuzz.xml"
    result, seconds = _run_pytest(
        ["tests/integration/api/test_fuzz.py"], junit, AMID_FUZZ_REPORT=str(report)
    )
    counts, _ = _junit_counts(junit)
    lines = report.read_text().splitlines() if report.exists() else []
    return Fuzz(result.returncode, counts, [json.loads(line) for line in lines], seconds)


# -- 3. faults -----------------------------------------------------------------------------------


@dataclass
class Faults:
    exit_code: int
    tests: dict[str, int]
    records: list[dict[str, Any]]
    malformed: list[str]
    failures: list[tuple[str, str]]
    seconds: float
    output_tail: str = ""
    lost: int = field(init=False)
    submitted: int = field(init=False)

    def __post_init__(self) -> None:
        self.lost = sum(record["jobs_lost"] for record in self.records)
        self.submitted = sum(record["jobs_submitted"] for record in self.records)

    @property
    def failed(self) -> bool:
        return (
            self.exit_code != 0
            or bool(self.failures or self.malformed or self.lost)
            or not self.records
        )


def _check_record(line: str) -> dict[str, Any] | str:
    """The record, or why it breaks the contract."""
    from tests.integration.faults.records import record_problem

    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        return f"not JSON ({exc.msg}): {line[:80]}"
    problem = record_problem(record)
    return problem if problem is not None else record


def read_fault_records(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    records: list[dict[str, Any]] = []
    malformed: list[str] = []
    if not path.exists():
        return records, malformed
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        checked = _check_record(line)
        if isinstance(checked, str):
            malformed.append(checked)
        else:
            records.append(checked)
    return records, malformed


def run_faults(work: Path) -> Faults:
    from tests.integration.faults.records import REPORT_ENV

    report, junit = work / "faults.jsonl", work / "faults.xml"
    result, seconds = _run_pytest(
        ["-m", "faults"], junit, **{REPORT_ENV: str(report)}, AMID_REQUIRE_SERVICES="1"
    )
    counts, failures = _junit_counts(junit)
    records, malformed = read_fault_records(report)
    tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
    return Faults(result.returncode, counts, records, malformed, failures, seconds, tail)


# -- rendering -----------------------------------------------------------------------------------


def _cell(text: Any, replacements: dict[str, str] | None = None, limit: int = 240) -> str:
    value = str(text)
    for old, new in (replacements or {}).items():
        value = value.replace(old, new)
    value = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in value)
    if len(value) > limit:
        value = value[: limit - 1] + "…"
    return value.replace("|", "\\|")


def _code(text: str) -> str:
    return f"`{text}`" if "`" not in text else f"`` {text} ``"


def _number(value: float) -> str:
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def render_bad_inputs(part: BadInputs) -> list[str]:
    lines = [
        "## Bad inputs",
        "",
        f"Every case of `tests/integration/api/bad_inputs.py` ({len(part.outcomes)} cases), sent "
        f"to the real app through FastAPI's TestClient, on {part.database}, in "
        f"{part.seconds:.1f} s. The same table drives the test suite "
        "(`tests/integration/api/test_validation_api.py`).",
        "",
        "A case matches when the status, the error class and the `field` are the ones the table "
        "expects, the body has the error shape (`error`, `detail`, `field`), the `detail` says "
        "the field and the reason, and nothing stored changed (the number of jobs, events and "
        "keys, and every row of the jobs the cases point at).",
        "",
        "The server runs in `<tmp>/srv` (a temporary directory) with the model root "
        "`<tmp>/srv/models` (`${models}`) and the data root `<tmp>/srv/data`; `${outside}` is "
        "`<tmp>/elsewhere`, outside both. The data root holds broken files and links out of it "
        "(see `make_layout`). `${own_job}` and `${done_job}` are a queued and a succeeded job of "
        "the caller's key, `${other_job}` and `${other_done}` the same of another key. The "
        "operator settings are the defaults (hub ids allowed, remote code not, the limits of "
        "`store/config.py`) unless a case names one in `[…]`.",
        "",
        "A job of another key answers **404**, exactly as a job that does not exist (never 403: "
        "the answer does not reveal that the id exists).",
        "",
    ]
    groups: dict[str, list[Any]] = {}
    for outcome in part.outcomes:
        groups.setdefault(outcome.case.group, []).append(outcome)
    for group, outcomes in groups.items():
        matched = sum(outcome.matched for outcome in outcomes)
        lines += [
            f"### {group[0].upper() + group[1:]} ({matched} of {len(outcomes)} as expected)",
            "",
            "| Case | Request | Status | `field` | `detail` | As expected |",
            "|---|---|---|---|---|---|",
        ]
        for outcome in outcomes:
            case = outcome.case
            verdict = "yes" if outcome.matched else "**no**: " + "; ".join(outcome.problems)
            lines.append(
                "| "
                + " | ".join(
                    [
                        _cell(case.name),
                        _code(_cell(case.summary(), part.replacements)),
                        str(outcome.status),
                        _code(_cell(outcome.field)) if outcome.field else "",
                        _cell(outcome.detail, part.replacements),
                        _cell(verdict, part.replacements),
                    ]
                )
                + " |"
            )
        lines.append("")
    return lines


def render_fuzz(part: Fuzz) -> list[str]:
    operations = {line["operation"] for line in part.requests}
    statuses = Counter(line["status"] for line in part.requests)
    lines = [
        "## Fuzz",
        "",
        "`tests/integration/api/test_fuzz.py`: schemathesis generates valid and invalid requests "
        "for every operation of the OpenAPI schema (and requests with methods the schema does "
        "not list); each is sent with a valid key and, where the path names a job, also against "
        "a running job with history and a succeeded one with a student. Every answer is checked "
        "against the schema: not a server error, a documented status code and content type, a "
        "body that conforms to the declared schema, an invalid request refused, and the error "
        "shape on every error.",
        "",
        f"- pytest: {part.tests['passed']} passed, {part.tests['failed']} failed, "
        f"{part.tests['skipped']} skipped (exit status {part.exit_code}), in {part.seconds:.0f} s",
        f"- requests made: {len(part.requests):,} over {len(operations)} method and path pairs",
        f"- server errors (5xx): {part.server_errors}",
        f"- schema violations: {sum(part.violations.values())}",
        "",
    ]
    if part.tests["skipped"] and not part.requests:
        lines += ["The fuzz was skipped: it needs the local Postgres.", ""]
    if part.violations:
        lines += ["| Operation | Check failed | Requests |", "|---|---|---|"]
        for (operation, check), count in sorted(part.violations.items()):
            lines.append(f"| {_code(operation)} | {_cell(check)} | {count} |")
        lines.append("")
    if statuses:
        lines += [
            "Answers by status: "
            + ", ".join(f"{status}: {count:,}" for status, count in sorted(statuses.items()))
            + ".",
            "",
        ]
    return lines


def render_faults(part: Faults | None) -> list[str]:
    from tests.integration.faults._stack import RELIABILITY_SETTINGS

    lines = ["## Faults survived", ""]
    if part is None:
        return [
            *lines,
            f"Not run in this render (`--skip-faults`). `{COMMAND}` runs "
            "`pytest -m faults` and fills in this section.",
            "",
        ]
    total = part.tests["passed"] + part.tests["failed"] + part.tests["skipped"]
    lines += [
        f"`pytest -m faults` (AMID_REQUIRE_SERVICES=1): {part.tests['passed']} of {total} "
        f"passed, {part.tests['failed']} failed, {part.tests['skipped']} skipped, in "
        f"{part.seconds / 60:.1f} min (exit status {part.exit_code}).",
        "",
        "Settings: "
        + ", ".join(f"`{name}={value}`" for name, value in RELIABILITY_SETTINGS.items())
        + " (the first four are the shipped defaults; README, Configuration). Timings are on "
        "this machine (see the first line), and grow when other work loads it.",
        "",
    ]
    if part.records:
        lines += [
            "| Fault | What was done | What held | Jobs submitted | Jobs lost | Measured |",
            "|---|---|---|---|---|---|",
        ]
        for record in part.records:
            measured = ", ".join(
                f"{_cell(name)} = {_number(value)}" for name, value in record["measured"].items()
            )
            lines.append(
                f"| {_cell(record['fault'])} | {_cell(record['action'])} | "
                f"{_cell(record['held'])} | {record['jobs_submitted']} | "
                f"{record['jobs_lost']} | {measured} |"
            )
        lines.append("")
    else:
        lines += ["No fault test wrote a record.", ""]
    if part.failures:
        lines += ["Failed:", ""]
        lines += [f"- {_code(_cell(name))}: {_cell(message)}" for name, message in part.failures]
        lines.append("")
    if part.malformed:
        lines += ["Records that break the contract:", ""]
        lines += [f"- {_cell(problem)}" for problem in part.malformed]
        lines.append("")
    if part.exit_code not in (0, 1) and part.output_tail:
        lines += ["pytest ended with:", "", "```", part.output_tail, "```", ""]
    lines += [f"**Jobs lost: {part.lost} of {part.submitted} submitted.**", ""]
    return lines


def render(
    bad: BadInputs, fuzz: Fuzz, faults: Faults | None, *, skip_faults: bool, seconds: float
) -> str:
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    machine = (
        f"{platform.system()} ({platform.machine()}), {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}"
    )
    command = COMMAND + (" --skip-faults" if skip_faults else "")
    if faults is None:
        faults_line = "not run (`--skip-faults`)"
    else:
        faults_line = (
            f"{len(faults.records)} survived, {len(faults.failures)} failed; jobs lost: "
            f"{faults.lost} of {faults.submitted} submitted"
        )
    lines = [
        "# Reliability",
        "",
        f"Written by `{command}` on {now}, on {machine}, in {seconds / 60:.1f} min. "
        "Re-run it to check this file; it exits non-zero if a bad input is answered otherwise "
        "than below, the fuzz finds a server error or a schema violation, a fault test fails, or "
        "a job is lost.",
        "",
        f"- Bad inputs: {len(bad.outcomes)} cases, "
        f"{len(bad.outcomes) - len(bad.mismatched)} answered as expected "
        f"({bad.database.split(' (')[0]}).",
        f"- Fuzz: {len(fuzz.requests):,} requests, {fuzz.server_errors} server errors, "
        f"{sum(fuzz.violations.values())} schema violations.",
        f"- Faults: {faults_line}.",
        "",
        *render_bad_inputs(bad),
        *render_fuzz(fuzz),
        *render_faults(faults),
    ]
    text = "\n".join(lines).rstrip() + "\n"
    # Whatever slipped through: no absolute path of this checkout in the report.
    return re.sub(re.escape(str(ROOT)), ".", text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--skip-faults", action="store_true", help="render only the parts that need no fault run"
    )
    parser.add_argument(
        "--output", type=Path, default=ROOT / "docs" / "reliability.md", help="where to write"
    )
    args = parser.parse_args(argv)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="amid-reliability-") as tmp:
        work = Path(tmp)
        print("bad inputs ...", flush=True)
        bad = run_bad_inputs()
        print(f"  {len(bad.outcomes) - len(bad.mismatched)} of {len(bad.outcomes)} as expected")
        print("fuzz ...", flush=True)
        fuzz = run_fuzz(work)
        print(f"  {len(fuzz.requests)} requests, exit status {fuzz.exit_code}")
        faults = None
        if not args.skip_faults:
            print("faults (several minutes) ...", flush=True)
            faults = run_faults(work)
            print(f"  {len(faults.records)} records, exit status {faults.exit_code}")
    text = render(
        bad, fuzz, faults, skip_faults=args.skip_faults, seconds=time.monotonic() - started
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output}")
    problems = [
        *(f"bad input not as expected: {outcome.case.name}" for outcome in bad.mismatched),
        *(["fuzz: server errors, schema violations or a failed test"] if fuzz.failed else []),
        *(
            ["faults: a test failed, a record is malformed, or a job was lost"]
            if faults and faults.failed
            else []
        ),
    ]
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
