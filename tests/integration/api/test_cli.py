"""The `amid` client commands against the real app (in-process) on Postgres."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import cli.jobs
from store import jobs
from store.artifacts import final_key, get_artifact_store
from store.db import session_scope
from tests.integration.api._client import run_amid as _amid

pytestmark = pytest.mark.integration

MakeKey = Callable[..., dict[str, str]]


def test_submit_get_list_cancel(
    wired: None, secret: str, run_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = ("jobs", "--api-key", secret)
    code, out, _ = _amid(capsys, *key, "submit", str(run_file), "--idempotency-key", "k1")
    job_id = out.strip()
    assert code == 0 and len(job_id) == 32
    code, again, _ = _amid(capsys, *key, "submit", str(run_file), "--idempotency-key", "k1")
    assert code == 0 and again.strip() == job_id

    code, out, _ = _amid(capsys, *key, "get", job_id)
    job = json.loads(out)
    assert code == 0 and job["id"] == job_id and job["settings"]["max_steps"] == 4

    code, out, _ = _amid(capsys, *key, "list", "--status", "queued")
    assert code == 0 and job_id in out

    code, out, _ = _amid(capsys, *key, "cancel", job_id)
    assert code == 0 and "cancelled" in out
    code, _, err = _amid(capsys, *key, "cancel", job_id)
    assert code == 1 and "already cancelled" in err and "Traceback" not in err

    code, out, _ = _amid(capsys, *key, "events", job_id)
    assert code == 0 and "queued" in out and "cancelled" in out


def test_api_errors_print_the_field_and_exit_non_zero(
    wired: None, secret: str, run_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(run_file.read_text() + "lambda: 2\n")
    code, out, err = _amid(capsys, "jobs", "--api-key", secret, "submit", str(bad))
    assert code == 1 and out == ""
    assert err.startswith("error: lambda: ") and "Traceback" not in err
    assert "lambda: lambda" not in err  # the field is said once

    code, _, err = _amid(capsys, "jobs", "submit", str(bad))  # no key
    assert code == 1 and "API key" in err

    code, _, err = _amid(capsys, "jobs", "--api-key", secret, "submit", str(tmp_path / "none.yaml"))
    assert code == 1 and "cannot read" in err


def test_unreachable_api_is_one_line(
    app_env: None, run_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _amid(
        capsys, "jobs", "--url", "http://127.0.0.1:1", "--api-key", "k", "submit", str(run_file)
    )
    assert code == 1 and "cannot reach the API" in err and "Traceback" not in err


def _submit(capsys: pytest.CaptureFixture[str], secret: str, run_file: Path) -> str:
    """The new job's id, submitted through the CLI."""
    _, out, _ = _amid(capsys, "jobs", "--api-key", secret, "submit", str(run_file))
    return out.strip()


def _advance(job_id: str, end: str, final_uri: str | None = None) -> Callable[[float], None]:
    """A `sleep` for `wait`: each call moves the job one stage on, as a worker would."""
    stages = iter(range(4))

    def sleep(_: float) -> None:
        stage = next(stages)
        with session_scope() as session:
            if stage == 0:
                jobs.claim_job(session, job_id, "w")
            elif stage == 1:
                jobs.update_progress(
                    session,
                    job_id,
                    "w",
                    step=2,
                    total_steps=4,
                    eta_seconds=3.0,
                    latest_metrics={"train/loss": 2.5},
                )
            else:
                jobs.update_progress(
                    session,
                    job_id,
                    "w",
                    step=4,
                    total_steps=4,
                    eta_seconds=0.0,
                    latest_metrics={"eval/rouge_l": 0.3},
                )
                jobs.finish_job(
                    session,
                    job_id,
                    "w",
                    end,
                    final_uri=final_uri,
                    error_code=None if end == "succeeded" else "Boom",
                    error_message=None if end == "succeeded" else "it broke",
                )

    return sleep


@pytest.mark.parametrize(("end", "code"), [("succeeded", 0), ("failed", 1)])
def test_wait_follows_until_the_end(
    wired: None,
    secret: str,
    run_file: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    end: str,
    code: int,
) -> None:
    job_id = _submit(capsys, secret, run_file)
    monkeypatch.setattr(cli.jobs, "pause", _advance(job_id, end, "file:///s/final"))
    exit_code, out, err = _amid(
        capsys, "jobs", "--api-key", secret, "wait", job_id, "--interval", "0"
    )
    assert exit_code == code
    assert f"job {job_id} {end}" in out
    assert "train/loss = 2.5" in out and "eval/rouge_l = 0.3" in out
    if end == "succeeded":
        assert "student: file:///s/final" in out
    else:
        assert "Boom: it broke" in err
    assert "4/4" in err  # the progress bar reached the end


def test_wait_gives_up_only_when_the_job_stops_moving(
    wired: None,
    secret: str,
    run_file: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    job_id = _submit(capsys, secret, run_file)
    advance = _advance(job_id, "succeeded")
    polls = iter(range(100))

    def sleep(seconds: float) -> None:
        # Two stages of progress 0.3 s apart (longer in all than the 0.5 s idle timeout, which
        # a moving job never hits), then nothing moves.
        poll = next(polls)
        if poll < 2:
            advance(seconds)
        time.sleep(0.3)

    monkeypatch.setattr(cli.jobs, "pause", sleep)
    exit_code, _, err = _amid(
        capsys,
        "jobs",
        "--api-key",
        secret,
        "wait",
        job_id,
        "--interval",
        "0",
        "--idle-timeout",
        "0.5",
    )
    assert exit_code == 1
    assert "made no progress for 0.5s (still running at step 2)" in err
    assert "Traceback" not in err


def test_events_follow_stops_when_the_job_ends(
    wired: None,
    secret: str,
    run_file: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    job_id = _submit(capsys, secret, run_file)
    monkeypatch.setattr(cli.jobs, "pause", _advance(job_id, "succeeded"))
    code, out, _ = _amid(
        capsys, "jobs", "--api-key", secret, "events", job_id, "--follow", "--interval", "0"
    )
    types = [line.split()[2] for line in out.splitlines()]
    assert code == 0 and types == ["queued", "started", "succeeded"]


def test_download_unpacks_the_student(
    wired: None,
    secret: str,
    run_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    job_id = _submit(capsys, secret, run_file)
    code, _, err = _amid(capsys, "jobs", "--api-key", secret, "download", job_id, "-o", "x")
    assert code == 1 and "no final student" in err

    student = tmp_path / "student"
    student.mkdir()
    (student / "config.json").write_text('{"n_layer": 2}')
    uploaded = get_artifact_store().upload_dir(student, final_key(job_id))
    with session_scope() as session:
        jobs.claim_job(session, job_id, "w")
        jobs.finish_job(session, job_id, "w", "succeeded", final_uri=uploaded.uri)

    target = tmp_path / "out"
    code, out, _ = _amid(capsys, "jobs", "--api-key", secret, "download", job_id, "-o", str(target))
    assert code == 0
    unpacked = Path(out.strip().splitlines()[0])
    assert (unpacked / "config.json").read_text() == '{"n_layer": 2}'
    assert [path.name for path in target.iterdir()] == [unpacked.name]  # no scratch left behind


def test_status_and_list_show_a_queued_jobs_place(
    wired: None, secret: str, run_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = ("jobs", "--api-key", secret)
    code, out, _ = _amid(capsys, *key, "submit", str(run_file), "--priority", "3")
    job_id = out.strip()
    assert code == 0
    shown = json.loads(_amid(capsys, *key, "get", job_id)[1])
    position = shown["queue_position"]
    assert shown["priority"] == 3 and isinstance(position, int) and position >= 1

    code, out, _ = _amid(capsys, *key, "status", job_id)
    assert code == 0 and out.startswith(f"{job_id}  queued  position {position}, ")
    code, out, _ = _amid(capsys, *key, "list", "--status", "queued")
    line = next(row for row in out.splitlines() if row.startswith(job_id))
    assert f"#{position} " in line

    with session_scope() as session:
        jobs.claim_job(session, job_id, "w")
    code, out, _ = _amid(capsys, *key, "status", job_id)
    assert code == 0 and out.startswith(f"{job_id}  running  step 0/?")
