"""The API under concurrent clients: latency and throughput of get, list and submit.

Starts the real API (uvicorn, one process, as the API image runs it) on 127.0.0.1 against a
throw-away Postgres database, then drives it with bounded async clients (one keep-alive
connection each, `benchmarks.load_client`, lean enough not to be the bottleneck): for each
operation and each client count, every client sends requests back to back for `--seconds`
(at most `--max-requests` in all). Each client has its own API key, as a team's users do.
The one-client run of each operation is the baseline its ratios are measured against. The whole
table runs `--repeat` times (3) against the same API, and each row gives the medians of the runs:
one run's p99 on two shared cores moves by ±10% from run to run.

    python -m benchmarks.service                          # print the table (about 6 minutes)
    python -m benchmarks.service --write BENCHMARKS.md

What must hold (printed at the end, and the exit status): no 5xx other than 503 with
`Retry-After`, and GET p99 at 100 clients under 500 ms. The machine's load average is printed
before and after: on a machine others are using, the figures are worse than on a quiet one.
The client runs on the same cores as the server, so on a small machine it takes its share too.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import sqlalchemy as sa

from benchmarks.load_client import Answer, Connection, ProtocolError
from benchmarks.report import cpu_model, load_average, write_section

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "core" / "demo"
ADMIN_URL = os.environ.get(
    "AMID_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
CLIENT_COUNTS = (1, 10, 100, 200)
OPERATIONS = ("get", "list", "submit")
JOBS_PER_KEY = 5
REQUEST_TIMEOUT_SECONDS = 30.0
STARTUP_SECONDS = 30.0
GET_P99_TARGET_MS = 500.0
SUBMIT_BODY = {
    "teacher": "core/demo/assets/teacher",
    "student": "core/demo/assets/student",
    "dataset": {"source": "core/demo/data/demo.jsonl", "format": "dolly"},
    "max_steps": 2,
}


@dataclass
class Phase:
    operation: str
    clients: int
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    bad_503: int = 0  # 503 without Retry-After
    client_errors: Counter[str] = field(default_factory=Counter)  # time-outs, resets

    @property
    def ok(self) -> int:
        return sum(n for status, n in self.statuses.items() if 200 <= status < 300)

    @property
    def server_errors(self) -> int:
        """5xx other than a 503 that says when to retry."""
        fives = sum(n for status, n in self.statuses.items() if status >= 500)
        return fives - self.statuses[503] + self.bad_503

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@contextmanager
def throwaway_database() -> Iterator[str]:
    admin = sa.create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"amid_bench_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin.url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def seed(database_url: str, keys: int) -> tuple[list[str], list[str]]:
    """`keys` API keys (their secrets) and one of each key's jobs, made through the store."""
    from store import jobs
    from store.config import get_config
    from store.db import reset_engine, session_scope, upgrade
    from store.keys import create_api_key

    os.environ["AMID_DATABASE_URL"] = database_url
    get_config.cache_clear()
    reset_engine()
    upgrade(database_url)
    secrets, job_ids = [], []
    with session_scope() as session:
        for index in range(keys):
            key, secret = create_api_key(session, f"bench-{index}")
            secrets.append(secret)
            for _ in range(JOBS_PER_KEY):
                job, _ = jobs.create_job(session, dict(SUBMIT_BODY), key.id, None, 3)
            job_ids.append(job.id)
    reset_engine()
    return secrets, job_ids


def start_api(database_url: str, home: Path, port: int, workers: int) -> subprocess.Popen[bytes]:
    # The load settings under test (AMID_API_*) come from the environment; nothing else does.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("AMID_") or k.startswith("AMID_API_")
    }
    env.update(
        {
            "AMID_DATABASE_URL": database_url,
            "AMID_HOME": str(home),
            "AMID_MODEL_ROOTS": str(DEMO),
            "AMID_DATA_ROOTS": str(DEMO),
            # Submissions pile up unrun (no worker): the per-key queue limit must not refuse them.
            "AMID_MAX_QUEUED_PER_KEY": "1000000",
        }
    )
    argv = [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--workers", str(workers), "--log-level", "warning"]
    log = (home / "api.log").open("wb")
    return subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_up(base: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the API exited with status {process.returncode}")
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the API did not come up within {STARTUP_SECONDS:.0f}s")


Request = Callable[[Connection, int], Awaitable[Answer]]


def requests_for(secrets: list[str], job_ids: list[str]) -> dict[str, Request]:
    def auth(client: int) -> dict[str, str]:
        return {"Authorization": f"Bearer {secrets[client]}"}

    async def get(http: Connection, client: int) -> Answer:
        return await http.request("GET", f"/v1/jobs/{job_ids[client]}", auth(client))

    async def listing(http: Connection, client: int) -> Answer:
        return await http.request("GET", "/v1/jobs?limit=20", auth(client))

    async def submit(http: Connection, client: int) -> Answer:
        return await http.request("POST", "/v1/jobs", auth(client), SUBMIT_BODY)

    return {"get": get, "list": listing, "submit": submit}


async def run_phase(
    base: str, phase: Phase, request: Request, seconds: float, max_requests: int
) -> None:
    address = urlsplit(base)
    host, port = address.hostname or "127.0.0.1", address.port or 80
    sent = 0
    started = time.monotonic()
    deadline = started + seconds

    async def client(index: int) -> None:
        nonlocal sent
        http = Connection(host, port, REQUEST_TIMEOUT_SECONDS)
        try:
            while time.monotonic() < deadline and sent < max_requests:
                sent += 1
                before = time.monotonic()
                try:
                    answer = await request(http, index)
                except (OSError, TimeoutError, asyncio.IncompleteReadError, ProtocolError) as exc:
                    phase.client_errors[type(exc).__name__] += 1
                    continue
                phase.latencies_ms.append((time.monotonic() - before) * 1000)
                phase.statuses[answer.status] += 1
                if answer.status == 503 and "retry-after" not in answer.headers:
                    phase.bad_503 += 1
        finally:
            await http.close()

    await asyncio.gather(*(client(index) for index in range(phase.clients)))
    phase.seconds = time.monotonic() - started


async def healthz_during(base: str, phase: Awaitable[None]) -> list[float]:
    """/healthz latencies (ms), sampled every 100 ms while `phase` runs."""
    samples: list[float] = []
    task = asyncio.ensure_future(phase)
    async with httpx.AsyncClient(base_url=base, timeout=REQUEST_TIMEOUT_SECONDS) as http:
        while not task.done():
            before = time.monotonic()
            try:
                await http.get("/healthz", headers={"Connection": "close"})
            except httpx.HTTPError:
                samples.append(float("inf"))  # no answer at all: the worst there is
            else:
                samples.append((time.monotonic() - before) * 1000)
            await asyncio.sleep(0.1)
    await task
    return samples


def machine() -> str:
    return f"{cpu_model()}, {len(os.sched_getaffinity(0))} cores, no GPU"


def api_settings() -> str:
    from store.config import ServiceConfig

    config = ServiceConfig()
    return (
        f"AMID_API_CONCURRENCY={config.api_concurrency}, "
        f"AMID_API_QUEUE_SECONDS={config.api_queue_seconds:g}, "
        f"AMID_API_MAX_WAITING={config.api_max_waiting}"
    )


def table(runs: list[list[Phase]]) -> list[str]:
    """One row per operation and client count: medians over the runs, counts summed."""
    lines = [
        "| operation | clients | requests | 2xx/s | p50 ms | p99 ms | p99 vs 1 client | 503 "
        "(Retry-After) | other 5xx | client errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = list(zip(*runs, strict=True))
    baseline = {same[0].operation: p99(same) for same in rows if same[0].clients == 1}
    for same in rows:
        first = same[0]
        errors: Counter[str] = Counter()
        for p in same:
            errors.update(p.client_errors)
        listed = ", ".join(f"{n} {name}" for name, n in errors.items()) or "0"
        rate = statistics.median(p.ok / max(p.seconds, 1e-9) for p in same)
        p50 = statistics.median(p.percentile(0.5) for p in same)
        refused = sum(p.statuses[503] - p.bad_503 for p in same)
        lines.append(
            f"| {first.operation} | {first.clients} | {sum(len(p.latencies_ms) for p in same)} | "
            f"{rate:.0f} | {p50:.0f} | {p99(same):.0f} | {p99(same) / baseline[first.operation]:.1f}× | "
            f"{refused} | {sum(p.server_errors for p in same)} | {listed} |"
        )
    return lines


def p99(same: tuple[Phase, ...]) -> float:
    """The median over runs of each run's p99."""
    return statistics.median(p.percentile(0.99) for p in same)


async def measure(
    base: str, requests: dict[str, Request], seconds: float, max_requests: int
) -> tuple[list[Phase], list[float]]:
    phases: list[Phase] = []
    health: list[float] = []
    for operation in OPERATIONS:
        for clients in CLIENT_COUNTS:
            phase = Phase(operation, clients)
            running = run_phase(base, phase, requests[operation], seconds, max_requests)
            if operation == "get" and clients == max(CLIENT_COUNTS):
                health = await healthz_during(base, running)
            else:
                await running
            phases.append(phase)
            print(table([[*(p for p in phases if p.clients == 1), phase]])[-1], flush=True)
    return phases, health


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="Length of each phase.")
    parser.add_argument(
        "--max-requests", type=int, default=20_000, help="Cap on the requests of each phase."
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="uvicorn processes (the API image runs one)."
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="Runs of the whole table; medians are reported."
    )
    parser.add_argument("--write", type=Path, help="Write the table into this BENCHMARKS.md.")
    args = parser.parse_args()

    from tests.integration.e2e._service import free_port

    load_before = load_average()
    with throwaway_database() as url, tempfile.TemporaryDirectory() as home:
        secrets, job_ids = seed(url, max(CLIENT_COUNTS))
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        api = start_api(url, Path(home), port, args.workers)
        try:
            wait_up(base, api)
            runs, health = [], []
            for _ in range(args.repeat):
                phases, probes = asyncio.run(
                    measure(base, requests_for(secrets, job_ids), args.seconds, args.max_requests)
                )
                runs.append(phases)
                health.extend(probes)
        finally:
            api.terminate()
            api.wait(timeout=30)
    load_after = load_average()

    lines = table(runs)
    get_100 = tuple(
        run_
        for run_ in (
            next(p for p in run if p.operation == "get" and p.clients == 100) for run in runs
        )
    )
    no_5xx = all(p.server_errors == 0 for run in runs for p in run)
    fast_get = p99(get_100) < GET_P99_TARGET_MS
    summary = [
        f"Machine: {machine()}; load average (1/5/15 min) {load_before} before, "
        f"{load_after} after. {args.workers} uvicorn process(es) on Postgres, {api_settings()}; "
        f"{args.seconds:g} s per row, {args.repeat} runs of the table (medians of their p50, p99 "
        "and 2xx/s; requests and errors summed); one client process (`benchmarks.load_client`) "
        "on the same cores.",
        "",
        *lines,
        "",
        f"- `/healthz` while 200 clients read jobs: p50 {statistics.median(health):.0f} ms, "
        f"max {max(health):.0f} ms ({len(health)} probes).",
        f"- No 5xx other than 503 with Retry-After: {'yes' if no_5xx else 'NO'}.",
        f"- GET p99 at 100 clients: {p99(get_100):.0f} ms (median of the runs: "
        f"{', '.join(f'{p.percentile(0.99):.0f}' for p in get_100)}) "
        f"({'under' if fast_get else 'NOT under'} the {GET_P99_TARGET_MS:.0f} ms target).",
    ]
    print("\n".join(summary))
    if args.write:
        section = [
            "## The API under concurrent clients (`python -m benchmarks.service`)",
            "",
            *summary,
        ]
        write_section(args.write, "service", section)
    sys.exit(0 if no_5xx and fast_get else 1)


if __name__ == "__main__":
    main()
