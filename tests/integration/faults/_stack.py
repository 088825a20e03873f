"""The moving parts of the fault tests: a service stack of real processes (API, reaper, workers)
and private Redis / Postgres servers that a test may stop and start again on the same port.

Every process here is started in a session of its own, so killing its group takes its children
(a worker's training child) with it. Nothing is left running: `Stack.close()`,
`PrivateRedis.close()` and `PrivatePostgres.close()` are called from fixture teardowns.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from store.artifacts import ArtifactStore
from store.config import ServiceConfig
from tests.integration.e2e._service import (
    Client,
    base_env,
    free_port,
    make_key,
    start,
    stop,
    wait_for,
    wait_ready,
)

# The shipped defaults for the heartbeat, the stale threshold, the reaper's interval and the
# cancel grace (set explicitly: the end-to-end environment shortens some of them), so the
# figures in docs/reliability.md are what an operator gets. Only the last two differ, to keep
# the tests short: a second attempt is the last, and a queued job's message is re-sent after
# 30 s instead of 60 s.
SHIPPED_DEFAULTS = (
    "heartbeat_seconds",
    "stale_after_seconds",
    "reaper_interval_seconds",
    "cancel_grace_seconds",
)
RELIABILITY_SETTINGS: dict[str, str] = {
    **{
        f"AMID_{name.upper()}": str(ServiceConfig.model_fields[name].default)
        for name in SHIPPED_DEFAULTS
    },
    "AMID_REDISPATCH_AFTER_SECONDS": "30",
    "AMID_MAX_ATTEMPTS": "2",
}

# One compute thread per training process: on a small CPU machine shared with other work,
# torch's default of one thread per core oversubscribes it and a step takes several times longer.
TRAINING_THREADS = 1

START_TIMEOUT = 90.0


class ServerFailed(RuntimeError):
    """A private Redis or Postgres that would not start (the fixture turns it into a failure)."""


def pid_alive(pid: int) -> bool:
    """Whether `pid` is a live process (an exited, not yet reaped one counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    # The state letter follows the command name, which is in parentheses and may hold spaces.
    return stat.rsplit(")", 1)[1].split()[0] not in {"Z", "X"}


@dataclass
class Service:
    """One process of the stack, with the log it writes."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def task_outcomes(self) -> list[str]:
        """What became of each run_job message of this worker, in order: what the task returned
        ('succeeded', 'not_claimed', ...), read from Celery's log line for a finished task, or
        'dropped' for a stale message the main process dropped before any job process ran."""
        found: list[tuple[str, str]] = re.findall(
            r"Task amid\.run_job\[[^\]]+\] succeeded in [\d.]+s: '(\w+)'"
            r"|job [0-9a-f]{32}: stale (message) dropped",
            self.output(),
        )
        return [returned or "dropped" for returned, _ in found]

    def kill(self) -> None:
        """SIGKILL the whole process group (the worker's main process and its training child)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def children(self) -> list[int]:
        """Pids of this process's direct children (a prefork worker's pool processes)."""
        found = []
        for task in Path(f"/proc/{self.pid}/task").glob("*/children"):
            with contextlib.suppress(FileNotFoundError):
                found.extend(int(pid) for pid in task.read_text().split())
        return found


@dataclass
class Stack:
    """API, reaper and workers as real processes on one database, broker and artifact root."""

    root: Path
    database_url: str
    broker_url: str
    settings: dict[str, str] = field(default_factory=dict)
    services: list[Service] = field(default_factory=list)
    api_url: str | None = None
    _client: Client | None = None

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.artifacts_uri = (self.root / "artifacts").as_uri()
        self.artifacts = ArtifactStore(self.artifacts_uri)
        self.queue = f"amid-faults-{uuid.uuid4().hex[:8]}"
        self.env = base_env(
            self.root / "home",
            AMID_DATABASE_URL=self.database_url,
            AMID_BROKER_URL=self.broker_url,
            AMID_QUEUE=self.queue,
            AMID_ARTIFACTS_URI=self.artifacts_uri,
            OMP_NUM_THREADS=str(TRAINING_THREADS),
            **{**RELIABILITY_SETTINGS, **self.settings},
        )
        self._engine = sa.create_engine(self.database_url, pool_pre_ping=True)

    # -- processes -------------------------------------------------------------------------------
    def _start(self, name: str, argv: list[str]) -> Service:
        log = self.root / f"{name}.log"
        service = Service(name, start(argv, self.env, log), log)
        self.services.append(service)
        return service

    def start_api(self) -> Service:
        port = free_port()
        self.api_url = f"http://127.0.0.1:{port}"
        return self._start(
            "api", ["uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(port)]
        )

    def start_reaper(self) -> Service:
        return self._start("reaper", ["cli.main", "reaper"])

    def start_worker(self, name: str = "worker") -> Service:
        return self._start(name, ["cli.main", "worker", "--loglevel=INFO"])

    def up(self, *workers: str, reaper: bool = True) -> list[Service]:
        """The API, the reaper (unless told not to) and the named workers, all started in
        parallel and waited for; returns the workers in the order named."""
        self.start_api()
        if reaper:
            self.start_reaper()
        started = [self.start_worker(name) for name in workers]
        self.wait_api()
        for worker in started:
            self.wait_worker(worker)
        return started

    def wait_api(self, timeout: float = START_TIMEOUT) -> None:
        assert self.api_url is not None, "start_api() first"
        wait_ready(self.api_url, [s.process for s in self.services], timeout)

    def wait_worker(self, worker: Service, timeout: float = START_TIMEOUT) -> None:
        """Until Celery says the worker consumes (its "ready." line)."""

        def ready() -> bool:
            if not worker.alive():
                raise AssertionError(f"{worker.name} exited:\n{worker.output()[-3000:]}")
            return " ready." in worker.output()

        wait_for(ready, timeout, f"{worker.name} to be ready")

    @property
    def client(self) -> Client:
        if self._client is None:
            assert self.api_url is not None, "start_api() first"
            self._client = Client(self.api_url, make_key(self.database_url))
        return self._client

    def logs(self) -> str:
        """Every service's log tail, for an assertion message."""
        return "\n".join(f"--- {s.name} ---\n{s.output()[-4000:]}" for s in self.services)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        for service in reversed(self.services):
            stop(service.process)
        self._engine.dispose()

    # -- the job row, beyond what the API shows ----------------------------------------------------
    def row(self, job_id: str) -> dict[str, Any]:
        with self._engine.connect() as conn:
            found = (
                conn.execute(sa.text("SELECT * FROM jobs WHERE id = :id"), {"id": job_id})
                .mappings()
                .one()
            )
        return dict(found)

    def training_pid(self, job_id: str) -> int:
        """Pid of the process that holds the job's lease (worker ids are host:pid:gpu)."""
        owner = self.row(job_id)["lease_owner"]
        assert owner, f"job {job_id} has no lease owner"
        return int(owner.split(":")[1])

    def events(self, job_id: str) -> list[dict[str, Any]]:
        return self.client.items(job_id, "events")

    def wait_finished(self, job_id: str, timeout: float) -> dict[str, Any]:
        try:
            return self.client.wait_status(job_id, {"succeeded", "failed", "cancelled"}, timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.logs()}") from exc


def readyz(url: str) -> httpx.Response:
    return httpx.get(f"{url}/readyz", timeout=15)


# -- a private Redis ---------------------------------------------------------------------------------


class PrivateRedis:
    """A redis-server of this test's own, without persistence: a restart loses every message."""

    def __init__(self, root: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ServerFailed("redis-server is not on PATH")
        self.binary = binary
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def ping(self) -> bool:
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=1)
        try:
            return bool(client.ping())
        except redis.exceptions.ConnectionError:
            return False
        finally:
            client.close()

    def start(self) -> None:
        self.starts += 1
        log = self.root / f"redis-{self.starts}.log"
        argv = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        argv += ["--appendonly", "no", "--daemonize", "no", "--dir", str(self.root)]
        with log.open("wb") as handle:
            self.process = subprocess.Popen(
                argv, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
            )

        def up() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise ServerFailed(f"redis-server exited: {log.read_text(errors='replace')}")
            return self.ping()

        wait_for(up, 20, f"redis-server on port {self.port}", interval=0.05)

    def stop(self) -> None:
        """SIGTERM, as an orchestrator stops it, and wait for it to exit."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=20)
        self.process = None

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=20)
        self.process = None


# -- a private Postgres ------------------------------------------------------------------------------


def postgres_bindir() -> Path | None:
    """The directory of initdb and pg_ctl: pg_config's answer, else the newest versioned install."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(subprocess.CalledProcessError, OSError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
            ).stdout
            candidates.append(Path(out.strip()))
    # Debian's layout: one directory per major version; the newest first.
    versioned = Path("/usr/lib/postgresql").glob("*/bin")
    candidates += sorted(
        versioned,
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).parent)
    for candidate in candidates:
        if (candidate / "initdb").is_file() and (candidate / "pg_ctl").is_file():
            return candidate
    return None


class PrivatePostgres:
    """A Postgres cluster of this test's own, on a free port, stopped and started with pg_ctl.

    initdb and postgres refuse to run as root: as root, they run as the `postgres` account, and
    the cluster lives in a fresh directory of the system temp dir (pytest's base temp dir is
    private to root, so that account could not reach a cluster under `tmp_path`); it is removed
    by `close()`. As any other user, the cluster lives under `root` and runs as that user.
    """

    def __init__(self, root: Path) -> None:
        bindir = postgres_bindir()
        if bindir is None:
            raise ServerFailed("no initdb/pg_ctl found (pg_config --bindir, /usr/lib/postgresql)")
        self.bindir = bindir
        self.port = free_port()
        self.as_root = os.geteuid() == 0
        self._owned_dir: Path | None = None
        if self.as_root:
            try:
                account = pwd.getpwnam("postgres")
            except KeyError as exc:
                raise ServerFailed("running as root and there is no `postgres` account") from exc
            self._owned_dir = Path(tempfile.mkdtemp(prefix="amid-faults-pg-"))
            os.chown(self._owned_dir, account.pw_uid, account.pw_gid)
            self.home = self._owned_dir
        else:
            self.home = root / "postgres"
            self.home.mkdir(parents=True, exist_ok=True)
        self.data = self.home / "data"
        self.log = self.home / "postgres.log"
        self.running = False

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: str, timeout: float = 60) -> None:
        command = list(argv)
        if self.as_root:
            runuser = shutil.which("runuser")
            if runuser:
                command = [runuser, "-u", "postgres", "--", *argv]
            else:
                command = ["su", "postgres", "-s", "/bin/sh", "-c", shlex.join(argv)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            log = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise ServerFailed(f"{argv[0]} failed ({done.returncode}): {done.stderr}\n{log}")

    def init(self) -> None:
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
        )

    def start(self) -> None:
        # No durability needed: fsync off keeps a two-core machine's disk out of the timings.
        options = (
            f"-p {self.port} -k {self.home} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-w",
            "-t",
            "60",
            "-o",
            options,
            "start",
        )
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")
        self.running = False

    def close(self) -> None:
        pid_file = self.data / "postmaster.pid"
        try:
            if self.running or pid_file.exists():
                self.stop("immediate")
        except (ServerFailed, subprocess.TimeoutExpired):
            # pg_ctl could not stop it: the postmaster's pid is the first line of its pid file.
            if pid_file.exists():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)
            raise
        finally:
            if self._owned_dir is not None:
                shutil.rmtree(self._owned_dir, ignore_errors=True)
